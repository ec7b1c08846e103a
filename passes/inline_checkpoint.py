"""Inline activation-checkpointed blocks so that the TP passes see (and shard) their insides.

Dynamo captures ``torch.utils.checkpoint(fn, ..., use_reentrant=False)`` as one
``tag_activation_checkpoint(body, *operands)`` node whose ``body`` is a sub-GraphModule.
The placement rules are whole-graph (a column-parallel projection inside the block pairs
with a row-parallel one inside or after it), so a block left as a node would have to stay
replicated. When AOTAutograd traces that node it does nothing more than run the body with
every op tagged ``recompute=PREFER_RECOMPUTE`` and one ``ac_graph_id`` per block; the
partitioner then re-runs the tagged ops in the backward. Here we inline the body and put
the same two tags on its nodes ourselves. AOTAutograd copies node tags onto the ATen ops
it traces, so the partitioner recomputes exactly what the checkpoint would have, and every
later pass is unchanged: its new nodes take the tags of the node they serve
(``rewrite._inherit_meta``).

Selective checkpointing (a user ``context_fn`` whose policy decides per ATen op what to
save) cannot be honoured here: the policy is asked by the real op while AOTAutograd
traces, about ATen ops that do not exist yet. Such a block is inlined too and recomputed
whole (correct, more compute than the policy asks); the caller warns about it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .graph_utils import inline_call, source_line

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CHECKPOINT


def _body(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The block's subgraph, if it can be inlined (plain checkpoint, outputs read by index)."""
    ref = node.args[0]
    body = getattr(gm, ref.target, None) if isinstance(ref, fx.Node) and ref.op == "get_attr" else None
    if not isinstance(body, fx.GraphModule):
        return None
    if any(u.target is not operator.getitem or not isinstance(u.args[1], int) for u in node.users):
        return None
    return body


def inline_checkpoints(gm: fx.GraphModule) -> list[tuple[str, bool]]:
    """Inline every checkpointed block of ``gm`` (in place, nested ones too).

    Returns ``(user source line, selective)`` per block; ``selective``: it had a ``context_fn``
    policy, which becomes full recomputation.
    """
    g, blocks = gm.graph, []
    while True:  # a nested block is inlined as a checkpoint node of its own: look again until none is left
        node, body = next(((n, b) for n in g.nodes if is_checkpoint(n) and (b := _body(gm, n)) is not None),
                          (None, None))
        if node is None:
            break
        blocks.append((source_line(node), "_checkpoint_context_fn" in body.meta))
        done = len(blocks)

        def recompute(new: fx.Node, block: int = done) -> None:
            if "recompute" not in new.meta:  # a nested block's nodes keep their own block id
                new.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                new.meta["ac_graph_id"] = block

        inline_call(gm, node, body, node.args[1:], recompute)
    if blocks:
        g.lint()
        gm.recompile()
    return blocks
