"""Plan: choose how each parameter is laid out, by propagation (DESIGN.md §4).

Megatron's pattern falls out of the rules rather than being matched:
- the word embedding is vocab-parallel, and only it (Megatron keeps position and token-type
  embeddings whole): an Embedding is vocab-parallel when it is looked up with the user's inputs
  (token ids; not a buffer such as BERT's ``position_ids``, not ``arange``) and its table is the
  largest of those (the vocabulary; a 2-row token-type table or positions passed as an input are
  not). Its one all-reduce then saves (1 - 1/tp) of the biggest table; a small table costs more
  in that all-reduce than it saves, and replicated its lookup needs no communication at all;
- any other plain Embedding is tried column-parallel (its table split on the embedding dim, each
  rank looking up its own columns) and kept so only if its shard, joined with a column-parallel
  Linear's, reaches a row-parallel Linear with no gather anywhere: T5's relative-position bias
  ``[buckets, heads]``, whose lookup is added to head-sharded attention scores (each rank then
  holds, and trains, its heads' bias). Alone it would turn a whole activation into a shard (a
  position table added to the residual stream): dropped, quietly (replicated costs nothing);
- a Linear fed a whole (replicated) activation is tried column-parallel; one fed an
  activation sharded on its last dim is row-parallel;
- a column-parallel try is kept only if its shard reaches a row-parallel Linear or the
  vocab-parallel loss (Megatron's pairs); otherwise it would only add collectives, so
  it goes back to replicated and the propagation runs again until nothing changes;
- an LM head that shares its weight with a vocab-parallel embedding is column-parallel
  over the vocabulary (one shard serves both).
User overrides (``plan={"lm_head": "replicate"}``, module or parameter FQNs, globs allowed)
win over all of this. Sizes that cannot be split raise ``TPShardingError`` naming the
parameter and the tp values that would work.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from tpcompile.errors import TPShardingError

from .graph_utils import (divisors, is_tensor, norm_dim, op_name, numel_expr, same_size, shape, shape_str, source_line,
                          static_size, value)
from .layout import KVCopies, ParamPlan
from .normalize import CONTRACTIONS, GROUPED, PROJECTIONS, param_operands, weight_out_dim
from .placements import STYLES, Partial, Replicate, Shard, local_size
from .propagate import Propagation, op_class, propagate, rule_for

_INDEX_PASSTHROUGH = ("view", "cast", "transfer")  # op families (propagate.op_class) token ids pass through
_SPLITS = {"split", "chunk", torch.split}  # see _fused_chunks
_BASE_STYLE = {"vocab": "colwise", "expert-colwise": "colwise", "expert-rowwise": "rowwise"}  # as a linear's rule reads it


@dataclass
class GraphPlan:
    params: dict  # placeholder node -> ParamPlan
    prop: Propagation
    tp: int
    unsupported: dict  # op node with no rule -> column linears kept replicated because of it
    notes: list = field(default_factory=list)  # decisions the user should hear about (TPWarning)
    inference: bool = False  # planned for a graph with no backward (captured under no_grad)


def _style_for_fqn(fqn: str, overrides: dict) -> str | None:
    module = fqn.rsplit(".", 1)[0] if "." in fqn else ""
    for pattern, style in overrides.items():
        if fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(module, pattern):
            if style not in STYLES:
                raise ValueError(f"plan[{pattern!r}] = {style!r}: style must be one of {STYLES}")
            return style
    return None


def validate_overrides(overrides: dict, param_fqns: list[str], owner: str) -> None:
    """``plan=`` checked against the model's parameter FQNs (tied ones under each name) before
    anything compiles: a misspelt pattern would otherwise match nothing and be ignored in silence.
    A pattern must match what ``_style_for_fqn`` matches: a parameter or the module that owns one."""
    for pattern, style in overrides.items():
        if style not in STYLES:
            raise ValueError(f"plan[{pattern!r}] = {style!r}: style must be one of {STYLES}"
                             + _closest(str(style), STYLES, "did you mean", 0.6))
        if not any(_style_for_fqn(f, {pattern: style}) for f in param_fqns):
            owners = [f.rsplit(".", 1)[0] for f in param_fqns if "." in f]
            raise ValueError(f"plan[{pattern!r}]: the pattern matches no parameter of {owner}, nor a module that "
                             f"owns one" + _closest(pattern, owners + list(param_fqns), "closest names")
                             + ". Patterns are FQNs as in model.named_parameters(), or their modules' names; "
                             "globs allowed (e.g. 'layers.*.mlp.*').")


def _closest(word: str, names, what: str, cutoff: float = 0.0) -> str:
    close = difflib.get_close_matches(word, list(dict.fromkeys(names)), n=5, cutoff=cutoff)
    return f" ({what}: {', '.join(map(repr, close))})" if close else ""


def with_tied_aliases(overrides: dict, aliases: dict[str, str]) -> dict:
    """``overrides`` plus, for a tied weight named by one of its other names (``lm_head`` for
    GPT's ``wte.weight``), the same style under the name it is planned by."""
    out = dict(overrides)
    for alias, fqn in aliases.items():
        if alias != fqn:
            style = _style_for_fqn(alias, out)
            if style is not None and _style_for_fqn(fqn, out) is None:
                out[fqn] = style
    return out


def _indices_from_data(idx, state) -> bool:
    """True if embedding indices come from the user's inputs (tokens), not from ``arange`` or
    from the module's own parameters and buffers (``state``; BERT's ``position_ids``)."""
    while isinstance(idx, fx.Node):
        if idx.op == "placeholder":
            return idx not in state
        if op_class(idx) in _INDEX_PASSTHROUGH or idx.target is operator.getitem:
            idx = idx.args[0]
            continue
        return False
    return False


def _fused_chunks(lin: fx.Node) -> int | tuple:
    """k if the linear's output is only ever split into k equal pieces on its last dim (fused QKV);
    the tuple of piece sizes if they differ (fused QKV of grouped-query attention).

    Reshapes that keep the last dim in between are looked through (HF Conv1D: ``addmm`` on
    ``x.view(-1, in)``, then ``view(B, T, 3 * C).split(C, dim=2)``). Only the ``view`` / ``reshape``
    and ``split`` / ``chunk`` methods, not every op the rule table calls a view or a split: looking
    through an ``unsqueeze`` too changes HF GPT-BigCode's MQA plan (its fused c_attn), unreviewed.
    """
    out = lin
    while len(out.users) == 1:
        (u,) = out.users
        if u.op == "call_method" and u.target in ("view", "reshape") and value(u).dim() and value(out).dim() \
                and same_size(shape(u)[-1], shape(out)[-1]):
            out = u
            continue
        break
    users = list(out.users)
    if len(users) == 1 and users[0].target in _RESHAPES:
        return _pieces_split(out, users[0])
    if len(users) != 1 or users[0].target not in _SPLITS or users[0].op not in ("call_method", "call_function"):
        return 1
    sp = users[0]
    nd = value(out).dim()
    dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
    if dim % nd != nd - 1:
        return 1
    sizes = tuple(static_size(p.shape[-1]) for p in value(sp))  # the fused dim: static (the weight's)
    if None in sizes:
        return 1
    return len(sizes) if len(set(sizes)) == 1 else sizes


def _weight_param(w, params: set) -> fx.Node | None:
    """The parameter a linear's weight is: itself, or a cast of it (DeepSeek's router,
    ``F.linear(x.float(), self.weight.type(torch.float32))``); a cast keeps the layout."""
    while isinstance(w, fx.Node) and w not in params and op_class(w) == "cast" and w.args \
            and isinstance(w.args[0], fx.Node):
        w = w.args[0]
    return w if w in params else None


def _plain_embedding(e: fx.Node) -> bool:
    """No ``max_norm`` (it renormalises whole rows), ``scale_grad_by_freq`` or ``sparse``."""
    def arg(i, name):
        return e.args[i] if len(e.args) > i else e.kwargs.get(name)

    return isinstance(arg(2, "padding_idx"), (int, type(None))) and arg(3, "max_norm") is None \
        and not arg(5, "scale_grad_by_freq") and not arg(6, "sparse")


def _vocab_tables(embeds: list, state: set, forced: dict) -> set:
    """Weights of the vocab-parallel embeddings: forced ``vocab``, or the largest plain tables
    looked up with the user's inputs (see the module docstring)."""
    data = [e.args[1] for e in embeds if e.args[1] not in forced and _plain_embedding(e)
            and _indices_from_data(e.args[0], state)]
    rows = max((int(shape(w)[0]) for w in data), default=0)
    return {w for w in data if int(shape(w)[0]) == rows} | {e.args[1] for e in embeds if forced.get(e.args[1]) == "vocab"}


def _pieces_split(out: fx.Node, view: fx.Node) -> int:
    """k if ``view`` reshapes the last dim of ``out`` pieces-first, ``(k * C) -> (k, ...)``, and that
    new dim, wherever permutes / transposes move it, is then taken apart into its k entries
    (``unbind``, or ``t[0]``, ``t[1]``, ...): a fused projection of k pieces, as ``split`` shows it
    (ViT's ``qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)``). Else 1."""
    src, dst = shape(out), shape(view)
    pre = numel_expr(src[:-1])
    axis = next((o for o in range(len(dst)) if numel_expr(dst[:o]) == pre and not same_size(dst[o], 1)), None)
    k = static_size(dst[axis]) if axis is not None else None
    if k is None or k == 1 or same_size(dst[axis], src[-1]):
        return 1
    node = view
    while len(node.users) == 1 and next(iter(node.users)).target in _MOVES:
        (node,) = node.users
        axis = _moved_axis(node, axis)
    users = list(node.users)
    if len(users) == 1 and users[0].target in ("unbind", torch.unbind) \
            and norm_dim(users[0].args[1] if len(users[0].args) > 1 else users[0].kwargs.get("dim", 0), len(dst)) == axis:
        return k
    if users and all(u.target is operator.getitem and _int_at(u.args[1], axis) for u in users):
        return k
    return 1


_RESHAPES = {"view", "reshape", torch.reshape}
_MOVES = {"permute", torch.permute, "transpose", torch.transpose, "swapaxes", "contiguous"}


def _moved_axis(node: fx.Node, axis: int) -> int:
    """Where dim ``axis`` of a permute / transpose's input is in its output."""
    nd = value(node).dim()
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return [norm_dim(d, nd) for d in dims].index(axis)
    if node.target == "contiguous":
        return axis
    a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
    return {a: b, b: a}.get(axis, axis)


def _int_at(idx, axis: int) -> bool:
    """``t[i]`` picks entry i of dim ``axis``: an int there and whole slices before it."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    return len(items) > axis and isinstance(items[axis], int) and all(i == slice(None) for i in items[:axis])


def make_plan(gm: fx.GraphModule, tp: int, param_fqns: dict, overrides: dict | None = None,
              known: dict | None = None, buffers: set | None = None, state: dict | None = None,
              inference: bool = False, expert_parallel: bool = False, outputs_sharded: bool = False) -> GraphPlan:
    """Choose every parameter's layout for ``gm`` (params: placeholder node -> FQN).

    ``expert_parallel``: the 3-D weights of every grouped (expert) matmul not named in ``overrides``
    take style ``expert`` (whole experts per rank) instead of expert-TP's ``expert-colwise`` / ``-rowwise``.

    ``known``: FQN -> ParamPlan of parameters an earlier graph already stored; they keep it
    (their style is forced, and the same rows, padding included, are taken over).
    ``buffers``: placeholders of the module's buffers (module state, not the user's inputs).
    ``state``: placeholder -> placement of sharded state inputs (a KV cache kept sharded).
    ``inference``: the graph has no backward; an LM head whose logits are returned or selected from
    (argmax / top-k / softmax over the vocabulary) stays column-parallel (``propagate``).
    ``outputs_sharded``: outputs are returned as shards (``sharded_outputs=True``): an LM head whose
    logits are returned stays column-parallel in training too. Without it (and in training) such a
    head goes back to replicated, which is said with its cost (``_returned_head_note``).
    """
    known = known or {}
    # kv copies are stored replicated and chosen again from the graph (the same graph decides the same)
    overrides = {**{f: pp.style for f, pp in known.items() if f in param_fqns.values() and pp.style != "kvcopy"},
                 **(overrides or {})}
    params = set(param_fqns)
    forced = {n: s for n, f in param_fqns.items() if (s := _style_for_fqn(f, overrides)) is not None}
    _check_expert_style(gm, forced, param_fqns)

    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PROJECTIONS
               and _weight_param(n.args[1], params) is not None]
    embeds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.embedding and n.args[1] in params]
    vocab_weights = _vocab_tables(embeds, params | set(buffers or ()), forced)
    # other tables tried column-parallel (split on the embedding dim); kept if that reaches a row linear
    col_embeds = {e for e in embeds if e.args[1] not in vocab_weights and _plain_embedding(e) and value(e.args[1]).dim() == 2
                  and (forced.get(e.args[1]) == "colwise" or (e.args[1] not in forced and int(shape(e.args[1])[1]) % tp == 0))
                  and all(u.target is F.embedding and u.args[1] is e.args[1] for u in e.args[1].users)}
    chunks = {n: _fused_chunks(n) for n in linears}

    replicated: set = set()
    copies: dict = {}  # k / v projection -> ranks sharing one kv head (fewer kv heads than tp)
    pending: set = set()
    unsupported: dict = {}
    notes: list = []
    returned: set = set()
    whole: dict = {}  # linear -> head counts (or piece sizes) tp does not divide: kept whole, one warning
    for lin, c in chunks.items():  # unequal fused pieces that tp does not divide (kv heads < tp): keep whole
        if isinstance(c, tuple) and any(s % tp for s in c) and lin.args[1] not in forced:
            replicated.add(lin)
            whole[lin] = {s for s in c if s % tp}
    routers = {n for n in linears if n.args[1] not in forced and _is_router(n)}  # replicated by design
    base, latent = set(replicated), set()
    first = True
    while True:

        def style_of(node, px):
            w = node.args[1]
            if node.target is F.embedding:
                return "vocab" if w in vocab_weights else "colwise" if node in col_embeds - replicated else "replicate"
            if w in forced:
                return _BASE_STYLE.get(forced[w], forced[w])
            if expert_parallel and node.target is GROUPED:
                return "expert"
            if w in vocab_weights:
                return "colwise"  # LM head tied to a vocab-parallel embedding
            if node in replicated or node in routers:
                return "replicate"
            if node in copies:
                return "kvcopy"
            nd = value(node.args[0]).dim()
            if isinstance(px, Shard) and px.dim == nd - 1 and px.chunks == 1 and not px.pad:
                return "rowwise"
            if px is None or isinstance(px, Replicate):
                return "colwise"
            return "replicate"

        prop = propagate(gm, tp, params, style_of, lambda n: chunks.get(n, 1), lambda n: copies.get(n, 1),
                         state, set(buffers or ()), frozenset(pending), inference, outputs_sharded)
        returned |= prop.returned
        joined = _joins_pending_sum(prop) - pending
        if joined:  # shared experts: their row-parallel sums join the routed experts' (one reduction)
            pending |= joined
            continue
        tried = {n for n in linears if prop.info[n].kind in ("colwise", "kvcopy")}
        latents = {n for n in tried if n.args[1] not in forced and _normed_latent(n, prop)} - latent
        if latents:  # low-rank latents (MLA) stay whole; the plan starts over, as the other tries were made on the
            latent |= latents  # stream their column shards had split
            replicated = base | latent
            continue
        dropped = {n for n in tried if n not in prop.good_sinks and n.args[1] not in forced and n.args[1] not in vocab_weights}
        if first:  # parameter sizes first: the clearer error; none for column tries about to be dropped
            doomed = _operands(dropped) - _operands(tried - dropped)  # (a classifier head: 1000 % 16 classes)
            _param_plans(gm, prop, tp, {n: f for n, f in param_fqns.items() if n not in doomed}, known)
        heads = {n: h for n, h in _indivisible_heads(prop, tp, forced, chunks).items() if n not in replicated}
        if heads:  # heads tp does not divide: kv-head copies where that is exact (GQA), else the projection whole
            for lin, (sizes, kv) in sorted(heads.items(), key=lambda item: item[0].name):
                (h, *more) = sorted(sizes)
                if kv and not more and lin not in copies and _copyable(h, chunks.get(lin, 1), tp):
                    copies[lin] = tp // h
                    continue
                copies.pop(lin, None)
                replicated.add(lin)
                whole[lin] = sizes
            continue
        if first:
            _check_views(prop, tp, param_fqns)
            first = False
        for lin in dropped - replicated:
            if _is_router(lin):  # E logits per token, picked by top-k: replicated by design, not a miss
                continue
            for op in prop.blocked.get(lin, ()):
                unsupported.setdefault(op, []).append(param_fqns[_weight_param(lin.args[1], params)].rsplit(".", 1)[0])
        # a column-parallel table is an opportunity, not Megatron's pattern: dropped quietly, also
        # where its shard is gathered anywhere (replicated, its lookup needs no communication)
        dropped |= {e for e in col_embeds if prop.info[e].kind == "column_embedding" and e.args[1] not in forced
                    and (e not in prop.good_sinks or e in prop.gathered)}
        if dropped <= replicated:
            break
        replicated |= dropped
    notes += _unsharded_contractions(gm, prop, param_fqns, forced)
    vocab_rows = {int(shape(w)[0]) for w in vocab_weights}
    heads_left = sorted((h for h in returned if h in replicated and h.args[1] not in forced
                         and static_size(shape(h.args[1])[weight_out_dim(h)]) in vocab_rows), key=lambda n: n.name)
    if heads_left:
        notes.append(_returned_head_note(heads_left, param_fqns, tp))
    if whole:
        notes.append(_whole_heads_note(whole, replicated, param_fqns, tp))
        # the linears reading them are whole as a consequence (said in that note), not for an op with no rule
        quiet = {param_fqns[_weight_param(n.args[1], params)].rsplit(".", 1)[0]
                 for n in _followers(whole, replicated, params)}
        unsupported = {op: mods for op, ms in unsupported.items() if (mods := [m for m in ms if m not in quiet])}
    return GraphPlan(_param_plans(gm, prop, tp, param_fqns, known), prop, tp, unsupported, notes, inference)


def _check_expert_style(gm: fx.GraphModule, forced: dict, param_fqns: dict) -> None:
    """``plan`` style ``expert`` is for the 3-D weight of a grouped (MoE expert) matmul only: anywhere
    else it would mean nothing, so it is refused, not ignored."""
    for w, style in forced.items():
        if style != "expert":
            continue
        users = [u for u in w.users if u.op == "call_function"]
        if not users or any(u.target is not GROUPED or u.args[1] is not w for u in users):
            where = ", ".join(f"`{getattr(u.target, '__name__', u.target)}` at {source_line(u)}" for u in users[:2])
            raise TPShardingError(
                f"plan: {param_fqns[w]} {tuple(shape(w))} is given style 'expert', which holds whole experts of a "
                f"3-D expert weight per rank, but it is used by {where or 'nothing'}, not a grouped expert matmul. "
                f"Name only the experts' weights (e.g. 'model.layers.*.mlp.experts'), or use colwise / rowwise / "
                f"replicate for it.")


_TOPK = {torch.topk, "topk"}
_SCALES = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div", operator.neg, torch.neg, "neg"}
_ADDS = {operator.add, torch.add, "add"}


def _row_source(node, prop: Propagation, depth: int = 6) -> fx.Node | None:
    """The bias-free row-parallel linear whose whole output ``node`` is, through views, casts and
    scalings by whole values (``sigmoid(gate(x)) * shared_expert(x)``), or None."""
    ni = prop.info.get(node)
    if ni is None or depth == 0:
        return None
    if ni.kind == "rowwise" and node.target in PROJECTIONS and (len(node.args) < 3 or node.args[2] is None) \
            and not node.kwargs.get("bias"):
        return node
    if node.target in _SCALES or op_class(node) in ("view", "cast"):
        ins = [node.args[0]] if node.target in (operator.truediv, torch.div, "div") else node.all_input_nodes
        for x in ins:
            if is_tensor(x) and (r := _row_source(x, prop, depth - 1)) is not None:
                return r
    return None


def _joins_pending_sum(prop: Propagation) -> set:
    """Row linears (shared experts) whose output is added to a pending sum (a MoE combine): kept
    pending too, so ``routed + shared`` is reduced by one all-reduce instead of two."""
    out = set()
    for node, ni in prop.info.items():
        if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2:
            a, b = node.args
            pa, pb = prop.placement(a), prop.placement(b)
            for part, other in ((pa, b), (pb, a)):
                if isinstance(part, Partial) and isinstance(other, fx.Node) and prop.placement(other) == Replicate():
                    r = _row_source(other, prop)
                    if r is not None:
                        out.add(r)
    return out


def _normed_latent(lin: fx.Node, prop: Propagation) -> bool:
    """The linear is a low-rank down-projection whose output is normalised over its features and fed
    straight into another linear (DeepSeek's MLA: ``q_b_proj(q_a_layernorm(q_a_proj(x)))``, and
    ``kv_a_proj_with_mqa``'s latent before ``kv_b_proj``). Paired column -> row it would cost a partial
    mean for the norm and an all-reduce of the up-projection's (wider) output, with attention then
    replicated; kept whole instead (Megatron-core keeps MLA's down-projections duplicated), its latent
    is replicated and the up-projection becomes column-parallel on the heads."""
    w = shape(lin.args[1])
    if lin.target is GROUPED or not int(w[weight_out_dim(lin)]) < int(w[1 - weight_out_dim(lin)]):
        return False
    normed, fed, frontier, seen = False, False, [lin], set()
    while frontier:
        node = frontier.pop()
        for u in node.users:
            if u in seen or lin not in prop.origins.get(u, ()):
                continue
            seen.add(u)
            if u.target in PROJECTIONS and u.args[0] is node:  # an up-projection: wider than the latent
                wu = shape(u.args[1])
                fed |= prop.info[u].kind == "rowwise" and int(wu[weight_out_dim(u)]) > int(w[weight_out_dim(lin)])
                continue
            kind = op_class(u)
            if kind == "reduction" and isinstance(prop.placement(u), Partial):
                normed = True
            elif kind == "view" and not (value(u).dim() and same_size(shape(u)[-1], shape(node)[-1])):
                continue  # a view that splits the features (into heads): not a latent fed to a linear
            elif kind not in ("pointwise", "cast", "split", "index", "view", "norm"):
                continue
            elif kind == "pointwise" and any(x is not node and is_tensor(x) and same_size(numel_expr(shape(x)), numel_expr(shape(u)))
                                            for x in u.all_input_nodes):
                continue  # joined with another full-size value (a residual add): past the latent
            frontier.append(u)
    return normed and fed


def _is_router(lin: fx.Node, depth: int = 6) -> bool:
    """The linear is a MoE router: its logits reach ``topk`` through casts, softmax / sigmoid and
    views. Its output is E scores per token that top-k needs whole on every rank (so that every rank
    routes alike), a gather away from any shard: kept replicated quietly, as Megatron keeps it.
    A linear wider than its input is not one: an LM head whose logits are top-k sampled (gpt-fast's
    decode step) is vocab-parallel, its selection the rule table's (``propagate.select``)."""
    out, width = static_size(shape(lin)[-1]), static_size(shape(lin.args[0])[-1])
    if out is not None and width is not None and out > width:
        return False
    frontier = {lin}
    for _ in range(depth):
        nxt = set()
        for n in frontier:
            for u in n.users:
                if u.target in _TOPK:
                    return True
                if op_class(u) in ("cast", "softmax", "pointwise", "view"):
                    nxt.add(u)
        frontier = nxt
    return False


def _operands(linears: set) -> set:
    """Weight and bias nodes of these linears."""
    return {a for n in linears for a in (n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("bias"))
            if isinstance(a, fx.Node)}


def _unsharded_contractions(gm: fx.GraphModule, prop: Propagation, param_fqns: dict, forced: dict) -> list[str]:
    """One message per parameter that feeds a contraction with no rule (``einsum`` with a 3-D
    weight, ``bmm`` of a permuted weight, ...) or a weight matrix into an op with no rule at all
    (a grouped MoE matmul, a custom op): it is computed replicated, correct but not sharded, and
    the user should know how to get it sharded or to silence this."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        contraction = node.target in CONTRACTIONS
        if not contraction and (rule_for(node) is not None or node.target is operator.getitem):
            continue
        for w in param_operands(node, set(param_fqns)):
            if w in forced or isinstance(prop.placement(w), Shard) or (not contraction and value(w).dim() < 2):
                continue
            fqn = param_fqns[w]
            name = op_name(node)
            fix = ("To shard it, write it as a linear over a 2-D weight (`F.linear(x, W)`, `x @ W`, "
                   "`torch.einsum('...i,io->...o', x, W)`); " if contraction else "")
            out.append(
                f"tpcompile: no tensor-parallel rule for `{name}` with parameter {fqn} {tuple(shape(w))} at "
                f"{source_line(node)}: it is computed replicated (correct, not sharded). {fix}"
                f"plan={{{fqn!r}: 'replicate'}} silences this warning."
            )
    return out


def _copyable(heads: int, chunks, tp: int) -> bool:
    """kv-head copies need tp to be a multiple of the kv heads (each rank then uses exactly one) and,
    for fused ``[q | k | v]`` pieces, the query piece to split over tp."""
    if heads < 1 or tp % heads:
        return False
    return not isinstance(chunks, tuple) or (max(chunks) % tp == 0 and len(set(chunks)) > 1)


def _unsplittable(prop: Propagation, tp: int) -> dict:
    """Column linear -> {view: (size, one head)} for the splits of its output into a dim of ``size``
    that tp does not divide (heads; the view then gathers), and for views that may be one head
    (``C -> (1, head_dim)``, MQA: ``one head``, which only a kv projection's plan acts on)."""
    out: dict = {}
    for node, ni in prop.info.items():
        bad = ni.extra.get("unsplittable")
        one = bool(ni.extra.get("one_head"))
        size = 1 if one else static_size(bad[1]) if bad and bad[1] is not None else None
        if size is not None and size % tp and (one or bad):
            for o in prop.origins.get(node.args[0], ()):
                out.setdefault(o, {})[node] = (size, one)
    return out


def _split_heads(prop: Propagation) -> set:
    """Column linears whose output some view splits into heads that stay sharded (plain shard)."""
    out = set()
    for node, ni in prop.info.items():
        if ni.kind == "view" and isinstance(ni.out, Shard) and ni.out.plain and not ni.extra.get("one_head") \
                and value(node).dim() > value(node.args[0]).dim():
            out |= prop.origins.get(node.args[0], frozenset())
    return out


def _indivisible_heads(prop: Propagation, tp: int, forced: dict, chunks: dict) -> dict:
    """Column linear -> (sizes, kv) for every projection (not named in ``plan=``) whose output is split
    into heads (or any dim) that tp does not divide, whatever the spelling: separate or fused q/k/v,
    per-group, ``reshape(B, T, 3, H, hd)``. All of them are planned alike (``make_plan``): whole.

    ``kv``: the projection is the key / value side of grouped-query attention, recognised by a
    sibling: another column linear on the same input (the query projection) whose heads do split,
    or one fused projection of unequal pieces. Only those may take kv-head copies (each rank the kv
    heads its query heads use); a projection holding query heads never does (2 query heads at
    tp=4 would leave a rank none). A lone one-head view (``one head``) is no split: not listed."""
    split = _split_heads(prop)
    out = {}
    for lin, views in _unsplittable(prop, tp).items():
        if lin.args[1] in forced:
            continue
        siblings = [u for u in lin.args[0].users if u is not lin and u.op == "call_function" and u.target is lin.target
                    and prop.info.get(u) is not None and prop.info[u].kind == "colwise" and u in split]
        kv = bool(siblings) or isinstance(chunks.get(lin), tuple)
        sizes = {size for size, one in views.values() if kv or not one}
        if sizes:
            out[lin] = (sizes, kv)
    return out


def _followers(whole: dict, replicated: set, params: set) -> list:
    """Replicated linears that read what the projections kept whole compute, through no other linear
    (the attention's output projection): whole with them, as a consequence, not for a rule they lack."""
    out = []
    for lin in whole:
        frontier, seen = [lin], {lin}
        while frontier:
            for u in frontier.pop().users:
                if u in seen:
                    continue
                seen.add(u)
                if u.target in PROJECTIONS and _weight_param(u.args[1], params) is not None:
                    if u in replicated and u not in whole and u not in out:
                        out.append(u)
                    continue
                frontier.append(u)
    return out


def _whole_heads_note(whole: dict, replicated: set, param_fqns: dict, tp: int) -> str:
    """The one warning for projections kept whole because tp does not divide their heads: which,
    why, what it costs per rank (memory, compute) and the tp values that would shard them."""
    params = set(param_fqns)
    followers = _followers(whole, replicated, params)
    names = lambda ns: [param_fqns[_weight_param(n.args[1], params)].rsplit(".", 1)[0] for n in ns]
    operands = _operands(set(whole) | set(followers)) & params
    numel = sum(int(numel_expr(shape(w))) for w in operands)
    nbytes = sum(int(numel_expr(shape(w))) * value(w).element_size() for w in operands)
    sizes = sorted({s for ss in whole.values() for s in ss})
    g = 0
    for s in sizes:
        g = math.gcd(g, s)
    listed = ", ".join(f"{n} ({'/'.join(map(str, sorted(whole[l])))})" for n, l in zip(names(whole), whole))
    after = f", and {', '.join(names(followers))}, which read{'s' if len(followers) == 1 else ''} their output," \
        if followers else ""
    fix = ", ".join(f"{n!r}: 'replicate'" for n in names(whole))
    return (f"tpcompile: heads (or fused pieces) that tp={tp} does not divide: {listed}{after} stay whole on every "
            f"rank (replicated: correct, not sharded). Cost per rank: {numel:,} parameters ({_mib(nbytes)}) held "
            f"whole instead of 1/{tp} ({_mib(nbytes - nbytes // tp)} more, plus their gradients and optimizer "
            f"state), and {tp}x their share of the compute (these projections and the attention between them run "
            f"in full on every rank). The rest of the model stays sharded. tp in {_set(divisors(g))} would shard "
            f"them; plan={{{fix}}} says this is intended and silences this warning.")


def _returned_head_note(heads: list, param_fqns: dict, tp: int) -> str:
    """The one warning for an LM head kept whole because its logits leave the graph (the loss is
    computed outside): which, what it costs per rank, and the two ways to shard it."""
    params = set(param_fqns)
    parts = []
    for h in heads:
        w = _weight_param(h.args[1], params)
        od = weight_out_dim(h)
        vocab, width = int(shape(h.args[1])[od]), int(shape(h.args[1])[1 - od])
        nbytes = vocab * width * value(w).element_size()
        parts.append(f"{param_fqns[w].rsplit('.', 1)[0]} ([{vocab}, {width}]: {_mib(nbytes)} held whole instead of "
                     f"1/{tp}, {_mib(nbytes - nbytes // tp)} more per rank plus its gradient and optimizer state; "
                     f"{2 * vocab * width:,} FLOPs per token forward and {4 * vocab * width:,} backward on every "
                     f"rank instead of 1/{tp})")
    return (f"tpcompile: the LM head stays replicated because its output (the logits) leaves the compiled model "
            f"and the loss is computed outside it, where a vocabulary shard would have to be gathered first: "
            f"{'; '.join(parts)}. To shard it: compute the loss inside the model (Hugging Face: pass labels=), or "
            f"tp_compile(..., sharded_outputs=True) and compute the loss on the vocab-sharded DTensor logits under "
            f"torch.distributed.tensor.parallel.loss_parallel() (F.cross_entropy).")


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 16 else f"{n / 2 ** 10:.1f} KiB"


def _check_views(prop: Propagation, tp: int, param_fqns: dict) -> None:
    """A split tp does not divide that is left after planning comes from a projection ``plan=`` names
    column-parallel (the others are kept whole, ``_indivisible_heads``): an error, not a silent gather."""
    for node, ni in prop.info.items():
        bad = ni.extra.get("unsplittable")
        size = static_size(bad[1]) if bad and bad[1] is not None else None
        if size is None or size % tp == 0:
            continue
        origin = sorted(param_fqns[_weight_param(o.args[1], set(param_fqns))].rsplit(".", 1)[0]
                    for o in prop.origins.get(node.args[0], ()))
        fix = ", ".join(f"{o!r}: 'replicate'" for o in origin)
        what = f"pieces of {size} heads" if isinstance(value(node), (tuple, list)) else f"{size} heads" \
            if value(node).dim() > value(node.args[0]).dim() else f"a dim of size {size}"
        raise TPShardingError(
            f"{source_line(node)}: the output of {', '.join(origin) or node.args[0].name} (column-parallel as "
            f"plan= asks) is split into {what} (shape {shape_str(shape(node))}), and {size} is not divisible by "
            f"tp={tp}. Use tp in {_set(divisors(size))}, or let tpcompile keep these projections whole (leave "
            f"them out of plan=, or plan={{{fix}}})."
        )


def _set(xs) -> str:
    return "{" + ", ".join(str(x) for x in sorted(xs)) + "}"


def _kv_copies(node: fx.Node, prop: Propagation, tp: int) -> KVCopies | None:
    """The program rows of a weight / bias that a ``kvcopy`` projection takes kv-head copies of."""
    for u in node.users:
        need = prop.info[u].need.get(node) if u in prop.info and prop.info[u].kind == "kvcopy" else None
        if isinstance(need, Shard) and need.copies:
            full = int(shape(node)[need.dim])
            sizes = need.sizes or (full // need.chunks,) * need.chunks
            return KVCopies(need.dim, tuple(sizes), need.copies, tp)
    return None


def _param_plans(gm, prop: Propagation, tp: int, param_fqns: dict, known: dict) -> dict:
    out = {}
    for node, fqn in param_fqns.items():
        p = prop.info[node].out if node in prop.info else None
        full = tuple(int(s) for s in shape(node)) if is_tensor(node) else ()
        if not isinstance(p, Shard):
            kv = _kv_copies(node, prop, tp) if is_tensor(node) else None
            out[node] = ParamPlan(fqn, "kvcopy" if kv else "replicate", None, 1, full, full, kv=kv)
            continue
        k = known.get(fqn)
        if k is not None and k.sharded and k.dim == p.dim and tuple(k.full_shape) == full:
            out[node] = k  # stored by an earlier graph (e.g. a padded vocabulary whose loss is elsewhere)
            continue
        users = [u for u in node.users if u.op == "call_function"]
        lins = [u for u in users if u.target in PROJECTIONS and u.args[1] is node]
        if any(u.target is F.embedding for u in users):
            style = "vocab" if p.dim == 0 else "colwise"
        elif lins and lins[0].target is GROUPED and p.dim == 0:
            style = "expert"  # expert parallelism: whole experts per rank
        elif lins:
            style = "colwise" if p.dim == weight_out_dim(lins[0]) else "rowwise"
            if lins[0].target is GROUPED:  # a 3-D expert weight: every expert split the same way
                style = "expert-" + style
        else:
            style = "colwise"  # a bias / scale that follows a column-parallel output
        size = full[p.dim]
        # padding is for a vocabulary: the embedding, or an LM head whose shard reaches the loss
        vocab_like = style == "vocab" or any(u in prop.vocab_sinks for u in lins) or any(
            u.args[2] is node and u in prop.vocab_sinks for u in users if u.target in PROJECTIONS and len(u.args) > 2)
        if p.pad and vocab_like:
            local = list(full)
            local[p.dim] = local_size(size, tp)
            padded = list(full)
            padded[p.dim] = local[p.dim] * tp
            out[node] = ParamPlan(fqn, style, p.dim, 1, full, tuple(local), tuple(padded))
            continue
        if p.sizes and all(s % tp == 0 for s in p.sizes):
            local = list(full)
            local[p.dim] = size // tp
            out[node] = ParamPlan(fqn, style, p.dim, p.chunks, full, tuple(local), None, p.sizes)
            continue
        if style == "expert" and size % tp:
            raise TPShardingError(
                f"{fqn} at {source_line(lins[0])}: {size} experts are not divisible by tp={tp} (expert parallelism holds "
                f"whole experts, the same number on every rank). Use tp in {_set(divisors(size))}, or drop "
                f"expert_parallel=True / plan 'expert' for {fqn.rsplit('.', 1)[0]!r}: experts tensor-parallel "
                f"(the default) split every expert instead and need no such count.")
        if size % (tp * p.chunks) or p.sizes:
            what = {"vocab": "vocabulary rows", "rowwise": "input features"}.get(style, "output features")
            module = fqn.rsplit(".", 1)[0]
            valid = _set(divisors(size // p.chunks if size % p.chunks == 0 else size))
            raise TPShardingError(
                f"{fqn}: {size} {what}{f' in {p.chunks} fused pieces' if p.chunks > 1 else ''} are not divisible "
                f"by tp={tp} ({style}). Use tp in {valid}, or plan={{{module!r}: 'replicate'}}."
            )
        local = list(full)
        local[p.dim] = size // tp
        out[node] = ParamPlan(fqn, style, p.dim, p.chunks, full, tuple(local))
    return out
