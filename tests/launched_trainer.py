"""A Hugging Face Trainer script, run by tests/test_hf_trainer.py as a user runs theirs: on one process
(the single-device reference), or under ``torchrun`` with ``tp_compile`` (TP over all ranks, or
``--dp N``: ``tp_compile(mesh=...)`` with FSDP2 over ``dp``). No tpcompile call besides
``tp_compile``: no init_process_group, no Trainer subclass, no parallelism config.

The tiny Llama of ``hf_models`` (vocabulary 255: padded at TP=2), AdamW, gradient clipping at 0.5,
gradient accumulation over 2 micro-batches, a checkpoint every 2 steps (``--resume`` resumes from
one), an evaluation every 2 steps, ``trainer.save_model(OUT/final)`` at the end. Global rank 0 prints
one ``RESULT`` JSON line: the logged losses by step (evaluation losses under minus the step)."""
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
    def __init__(self, rows: int = ROWS, seed: int = 1):
        self.x = torch.randint(0, VOCAB, (rows, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _sft(model, a):
    """TRL's SFTTrainer on the same rows, with a word-level tokenizer made here (no downloads)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t0")),
                                  pad_token="t1", eos_token="t2")
    args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True)
    return SFTTrainer(model=model, args=args, processing_class=tok,
                      train_dataset=Dataset.from_dict({"input_ids": Rows().x.tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--eval-rows", type=int, default=10)
    ap.add_argument("--sft", action="store_true", help="TRL's SFTTrainer (refused under tp_compile, clearly)")
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
        eval_strategy="steps" if a.eval_rows else "no", eval_steps=2, per_device_eval_batch_size=4,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    # evaluation batches of 4, the last one short at 10 rows (gather_for_metrics cuts the ranks' extra rows)
    trainer = _sft(model, a) if a.sft else Trainer(model=model, args=args, train_dataset=Rows(),
                                                   eval_dataset=Rows(a.eval_rows, seed=2) if a.eval_rows else None)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(os.path.join(a.out, "final"))
    if int(os.environ.get("RANK", "0")) == 0:
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        losses.update({-h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h})
        print("RESULT " + json.dumps({"losses": losses}), flush=True)


if __name__ == "__main__":
    main()
