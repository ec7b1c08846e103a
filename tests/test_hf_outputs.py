"""Hugging Face outputs that HF 5.x records with lazily installed forward hooks:
``output_hidden_states=True`` and Mixtral's ``output_router_logits=True`` (the router's load-balancing
loss, what MoE training adds to the loss). Under tp_compile the first call asking for them used to
fail (``cannot create weak reference to 'dict' object``: the hooks were installed while Dynamo traced
the twin); ``compat.install_output_hooks`` installs them on the user's model first.

Both train beside single device at TP=2 on gloo (2 SGD steps): the loss includes the router aux loss
(Mixtral) and a term on every hidden state, so loss and every gradient matching means those outputs
are single device's.
"""
import functools
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import hf_models  # noqa: E402
from models_common import assert_parity, train_beside  # noqa: E402
from multirank import run_cases  # noqa: E402


def _outputs_beside(rank: int, world: int, family: str, **overrides) -> dict:
    model = hf_models.make_model(family, **overrides)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, model.config.vocab_size, (2, 8), generator=g) for _ in range(2)]
    seen = {}

    def loss_fn(m, ids):
        out = m(input_ids=ids, labels=ids, output_hidden_states=True)
        seen.setdefault("hidden", len(out.hidden_states))
        seen.setdefault("aux", getattr(out, "aux_loss", None) is not None)
        extra = sum(h.float().pow(2).mean() for h in out.hidden_states) * 0.01
        return SimpleNamespace(loss=out.loss + extra, logits=out.logits)

    res = train_beside(rank, world, model, batches, loss_fn)
    res.update(seen)
    return res


def _with_router(rank: int, world: int, family: str) -> dict:
    return _outputs_beside(rank, world, family, output_router_logits=True)


def _loss_outside(rank: int, world: int, sharded_outputs: bool) -> dict:
    """The torchtitan-style loop: ``logits = model(input_ids=x).logits``, the loss computed outside the
    model; with ``sharded_outputs=True`` under ``loss_parallel()`` on the vocab-sharded DTensor logits.
    Vocabulary 255: padded at TP=2."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    model = hf_models.make_model("llama", vocab_size=255)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 255, (2, 8), generator=g) for _ in range(3)]
    seen = {}

    def loss_fn(m, ids):
        logits = m(input_ids=ids).logits
        if not isinstance(logits, DTensor):
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        seen["logits"] = (str(logits.placements), tuple(logits.shape), tuple(logits.to_local().shape))
        with loss_parallel():
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten()).full_tensor()

    res = train_beside(rank, world, model, batches, loss_fn, sharded_outputs=sharded_outputs,
                       backward_context=loss_parallel if sharded_outputs else None)
    res["replicated_numel"] = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    res.update(seen)
    return res


_CASES = {"llama": (_outputs_beside, ("llama",)), "mixtral": (_with_router, ("mixtral",)),
          "returned": (_loss_outside, (False,)), "loss_parallel": (_loss_outside, (True,))}


@functools.cache
def _gloo() -> dict:
    return dict(zip(_CASES, run_cases(2, list(_CASES.values()))))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_hidden_states_and_router_logits_train_like_single_device(family):
    r = assert_parity(_gloo()[family], rel=1e-5, grad_atol=1e-5)
    assert r["hidden"] == hf_models.make_config(family).num_hidden_layers + 1
    assert r["aux"] == (family == "mixtral")
    assert r["logits_err"] < 1e-5
    assert not r["warnings"], r["warnings"]


def test_logits_returned_for_a_loss_outside_keep_the_head_whole_and_say_so_once():
    """The head's output leaves the model: it stays replicated (sharding it would only add a gather),
    at parity, and one TPWarning says so with its cost and names both fixes (explain shows it too:
    test_explain)."""
    r = assert_parity(_gloo()["returned"], rel=1e-5, grad_atol=1e-5)
    assert r["plan"]["lm_head.weight"][0] == "replicate"
    assert len(r["warnings"]) == 1, r["warnings"]
    (w,) = r["warnings"]
    for said in ("LM head stays replicated", "lm_head ([255, 64]", "more per rank", "FLOPs per token",
                 "labels=", "sharded_outputs=True", "loss_parallel()"):
        assert said in w, (said, w)


def test_sharded_outputs_with_loss_parallel_shard_the_head_in_training():
    """``sharded_outputs=True``: the head column-parallel in training, the logits a vocab-sharded DTensor
    (``Shard(2)``, 128 of the 255 (padded 256) columns on rank 0), the loss under ``loss_parallel()``
    at parity over 3 SGD steps; every rank holds 1/tp of every parameter but the norms'."""
    res = _gloo()["loss_parallel"]
    r = assert_parity(res, rel=1e-5, grad_atol=1e-5)
    assert r["plan"]["lm_head.weight"][0] == "colwise"
    assert r["logits"] == ("(Shard(dim=2),)", (2, 8, 255), (2, 8, 128))
    assert res[1]["logits"][2] == (2, 8, 127)
    assert sum(x["local_numel"] for x in res) == r["full_numel"] - r["replicated_numel"] + 2 * r["replicated_numel"]
    assert not r["warnings"], r["warnings"]
