"""Expert parallelism under sequence parallelism: the MoE block on this rank's tokens, an all-to-all dispatch
and combine (Megatron's all-to-all token dispatcher), no gather or reduction around the block.

Runs inside ``sequence_parallel`` after the region is grown. Without it, an expert-parallel MoE block
(``runtime/expert_parallel.local_experts_linear``) reads every token: the SP pass gathers its input
(``gather_from_tp``), each rank runs its experts' rows of all tokens, the combine is all-reduced and sliced
back to this rank's tokens (``reduce_from_tp`` + ``scatter_to_sp``). Here instead:

- the block (router, top-k, sort, gathers, combine) runs on this rank's ``T / tp`` tokens: a dropless MoE
  block computes each token's output from that token alone, so the block applied to a subset of the tokens
  is the block's output on those tokens. Its literal token counts (``view(N, k, H)``, ``arange(N * k)``,
  ``reshape(B, T, H)``) are divided by tp;
- the rows between the two expert matmuls travel: ``dispatch_rows`` sends each (token, expert) row to the
  rank of its expert, the experts run on what arrived, ``combine_rows`` sends the results back;
- the combine's output is this rank's tokens, whole: it stays in the SP region.

A block is taken only when every op in it is one this pass knows to be generic in the token count and
token-wise as a whole (per-token ops; views; permutations of the rows used as indices; counts over the rows
used only as the experts' routing). Anything else (a shared expert's sharded linears, per-row values
entering the experts' rows from outside, a token-mixing router such as a capacity limit, symbolic sizes)
keeps the block on the gathered path, correct, with a ``TPWarning`` that names the op.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tpcompile.runtime import expert_parallel as EP
from tpcompile.runtime import mappings as M

from .graph_utils import op_name, reachable, source_line, static_size, value
from .normalize import GROUPED, LINEARS
from .propagate import op_class

_VIEWS = {"view", "reshape", torch.reshape}
_SHAPE_ONLY = {"unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze, "flatten", torch.flatten, "contiguous"}
_ROUTE_OK = {"float", "int", "long", "to", torch.cumsum, "cumsum", torch.histc, "histc"}


class _Refused(Exception):
    pass


def _no(node: fx.Node, why: str):
    raise _Refused(f"{source_line(node)}: {why}")


def _sizes(node: fx.Node) -> list:
    a = node.args[1:]
    return list(a[0]) if len(a) == 1 and isinstance(a[0], (tuple, list)) else list(a)


def _stride(shape, d: int) -> int:
    s = 1
    for x in shape[d + 1:]:
        s *= int(x)
    return s


class _Block:
    """One MoE block: its nodes, the token dim of each value, and the edits to make."""

    def __init__(self, g: fx.Graph, entry: fx.Node, first: fx.Node, second: fx.Node, tp: int):
        self.g, self.entry, self.first, self.second, self.tp = g, entry, first, second, tp
        self.T = static_size(value(entry).shape[-2])  # the whole token count (None: symbolic, refused)
        self.tok: dict = {}  # node -> (dim, inner): the dim holding the token factor and its inner stride
        self.kind: dict = {}  # node -> "data" | "pos" (row positions, used as indices) | "route" (counts)
        self.edits: list = []  # (node, arg position or None, new args)

    # ------------------------------------------------------------------ what the block is
    def collect(self) -> None:
        if self.T is None:
            _no(self.first, "a symbolic token count (static shapes only)")
        down, after = reachable(self.entry), reachable(self.second)
        combine = next((u for u in self.g.nodes if u in after and u.op == "call_function"  # the nearest (graph
                        and u.target is M.reduce_from_tp), None)  # order), not a later layer's
        if combine is None or len(combine.users) != 1 or next(iter(combine.users)).target is not M.scatter_to_sp:
            _no(self.second, "the experts' combine is not reduced and sliced back to this rank's tokens")
        self.combine, self.slice = combine, next(iter(combine.users))
        nodes = ({n for n in reachable(combine, down=False) if n in down} | {combine}) - {self.entry}
        nodes |= {u for n in nodes for u in n.users if u.target is operator.setitem}  # writes (``inv_perm[perm] = ...``)
        for n in list(nodes):  # values made from nothing (``arange(S)``) that only the block reads
            for x in n.all_input_nodes:
                if x not in nodes and x is not self.entry and x.op == "call_function" and not x.all_input_nodes:
                    nodes.add(x)
        self.params = set()
        for n in nodes:
            for x in n.all_input_nodes:
                if x in nodes or x is self.entry:
                    continue
                if x.op != "placeholder":
                    _no(n, f"the MoE block reads {x.name}, computed outside it")
                self.params.add(x)
            for u in n.users:
                if u not in nodes and n is not combine:
                    _no(u, f"{n.name} of the MoE block is read outside it")
        if any(u not in nodes for u in self.entry.users):  # they would read this rank's tokens, not all
            _no(self.entry, "the gathered tokens are read outside the MoE block too")
        self.nodes = nodes
        x2 = self.second.args[0]
        self.rows = ({self.first, x2} | (reachable(self.first) & reachable(x2, down=False))) & nodes

    # ------------------------------------------------------------------ token dims, kinds, edits
    def walk(self) -> None:
        e = self.entry
        self.tok[e], self.kind[e] = (value(e).dim() - 2, 1), "data"
        for n in self.g.nodes:
            if n not in self.nodes:
                continue
            if n in self.rows:
                self._rows_op(n)
            elif n is self.second:  # the experts' results, in the rows' order
                self.tok[n], self.kind[n] = self.tok[self.first.args[0]], "data"
            elif n is self.combine:
                self.tok[n], self.kind[n] = self.tok.get(n.args[0]), self.kind.get(n.args[0])
            else:
                self._op(n)

    def _rows_op(self, n: fx.Node) -> None:
        """Between the two expert matmuls: row-wise ops on the experts' rows (the propagation rules
        certified them, ``_expert_rows_through``), reading nothing else but scalars."""
        if n is self.first:
            x = n.args[0]
            if self.tok.get(x) is None or self.tok[x][0] != 0 or self.kind.get(x) != "data":
                _no(n, "the experts' rows are not the block's tokens' rows")
            return
        if n.op == "call_function" and n.target in (EP.expert_rows_zeroed, EP.expert_rows_to_replicate):
            _no(n, "the experts' rows are read whole")
        for x in n.all_input_nodes:
            v = value(x)
            if x not in self.rows and isinstance(v, torch.Tensor) and v.numel() > 1:
                _no(n, f"{x.name} (not one of the experts' rows) enters the experts' rows")
        if n.target in _VIEWS:
            _no(n, "a view of the experts' rows (its sizes count the rows)")

    def _op(self, n: fx.Node) -> None:
        ins = [x for x in n.all_input_nodes if x in self.tok or x in self.kind]
        toks = [x for x in ins if self.tok.get(x) is not None]
        kinds = {self.kind.get(x) for x in ins}
        t = n.target
        cls = op_class(n)
        if n.op == "call_function" and t is M.copy_to_tp:
            self.tok[n], self.kind[n] = self.tok.get(n.args[0]), self.kind.get(n.args[0])
            return
        if n.op == "call_function" and getattr(t, "__module__", "").startswith("tpcompile.runtime"):
            _no(n, f"{getattr(t, '__name__', t)} in the MoE block")
        if n.op == "call_function" and t in LINEARS:
            x = n.args[0]
            if _from_copy(x, self.nodes):
                _no(n, "a tensor-parallel linear in the MoE block (a shared expert)")
            if x not in toks or self.tok[x][0] == value(x).dim() - 1:
                _no(n, "a linear over the tokens")
            self.tok[n], self.kind[n] = self.tok[x], "data"
            return
        if "pos" in kinds and not self._pos_ok(n):
            _no(n, "row positions (a sort's permutation) used as values, not as indices")
        if "route" in kinds and not self._route_ok(n):
            _no(n, "counts over the tokens used as values, not as the experts' routing")
        if not ins:  # made from nothing: only ``arange(S)`` feeding the inverse permutation
            if t is torch.arange and len(n.args) == 1 and isinstance(n.args[0], int):
                self.tok[n], self.kind[n] = None, "pos"  # sized when its consumer is seen
                return
            _no(n, f"{op_name(n)} with literal sizes in the MoE block")
        if t in _VIEWS or t in _SHAPE_ONLY:
            self._view(n)
            return
        if t is operator.getitem:
            self._getitem(n)
            return
        if t is operator.setitem:
            self._setitem(n)
            return
        if t in (torch.sort, "sort", torch.argsort, "argsort"):
            x = n.args[0]
            if x not in toks or value(x).dim() != 1:
                _no(n, "a sort of anything but the rows")
            # (values, indices): see getitem; an argsort is the permutation alone
            self.tok[n], self.kind[n] = self.tok[x], ("perm" if t in (torch.sort, "sort") else "pos")
            return
        if t in (torch.topk, "topk"):
            x = n.args[0]
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else -1)
            if x not in toks or dim % value(x).dim() == self.tok[x][0]:
                _no(n, "a top-k over the tokens (a capacity limit mixes tokens)")
            self.tok[n], self.kind[n] = self.tok[x], "data"
            return
        if t in (torch.histc, "histc", torch.bincount, "bincount"):
            self.tok[n], self.kind[n] = None, "route"
            return
        if t in (torch.cumsum, "cumsum"):
            x = n.args[0]
            if self.tok.get(x) is not None:
                _no(n, "a running sum over the tokens")
            self.tok[n], self.kind[n] = None, self.kind.get(x, "data")
            return
        if t is torch.empty_like:
            self.tok[n], self.kind[n] = self.tok.get(n.args[0]), self.kind.get(n.args[0])
            return
        if t in (torch.repeat_interleave, "repeat_interleave"):
            x = n.args[0]
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
            r = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
            if x not in toks or not isinstance(r, int) or dim is None or dim % value(x).dim() != self.tok[x][0]:
                _no(n, "a repeat other than of each token's row")
            d, inner = self.tok[x]
            self.tok[n], self.kind[n] = (d, inner * r), self.kind[x]
            return
        if cls in ("pointwise", "cast", "softmax", "reduction"):
            self._elementwise(n, toks, kinds, cls)
            return
        _no(n, f"{op_name(n)} (no rule says it is token-wise in a MoE block)")

    def _pos_ok(self, n: fx.Node) -> bool:
        """Row positions may be scaled by ints (``perm // k``), copied (``empty_like``) and used as indices."""
        t = n.target
        if t in (operator.getitem, operator.setitem, torch.empty_like):
            return True
        if t in (operator.floordiv, operator.mul, operator.mod, operator.add):
            return all(not isinstance(a, fx.Node) or self.kind.get(a) == "pos" for a in n.args)
        return False

    def _route_ok(self, n: fx.Node) -> bool:
        if n.target in _ROUTE_OK:
            return True
        return False

    def _elementwise(self, n, toks, kinds, cls) -> None:
        v = value(n)
        if not isinstance(v, torch.Tensor):
            _no(n, f"{op_name(n)} of the tokens gives no tensor")
        if not toks:
            self.tok[n], self.kind[n] = None, ("route" if "route" in kinds else "data")
            return
        places = set()
        for x in toks:
            d, inner = self.tok[x]
            places.add((d + v.dim() - value(x).dim(), inner))
        if len(places) != 1:
            _no(n, f"{op_name(n)} of tokens laid out differently")
        (d, inner), = places
        for x in n.all_input_nodes:  # a value with no token dim broadcast along the tokens: size 1 there
            xv = value(x)
            if x in toks or not isinstance(xv, torch.Tensor):
                continue
            k = d - (v.dim() - xv.dim())
            if k >= 0 and xv.shape[k] != 1:
                _no(n, f"{x.name} has the tokens' dim without being the tokens")
        if cls in ("softmax", "reduction"):
            dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            x = toks[0]
            nd = value(x).dim()
            dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
            dims = [k % nd for k in dims]
            src = self.tok[x][0]
            if src in dims:
                _no(n, f"{op_name(n)} over the tokens")
            if cls == "reduction" and v.dim() < nd:
                d = src - sum(1 for k in dims if k < src)
        if v.dim() <= d or v.shape[d] % (self.T * inner):
            _no(n, f"{op_name(n)}: the tokens' dim is lost")
        self.tok[n], self.kind[n] = (d, inner), ("route" if "route" in kinds else "pos" if kinds == {"pos"} else "data")

    def _view(self, n: fx.Node) -> None:
        x, t = n.args[0], n.target
        if self.tok.get(x) is None:
            self.tok[n], self.kind[n] = None, self.kind.get(x)
            return
        sizes = _sizes(n) if t in _VIEWS else []
        if any(isinstance(s, fx.Node) for s in sizes):
            _no(n, "a view with symbolic sizes of the tokens (static shapes only)")
        d, inner = self.tok[x]
        s = inner * _stride(value(x).shape, d)  # flat stride of the token factor
        out = value(n).shape
        for j in range(len(out)):
            st = _stride(out, j)
            if s % st == 0 and (st * int(out[j])) % (s * self.T) == 0:
                break
        else:
            _no(n, "a view that splits the tokens")
        if t in _VIEWS and sizes[j] != -1:
            sizes[j] = sizes[j] // self.tp
            self.edits.append((n, sizes))
        self.tok[n], self.kind[n] = (j, s // st), self.kind.get(x)

    def _getitem(self, n: fx.Node) -> None:
        x, idx = n.args
        if self.kind.get(x) == "perm":  # sort's (values, indices)
            self.tok[n], self.kind[n] = self.tok[x], ("route" if idx == 0 else "pos")
            return
        if isinstance(value(x), (tuple, list)):  # topk's (values, indices), chunk's pieces
            self.tok[n], self.kind[n] = self.tok.get(x), self.kind.get(x)
            return
        if isinstance(idx, fx.Node):  # rows of x picked by positions
            if self.kind.get(idx) != "pos" or self.tok.get(idx) is None or self.tok.get(x) is None \
                    or self.tok[x][0] != 0:
                _no(n, "tokens indexed by anything but row positions")
            self.tok[n], self.kind[n] = self.tok[idx], self.kind.get(x)
            return
        _no(n, "an index of the tokens")

    def _setitem(self, n: fx.Node) -> None:
        """``inv_perm[perm] = arange(S)``: the inverse permutation, an index built from positions."""
        t, idx, src = n.args
        if self.kind.get(idx) != "pos" or self.kind.get(src) != "pos" or self.tok.get(idx) is None:
            _no(n, "a write into the tokens other than an inverse permutation")
        if src.target is torch.arange and self.tok.get(src) is None:
            if src.args[0] != value(idx).shape[0]:
                _no(src, "an arange that is not the rows' positions")
            self.edits.append((src, [src.args[0] // self.tp]))
            self.tok[src] = self.tok[idx]
        self.tok[n], self.kind[n] = self.tok.get(t), "pos"
        self.kind[t] = "pos"

    # ------------------------------------------------------------------ the rewrite
    def apply(self, group: str, bucket: dict) -> None:
        g = self.g
        src = self.entry.args[0]
        for n, sizes in self.edits:
            if n.target is torch.arange:
                n.args = tuple(sizes)
            else:
                n.args = (n.args[0], *sizes) if n.op == "call_method" else (n.args[0], tuple(sizes))
        self.entry.replace_all_uses_with(src)
        g.erase_node(self.entry)
        for n in [n for n in g.nodes if n in self.nodes and n.op == "call_function" and n.target is M.copy_to_tp]:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
        first, second = self.first, self.second
        x, w1, route, form, out_dim, _ = first.args
        n_local = int(value(w1).shape[0]) // self.tp
        with g.inserting_before(first):
            d = g.call_function(EP.dispatch_rows, (x, route, form, n_local, group))
            rows, rows_route, send_at, order, valid = (g.call_function(operator.getitem, (d, i)) for i in range(5))
        d.meta["tp_mapping"] = "dispatch_rows"
        for k in ("stack_trace", "nn_module_stack"):
            if k in first.meta:
                for m in (d, rows, rows_route, send_at, order, valid):
                    m.meta[k] = first.meta[k]
        first.target, first.args = GROUPED, (rows, w1, rows_route, form, out_dim)
        second.target, second.args = GROUPED, (second.args[0], second.args[1], rows_route, form, second.args[4])
        users = list(second.users)
        with g.inserting_after(second):
            back = g.call_function(EP.combine_rows, (second, send_at, order, valid, group))
        back.meta.update({k: v for k, v in second.meta.items() if k in ("stack_trace", "nn_module_stack")})
        back.meta["tp_mapping"] = "combine_rows"
        back.meta["example_value"] = value(second)
        for u in users:
            u.replace_input_with(second, back)
        y = self.combine.args[0]
        self.slice.replace_all_uses_with(y)
        g.erase_node(self.slice)
        g.erase_node(self.combine)
        for p in self.params - {w1, second.args[1]}:  # the router: replicated, used on this rank's tokens
            if getattr(value(p), "requires_grad", False):
                bucket.setdefault(p, []).extend(u for u in p.users if u in self.nodes)


def _from_copy(x: fx.Node, nodes: set) -> bool:
    """``x`` is (a view / cast of) a ``copy_to_tp`` of the block: the input of a column-parallel linear."""
    return any(a.op == "call_function" and a.target is M.copy_to_tp for a in reachable(x, down=False) | {x} if a in nodes)


def _pairs(g: fx.Graph) -> list:
    """(first, second) expert matmuls of each expert-parallel MoE block: the two ``local_experts_linear``
    on one routing, the second reading the first's rows."""
    by_route: dict = {}
    for n in g.nodes:
        if n.op == "call_function" and n.target is EP.local_experts_linear:
            by_route.setdefault(n.args[2], []).append(n)
    return [tuple(ns) for ns in by_route.values()]


def dispatch_experts(g: fx.Graph, region: set, group: str, tp: int, bucket: dict) -> tuple[list, list]:
    """Every expert-parallel MoE block whose tokens the SP pass gathered from ``region``: on this rank's
    tokens with an all-to-all dispatch and combine (in place). Returns (each block's combine, the value the
    SP pass had sliced back into the region, now erased; a warning for each block left on the gathered path)."""
    done, warns = [], []
    for pair in _pairs(g):
        if len(pair) != 2:
            warns.append(f"{source_line(pair[0])}: {len(pair)} expert matmuls on one routing")
            continue
        first, second = pair
        found = [a for a in reachable(first, down=False) if a.op == "call_function" and a.target is M.gather_from_tp
                 and a.args[0] in region]
        above = set().union(*(reachable(a, down=False) for a in found)) if found else set()
        entries = [a for a in found if a not in above]  # the nearest: not an earlier block's
        if len(entries) != 1:
            warns.append(f"{source_line(first)}: the experts' tokens do not come from the sequence-parallel region "
                         f"through one gather")
            continue
        block = _Block(g, entries[0], first, second, tp)
        try:
            block.collect()
            block.walk()
        except _Refused as e:
            warns.append(str(e))
            continue
        block.apply(group, bucket)
        done.append(block.combine)
    return done, [
        f"tpcompile: expert_parallel=True with sequence_parallel=True: the MoE block at {w} — it stays on the "
        f"gathered path (its tokens all-gathered, the experts' combine all-reduced and sliced back: correct, one "
        f"all-gather and one all-reduce above the all-to-all dispatch). docs/models.md lists what the dispatch "
        f"takes." for w in warns]


__all__ = ["dispatch_experts"]
