"""tpcompile.runtime: collectives and ops that the rewritten graphs call.

Every op here works in eager code too, so a user can build TP by hand with them.
"""

from .mappings import (
    all_to_all_tp,
    broadcast_from_first,
    copy_to_tp,
    copy_to_tp_bucketed,
    gather_from_sp,
    gather_from_tp,
    group_name,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_to_sp,
    reduce_scatter_to_tp,
    scatter_to_sp,
    scatter_to_tp,
)
from .fused_linear_ce import fused_linear_cross_entropy
from .fused_norm import reduce_add_rms_norm
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embedding

__all__ = [
    "all_to_all_tp",
    "broadcast_from_first",
    "copy_to_tp",
    "copy_to_tp_bucketed",
    "fused_linear_cross_entropy",
    "gather_from_sp",
    "gather_from_tp",
    "group_name",
    "group_rank",
    "group_size",
    "reduce_add_rms_norm",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "reduce_scatter_to_tp",
    "scatter_to_sp",
    "scatter_to_tp",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]
