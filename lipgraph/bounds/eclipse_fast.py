"""ECLipsE-Fast on linear chains, certified (Xu & Sivaranjani, "ECLipsE: Efficient Compositional
Lipschitz Constant Estimation for Deep Neural Networks", NeurIPS 2024).

Chain ``W_k s_k ... s_1 W_0`` with ``s_j`` slope-restricted in ``[a_j, b_j]`` (``p_j = a_j b_j``,
``m_j = (a_j + b_j)/2``). Write ``z_j = W_{j-1} v_{j-1}``, ``v_j = s_j(z_j)``, ``v_0 = x``, output ``W_k v_k``,
and ``d`` for the difference of two evaluations. Slope restriction gives, neuron by neuron,
``(dv - a dz)(b dz - dv) >= 0``, hence for any ``lambda_j >= 0``

    q_j := lambda_j (-p_j |dz_j|^2 + 2 m_j dz_j . dv_j - |dv_j|^2) >= 0.

The recursion keeps symmetric ``X_j`` with ``|dv_0|^2 >= dv_j^T X_j dv_j`` (``X_0 = I``). The step
``j - 1 -> j`` is valid whenever, for all ``dv_{j-1}, dv_j``,
``dv_{j-1}^T X_{j-1} dv_{j-1} - dv_j^T X_j dv_j - q_j >= 0``, i.e. whenever the block matrix

    B_j = [[X_{j-1} + p_j lambda_j W^T W,  -m_j lambda_j W^T],
           [-m_j lambda_j W,                lambda_j I - X_j]]      (W = W_{j-1})

is positive semidefinite. ECLipsE-Fast's closed form: ``lambda_j = 1 / (2 m_j^2 lambda_max(W X_{j-1}^{-1} W^T))``
and ``X_j`` the Schur complement ``lambda_j I - m_j^2 lambda_j^2 W M^{-1} W^T`` with
``M = X_{j-1} + p_j lambda_j W^T W`` (the paper's ReLU case ``p = 0`` has ``M = X_{j-1}``). Finally
``|W_k dv_k|^2 <= c dv_k^T X_k dv_k <= c |dv_0|^2`` when ``c X_k - W_k^T W_k`` is PSD, so ``L <= sqrt(c)``.
Nothing needs the paper's optimality argument: only the PSD facts, which are checked here.

Certification. The Schur complement makes ``B_j`` singular, so ``X_j`` is lowered by a slack
``delta lambda_j I`` (``delta`` tried from 1e-10 up to 1e-4) until a floating-point Cholesky of the
computed ``B_j`` minus a shift succeeds; the shift covers the rounding of forming ``B_j`` from the stored
floats (``X_{j-1}``, ``X_j``, ``lambda_j``, ``W``) and Demmel's Cholesky error bound
(:func:`lipgraph.norms.cholesky_shift`), so the exact ``B_j`` of those stored floats is PSD. The final
``c`` is tested the same way. Any failure (``a_j < 0`` making ``M`` indefinite, ``m_j = 0``, a
singular ``X``) returns an uncertified result with value ``inf``: the Combettes-Pesquet bound covers
those chains. The value is inflated like every chain bound (``(1 + m) v + m AutoLip``) and capped by
the certified AutoLip product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN, Settings
from ..norms import cholesky_shift
from ..ops import LocalConstant
from .chain_mats import ChainValue, autolip_chain, check, run_segments
from .relations import AlgorithmResult

SOURCE = "eclipse-fast"
U64 = 2.0**-53
#: Relative slacks of the final ``c = lambda_max (1 + delta)`` tried until ``c X - W^T W`` is proven PSD.
FINAL_SLACKS = (1e-9, 1e-7, 1e-5, 1e-3)
#: Slacks tried, relative to lambda_j, until the step's block matrix is proven PSD.
SLACKS = (1e-10, 1e-8, 1e-6, 1e-4)
_DT = torch.float64


def fro_upper(x: torch.Tensor) -> float:
    """``||x||_F`` rounded up (an upper bound on ``||x||_2``)."""
    return float(torch.linalg.matrix_norm(x, "fro")) * (1 + ROUNDING_MARGIN)


def gram_error(w: torch.Tensor) -> float:
    """Bound on ``||fl(W^T W) - W^T W||_2`` (inner dimension ``W.shape[0]``)."""
    return 4.0 * (w.shape[0] + 2) * U64 * fro_upper(w) ** 2


def certify_psd(b: torch.Tensor, err: float) -> bool:
    """True when the exact symmetric matrix ``B`` with ``||b - B||_2 <= err`` is proven PSD: a float64
    Cholesky of ``b - shift I`` succeeds, with the shift of :func:`lipgraph.norms.cholesky_shift`
    (Demmel's bound at ``2c``, ``c = min(||b||_F, ||b||_inf) >= ||b||_2``) plus ``err``."""
    if not bool(torch.isfinite(b).all()):
        return False
    n = b.shape[0]
    c = min(fro_upper(b), float(b.abs().sum(dim=1).max()) * (1 + ROUNDING_MARGIN))
    if c == 0.0:
        return err == 0.0
    # Demmel's term for 2c (the shifted matrix has norm <= c + shift <= 2c), and the rounding of the
    # shifted diagonal; err for forming b.
    shift = (2 * c - cholesky_shift(2 * c, err, n, False)) * (1 + ROUNDING_MARGIN)
    if not shift < c:
        return False
    m = b.clone()
    m.diagonal().sub_(shift)
    _, info = torch.linalg.cholesky_ex(m)
    return int(info) == 0


def _step_block(x_prev: torch.Tensor, w: torch.Tensor, lam: float, x_new: torch.Tensor, m: float,
                p: float) -> tuple[torch.Tensor, float]:
    """The computed ``B_j`` and a bound on its distance to the exact one."""
    n_in, n_out = w.shape[1], w.shape[0]
    tl = x_prev.clone()
    err = 0.0
    if p != 0.0:
        g = w.T @ w
        tl = tl + (p * lam) * g
        err += abs(p * lam) * (gram_error(w) + 3 * U64 * fro_upper(g)) + U64 * fro_upper(tl)
    ml = m * lam
    off = -ml * w
    err += 2 * 3 * U64 * abs(ml) * fro_upper(w)
    br = -x_new.clone()
    br.diagonal().add_(lam)
    err += U64 * fro_upper(br)
    b = torch.empty(n_in + n_out, n_in + n_out, dtype=_DT)
    b[:n_in, :n_in] = tl
    b[:n_in, n_in:] = off.T
    b[n_in:, :n_in] = off
    b[n_in:, n_in:] = br
    return b, 2 * err * (1 + ROUNDING_MARGIN)


def certify_output_gain(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float] | str:
    """The last step of a forward recursion ``|dv_0|^2 >= dv^T X dv``: a certified ``c`` with
    ``c X - W^T W`` proven PSD (so ``|W dv|^2 <= c |dv_0|^2``) and the slack ``delta`` of
    ``c = lambda_max(W X^-1 W^T) (1 + delta)`` it took; or why there is none."""
    r, info = torch.linalg.cholesky_ex(x)
    if int(info) != 0:
        return "the last X is not positive definite"
    y = torch.linalg.solve_triangular(r, w.T, upper=False)  # R^-1 W^T: ||.||^2 = lambda_max(W X^-1 W^T)
    est = float(torch.linalg.eigvalsh(y.T @ y).max())
    if not (est >= 0 and math.isfinite(est)):
        return "the final eigenvalue is not finite"
    g = w.T @ w
    for delta in FINAL_SLACKS:
        c = est * (1 + delta)
        f = c * x - g
        err = (gram_error(w) + U64 * c * fro_upper(x) + U64 * fro_upper(f)) * 2 * (1 + ROUNDING_MARGIN)
        if certify_psd(f, err):
            return c, delta
    return "the final matrix c X - W^T W was not proven PSD"


def eclipse_fast_chain(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> ChainValue:
    """Certified ECLipsE-Fast bound on ``W_k s_k ... s_1 W_0`` (see the module docstring)."""
    t0 = time.perf_counter()
    mats = [w.detach().to(_DT) for w in mats]
    check(mats, slopes)
    auto = autolip_chain(mats, slopes)

    def fail(why: str) -> ChainValue:
        return ChainValue(math.inf, False, f"ECLipsE-Fast not certified: {why}", time.perf_counter() - t0)

    if len(mats) == 1:
        return ChainValue(auto, math.isfinite(auto), "single matrix: certified norm", time.perf_counter() - t0)
    x = torch.eye(mats[0].shape[1], dtype=_DT)
    used = []
    for j, (w, (a, b)) in enumerate(zip(mats[:-1], slopes, strict=True)):
        p, m = a * b, (a + b) / 2
        if m == 0.0:
            return fail(f"activation {j + 1} has slope interval centred at 0")
        r, info = torch.linalg.cholesky_ex(x)
        if int(info) != 0:
            return fail(f"X_{j} is not positive definite")
        z = torch.linalg.solve_triangular(r, w.T, upper=False)
        k_mat = z.T @ z
        kmax = float(torch.linalg.eigvalsh(k_mat).max())
        if not kmax > 0.0:
            return fail(f"W_{j} X^-1 W_{j}^T vanishes")
        lam = 1.0 / (2 * m * m * kmax)
        mm = x + (p * lam) * (w.T @ w) if p != 0.0 else x
        rm, info = torch.linalg.cholesky_ex(mm)
        if int(info) != 0:
            return fail(f"X_{j} + p lambda W^T W is not positive definite (slope interval [{a}, {b}])")
        zm = torch.linalg.solve_triangular(rm, w.T, upper=False)
        schur = -(m * m * lam * lam) * (zm.T @ zm)
        schur = (schur + schur.T) / 2
        schur.diagonal().add_(lam)
        for delta in SLACKS:
            x_new = schur.clone()
            x_new.diagonal().sub_(delta * lam)
            blk, err = _step_block(x, w, lam, x_new, m, p)
            if certify_psd(blk, err):
                used.append(delta)
                break
        else:
            return fail(f"step {j + 1}: block matrix not proven PSD")
        x = x_new
    gain = certify_output_gain(x, mats[-1])
    if isinstance(gain, str):
        return fail(gain)
    c, delta = gain
    value = math.sqrt(c) * (1 + ROUNDING_MARGIN) + ROUNDING_MARGIN * auto
    method = f"ECLipsE-Fast closed form, every step's PSD condition proven (slacks {max(used):g}, final {delta:g})"
    if not value < auto:
        value, method = auto, method + "; capped by the AutoLip product"
    return ChainValue(value, True, method, time.perf_counter() - t0)


def eclipse_fast_bound(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """The certified ECLipsE-Fast value of a chain (``math.inf`` when it cannot be certified)."""
    cv = eclipse_fast_chain(mats, slopes)
    return cv.value if cv.certified else math.inf


def run(graph: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """One relation ``L(last) <= ECLipsE-Fast(segment) * L(entry)`` per linear-chain segment."""
    return run_segments(graph, SOURCE, eclipse_fast_chain)


__all__ = ["FINAL_SLACKS", "SOURCE", "U64", "certify_output_gain", "certify_psd", "eclipse_fast_bound",
           "eclipse_fast_chain", "fro_upper", "gram_error", "run"]
