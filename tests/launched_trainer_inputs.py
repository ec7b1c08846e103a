"""Run by tests/test_launch.py under ``torchrun --nproc-per-node 2``, as a Hugging Face Trainer script
is: no ``init_process_group`` anywhere (tp_compile initialises the default group from torchrun's
environment), and every forward gets the Trainer's kind of keyword arguments: a 0-dim
``num_items_in_batch`` tensor, a dict, a list with ``None``, a dataclass. Two SGD steps beside a
single-device copy; rank 0 prints one JSON line."""
import copy
import json
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import gpt  # noqa: E402

import tpcompile  # noqa: E402


@dataclass
class Note:
    step: int
    tag: str = "train"


class TrainerStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt, _ = gpt.make_model(n_layer=2)

    def forward(self, input_ids, labels, num_items_in_batch=None, options=None, flags=None, note=None):
        loss = self.gpt(input_ids, labels) * options["scale"]
        if num_items_in_batch is not None:  # the Trainer's token-count normalisation
            loss = loss * labels.numel() / num_items_in_batch
        return loss


def main() -> None:
    torch.manual_seed(0)
    model = TrainerStyle()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend="aot_eager")
    said = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (tp, ref))
    g = torch.Generator().manual_seed(5)
    losses = []
    for step in range(2):
        ids, labels = (torch.randint(0, 256, (2, 16), generator=g) for _ in range(2))
        kw = dict(num_items_in_batch=torch.tensor(30), options={"scale": 0.5}, flags=[True, None], note=Note(step))
        loss, ref_loss = tp(input_ids=ids, labels=labels, **kw), ref(input_ids=ids, labels=labels, **kw)
        loss.backward()
        ref_loss.backward()
        losses.append((loss.item(), ref_loss.item()))
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"losses": losses, "said": said,
                                      "world": torch.distributed.get_world_size(),
                                      "backend": torch.distributed.get_backend()}), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
