"""LipSDP (Neuron and Layer forms) and ECLipsE in their published formulations, solved through ``cvxpy``
(CVXOPT's interior point by default), every answer re-checked in float64 from its multipliers.

These are the peers of :mod:`lipgraph.bounds.chain_sdp` (which solves the same LipSDP-Neuron LMI with a
structured interior-point method): the modelling layer and a general solver, as the papers' code does.
A solver's number is never a bound here: its multipliers go through
:func:`lipgraph.bounds.chain_sdp.certify_multipliers`, which recomputes the smallest constant for which the
LMI holds and proves it by Cholesky factorisations with a rounding margin; a multiplier set that fails
gives no certified value.

- **LipSDP** (Fazlyab et al. 2019): ``min rho`` s.t. ``Q(rho, T) >= 0``, ``T_j = diag(t_j) >= 0``
  (Neuron) or ``t_j I`` (Layer), ``Q`` the block-tridiagonal matrix of :mod:`.chain_sdp` (the published
  matrix with the slope constraint written per activation). The forward multipliers are ``t_j / rho``.
- **ECLipsE** (Xu & Sivaranjani 2024): layer by layer, ``max s`` s.t.
  ``[[L - s W_{i+1}^T W_{i+1}, L K^1/2], [K^1/2 L, I]] >= 0``, ``L = diag(l) >= 0``,
  ``K = m^2 W_i X_{i-1}^-1 W_i^T``; then ``X_i = L - L K L`` (the authors' code, ReLU-type slopes with
  ``p = 0``). The forward multipliers are the ``l``.

Needs the optional extra: ``pip install lipgraph[sdp]`` (cvxpy and cvxopt).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import networkx as nx
import torch

from ..core import Settings
from ..errors import LipgraphError
from ..ops import LocalConstant
from .chain_mats import ChainValue, run_segments
from .chain_sdp import Slopes, certify_multipliers
from .relations import AlgorithmResult

SOURCE_LIPSDP = "lipsdp-cvxpy"
SOURCE_ECLIPSE = "eclipse-cvxpy"
#: The solver cvxpy is asked for (an interior-point method installable from pip; Clarabel was seen to use
#: over 14 GB on an 834x834 LMI, and first-order solvers return multipliers that fail the re-check).
SOLVER = "CVXOPT"
_DT = torch.float64


class SDPStackMissing(LipgraphError):
    """cvxpy (or its solver) is not installed."""


def _cvxpy():
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SDPStackMissing("the SDP methods need cvxpy and cvxopt: pip install 'lipgraph[sdp]'") from exc
    if SOLVER not in cp.installed_solvers():
        raise SDPStackMissing(f"cvxpy has no {SOLVER} solver: pip install 'lipgraph[sdp]'")
    return cp


def _interval_hulls(slopes: Slopes) -> list[tuple[float, float]]:
    out = []
    for a, b in slopes:
        out.append((float(torch.as_tensor(a).min()), float(torch.as_tensor(b).max())))
    return out


def lipsdp_cvxpy_chain(mats: Sequence[torch.Tensor], slopes: Slopes, *, layer_form: bool = False,
                       reduce_input: bool = True) -> ChainValue:
    """LipSDP on ``W_k s_k ... s_1 W_0`` through cvxpy, certified from its multipliers.

    ``reduce_input``: replace ``W_0`` by ``U S`` of its thin SVD when the input is wider than the first
    layer (an exactly equivalent, smaller LMI; the certificate still runs on the full chain)."""
    t0 = time.perf_counter()
    cp = _cvxpy()
    import numpy as np

    ws = [w.detach().to(_DT).numpy() for w in mats]
    sl = _interval_hulls(slopes)
    k = len(ws) - 1
    if k == 0:
        return ChainValue(math.inf, False, "no activation: nothing to solve")
    first = ws[0]
    if reduce_input and first.shape[1] > first.shape[0]:
        u, s, _ = np.linalg.svd(first, full_matrices=False)
        first = u * s[None, :]
    widths = [first.shape[1]] + [w.shape[0] for w in ws[:-1]]
    rho = cp.Variable(nonneg=True)
    mult = [cp.Variable(n, nonneg=True) if not layer_form else cp.Variable(nonneg=True) for n in widths[1:]]
    blocks: list[list] = [[None] * (k + 1) for _ in range(k + 1)]
    for i in range(k + 1):
        for j in range(k + 1):
            blocks[i][j] = np.zeros((widths[i], widths[j]))
    blocks[0][0] = rho * np.eye(widths[0])
    for j in range(k):
        w = first if j == 0 else ws[j]
        a, b = sl[j]
        p, m = a * b, (a + b) / 2
        lam = cp.diag(mult[j]) if not layer_form else mult[j] * np.eye(widths[j + 1])
        if p != 0.0:
            blocks[j][j] = blocks[j][j] + p * (w.T @ lam @ w)
        off = -m * (w.T @ lam)
        blocks[j][j + 1] = off
        blocks[j + 1][j] = off.T
        blocks[j + 1][j + 1] = blocks[j + 1][j + 1] + lam
    blocks[k][k] = blocks[k][k] - ws[k].T @ ws[k]
    q = cp.bmat(blocks)
    prob = cp.Problem(cp.Minimize(rho), [(q + q.T) / 2 >> 0])
    try:
        prob.solve(solver=SOLVER)
    except Exception as exc:  # noqa: BLE001 - a solver failure is an answer, not a crash
        return ChainValue(math.inf, False, f"{SOLVER} failed: {exc}", time.perf_counter() - t0)
    if rho.value is None or not rho.value > 0:
        return ChainValue(math.inf, False, f"{SOLVER} returned no solution ({prob.status})", time.perf_counter() - t0)
    lams = []
    for j, v in enumerate(mult):
        val = np.asarray(v.value, dtype=float).reshape(-1)
        if layer_form:
            val = np.full(widths[j + 1], float(val[0]))
        lams.append(torch.from_numpy(np.maximum(val, 0.0) / float(rho.value)))
    cv = certify_multipliers(mats, slopes, lams)
    form = "Layer" if layer_form else "Neuron"
    cv.method = (f"LipSDP-{form} via cvxpy/{SOLVER} (solver value {math.sqrt(float(rho.value)):.6g}); "
                 f"{cv.method}")
    cv.seconds = time.perf_counter() - t0
    return cv


def eclipse_cvxpy_chain(mats: Sequence[torch.Tensor], slopes: Slopes) -> ChainValue:
    """ECLipsE (layer-wise SDPs, the authors' formulation) through cvxpy, certified from its multipliers.
    Slope intervals with ``a b != 0`` are outside the published formulation: no value."""
    t0 = time.perf_counter()
    cp = _cvxpy()
    import numpy as np
    from scipy.linalg import sqrtm

    ws = [w.detach().to(_DT).numpy() for w in mats]
    sl = _interval_hulls(slopes)
    if any(a * b != 0.0 for a, b in sl):
        return ChainValue(math.inf, False, "ECLipsE's published formulation needs a b = 0 (ReLU-type slopes)")
    x_prev = np.eye(ws[0].shape[1])
    lams = []
    for i in range(len(ws) - 1):
        a, b = sl[i]
        m = (a + b) / 2
        wi, wn = ws[i], ws[i + 1]
        di = wi.shape[0]
        kmat = m * m * wi @ np.linalg.solve(x_prev, wi.T)
        kmat = (kmat + kmat.T) / 2 + 1e-10 * np.eye(di)
        kh = np.real(sqrtm(kmat))
        s = cp.Variable()
        lv = cp.Variable(di, nonneg=True)
        lm = cp.diag(lv)
        schur = cp.bmat([[lm - s * (wn.T @ wn), lm @ kh], [kh @ lm, np.eye(di)]])
        prob = cp.Problem(cp.Maximize(s), [(schur + schur.T) / 2 >> 0, s >= 1e-20])
        try:
            prob.solve(solver=SOLVER)
        except Exception as exc:  # noqa: BLE001
            return ChainValue(math.inf, False, f"{SOLVER} failed at layer {i + 1}: {exc}", time.perf_counter() - t0)
        if lv.value is None:
            return ChainValue(math.inf, False, f"{SOLVER}: no solution at layer {i + 1} ({prob.status})",
                              time.perf_counter() - t0)
        lval = np.maximum(np.asarray(lv.value, dtype=float), 0.0)
        lams.append(torch.from_numpy(lval))
        lk = lval[:, None] * (m * m * wi @ np.linalg.solve(x_prev, wi.T)) * lval[None, :]
        x_prev = np.diag(lval) - lk
        x_prev = (x_prev + x_prev.T) / 2
    cv = certify_multipliers(mats, slopes, lams)
    cv.method = f"ECLipsE via cvxpy/{SOLVER}; {cv.method}"
    cv.seconds = time.perf_counter() - t0
    return cv


def run_lipsdp(graph: nx.DiGraph, local: Mapping[str, LocalConstant],
               settings: Settings | None = None) -> AlgorithmResult:
    """One relation per linear-chain segment from LipSDP-Neuron through cvxpy."""
    _cvxpy()
    return run_segments(graph, SOURCE_LIPSDP, lipsdp_cvxpy_chain)


def run_eclipse(graph: nx.DiGraph, local: Mapping[str, LocalConstant],
                settings: Settings | None = None) -> AlgorithmResult:
    """One relation per linear-chain segment from ECLipsE through cvxpy."""
    _cvxpy()
    return run_segments(graph, SOURCE_ECLIPSE, eclipse_cvxpy_chain)


__all__ = ["SOLVER", "SOURCE_ECLIPSE", "SOURCE_LIPSDP", "SDPStackMissing", "eclipse_cvxpy_chain",
           "lipsdp_cvxpy_chain", "run_eclipse", "run_lipsdp"]
