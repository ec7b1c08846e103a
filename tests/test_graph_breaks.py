"""Graph breaks: a data-dependent branch splits the model into two graphs, planned apart. The
result stays single device's (2 gloo ranks), and one TPWarning lists each break. A harmless
break (a logger call inside the model) is avoided: tests/test_hf_models.py asserts one graph
for Hugging Face models, whose loss selection calls ``logger.warning_once``."""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from multirank import run_ranks

log = logging.getLogger("tpcompile.tests.model")


class BreakMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1, self.down1 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.up2, self.down2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, branch: bool = True):
        h = F.gelu(self.up1(x))
        if branch and h.sum() > 0:  # data-dependent: Dynamo breaks the graph here
            h = h * 2
        x = x + self.down1(h)
        log.warning("inside the model")  # harmless: no break
        return (x + self.down2(F.gelu(self.up2(x)))).pow(2).mean()


def _run(rank, world, branch):
    import copy
    import warnings

    import tpcompile
    from parity import grad_errors

    torch.manual_seed(0)
    model = BreakMLP()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpcompile.tp_compile(model, backend="aot_eager")
        loss = model(x, branch)
        loss.backward()
    ref_loss = ref(x, branch)
    ref_loss.backward()
    st = tpcompile.tp_state(model)
    refp = dict(ref.named_parameters())
    err = max(grad_errors(model, ref, rank).values())
    msgs = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning) and "graph breaks" in str(w.message)]
    return loss.item(), ref_loss.item(), err, len(st.records), msgs, {f: pp.style for f, pp in st.plan.items()}


def test_graph_break_stays_correct_and_is_reported():
    for loss, ref, err, n_graphs, msgs, plan in run_ranks(_run, 2, True):
        assert abs(loss - ref) <= 1e-5 * abs(ref) and err <= 1e-5
        assert n_graphs == 2
        assert len(msgs) == 1 and "captured as 2 graphs" in msgs[0], msgs
        assert "graph 1 ends at" in msgs[0] and "h.sum() > 0" in msgs[0]
        assert plan["up1.weight"] == "replicate"  # its shard would cross the break


def test_logging_inside_the_model_does_not_break_the_graph():
    for loss, ref, err, n_graphs, msgs, plan in run_ranks(_run, 2, False):
        assert abs(loss - ref) <= 1e-5 * abs(ref) and err <= 1e-5
        assert n_graphs == 1 and msgs == []
        assert plan["up1.weight"] == "colwise" and plan["down1.weight"] == "rowwise"
