"""LipSDP-Neuron on linear chains, solved by a structured interior-point method, and certified in float64
from its multipliers (Fazlyab et al., "Efficient and accurate estimation of Lipschitz constants for deep
neural networks", NeurIPS 2019; the layer-wise ECLipsE windows of Xu & Sivaranjani, NeurIPS 2024).

**The bound.** Chain ``W_k s_k ... s_1 W_0`` (``mats[j] = W_j``), neuron ``i`` of activation ``j``
slope-restricted in ``[a_ji, b_ji]`` (``p = a b``, ``m = (a + b)/2``). With ``z_j = W_{j-1} v_{j-1}``,
``v_j = s_j(z_j)`` and ``d`` the difference of two evaluations, slope restriction gives neuron by neuron
``q_ji = -p dz^2 + 2 m dz dv - dv^2 >= 0``. For multipliers ``lambda_ji >= 0`` the forward recursion
keeps symmetric ``X_j`` with ``|dv_0|^2 >= dv_j^T X_j dv_j`` (``X_0 = I``); the step ``j - 1 -> j`` holds
whenever

    B_j = [[X_{j-1} + W^T diag(p lambda) W,  -W^T diag(m lambda)],
           [-diag(m lambda) W,               diag(lambda) - X_j]]      (W = W_{j-1})

is positive semidefinite, and ``|W_k dv_k|^2 <= c |dv_0|^2`` when ``c X_k - W_k^T W_k`` is PSD, so
``L <= sqrt(c)``. Taking ``X_j`` as the Schur complement of ``B_j`` this is exactly LipSDP-Neuron's LMI
``Q(t, y) = t E_0 + sum_a y_a A_a - F >= 0`` (``y = t lambda``, ``E_0`` the input block, ``F = W_k^T W_k``
in the last block), eliminated block by block. ECLipsE-Fast (:mod:`.eclipse_fast`) is the choice
``lambda_j`` scalar in closed form; here the multipliers are optimised.

**Certificate** (:class:`ForwardCertificate`). Whatever produced the multipliers, the value is recomputed
from them in float64: each ``X_j`` is the Schur complement lowered by a slack ``delta diag(lambda)``, and
every ``B_j`` and the final matrix are proven PSD by a shifted Cholesky factorisation that covers the
rounding of forming them from the stored floats (products, the float ``p`` and ``m``) and Demmel's
Cholesky error (:func:`lipgraph.bounds.eclipse_fast.certify_psd`). Matrices are first divided by powers of
two (exact) near their norms: slope restriction is invariant under that rescaling (``s(S z)/S`` has the
slopes of ``s``), so the chain's bound is the product of the powers times the rescaled chain's bound;
``X_j`` is renormalised by powers of two too. The value ``sqrt(c) prod 2^e`` is inflated like every chain
bound (``(1 + m) v + m AutoLip``) and capped by the certified AutoLip product. A failed factorisation gives
no certified value.

**Solver** (:func:`solve_chain_lmi`). A barrier path-following method on ``min t`` subject to
``Q(t, y) > 0``, ``y > 0`` with Newton steps in the ``1 + #neurons`` variables. Every multiplier matrix is
``A_a = U_a C_a U_a^T`` with ``U_a = [W_{j-1}^T e_i, e_i]`` (block columns) and ``C_a = [[p, -m], [-m, 1]]``,
so the barrier's Hessian ``tr(Q^-1 A_a Q^-1 A_b)`` comes from ``K = U^T Q^-1 U`` in ``O(N^3 + n^2)``
(``N`` the LMI's size, ``n`` the neurons): one dense inverse per step, no modelling layer. It stops when
the barrier's duality-gap bound ``nu mu`` is below ``GAP`` of ``t``, or after ``MAX_NEWTON`` steps (work,
not seconds). The solver's numbers never enter the value: only its multipliers do, through the certificate.

**Deep chains** (:func:`lipsdp_chain` with ``window``). When the LMI would exceed ``MAX_LMI`` rows, the
chain is cut into overlapping windows of activations: each window's SDP starts from the current ``X``
(the input metric) and, when it is not the last, takes the next matrix as if it were the output
(ECLipsE's greedy objective, over several layers at once); its first ``stride`` activations are committed
to the certificate and the window slides. ``window = 1`` is ECLipsE (layer-wise SDPs).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN, Settings
from ..ops import LocalConstant
from .chain_mats import ChainValue, autolip_chain, run_segments
from .eclipse_fast import U64, ForwardCertificate, pow2
from .relations import AlgorithmResult

SOURCE = "lipsdp"
_DT = torch.float64
#: The interior-point method stops when its gap bound ``nu mu`` is below this fraction of ``t``.
GAP = 1e-7
#: Newton steps per SDP at most (the work budget; a solve that runs out still yields its multipliers).
MAX_NEWTON = 300
#: Relative slack of the closed-form starting point (strictly inside the LMI's cone).
START_SLACK = 1e-2
#: Weights of the strictly feasible start blended into the solver's multipliers when these fail the re-check.
BLENDS = (0.0, 1e-6, 1e-4, 1e-2, 0.1)
#: Multipliers stay below this factor times the largest starting one (keeps the barrier bounded below).
Y_MAX = 30.0
#: The barrier parameter is divided by this factor after each centring.
MU_FACTOR = 8.0
#: Largest LMI solved at once (rows, the sum of the widths of its blocks); larger chains are cut into windows.
MAX_LMI = 1000
#: Chains with more activations than this are cut into windows even when their LMI fits in ``MAX_LMI`` rows:
#: windows of several thin layers are much cheaper than one deep LMI. Measured (1 thread, loaded): the width-80
#: depth-10 chain (880 rows) whole 20.02 in 34.8 s, in 400-row windows 20.61 in 6.5 s (the peer ECLipsE: 31.16
#: in 21 s); the digits CNN's two wide activations (832 rows) whole 58.88 in 18.3 s, in windows 61.25 in 19.5 s.
MAX_WHOLE_ACTIVATIONS = 8
#: Rows of each window when a chain is cut (the input block and the window's activations). Measured on the
#: shared width-80 depth-20 chain (1 thread): windows of 11 activations (the old default, 880 rows) 298.5 in
#: 81 s; 6 (480 rows) 306.7 in 28 s; 4 (400 rows) 330.4 in 14 s; 3 376.9 in 7 s; 1 (ECLipsE) 748.3 in 3 s.
#: Depth 50: 4 activations 3.31e6 in 43 s against 2.84e6 in 108 s. Width 256 depth 8 (one activation per
#: window here): 15.0 in 21 s, against 12.85 in 39 s for two.
WINDOW_LMI = 400
#: Largest one-activation window (rows) solved to convergence (a 1500-row Newton step: about 0.5 s).
MAX_WINDOW_LMI = 1500
#: Largest chain (activations x neurons per activation summed) solved to convergence in windows; larger
#: chains are solved layer by layer with a Newton budget (below).
MAX_NEURONS = 12000
#: Newton steps per window on chains beyond ``MAX_NEURONS`` or ``MAX_WINDOW_LMI``: the layer-wise scheme
#: started at ECLipsE-Fast's closed form, stopped after this many steps (any interior point is feasible, and
#: the re-check certifies it). Measured on the first four layers of the width-1000 depth-50 chain (1 thread):
#: ECLipsE-Fast 13.59 in 2.6 s; 3 steps per window 11.86 in 12 s; 8 steps 10.07 in 23 s.
BUDGET_NEWTON = 8
#: Largest one-activation window (rows) of the budgeted scheme (a 2000-row Newton step: about 0.7 s).
MAX_BUDGET_WINDOW_LMI = 2500
#: Largest chain of the budgeted scheme (the width-1000 depth-50 chain has 50,000 neurons: about 5 minutes).
MAX_BUDGET_NEURONS = 60000

Slopes = Sequence[tuple[float, float] | tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------------------------
# chain data: powers-of-two scaling and per-neuron slope coefficients


@dataclass
class _Chain:
    """A chain rescaled by powers of two: ``mats[j] = W_j / scales[j]`` exactly; ``p[j]``, ``m[j]``: per-neuron
    coefficients of activation ``j`` (``p = a b``, ``m = (a + b)/2`` in float64, with their rounding bounds
    ``dp``, ``dm``)."""

    mats: list[torch.Tensor]
    scales: list[float]
    #: The certified AutoLip product of the original chain (every value is capped by it).
    auto: float
    p: list[torch.Tensor]
    m: list[torch.Tensor]
    dp: list[torch.Tensor]
    dm: list[torch.Tensor]

    @property
    def k(self) -> int:
        return len(self.p)


def _prepare(mats: Sequence[torch.Tensor], slopes: Slopes) -> _Chain:
    mats = [w.detach().to(_DT) for w in mats]
    if len(slopes) != len(mats) - 1:
        raise ValueError("need one slope interval per activation (len(mats) - 1)")
    scaled, scales = [], []
    for w in mats:
        s = pow2(float(torch.linalg.matrix_norm(w, 2))) if w.numel() else 1.0
        if not torch.equal((w / s) * s, w):  # an entry would fall into the subnormal range: keep it unscaled
            s = 1.0
        scaled.append(w / s)  # exact: division by a power of two
        scales.append(s)
    ps, ms, dps, dms, ps_lo, ps_hi = [], [], [], [], [], []
    for j, sl in enumerate(slopes):
        n = mats[j].shape[0]
        a = torch.as_tensor(sl[0], dtype=_DT).expand(n).clone()
        b = torch.as_tensor(sl[1], dtype=_DT).expand(n).clone()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and bool((a <= b).all())):
            raise ValueError(f"bad slope interval for activation {j + 1}")
        ps_lo.append(a)
        ps_hi.append(b)
        p = a * b
        m = (a + b) / 2
        ps.append(p)
        ms.append(m)
        dps.append(U64 * p.abs())  # one rounding each
        dms.append(U64 * m.abs())
    for x, y in zip(mats[:-1], mats[1:], strict=True):
        if x.shape[0] != y.shape[1]:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} then {tuple(y.shape)}")
    hull = [(float(a.min()), float(b.max())) for a, b in zip(ps_lo, ps_hi, strict=True)]
    return _Chain(scaled, scales, autolip_chain(mats, hull), ps, ms, dps, dms)


# --------------------------------------------------------------------------------------------------------------
# the certificate


def _value(chain: _Chain, c_scaled: float) -> float:
    """``sqrt(c) * prod scales``, inflated, capped by AutoLip. The scales are powers of two: their exponents
    are summed and applied once (a running product could underflow halfway); a result in the subnormal
    range (where rounding is no longer relative) falls back to AutoLip."""
    e_sum = sum(round(math.log2(sc)) for sc in chain.scales)
    root = math.sqrt(c_scaled)
    if c_scaled != 0.0 and root < 1e-300:
        return chain.auto
    v = math.ldexp(root, e_sum) if root > 0 else 0.0
    if 0.0 < v < 1e-300 or (v == 0.0 and root > 0):
        return chain.auto
    v = v * (1 + ROUNDING_MARGIN) + ROUNDING_MARGIN * chain.auto
    return min(v, chain.auto)


def certify_multipliers(mats: Sequence[torch.Tensor], slopes: Slopes,
                        lams: Sequence[torch.Tensor]) -> ChainValue:
    """The certified bound of a chain from forward multipliers ``lams[j]`` (one per neuron of activation
    ``j``, in the unscaled recursion with ``X_0 = I``; a solver's LipSDP ``T_j / rho``). Multipliers that
    fail the re-check give ``ChainValue(inf, certified=False)``."""
    t0 = time.perf_counter()
    chain = _prepare(mats, slopes)
    cert = ForwardCertificate(chain.mats[0].shape[1])
    # Rescaling: with v_j scaled by S_j = prod_{i<j} s_i the multipliers of the rescaled chain are
    # lambda_j * S_j^2 (q_j is quadratic in dz, dv).
    log2_s = 0
    for j in range(chain.k):
        log2_s += round(math.log2(chain.scales[j]))
        lam = torch.as_tensor(lams[j], dtype=_DT).flatten() * math.ldexp(1.0, 2 * log2_s - cert.log2_scale)
        if not cert.step(chain.mats[j], chain.p[j], chain.m[j], chain.dp[j], chain.dm[j], lam):
            return ChainValue(math.inf, False, f"multipliers rejected: {cert.failure}", time.perf_counter() - t0)
        cert.renormalize()
    c = cert.final(chain.mats[-1])
    if c is None:
        return ChainValue(math.inf, False, f"multipliers rejected: {cert.failure}", time.perf_counter() - t0)
    return ChainValue(_value(chain, c), True, "multipliers re-checked in float64",
                      time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------------
# the interior-point solver


@dataclass
class LMISolution:
    """``t`` and the multipliers ``y[j]`` (per neuron) of ``Q(t, y) > 0``; ``newton`` steps used; ``gap`` the
    final bound ``nu mu`` (``inf`` when the budget ran out before the first centring)."""

    t: float
    y: list[torch.Tensor]
    newton: int
    gap: float
    #: The strictly feasible starting point (blended in when the optimum's multipliers fail the re-check).
    t0: float = math.nan
    y0: list[torch.Tensor] | None = None


class _LMI:
    """``Q(t, y) = t E_0 + sum_a y_a A_a - F`` for a (sub)chain: input metric ``x_in``, matrices ``mats[j]``
    feeding activation ``j`` (coefficients ``p[j]``, ``m[j]``), final PSD ``f`` on the last block."""

    def __init__(self, x_in: torch.Tensor, mats: list[torch.Tensor], p: list[torch.Tensor],
                 m: list[torch.Tensor], f: torch.Tensor) -> None:
        self.x_in, self.mats, self.f = x_in, mats, f
        self.p = torch.cat(p)
        self.m = torch.cat(m)
        self.widths = [x_in.shape[0]] + [w.shape[0] for w in mats]
        self.offsets = [0]
        for n in self.widths:
            self.offsets.append(self.offsets[-1] + n)
        self.size = self.offsets[-1]
        self.neurons = sum(self.widths[1:])

    def blk(self, j: int) -> slice:
        return slice(self.offsets[j], self.offsets[j + 1])

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.widths[1:]))

    def matrix(self, t: float, y: torch.Tensor) -> torch.Tensor:
        q = torch.zeros(self.size, self.size, dtype=_DT)
        q[self.blk(0), self.blk(0)] = t * self.x_in
        ys = self.split(y)
        ps = torch.split(self.p, self.widths[1:])
        ms = torch.split(self.m, self.widths[1:])
        for j, w in enumerate(self.mats):
            a, b = self.blk(j), self.blk(j + 1)
            if bool((ps[j] != 0).any()):
                q[a, a] += w.T @ ((ps[j] * ys[j])[:, None] * w)
            off = -w.T * (ms[j] * ys[j])[None, :]
            q[a, b] = off
            q[b, a] = off.T
            q[b, b] += torch.diag(ys[j])
        q[self.blk(len(self.mats)), self.blk(len(self.mats))] -= self.f
        return q

    def uw_t(self, z: torch.Tensor) -> torch.Tensor:
        """``U_w^T z``: rows ``W_{j-1}[i] . z[block j-1]`` for every neuron."""
        return torch.cat([w @ z[self.blk(j)] for j, w in enumerate(self.mats)])

    def ue_t(self, z: torch.Tensor) -> torch.Tensor:
        """``U_e^T z``: the rows of ``z`` of every neuron's own block."""
        return z[self.offsets[1]:]


def _logdet_chol(q: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    r, info = torch.linalg.cholesky_ex(q)
    if int(info) != 0:
        return math.inf, None
    return 2.0 * float(torch.log(r.diagonal()).sum()), r


def _start(lmi: _LMI) -> tuple[float, torch.Tensor]:
    """A strictly feasible ``(t, y)`` by backward elimination, one multiplier value per activation."""
    k = len(lmi.mats)
    ps = torch.split(lmi.p, lmi.widths[1:])
    ms = torch.split(lmi.m, lmi.widths[1:])
    ys: list[torch.Tensor] = [torch.empty(0)] * k
    fn = float(torch.linalg.eigvalsh(lmi.f).max()) if lmi.f.numel() else 0.0
    y_last = 2.0 * max(fn, 0.0) + 1e-3 * max(fn, 1.0)
    s = -lmi.f.clone()
    s.diagonal().add_(y_last)
    ys[k - 1] = torch.full((lmi.widths[k],), y_last, dtype=_DT)
    for j in range(k - 1, -1, -1):
        w = lmi.mats[j]
        yv = ys[j]
        r_mat = w.T @ ((ps[j] * yv)[:, None] * w)
        off = w.T * (ms[j] * yv)[None, :]  # -Q_{j,j+1}
        r_mat = r_mat - off @ torch.linalg.solve(s, off.T)
        r_mat = (r_mat + r_mat.T) / 2
        if j > 0:
            ev = torch.linalg.eigvalsh(r_mat)
            val = 2.0 * max(-float(ev.min()), 0.0) + 1e-3 * max(float(ev.abs().max()), 1e-3)
            ys[j - 1] = torch.full((lmi.widths[j],), val, dtype=_DT)
            s = r_mat.clone()
            s.diagonal().add_(val)
        else:
            lx = torch.linalg.cholesky(lmi.x_in)
            g = torch.linalg.solve_triangular(lx, torch.linalg.solve_triangular(lx, r_mat, upper=False).T,
                                              upper=False)
            ev = torch.linalg.eigvalsh((g + g.T) / 2)
            t = 2.0 * max(-float(ev.min()), 0.0) + 1e-3 * max(float(ev.abs().max()), 1e-3)
    return t, torch.cat(ys)


def _closed_form_start(lmi: _LMI) -> tuple[float, torch.Tensor] | None:
    """A strictly feasible ``(t, y)`` from ECLipsE-Fast's closed-form multipliers (one per activation), with
    relative slacks ``START_SLACK``; None when a step's matrix is not positive definite."""
    x = lmi.x_in
    ps = torch.split(lmi.p, lmi.widths[1:])
    ms = torch.split(lmi.m, lmi.widths[1:])
    lams = []
    for j, w in enumerate(lmi.mats):
        r, info = torch.linalg.cholesky_ex(x)
        if int(info) != 0:
            return None
        z = torch.linalg.solve_triangular(r, w.T, upper=False)
        kmax = float(torch.linalg.eigvalsh(z.T @ z).max())
        mmax = float((ms[j] ** 2).max())
        if not (kmax > 0 and mmax > 0):
            return None
        lam = torch.full((w.shape[0],), 1.0 / (2 * mmax * kmax), dtype=_DT)
        mm = x + w.T @ ((ps[j] * lam)[:, None] * w)
        rm, info = torch.linalg.cholesky_ex((mm + mm.T) / 2)
        if int(info) != 0:
            return None
        zm = torch.linalg.solve_triangular(rm, w.T * (ms[j] * lam)[None, :], upper=False)
        x = torch.diag(lam * (1 - START_SLACK)) - zm.T @ zm
        x = (x + x.T) / 2
        lams.append(lam)
    r, info = torch.linalg.cholesky_ex(x)
    if int(info) != 0:
        return None
    z = torch.linalg.solve_triangular(r, lmi.f, upper=False)
    z = torch.linalg.solve_triangular(r, z.T, upper=False)
    c = float(torch.linalg.eigvalsh((z + z.T) / 2).max()) * (1 + START_SLACK) + 1e-300
    return c, c * torch.cat(lams)


def solve_chain_lmi(x_in: torch.Tensor, mats: list[torch.Tensor], p: list[torch.Tensor], m: list[torch.Tensor],
                    f: torch.Tensor, *, layer_form: bool = False, max_newton: int = MAX_NEWTON,
                    gap: float = GAP) -> LMISolution:
    """Minimise ``t`` over ``Q(t, y) > 0, 0 < y < y_max`` (see :class:`_LMI`) by the barrier method.

    The box ``y < y_max`` (``Y_MAX`` times the largest starting multiplier) keeps the barrier bounded
    below: a neuron whose incoming weights vanish has ``A_a >= 0`` and its multiplier could grow forever.
    Any feasible point of the box is feasible for LipSDP, so the bound stays valid; only its optimum can
    be a little higher. ``layer_form``: one multiplier per activation (LipSDP-Layer) instead of one per
    neuron. Deterministic: the same inputs give the same steps."""
    lmi = _LMI(x_in, mats, p, m, f)
    n = lmi.neurons
    groups = torch.repeat_interleave(torch.arange(len(mats)), torch.tensor(lmi.widths[1:]))
    firsts = torch.tensor([0] + list(itertools.accumulate(lmi.widths[1:-1])))
    start = _closed_form_start(lmi)
    t, y = start if start is not None else _start(lmi)
    t_start, y_start = t, y.clone()
    v = y[firsts] if layer_form else y  # the variables besides t
    y_max = Y_MAX * float(v.max())

    def expand(vv: torch.Tensor) -> torch.Tensor:
        return vv[groups] if layer_form else vv

    nu = lmi.size + 2 * v.numel()
    mu = max(t, 1e-300) / nu
    pv, mv = lmi.p, lmi.m
    steps = 0

    def objective(tt: float, vv: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        if not (bool((vv > 0).all()) and bool((vv < y_max).all())):
            return math.inf, None
        ld, r = _logdet_chol(lmi.matrix(tt, expand(vv)))
        if r is None:
            return math.inf, None
        return tt / mu - ld - float(torch.log(vv).sum() + torch.log(y_max - vv).sum()), r

    def derivatives(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The barrier's gradient (without ``c / mu``) and Hessian at the point whose Q has factor ``r``:
        from ``K = U^T Q^-1 U``."""
        qinv = torch.cholesky_inverse(r)
        yw = lmi.uw_t(qinv).T  # Q^-1 U_w  (N x n)
        ye = lmi.ue_t(qinv).T  # Q^-1 U_e
        kww, kwe, kee = lmi.uw_t(yw), lmi.uw_t(ye), lmi.ue_t(ye)
        kew = kwe.T
        pww = pv[:, None] * kww - mv[:, None] * kew  # P = C K, by 2x2 blocks
        pwe = pv[:, None] * kwe - mv[:, None] * kee
        pew = -mv[:, None] * kww + kew
        pee = -mv[:, None] * kwe + kee
        h_yy = pww * pww.T + pwe * pew.T + pew * pwe.T + pee * pee.T  # tr(Q^-1 A_a Q^-1 A_b)
        tr_a = pv * kww.diagonal() - 2 * mv * kwe.diagonal() + kee.diagonal()  # tr(Q^-1 A_a)
        b0 = lmi.blk(0)
        q00x = qinv[b0, b0] @ x_in
        tr_e = float(q00x.diagonal().sum())
        h_tt = float((q00x * q00x.T).sum())
        yw0, ye0 = yw[b0], ye[b0]
        xw, xe = x_in @ yw0, x_in @ ye0
        h_ty = pv * (yw0 * xw).sum(0) - 2 * mv * (yw0 * xe).sum(0) + (ye0 * xe).sum(0)
        if layer_form:
            tr_a = torch.zeros(len(mats), dtype=_DT).index_add_(0, groups, tr_a)
            h_yy = torch.zeros(len(mats), n, dtype=_DT).index_add_(0, groups, h_yy)
            h_yy = torch.zeros(len(mats), len(mats), dtype=_DT).index_add_(1, groups, h_yy)
            h_ty = torch.zeros(len(mats), dtype=_DT).index_add_(0, groups, h_ty)
        dim = 1 + v.numel()
        h = torch.empty(dim, dim, dtype=_DT)
        h[0, 0] = h_tt
        h[0, 1:] = h_ty
        h[1:, 0] = h_ty
        h[1:, 1:] = h_yy + torch.diag(1.0 / v**2 + 1.0 / (y_max - v) ** 2)
        g = torch.cat([torch.tensor([-tr_e], dtype=_DT), -tr_a - 1.0 / v + 1.0 / (y_max - v)])
        return g, h

    def newton_solve(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``h^-1 rhs`` (Jacobi-scaled Cholesky; least squares if ``h`` is numerically singular)."""
        dim = h.shape[0]
        dscale = h.diagonal().clamp_min(1e-300).rsqrt()
        hs = dscale[:, None] * h * dscale[None, :]
        lc, info = torch.linalg.cholesky_ex(hs)
        if int(info) != 0:
            lc, info = torch.linalg.cholesky_ex(hs + 1e-12 * torch.eye(dim, dtype=_DT))
        if int(info) == 0:
            return dscale * torch.cholesky_solve((dscale * rhs)[:, None], lc)[:, 0]
        return dscale * torch.linalg.lstsq(hs, (dscale * rhs)[:, None]).solution[:, 0]

    fval, r = objective(t, v)
    if r is None:
        raise RuntimeError("the starting point of the LMI is not strictly feasible")
    # The starting mu: the one whose Newton decrement at the start is smallest (the start is then as
    # central as it can be): minimise ||c / mu + g||_{H^-1} over 1 / mu.
    gb, h = derivatives(r)
    c = torch.zeros_like(gb)
    c[0] = 1.0
    hc = newton_solve(h, c)
    a, b = float(c @ hc), float(gb @ hc)
    if a > 0 and b < 0:
        mu_start = min(-a / b, t / nu)
        fval += t / mu_start - t / mu  # the objective's only mu-dependent term
        mu = mu_start
    centred_gap = math.inf
    stale = False  # gb, h are those of the current point (they do not depend on mu)
    while steps < max_newton:
        if stale:
            gb, h = derivatives(r)
            stale = False
        g = gb.clone()
        g[0] += 1.0 / mu
        d = -newton_solve(h, g)
        dec = float(-(g @ d))  # squared Newton decrement
        steps += 1
        centred = dec < 1e-8 or not math.isfinite(dec)
        if not centred:
            # Damped Newton (self-concordance): a step of 1 / (1 + lambda) stays inside the Dikin ellipsoid,
            # so iterates never crowd the boundary (plain backtracking does, and the Hessian then degenerates).
            alpha, new = (1.0 if dec <= 1.0 else 1.0 / (1.0 + math.sqrt(dec))), None
            for _ in range(60):
                tt, vv = t + alpha * float(d[0]), v + alpha * d[1:]
                fv, rr = objective(tt, vv)
                if rr is not None and fv <= fval - 0.25 * alpha * dec:
                    new = (tt, vv, fv, rr)
                    break
                alpha *= 0.5
            if new is None:
                centred = True
            else:
                t, v, fval, r = new
                stale = True
                centred = dec < 0.5
        if centred:
            centred_gap = nu * mu
            if centred_gap <= gap * abs(t):
                break
            fval += t * (MU_FACTOR - 1.0) / mu  # t / mu becomes t / (mu / MU_FACTOR)
            mu /= MU_FACTOR
    return LMISolution(t, lmi.split(expand(v)), steps, centred_gap, t_start, lmi.split(y_start))


# --------------------------------------------------------------------------------------------------------------
# the chain bound


def lipsdp_chain(mats: Sequence[torch.Tensor], slopes: Slopes, *, window: int | None = None,
                 stride: int | None = None, layer_form: bool = False, max_lmi: int = MAX_LMI,
                 window_lmi: int = WINDOW_LMI, max_newton: int = MAX_NEWTON) -> ChainValue:
    """Certified LipSDP bound of ``W_k s_k ... s_1 W_0``: the whole chain's LMI when it has at most
    ``max_lmi`` rows and ``MAX_WHOLE_ACTIVATIONS`` activations, otherwise overlapping windows of ``window``
    activations (default: as many as fit in
    ``window_lmi`` rows, at least one) committing ``stride`` of them each (default: half the window).
    ``window=1`` is ECLipsE's layer-wise scheme."""
    t0 = time.perf_counter()
    chain = _prepare(mats, slopes)
    k = chain.k
    if k == 0:
        return ChainValue(chain.auto, math.isfinite(chain.auto), "single matrix: certified norm",
                          time.perf_counter() - t0)
    widths = [w.shape[0] for w in chain.mats[:-1]]
    n_in = chain.mats[0].shape[1]
    # The input block: an input wider than the first layer is reduced exactly (W_0 = U S V^T: the LMI in
    # the input block acts on V^T dv_0 only). Only the solver uses the reduction; the certificate runs on
    # the full chain.
    w0 = chain.mats[0]
    reduce_input = n_in > widths[0]
    if window is None:
        if (widths[0] if reduce_input else n_in) + sum(widths) <= max_lmi and k <= MAX_WHOLE_ACTIVATIONS:
            window = k
        else:
            window = max(1, (window_lmi - max(widths)) // max(widths))
    window = max(1, min(window, k))
    stride = max(1, stride if stride is not None else (window + 1) // 2)
    cert = ForwardCertificate(n_in)
    newton, solves, j = 0, 0, 0
    while j < k:
        end = min(j + window, k)
        last = end == k
        f = chain.mats[end].T @ chain.mats[end]
        sub = list(chain.mats[j:end])
        x_in = cert.x
        if j == 0 and reduce_input:
            u, sv, _ = torch.linalg.svd(w0, full_matrices=False)
            sub[0] = u * sv[None, :]  # W_0 V  (the LMI on V^T dv_0, X_0 = I there)
            x_in = torch.eye(sub[0].shape[1], dtype=_DT)
        sol = solve_chain_lmi((x_in + x_in.T) / 2, sub, chain.p[j:end], chain.m[j:end], (f + f.T) / 2,
                              layer_form=layer_form, max_newton=max_newton)
        newton += sol.newton
        solves += 1
        commit = end - j if last else min(stride, end - j)
        # The optimum sits on the LMI's boundary up to the barrier's margin, and the re-check lowers each X by
        # a slack; when that makes a later X singular, blend in the strictly feasible start (the LMI's set is
        # convex, so every blend is feasible; its value is at most (1 - theta) t + theta t0).
        accepted = None
        for theta in BLENDS:
            trial = cert.copy()
            tt = (1 - theta) * sol.t + theta * sol.t0
            ok = True
            for i in range(commit):
                yy = (1 - theta) * sol.y[i] + theta * sol.y0[i]
                if not trial.step(chain.mats[j + i], chain.p[j + i], chain.m[j + i], chain.dp[j + i],
                                  chain.dm[j + i], yy / tt):
                    ok = False
                    break
            if ok:
                trial.renormalize()
                c = trial.final(chain.mats[-1]) if last else None
                if (c is not None) if last else int(torch.linalg.cholesky_ex(trial.x)[1]) == 0:
                    accepted = trial
                    break
        if accepted is None:
            return ChainValue(math.inf, False, f"LipSDP not certified: {trial.failure or 'X not positive definite'}",
                              time.perf_counter() - t0)
        cert = accepted
        j += commit
    form = "layer" if layer_form else "neuron"
    if c is None:
        return ChainValue(math.inf, False, f"LipSDP not certified: {cert.failure}", time.perf_counter() - t0)
    how = ("the whole chain's LMI" if window >= k else
           f"{solves} windows of {window} activation(s), stride {stride}")
    value = _value(chain, c)
    method = (f"LipSDP-{form.capitalize()} ({how}; structured interior point, {newton} Newton steps), "
              f"multipliers re-checked in float64 (slacks up to {max(cert.slacks):g})")
    if value >= chain.auto:
        method += "; capped by the AutoLip product"
    return ChainValue(value, True, method, time.perf_counter() - t0)


def eclipse_chain(mats: Sequence[torch.Tensor], slopes: Slopes) -> ChainValue:
    """ECLipsE (layer-wise SDPs with per-neuron multipliers), solved and certified as :func:`lipsdp_chain`."""
    cv = lipsdp_chain(mats, slopes, window=1, stride=1)
    cv.method = cv.method.replace("LipSDP-Neuron", "ECLipsE")
    return cv


def lipsdp_bound(mats: Sequence[torch.Tensor], slopes: Slopes, **kw) -> float:
    """The certified LipSDP value of a chain (``math.inf`` when it cannot be certified)."""
    cv = lipsdp_chain(mats, slopes, **kw)
    return cv.value if cv.certified else math.inf


def _chain_size(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(neurons, rows)`` of a chain of these ``(out, in)`` matrix shapes: its activations' widths summed, and the
    rows of its largest one-activation window (an input wider than the first layer is reduced to that layer's
    width): what :func:`_segment_bound` and :func:`work` choose the scheme by."""
    neurons = sum(n_out for n_out, _ in shapes[:-1])
    widths = [min(shapes[0])] + [n_out for n_out, _ in shapes[:-1]]
    return neurons, max((a + b for a, b in zip(widths[:-1], widths[1:], strict=True)), default=0)


def _segment_bound(mats: list[torch.Tensor], slopes: Slopes) -> ChainValue:
    neurons, single = _chain_size([tuple(w.shape) for w in mats])
    if neurons <= MAX_NEURONS and single <= MAX_WINDOW_LMI:
        return lipsdp_chain(mats, slopes)
    if neurons > MAX_BUDGET_NEURONS:
        return ChainValue(math.inf, False, f"{neurons} neurons exceed the SDP work budget ({MAX_BUDGET_NEURONS})")
    if single > MAX_BUDGET_WINDOW_LMI:
        return ChainValue(math.inf, False, f"even a one-activation window's LMI has {single} rows, more than "
                                           f"{MAX_BUDGET_WINDOW_LMI} (the closed forms cover the chain)")
    cv = lipsdp_chain(mats, slopes, window=1, stride=1, max_newton=BUDGET_NEWTON)
    cv.method = cv.method.replace("LipSDP-Neuron", f"ECLipsE layer-wise, {BUDGET_NEWTON} Newton steps per window")
    return cv


#: Newton steps a solve to convergence is charged for in :func:`work` (they stop at ``GAP``; ``MAX_NEWTON`` is
#: the cap). With one unit per ``rows^3`` of each step, shufflenet_v2_x0_5's whole 768-row LMIs (idle, 2 cores:
#: 2.7-4.4 s each) and its budgeted 1536-row windows (8 steps, 2.0 s each) come out near 1e10 units per second.
WORK_NEWTON = 60


def work(shapes: Sequence[tuple[int, int]]) -> float:
    """Estimated cost of :func:`_segment_bound` on a chain of these ``(out, in)`` matrix shapes, in the units of
    ``CHAIN_WORK_BUDGET``: Newton steps times the cube of the LMI's rows, following the same choice of scheme
    (whole LMI, windows, or the budgeted layer-wise one); 0 where it refuses the chain at once (no solve)."""
    widths = [n_out for n_out, _ in shapes[:-1]]
    if not widths:
        return 0.0
    n_in = min(shapes[0])
    neurons, single = _chain_size(shapes)
    if neurons <= MAX_NEURONS and single <= MAX_WINDOW_LMI:
        if n_in + neurons <= MAX_LMI and len(widths) <= MAX_WHOLE_ACTIVATIONS:
            return float(WORK_NEWTON * (n_in + neurons) ** 3)
        window = max(1, (WINDOW_LMI - max(widths)) // max(widths))
        solves = max(1, math.ceil(len(widths) / max(1, (window + 1) // 2)))
        return float(WORK_NEWTON * solves * (n_in + window * max(widths)) ** 3)
    if neurons > MAX_BUDGET_NEURONS or single > MAX_BUDGET_WINDOW_LMI:
        return 0.0  # refused at once (no solve)
    rows = [a + b for a, b in zip([n_in, *widths[:-1]], widths, strict=True)]
    return float(BUDGET_NEWTON * sum(r ** 3 for r in rows))


def run(graph: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """One relation ``L(last) <= LipSDP(segment) * L(entry)`` per linear-chain segment; on a domain
    (``settings.neuron_slopes``) each neuron's multiplier constraint uses its own slope interval there
    (ECLipsE-Gen-Local's idea: a provably active or dead neuron has a point interval)."""
    return run_segments(graph, SOURCE, _segment_bound, settings=settings, work=work)


__all__ = ["SOURCE", "ForwardCertificate", "LMISolution", "certify_multipliers", "eclipse_chain", "lipsdp_bound",
           "lipsdp_chain", "run", "solve_chain_lmi", "work"]
