"""Linear-chain segments of the IR, for SeqLip.

A *segment* is a maximal path ``G_0 s_0 G_1 s_1 ... G_{K-1}`` where each
``G_i`` is a run of single-input affine nodes (Linear, Conv, eval BatchNorm,
average pooling, reshapes, padding, constant scales: ``OpRule.affine``) and
each ``s_i`` a run of elementwise activations whose derivative lies in a known
interval ``[a, b]`` (``lipgraph.ops.slope_interval``). The segment's Jacobian
is ``M_{K-1} D_{K-2} ... D_0 M_0`` with ``M_i`` the linear part of ``G_i`` and
``D_i`` diagonal with entries in ``[a_i, b_i]`` (a run of activations has the
product interval).

Soundness of replacing AutoLip by a segment bound: every member except the
first reads exactly one tensor, the previous member, and every member except
the last is read by exactly one node, the next member (single entry, single
exit). So ``last = chain(entry)`` and no interior value is used elsewhere; a
bound on ``chain`` times AutoLip's bound at ``entry`` bounds ``last``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch

from .. import ir
from ..ops import RULES, Settings, slope_interval
from .basis import linear_part_columns

#: Ops flagged affine that are not single-tensor maps (tuple-valued or multi-input), never chain members.
_NOT_MEMBERS = frozenset({"input", "output", "constant", "split", "unbind", "tuple_getitem", "cat", "stack"})

#: Largest input/output size (entries) of an affine group that is materialised as a dense matrix.
MAX_DENSE = 4096


@dataclass
class Segment:
    """A single-entry single-exit chain ``G_0 s_0 G_1 ... G_{K-1}``.

    ``nodes``: members in order; ``entry``: the node read by the first member;
    ``groups``: the affine runs; ``activations``: the activation runs between
    them; ``slopes``: the derivative interval ``[a_i, b_i]`` of each run.
    """

    nodes: list[str]
    entry: str
    groups: list[list[str]] = field(default_factory=list)
    activations: list[list[str]] = field(default_factory=list)
    slopes: list[tuple[float, float]] = field(default_factory=list)

    @property
    def last(self) -> str:
        return self.nodes[-1]


def _is_shape(s: object) -> bool:
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


def is_affine_member(n: ir.IRNode) -> bool:
    """A single-input affine node with a tensor output (can sit inside an affine group)."""
    rule = RULES.get(n.op)
    return (
        rule is not None
        and rule.affine
        and n.op not in _NOT_MEMBERS
        and len(n.inputs) == 1
        and _is_shape(n.out_shape)
        and len(n.in_shapes) == 1
        and _is_shape(n.in_shapes[0])
    )


def is_activation(n: ir.IRNode) -> bool:
    """An elementwise activation (its rule declares a derivative interval: the registry's ``slope``
    capability, fixed or from the node's parameters) with unchanged shape."""
    return (
        len(n.inputs) == 1
        and slope_interval(n) is not None
        and _is_shape(n.out_shape)
        and len(n.in_shapes) == 1
        and tuple(n.in_shapes[0]) == tuple(n.out_shape)
    )


def product_interval(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """Hull of ``{x_1 x_2 ... : x_i in [a_i, b_i]}`` (derivative of a composition of elementwise maps)."""
    lo, hi = 1.0, 1.0
    for a, b in intervals:
        c = [lo * a, lo * b, hi * a, hi * b]
        lo, hi = min(c), max(c)
    return lo, hi


def _exact_factor(x: torch.Tensor) -> torch.Tensor:
    """Entries whose products with any float are exact (0 and +-1)."""
    return (x == 0) | (x.abs() == 1)


def product_interval_tensors(intervals: list[tuple[torch.Tensor, torch.Tensor]]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise :func:`product_interval` of per-neuron intervals ``(lo, hi)`` (same numel, flattened
    row-major; float64). Certified: a product with no factor in ``{0, +-1}`` may round, so its bounds are
    moved one ulp outward; products of ReLU slopes (0 and 1) stay exact, so stable neurons stay stable."""
    lo = torch.ones(intervals[0][0].numel(), dtype=torch.float64)
    hi = lo.clone()
    for a, b in intervals:
        a, b = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
        c = torch.stack([lo * a, lo * b, hi * a, hi * b])
        exact = (_exact_factor(lo) & _exact_factor(hi)) | (_exact_factor(a) & _exact_factor(b))
        new_lo, new_hi = c.min(0).values, c.max(0).values
        lo = torch.where(exact, new_lo, torch.nextafter(new_lo, torch.full_like(new_lo, -math.inf)))
        hi = torch.where(exact, new_hi, torch.nextafter(new_hi, torch.full_like(new_hi, math.inf)))
    return lo, hi


def _chainable(n: ir.IRNode) -> bool:
    return is_affine_member(n) or is_activation(n)


def find_segments(g: nx.DiGraph, min_nodes: int = 2) -> list[Segment]:
    """All maximal single-entry single-exit linear-chain segments, in topological order.

    A link ``u -> v`` joins two chainable nodes when ``v`` reads only ``u`` and
    ``u`` is read only by ``v``. Maximal paths of links are trimmed so they
    start and end with an affine node; those with at least ``min_nodes``
    members are returned.
    """
    order = {name: i for i, name in enumerate(g.graph["order"])}
    nxt: dict[str, str] = {}
    prv: dict[str, str] = {}
    for v in ir.nodes(g):
        if not _chainable(v):
            continue
        u = ir.node(g, v.inputs[0])
        if u.op == "input" or not _chainable(u) or g.out_degree(u.name) != 1:
            continue
        nxt[u.name] = v.name
        prv[v.name] = u.name
    segments: list[Segment] = []
    for v in ir.nodes(g):
        if not _chainable(v) or v.name in prv:
            continue
        path = [v.name]
        while path[-1] in nxt:
            path.append(nxt[path[-1]])
        while path and is_activation(ir.node(g, path[0])):
            path.pop(0)
        while path and is_activation(ir.node(g, path[-1])):
            path.pop()
        if len(path) < min_nodes:
            continue
        seg = Segment(nodes=path, entry=ir.node(g, path[0]).inputs[0])
        cur: list[str] = []
        acts: list[str] = []
        for name in path:
            if is_activation(ir.node(g, name)):
                if cur:
                    seg.groups.append(cur)
                    cur = []
                acts.append(name)
            else:
                if acts:
                    seg.activations.append(acts)
                    seg.slopes.append(product_interval([slope_interval(ir.node(g, a)) for a in acts]))
                    acts = []
                cur.append(name)
        seg.groups.append(cur)
        segments.append(seg)
    segments.sort(key=lambda s: order[s.last])
    return segments


def group_dims(g: nx.DiGraph, names: list[str]) -> tuple[int, int]:
    """(output entries, input entries) of an affine group."""
    first, last = ir.node(g, names[0]), ir.node(g, names[-1])
    return math.prod(last.out_shape), math.prod(first.in_shapes[0])


def group_matrix(g: nx.DiGraph, names: list[str], max_dense: int = MAX_DENSE) -> torch.Tensor | None:
    """The linear part of an affine group as a dense float64 ``(out, in)`` matrix, or None when
    ``max(out, in) > max_dense``. Computed as ``f(e_j) - f(0)`` on the basis vectors in float64
    (exact for an affine ``f`` up to rounding of order ``1e-16 ||f||``); when the group starts with a conv or a
    linear layer, its responses ``L e_j`` come from its weights (:func:`~lipgraph.bounds.basis.linear_part_columns`,
    exact) and only the rest of the group runs, on ``b + L e_j``."""
    n_out, n_in = group_dims(g, names)
    if max(n_out, n_in) > max_dense:
        return None
    in_shape = tuple(ir.node(g, names[0]).in_shapes[0])
    nodes64 = [ir.as_float64(ir.node(g, n)) for n in names]

    def f(x: torch.Tensor, members: list = nodes64) -> torch.Tensor:
        for nd in members:
            x = RULES[nd.op].forward(nd, x)
        return x

    with torch.no_grad():
        first = linear_part_columns(nodes64[0], in_shape)
        if first is not None and len(nodes64) == 1:
            return first.reshape(n_in, -1).T.contiguous()
        if first is not None:  # the first node's responses from its weights, then the rest run on them
            z0 = RULES[nodes64[0].op].forward(nodes64[0], torch.zeros(in_shape, dtype=torch.float64))
            def g_rest(x: torch.Tensor) -> torch.Tensor:
                return f(x, nodes64[1:])

            f0 = g_rest(z0)
            mid_n = first[0].numel()
            chunk = max(1, min(n_in, 2**22 // max(n_out, mid_n, 1)))
            inputs = [first[i:i + chunk] + z0 for i in range(0, n_in, chunk)]
            fn = g_rest
        else:
            f0 = f(torch.zeros(in_shape, dtype=torch.float64))
            chunk = max(1, min(n_in, 2**22 // max(n_out, 1)))
            eye = torch.eye(n_in, dtype=torch.float64)
            inputs = [eye[i:i + chunk].reshape(-1, *in_shape) for i in range(0, n_in, chunk)]
            fn = f
        cols = []
        for basis in inputs:
            try:
                y = torch.vmap(lambda e: fn(e) - f0)(basis)
            except Exception:  # noqa: BLE001 - an op without vmap support: one call per basis vector
                y = torch.stack([fn(e) - f0 for e in basis])
            cols.append(y.reshape(y.shape[0], -1))
        return torch.cat(cols).T.contiguous()


def neuron_interval(g: nx.DiGraph, names: list[str], settings: Settings | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-neuron derivative intervals of an activation run on the domain (``settings.neuron_slopes``),
    the elementwise interval product over the run, flattened row-major; None unless every activation of
    the run has intervals with one entry per element of its output (batch 1: ``group_matrix`` flattens the
    next group's input, the run's output, row-major, so neuron ``j`` is column ``j``)."""
    slopes = settings.neuron_slopes if settings is not None else None
    if not slopes or not all(n in slopes for n in names):
        return None
    size = math.prod(ir.node(g, names[-1]).out_shape)
    pairs = [slopes[n] for n in names]
    if any(lo.numel() != size or hi.numel() != size for lo, hi in pairs):
        return None
    return product_interval_tensors(pairs)
