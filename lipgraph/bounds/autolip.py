"""AutoLip over the whole DAG (Virmaux & Scaman 2018, Alg. 1, generalised).

``L(input) = 1``, ``L(constant) = 0``, and for every other node
``L(v) = sum_i c_i L(u_i)`` (``sqrt(sum_i (c_i L(u_i))^2)`` for concatenation),
with ``c_i`` the partial constants of the node's rule. By induction each
``L(v)`` bounds the Lipschitz constant of the map input -> value of ``v``; it
is certified when every constant on the way is. A constant input contributes
nothing, even through an ``inf`` partial (``0 * inf = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from .. import ir
from ..ops import LocalConstant


@dataclass
class Cumulative:
    """The bound on input -> node, and whether every constant behind it is certified."""

    value: float
    certified: bool


def _times(c: float, lval: float) -> float:
    """c * L with 0 * inf = 0 both ways: a constant input adds nothing, and neither does an input
    the node does not depend on (partial 0, e.g. a zero weight matrix after a non-Lipschitz part)."""
    return 0.0 if lval == 0.0 or c == 0.0 else c * lval


def combine(lc: LocalConstant, inputs: list[Cumulative]) -> Cumulative:
    """One AutoLip step: a node's cumulative bound from its inputs' bounds."""
    terms = [_times(c, u.value) for c, u in zip(lc.partials, inputs, strict=True)]
    if lc.combine == "l2":
        value = math.sqrt(sum(t * t for t in terms))
    else:
        value = sum(terms)
    used = [u for c, u in zip(lc.partials, inputs, strict=True) if u.value != 0.0]
    certified = lc.certified and all(u.certified for u in used) if used else True
    return Cumulative(value, certified)


def autolip(
    g: nx.DiGraph,
    local: Mapping[str, LocalConstant],
    overrides: Mapping[str, Cumulative] | None = None,
) -> dict[str, Cumulative]:
    """Cumulative bounds for every node. ``overrides`` replaces a node's value by a
    tighter bound found elsewhere (e.g. SeqLip on the segment ending there): a certified value is
    only replaced by a smaller certified one, an uncertified value by anything certified or smaller
    (the policy of :func:`autolip_with`)."""
    overrides = overrides or {}
    cum: dict[str, Cumulative] = {}
    for n in ir.nodes(g):
        if n.op == "input":
            cum[n.name] = Cumulative(1.0, True)
        elif n.op == "constant":
            cum[n.name] = Cumulative(0.0, True)
        else:
            cum[n.name] = combine(local[n.name], [cum[i] for i in n.inputs])
        if n.name in overrides:
            o, cur = overrides[n.name], cum[n.name]
            if (o.value <= cur.value) if o.certified == cur.certified else o.certified:
                cum[n.name] = o
    return cum


@dataclass(frozen=True)
class Term:
    """One term ``factor * L(entry)`` of a proven relation ``L(v) <= sum factor * L(entry)``."""

    entry: str
    factor: float
    certified: bool


def autolip_with(
    g: nx.DiGraph,
    local: Mapping[str, LocalConstant],
    alternatives: Mapping[str, Sequence[Sequence[Term]]],
) -> dict[str, Cumulative]:
    """AutoLip where a node may also be bounded by relations ``L(v) <= sum_t factor_t L(entry_t)`` proven
    elsewhere (SeqLip on the chain ending at ``v``, an affine region's folded Jacobian norms at its exit).
    Each relation holds for *any* valid bounds of its entries, so it is evaluated on the improved bounds
    upstream (entries precede ``v``), and the smallest certified value wins (certified)."""
    cum: dict[str, Cumulative] = {}
    for n in ir.nodes(g):
        if n.op == "input":
            cum[n.name] = Cumulative(1.0, True)
            continue
        if n.op == "constant":
            cum[n.name] = Cumulative(0.0, True)
            continue
        best = combine(local[n.name], [cum[i] for i in n.inputs])
        for terms in alternatives.get(n.name, ()):
            used = [t for t in terms if cum[t.entry].value != 0.0]
            value = sum(_times(t.factor, cum[t.entry].value) for t in used)
            certified = all(t.certified and cum[t.entry].certified for t in used)
            better = value <= best.value if certified == best.certified else certified
            if better:
                best = Cumulative(value, certified)
        cum[n.name] = best
    return cum
