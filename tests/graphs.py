"""A compile backend for tests that records the collectives of the post-AOTAutograd graphs."""
import functools

import torch


def collective_names(gm: torch.fx.GraphModule) -> list[str]:
    """Every ``_c10d_functional`` op of ``gm`` in order, ``wait_tensor`` included."""
    return [
        str(n.target).split(".")[1]
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("_c10d_functional.")
    ]


def recording_aot_eager(graphs: dict):
    """aot_eager whose forward/backward compilers append each graph's collectives to
    ``graphs["fw"|"bw"]`` and its ``tpcompile::`` custom ops to ``graphs["fw"|"bw"_tpcompile_ops]``."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def rec(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(collective_names(gm))
            graphs.setdefault(kind + "_tpcompile_ops", []).append(
                [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("tpcompile.")]
            )
            return boxed_nop(gm, example_inputs)

        return compiler

    return functools.partial(aot_eager, fw_compiler=rec("fw"), bw_compiler=rec("bw"))
