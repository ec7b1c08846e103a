"""``model.save_pretrained(dir)`` on a tp-compiled Hugging Face model, called on every rank as HF's
own TP path expects: the full single-device checkpoint, written once, in HF's layout; plain
``from_pretrained(dir)`` on one process gives bitwise the tensors the TP model holds (gathered) and
the same logits. It crashed (safetensors read a DTensor's storage pointer) and the ranks hung.

2 gloo ranks, one SGD step first (so the saved weights are trained ones): Llama with a vocabulary of
255 (padded to 256 rows at TP=2, cut back in the file), and Qwen3-MoE (3-D expert weights, fused
gate|up pieces) saved in 100 KB shards (HF's index file)."""
import functools
import os

import pytest
import torch

pytest.importorskip("transformers")

from multirank import run_cases  # noqa: E402

import hf_models  # noqa: E402

CASES = {"llama-vocab255": ("llama", {"vocab_size": 255}, {}),
         "qwen3_moe-shards": ("qwen3_moe", {"_experts_implementation": "grouped_mm", "num_hidden_layers": 1},
                              {"max_shard_size": "100KB"})}


def _save_and_load(rank, world, name, directory):
    import transformers

    import tpcompile

    family, overrides, save_kw = CASES[name]
    model = hf_models.make_model(family, **overrides)
    tp = tpcompile.tp_compile(model, backend="aot_eager")
    opt = torch.optim.SGD(tp.parameters(), lr=0.1)
    ids = torch.randint(0, tp.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    tp(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    full = tpcompile.full_state_dict(tp, rank0_only=False)
    with torch.no_grad():
        logits = tp(input_ids=ids).logits
    tp.save_pretrained(directory, **save_kw)  # every rank, as with HF's own tensor parallelism
    if rank != 0:
        return None
    cls = getattr(transformers, hf_models.CONFIGS[family][1])
    loaded = cls.from_pretrained(directory)
    sd = loaded.state_dict()
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids).logits
    return {
        "files": sorted(os.listdir(directory)),
        "missing": sorted(set(full) - set(sd)),
        "differ": sorted(k for k in full if k in sd and not torch.equal(full[k], sd[k])),
        "logits_err": (loaded_logits - logits).abs().max().item(),
        "vocab": tuple(sd["lm_head.weight"].shape),
    }


@functools.cache
def _gloo(tmp: str) -> dict:
    return dict(zip(CASES, run_cases(2, [(_save_and_load, (n, os.path.join(tmp, n))) for n in CASES])))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _gloo(str(tmp_path_factory.mktemp("hf_save")))


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_writes_the_single_device_checkpoint_once(saved, name):
    r = saved[name][0]
    assert saved[name][1] is None  # rank 1 wrote nothing of its own (the directory is rank 0's)
    assert r["missing"] == [] and r["differ"] == [], r
    assert r["logits_err"] <= 1e-5, r["logits_err"]
    assert "config.json" in r["files"]
    if name == "llama-vocab255":
        assert r["vocab"] == (255, 64) and "model.safetensors" in r["files"], r
    else:  # 100 KB shards: HF's index and several files
        assert "model.safetensors.index.json" in r["files"] and sum(f.endswith(".safetensors") for f in r["files"]) > 1
