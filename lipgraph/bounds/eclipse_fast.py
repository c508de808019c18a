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
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN, Settings
from ..norms import cholesky_shift
from ..ops import LocalConstant
from .chain_mats import ChainValue, autolip_chain, chain_flops, check, drop_dead_neurons, neuron_boxes, run_segments
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


def pow2(x: float) -> float:
    """The power of two nearest ``x > 0`` (1.0 for 0 or non-finite)."""
    if not (x > 0 and math.isfinite(x)):
        return 1.0
    return math.ldexp(1.0, round(math.log2(x)))


class ForwardCertificate:
    """The forward recursion of the module docstring on a rescaled chain, one proven step at a time.

    ``x`` is the current ``X_j`` times ``2^-log2_scale`` (renormalised by powers of two); :meth:`step`
    takes multipliers in the current scale of ``x``; :meth:`final` returns the certified ``c`` of the
    unscaled recursion, or ``None``."""

    def __init__(self, n_in: int) -> None:
        self.x = torch.eye(n_in, dtype=_DT)
        self.log2_scale = 0  # true X_j = x * 2^log2_scale
        self.slacks: list[float] = []
        self.failure = ""

    def copy(self) -> ForwardCertificate:
        other = ForwardCertificate(0)
        other.x, other.log2_scale, other.slacks = self.x.clone(), self.log2_scale, list(self.slacks)
        return other

    def renormalize(self) -> None:
        """Divide ``x`` by the power of two nearest its largest diagonal entry (exact)."""
        d = float(self.x.diagonal().abs().max()) if self.x.numel() else 1.0
        s = pow2(d)
        if s != 1.0:
            x = self.x / s
            if torch.equal(x * s, self.x):  # exact (no entry fell into the subnormal range)
                self.x = x
                self.log2_scale += round(math.log2(s))

    def step(self, w: torch.Tensor, p: torch.Tensor, m: torch.Tensor, dp: torch.Tensor, dm: torch.Tensor,
             lam: torch.Tensor) -> bool:
        """Prove ``B_j`` PSD for multipliers ``lam`` (> 0) and move to ``X_j``; False (with ``failure``) if not."""
        x = self.x
        n_in = w.shape[1]
        lam = lam.to(_DT).clamp_min(0.0)
        if not bool(torch.isfinite(lam).all()) or not bool((lam > 0).any()):
            self.failure = "multipliers are not positive and finite"
            return False
        pl = p * lam
        ml = m * lam
        mmat = x + w.T @ (pl[:, None] * w) if bool((p != 0).any()) else x.clone()
        mmat = (mmat + mmat.T) / 2  # B uses this stored mmat; symmetrising rounds once: in the U64 term below
        r, info = torch.linalg.cholesky_ex(mmat)
        if int(info) != 0:
            self.failure = "X + W^T diag(p lambda) W is not positive definite"
            return False
        z = torch.linalg.solve_triangular(r, w.T * ml[None, :], upper=False)  # R^-1 W^T diag(m lambda)
        schur = -(z.T @ z)
        schur = (schur + schur.T) / 2
        schur.diagonal().add_(lam)
        # Rounding of forming B from the stored floats, and of the float p, m (2-norm bounds via Frobenius).
        row_sq = (w * w).sum(dim=1)
        err_tl = ((w.shape[0] + 3) * U64 * float((pl.abs() * row_sq).sum()) + float((dp * lam * row_sq).sum())
                  + 2 * U64 * fro_upper(mmat))
        off = ml[:, None] * w
        err_off = 2 * U64 * fro_upper(off) + fro_upper((dm * lam)[:, None] * w)
        for delta in SLACKS:
            x_new = schur.clone()
            x_new.diagonal().sub_(delta * lam)
            br = -x_new
            br.diagonal().add_(lam)
            b = torch.empty(n_in + w.shape[0], n_in + w.shape[0], dtype=_DT)
            b[:n_in, :n_in] = mmat
            b[:n_in, n_in:] = -off.T
            b[n_in:, :n_in] = -off
            b[n_in:, n_in:] = br
            err = 2 * (err_tl + err_off + U64 * fro_upper(br)) * (1 + ROUNDING_MARGIN)
            if certify_psd(b, err):
                self.slacks.append(delta)
                self.x = x_new
                return True
        self.failure = "a step's block matrix was not proven PSD"
        return False

    def final(self, w: torch.Tensor) -> float | None:
        """Certified ``c`` with ``|W dv_k|^2 <= c |dv_0|^2`` (unscaled), or None."""
        gain = certify_output_gain(self.x, w)
        if isinstance(gain, str):
            self.failure = gain
            return None
        c, delta = gain
        self.slacks.append(delta)
        # |dv_0|^2 >= dv^T X_true dv = 2^s dv^T x dv, and |W dv|^2 <= c dv^T x dv.
        return math.ldexp(c, -self.log2_scale)


def eclipse_fast_chain(mats: list[torch.Tensor], slopes: Sequence[tuple[Any, Any]]) -> ChainValue:
    """Certified ECLipsE-Fast bound on ``W_k s_k ... s_1 W_0`` (see the module docstring). ``slopes``: one
    interval per activation, scalars ``(a, b)`` or per-neuron tensors ``(lo, hi)`` (on a domain: then
    ``p_j, m_j`` are per neuron, ``lambda_j`` takes the largest ``|m_j|``, the step's PSD proof is the same, and
    the result is the smaller of that and the closed form on each run's hull ``[min lo, max hi]``: the closed
    form is not monotone in the intervals, so point intervals alone were seen to give 1.06 where the hull
    gave 0.69)."""
    if any(isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) for a, b in slopes):
        hull = [(float(torch.as_tensor(a).min()), float(torch.as_tensor(b).max())) for a, b in slopes]
        per_neuron, scalar = _eclipse_fast(mats, slopes), _eclipse_fast(mats, hull)
        return per_neuron if per_neuron.value <= scalar.value else scalar
    return _eclipse_fast(mats, slopes)


def _eclipse_fast(mats: list[torch.Tensor], slopes: Sequence[tuple[Any, Any]]) -> ChainValue:
    t0 = time.perf_counter()
    mats = [w.detach().to(_DT) for w in mats]
    boxes = neuron_boxes(mats, slopes) if len(slopes) == len(mats) - 1 else []
    hull = [(float(lo.min()), float(hi.max())) for lo, hi in boxes] if boxes else list(slopes)
    check(mats, hull)
    auto = autolip_chain(mats, hull)

    def fail(why: str) -> ChainValue:
        return ChainValue(math.inf, False, f"ECLipsE-Fast not certified: {why}", time.perf_counter() - t0)

    if len(mats) == 1:
        return ChainValue(auto, math.isfinite(auto), "single matrix: certified norm", time.perf_counter() - t0)
    if any(bool((lo > hi).any()) for lo, hi in boxes):
        raise ValueError("per-neuron slope intervals need lo <= hi")
    # Dead neurons (derivative 0 on the whole domain) go: kept, they would waste the closed form's multiplier.
    pruned = drop_dead_neurons(mats, boxes)
    if pruned is None:
        return ChainValue(0.0, True, "an activation is constant on the domain (every derivative 0)",
                          time.perf_counter() - t0)
    mats, boxes = pruned
    cert = ForwardCertificate(mats[0].shape[1])
    for j, (w, (lo, hi)) in enumerate(zip(mats[:-1], boxes, strict=True)):
        pv, mv = lo * hi, (lo + hi) / 2  # one rounding each
        m_max = float(mv.abs().max())
        if m_max == 0.0:
            return fail(f"activation {j + 1} has slope intervals centred at 0")
        r, info = torch.linalg.cholesky_ex(cert.x)
        if int(info) != 0:
            return fail(f"X_{j} is not positive definite")
        z = torch.linalg.solve_triangular(r, w.T, upper=False)
        kmax = float(torch.linalg.eigvalsh(z.T @ z).max())
        if not kmax > 0.0:
            return fail(f"W_{j} X^-1 W_{j}^T vanishes")
        lam = torch.full((w.shape[0],), 1.0 / (2 * m_max * m_max * kmax), dtype=_DT)
        if not cert.step(w, pv, mv, U64 * pv.abs(), U64 * mv.abs(), lam):
            return fail(f"step {j + 1}: {cert.failure} (slope interval [{hull[j][0]}, {hull[j][1]}])")
    c = cert.final(mats[-1])
    if c is None:
        return fail(cert.failure)
    value = math.sqrt(c) * (1 + ROUNDING_MARGIN) + ROUNDING_MARGIN * auto
    method = (f"ECLipsE-Fast closed form, every step's PSD condition proven (slacks {max(cert.slacks[:-1]):g}, "
              f"final {cert.slacks[-1]:g})")
    if not value < auto:
        value, method = auto, method + "; capped by the AutoLip product"
    return ChainValue(value, True, method, time.perf_counter() - t0)


def eclipse_fast_bound(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """The certified ECLipsE-Fast value of a chain (``math.inf`` when it cannot be certified)."""
    cv = eclipse_fast_chain(mats, slopes)
    return cv.value if cv.certified else math.inf


#: Seconds per :func:`~lipgraph.bounds.chain_mats.chain_flops` unit relative to ``CHAIN_WORK_BUDGET``'s 1e-10:
#: on shufflenet_v2_x0_5 (idle, 2 cores) 1.9-3.2 s for 2.17e10 flops, 2.2 s for 1.55e10, 0.4 s for 2.7e9.
WORK_PER_FLOP = 1.4


def work(shapes: Sequence[tuple[int, int]]) -> float:
    """Estimated cost of :func:`eclipse_fast_chain` on a chain of these ``(out, in)`` shapes (the budget's units)."""
    return WORK_PER_FLOP * chain_flops(shapes)


def run(graph: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """One relation ``L(last) <= ECLipsE-Fast(segment) * L(entry)`` per linear-chain segment (on a domain, with
    every neuron's slope interval there)."""
    return run_segments(graph, SOURCE, eclipse_fast_chain, settings=settings, work=work)


__all__ = ["FINAL_SLACKS", "SOURCE", "U64", "WORK_PER_FLOP", "ForwardCertificate", "certify_output_gain", "certify_psd",
           "eclipse_fast_bound", "eclipse_fast_chain", "fro_upper", "gram_error", "pow2", "run", "work"]
