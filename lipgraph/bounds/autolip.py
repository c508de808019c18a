"""AutoLip over the whole DAG (Virmaux & Scaman 2018, Alg. 1, generalised).

``L(input) = 1``, ``L(constant) = 0``, and for every other node
``L(v) = sum_i c_i L(u_i)`` (``sqrt(sum_i (c_i L(u_i))^2)`` for concatenation),
with ``c_i`` the partial constants of the node's rule. By induction each
``L(v)`` bounds the Lipschitz constant of the map input -> value of ``v``; it
is certified when every constant on the way is. A constant input contributes
nothing, even through an ``inf`` partial (``0 * inf = 0``).

AutoLip is the combinator's own rule (:func:`lipgraph.bounds.relations.combine`): as a bound algorithm
it contributes no relation of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from ..core import Settings
from ..ops import LocalConstant
from .relations import AlgorithmResult, Cumulative, combine


def autolip(g: nx.DiGraph, local: Mapping[str, LocalConstant]) -> dict[str, Cumulative]:
    """Cumulative AutoLip bounds for every node."""
    return combine(g, local)


def run(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings) -> AlgorithmResult:
    """AutoLip alone: no relation beyond each node's own rule."""
    return AlgorithmResult()


__all__ = ["Cumulative", "autolip", "run"]
