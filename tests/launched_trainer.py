"""A Hugging Face Trainer script, run by tests/test_hf_trainer.py as a user runs theirs: on one process
(the single-device reference), or under ``torchrun`` with ``tp_compile`` (TP over all ranks, or
``--dp N``: ``tp_compile(mesh=...)`` with FSDP2 over ``dp``). No tpcompile call besides
``tp_compile``: no init_process_group, no Trainer subclass, no parallelism config.

The tiny Llama of ``hf_models`` (vocabulary 255: padded at TP=2), AdamW, gradient clipping at 0.5,
gradient accumulation over 2 micro-batches, a checkpoint every 2 steps (``--resume`` resumes from
one), ``trainer.save_model(OUT/final)`` at the end. Global rank 0 prints one ``RESULT`` JSON line:
the logged losses."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tpcompile.compat  # noqa: E402

tpcompile.compat.torchvision_without_kernels()  # this machine's torchvision wheel has no CPU kernels

import hf_models  # noqa: E402
import tpcompile  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

VOCAB, ROWS, T = 255, 32, 16


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, VOCAB, (ROWS, T), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resume", default=None)
    a = ap.parse_args()

    model = hf_models.make_model("llama", vocab_size=VOCAB)
    if "WORLD_SIZE" in os.environ and a.dp > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (a.dp, dist.get_world_size() // a.dp), mesh_dim_names=("dp", "tp"))
        example = {"input_ids": Rows().x[:a.batch], "labels": Rows().x[:a.batch]}
        model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=example)
    elif "WORLD_SIZE" in os.environ:
        model = tpcompile.tp_compile(model)

    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=2, max_steps=a.steps,
        learning_rate=1e-3, max_grad_norm=0.5, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(os.path.join(a.out, "final"))
    if int(os.environ.get("RANK", "0")) == 0:
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        print("RESULT " + json.dumps({"losses": losses}), flush=True)


if __name__ == "__main__":
    main()
