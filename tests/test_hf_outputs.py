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


@functools.cache
def _gloo() -> dict:
    return dict(zip(("llama", "mixtral"), run_cases(2, [(_outputs_beside, ("llama",)), (_with_router, ("mixtral",))])))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_hidden_states_and_router_logits_train_like_single_device(family):
    r = assert_parity(_gloo()[family], rel=1e-5, grad_atol=1e-5)
    assert r["hidden"] == hf_models.make_config(family).num_hidden_layers + 1
    assert r["aux"] == (family == "mixtral")
    assert r["logits_err"] < 1e-5
    assert not r["warnings"], r["warnings"]
