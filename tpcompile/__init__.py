"""tpcompile: tensor parallelism for unmodified PyTorch models, through torch.compile.

    model = tpcompile.tp_compile(model)   # under torchrun; same batch on every TP rank
    print(tpcompile.explain(model, *batch, world_size=8))   # one process, no torchrun: what TP=8 does
"""
from tpcompile.api import TensorParallel, TPEagerFallbackError, TPInputMismatchError, tp_compile, tp_state
from tpcompile.backend import Collective, GraphRecord, TPWarning
from tpcompile.checkpoint import TPCheckpointError, full_state_dict, load_checkpoint, save_checkpoint
from tpcompile.explain import Report, explain
from tpcompile import testing
from tpcompile.passes.propagate import TPShardingError

__all__ = [
    "tp_compile",
    "tp_state",
    "explain",
    "Report",
    "testing",
    "TensorParallel",
    "GraphRecord",
    "Collective",
    "TPShardingError",
    "TPInputMismatchError",
    "TPEagerFallbackError",
    "TPWarning",
    "load_checkpoint",
    "save_checkpoint",
    "full_state_dict",
    "TPCheckpointError",
]
