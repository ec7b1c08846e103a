"""Code that Dynamo runs eagerly computes the right answer, slower (``tpcompile.eager``).

Three ways a frame escapes tracing, each reading a parameter directly (not through a module call,
which Dynamo compiles on its own): a ``torch._dynamo.disable``d helper called from a block, a graph
break inside a ``with`` of a user context manager in a block (Dynamo cannot resume there and runs
the block eagerly), and ``x @ self.wte.weight.T`` in a forward Dynamo runs eagerly (a graph break
inside its block loop). Each used to raise ``TPEagerFallbackError`` (the read got a memory-free
stand-in). Now the read gets the full parameter, gathered from this rank's shard: at TP=2 on gloo,
3 AdamW steps with ``clip_grad_norm_``, the loss within 1e-5 relative and every gradient within
1e-5 of single device on every rank, the same loss on both ranks, the norms equal, the projections
called as modules still sharded, and one ``TPWarning`` per eager frame naming it.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from multirank import run_cases


@torch._dynamo.disable
def _layer_norm_untraced(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A helper kept out of compilation (as a library's custom kernel wrapper would be)."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class _Section:
    """A user context manager (a profiler range, a timer): Dynamo cannot resume a graph break inside it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _disabled_helper_forward(self, x):
    x = x + self.attn(_layer_norm_untraced(self.ln_1, x))
    return x + self.mlp(self.ln_2(x))


def _break_in_context_forward(self, x):
    with _Section():
        torch._dynamo.graph_break()
        h = F.layer_norm(x, self.ln_1.normalized_shape, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)
    x = x + self.attn(h)
    return x + self.mlp(self.ln_2(x))


def _eager_head_forward(self, idx, targets):
    pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
    x = self.wte(idx) + self.wpe(pos)
    for block in self.h:
        x = block(x)
        self.stats.append(x.abs().mean().item())  # a graph break inside the loop: this frame runs eagerly
    logits = self.ln_f(x) @ self.wte.weight.T  # the vocab-sharded embedding read directly as the head
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _checkpointed_with_a_break_forward(self, x):
    def body(x):
        h = F.layer_norm(x, self.ln_1.normalized_shape, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)
        torch._dynamo.graph_break()  # inside the checkpoint: Dynamo runs the whole checkpoint eagerly
        x = x + self.attn(h)
        return x + self.mlp(self.ln_2(x))

    return torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False)


def _halved_residual_forward(self, x):
    x = x + 0.5 * self.attn(self.ln_1(x))
    return x + 0.5 * self.mlp(self.ln_2(x))


VOCAB = 255  # not divisible by tp=2: the vocab-parallel embedding is padded (read whole by the eager head)


def _model(case: str):
    import types

    import gpt

    model, _ = gpt.make_model(n_layer=2, vocab_size=VOCAB)
    if case == "instance-forward":  # a forward set on each block, as a method of that block
        for block in model.h:
            block.forward = types.MethodType(_halved_residual_forward, block)
    elif case == "partial-forward":  # ... as a partial over the block (accelerate's hooks wrap forwards so)
        for block in model.h:
            block.forward = functools.partial(_halved_residual_forward, block)
    elif case == "eager-head":
        model.stats = []
        del model.lm_head  # the embedding is the head
        model.forward = types.MethodType(_eager_head_forward, model)
    else:
        fwd = {"disabled-helper": _disabled_helper_forward, "break-in-context": _break_in_context_forward,
               "checkpoint-eager": _checkpointed_with_a_break_forward}[case]
        for block in model.h:
            block.forward = types.MethodType(fwd, block)
    return model


def _train(rank, world, case, regional=None):
    from models_common import train_beside

    model = _model(case)
    g = torch.Generator().manual_seed(7)
    batches = [tuple(torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)) for _ in range(3)]
    return train_beside(rank, world, model, batches, lambda m, b: m(*b), lr=1e-3, optimizer=torch.optim.AdamW,
                        clip=1.0, backend="aot_eager", regional=regional)


CASES = ("disabled-helper", "break-in-context", "eager-head", "instance-forward", "partial-forward",
         "checkpoint-eager")


@functools.cache
def _gloo() -> dict:
    return dict(zip(CASES, run_cases(2, [(_train, (c,)) for c in CASES])))


def _check(case: str, frame: str | None, sharded: bool = True) -> dict:
    from models_common import assert_parity

    results = _gloo()[case]
    assert_parity(results, rel=1e-5, grad_atol=1e-5)
    for r in results:
        assert len(r["loss"]) == 3
        for a, b in zip(r["norm"], r["ref_norm"]):
            assert abs(a - b) <= 1e-5 * abs(b), (r["norm"], r["ref_norm"])
        eager = [w for w in r["warnings"] if "ran eagerly" in w]
        assert (len(eager) == 1 and frame in eager[0]) if frame else not eager, "\n".join(r["warnings"])
    plan = results[0]["plan"]
    for i in range(2 if sharded else 0):  # the module calls inside are compiled and sharded as without the eager frame
        assert plan[f"h.{i}.attn.q_proj.weight"][0] == "colwise"
        assert plan[f"h.{i}.mlp.proj.weight"][0] == "rowwise"
    return results[0]


def test_disabled_helper_reading_a_weight_in_a_block_trains_at_parity():
    r = _check("disabled-helper", "_layer_norm_untraced")
    assert "h.0.ln_1.weight" in next(w for w in r["warnings"] if "ran eagerly" in w)


def test_graph_break_inside_a_user_context_manager_in_a_block_trains_at_parity():
    """Dynamo cannot resume there, so it gives up on the model's forward (the outermost frame run
    eagerly, named by the warning at the block call) and on the block's; the module calls compile."""
    r = _check("break-in-context", "GPT.forward")
    assert "h.0.ln_1.weight" in next(w for w in r["warnings"] if "ran eagerly" in w)


def test_checkpointed_block_dynamo_cannot_trace_is_recomputed_eagerly_at_parity():
    """A graph break inside ``torch.utils.checkpoint``: Dynamo runs the checkpoint eagerly (its own
    ``_disable_dynamo``), so the whole block runs eagerly in the forward and again in the backward's
    recompute; both read the gathered parameters. Right, one warning for the block body."""
    r = _check("checkpoint-eager", "_checkpointed_with_a_break_forward", sharded=False)
    assert "h.0.attn.q_proj.weight" in next(w for w in r["warnings"] if "ran eagerly" in w)


def test_weight_read_directly_in_an_eagerly_run_forward_trains_at_parity():
    r = _check("eager-head", "_eager_head_forward")
    # sharded (and padded: 255 rows): the eager read gathers the 255 real rows, its gradient is this rank's shard
    assert r["plan"]["wte.weight"][0] == "vocab"
    assert "wte.weight" in next(w for w in r["warnings"] if "ran eagerly" in w)


def test_forward_set_on_the_instance_is_the_one_that_runs():
    """Regression: a block whose ``forward`` was set on the instance (``block.forward = ...``) ran its
    class's forward in the compiled program (the twin copied the module, then replaced ``forward``
    with its own, which called ``type(self).forward``): a silently different model. As a method of
    the block it stays in the repeated block's compile region; as a partial (another callable
    holding its module) the blocks are traced inline."""
    for case, regional in (("instance-forward", True), ("partial-forward", False)):
        r = _check(case, None)
        assert bool(r["regions"][0]) == regional, (case, r["regions"])
