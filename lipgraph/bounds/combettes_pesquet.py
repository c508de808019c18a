"""The Combettes-Pesquet bound on linear chains, certified (Combettes & Pesquet 2020, "Lipschitz
certificates for layered network structures driven by averaged activation operators").

Chain ``W_k s_k W_{k-1} ... s_1 W_0`` (``mats[j] = W_j``; ``slopes[j-1] = [a_j, b_j]`` is the derivative
interval of ``s_j``). Every difference quotient of ``s_j`` is ``D_j = c_j I + r_j E_j`` with
``c_j = (a_j + b_j)/2``, ``r_j = (b_j - a_j)/2`` and ``E_j`` diagonal in ``[-1, 1]`` (so ``||E_j|| <= 1``;
for ReLU ``c = r = 1/2``: the activation is 1/2-averaged). Expanding the product over the subset
``S`` of positions where ``r_j E_j`` is taken, and using ``||E_j|| <= 1`` and submultiplicativity on the
blocks between consecutive cuts,

    L <= sum_{S subset {1..k}} prod_{j in S} r_j prod_{j not in S} |c_j| prod_{blocks} ||W_hi ... W_lo||

(the scalars ``c_j`` of the positions not in ``S`` are folded into the block products). This holds for any
``a_j <= b_j`` (also ``a_j < 0``, with ``|c_j|``), and it never exceeds AutoLip's
``prod ||W_j|| prod (|c_j| + r_j)``. For ReLU it is the published ``theta_k / 2^k``. The ``2^k`` subsets are
summed by a dynamic programme over the last cut: with ``F[0] = 1``,

    F[j + 1] = sum_{i=0}^{j} F[i] * (r_i if i > 0 else 1) * prod_{l=i+1}^{j} |c_l| * ||W_j ... W_i||,

and ``L <= F[k + 1]``: ``O(k^2)`` certified norms of consecutive products.

Rounding. Products ``P = W_j ... W_i`` are formed left to right in float64; the distance of the computed
product to the exact one is tracked: ``e_j = ||W_j|| e_{j-1} + gamma_n ||W_j||_F ||P_{j-1}||_F``
(``|fl(W P) - W P| <= gamma_n |W| |P|`` elementwise, ``gamma_n = n u / (1 - n u)``), so
``||W_j ... W_i|| <= dense_norm(fl(P)) + e_j`` (``dense_norm`` is certified). The DP's sums and products of
positive floats lose at most ``O(k^2 u)`` relatively and the materialisation ``O(u)`` (see
:mod:`lipgraph.bounds.chain_mats`): the value is inflated to ``v (1 + m) + m * AutoLip`` with
``m = ROUNDING_MARGIN``, then capped by the certified AutoLip product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN, Settings
from ..norms import dense_norm
from ..ops import LocalConstant
from .chain_mats import (
    ChainValue,
    autolip_chain,
    certified_norms,
    chain_flops,
    check,
    drop_dead_neurons,
    neuron_boxes,
    run_segments,
)
from .relations import AlgorithmResult

SOURCE = "combettes-pesquet"
U64 = 2.0**-53


def _gamma(n: int) -> float:
    return n * U64 / (1 - n * U64)


def product_norms(mats: list[torch.Tensor]) -> list[list[float]]:
    """``N[i][j]``: certified upper bound on ``||W_j ... W_i||_2`` for ``i <= j`` (float64, with the
    tracked rounding distance of the computed product; ``math.inf`` where a norm is not certified)."""
    k = len(mats)
    norms = certified_norms(mats)
    fro = [float(torch.linalg.matrix_norm(m, "fro")) * (1 + ROUNDING_MARGIN) for m in mats]
    out = [[math.inf] * k for _ in range(k)]
    for i in range(k):
        out[i][i] = norms[i]
        p = mats[i]
        e = 0.0
        for j in range(i + 1, k):
            w = mats[j]
            p_fro = float(torch.linalg.matrix_norm(p, "fro")) * (1 + ROUNDING_MARGIN)
            e = (norms[j] * e + _gamma(w.shape[1]) * fro[j] * p_fro) * (1 + ROUNDING_MARGIN)
            p = w @ p
            r = dense_norm(p)
            out[i][j] = (r.upper + e) * (1 + ROUNDING_MARGIN) if r.certified else math.inf
    return out


def cp_chain(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> ChainValue:
    """Certified Combettes-Pesquet bound on ``W_k s_k ... s_1 W_0`` (see the module docstring)."""
    t0 = time.perf_counter()
    mats = [m.detach().to(torch.float64) for m in mats]
    check(mats, slopes)
    auto = autolip_chain(mats, slopes)
    k = len(mats)
    if k == 1:
        return ChainValue(auto, math.isfinite(auto), "single matrix: certified norm", time.perf_counter() - t0)
    cen = [abs(a + b) / 2 for a, b in slopes]  # cen[l - 1]: |c_l|, the activation before W_l
    rad = [(b - a) / 2 for a, b in slopes]
    n = product_norms(mats)
    f = [0.0] * (k + 1)
    f[0] = 1.0
    for j in range(k):
        tot = 0.0
        for i in range(j + 1):
            term = f[i] * (rad[i - 1] if i > 0 else 1.0) * math.prod(cen[q - 1] for q in range(i + 1, j + 1))
            if term != 0.0:
                tot += term * n[i][j]
        f[j + 1] = tot
    value = f[k] * (1 + ROUNDING_MARGIN) + ROUNDING_MARGIN * auto
    method = "Combettes-Pesquet DP over cut points (certified norms of consecutive products)"
    if not value < auto:
        value, method = auto, method + "; capped by the AutoLip product"
    return ChainValue(value, math.isfinite(value), method, time.perf_counter() - t0)


def cp_bound(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """The certified Combettes-Pesquet value of a chain (``math.inf`` if some norm is not certified)."""
    cv = cp_chain(mats, slopes)
    return cv.value if cv.certified else math.inf


def cp_chain_on_domain(mats: list[torch.Tensor], slopes: Sequence[tuple[Any, Any]]) -> ChainValue:
    """:func:`cp_chain` for per-neuron slope intervals (a domain): neurons dead there are dropped (exact), then
    the programme runs on each activation's hull ``[min lo, max hi]``; the smaller of that and the unpruned hull's
    value. Scalar intervals go straight to :func:`cp_chain`."""
    if not any(isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) for a, b in slopes):
        return cp_chain(mats, list(slopes))
    mats = [w.detach().to(torch.float64) for w in mats]
    boxes = neuron_boxes(mats, slopes)
    hull = [(float(lo.min()), float(hi.max())) for lo, hi in boxes]
    whole = cp_chain(mats, hull)
    pruned = drop_dead_neurons(mats, boxes)
    if pruned is None:
        return ChainValue(0.0, True, "an activation is constant on the domain (every derivative 0)")
    kept = cp_chain(pruned[0], [(float(lo.min()), float(hi.max())) for lo, hi in pruned[1]])
    return kept if kept.value <= whole.value else whole


#: Seconds per :func:`~lipgraph.bounds.chain_mats.chain_flops` unit relative to ``CHAIN_WORK_BUDGET``'s 1e-10:
#: shufflenet_v2_x0_5's 1536-wide segments (2.17e10 flops) took 0.83 s each (idle, 2 cores).
WORK_PER_FLOP = 0.4


def work(shapes: Sequence[tuple[int, int]]) -> float:
    """Estimated cost of :func:`cp_chain_on_domain` on a chain of these ``(out, in)`` shapes (the budget's units)."""
    return WORK_PER_FLOP * chain_flops(shapes)


def run(graph: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """One relation ``L(last) <= CP(segment) * L(entry)`` per linear-chain segment."""
    return run_segments(graph, SOURCE, cp_chain_on_domain, settings=settings, work=work)


__all__ = ["SOURCE", "WORK_PER_FLOP", "cp_bound", "cp_chain", "product_norms", "run", "work"]
