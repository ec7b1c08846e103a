"""What a user passes to ``tp_compile`` besides the model: torch.compile's own arguments go
through (``mode=``, ``options=``, ``dynamic=``, ``fullgraph=``), tpcompile's internal modes do
not, and ``plan=`` is checked against the model before anything compiles. One process on the
fake group (the options' effect on the compiled program, not numerics: those are gloo tests)."""
import pytest
import torch
import torch.nn as nn
from torch._inductor import config as inductor_config

import gpt
import tpcompile
from fakepg import fake_group


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).pow(2).mean()


class _BrokenMLP(_MLP):
    def forward(self, x):
        h = torch.relu(self.up(x))
        torch._dynamo.graph_break()
        return self.down(h).pow(2).mean()


# mode -> the Inductor settings torch.compile(mode=...) gives (torch._inductor.list_mode_options)
MODES = {"default": (False, False), "reduce-overhead": (False, True), "max-autotune": (True, True),
         "max-autotune-no-cudagraphs": (True, False)}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_torch_compile_mode_reaches_inductor(mode):
    """``mode=`` used to raise ``TypeError: Backend.__call__() got an unexpected keyword argument
    'mode'``: each mode's Inductor settings are in force while the rewritten graphs compile
    (seen by an ``options=`` post-grad pass, itself passed through), for forward and backward."""
    seen = []

    def spy(graph):
        seen.append((inductor_config.max_autotune, inductor_config.triton.cudagraphs))

    with fake_group(2):
        torch.manual_seed(0)
        model = tpcompile.tp_compile(_MLP(), mode=mode, options={"post_grad_custom_post_pass": spy})
        model(torch.randn(4, 16)).backward()
        kinds = [(c.phase, c.kind) for r in tpcompile.tp_state(model).records for c in r.collectives]
    assert seen == [MODES[mode]] * 2  # forward and backward graphs
    assert kinds == [("forward", "all_reduce")]  # the row-parallel down projection


def test_fullgraph_raises_on_a_graph_break_as_torch_compile_does():
    with fake_group(2):
        model = tpcompile.tp_compile(_BrokenMLP(), backend="aot_eager", fullgraph=True)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
            model(torch.randn(4, 16))


def test_dynamic_true_compiles_one_graph_for_every_batch_size():
    with fake_group(2):
        model = tpcompile.tp_compile(_MLP(), backend="aot_eager", dynamic=True)
        for b in (4, 6, 8):
            assert torch.isfinite(model(torch.randn(b, 16)))
        assert len(tpcompile.tp_state(model).records) == 1


def test_internal_modes_are_not_a_users_backend():
    """tpcompile's own modes ("trace" returns zeros: explain's; "plan": the planner's) are refused."""
    with fake_group(2):
        for internal in ("trace", "plan"):
            with pytest.raises(ValueError, match="use 'inductor', 'aot_eager' or 'eager'"):
                tpcompile.tp_compile(gpt.make_model()[0], backend=internal)


@pytest.mark.parametrize("pattern,style,message", [
    ("nonexistent.*", "colwise",
     "plan['nonexistent.*']: the pattern matches no parameter of GPT, nor a module that owns one (closest names: "),
    ("h.*.attn.q_prj", "colwise",
     "plan['h.*.attn.q_prj']: the pattern matches no parameter of GPT, nor a module that owns one (closest names: "
     "'h.1.attn.q_proj', 'h.0.attn.q_proj', "),
    # a module that owns no parameter itself: its children's names are what a plan matches
    ("h.0.mlp", "replicate", "plan['h.0.mlp']: the pattern matches no parameter of GPT, nor a module that owns one "
     "(closest names: 'h.0.mlp.fc', 'h.0.mlp.proj', "),
    ("lm_head", "colwse", "plan['lm_head'] = 'colwse': style must be one of ('colwise', 'rowwise', 'vocab', "
     "'replicate', 'expert-colwise', 'expert-rowwise', 'expert') (did you mean: 'colwise', 'rowwise', 'expert-colwise')"),
])
def test_plan_that_matches_nothing_is_refused_with_the_closest_names(pattern, style, message):
    """``plan={"nonexistent.*": "colwise"}`` used to be accepted in silence: it now raises before
    anything compiles, in tp_compile and in explain, naming the closest FQNs."""
    model, (x, y) = gpt.make_model()
    with pytest.raises(ValueError) as err:
        tpcompile.explain(model, x, y, world_size=2, plan={pattern: style})
    assert str(err.value).startswith(message), str(err.value)
    with fake_group(2):
        with pytest.raises(ValueError) as err:
            tpcompile.tp_compile(model, backend="aot_eager", plan={pattern: style})
        assert str(err.value).startswith(message), str(err.value)
        assert not isinstance(next(model.parameters()), torch.distributed.tensor.DTensor)  # nothing was touched


def test_plan_patterns_that_match_are_accepted():
    with fake_group(2):
        model, (x, y) = gpt.make_model()
        model = tpcompile.tp_compile(model, backend="aot_eager", plan={"h.0.mlp.*": "replicate", "lm_head": "replicate"})
        model(x, y)
        plan = tpcompile.tp_state(model).plan
        assert plan["h.0.mlp.fc.weight"].style == "replicate" and plan["h.1.mlp.fc.weight"].style == "colwise"
