"""Dynamic shapes through every pass, on 2 gloo ranks against the untouched single-device model.

Real data loaders, evaluation and generation change the sequence length (and the batch size).
Under ``torch.compile``'s ``dynamic=None`` Dynamo compiles the first shape static and, on a new
one, a graph with symbolic batch / sequence dims; ``dynamic=True`` and ``mark_dynamic`` start
symbolic. The sharded dims (heads, hidden, vocabulary) come from weights and stay static. Each
case trains with a new sequence length every step: loss and every gradient as single device's,
all ranks equal, every graph at the floor, and a bounded number of graphs. One token (``T=1``, a
decode step, static) and a batch of one are views like any other, not "one head".
(HF GPT-2 under ``dynamic=None`` at TP=2 and 4: ``tests/models_gpt2.py``, run by test_models.)
"""
import copy
import functools
import warnings

import pytest
import torch

import gpt
import tpcompile
from hf_models import make_model
from models_common import assert_at_floor, assert_parity, train_beside
from models_gpt2 import LENGTHS, lm_batches, lm_loss
from multirank import run_cases

ONE_BLOCK = {"gpt2": {"n_layer": 1}, "llama": {"num_hidden_layers": 1}}
GRAPHS = {"none": 2, "true": 1, "mark": 1}  # dynamic=None: one static graph, then one dynamic
# each mode on one family (dynamic=True and mark_dynamic give the same symbolic graphs; the
# compiles are what costs): GPT-2 under dynamic=None is models_gpt2's, at TP=2 and TP=4
MODES = [("gpt2", "true"), ("llama", "none"), ("llama", "mark")]


def _train_hf(rank, world, family, dynamic):
    """``family`` trained on lengths 16, 8, 12, 10. ``dynamic``: "none" (planned on a batch of one
    with ``example_inputs``, the first step a batch of one: Llama's ``repeat_kv`` reshape of a
    size-1 batch once looked like a dim of size 1), "true" (``dynamic=True``), "mark"
    (``mark_dynamic`` on batch and sequence dims, the batch size changing too)."""
    model = make_model(family, **ONE_BLOCK[family])
    vocab = model.config.vocab_size
    kw = {"sharded_outputs": True}  # training reads the loss: the logits need no gather
    sizes = (2,)
    if dynamic == "true":
        kw["dynamic"] = True
    elif dynamic == "mark":
        sizes = (2, 3, 2, 4)
    else:
        sizes = (1, 2, 2, 2)
        kw["example_inputs"] = {"input_ids": lm_batches(vocab, (LENGTHS[0],), (1,))[0][0]}
    loss = functools.partial(lm_loss, mark_dynamic=dynamic == "mark")
    return train_beside(rank, world, model, lm_batches(vocab, LENGTHS, sizes), loss, **kw)


def _one_token(rank, world):
    """Eval forwards without a cache, 8 tokens then one (a static ``T=1`` graph), logits against
    single device: HF Llama and GPT-2 on a batch of 2, the example GPT on a batch of one."""
    out = {}
    models = {family: (make_model(family, **ONE_BLOCK[family]), (8, 1)) for family in ("llama", "gpt2")}
    models["gpt"] = (gpt.make_model(batch_size=1, n_layer=1)[0], (16, 1))
    for name, (model, lengths) in models.items():
        model.eval()
        ref = copy.deepcopy(model)
        tp = tpcompile.tp_compile(model, backend="aot_eager")
        errs = []
        with torch.no_grad():
            for t in lengths:
                ids = torch.randint(0, 250, (1 if name == "gpt" else 2, t), generator=torch.Generator().manual_seed(t))
                if name == "gpt":
                    got, want = tp(ids), ref(ids)
                else:
                    got, want = tp(input_ids=ids).logits, ref(input_ids=ids).logits
                errs.append((got - want).abs().max().item())
        st = tpcompile.tp_state(tp)
        out[name] = {"errs": errs, "n_graphs": len(st.records), "styles": {f: p.style for f, p in st.plan.items()},
                     "per_graph": [(sum(r.floor["forward"].values()), sorted(c.kind for c in r.collectives))
                                   for r in st.records]}
    return out


def _sp_lengths(rank, world):
    """Sequence parallelism with the length changing: the token dim is symbolic; a length tp does not
    divide (9 at tp=2) recompiles (the dynamic graph guards ``T % tp == 0``) into a plain-TP graph,
    with a TPWarning, and gives single device's loss."""
    model, (x, y) = gpt.make_model(n_layer=1)
    batches = [(x[:, :t].contiguous(), y[:, :t].contiguous()) for t in (16, 8, 12)]

    def odd(tp, ref, out):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = (x[:, :9].contiguous(), y[:, :9].contiguous())
            out["odd"] = (tp(*b).item(), ref(*b).item())
        out["odd_warnings"] = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
        out["odd_graphs"] = len(tpcompile.tp_state(tp).records)

    return train_beside(rank, world, model, batches, lambda m, b: m(*b), sequence_parallel=True, report=odd)


@functools.cache
def _gloo() -> dict:
    cases = {f"{fam}_{dyn}": (_train_hf, (fam, dyn)) for fam, dyn in MODES}
    cases |= {"one_token": (_one_token, ()), "sp": (_sp_lengths, ())}
    return dict(zip(cases, run_cases(2, list(cases.values()))))


@pytest.mark.parametrize("family,dynamic", MODES)
def test_changing_sequence_lengths_train_like_single_device(family, dynamic):
    r = assert_parity(_gloo()[f"{family}_{dynamic}"])
    assert_at_floor(r)
    assert r["n_graphs"] == GRAPHS[dynamic], r["n_graphs"]
    plan = r["plan"]
    if family == "gpt2":
        assert plan["transformer.h.0.attn.c_attn.weight"] == ("colwise", 1, 3)
        assert plan["transformer.h.0.attn.c_proj.weight"] == ("rowwise", 0, 1)
    else:
        attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
        for name in ("q_proj", "k_proj", "v_proj"):
            assert plan[f"{attn}.{name}.weight"] == ("colwise", 0, 1), name
        assert plan[f"{attn}.o_proj.weight"] == ("rowwise", 1, 1)
        assert plan[f"{mlp}.down_proj.weight"] == ("rowwise", 1, 1)
        assert plan["model.embed_tokens.weight"][0] == "vocab"
    assert not r["warnings"], r["warnings"]


def test_one_token_and_a_batch_of_one_are_not_one_head():
    """``view(B, 1, H, hd)`` of one token and ``view(B*T, C) -> (B, 1, C)`` (HF Conv1D) split the
    projection like any length: q / c_attn and the MLP stay column-parallel, the logits exact."""
    results = _gloo()["one_token"]
    first = {"llama": "model.layers.0.self_attn.q_proj.weight", "gpt2": "transformer.h.0.attn.c_attn.weight",
             "gpt": "h.0.attn.q_proj.weight"}
    mlp = {"llama": "model.layers.0.mlp.up_proj.weight", "gpt2": "transformer.h.0.mlp.c_fc.weight",
           "gpt": "h.0.mlp.fc.weight"}
    for rank_out in results:
        for name, o in rank_out.items():
            assert max(o["errs"]) < 1e-5, (name, o["errs"])
            assert o["n_graphs"] == 2, (name, o["n_graphs"])
            assert o["styles"][first[name]] == o["styles"][mlp[name]] == "colwise", (name, o["styles"])
            # per graph: the floor (2 row-parallel all-reduces, the embedding's), and the gather of the
            # logits (in the floor of an inference graph: they are returned) where the LM head is
            # column-parallel: tied to the vocab-parallel embedding, or untied (Llama) at inference
            head = "lm_head.weight" if name == "llama" else "transformer.wte.weight" if name == "gpt2" else "wte.weight"
            assert o["styles"][head] == ("colwise" if name == "llama" else "vocab"), (name, o["styles"][head])
            for floor, kinds in o["per_graph"]:
                assert floor == 4 and kinds == ["all_gather"] + ["all_reduce"] * 3, (name, floor, kinds)


def test_sequence_parallel_with_changing_lengths():
    r = assert_parity(_gloo()["sp"])
    assert_at_floor(r)
    assert r["n_graphs"] == 2
    got, want = r["odd"]
    assert abs(got - want) <= 1e-5 * abs(want), r["odd"]
    assert r["odd_graphs"] == 3
    (w,) = r["odd_warnings"]
    assert "not divisible by tp=2" in w and "9 in this call" in w and "without sequence parallelism" in w, w
