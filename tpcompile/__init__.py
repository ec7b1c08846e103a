"""tpcompile: tensor parallelism for unmodified PyTorch models, through torch.compile.

    model = tpcompile.tp_compile(model)   # under torchrun; same batch on every TP rank
"""
from tpcompile.api import TensorParallel, TPEagerFallbackError, TPInputMismatchError, tp_compile, tp_state
from tpcompile.backend import Collective, GraphRecord, TPWarning
from tpcompile.checkpoint import TPCheckpointError, full_state_dict, load_checkpoint, save_checkpoint
from tpcompile.passes.propagate import TPShardingError

__all__ = [
    "tp_compile",
    "tp_state",
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
