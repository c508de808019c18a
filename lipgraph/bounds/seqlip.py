"""SeqLip (Virmaux & Scaman 2018) on linear-chain segments, certified.

For a chain ``f = M_K o s o ... o s o M_1`` (affine ``M_i = U_i S_i V_i^T``,
elementwise activations with derivatives in ``[a_i, b_i]``) the Jacobian is
``M_K D_{K-1} ... D_1 M_1`` with ``D_i = diag(d)``, ``d in [a_i, b_i]^n``, and

    L(f) <= prod_{i=1}^{K-1} max_{d in [a_i,b_i]^n} || S~_{i+1} V_{i+1}^T diag(d) U_i S~_i ||

with ``S~ = S`` for the first and last layer and ``S^(1/2)`` inside
(submultiplicativity; ``U_K`` and ``V_1^T`` are isometries). The inner
objective ``d -> ||A diag(d) B||`` is convex (a norm of a linear function of
``d``), so its maximum over the box is attained at a vertex: the maximum over
``{a_i, b_i}^n`` is the exact maximum over the box. Every *certified* value
here is an upper bound on that maximum:

* :func:`enumerate_max`: all ``2^n`` vertices (split into a table of the low
  bits and an outer loop on the high bits; a Frobenius prefilter skips
  patterns that cannot beat the best). Exact.
* :func:`branch_and_bound`: best-first over partial assignments with the bound
  of :func:`_node_bound`; returns the exact maximum when the search finishes,
  else the largest open upper bound (certified, not exact) when its node budget is spent.
* :func:`greedy_max` and :func:`seqlip_estimate` (top-k singular vectors) are
  *estimates*: values attained by some pattern, possibly below the maximum, so
  a product of them may fall below the true Lipschitz constant. Never used as
  certified values.

Local SeqLip (on an input domain): each neuron ``j`` of activation ``i`` has its own derivative interval
``[lo_j, hi_j]`` (a single point for a provably active or dead ReLU). The product bound above uses only
submultiplicativity and ``J = U_K S_K V_K^T D_{K-1} ... U_1 S_1 V_1^T`` with ``S = S^(1/2) S^(1/2)``; it holds
for *any* diagonal matrices ``D_i``, so the maximum of each factor may run over any set containing the
possible ``D_i``, in particular the per-neuron box ``prod_j [lo_j, hi_j]`` (:func:`inner_max_box`: its
maximum is again at a vertex, and only the unstable neurons are searched).

Rounding: SVDs are float64 and backward stable; the computed factors reproduce
each ``M_i`` to ``O(n eps ||M_i||)``, so the computed chain product is within
``O(K n eps) prod_i ||M_i||`` of the exact one. Certified chain values are
therefore inflated to ``v (1 + m) + m * prod_i ||M_i|| max|s_i'|`` with
``m = ROUNDING_MARGIN = 1e-9`` (ample for ``n <= 4096``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN, serve_cheapest
from ..norms.dense import dense_norm
from ..ops import LocalConstant, Settings
from .chain_mats import segment_shapes
from .chains import (
    MAX_DENSE,
    Segment,
    find_segments,
    group_dims,
    group_matrix,
    neuron_interval,
)
from .relations import AlgorithmResult, Cumulative, Relation, Term, combine

#: Widths up to this are solved by plain enumeration of all 2^n patterns.
ENUM_MAX_WIDTH = 12
#: Explored branch-and-bound nodes allowed to each inner maximisation in :func:`bound` (it stops there).
#: Work, not seconds, so results do not depend on machine load. Measured on the 2-core dev machine
#: (shared with other jobs, so loaded) on the LipSDP MNIST 784-50-10 network: 1750 nodes/s (3499 nodes
#: in the old 2.0 s budget, bound 24.453); the search finishes exactly (24.2992) after 14308 nodes
#: (10.0 s loaded). The old 2 s budget reached the exact value on an idle machine (>= ~7000 nodes/s),
#: so 16000 nodes is about the old 2 s on an idle machine and makes that network exact by default.
INNER_NODES = 16000
#: Largest group materialised by :func:`bound` (``analyze``); SVDs of larger matrices take seconds.
BOUND_MAX_DENSE = 2048
#: Explored branch-and-bound nodes for all segments of one model in :func:`bound`: five inner budgets,
#: like the old 10 s pass budget for 2 s inner ones (~70000 nodes at the idle rate above).
TOTAL_NODES = 5 * INNER_NODES
#: Budgets of a SeqLip pass on an input domain (it runs once per domain, after the global pass, so a tenth of
#: the global pass: mobilenet_v3_small at 64x64 spent minutes at the global budget). Local inner maxima run
#: over unstable neurons only, so on small domains most are enumerations that never reach the budget (the
#: MNIST network at l_inf radius 0.02: 5-9 unstable neurons, 0.01 s).
DOMAIN_INNER_NODES = INNER_NODES // 4
#: A domain pass skips segments with more unstable neurons than this in one activation run: branch and bound
#: over that many free slopes on wide layers rarely finishes (the head of mobilenet_v3_small on the box [0,1],
#: 1024 unstable hardswish neurons between 576x1024 and 1024x1000 matrices, spent minutes), and the domain's
#: per-node constants and the other algorithms' relations still bound the segment.
DOMAIN_MAX_UNSTABLE = 64
DOMAIN_TOTAL_NODES = TOTAL_NODES // 10
#: Work of one ``analyze`` pass (``method="auto"``) as :func:`dense_work` estimates it from shapes (the segments'
#: SVDs and inner node budgets): the segments are served cheapest first, the others keep AutoLip and are
#: recorded as skipped. Counted, never timed. Measured (idle, 2 cores; about 1.6e10 a second): inception_v3 at
#: 80x80 has 2.1e11 of it (51 segments with SVDs of 1152-1728-wide groups, 13 s for 923.0 alone),
#: shufflenet_v2_x0_5 at 64x64 9.2e10 (5.1 s for 147.9 alone, every segment served), resnet18 4.5e10 (3.2 s).
#: ``analyze`` with methods named explicitly lifts it (``Settings.extra["seqlip_work"] = inf``); ``effort``
#: scales it.
DENSE_WORK = 9.5e10
#: Work of the inner maximisations of an ``analyze`` pass, in units of ``(p + q)^3`` per node (the eigenvalue
#: solve of a node's ``(p + q)``-square quadratic bound, which dominates a node's cost): ``INNER_NODES`` nodes of
#: the LipSDP MNIST network's inner problem (``p + q = 60``), so that network keeps its full, exact search. A
#: node of the digits example's CNN (``p + q = 320``, untrained, seed 0) costs about 150 of those: its SeqLip
#: pass took 392 s for 0.643 with a flat node count, 13 s for 0.646 with this one (LipSDP: 0.414 in 22 s).
INNER_WORK = INNER_NODES * 60**3
#: Smallest node budget an inner maximisation gets once the pass budget is nearly spent (was 0.05 s).
MIN_INNER_NODES = 64
#: Inner problems ``A diag(d) B`` with ``rows(A) * cols(B) * min(rows, cols)`` above this get only the root
#: bound of the branch and bound (one node, certified): on the width-1000 random chain of the chain benchmark
#: one node costs 0.8 s (1 thread) and 1, 10 and 30 nodes all gave the root's 2.4293, so the pass budget would
#: buy hours and nothing else. At 512^3 shufflenet_v2_x0_5's three 384-wide inner problems (384^3) and
#: inception_v3's two 448-wide ones at 64x64 / 80x80 each spent 64 nodes and 1.1 s to end at their root's bound
#: (0.48191, 0.58233, 0.49238; 0.28766, 0.26917: equal), so 320^3: every chain of the benchmark up to width 256
#: and the digits CNN (``p + q = 320``) keep their full search; SeqLip on the two models 9.3 s -> 5.1 s and
#: 16.1 s -> 13.0 s, the same bounds (147.93, 923.02).
WIDE_INNER_WORK = 320**3
#: Branch and bound tries a heuristic completion of a new node's free slopes (a lower bound) at every this
#: many explored nodes. On the LipSDP MNIST network's inner maximum a completion at every node improved the
#: best pattern 9 times in 14,327 tries and took a fifth of the search; every 16th node finds the same
#: optimum after the same 14,308 nodes.
COMPLETION_EVERY = 16
#: Low bits tabulated by the enumeration (2^LO_BITS matrices per batch).
LO_BITS = 11
_DT = torch.float64


@dataclass
class InnerMax:
    """Result of ``max_{d in {a,b}^n} ||A diag(d) B||``.

    ``value``: the result (a certified upper bound when ``certified``, else an
    estimate); ``lower``: a value attained by ``pattern``; ``exact``: the
    maximum was found and proven.
    """

    value: float
    lower: float
    certified: bool
    exact: bool
    method: str
    seconds: float = 0.0
    nodes: int = 0
    pattern: torch.Tensor | None = None


def spectral_norms(x: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a batch ``(..., p, q)`` (float64, via the smaller Gram)."""
    p, q = x.shape[-2], x.shape[-1]
    if min(p, q) == 0:
        return torch.zeros(x.shape[:-2], dtype=x.dtype)
    if p == 1 or q == 1:
        return x.flatten(-2).norm(dim=-1)
    gram = x @ x.mT if p <= q else x.mT @ x
    if gram.shape[-1] == 2:
        a, b, d = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
        lam = 0.5 * (a + d) + torch.sqrt(0.25 * (a - d) ** 2 + b * b)
    else:
        lam = torch.linalg.eigvalsh(gram)[..., -1]
    return lam.clamp_min(0).sqrt()


def _norms_above(x: torch.Tensor, best: float) -> torch.Tensor:
    """Spectral norms of a batch, exact where they may exceed ``best``: with ``G = X X^T``,
    ``||X||^4 = lambda_max(G)^2 <= ||G^2||_F = (sum lambda_i^4)^(1/2)``; only matrices whose bound
    exceeds ``best`` get an eigenvalue solve, the others get their (smaller) bound's floor ``-1``."""
    p, q = x.shape[-2], x.shape[-1]
    if min(p, q) <= 2 or best <= 0:
        return spectral_norms(x)
    gram = x @ x.mT if p <= q else x.mT @ x
    g2 = gram @ gram
    ub = (g2 * g2).sum((-2, -1)).sqrt().sqrt().sqrt()
    out = torch.full(x.shape[:-2], -1.0, dtype=x.dtype)
    keep = ub >= best * (1 - 1e-9)
    if bool(keep.any()):
        out[keep] = torch.linalg.eigvalsh(gram[keep])[..., -1].clamp_min(0).sqrt()
    return out


def _norm(x: torch.Tensor) -> float:
    return float(spectral_norms(x)) if x.numel() else 0.0


#: Matrices whose smaller side is wider than this get the certified norm of :mod:`lipgraph.norms` where an upper
#: bound is what is needed (:func:`_norm_bounds`): the float64 Gram matrix, a Lanczos estimate and one Cholesky
#: test, not all of the Gram matrix's eigenvalues. inception_v3 at 80x80 has 20 such matrices 1000-1728 wide
#: (its SeqLip segments' end matrices and wide roots): eigenvalues took 0.1-0.25 s each, 2.7 s of its 6.3 s
#: SeqLip pass; the certificate 0.05-0.19 s (idle, 2 threads).
CERTIFIED_NORM_MIN = 512
#: ... with the certificate at most this far (relative, on ``||X||^2``) above the Lanczos estimate: on those 20
#: matrices every first test passed, each upper value 5.0e-8 above the eigenvalue solver's norm.
NORM_DELTA = 1e-7


def _norm_bounds(x: torch.Tensor) -> tuple[float, float]:
    """``(upper, lower)`` on ``||X||_2``: ``upper`` certified (for the AutoLip caps and triangle bounds),
    ``lower`` attained by a vector (float64). Both the eigenvalue solver's value up to ``CERTIFIED_NORM_MIN``
    on the smaller side; above it :func:`lipgraph.norms.dense.dense_norm` (its Cholesky certificate and the
    Lanczos estimate's square root)."""
    if min(x.shape[-2:], default=0) <= CERTIFIED_NORM_MIN:
        v = _norm(x)
        return v, v
    r = dense_norm(x, delta=NORM_DELTA)
    return r.upper, r.lower


@contextmanager
def _single_thread(enabled: bool = True) -> Iterator[None]:
    """Run small dense linear algebra on one thread: on a loaded machine, thread start-up and
    contention make 100x100 eigenproblems ~100x slower with several threads."""
    old = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _masks(bits: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    idx = torch.arange(start, start + (count if count is not None else 2**bits), dtype=torch.int64)
    return ((idx[:, None] >> torch.arange(bits)) & 1).to(_DT)


def _enumerate_max_impl(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
                  base: torch.Tensor | None = None, max_masks: int | None = None) -> InnerMax:
    """Exact ``max_{d in {lo,hi}^n} ||base + A diag(d) B||`` by enumerating the 2^n vertices.

    ``M(S) = base + lo A B + (hi - lo) sum_{j in S} a_j b_j^T``. The sums over the
    low ``LO_BITS`` coordinates are tabulated once; the outer loop over the high
    coordinates adds them to one matrix, and only patterns whose Frobenius norm
    (``>= ||.||_2``) exceeds the best value so far get an eigenvalue solve.
    Certified and exact (up to rounding). With ``max_masks`` (a number of
    patterns, counted in whole batches of ``2^LO_BITS``) it may stop early: the
    result is then the best pattern seen, an estimate (``certified=False``).
    """
    t0 = time.perf_counter()
    a_mat, b_mat = a_mat.to(_DT), b_mat.to(_DT)
    p, n = a_mat.shape
    q = b_mat.shape[1]
    c0 = lo * (a_mat @ b_mat)
    if base is not None:
        c0 = c0 + base.to(_DT)
    rank1 = (hi - lo) * torch.einsum("pj,jq->jpq", a_mat, b_mat).reshape(n, p * q)
    nlo = min(n, LO_BITS)
    nhi = n - nlo
    table = _masks(nlo) @ rank1[:nlo]  # (2^nlo, p*q)
    table_n2 = (table * table).sum(1)
    best, best_pat, done = -1.0, None, True
    for h in range(2**nhi):
        if max_masks is not None and h and h * table.shape[0] >= max_masks:
            done = False
            break
        hbits = _masks(nhi, h, 1)[0] if nhi else torch.zeros(0, dtype=_DT)
        c = c0.reshape(-1) + (hbits @ rank1[nlo:] if nhi else 0.0)
        fro2 = (c @ c) + 2.0 * (table @ c) + table_n2
        cand = torch.nonzero(fro2 >= best * best * (1 - 1e-9) - 1e-300).flatten() if best >= 0 else \
            torch.arange(table.shape[0])
        if cand.numel() == 0:
            continue
        vals = _norms_above((c[None, :] + table[cand]).reshape(-1, p, q), best)
        k = int(torch.argmax(vals))
        if float(vals[k]) > best:
            best = float(vals[k])
            lo_bits = _masks(nlo, int(cand[k]), 1)[0]
            best_pat = torch.cat([lo_bits, hbits]).bool()
    best = max(best, 0.0)
    if not done:  # the best pattern seen so far: attained, not a bound
        return InnerMax(best, best, False, False,
                        f"enumeration stopped after {max_masks} patterns (estimate, not certified)",
                        time.perf_counter() - t0, 0, best_pat)
    return InnerMax(best * (1 + ROUNDING_MARGIN), best, True, True, "enumeration", time.perf_counter() - t0, 2**n,
                    best_pat)


def _alternating_completion(n_mat: torch.Tensor, a_r: torch.Tensor, b_r: torch.Tensor, h: float,
                            iters: int = 2) -> tuple[float, torch.Tensor]:
    """A good vertex for the free coordinates: t_j = sign((A^T u)_j (B v)_j) for the top singular pair
    (u, v) of the current matrix, iterated. Returns the attained norm and t (a lower bound)."""
    m = n_mat
    t = torch.ones(a_r.shape[1], dtype=_DT)
    best, best_t = -1.0, t
    for _ in range(iters):
        if min(m.shape) <= 256:
            u, _, vh = torch.linalg.svd(m, full_matrices=False)
            u0, v0 = u[:, 0], vh[0]
        else:  # top singular pair by power iteration (only a heuristic completion: any pair is sound)
            v0 = torch.ones(m.shape[1], dtype=_DT) / math.sqrt(m.shape[1])
            for _ in range(30):
                v0 = m.T @ (m @ v0)
                v0 = v0 / v0.norm().clamp_min(1e-300)
            u0 = m @ v0
            u0 = u0 / u0.norm().clamp_min(1e-300)
        t = torch.sign((a_r.T @ u0) * (b_r @ v0))
        t[t == 0] = 1.0
        m = n_mat + h * (a_r * t) @ b_r
        val = _norm(m)
        if val > best:
            best, best_t = val, t
    return best, best_t


def _branch_and_bound_impl(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
                           max_nodes: int = INNER_NODES, leaf_width: int = 10, max_open: int | None = None,
                           base: torch.Tensor | None = None, norm_ab: float | None = None) -> InnerMax:
    """``max_{d in {lo,hi}^n} ||base + A diag(d) B||`` by best-first branch and bound (certified).

    Write ``d_j = c + h t_j``, ``c = (lo+hi)/2``, ``h = (hi-lo)/2``, ``t in {-1,1}^n``.
    Coordinates are fixed in decreasing order of ``||a_j|| ||b_j||``. A node fixes
    ``t_j`` for ``j < k`` and holds ``N = base + c A B + h sum_{j<k} t_j a_j b_j^T`` (``base = 0`` when
    not given: it only shifts the root; every bound below holds for any ``N``); for
    any free ``t_R in [-1,1]^R``

        ||N + h A_R diag(t_R) B_R|| <= ||N|| + h min(||A_R|| ||B_R||, sum_{j in R} ||a_j|| ||b_j||)

    (triangle inequality, submultiplicativity). Nodes with at most ``leaf_width``
    free coordinates are solved exactly by :func:`enumerate_max`. The result is
    the maximum found when the search completes (exact), else the largest open
    bound when ``max_nodes`` nodes have been explored (or more than ``max_open`` are open): a certified
    upper bound. Both stops count work, so the result is the same at any machine load; the search order
    compares bounds that come out of float64 norms, so it is bit-identical whenever those norms are
    (single-threaded small matrices; for large ones BLAS threading could in principle change last bits).
    ``norm_ab``: ``||A|| ||B||`` when the caller has it (a SeqLip pair's factors have the norms of its
    matrices or their square roots), in place of two eigenvalue solves of the root's triangle bound.
    """
    t0 = time.perf_counter()
    lo, hi = min(lo, hi), max(lo, hi)  # the same vertex set; the bounds below need h >= 0
    a_mat, b_mat = a_mat.to(_DT), b_mat.to(_DT)
    p, n = a_mat.shape
    q = b_mat.shape[1]
    c, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
    w = a_mat.norm(dim=0) * b_mat.norm(dim=1)
    order = torch.argsort(w, descending=True)
    a_mat, b_mat, w = a_mat[:, order], b_mat[order], w[order]
    wsum = torch.cat([torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0]), torch.zeros(1, dtype=_DT)])
    # ||A_R|| ||B_R|| for R = {k..n-1} at checkpoints (norms of column/row blocks decrease with k).
    checks = sorted({0, *[min(n, 2**i) for i in range(int(math.log2(max(n, 1))) + 2)],
                     *range(0, n + 1, max(1, n // 64))}) if n * p * q <= 2e7 else [0, n]
    prod_norm = {k: (norm_ab if k == 0 and norm_ab is not None
                     else _norm_bounds(a_mat[:, k:])[0] * _norm_bounds(b_mat[k:])[0])
                 if k < n else 0.0 for k in checks}

    def rad(k: int) -> float:
        kk = max(x for x in checks if x <= k)
        return h * min(prod_norm[kk], float(wsum[k]))

    # Quadratic (AM-GM) bound: P_k = sum_{j>=k} a_j a_j^T / g_j, Q_k = sum_{j>=k} g_j b_j b_j^T, at checkpoints
    # (P_k, Q_k shrink as k grows, so an earlier checkpoint is still valid).
    quad = p + q <= 1024 and n * (p * p + q * q) <= 5e7
    if quad:
        an, bn = a_mat.norm(dim=0).clamp_min(1e-300), b_mat.norm(dim=1).clamp_min(1e-300)
        gammas = [an / bn, torch.full_like(an, max(_norm(a_mat), 1e-300) / max(_norm(b_mat), 1e-300))]
        qchecks = list(range(n + 1)) if n * (p * p + q * q) <= 1e7 else checks
        pq: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for gm in gammas:
            pa = torch.einsum("pj,qj->jpq", a_mat, a_mat) / gm[:, None, None]
            qb = torch.einsum("jp,jq->jpq", b_mat, b_mat) * gm[:, None, None]
            pa = torch.flip(torch.cumsum(torch.flip(pa, [0]), 0), [0])
            qb = torch.flip(torch.cumsum(torch.flip(qb, [0]), 0), [0])
            for k in qchecks:
                pk = pa[k] if k < n else torch.zeros(p, p, dtype=_DT)
                qk = qb[k] if k < n else torch.zeros(q, q, dtype=_DT)
                pq.setdefault(k, []).append((pk, qk))

    eye = torch.eye(p + q, dtype=_DT)

    def below(z: torch.Tensor, level: float) -> bool:
        """``2 lambda_max(z) < level``, proved by a Cholesky factorisation of ``level/2 (1 - 1e-10) I - z``
        (a fifth of an eigenvalue solve at 60x60; its backward error, ``O(n u ||z||)``, is inside the
        1e-10 shift and the result's ``ROUNDING_MARGIN``)."""
        return int(torch.linalg.cholesky_ex(0.5 * level * (1 - 1e-10) * eye - z)[1]) == 0

    def node_ub(k: int, nm: torch.Tensor, best: float = 0.0) -> float:
        """max_{t_R in [-1,1]^R} ||N + h A_R diag(t_R) B_R|| <= min of: the triangle bound, and for
        |p_j q_j| <= (p_j^2 / g_j + g_j q_j^2) / 2 (any g_j > 0), 2 lambda_max([[h P/2, N/2], [N^T/2, h Q/2]]).
        A node whose first quadratic bound is proved below ``best`` gets ``best (1 - 1e-10)`` (it is pruned,
        so its exact bound is not needed); a later ``g`` gets an eigenvalue solve only where it is proved to
        improve on the bound so far. Measured on the LipSDP MNIST network's inner maximum (14,308 nodes):
        the first ``g`` gave the smaller bound at 99.3% of the nodes, and these two tests cut its time from
        18.8 s to 10.6 s (1 thread, with the sparser completions below), same nodes and value."""
        best_ub = _norm(nm) + rad(k)
        if quad:
            kk = max(x for x in pq if x <= k)
            for i, (pk, qk) in enumerate(pq[kk]):
                z = torch.cat([torch.cat([0.5 * h * pk, 0.5 * nm], 1), torch.cat([0.5 * nm.T, 0.5 * h * qk], 1)], 0)
                if i == 0 and best > 0 and below(z, best):
                    return min(best_ub, best * (1 - 1e-10))
                if i > 0 and not below(z, best_ub):
                    continue
                best_ub = min(best_ub, 2.0 * float(torch.linalg.eigvalsh(z)[-1]))
        return best_ub

    if max_open is None:
        max_open = max(64, int(2e8 / (8 * p * q)))
    n0 = c * (a_mat @ b_mat)
    if base is not None:
        n0 = n0 + base.to(_DT)
    # a search allowed only its root (wide problems, see WIDE_INNER_WORK) returns the root's bound: expanding it
    # costs two more norms for children whose bounds are the root's triangle bound again, and the completion's
    # pattern is only a hint, so it gets one round instead of three
    root_only = max_nodes <= 1
    if root_only and base is None and c != 0.0:
        # the root's bound needs ||N|| = |c| ||A B||, and the vertex with every slope at the end of larger
        # magnitude attains max(|lo|, |hi|) ||A B||: a lower value for free, where the completion's rounds cost
        # two more wide matmuls and norms (1728-wide: 0.8 of an inner problem's 1.5 s on inception_v3)
        n0_upper, n0_norm = _norm_bounds(n0)
        root_ub = node_ub(0, n0) if quad else n0_upper + rad(0)
        attained = n0_norm * max(abs(lo), abs(hi)) / abs(c)
        pattern = torch.full((n,), abs(hi) >= abs(lo), dtype=torch.bool)
        exact = root_ub <= attained * (1 + 1e-12)
        return InnerMax(max(root_ub, attained) * (1 + ROUNDING_MARGIN), attained, True, exact,
                        "branch-and-bound" if exact else
                        "branch-and-bound (root bound only: certified bound, not exact)",
                        time.perf_counter() - t0, 1, pattern)
    best, best_t = _alternating_completion(n0, a_mat, b_mat, h, iters=1 if root_only else 3)
    heap: list[tuple[float, int, int, torch.Tensor, torch.Tensor]] = []
    counter = 0
    root_ub = node_ub(0, n0)
    if root_only and root_ub > best * (1 + 1e-12):
        pattern = torch.empty(n, dtype=torch.bool)
        pattern[order] = best_t > 0
        return InnerMax(root_ub * (1 + ROUNDING_MARGIN), best, True, False,
                        "branch-and-bound (root bound only: certified bound, not exact)",
                        time.perf_counter() - t0, 1, pattern)
    heapq.heappush(heap, (-root_ub, counter, 0, n0, torch.zeros(0, dtype=_DT)))
    nodes = 0
    finished = True
    while heap:
        if -heap[0][0] <= best * (1 + 1e-12):
            heap.clear()
            break
        if nodes >= max_nodes or len(heap) > max_open:
            finished = False
            break
        neg_ub, _, k, nm, tfix = heapq.heappop(heap)
        nodes += 1
        if n - k <= leaf_width:
            # nm = base + c A B + h sum_{j<k} t_j a_j b_j^T; the leaf enumerates base' + A_R diag(d_R) B_R
            fixed = nm - c * (a_mat[:, k:] @ b_mat[k:])
            r = _enumerate_max_impl(a_mat[:, k:], b_mat[k:], lo, hi, base=fixed)
            if r.lower > best:
                best = r.lower
                best_t = torch.cat([tfix, r.pattern.to(_DT) * 2 - 1])
            continue
        for tk in (1.0, -1.0):
            child = nm + (h * tk) * torch.outer(a_mat[:, k], b_mat[k])
            tc = torch.cat([tfix, torch.tensor([tk], dtype=_DT)])
            ub = min(node_ub(k + 1, child, best), -neg_ub)  # a child's set lies inside its parent's
            if ub <= best:
                continue
            if p * q * (n - k) <= 5e6 and nodes % COMPLETION_EVERY == 0:
                val, tfree = _alternating_completion(child, a_mat[:, k + 1:], b_mat[k + 1:], h, iters=1)
                if val > best:
                    best, best_t = val, torch.cat([tc, tfree])
            counter += 1
            heapq.heappush(heap, (-ub, counter, k + 1, child, tc))
    upper = best if finished or not heap else max(best, -heap[0][0])
    pattern = torch.empty(n, dtype=torch.bool)
    if best_t.numel() == n:
        pattern[order] = best_t > 0
    return InnerMax(upper * (1 + ROUNDING_MARGIN), best, True, finished, "branch-and-bound" if finished else
                    f"branch-and-bound (stopped after {nodes} nodes: certified bound, not exact)",
                    time.perf_counter() - t0, nodes, pattern)


def inner_max(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
              max_nodes: int = INNER_NODES, norm_ab: float | None = None) -> InnerMax:
    """Certified ``max_{d in [lo,hi]^n} ||A diag(d) B||``: enumeration for n <= ENUM_MAX_WIDTH, else
    branch and bound exploring at most ``max_nodes`` nodes (``norm_ab``: ``||A|| ||B||`` if known)."""
    if hi == lo:
        v = abs(lo) * _norm(a_mat.to(_DT) @ b_mat.to(_DT))
        return InnerMax(v * (1 + ROUNDING_MARGIN), v, True, True, "constant slope")
    if a_mat.shape[0] == 1 and b_mat.shape[1] == 1:
        # Rank one on both sides: |sum_j d_j x_j| with x_j = a_j b_j is maximised coordinatewise (exact).
        x = (a_mat[0].to(_DT) * b_mat[:, 0].to(_DT))
        pos = float(torch.maximum(lo * x, hi * x).sum())
        neg = float(-torch.minimum(lo * x, hi * x).sum())
        v = max(pos, neg)
        pat = (hi * x >= lo * x) if pos >= neg else (hi * x <= lo * x)
        return InnerMax(v * (1 + ROUNDING_MARGIN), v, True, True, "closed form (rank one)", 0.0, 0, pat)
    if a_mat.shape[1] <= ENUM_MAX_WIDTH:
        return enumerate_max(a_mat, b_mat, lo, hi)
    return branch_and_bound(a_mat, b_mat, lo, hi, max_nodes, norm_ab=norm_ab)


#: A per-neuron slope interval: ``(lo, hi)`` tensors with one entry per neuron (any shape, row-major order).
NeuronInterval = tuple[torch.Tensor, torch.Tensor]


def _box_parts(a_mat: torch.Tensor, b_mat: torch.Tensor, lo_vec: torch.Tensor, hi_vec: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, A_U diag(hi - lo)_U, B_U, U)`` with ``C = A diag(lo) B`` and ``U`` the unstable neurons (``hi > lo``)."""
    a_mat, b_mat = a_mat.to(_DT), b_mat.to(_DT)
    lo_vec, hi_vec = lo_vec.to(_DT).reshape(-1), hi_vec.to(_DT).reshape(-1)
    n = a_mat.shape[1]
    if lo_vec.numel() != n or hi_vec.numel() != n or b_mat.shape[0] != n:
        raise ValueError(f"need one slope interval per neuron: {n} neurons, {lo_vec.numel()} intervals")
    if not bool(torch.isfinite(lo_vec).all() and torch.isfinite(hi_vec).all() and (lo_vec <= hi_vec).all()):
        raise ValueError("per-neuron slope intervals must be finite with lo <= hi")
    unstable = hi_vec > lo_vec
    c_mat = (a_mat * lo_vec[None, :]) @ b_mat
    return c_mat, a_mat[:, unstable] * (hi_vec - lo_vec)[unstable][None, :], b_mat[unstable], unstable


def inner_max_box(a_mat: torch.Tensor, b_mat: torch.Tensor, lo_vec: torch.Tensor, hi_vec: torch.Tensor,
                  max_nodes: int = INNER_NODES) -> InnerMax:
    """Certified ``max_{d in prod_j [lo_j, hi_j]} ||A diag(d) B||`` (per-neuron intervals: local SeqLip).

    Convex in ``d``, so the maximum is at a vertex. With ``d = lo + (hi - lo) s``, ``s in {0,1}^n``:
    ``A diag(d) B = C + A_U diag((hi - lo)_U) diag(s_U) B_U``, ``C = A diag(lo) B``, ``U`` the unstable
    neurons (``hi_j > lo_j``). So this is :func:`enumerate_max` (``|U| <= ENUM_MAX_WIDTH``: exact) or
    :func:`branch_and_bound` (exact when it finishes, else a certified bound) with ``lo = 0``, ``hi = 1``,
    ``base = C`` on the unstable columns only; both sides rank one: the closed form ``max(C + sum_j
    max(x_j, 0), -(C + sum_j min(x_j, 0)))`` with ``x_j = a_j b_j (hi_j - lo_j)`` (exact). No unstable neuron:
    the norm of ``C`` (exact). ``pattern`` has one entry per neuron (``True``: at ``hi``; stable ones ``False``).
    Rounding: ``C`` is one float64 product, within ``O(n eps ||A|| ||B|| max|d|)`` (the chain margin).
    """
    t0 = time.perf_counter()
    c_mat, a_u, b_u, unstable = _box_parts(a_mat, b_mat, lo_vec, hi_vec)
    n, k = unstable.numel(), int(unstable.sum())
    tag = f"local, {k} of {n} neurons unstable"
    if k == 0:
        v = _norm(c_mat)
        return InnerMax(v * (1 + ROUNDING_MARGIN), v, True, True, f"local: exact norm ({tag})",
                        time.perf_counter() - t0, 0, torch.zeros(n, dtype=torch.bool))
    if c_mat.shape == (1, 1):
        x = a_u[0] * b_u[:, 0]
        c0 = float(c_mat[0, 0])
        pos, neg = c0 + float(x.clamp_min(0).sum()), -(c0 + float(x.clamp_max(0).sum()))
        v = max(pos, neg, 0.0)
        sub = x > 0 if pos >= neg else x < 0
        r = InnerMax(v * (1 + ROUNDING_MARGIN), v, True, True, "closed form (rank one)", 0.0, 0, sub)
    elif k <= ENUM_MAX_WIDTH:
        r = enumerate_max(a_u, b_u, 0.0, 1.0, base=c_mat)
    else:
        r = branch_and_bound(a_u, b_u, 0.0, 1.0, max_nodes, base=c_mat)
    pattern = torch.zeros(n, dtype=torch.bool)
    if r.pattern is not None and r.pattern.numel() == k:
        pattern[unstable] = r.pattern.bool()
    return InnerMax(r.value, r.lower, r.certified, r.exact, f"local {r.method} ({tag})",
                    time.perf_counter() - t0, r.nodes, pattern)


def greedy_max_box(a_mat: torch.Tensor, b_mat: torch.Tensor, lo_vec: torch.Tensor, hi_vec: torch.Tensor,
                   max_iter: int = 1000) -> InnerMax:
    """ESTIMATE: :func:`greedy_max` on the unstable neurons of a per-neuron box (see :func:`inner_max_box`)."""
    c_mat, a_u, b_u, unstable = _box_parts(a_mat, b_mat, lo_vec, hi_vec)
    if not bool(unstable.any()):
        v = _norm(c_mat)
        return InnerMax(v, v, False, False, "local greedy (estimate)", 0.0, 0, torch.zeros_like(unstable))
    r = greedy_max(a_u, b_u, 0.0, 1.0, max_iter, base=c_mat)
    return InnerMax(r.value, r.lower, False, False, "local " + r.method, r.seconds, 0, r.pattern)


def _greedy_max_impl(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
                     max_iter: int = 1000, base: torch.Tensor | None = None) -> InnerMax:
    """ESTIMATE (the published greedy SeqLip): start from d = hi everywhere and flip the single coordinate
    that increases ``||base + A diag(d) B||`` most, until none does (or after ``max_iter`` flips). Returns an
    attained value: it may be below the maximum, so it is not certified."""
    t0 = time.perf_counter()
    a_mat, b_mat = a_mat.to(_DT), b_mat.to(_DT)
    p, n = a_mat.shape
    q = b_mat.shape[1]
    rank1 = (hi - lo) * torch.einsum("pj,jq->jpq", a_mat, b_mat)
    on = torch.ones(n, dtype=torch.bool)
    m = hi * (a_mat @ b_mat)
    if base is not None:
        m = m + base.to(_DT)
    cur = _norm(m)
    chunk = max(1, int(2e7 // max(p * q, 1)))
    for _ in range(max_iter):
        sign = torch.where(on, -1.0, 1.0).to(_DT)
        vals = torch.cat([spectral_norms(m[None] + sign[i:i + chunk, None, None] * rank1[i:i + chunk])
                          for i in range(0, n, chunk)])
        j = int(torch.argmax(vals))
        if float(vals[j]) <= cur * (1 + 1e-12):
            break
        m = m + sign[j] * rank1[j]
        on[j] = ~on[j]
        cur = _norm(m)
    return InnerMax(cur, cur, False, False, "greedy (estimate)", time.perf_counter() - t0, 0, on)


def _small(a_mat: torch.Tensor, b_mat: torch.Tensor) -> bool:
    return max(a_mat.shape[0], b_mat.shape[1]) <= 512


def enumerate_max(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
                  base: torch.Tensor | None = None, max_masks: int | None = None) -> InnerMax:
    with _single_thread(_small(a_mat, b_mat)):
        return _enumerate_max_impl(a_mat, b_mat, lo, hi, base, max_masks)


def branch_and_bound(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
                     max_nodes: int = INNER_NODES, leaf_width: int = 10, max_open: int | None = None,
                     base: torch.Tensor | None = None, norm_ab: float | None = None) -> InnerMax:
    with _single_thread(_small(a_mat, b_mat)):
        return _branch_and_bound_impl(a_mat, b_mat, lo, hi, max_nodes, leaf_width, max_open, base, norm_ab)


def greedy_max(a_mat: torch.Tensor, b_mat: torch.Tensor, lo: float, hi: float,
               max_iter: int = 1000, base: torch.Tensor | None = None) -> InnerMax:
    with _single_thread(_small(a_mat, b_mat)):
        return _greedy_max_impl(a_mat, b_mat, lo, hi, max_iter, base)


enumerate_max.__doc__ = _enumerate_max_impl.__doc__
branch_and_bound.__doc__ = _branch_and_bound_impl.__doc__
greedy_max.__doc__ = _greedy_max_impl.__doc__


# --- chains -------------------------------------------------------------------------


@dataclass
class WorkBudget:
    """Branch-and-bound nodes left to a SeqLip pass (shared by its segments; counted, never timed)."""

    left: int


@dataclass
class ChainBound:
    """SeqLip on one chain of dense matrices: ``value`` (certified iff ``certified``), the per-activation
    inner results, and ``autolip`` = prod ||M_i|| prod max|s_i'| for comparison."""

    value: float
    certified: bool
    method: str
    autolip: float
    inner: list[InnerMax] = field(default_factory=list)
    seconds: float = 0.0


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m.to(_DT), full_matrices=False)
    keep = s > s[0] * 1e-13 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    if not bool(keep.any()):
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep[:1] = True
    return u[:, keep], s[keep], vh[keep]


def _first_factor(m: torch.Tensor) -> torch.Tensor:
    """``B`` with ``||A D B|| = ||A D M||`` for every ``A D`` and the fewest columns: ``M`` itself when it is not
    wider than tall, else ``R^T`` from the QR factorisation ``M^T = Q R`` (``M = R^T Q^T``, and ``Q^T`` has
    orthonormal rows). ``U S`` of the SVD is another such factor; both are ``M`` times an isometry, so every
    quantity of the inner maximisation (norms, row norms of ``B``) is the same, at a fraction of an SVD's cost."""
    m = m.to(_DT)
    if m.shape[1] <= m.shape[0]:
        return m
    return torch.linalg.qr(m.mT, mode="r")[1].mT


def _last_factor(m: torch.Tensor) -> torch.Tensor:
    """``A`` with ``||A D B|| = ||M D B||``: ``M`` when it is not taller than wide, else ``R`` of ``M = Q R``
    (``S V^T`` of the SVD is ``U^T M``, another such factor: the same column norms and products)."""
    m = m.to(_DT)
    if m.shape[0] <= m.shape[1]:
        return m
    return torch.linalg.qr(m, mode="r")[1]


def inner_factors(mats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The SeqLip pairs ``(A_i, B_i) = (S~_{i+1} V_{i+1}^T, U_i S~_i)`` for i = 0..K-2 (``V^T``, not ``V``).
    The inner matrices need their SVDs (the ``S^(1/2)`` split); the first and last ones enter whole, so any
    factor equal to them up to an isometry serves (:func:`_first_factor`, :func:`_last_factor`: the matrix
    itself or a triangular factor of its QR). Two 2048-square float64 SVDs took 5 s of resnet18's SeqLip pass;
    inception_v3's 4-matrix runs spent 16 s in SVDs, half of them of end matrices."""
    return _factors_and_inner_norms(mats)[0]


def _factors_and_inner_norms(mats: list[torch.Tensor]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                  dict[int, float]]:
    """:func:`inner_factors` and the inner matrices' spectral norms (their SVDs' largest singular values)."""
    k = len(mats)
    svds = {i: _svd(mats[i]) for i in range(1, k - 1)}
    pairs = []
    for i in range(k - 1):
        if i == 0:
            right = _first_factor(mats[0])
        else:
            u_i, s_i, _ = svds[i]
            right = u_i * s_i.sqrt()[None, :]
        if i + 1 == k - 1:
            left = _last_factor(mats[k - 1])
        else:
            _, s_n, vh_n = svds[i + 1]
            left = s_n.sqrt()[:, None] * vh_n
        pairs.append((left, right))
    return pairs, {i: float(sv[1][0]) if sv[1].numel() else 0.0 for i, sv in svds.items()}


def _is_neuron(slope: tuple[Any, Any]) -> bool:
    return isinstance(slope[0], torch.Tensor)


def _slope_max(slope: tuple[Any, Any]) -> float:
    """``max |d|`` over a slope interval, scalar or per neuron (0 for no neuron)."""
    if _is_neuron(slope):
        lo, hi = slope
        return float(torch.maximum(lo.abs(), hi.abs()).max()) if lo.numel() else 0.0
    return max(abs(slope[0]), abs(slope[1]))


def seqlip_chain(mats: list[torch.Tensor], slopes: list[tuple[float, float] | NeuronInterval],
                 max_nodes: int = INNER_NODES, work: WorkBudget | None = None) -> ChainBound:
    """Certified SeqLip bound on ``M_K D_{K-1} ... D_1 M_1`` over all ``D_i = diag([a_i, b_i]^n)``.

    ``mats``: dense ``(out, in)`` matrices; ``slopes``: one interval per activation (``len(mats) - 1``),
    either scalars ``(a, b)`` (every neuron in ``[a, b]``) or per-neuron tensors ``(lo, hi)`` (neuron ``j``
    in ``[lo_j, hi_j]``, row-major order = the columns of the next matrix: local SeqLip, maximised by
    :func:`inner_max_box`). The product bound holds for any diagonal ``D_i`` (submultiplicativity on the
    ``S^(1/2)`` splits), so for any set of them, in particular per-neuron boxes;
    ``max_nodes``: branch-and-bound nodes per inner maximum; with ``work`` (a pass-wide node budget, charged with
    the nodes each inner maximum explores) at most what is left of it and at most ``INNER_WORK / (p + q)^3``
    for a ``p x n`` and ``n x q`` pair, never below ``MIN_INNER_NODES``.
    Value ``prod_i inner_max_i``, inflated for rounding (see the module docstring); capped by the
    dense AutoLip product ``prod ||M_i|| prod max(|a_i|, |b_i|)``, also certified.
    """
    t0 = time.perf_counter()
    if len(slopes) != len(mats) - 1:
        raise ValueError("need one slope interval per activation (len(mats) - 1)")
    if len(mats) == 1:
        auto_cert = _norm_bounds(mats[0].to(_DT))[0] * (1 + ROUNDING_MARGIN)
        return ChainBound(auto_cert, True, "dense certified norm", auto_cert, [], time.perf_counter() - t0)
    factors, inner_norms = _factors_and_inner_norms(mats)  # the inner matrices' norms from their SVDs
    # upper values: they enter the dense AutoLip cap and the pairs' triangle bounds (norm_ab)
    norms = [inner_norms[i] if i in inner_norms else _norm_bounds(m.to(_DT))[0] for i, m in enumerate(mats)]
    auto = math.prod(norms) * math.prod(_slope_max(s) for s in slopes)
    auto_cert = auto * (1 + ROUNDING_MARGIN) ** len(mats)
    results = []
    k = len(mats)
    for i, ((a_m, b_m), (lo, hi)) in enumerate(zip(factors, slopes, strict=True)):
        # the factors' norms: the end matrices' own, the square roots of the inner ones' (S^(1/2) splits)
        norm_ab = ((norms[i + 1] if i + 1 == k - 1 else math.sqrt(norms[i + 1]))
                   * (norms[i] if i == 0 else math.sqrt(norms[i])))
        b_i = max_nodes if work is None else max(MIN_INNER_NODES, min(max_nodes, work.left,
                                                                   INNER_WORK // (a_m.shape[0] + b_m.shape[1]) ** 3))
        if a_m.shape[0] * b_m.shape[1] * min(a_m.shape[0], b_m.shape[1]) > WIDE_INNER_WORK:
            b_i = 1
        r = (inner_max_box(a_m, b_m, lo, hi, b_i) if _is_neuron((lo, hi))
             else inner_max(a_m, b_m, lo, hi, b_i, norm_ab=norm_ab))
        if work is not None and "branch-and-bound" in r.method:
            work.left -= r.nodes
        results.append(r)
    raw = math.prod(r.lower if r.exact else r.value for r in results)
    value = raw * (1 + ROUNDING_MARGIN) + ROUNDING_MARGIN * auto
    exact = all(r.exact for r in results)
    name = "local SeqLip (per-neuron slopes on the domain)" if any(_is_neuron(s) for s in slopes) else "SeqLip"
    method = f"{name}, exact inner maxima" if exact else f"{name}, certified inner bounds (" + ", ".join(
        sorted({r.method for r in results})) + ")"
    if value > auto_cert:
        value, method = auto_cert, method + "; capped by the dense AutoLip product"
    return ChainBound(value, True, method, auto_cert, results, time.perf_counter() - t0)


def seqlip_lower_chain(mats: list[torch.Tensor], slopes: list[tuple[float, float] | NeuronInterval],
                       method: str = "greedy", topk: int | None = None) -> ChainBound:
    """ESTIMATE of SeqLip (not certified): greedy inner maxima, optionally on the top-``topk`` singular
    triplets of each matrix only (the published heuristic for large layers)."""
    t0 = time.perf_counter()
    if topk is not None:
        mats = [(lambda usv: (usv[0][:, :topk] * usv[1][:topk]) @ usv[2][:topk])(_svd(m)) for m in mats]
    norms = [_norm(m.to(_DT)) for m in mats]
    auto = math.prod(norms) * math.prod(_slope_max(s) for s in slopes)
    if len(mats) == 1:
        return ChainBound(auto, False, "estimate", auto, [], time.perf_counter() - t0)
    res = [greedy_max_box(a_m, b_m, lo, hi) if _is_neuron((lo, hi)) else greedy_max(a_m, b_m, lo, hi)
           for (a_m, b_m), (lo, hi) in zip(inner_factors(mats), slopes, strict=True)]
    label = f"greedy SeqLip{f' on top-{topk} singular vectors' if topk else ''} (ESTIMATE, not certified)"
    return ChainBound(math.prod(r.value for r in res), False, label, auto, res, time.perf_counter() - t0)


seqlip_estimate = seqlip_lower_chain


# --- segments in the IR --------------------------------------------------------------


def _members_autolip(g: nx.DiGraph, seg: Segment, local: Mapping[str, LocalConstant]) -> tuple[float, bool]:
    """AutoLip of the map entry -> last node of the segment (the combinator on the segment's members)."""
    c = combine(g, local, members=seg.nodes, entries={seg.entry: Cumulative(1.0, True)})[seg.last]
    return c.value, c.certified


def _at_hi(r: InnerMax, slope: tuple[float, float] | NeuronInterval) -> list[int] | None:
    """The neurons (flat indices) at the top of their slope interval in the maximising pattern of a
    per-neuron inner maximum (local SeqLip); None for a scalar interval or without a pattern."""
    if not _is_neuron(slope) or r.pattern is None or r.pattern.numel() != slope[0].numel():
        return None
    return [int(j) for j in torch.nonzero(r.pattern.reshape(-1)).reshape(-1)]


def segment_bound(g: nx.DiGraph, seg: Segment, local: Mapping[str, LocalConstant],
                  max_nodes: int = INNER_NODES, max_dense: int = MAX_DENSE,
                  estimate: bool = False, work: WorkBudget | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """SeqLip on one segment; groups too large to materialise (``> max_dense`` entries) split the chain
    and use the rule table's per-node norms (AutoLip) for that group and its neighbouring activations.
    With ``settings.neuron_slopes`` covering an activation run, that run's inner maximum is over its
    per-neuron box (local SeqLip, :func:`inner_max_box`), else over the scalar interval ``seg.slopes``.
    Returns the report dict ``{"nodes", "autolip", "seqlip", "certified", "method", ...}``."""
    t0 = time.perf_counter()
    auto, auto_cert = _members_autolip(g, seg, local)
    mats = [group_matrix(g, grp, max_dense) for grp in seg.groups]
    act_slopes: list[tuple[float, float] | NeuronInterval] = []
    for names, scalar in zip(seg.activations, seg.slopes, strict=True):
        box = neuron_interval(g, names, settings)
        act_slopes.append(box if box is not None else scalar)
    n_local = sum(1 for s in act_slopes if _is_neuron(s))
    value, cert = 1.0, True
    notes: list[str] = []
    inner: list[dict[str, Any]] = []
    run: list[torch.Tensor] = []
    run_slopes: list[tuple[float, float] | NeuronInterval] = []
    run_acts: list[list[str]] = []
    est_value: float | None = 1.0 if estimate else None

    def flush() -> None:
        nonlocal value, cert, est_value
        if not run:
            return
        cb = seqlip_chain(run, run_slopes, max_nodes, work)
        value *= cb.value
        cert = cert and cb.certified
        notes.append(cb.method)
        inner.extend({"width": r.pattern.numel() if r.pattern is not None else None, "value": r.value,
                      "attained": r.lower, "exact": r.exact, "method": r.method, "nodes": r.nodes,
                      "seconds": r.seconds, "activations": list(acts),
                      "at_hi": _at_hi(r, sl)}
                     for r, sl, acts in zip(cb.inner, run_slopes, run_acts, strict=True))
        if est_value is not None:
            est_value *= seqlip_lower_chain(run, run_slopes).value
        run.clear()
        run_slopes.clear()
        run_acts.clear()

    for i, (grp, m) in enumerate(zip(seg.groups, mats, strict=True)):
        if m is None:
            flush()
            out_n, in_n = group_dims(g, grp)
            gv, gc = 1.0, True
            for n in grp:
                gv *= local[n].partials[0]
                gc = gc and local[n].certified
            value *= gv
            cert = cert and gc
            if est_value is not None:
                est_value *= gv
            notes.append(f"group {grp[0]}..{grp[-1]} ({in_n}->{out_n} entries > {max_dense}) too large for "
                         f"dense SeqLip: fallback to the rule table's per-node norms "
                         f"({'certified' if gc else 'estimate'})")
            continue
        if run:
            run_slopes.append(act_slopes[i - 1])
            run_acts.append(list(seg.activations[i - 1]))
        run.append(m)
    flush()
    # Activations next to a group that was not materialised: their slope bound max(|a|, |b|), once each.
    for j, sl in enumerate(act_slopes):
        if mats[j] is None or mats[j + 1] is None:
            value *= _slope_max(sl)
            if est_value is not None:
                est_value *= _slope_max(sl)
    seq = min(value, auto) if cert and auto_cert else value
    if n_local:
        notes.insert(0, f"local: per-neuron slopes on the domain for {n_local} of {len(act_slopes)} activation runs")
    method = "; ".join(notes)
    if cert and auto_cert and auto < value:
        method += "; AutoLip product of the members is smaller"
    out: dict[str, Any] = {
        "nodes": list(seg.nodes), "autolip": auto, "seqlip": seq, "certified": bool(cert),
        "method": method, "entry": seg.entry, "groups": [list(x) for x in seg.groups],
        "slopes": [list(s) for s in seg.slopes], "inner": inner, "seconds": time.perf_counter() - t0,
        "local": n_local > 0,
    }
    if est_value is not None:
        out["greedy_estimate"] = est_value
    return out


def run(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None, *,
        max_nodes: int = INNER_NODES, max_dense: int = BOUND_MAX_DENSE, total_nodes: int = TOTAL_NODES,
        estimate: bool = False) -> AlgorithmResult:
    """SeqLip on every linear-chain segment, as relations ``L(last) <= SeqLip(segment) * L(entry)``.

    Each relation holds for single-entry single-exit chains (see :mod:`lipgraph.bounds.chains`); a segment
    gives one only when its value is certified and below the product of its members. ``max_nodes``:
    branch-and-bound nodes per inner maximisation; ``total_nodes``: nodes for all segments (later segments
    are recorded as skipped); ``max_dense``: largest group materialised. All budgets count work, never
    seconds (the records report seconds as information only). ``estimate=True`` adds the greedy SeqLip estimate
    to each segment record. With ``settings.neuron_slopes`` (per-neuron derivative intervals on an input
    domain) the inner maxima run over those boxes (local SeqLip): the relations then hold on that domain
    only (``x in D`` keeps every activation's input in its range, so each ``D_i`` lies in its box); their
    records say ``local`` and their labels ``local segment``. ``settings.extra["progress"]``, when set (by
    ``analyze``'s ``progress``), is called as ``progress(done, segments)`` as each segment begins.
    """
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    relations: list[Relation] = []
    if settings is not None and settings.neuron_slopes is not None:  # a domain pass: its own, smaller budgets
        max_nodes = min(max_nodes, DOMAIN_INNER_NODES)
        total_nodes = min(total_nodes, DOMAIN_TOTAL_NODES)
    work = WorkBudget(total_nodes)
    segments = find_segments(g)
    dense_budget = settings.extra.get("seqlip_work", DENSE_WORK) if settings is not None else DENSE_WORK
    costs = [dense_work(g, seg, max_dense) for seg in segments]
    served, spent = serve_cheapest(costs, dense_budget)  # cheapest first, then graph order
    progress = settings.extra.get("progress") if settings is not None else None
    for i, seg in enumerate(segments):
        if progress is not None:
            progress(i, len(segments))
        unstable = _most_unstable(seg, settings) if i in served else 0
        skip = None
        if i not in served:
            skip = (f"skipped: its dense work {costs[i]:.2g} would pass the pass's budget {dense_budget:.2g}, spent "
                    "on cheaper segments; AutoLip kept (raise effort, or name the method to run it anyway)")
        elif unstable > DOMAIN_MAX_UNSTABLE:
            skip = (f"skipped on the domain: {unstable} unstable neurons in one activation run "
                    f"(> {DOMAIN_MAX_UNSTABLE}), the domain's AutoLip kept")
        elif work.left <= 0:
            skip = f"skipped: SeqLip work budget ({total_nodes} nodes) spent, AutoLip kept"
        if skip is not None:
            records.append(_autolip_kept(g, seg, local, skip))
            continue
        try:
            rec = segment_bound(g, seg, local, max_nodes, max_dense, estimate, work, settings)
        except Exception as exc:  # noqa: BLE001 - a segment SeqLip cannot handle keeps its AutoLip bound
            rec = _autolip_kept(g, seg, local, f"SeqLip failed ({type(exc).__name__}: {exc}); AutoLip kept")
        records.append(rec)
        if rec["certified"] and rec["seqlip"] < rec["autolip"]:
            where = "local segment" if rec.get("local") else "segment"
            relations.append(Relation(seg.last, (Term(seg.entry, rec["seqlip"], True),), "seqlip",
                                      f"{where} {seg.nodes[0]}..{seg.last}"))
    if progress is not None:
        progress(len(segments), len(segments))
    used = sum(1 for r in records if r["certified"])
    return AlgorithmResult(relations, records, time.perf_counter() - t0,
                           {"segments": len(records), "certified_segments": used,
                            "nodes": total_nodes - work.left, "dense_work": spent, "dense_budget": dense_budget})


def _autolip_kept(g: nx.DiGraph, seg: Segment, local: Mapping[str, LocalConstant], method: str) -> dict[str, Any]:
    """The record of a segment SeqLip did not bound (skipped or failed): its members' AutoLip, uncertified as a
    SeqLip value, so it gives no relation; ``method`` says why."""
    auto, _ = _members_autolip(g, seg, local)
    return {"nodes": list(seg.nodes), "autolip": auto, "seqlip": auto, "certified": False, "method": method,
            "entry": seg.entry, "groups": [list(x) for x in seg.groups]}


def dense_work(g: nx.DiGraph, seg: Segment, max_dense: int = BOUND_MAX_DENSE) -> float:
    """Estimated work of SeqLip on ``seg`` from the IR's shapes, in the units of ``DENSE_WORK``: the SVD of each
    group matrix, ``m n min(m, n)`` multiply-adds (a group with a side larger than ``max_dense`` is not
    materialised and costs 0), for each inner maximum between two materialised groups its root's product and norm
    (``p n q + min(p, q)^2 max(p, q)``) and, when it gets more than its root bound
    (``p q min(p, q) <= WIDE_INNER_WORK``), its node budget times ``(p + q)^3 / 4`` (one eigenvalue solve
    of a node's quadratic bound, about a quarter of a multiply-add's cost per unit: shufflenet_v2_x0_5's 384-wide
    inner maxima, 64 nodes, 1.0 s each; inception_v3's 448-wide ones 1.2 s)."""
    shapes = segment_shapes(g, seg)  # (out, in) of each group
    dims = [shapes[0][1], *(n_out for n_out, _ in shapes)]
    dense = [0 < a <= max_dense and 0 < b <= max_dense for a, b in zip(dims[:-1], dims[1:], strict=True)]
    total = 0.0
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if dense[i]:
            total += float(n_in * n_out * min(n_in, n_out))
        if i + 1 < len(dense) and dense[i] and dense[i + 1]:  # the activation between groups i and i + 1
            q, n, p = min(dims[i], n_out), n_out, min(n_out, dims[i + 2])
            total += float(p * n * q + min(p, q) ** 2 * max(p, q))  # the root's product and its norm
            if p * q * min(p, q) <= WIDE_INNER_WORK:
                nodes = max(MIN_INNER_NODES, min(INNER_NODES, INNER_WORK // max((p + q) ** 3, 1)))
                total += nodes * (p + q) ** 3 / 4
    return total


def _most_unstable(seg: Segment, settings: Settings | None) -> int:
    """The largest number of unstable neurons (slope interval not a point) in one activation run of ``seg`` on
    the domain of ``settings`` (0 for a global pass)."""
    slopes = settings.neuron_slopes if settings is not None else None
    if not slopes:
        return 0
    worst = 0
    for run_names in seg.activations:
        for name in run_names:
            if name in slopes:
                lo, hi = slopes[name]
                worst = max(worst, int((hi > lo).sum()))
    return worst


def bound(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None,
          **kwargs: Any) -> tuple[Cumulative, list[dict[str, Any]], float]:
    """AutoLip with the SeqLip relations of :func:`run` applied: ``(bound at the output, records, seconds)``."""
    res = run(g, local, settings, **kwargs)
    return combine(g, local, res.relations)[g.graph["output"]], res.records, res.seconds


__all__ = [
    "DENSE_WORK", "ChainBound", "InnerMax", "WorkBudget", "bound", "dense_work", "run",
    "branch_and_bound", "enumerate_max", "greedy_max", "inner_factors",
    "inner_max", "segment_bound", "seqlip_chain", "seqlip_estimate", "seqlip_lower_chain", "spectral_norms",
]

