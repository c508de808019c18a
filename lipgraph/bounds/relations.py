"""Proven relations between cumulative bounds, and the one combinator that evaluates them.

The contract of a bound algorithm (one module under :mod:`lipgraph.bounds`, listed in
:data:`lipgraph.bounds.METHODS`)::

    def run(graph, local, settings) -> AlgorithmResult

``local`` maps every node name to its :class:`~lipgraph.ops.LocalConstant`; ``settings`` is the
:class:`~lipgraph.core.Settings` of the analysis. The algorithm returns *relations*
``L(v) <= sum_t factor_t * L(entry_t)``: for any valid bounds ``L(entry_t)`` on the Lipschitz constants
of input -> entry_t, the right-hand side bounds input -> v. SeqLip on a chain (one term: the chain's
entry), an affine region's folded Jacobian norms at an exit (one term per region entry) and an SDP on a
chain are such relations. A relation is certified when every factor is a proven bound; an algorithm
that only estimates returns uncertified relations, which never replace a certified value.

:func:`combine` is the only place where the AutoLip recursion is evaluated: it walks the graph once,
bounds each node by its own rule (``sum_i c_i L(u_i)``, ``l2`` for concatenation) and by every relation
ending there, each evaluated on the already-improved bounds upstream, and keeps the best one. The policy
for ``0 * inf`` and for statuses is here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .. import ir
from ..core import l2_sum
from ..ops import LocalConstant

#: The name of the node's own rule in :attr:`Cumulative.via` (AutoLip's step).
OWN_RULE = "autolip"


@dataclass(frozen=True)
class Term:
    """One term ``factor * L(entry)`` of a relation."""

    entry: str
    factor: float
    certified: bool = True


@dataclass(frozen=True)
class Relation:
    """A proven (or, if not ``certified``, estimated) relation ``L(node) <= sum_t factor_t * L(entry_t)``.

    ``source`` names the algorithm that proved it (a key of :data:`lipgraph.bounds.METHODS`);
    ``label`` says which part of the graph it covers (e.g. ``"segment fc1..fc3"``).
    """

    node: str
    terms: tuple[Term, ...]
    source: str
    label: str = ""

    @property
    def certified(self) -> bool:
        return all(t.certified for t in self.terms)


@dataclass
class AlgorithmResult:
    """What one bound algorithm returns: its relations, its records (JSON-able) and its seconds."""

    relations: list[Relation] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cumulative:
    """The bound on input -> node, whether every constant behind it is proven, and which relation gave it."""

    value: float
    certified: bool
    via: str = OWN_RULE


def times(c: float, lval: float) -> float:
    """``c * L`` with ``0 * inf = 0`` both ways: a constant input adds nothing, and neither does an input
    the node does not depend on (partial 0, e.g. a zero weight matrix after a non-Lipschitz part)."""
    return 0.0 if lval == 0.0 or c == 0.0 else c * lval


def own_rule(lc: LocalConstant, inputs: Sequence[Cumulative]) -> Cumulative:
    """AutoLip's step: a node's bound from its inputs' bounds and its own partial constants."""
    terms = [times(c, u.value) for c, u in zip(lc.partials, inputs, strict=True)]
    value = l2_sum(terms) if lc.combine == "l2" else sum(terms)
    # an input the node depends on (nonzero partial) must be proven even when its bound is 0: a user's assumed
    # constant of 0 is not a proof that the input is constant
    depends = [u for c, u in zip(lc.partials, inputs, strict=True) if c != 0.0]
    moving = any(u.value != 0.0 for u in inputs)
    certified = (lc.certified or not moving) and all(u.certified for u in depends)
    return Cumulative(value, certified)


def evaluate(relation: Relation, cum: Mapping[str, Cumulative]) -> Cumulative:
    """The right-hand side of ``relation`` on the bounds ``cum`` of its entries."""
    used = [t for t in relation.terms if cum[t.entry].value != 0.0]
    value = sum(times(t.factor, cum[t.entry].value) for t in used)
    certified = all((t.certified or cum[t.entry].value == 0.0) and (cum[t.entry].certified or t.factor == 0.0)
                    for t in relation.terms)
    return Cumulative(value, certified, relation.source)


def better(new: Cumulative, old: Cumulative) -> bool:
    """The one replacement policy: a certified value is never replaced by an uncertified one; between
    equal statuses the smaller wins (ties keep the old one, so the node's own rule wins a tie)."""
    if new.certified != old.certified:
        return new.certified
    return new.value < old.value


def combine(
    g: nx.DiGraph,
    local: Mapping[str, LocalConstant],
    relations: Iterable[Relation] = (),
    *,
    members: Iterable[str] | None = None,
    entries: Mapping[str, Cumulative] | None = None,
) -> dict[str, Cumulative]:
    """Cumulative bounds for every node: AutoLip over the DAG with every relation applied where it is tighter.

    Parameters
    ----------
    g : the IR.
    local : node name -> its local constant.
    relations : proven relations from any number of algorithms; each is evaluated on the improved
        bounds upstream (its entries precede its node in graph order).
    members, entries : restrict the walk to a sub-DAG: ``entries`` gives the bounds of the nodes where
        it is entered (e.g. ``{"e": Cumulative(1.0, True)}`` for the constant of the map e -> v), every
        other member is bounded as usual, non-members count 0. Used for module clusters and collapsed
        boxes, so those constants come from this same recursion.

    Returns
    -------
    dict of node name -> :class:`Cumulative` (``via`` names the relation's source or ``"autolip"``).
    """
    by_node: dict[str, list[Relation]] = {}
    for r in relations:
        by_node.setdefault(r.node, []).append(r)
    keep = set(members) if members is not None else None
    cum: dict[str, Cumulative] = {}
    zero = Cumulative(0.0, True)
    for n in ir.nodes(g):
        if entries is not None and n.name in entries:
            cum[n.name] = entries[n.name]
            continue
        if keep is not None and n.name not in keep:
            cum[n.name] = zero
            continue
        if n.op == "input":
            cum[n.name] = Cumulative(1.0, True) if entries is None else zero
            continue
        if n.op == "constant":
            cum[n.name] = zero
            continue
        best = own_rule(local[n.name], [cum[i] for i in n.inputs])
        for r in by_node.get(n.name, ()):
            if all(t.entry in cum for t in r.terms):
                cand = evaluate(r, cum)
                if better(cand, best):
                    best = cand
        cum[n.name] = best
    return cum


def _within(g: nx.DiGraph, r: Relation, mset: set[str]) -> bool:
    """Whether relation ``r`` holds in the sub-DAG ``mset``, whose external inputs vary independently: every
    path that reaches ``r.node`` without passing one of its entries stays inside ``mset`` (constants aside).
    A relation proves ``r.node`` a function of its entries through the nodes between them; where one of those
    lies outside (``x`` feeding a module directly and through ``h = f(x)`` computed outside it), the sub-DAG
    takes ``h`` as a separate input and the relation's constant (a derivative through ``h``) does not bound it."""
    stop = {t.entry for t in r.terms}
    seen: set[str] = set()
    stack = [r.node]
    while stack:
        for p in ir.node(g, stack.pop()).inputs:
            if p in seen or p in stop:
                continue
            seen.add(p)
            if p not in mset:
                if ir.node(g, p).op == "constant":
                    continue
                return False
            stack.append(p)
    return True


def subgraph_constant(
    g: nx.DiGraph,
    local: Mapping[str, LocalConstant],
    members: Iterable[str],
    relations: Iterable[Relation] = (),
) -> Cumulative:
    """The constant of the sub-DAG ``members``: its external inputs at 1 (constants at 0), its exits (members
    read from outside, or the model output) combined in l2; relations that hold in it are used (their entries
    inside it or among its inputs, and every node between an entry and the relation's node inside it:
    :func:`_within`). Module clusters and the renderer's boxes are bounded by this one function."""
    mset = set(members)
    order = [n for n in g.graph["order"] if n in mset]
    outside = {u for m in order for u in ir.node(g, m).inputs if u not in mset}
    entries = {u: Cumulative(0.0 if ir.node(g, u).op == "constant" else 1.0, True) for u in outside}
    inner = [r for r in relations if r.node in mset and all(t.entry in mset or t.entry in entries for t in r.terms)
             and _within(g, r, mset)]
    cum = combine(g, local, inner, members=order, entries=entries)
    exits = [m for m in order if ir.node(g, m).op == "output" or any(s not in mset for s in g.successors(m))]
    ex = [cum[e] for e in (exits or order[-1:])]
    value = ex[0].value if len(ex) == 1 else l2_sum(c.value for c in ex)
    return Cumulative(value, all(c.certified for c in ex))


__all__ = ["OWN_RULE", "AlgorithmResult", "Cumulative", "Relation", "Term", "better", "combine", "evaluate",
           "own_rule", "subgraph_constant", "times"]
