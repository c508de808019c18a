"""Pass: fold maximal affine regions into single linear operators.

A *region* is a connected set of affine nodes (rules with ``affine=True``:
conv, BatchNorm, linear, constant scales, average pooling, adds, reshapes, ...)
with no nonlinearity inside. Its *entries* are the non-region nodes it reads,
its *exits* the region nodes read from outside. For an exit ``v`` the value is
an affine function of the entries, ``v = sum_e J_{e->v} e + b``, so

    L(v) <= sum_e ||J_{e->v}|| L(e)                                    (certified)

(triangle inequality; with one entry, ``L(v) <= ||J|| L(e)``). This replaces
AutoLip's product of member norms by the norm of each partial map as a whole.
``||J_{e->v}||`` is computed, tightest first:

1. *materialised*: when the smaller of (entry size, exit size) is at most
   ``MATERIALIZE_MAX``, the Jacobian is formed exactly in float64 (``torch.func``
   over the basis of the smaller side) and its norm certified by
   :func:`lipgraph.norms.dense_norm`; a relative margin ``EVAL_MARGIN`` (1e-7)
   of the region's AutoLip product covers the float64 evaluation error. The map
   is evaluated on the members that depend on the entry and reach the exit
   (:func:`_live_members`), with a concatenation that has one live input and is
   followed only by per-channel maps read as that input (:func:`_narrowed_at_cat`);
   layers whose matrix is their weight are written from it, not run on a basis
   (:func:`_from_first_layers`, :func:`_through_last_linear`), and a per-pixel
   part is certified by its one-pixel channel map (:func:`_pixelwise_norm`);
2. *folded*: along a path, per-channel scales (eval BatchNorm, constant
   channel scales) fold into the neighbouring conv / linear weight
   (``diag(s) W`` or ``W diag(s)``), and a pointwise (1x1, stride 1,
   unpadded) conv or linear composes exactly with its neighbour; the folded
   operator's norm is certified by :mod:`lipgraph.norms`;
3. otherwise AutoLip inside the region (sum over paths of products).

The folded cumulative values are applied as ``overrides`` to
:func:`lipgraph.bounds.autolip.autolip` (which keeps the smaller value at each
exit), computed in graph order so that folds compound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.func import jvp, vjp

from .. import ir, norms
from ..core import ROUNDING_MARGIN, l2_sum, serve_cheapest
from ..ops import RULES, LocalConstant, Settings
from .basis import linear_part_columns
from .relations import AlgorithmResult, Cumulative, Relation, Term, combine

#: Materialise a partial map when its smaller side has at most this many entries.
MATERIALIZE_MAX = 2048
#: ... and the Jacobian has at most this many entries.
MATERIALIZE_ENTRIES = 1 << 23
#: Work budget of the materialised partial maps of one analysis (``method="auto"``), in multiply-adds of their
#: Gram matrices (:func:`_materialize_work`); the maps are served cheapest first, the others are folded
#: (route 2 of the module docstring). Counted from shapes, so every run makes the same choices; the ``affine``
#: record says how many were left. Measured (idle, 2 cores): shufflenet_v2_x0_5 at 64x64 has ~1.6e11 of them
#: (9 s, 476 alone and 113.6 with SeqLip where folding alone leaves 29387 and 147.9; at 3e10, 4.8 s); VGG-11's
#: one classifier fold (2048 -> 4096, 1.7e10, 1.2 s) gives its 7366 (16020 folded). ``analyze(effort=k)`` scales
#: it; methods named explicitly lift it (``Settings.extra["affine_work"] = inf``).
AFFINE_WORK_BUDGET = 3e10
#: Relative margin (of the region's AutoLip product) for float64 evaluation error of a materialised map.
EVAL_MARGIN = 1e-7
_SKIP = ("input", "output", "constant")


@dataclass
class Region:
    """A maximal connected set of affine nodes, with its entries and exits (names, graph order)."""

    nodes: list[str]
    entries: list[str]
    exits: list[str]


@dataclass
class Partial:
    """``||J_{entry->exit}|| <= norm`` (certified or not), how, and the AutoLip product it replaces."""

    entry: str
    exit: str
    norm: float
    certified: bool
    method: str
    autolip: float


@dataclass
class AffineResult:
    regions: list[Region]
    partials: list[Partial]
    overrides: dict[str, Cumulative]
    cumulative: dict[str, Cumulative]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def _foldable(n: ir.IRNode, lc: LocalConstant | None) -> bool:
    rule = RULES.get(n.op)
    if rule is None or not rule.affine or n.op in _SKIP or lc is None:
        return False
    if lc.method == "user-supplied" or not all(math.isfinite(p) for p in lc.partials):
        return False
    return True


def find_regions(g: nx.DiGraph, local: Mapping[str, LocalConstant]) -> list[Region]:
    """Maximal connected (ignoring direction) sets of affine nodes with at least one conv, linear or
    BatchNorm (regions of pure reshapes gain nothing)."""
    order = {name: i for i, name in enumerate(g.graph["order"])}
    members = {n.name for n in ir.nodes(g) if _foldable(n, local.get(n.name))}
    sub = g.subgraph(members).to_undirected(as_view=True)
    regions = []
    # components in graph order of their first node (set iteration order depends on the string hash seed)
    for comp in sorted(nx.connected_components(sub), key=lambda c: min(order[x] for x in c)):
        names = sorted(comp, key=order.__getitem__)
        if not any(ir.node(g, x).op in ("conv", "conv_transpose", "linear", "batch_norm", "matmul_const",
                                         "avg_pool", "adaptive_avg_pool") for x in names):
            continue
        entries = sorted({p for x in names for p in g.predecessors(x) if p not in comp}, key=order.__getitem__)
        exits = [x for x in names if any(s not in comp for s in g.successors(x))]
        regions.append(Region(names, entries, exits))
    return regions


# --- symbolic forms along a path ------------------------------------------------------------------


@dataclass
class _Form:
    """The partial map entry -> node: ``kind`` in ident / diag / conv / linear / num."""

    kind: str
    value: float = 1.0  # for num: a bound; otherwise a scalar factor
    scale: torch.Tensor | None = None  # diag: per-channel factors (channel axis ``axis``)
    axis: int = 1
    weight: torch.Tensor | None = None
    node: ir.IRNode | None = None  # conv / linear: the (first) node whose geometry is used
    certified: bool = True
    how: str = ""
    base: float | None = None  # conv / linear with the node's own weight: its local constant (no recompute)


def _bn_or_channel_scale(n: ir.IRNode) -> tuple[torch.Tensor, int] | None:
    """Per-channel factors of a BatchNorm, or of a constant scale broadcast along one axis."""
    from ..ops.linear import batch_norm_scale  # noqa: PLC0415

    if n.op == "batch_norm":
        return batch_norm_scale(n), 1
    if n.op == "scale":
        c = n.params["const"].detach().to(torch.float64)
        if n.attrs.get("divide"):
            if bool((c == 0).any()):
                return None
            c = 1.0 / c
        shape = tuple(n.in_shapes[0])
        if tuple(n.out_shape) != shape:
            return None
        if c.numel() == 1:
            return c.reshape(1), -1
        cs = [i for i, d in enumerate(c.shape) if d != 1]
        if len(cs) == 1:
            axis = cs[0] - c.ndim + len(shape)
            return c.flatten(), axis
    return None


def _is_pointwise_conv(n: ir.IRNode) -> bool:
    a = n.attrs
    w = n.params["weight"]
    return (n.op == "conv" and all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in a["stride"])
            and a["padding"] != "same" and (a["padding"] == "valid" or all(p == 0 for p in a["padding"]))
            and a["groups"] == 1 and ir.padding_mode(a) == ir.DEFAULT_PADDING_MODE)


def _form_bound(f: _Form, ctx: Settings, cache: dict) -> tuple[float, bool, str]:
    if f.kind == "num":
        return f.value, f.certified, f.how
    if f.kind == "ident":
        return abs(f.value), True, "identity"
    if f.kind == "diag":
        assert f.scale is not None
        return abs(f.value) * float(f.scale.abs().max()), True, "diagonal"
    if f.base is not None:
        return abs(f.value) * f.base, True, "local-constant"
    key = id(f)  # the cache keeps ``f`` alive (below), so its id is never reused for another form
    if key not in cache:
        assert f.node is not None and f.weight is not None
        n = f.node
        if f.kind == "linear":
            r = norms.dense_norm(f.weight, ctx.device)
            cache[key] = (r.upper, r.certified, "folded-" + r.method, f)
        else:
            r = norms.conv_norm(lambda x: x, n.in_shapes[0], ctx, f.weight, n.attrs, out_shape=n.out_shape,
                                transposed=n.op == "conv_transpose", lower=False)
            cache[key] = (r.upper, r.certified, "folded-" + r.method, f)
    up, cert, how, _ = cache[key]
    return abs(f.value) * up, cert, how


def _step(n: ir.IRNode, f: _Form, index: int, lc: LocalConstant, ctx: Settings, cache: dict) -> _Form:
    """The form of entry -> n from the form of entry -> (n's single reachable input, argument ``index``)."""
    ch = _bn_or_channel_scale(n) if n.op in ("batch_norm", "scale") else None
    if ch is not None:
        s, axis = ch
        if s.numel() > 1 and bool((s == s.flatten()[0]).all()):
            s = s.flatten()[:1]  # a uniform scale is a scalar
        if s.numel() == 1:
            factor = abs(float(s)) if f.kind == "num" else float(s)
            return dataclasses.replace(f, value=f.value * factor)
        nd = len(n.in_shapes[0])
        axis = axis % nd
        if f.kind == "ident":
            return _Form("diag", f.value, s, axis)
        if f.kind == "diag" and f.axis == axis and f.scale is not None and f.scale.numel() == s.numel():
            return _Form("diag", f.value, f.scale * s, axis)
        if (f.kind == "conv" and f.node is not None and f.weight is not None
                and axis == (1 if nd == f.node.attrs["ndim"] + 2 else 0)):
            w = f.weight * s.reshape(-1, *([1] * (f.weight.ndim - 1))).to(f.weight)
            return dataclasses.replace(f, weight=w, base=None)
        if f.kind == "linear" and axis == nd - 1 and f.weight is not None:
            return dataclasses.replace(f, weight=f.weight * s[:, None].to(f.weight), base=None)
    if n.op in ("conv", "linear"):
        w = n.params["weight"].detach().to(torch.float64)
        nd = len(n.in_shapes[0])
        if f.kind == "ident":
            base = lc.partials[0] if lc.certified and lc.partials else None
            return _Form("conv" if n.op == "conv" else "linear", f.value, weight=w, node=n, base=base)
        if f.kind == "diag" and f.scale is not None:
            if n.op == "conv" and f.axis == (1 if nd == n.attrs["ndim"] + 2 else 0) and n.attrs["groups"] == 1:
                sw = w * f.scale.reshape(1, -1, *([1] * (w.ndim - 2))).to(w)
                return _Form("conv", f.value, weight=sw, node=n)
            if n.op == "linear" and f.axis == nd - 1:
                return _Form("linear", f.value, weight=w * f.scale[None, :].to(w), node=n)
        if f.kind == "linear" and n.op == "linear" and f.weight is not None:
            return _Form("linear", f.value, weight=w @ f.weight, node=f.node)
        if f.kind == "conv" and f.weight is not None and f.node is not None:
            if _is_pointwise_conv(n) and f.node.attrs["groups"] == 1:  # 1x1 after a conv: mix output channels
                wc = torch.einsum("om,m...->o...", w.reshape(w.shape[0], w.shape[1]), f.weight)
                return dataclasses.replace(f, weight=wc, node=_retarget(f.node, n), base=None)
            if _is_pointwise_conv(f.node) and n.attrs["groups"] == 1:  # conv after a 1x1: mix input channels
                w1 = f.weight.reshape(f.weight.shape[0], f.weight.shape[1])
                wc = torch.einsum("om...,mi->oi...", w, w1)
                return _Form("conv", f.value, weight=wc, node=n)
    # no exact fold: a number
    b, cert, how = _form_bound(f, ctx, cache)
    part = lc.partials[index] if index < len(lc.partials) else math.inf
    return _Form("num", part * b, certified=cert and lc.certified, how=how)


def _retarget(first: ir.IRNode, last: ir.IRNode) -> ir.IRNode:
    """Geometry of ``first`` (spatial conv), output channels of ``last`` (a 1x1 after it)."""
    return dataclasses.replace(first, out_shape=tuple(last.out_shape))


def _fold_partial(g: nx.DiGraph, region: Region, members: list[str], entry: str, exit_: str,
                  local: Mapping[str, LocalConstant], ctx: Settings, cache: dict) -> tuple[float, bool, str]:
    """Bound on ||J_{entry -> exit}|| by path folding (see the module docstring)."""
    forms: dict[str, _Form] = {entry: _Form("ident")}
    for name in members:
        n = ir.node(g, name)
        lc = local[name]
        reach = [(i, u) for i, u in enumerate(n.inputs) if u in forms]
        if not reach:
            continue
        if len(reach) == 1 and len(set(n.inputs) & set(forms)) == 1 and n.inputs.count(reach[0][1]) == 1:
            forms[name] = _step(n, forms[reach[0][1]], reach[0][0], lc, ctx, cache)
            continue
        terms = []
        cert = lc.certified
        for i, u in reach:
            b, c, _ = _form_bound(forms[u], ctx, cache)
            terms.append(lc.partials[i] * b)
            cert = cert and c
        val = l2_sum(terms) if lc.combine == "l2" else sum(terms)
        forms[name] = _Form("num", val, certified=cert, how="autolip-in-region")
    return _form_bound(forms[exit_], ctx, cache)


# --- materialised partial maps ----------------------------------------------------------------------


def _numel(shape: Any) -> int:
    return math.prod(shape) if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape) else -1


def _held_input(g: nx.DiGraph, u: str, dev: torch.device) -> torch.Tensor:
    """The value of a region input held fixed in a partial map: a constant's own value, zeros for another entry
    (neither enters the partial derivative)."""
    un = ir.node(g, u)
    if un.op == "constant":
        return un.params["value"].detach().to(torch.float64).to(dev)
    return torch.zeros(un.out_shape, dtype=torch.float64, device=dev)


def _run_members(g: nx.DiGraph, nodes64: list[ir.IRNode], vals: dict[str, Any], exit_: str,
                 held: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Evaluate ``nodes64`` in order from the values in ``vals`` (updated in place), reading ``held(u)`` for
    every input ``u`` that is neither given nor a member; the value of ``exit_``."""
    for n in nodes64:
        vals[n.name] = RULES[n.op].forward(n, *[vals[u] if u in vals else held(u) for u in n.inputs])
    return vals[exit_]


def _materializable(n_in: int, n_out: int) -> bool:
    """Whether :func:`_materialize` forms an ``n_out x n_in`` Jacobian (within ``MATERIALIZE_MAX`` and
    ``MATERIALIZE_ENTRIES``)."""
    return n_in > 0 and n_out > 0 and min(n_in, n_out) <= MATERIALIZE_MAX and n_in * n_out <= MATERIALIZE_ENTRIES


def _materialize(g: nx.DiGraph, members: list[str], entry: str, exit_: str,
                 ctx: Settings) -> float | None:
    """Norm of the exact float64 Jacobian of entry -> exit (others fixed), or None when too large."""
    e_node = ir.node(g, entry)
    n_in, n_out = _numel(e_node.out_shape), _numel(ir.node(g, exit_).out_shape)
    # sized by the exit as it is (narrowing below makes more maps small enough, but on densenet121 the 300 more
    # it would materialise, each tighter, cost 15 s and left the output bound unchanged)
    if not _materializable(n_in, n_out):
        return None
    nodes = _narrowed_at_cat(_live_members([ir.node(g, m) for m in members], entry, exit_), entry, exit_)
    n_out = _numel(next(n for n in nodes if n.name == exit_).out_shape)
    nodes64 = [ir.as_float64(n) for n in nodes]
    shape = tuple(e_node.out_shape)
    dev = ctx.device

    def run(x: torch.Tensor) -> torch.Tensor:
        return _run_members(g, nodes64, {entry: x.reshape(shape)}, exit_, lambda u: _held_input(g, u, dev)).reshape(-1)

    x0 = torch.zeros(n_in, dtype=torch.float64, device=dev)
    try:
        direct = _through_last_linear(g, nodes64, entry, exit_, shape, dev)
        if direct is None:
            direct = _from_first_layers(g, nodes64, entry, exit_, shape, n_in <= n_out, dev)
        if direct is not None:
            return norms.dense_norm(direct, dev).upper
        if n_in <= n_out:
            basis = torch.eye(n_in, dtype=torch.float64, device=dev)
            cols = torch.vmap(lambda v: jvp(run, (x0,), (v,))[1])(basis)  # (n_in, n_out) = J^T
            jac = cols
        else:
            _, pull = vjp(run, x0)
            basis = torch.eye(n_out, dtype=torch.float64, device=dev)
            jac = torch.vmap(lambda u: pull(u)[0])(basis)  # (n_out, n_in) = J
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError):
        return None
    return norms.dense_norm(jac, dev).upper


def _from_first_layers(g: nx.DiGraph, nodes64: list[ir.IRNode], entry: str, exit_: str, shape: tuple[int, ...],
                       forward: bool, dev: torch.device) -> torch.Tensor | None:
    """``J^T`` (``(n_in, n_out)``) of entry -> exit when every member reading the entry is a conv or linear layer
    whose basis responses come from its weights (:func:`~lipgraph.bounds.basis.linear_part_columns`): the
    rest of the region's linear part (``jvp`` at 0) runs on those responses, column by column. Used when the
    forward direction is the cheaper one (``forward``) or no other member is a conv or linear layer (then the
    rest is elementwise and cheap); else None and the caller runs the basis through every member."""
    first = [n for n in nodes64 if entry in n.inputs]
    if len(first) == 1 and first[0].op == "cat":
        nodes64, first = _through_channel_cat(nodes64, first[0], entry)
    if not first or any(n.inputs.count(entry) != 1 or len(n.inputs) != 1 for n in first):
        return None
    if not forward and any(n.op in _HEAVY for n in nodes64 if n not in first):
        return None
    cols = [linear_part_columns(n, shape, dev) for n in first]
    if any(c is None for c in cols):
        return None
    return _rest_on_columns(g, nodes64, first, cols, exit_, lambda u: _held_input(g, u, dev), dev)


def _rest_on_columns(g: nx.DiGraph, nodes64: list[ir.IRNode], first: list[ir.IRNode], cols: list[torch.Tensor],
                     exit_: str, held: Callable[[str], torch.Tensor], dev: torch.device) -> torch.Tensor:
    """``J^T`` (``(n_in, n_out)``) from the basis responses ``cols`` of the members ``first`` that read the entry
    (one ``(n_in, *out_shape)`` tensor each): the other members' linear part (``jvp`` at 0) runs on them, column
    by column; the exit's own responses when it is one of ``first``."""
    names = [n.name for n in first]
    rest = [n for n in nodes64 if n.name not in names]
    n_in = cols[0].shape[0]
    if not rest:  # the exit is one of the first layers
        return cols[names.index(exit_)].reshape(n_in, -1)

    def run_rest(*ys: torch.Tensor) -> torch.Tensor:
        return _run_members(g, rest, dict(zip(names, ys, strict=True)), exit_, held).reshape(-1)

    zeros = tuple(torch.zeros(c.shape[1:], dtype=torch.float64, device=dev) for c in cols)
    return torch.vmap(lambda *ts: jvp(run_rest, zeros, ts)[1])(*cols)


#: Members whose linear part costs about one pass over their tensors (no weights to multiply by).
_HEAVY = ("conv", "conv_transpose", "linear", "matmul_const")


def _through_last_linear(g: nx.DiGraph, nodes64: list[ir.IRNode], entry: str, exit_: str, shape: tuple[int, ...],
                         dev: torch.device) -> torch.Tensor | None:
    """``J`` (``(n_out, n_in)``) of entry -> exit when the exit is a linear layer ``W`` (``n_out x k``) whose
    input is reached from the entry through members without weights (pools, reshapes, BatchNorm, scales):
    ``J = W P`` with ``P`` the prefix's Jacobian, read row by row as ``P^T w_i`` from the prefix's pull-back
    of each row ``w_i`` of ``W``. VGG's classifier region (a 2x2 -> 7x7 adaptive average pool, flatten, a
    4096 x 25088 linear) costs ``n_out`` pool adjoints this way, where the basis through the whole region
    multiplied ``W`` by 2048 vectors of 25088 entries (2.1e11 flops, 5 s). None when the pattern does not
    hold."""
    last = next((n for n in nodes64 if n.name == exit_), None)
    if last is None or last.op != "linear" or len(last.inputs) != 1 or last.inputs[0] == entry:
        return None
    w = last.params.get("weight")
    prefix = [n for n in nodes64 if n.name != exit_]
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or any(n.op in _HEAVY for n in prefix):
        return None
    k_shape = tuple(ir.node(g, last.inputs[0]).out_shape)
    if math.prod(k_shape) != w.shape[1] or not (len(k_shape) == 1 or (len(k_shape) == 2 and k_shape[0] == 1)):
        return None
    mid = last.inputs[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        return _run_members(g, prefix, {entry: x}, mid, lambda u: _held_input(g, u, dev))

    _, pull = vjp(run, torch.zeros(shape, dtype=torch.float64, device=dev))
    rows = w.detach().to(device=dev, dtype=torch.float64).reshape(w.shape[0], *k_shape)
    return torch.vmap(lambda r: pull(r)[0])(rows).reshape(w.shape[0], -1)


def _pixelwise(n: ir.IRNode, spatial: tuple[int, ...]) -> bool:
    """``n`` maps each pixel's channels to the same pixel's channels by one linear map for every pixel (1x1
    unpadded stride-1 convs, BatchNorm, per-channel or scalar scales, channel concatenation, adds, identity)."""
    if tuple(n.out_shape[2:]) != spatial or any(tuple(sh[2:]) != spatial for sh in n.in_shapes
                                                if isinstance(sh, (tuple, list)) and len(sh) == len(n.out_shape)):
        return False
    if n.op in ("batch_norm", "identity", "add"):
        return True
    if n.op == "cat":
        return n.attrs.get("dim") in (1, 1 - len(n.out_shape))
    if n.op == "scale":
        c = n.params.get("const")
        return isinstance(c, torch.Tensor) and (c.numel() == 1 or (
            c.ndim >= len(spatial) + 1 and all(d == 1 for d in c.shape[c.ndim - len(spatial):])))
    if n.op == "conv":
        a, w = n.attrs, n.params.get("weight")
        pad = a.get("padding")
        unpadded = pad == "valid" or pad == "same" or (not isinstance(pad, str) and all(int(x) == 0 for x in pad))
        return (isinstance(w, torch.Tensor) and all(k == 1 for k in w.shape[2:]) and unpadded
                and all(int(x) == 1 for x in a["stride"]))
    return False


def _pixelwise_part(g: nx.DiGraph, members: list[str], entry: str, exit_: str) -> bool:
    """Whether :func:`_pixelwise_norm` applies: every member a per-pixel map, one of them a conv (without a conv
    the part is scales and copies, which the other routes bound cheaply: densenet121's ~900 cat-BatchNorm
    partials, same bound). Shapes only, before any float64 copy."""
    e_node, x_node = ir.node(g, entry), ir.node(g, exit_)
    shape = tuple(e_node.out_shape) if isinstance(e_node.out_shape, (tuple, list)) else ()
    if len(shape) < 3 or shape[0] != 1 or tuple(x_node.out_shape[2:]) != shape[2:]:
        return False
    nodes = [ir.node(g, m) for m in members]
    return any(n.op == "conv" for n in nodes) and all(_pixelwise(n, shape[2:]) for n in nodes)


def _materialize_work(g: nx.DiGraph, members: list[str], entry: str, exit_: str) -> float:
    """Estimated cost of the materialised routes of one partial map (the units of ``AFFINE_WORK_BUDGET``): the
    Gram matrix of the matrix they certify, ``min(n_in, n_out)^2 max(n_in, n_out)`` multiply-adds (the one-pixel
    channel map for a per-pixel part); 0 where neither route applies (it returns at once)."""
    if _pixelwise_part(g, members, entry, exit_):
        n_in, n_out = ir.node(g, entry).out_shape[1], ir.node(g, exit_).out_shape[1]
    else:
        n_in, n_out = _numel(ir.node(g, entry).out_shape), _numel(ir.node(g, exit_).out_shape)
        if not _materializable(n_in, n_out):
            return 0.0
    return float(min(n_in, n_out) ** 2 * max(n_in, n_out))


def _pixelwise_norm(g: nx.DiGraph, members: list[str], entry: str, exit_: str, ctx: Settings) -> float | None:
    """``||J_{entry -> exit}||`` of a region part made of per-pixel maps (:func:`_pixelwise`): ``J = M (x) I_P``
    for the one-pixel channel map ``M`` (channel-major flattening), so ``||J|| = ||M||``, certified by
    :func:`lipgraph.norms.dense_norm` on ``M`` (``c_out x c_in``) instead of a ``P``-times larger Jacobian (an
    inception module's branch: 1792 x 3584 materialised, 1.3 s; its one-pixel map, milliseconds). ``M`` is
    read off the float64 responses to the ``c_in`` basis vectors of a one-pixel input (every member acts on one
    pixel alone, so it runs on a 1x1 map: the full map cost ``c_in`` times its conv, 34 GFLOP for a 1024-channel
    entry of densenet121 at 16x16). None when the part is not pixelwise."""
    if not _pixelwise_part(g, members, entry, exit_):
        return None
    shape = tuple(ir.node(g, entry).out_shape)
    spatial = shape[2:]
    nodes64 = [ir.as_float64(ir.node(g, m)) for m in members]
    dev = ctx.device
    c_in = shape[1]
    one = (1,) * len(spatial)
    basis = torch.eye(c_in, dtype=torch.float64, device=dev).reshape(c_in, 1, c_in, *one)

    def held(u: str) -> torch.Tensor:
        """Other entries and constants on one pixel (a constant does not enter the linear part: zeros of its
        shape serve; one of another rank keeps its value)."""
        un = ir.node(g, u)
        if un.op == "constant" and len(un.out_shape) != len(shape):
            return _held_input(g, u, dev)
        return torch.zeros((*un.out_shape[:2], *one), dtype=torch.float64, device=dev)

    def run(x: torch.Tensor) -> torch.Tensor:
        return _run_members(g, nodes64, {entry: x}, exit_, held)

    x0 = torch.zeros((1, c_in, *one), dtype=torch.float64, device=dev)
    try:
        out = _pixel_responses_from_weights(g, nodes64, entry, exit_, c_in, one, held, dev)
        if out is None:
            out = torch.vmap(lambda v: jvp(run, (x0,), (v,))[1])(basis)  # (c_in, 1, c_out, 1, ...)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError):
        return None
    m = out.reshape(c_in, -1).T  # (c_out, c_in): the one pixel's channel map
    return norms.dense_norm(m, dev).upper


def _reached(nodes: list[ir.IRNode], entry: str) -> set[str]:
    """``entry`` and the names of the ``nodes`` (in graph order) that depend on it through ``nodes``."""
    reached = {entry}
    for n in nodes:
        if any(u in reached for u in n.inputs):
            reached.add(n.name)
    return reached


def _live_members(nodes: list[ir.IRNode], entry: str, exit_: str) -> list[ir.IRNode]:
    """The members on a path entry -> exit through members. The others only feed constants into the partial
    map (their inputs are held), and a constant does not change the linear part of an affine map, so leaving
    them out (held at zero, :func:`_held_input`) keeps the Jacobian. densenet121: a dense layer's conv reaches a
    later BatchNorm through one concatenation, but the layers between are members too, reached from it only
    through ReLUs outside the region."""
    reached = _reached(nodes, entry)
    needed = {exit_}
    for n in reversed(nodes):
        if n.name in needed:
            needed.update(n.inputs)
    live = [n for n in nodes if n.name in reached and n.name in needed]
    return live if any(n.name == exit_ for n in live) else nodes


def _channel_slice(n: ir.IRNode, c0: int, c1: int) -> ir.IRNode | None:
    """``n`` (a BatchNorm, a per-channel or scalar constant scale, or an identity on dim 1) acting on channels
    ``c0:c1`` only, with its parameters cut to them; None for other nodes."""
    nd = len(n.out_shape)
    shape = (n.out_shape[0], c1 - c0, *n.out_shape[2:])
    if n.op == "identity":
        params = dict(n.params)
    elif n.op == "batch_norm":
        params = {k: (v[c0:c1] if isinstance(v, torch.Tensor) and v.ndim == 1 else v) for k, v in n.params.items()}
    elif n.op == "scale":
        c = n.params.get("const")
        if not isinstance(c, torch.Tensor):
            return None
        if c.numel() == 1:
            cut = c
        elif c.ndim == nd and all(d == 1 for i, d in enumerate(c.shape) if i != 1):
            cut = c[:, c0:c1]
        elif c.ndim == nd - 1 and all(d == 1 for d in c.shape[1:]):
            cut = c[c0:c1]
        else:
            return None
        params = {**n.params, "const": cut}
    else:
        return None
    return dataclasses.replace(n, params=params, in_shapes=[shape], out_shape=shape)


def _narrowed_at_cat(nodes64: list[ir.IRNode], entry: str, exit_: str) -> list[ir.IRNode]:
    """A partial map that enters a channel concatenation through one of its inputs, the others held at zero,
    and then only meets per-channel maps (BatchNorm, channel scales) to its exit: its Jacobian is zero outside
    that input's channels ``c0:c1``, so the map is the same with the cat read as that input and every later
    member cut to ``c0:c1`` (the same norm, without the zero rows). densenet121: every dense layer's 3x3 conv
    reaches the BatchNorms of all later layers of its block through their concatenations, up to 1024 channels
    wide for 32 live ones. ``nodes64`` unchanged when the pattern does not hold."""
    reached = _reached(nodes64, entry)  # the others are constants here
    cats = [n for n in nodes64 if n.op == "cat" and n.name in reached]
    if len(cats) != 1 or exit_ not in reached:
        return nodes64
    cat = cats[0]
    nd = len(cat.out_shape) if isinstance(cat.out_shape, (tuple, list)) else 0
    live = [u for u in cat.inputs if u in reached]
    if nd < 3 or cat.attrs.get("dim") not in (1, 1 - nd) or len(live) != 1 or cat.inputs.count(live[0]) != 1:
        return nodes64
    k = cat.inputs.index(live[0])
    c0 = sum(int(sh[1]) for sh in cat.in_shapes[:k])
    c1 = c0 + int(cat.in_shapes[k][1])
    at = nodes64.index(cat)
    out: list[ir.IRNode] = list(nodes64[:at])
    out.append(dataclasses.replace(cat, op="identity", inputs=[live[0]], in_shapes=[tuple(cat.in_shapes[k])],
                                   out_shape=tuple(cat.in_shapes[k]), attrs={}, params={}))
    prev = cat.name
    for n in nodes64[at + 1:]:
        if n.name not in reached:
            continue  # a constant of the partial map that the cut members do not read (checked below)
        cut = _channel_slice(n, c0, c1) if n.inputs == [prev] else None
        if cut is None:
            return nodes64
        out.append(cut)
        prev = n.name
    return out if prev == exit_ else nodes64


def _pixel_responses_from_weights(g: nx.DiGraph, nodes64: list[ir.IRNode], entry: str, exit_: str, c_in: int,
                                  one: tuple[int, ...], held: Callable[[str], torch.Tensor],
                                  dev: torch.device) -> torch.Tensor | None:
    """The one-pixel responses ``(c_in, c_out)`` of a pixelwise part whose members reading the
    entry are 1x1 convs: their responses are their weights (:func:`linear_part_columns` on a 1x1 map), and only
    the rest (BatchNorm, scales, cats, adds) runs on them. Running a 1x1 conv on the ``c_in`` basis vectors
    cost ``c_in^2 c_out`` (wide_resnet50_2's 2048 -> 1024 convs: 4e9 flops each). None when the first members
    are not all convs reading the entry alone."""
    first = [n for n in nodes64 if entry in n.inputs]
    if not first or any(n.op != "conv" or n.inputs != [entry] for n in first):
        return None
    px = (1, c_in, *one)
    cols = [linear_part_columns(dataclasses.replace(n, in_shapes=[px], out_shape=(1, n.out_shape[1], *one)), px, dev)
            for n in first]
    if any(c is None for c in cols):
        return None
    return _rest_on_columns(g, nodes64, first, cols, exit_, held, dev)


def _through_channel_cat(nodes64: list[ir.IRNode], cat: ir.IRNode, entry: str
                         ) -> tuple[list[ir.IRNode], list[ir.IRNode]]:
    """An entry that reaches the region through a channel concatenation read only by ungrouped convs (an
    inception module's branches feeding the next module): the partial map is each conv with its weight cut to the
    entry's channels, reading the entry itself. Returns the members without the cat and those cut convs as the
    first layers; ``(nodes64, [])`` when the pattern does not hold."""
    names = {n.name for n in nodes64}
    nd = len(cat.in_shapes[0]) if cat.in_shapes else 0
    if (nd < 3 or cat.attrs.get("dim") not in (1, 1 - nd) or cat.inputs.count(entry) != 1
            or any(u in names for u in cat.inputs)):
        return nodes64, []
    readers = [n for n in nodes64 if cat.name in n.inputs]
    if not readers or any(n.op != "conv" or n.inputs != [cat.name] or n.attrs.get("groups") != 1 for n in readers):
        return nodes64, []
    i = cat.inputs.index(entry)
    c0 = sum(int(s[1]) for s in cat.in_shapes[:i])
    c1 = c0 + int(cat.in_shapes[i][1])
    cut = [dataclasses.replace(n, inputs=[entry], in_shapes=[tuple(cat.in_shapes[i])],
                               params={**n.params, "weight": n.params["weight"][:, c0:c1]}) for n in readers]
    by_name = {n.name: n for n in cut}
    return [by_name.get(n.name, n) for n in nodes64 if n.name != cat.name], cut


def _autolip_partial(g: nx.DiGraph, members: list[str], entry: str, exit_: str,
                     local: Mapping[str, LocalConstant]) -> float:
    """AutoLip bound of entry -> exit inside the region (what folding replaces): the combinator on the members."""
    return combine(g, local, members=members, entries={entry: Cumulative(1.0, True)})[exit_].value


# --- the pass ------------------------------------------------------------------------------------------


def fold(g: nx.DiGraph, local: Mapping[str, LocalConstant], ctx: Settings,
         materialize: bool = True) -> AffineResult:
    """Bound every region exit by ``sum_e ||J_{e->v}|| L(e)`` and return the AutoLip overrides."""
    t0 = time.perf_counter()
    regions = find_regions(g, local)
    cache: dict = {}
    terms: dict[str, list[Partial]] = {}
    partials: list[Partial] = []
    tasks = []  # (region, exit, entry, members on the paths entry -> exit, their AutoLip product), graph order
    for reg in regions:
        comp = set(reg.nodes)
        for v in reg.exits:
            anc = nx.ancestors(g, v)
            members = [m for m in reg.nodes if (m in anc or m == v)]
            for e in reg.entries:
                if e not in anc or ir.node(g, e).op == "constant":
                    continue
                desc = nx.descendants(g, e)
                path_members = [m for m in members if m in desc and m in comp]
                auto = _autolip_partial(g, path_members, e, v, local)
                if auto != 0.0:
                    tasks.append((reg, v, e, path_members, auto))
    budget = ctx.extra.get("affine_work", AFFINE_WORK_BUDGET)
    costs = [_materialize_work(g, pm, e, v) if materialize else 0.0 for _, v, e, pm, _ in tasks]
    served, spent = serve_cheapest(costs, budget)  # cheapest first, then graph order
    left = len(tasks) - len(served) if materialize else 0
    for i, (reg, v, e, path_members, auto) in enumerate(tasks):
        got = None
        if materialize and i in served:
            how = "pixelwise-jacobian"
            mat = _pixelwise_norm(g, path_members, e, v, ctx)
            if mat is None:
                how, mat = "materialised-jacobian", _materialize(g, path_members, e, v, ctx)
            if mat is not None:
                cert = all(local[m].certified for m in path_members)
                got = Partial(e, v, mat + EVAL_MARGIN * auto, cert, how, auto)
        if got is None:
            b, cert, how = _fold_partial(g, reg, path_members, e, v, local, ctx, cache)
            got = Partial(e, v, b, cert, how, auto)
        if got.norm > auto:  # folding never needs to be worse than the product
            got = Partial(e, v, auto * (1 + ROUNDING_MARGIN), all(local[m].certified for m in path_members),
                          "autolip-in-region", auto)
        terms.setdefault(v, []).append(got)
        partials.append(got)
    norms.release_scratch()
    # graph-order AutoLip with the exits' relations, so that folds compound (the combinator's policy:
    # a certified value is never replaced by an uncertified one)
    relations = _relations(terms)
    cum = combine(g, local, relations)
    overrides = {v: cum[v] for v in terms}
    details = {"regions": len(regions), "partials": len(partials), "materialise_work": spent,
               "materialise_budget": budget}
    if left:
        details["folded_over_budget"] = (f"{left} partial maps were folded, not materialised: their work would "
                                         f"pass the budget {budget:.2g} (raise effort, or name the method to lift it)")
    return AffineResult(regions, partials, overrides, cum, time.perf_counter() - t0, details)


def _relations(terms: Mapping[str, list[Partial]]) -> list[Relation]:
    return [Relation(v, tuple(Term(p.entry, p.norm, p.certified) for p in ps), "affine", f"affine region exit {v}")
            for v, ps in terms.items()]


def run(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings) -> AlgorithmResult:
    """Affine-region folding as relations ``L(exit) <= sum_e ||J_{e->exit}|| L(e)``, one per region exit."""
    res = fold(g, local, settings)
    by_exit: dict[str, list[Partial]] = {}
    for p in res.partials:
        by_exit.setdefault(p.exit, []).append(p)
    records = [dataclasses.asdict(p) for p in res.partials]
    return AlgorithmResult(_relations(by_exit), records, res.seconds, res.details)
