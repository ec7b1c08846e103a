"""Normalize: fold the many spellings of one computation into one canonical op.

The placement rules then need one entry per op family. Linear: ``F.linear``,
``torch._C._nn.linear``, ``x @ W.t()`` and ``torch.matmul(x, W.t())`` with a 2-D
parameter ``W`` all become ``torch._C._nn.linear(x, W, b)``; ``torch.matmul(x, W)``, ``x @ W``
and ``torch.addmm(b, x, W)`` (a weight stored ``[in, out]``, HF ``Conv1D``) become
``linear_in_out(x, W, b)``; a following ``+ b`` with a 1-D parameter is folded in as the bias.
The same holds for ``W`` only repeated over leading batch dims (``torch.bmm(x, W.expand(B, i, o))``,
``torch.baddbmm(b, x, W[None].expand(...))``) and for an ``einsum`` that is a linear in disguise
(x's last dim contracted with one dim of W, the output x's other dims then W's other dim).
Which layout follows from which dim of W is contracted. SDPA spellings become the ``torch._C._nn`` one.
``einops.rearrange`` (a leaf op under Dynamo: einops registers it in the graph) becomes the
``reshape`` -> ``permute`` -> ``reshape`` it stands for, so the view rules carry a head shard through it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import same_shape, same_size, value

_TAGS = ("recompute", "ac_graph_id")  # activation-checkpoint tags a node carries (inline_checkpoint)

LINEAR = torch._C._nn.linear


def linear_in_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight + bias`` with ``weight`` stored ``[in, out]`` (HF ``Conv1D``, ``torch.matmul(x, W)``).

    One canonical op for that layout, so the placement rules see out-features on weight dim 1.
    """
    return torch.nn.functional.linear(x, weight.t(), bias)


LINEAR_IO = linear_in_out
LINEARS = (LINEAR, LINEAR_IO)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, route: torch.Tensor, form: str, out_dim: int = 1) -> torch.Tensor:
    """Per-expert linears over a 3-D expert weight (MoE): row s of ``x`` goes through the matrix of its
    expert. One canonical op for every spelling, so that the placement rules see the expert weight as
    a linear's weight (out-features on ``out_dim``: 1 for ``[E, out, in]``, 2 for ``[E, in, out]``).

    ``form`` says how the rows find their expert, and computes exactly what the model's own call did:
    ``"fallback"`` / ``"grouped_mm"`` / ``"nn_grouped_mm"``: rows sorted by expert, ``route`` the cumulative
    counts per expert (HF's ``transformers::grouped_mm_fallback``, ``torch._grouped_mm``,
    ``F.grouped_mm``); ``"ids"``: ``route`` the expert of each row, ``bmm`` of the gathered matrices.
    """
    if form == "ids":
        if out_dim == 1:
            return torch.bmm(weight[route], x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(x.unsqueeze(1), weight[route]).squeeze(1)
    w = weight.transpose(-2, -1) if out_dim == 1 else weight  # [E, in, out]
    if form == "fallback":
        return torch.ops.transformers.grouped_mm_fallback(x, w, route)
    if form == "nn_grouped_mm":
        return F.grouped_mm(x, w, offs=route)
    return torch._grouped_mm(x, w, offs=route)


GROUPED = grouped_linear
PROJECTIONS = (LINEAR, LINEAR_IO, GROUPED)  # every op whose weight the plan lays out column / row-wise


def weight_out_dim(node: fx.Node) -> int:
    """Which dim of a canonical linear's weight holds the out-features (0 for ``[out, in]``)."""
    if node.target is GROUPED:
        return node.args[4]
    return 1 if node.target is LINEAR_IO else 0


def weight_in_dim(node: fx.Node) -> int:
    """Which dim of a canonical linear's weight holds the in-features (the contracted one)."""
    if node.target is GROUPED:
        return 3 - node.args[4]
    return 1 - weight_out_dim(node)


SDPA = torch._C._nn.scaled_dot_product_attention

_LINEAR_SPELLINGS = {F.linear, torch.nn.functional.linear, LINEAR}
_MATMULS = {operator.matmul, torch.matmul, "matmul", torch.mm, "mm", torch.bmm, "bmm"}
_TRANSPOSES = {"t", torch.t}
_EINSUMS = {torch.einsum, "einsum"}  # torch.einsum is torch.functional.einsum
# ops that only add leading size-1 dims or repeat over them: every batch entry is the source
_BROADCASTS = {"expand", "unsqueeze", torch.unsqueeze, operator.getitem, "view", "reshape", torch.reshape}
# contractions: one left in the graph with a parameter operand is computed replicated (plan warns)
CONTRACTIONS = _MATMULS | _EINSUMS | {
    torch.baddbmm, "baddbmm", torch.addmm, "addmm", torch.addbmm, "addbmm", torch.mv, "mv", torch.addmv, "addmv",
    torch.tensordot, torch.inner, "inner", F.bilinear, torch.bilinear, torch.linalg.multi_dot, torch.chain_matmul,
}
_VIEWS = _BROADCASTS | _TRANSPOSES | {"transpose", torch.transpose, "permute", torch.permute, "contiguous", "to",
                                      "float", "half", "bfloat16", "flatten", "unflatten", "squeeze", getattr}


def _target(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _transposed_param(node, params: set) -> fx.Node | None:
    """``W`` if ``node`` is ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)`` of a 2-D parameter."""
    if not isinstance(node, fx.Node):
        return None
    t = _target(node)
    if t in _TRANSPOSES or (t in ("transpose", torch.transpose) and set(node.args[1:3]) in ({0, 1}, {-2, -1}, {0, -1}, {-2, 1})):
        src = node.args[0]
    elif node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        src = node.args[0]
    else:
        return None
    return src if _param_2d(src, params) else None


def _param_2d(node, params: set) -> bool:
    return node in params and _ndim(node) == 2


def _ndim(node) -> int:
    v = value(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _shape(node) -> tuple:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _is_bias(node, params: set) -> bool:
    return node in params and _ndim(node) == 1


def _unbroadcast(node, keep: int):
    """The value ``node`` only repeats over leading dims, keeping its last ``keep`` dims
    (``W[None].expand(B, i, o)`` -> ``W``; ``b.expand(B, T, o)`` -> ``b``); else ``node``."""
    while isinstance(node, fx.Node) and _target(node) in _BROADCASTS and isinstance(node.args[0], fx.Node):
        src, out = node.args[0], _shape(node)
        if _ndim(src) < keep or not same_shape(out[-keep:], _shape(src)[-keep:]):
            break
        if _target(node) is operator.getitem:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(i is not None and i is not Ellipsis and i != slice(None) for i in idx):
                break
        if _target(node) != "expand" and any(not same_size(s, 1) for s in out[:-keep]):
            break  # unsqueeze / view / [None]: only size-1 leading dims, same elements in order
        node = src
    return node


def _weight(node, params: set) -> tuple | None:
    """(canonical linear, W) if ``node`` is a 2-D parameter ``W`` (``[in, out]``), its transpose
    (``[out, in]``), or either one repeated over leading batch dims."""
    node = _unbroadcast(node, 2)
    if _param_2d(node, params):
        return LINEAR_IO, node
    w = _transposed_param(node, params)
    return (LINEAR, w) if w is not None else None


def _bias(node, params: set) -> fx.Node | None:
    """The 1-D parameter ``b`` if ``node`` is ``b`` or ``b`` repeated over leading dims."""
    node = _unbroadcast(node, 1)
    return node if _is_bias(node, params) else None


def _einsum_operands(node: fx.Node) -> tuple[str, list] | None:
    if not node.args or not isinstance(node.args[0], str) or node.kwargs:
        return None
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])  # einsum(eq, [x, W])
    return node.args[0].replace(" ", ""), ops


def _einsum_linear(node: fx.Node, params: set) -> tuple | None:
    """(canonical linear, x, W) if ``einsum(eq, x, W)`` (either order) is a linear: x's last dim
    contracted with one dim of a 2-D parameter W, the output x's other dims in order, then W's
    other dim (``"...i,oi->...o"`` -> ``LINEAR``, ``"bti,io->bto"`` -> ``LINEAR_IO``)."""
    parsed = _einsum_operands(node)
    if parsed is None:
        return None
    eq, ops = parsed
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    ws = [i for i, op in enumerate(ops) if _param_2d(op, params)]
    if len(terms) != 2 or len(ops) != 2 or len(ws) != 1 or not isinstance(ops[1 - ws[0]], fx.Node):
        return None
    xs, wsub = terms[1 - ws[0]], terms[ws[0]]
    if not arrow:  # implicit output: labels used once, sorted, the ellipsis first
        labels = lhs.replace("...", "").replace(",", "")
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
    x_labels, c = xs.replace("...", ""), xs[-1:]
    if len(wsub) != 2 or c not in wsub or not c.isalpha() or len(set(x_labels)) != len(x_labels):
        return None
    o = wsub.replace(c, "", 1)
    if o == c or o in x_labels or out != xs[:-1] + o:
        return None
    return (LINEAR if wsub[1] == c else LINEAR_IO), ops[1 - ws[0]], ops[ws[0]]


def _linear_shape(node: fx.Node, x, target, w) -> bool:
    """The op's result has a linear's shape: x's leading dims, then the out-features."""
    return same_shape(_shape(node), _shape(x)[:-1] + (_shape(w)[0 if target is LINEAR else 1],))


def param_operands(node: fx.Node, params: set) -> list[fx.Node]:
    """Parameters that reach ``node``'s inputs directly or through views / casts (``W.t()``, ``W.float()``)."""
    found = []
    for x in node.all_input_nodes:
        while x not in params and _target(x) in _VIEWS and x.args and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        if x in params and x not in found:
            found.append(x)
    return found


def normalize(gm: fx.GraphModule, params: set[fx.Node]) -> fx.GraphModule:
    """Rewrite ``gm`` in place to canonical ops; ``params`` are the parameter placeholders."""
    g = gm.graph
    for node in list(g.nodes):
        t = _target(node)
        a = node.args
        if t in _LINEAR_SPELLINGS and t is not LINEAR:
            node.target = LINEAR
        elif t is F.scaled_dot_product_attention:
            node.target = SDPA
        elif t in _MATMULS and len(a) == 2 and not node.kwargs and (tw := _weight(a[1], params)) \
                and _ndim(a[0]) >= 1 and _linear_shape(node, a[0], *tw):
            _to_linear(node, tw[0], a[0], tw[1], None)
        elif t in (torch.addmm, "addmm", torch.baddbmm, "baddbmm") and len(a) == 3 and (tw := _weight(a[2], params)) \
                and (b := _bias(a[0], params)) is not None and _linear_shape(node, a[1], *tw) \
                and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
            _to_linear(node, tw[0], a[1], tw[1], b)  # HF Conv1D: addmm(bias, x.view(-1, in), W[in, out])
        elif t in _EINSUMS and (lin := _einsum_linear(node, params)) and _linear_shape(node, lin[1], lin[0], lin[2]):
            _to_linear(node, *lin, None)
        elif t in (torch.bmm, "bmm") or _grouped_form(t) is not None:
            _to_grouped(g, node, params)
    # fold `linear(x, W) + b` (b a 1-D parameter) into the linear's bias
    for node in list(g.nodes):
        if _target(node) in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
            lin, b = node.args
            if b in params and _target(lin) in LINEARS and len(lin.users) == 1 and (len(lin.args) < 3 or lin.args[2] is None):
                bias_val = b.meta.get("example_value")
                if bias_val is not None and bias_val.dim() == 1:
                    lin.args = (lin.args[0], lin.args[1], b)
                    node.replace_all_uses_with(lin)
                    g.erase_node(node)
    for node in list(g.nodes):
        _out_of_place(g, node)
    for node in list(g.nodes):
        _filled_to_cat(g, node)  # before the slices of a filled buffer would read as a split
        _slices_to_split(g, node)
        _sizes_inline(g, node)
        _rearrange_to_views(g, node)
    for node in reversed(list(g.nodes)):  # W.t(), W.expand(...) left dead by the rewrites above
        if node.op in ("call_method", "call_function") and not node.users and _target(node) in _VIEWS \
                and param_operands(node, params):
            g.erase_node(node)
    gm.recompile()
    return gm


def _last_dim_slice(node: fx.Node, nd: int) -> slice | None:
    """The slice if ``node`` is ``x[..., a:b]`` (or ``x[:, :, a:b]``): constant bounds, last dim only."""
    if _target(node) is not operator.getitem or not isinstance(node.args[1], tuple):
        return None
    idx = list(node.args[1])
    if idx and idx[0] is Ellipsis:
        idx = [slice(None)] * (nd - len(idx) + 1) + idx[1:]
    if len(idx) != nd or any(i != slice(None) for i in idx[:-1]):
        return None
    last = idx[-1]
    ok = isinstance(last, slice) and last.step in (None, 1) and all(isinstance(b, (int, type(None))) for b in (last.start, last.stop))
    return last if ok else None


def _slices_to_split(g: fx.Graph, src: fx.Node) -> None:
    """``x[..., :q], x[..., q:q+k], x[..., q+k:]`` cutting ``x`` into contiguous pieces on its last
    dim (Phi-3's fused ``qkv_proj``) become one ``x.split([q, k, v], -1)``: the fused-projection
    rules then see the pieces."""
    nd, users = _ndim(src), list(src.users)
    if nd < 1 or len(users) < 2:
        return
    n = _shape(src)[-1]
    if not isinstance(n, int):
        return
    cuts = []
    for u in users:
        sl = _last_dim_slice(u, nd)
        if sl is None:
            return
        start, stop = sl.indices(n)[:2]
        cuts.append((start, stop, u))
    cuts.sort(key=lambda c: c[:2])
    if cuts[0][0] != 0 or cuts[-1][1] != n or any(a[1] != b[0] for a, b in zip(cuts, cuts[1:])) \
            or any(a >= b for a, b, _ in cuts):
        return
    with g.inserting_after(src):
        split = g.call_method("split", (src, [b - a for a, b, _ in cuts], -1))
    split.meta.update({k: v for k, v in cuts[0][2].meta.items() if k in ("stack_trace", "nn_module_stack")})
    split.meta["example_value"] = tuple(value(u) for _, _, u in cuts)
    for i, (_, _, u) in enumerate(cuts):
        u.args = (split, i)


_IN_PLACE = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill",
             "clamp_": "clamp"}


_FRESH = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
          torch.bmm, torch.matmul, torch.mm, F.linear, torch.zeros, torch.empty, torch.ones, torch.zeros_like}


def _out_of_place(g: fx.Graph, node: fx.Node) -> None:
    """``out.add_(b)`` on a fresh value (HF's expert bias: ``out = grouped_mm(...); out.add_(bias)``) becomes
    ``out2 = out.add(b)``, later reads of ``out`` reading ``out2``: the same values, and a placement change
    of ``out`` (a pending sum reduced before the bias is added) can no longer land in a copy that nobody
    reads. Left in place where ``out`` may alias something else (an input, a view) or the dtype would change;
    the rewrite then refuses to map the written operand (``rewrite._Rewriter.run``)."""
    if node.op != "call_method" or node.target not in _IN_PLACE or not node.args or node.kwargs:
        return
    x = node.args[0]
    if not isinstance(x, fx.Node) or not (x.target in PROJECTIONS or x.target in _FRESH
                                          or isinstance(x.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))):
        return  # (a custom op's result: functional, never an alias of its inputs)
    order = {n: i for i, n in enumerate(g.nodes)}
    if any(order[u] < order[node] and (_target(u) in _VIEWS or _target(u) in ("split", "chunk", "unbind", torch.split))
           for u in x.users):
        return  # a view taken before the write sees it: keep the write in place
    dt = value(x).dtype if isinstance(value(x), torch.Tensor) else None
    if dt is None or any(isinstance(a, fx.Node) and isinstance(value(a), torch.Tensor) and value(a).dtype != dt
                         and value(a).dim() > 0 for a in node.args[1:]):
        return
    later = [u for u in x.users if u is not node and order[u] > order[node]]
    node.target = _IN_PLACE[node.target]
    for u in later:
        u.replace_input_with(x, node)


def _filled_to_cat(g: fx.Graph, buf: fx.Node) -> None:
    """``k = x.new_empty(..., a + b); k[..., :a].copy_(p); k[..., a:].copy_(q)`` (DeepSeek's MLA key: the
    per-head part and the rotary part shared by every head written into one buffer) becomes
    ``k = torch.cat([p, q], -1)``: the same values, no in-place write into a fresh buffer, so the
    rules see what each part is (a head-sharded ``p`` stays sharded). Only when the slices cover the
    last dim exactly, each is written once with a value of its shape and dtype, and every other use
    of the buffer comes after the writes; else left as it is."""
    if _target(buf) not in ("new_empty", torch.empty) or buf.kwargs.get("dtype") is not None or _ndim(buf) < 1:
        return
    n = _shape(buf)[-1]
    if not isinstance(n, int):
        return
    order = {node: i for i, node in enumerate(g.nodes)}
    cuts, reads = [], []
    for u in buf.users:
        sl = _last_dim_slice(u, _ndim(buf))
        writes = [w for w in u.users if _target(w) == "copy_"]
        if sl is None or not writes:
            reads.append(u)
            continue
        if len(u.users) != 1 or writes[0].users or len(writes[0].args) != 2 or writes[0].kwargs \
                or writes[0].args[0] is not u:
            return
        src = writes[0].args[1]
        if not (isinstance(src, fx.Node) and same_shape(_shape(src), _shape(u))
                and value(src).dtype == value(buf).dtype):
            return
        start, stop = sl.indices(n)[:2]
        cuts.append((start, stop, u, writes[0], src))
    cuts.sort(key=lambda c: c[:2])
    if not cuts or cuts[0][0] != 0 or cuts[-1][1] != n or any(a[1] != b[0] for a, b in zip(cuts, cuts[1:])):
        return
    last = max((c[3] for c in cuts), key=order.__getitem__)
    if any(order[r] < order[last] for r in reads):
        return
    with g.inserting_after(last):
        new = g.call_function(torch.cat, ([c[4] for c in cuts], -1))
    new.meta.update({k: v for k, v in buf.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})
    for r in reads:
        r.replace_input_with(buf, new)
    for _, _, sl, w, _ in cuts:
        g.erase_node(w)
        g.erase_node(sl)
    g.erase_node(buf)


_SIZED = {"view", "reshape", "expand", torch.reshape}


def _sizes_inline(g: fx.Graph, node: fx.Node) -> None:
    """``view(x, size)`` with ``size`` a computed ``torch.Size`` node (Dynamo's spelling of
    ``x.size()[:-1] + (nf,)`` once a dim is symbolic, HF ``Conv1D``) becomes ``view(x, (s0, s1, nf))``:
    one entry per dim, static sizes as ints, so the view rule can rewrite a sharded dim's entry."""
    if _target(node) not in _SIZED or len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], fx.Node):
        return
    size = node.args[1]
    sizes = value(size)
    if not isinstance(sizes, (tuple, list)) or isinstance(sizes, torch.Tensor):
        return
    if _target(size) is torch.Size and len(size.args) == 1 and isinstance(size.args[0], (tuple, list)) \
            and len(size.args[0]) == len(sizes):
        entries = list(size.args[0])
    else:
        entries = []
        for i, v in enumerate(sizes):
            if isinstance(v, int):
                entries.append(v)
                continue
            with g.inserting_before(node):
                item = g.call_function(operator.getitem, (size, i))
            item.meta["example_value"] = v
            entries.append(item)
    node.args = (node.args[0], tuple(entries))
    if not size.users:
        g.erase_node(size)


def _grouped_form(t) -> str | None:
    """The ``grouped_linear`` form of a grouped-matmul op (rows sorted by expert, cumulative offsets)."""
    if t is torch._grouped_mm:
        return "grouped_mm"
    if getattr(F, "grouped_mm", None) is not None and t is F.grouped_mm:
        return "nn_grouped_mm"
    name = getattr(t, "_qualified_op_name", None) or (t.name() if isinstance(t, torch._ops.OpOverload) else None)
    return "fallback" if name == "transformers::grouped_mm_fallback" else None


def _expert_weight(node, params: set) -> tuple | None:
    """(W, out dim) if ``node`` is a 3-D parameter ``W`` ``[E, in, out]`` or ``W.transpose(-2, -1)`` of
    one stored ``[E, out, in]``: the weight operand of a grouped matmul."""
    if node in params and _ndim(node) == 3:
        return node, 2
    t = _target(node)
    if t in ("transpose", torch.transpose) and node.args[0] in params and _ndim(node.args[0]) == 3 \
            and {d % 3 for d in node.args[1:3] if isinstance(d, int)} == {1, 2}:
        return node.args[0], 1
    return None


def _to_grouped(g: fx.Graph, node: fx.Node, params: set) -> None:
    """``grouped_mm(x, W^T, offs)`` (each spelling, ``_grouped_form``) and ``bmm(W[ids], x[..., None])[..., 0]``
    (HF's ``batched_mm``; or ``bmm(x[:, None], W[ids])[:, 0]`` for ``[E, in, out]``) with a 3-D parameter ``W``
    become ``grouped_linear``. Anything else (a bias, an ``out_dtype``, another weight) is left as it is."""
    t, a, kw = _target(node), node.args, node.kwargs
    form = _grouped_form(t)
    if form is not None:
        offs = a[2] if len(a) > 2 else kw.get("offs")
        rest = {k: v for k, v in kw.items() if k != "offs"}
        ew = _expert_weight(a[1], params) if len(a) > 1 else None
        if ew is None or offs is None or len(a) > 3 or any(v is not None for v in rest.values()) or _ndim(a[0]) != 2:
            return
        node.target, node.args, node.kwargs = GROUPED, (a[0], ew[0], offs, form, ew[1]), {}
        return
    if t not in (torch.bmm, "bmm") or len(a) != 2 or node.kwargs or len(node.users) != 1:
        return
    (sq,) = node.users
    for gathered, vec, out_dim, axis in ((a[0], a[1], 1, -1), (a[1], a[0], 2, 1)):
        if _target(gathered) is not operator.getitem or gathered.args[0] not in params or _ndim(gathered.args[0]) != 3:
            continue
        ids = gathered.args[1]
        if not (isinstance(ids, fx.Node) and _ndim(ids) == 1 and not value(ids).is_floating_point()):
            continue
        if _target(vec) not in ("unsqueeze", torch.unsqueeze) or vec.args[1] % 3 != axis % 3 or _ndim(vec.args[0]) != 2:
            continue
        if _target(sq) not in ("squeeze", torch.squeeze) or len(sq.args) != 2 or sq.args[1] % 3 != axis % 3:
            continue
        with g.inserting_before(sq):
            new = g.call_function(GROUPED, (vec.args[0], gathered.args[0], ids, "ids", out_dim))
        new.meta.update(sq.meta)
        sq.replace_all_uses_with(new)
        for dead in (sq, node, gathered, vec):
            if not dead.users:
                g.erase_node(dead)
        return


def _to_linear(node: fx.Node, target, x, w, b) -> None:
    node.op, node.target = "call_function", target
    node.args, node.kwargs = (x, w, b), {}


def _is_rearrange(node: fx.Node) -> bool:
    t = node.target if node.op == "call_function" else None
    return getattr(t, "__name__", "") == "rearrange" and getattr(t, "__module__", "").startswith("einops")


def _rearrange_groups(pattern: str, nd: int, lengths: dict) -> tuple | None:
    """(input groups, output groups) of elementary axis names of an einops ``rearrange`` pattern for
    an ``nd``-dim input; an ellipsis becomes one axis per dim it covers; None if not understood."""
    from einops.parsing import ParsedExpression

    left, arrow, right = pattern.partition("->")
    if not arrow:
        return None
    try:
        lhs, rhs = ParsedExpression(left), ParsedExpression(right)
    except Exception:  # noqa: BLE001 - an invalid pattern: einops itself raises when the op runs
        return None
    n_ell = nd - (len(lhs.composition) - 1) if lhs.has_ellipsis else 0
    ell = [f"…{i}" for i in range(n_ell)]

    def groups(comp):
        out = []
        for g in comp:
            if g == "…":
                out += [[a] for a in ell]
            else:
                out.append([a for n in g for a in (ell if n == "…" else [n])])
        return out

    ins, outs = groups(lhs.composition), groups(rhs.composition)
    names_in = [a for grp in ins for a in grp]
    if len(ins) != nd or sorted(names_in) != sorted(a for grp in outs for a in grp) \
            or any(not isinstance(v, int) for v in lengths.values()):
        return None
    return ins, outs


def _rearrange_to_views(g: fx.Graph, node: fx.Node) -> None:
    """``rearrange(x, "b t (h d) -> b h t d", h=H)`` -> ``x.reshape(b, t, H, d).permute(0, 2, 1, 3)``
    (and a last ``reshape`` where output axes are composed): the ops it stands for, so that the
    view and transpose rules carry a shard through it. Left alone (no rule: replicated, warned) if
    the pattern is not understood."""
    if not _is_rearrange(node) or len(node.args) != 2 or not isinstance(node.args[1], str) \
            or not isinstance(node.args[0], fx.Node) or _ndim(node.args[0]) < 0:
        return
    x, lengths = node.args[0], dict(node.kwargs)
    xv = value(x)
    parsed = _rearrange_groups(node.args[1], xv.dim(), lengths)
    if parsed is None:
        return
    ins, outs = parsed
    meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", *_TAGS)}

    def emit(target, args, example, op="call_function"):
        with g.inserting_before(node):
            n = g.create_node(op, target, args)
        n.meta.update(meta)
        n.meta["example_value"] = example
        return n

    size, node_of = {}, {}  # axis -> its length (int or SymInt), its graph value (int or node)
    for d, grp in enumerate(ins):
        known = [a for a in grp if a in lengths]
        unknown = [a for a in grp if a not in lengths]
        k = 1
        for a in known:
            size[a] = node_of[a] = lengths[a]
            k *= lengths[a]
        if len(unknown) > 1:
            return
        if unknown:
            full = xv.shape[d]
            (a,) = unknown
            size[a] = full // k
            if isinstance(full, torch.SymInt):
                dim_node = emit(torch.ops.aten.sym_size.int, (x, d), full)
                node_of[a] = dim_node if k == 1 else emit(operator.floordiv, (dim_node, k), size[a])
            else:
                node_of[a] = int(full) // k
    elementary = [a for grp in ins for a in grp]
    cur = x
    if any(len(grp) != 1 for grp in ins):
        cur = emit("reshape", (cur, *[node_of[a] for a in elementary]), xv.reshape([size[a] for a in elementary]), "call_method")
    order = [a for grp in outs for a in grp]
    perm = [elementary.index(a) for a in order]
    if perm != list(range(len(perm))):
        cur = emit("permute", (cur, *perm), value(cur).permute(perm), "call_method")
    if any(len(grp) != 1 for grp in outs):
        dims = []
        for grp in outs:  # a composed axis: the product of its lengths (a node where one is symbolic)
            n, v = 1, 1
            for a in grp:
                if isinstance(n, int) and isinstance(node_of[a], int):
                    n = n * node_of[a]
                else:
                    n = node_of[a] if n == 1 else emit(operator.mul, (n, node_of[a]), v * size[a])
                v = v * size[a]
            dims.append(n)
        cur = emit("reshape", (cur, *dims), value(node), "call_method")
    node.replace_all_uses_with(cur)
    g.erase_node(node)
