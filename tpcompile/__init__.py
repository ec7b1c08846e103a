"""tpcompile: tensor parallelism for unmodified PyTorch models, through torch.compile.

    model = tpcompile.tp_compile(model)   # under torchrun; same batch on every TP rank
    print(tpcompile.explain(model, *batch, world_size=8))   # one process, no torchrun: what TP=8 does
"""
from tpcompile.errors import (TPCheckpointError, TPDivergenceError, TPEagerFallbackError, TPInputMismatchError,
                              TPParameterError, TPShardingError, TPWarning)
from tpcompile.api import TensorParallel, tp_compile, tp_state
from tpcompile.pipeline import Collective, GraphRecord
from tpcompile.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from tpcompile.explain import Report, explain
from tpcompile.pretrained import from_pretrained
from tpcompile import testing

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
    "TPParameterError",
    "TPDivergenceError",
    "TPWarning",
    "from_pretrained",
    "load_checkpoint",
    "save_checkpoint",
    "full_state_dict",
    "TPCheckpointError",
]
