"""Run by tests/test_launch.py under ``torchrun --nproc-per-node 2``, as a Hugging Face Trainer script
is: no ``init_process_group`` anywhere (tp_compile initialises the default group from torchrun's
environment), and every forward gets the Trainer's kind of keyword arguments: a 0-dim
``num_items_in_batch`` tensor, a dict, a list with ``None``, a dataclass. Two SGD steps beside a
single-device copy (``models_common.train_beside``); rank 0 prints one JSON line."""
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import gpt  # noqa: E402


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
    from models_common import train_beside  # tests/ is this script's directory: on sys.path

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    batches = [tuple(torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)) for _ in range(2)]

    def loss_fn(m, b):
        kw = dict(num_items_in_batch=torch.tensor(30), options={"scale": 0.5}, flags=[True, None], note=Note(0))
        return m(input_ids=b[0], labels=b[1], **kw)

    r = train_beside(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), TrainerStyle(), batches, loss_fn)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"losses": list(zip(r["loss"], r["ref_loss"])), "grad_err": r["grad_err"],
                                      "said": r["warnings"], "world": torch.distributed.get_world_size(),
                                      "backend": torch.distributed.get_backend()}), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
