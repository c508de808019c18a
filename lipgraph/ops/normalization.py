"""Input-dependent normalizations (LayerNorm, GroupNorm, InstanceNorm without running stats, RMSNorm).

With ``z = x - mean(x)`` over a normalized group of n entries and
``s = sqrt(|z|^2/n + eps)``, ``f(x) = gamma * z / s + beta`` has Jacobian
``diag(gamma) (I - z z^T/(n s^2)) P / s`` (P removes the mean), whose norm is at
most ``max|gamma| / s <= max|gamma| / sqrt(eps)``, approached as ``z -> 0``.
So the honest global constant is ``max|gamma| / sqrt(eps)``: certified, and
large (about 316 for eps = 1e-5), because a near-constant input is scaled up
by ``1/sqrt(eps)``. Groups are independent, so the bound holds for the whole op.

On an input domain (issue 12), ``norm_local`` replaces ``eps`` by a certified lower bound of ``var + eps``
(``ms + eps`` for RMSNorm) over the input ranges, per group (:func:`variance_lower`), and ``norm_ranges``
encloses the output; both tested against dense Jacobians and samples in ``tests/test_domain_rules.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..domains import Range
from .registry import LocalConstant, Settings, not_lipschitz, register_rule


def _gamma_max(node) -> float:
    w = node.params.get("weight")
    return float(w.detach().abs().max()) if w is not None and w.numel() else 1.0


def _norm_lipschitz(node, ctx: Settings) -> LocalConstant:
    """L = max|gamma| / sqrt(eps) (certified; see the module docstring); eps = 0: inf (near-constant inputs are
    scaled without bound)."""
    if not node.attrs["eps"] > 0:
        return not_lipschitz(f"{node.op} at node {node.name!r} has eps = {node.attrs['eps']}: no finite constant")
    v = _gamma_max(node) / math.sqrt(node.attrs["eps"])
    return LocalConstant([v], True, "1/sqrt(eps)")


def layer_norm_forward(node, x):
    p = node.params
    return F.layer_norm(x, node.attrs["normalized_shape"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def group_norm_forward(node, x):
    p = node.params
    return F.group_norm(x, node.attrs["num_groups"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def instance_norm_forward(node, x):
    p = node.params
    return F.instance_norm(x, None, None, p.get("weight"), p.get("bias"), True, 0.0, node.attrs["eps"])


def rms_norm_forward(node, x):
    return F.rms_norm(x, node.attrs["normalized_shape"], node.params.get("weight"), node.attrs["eps"])


def rms_norm_lipschitz(node, ctx: Settings) -> LocalConstant:
    """RMSNorm f(x) = gamma x / s, s = sqrt(|x|^2/n + eps): J = diag(gamma) (I - x x^T / (n s^2)) / s, whose
    middle factor has eigenvalues 1 and eps/s^2, so ||J|| <= max|gamma| / s <= max|gamma| / sqrt(eps), approached
    as x -> 0: L = max|gamma| / sqrt(eps) (exact). eps = None means finfo(input dtype).eps in PyTorch; the IR
    does not record the input's dtype, so it takes float64's eps, the smallest (sound for any input dtype,
    exact for float64 inputs or when eps is given; pass eps explicitly for a tight float32 bound)."""
    eps = node.attrs["eps"]
    if eps is None:
        eps = torch.finfo(torch.float64).eps
    v = _gamma_max(node) / math.sqrt(eps)
    return LocalConstant([v], True, "1/sqrt(eps)", lower=v)


#: Relative slack on float64 sums of n terms (n u with u = 2^-52 is below it for n < 4e6).
_SUM_SLACK = 1e-9
_BISECTIONS = 200


def _affine_full(node, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and beta broadcast to the input's shape (ones/zeros when absent): over the trailing normalized dims
    for layer/rms norm, over the channel dim 1 for group/instance norm."""
    p = node.params
    w, b = p.get("weight"), p.get("bias")
    ones = torch.ones(shape, dtype=torch.float64)

    def full(t, default: float) -> torch.Tensor:
        if t is None or t.numel() == 0:
            return ones * default
        t = t.detach().to(torch.float64)
        if node.op in ("group_norm", "instance_norm"):
            t = t.reshape((1, -1) + (1,) * (len(shape) - 2))
        return torch.broadcast_to(t, shape).clone()

    return full(w, 1.0), full(b, 0.0)


def _group_rows(node, t: torch.Tensor) -> torch.Tensor:
    """The tensor as (groups, n): one row per normalization group (a token for layer/rms norm, a sample's channel
    group for group norm, a sample's channel for instance norm)."""
    if node.op in ("layer_norm", "rms_norm"):
        n = math.prod(node.attrs["normalized_shape"])
        return t.reshape(-1, n)
    if node.op == "group_norm":
        return t.reshape(t.shape[0] * node.attrs["num_groups"], -1)
    if node.op == "instance_norm":
        if t.dim() < 3:
            raise ValueError("instance_norm ranges need an (N, C, *spatial) input")
        return t.reshape(t.shape[0] * t.shape[1], -1)
    raise ValueError(node.op)


def _dist_sq(m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(m) = mean_i dist(m, [lo_i, hi_i])^2 and its derivative, per row (m has one entry per row)."""
    m = m[:, None]
    below = torch.clamp(lo - m, min=0.0)  # m left of the interval
    above = torch.clamp(m - hi, min=0.0)  # m right of it
    n = lo.shape[1]
    return (below * below + above * above).sum(dim=1) / n, 2 * (above - below).sum(dim=1) / n


def variance_lower(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A certified lower bound, per row, of min over the box of the biased variance
    var(x) = min_m mean_i (x_i - m)^2, i.e. of min_m phi(m), phi(m) = mean_i dist(m, [lo_i, hi_i])^2 (convex).
    Bisection on phi' (nondecreasing, <= 0 at min lo, >= 0 at max hi) brackets the minimiser in [a, b]; by
    convexity min phi >= phi(a) + phi'(a)(b - a) (phi'(a) <= 0), each term rounded the safe way by the relative
    slack of a float sum, and at least 0."""
    a = lo.amin(dim=1)
    b = hi.amax(dim=1)
    for _ in range(_BISECTIONS):
        m = 0.5 * (a + b)
        _, d = _dist_sq(m, lo, hi)
        right = d >= 0
        a, b = torch.where(right, a, m), torch.where(right, m, b)
    phi_a, d_a = _dist_sq(a, lo, hi)
    d_a = torch.clamp(d_a, max=0.0)
    # a float sign error of phi' near 0 (|phi'| below u * mean dist <= u sqrt(phi)) can move the bracket: the
    # tangent bound then errs by at most that times the width, subtracted here with a wide margin.
    width = hi.amax(dim=1) - lo.amin(dim=1)
    sign_err = 1e-14 * torch.sqrt(phi_a) * width
    bound = phi_a * (1 - _SUM_SLACK) + d_a.abs().neg() * (b - a) * (1 + _SUM_SLACK) - sign_err - 1e-300
    return torch.clamp(bound, min=0.0)


def _eps(node) -> float:
    eps = node.attrs["eps"]
    return torch.finfo(torch.float64).eps if eps is None else float(eps)


def _mean_sq_lower(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min over the box of mean_i x_i^2 = mean_i abs_min_i^2 (exact, rounded down)."""
    amin = Range(lo, hi).abs_min
    return (amin * amin).mean(dim=1) * (1 - _SUM_SLACK)


def _scale_lower(node, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per group, a lower bound of s^2 = var + eps (ms + eps for RMSNorm) over the box."""
    low = _mean_sq_lower(lo, hi) if node.op == "rms_norm" else variance_lower(lo, hi)
    return low + _eps(node)


def spread_scale_lower(node, center: Range, d: float) -> torch.Tensor:
    """Per group, a lower bound of var (ms for RMSNorm) over the inputs ``y`` with ``||y - y_c||_2 <= d`` for a
    ``y_c`` in the box ``center``: with ``P`` the centring projection (the identity for RMSNorm), ``sqrt(n var(y))
    = ||P y|| >= ||P m|| - ||P (y_c - m)|| - ||P (y - y_c)|| >= ||P m|| - ||rad||_2 - d`` (``m``, ``rad``: the
    box's midpoint and half-widths, per group; ``||P|| <= 1``), so ``var >= max(0, .)^2 / n``, rounded down."""
    m, rad = _group_rows(node, center.mid), _group_rows(node, center.rad)
    if node.op != "rms_norm":
        m = m - m.mean(dim=1, keepdim=True)
    n = m.shape[1]
    norm = torch.linalg.vector_norm(m, dim=1) * (1 - 1e-12) - torch.linalg.vector_norm(rad, dim=1) * (1 + 1e-12)
    low = torch.clamp(norm - d * (1 + 1e-12), min=0.0)
    return low * low / n * (1 - _SUM_SLACK)


def norm_local(node, ins, settings: Settings) -> LocalConstant | None:
    """Per group J = diag(gamma) (I - z z^T/(n s^2)) P / s (P = I for RMSNorm) with a middle factor of norm <= 1:
    ||J|| <= max_group |gamma| / sqrt(s2_min), s2_min a certified lower bound of var + eps (ms + eps) over the
    input range (:func:`variance_lower`); groups are independent blocks: the max over groups (certified)."""
    r = ins[0]
    gamma, _ = _affine_full(node, tuple(r.lo.shape))
    lo, hi = _group_rows(node, r.lo), _group_rows(node, r.hi)
    if lo.numel() == 0:
        return None
    gmax = _group_rows(node, gamma.abs()).amax(dim=1)
    s2 = _scale_lower(node, lo, hi)
    spread = settings.extra.get("spread", {}).get(node.inputs[0]) if settings is not None else None
    how = "domain: max|gamma| / sqrt(var_min + eps)"
    if spread is not None and spread[0].lo.numel() == r.lo.numel():
        center = Range(spread[0].lo.reshape(r.lo.shape), spread[0].hi.reshape(r.hi.shape))
        s2_spread = spread_scale_lower(node, center, spread[1]) + _eps(node)
        if bool((s2_spread > s2).any()):
            s2 = torch.maximum(s2, s2_spread)
            how = "domain: max|gamma| / sqrt(var_min + eps), var_min from the input's l2 spread around the center"
    v = float((gmax / torch.sqrt(s2)).amax()) * (1 + 1e-9)
    if not math.isfinite(v):
        return None
    return LocalConstant([v], True, how)


def _divide(num_lo: torch.Tensor, num_hi: torch.Tensor, s_lo: torch.Tensor,
            s_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_lo, num_hi] / [s_lo, s_hi] with 0 < s_lo <= s_hi (s_hi may be inf)."""
    lo = torch.where(num_lo >= 0, num_lo / s_hi, num_lo / s_lo)
    hi = torch.where(num_hi >= 0, num_hi / s_lo, num_hi / s_hi)
    return lo, hi


def normalized_factors(node, r: Range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (rows ``(groups, n)``, see :func:`_group_rows`): an enclosure ``[t_lo, t_hi]`` of the normalised
    entries ``t = (x_i - mu)/s`` (``x_i/s`` for RMSNorm) and ``[s_lo, s_hi]`` of ``s = sqrt(var + eps)`` (``ms + eps``)
    over the input range (certified, rounded outward; ``s_lo`` a column ``(groups, 1)``, likewise ``s_hi``).
    The numerator: x_i - mu = (1 - 1/n) x_i - mean_{j != i} x_j / n in [lo_i - mean(hi) + (hi_i - lo_i)/n,
    hi_i - mean(lo) - (hi_i - lo_i)/n] (x_i for RMSNorm); s^2 >= :func:`_scale_lower`, s^2 <= mean_i
    max(num_lo_i^2, num_hi_i^2) + eps; t also lies in [-sqrt(n - 1), sqrt(n - 1)] (sqrt(n) for RMSNorm)
    since (x_i - mu)^2 <= (n - 1) var."""
    lo, hi = _group_rows(node, r.lo), _group_rows(node, r.hi)
    n = lo.shape[1]
    if node.op == "rms_norm":
        num_lo, num_hi = lo, hi
        cap = math.sqrt(n)
    else:
        w = (hi - lo) / n
        num_lo = lo - hi.mean(dim=1, keepdim=True) + w
        num_hi = hi - lo.mean(dim=1, keepdim=True) - w
        err = _SUM_SLACK * (lo.abs().amax(dim=1, keepdim=True) + hi.abs().amax(dim=1, keepdim=True))
        num_lo, num_hi = num_lo - err, num_hi + err
        cap = math.sqrt(max(n - 1, 0))
    big = torch.maximum(num_lo * num_lo, num_hi * num_hi)
    # s_lo = 0 (eps = 0 on a box holding a constant input) would give 0/0: a tiny floor, and the cap bounds t
    s_lo = torch.sqrt(_scale_lower(node, lo, hi)).clamp(min=1e-300)[:, None] * (1 - 1e-12)
    s_hi = torch.sqrt(big.mean(dim=1) * (1 + _SUM_SLACK) + _eps(node))[:, None] * (1 + 1e-12)
    t_lo, t_hi = _divide(num_lo, num_hi, s_lo, s_hi)
    t_lo = torch.clamp(t_lo - 1e-12 * t_lo.abs() - 1e-300, min=-cap * (1 + 1e-12))
    t_hi = torch.clamp(t_hi + 1e-12 * t_hi.abs() + 1e-300, max=cap * (1 + 1e-12))
    return t_lo, t_hi, s_lo, s_hi


def norm_ranges(node, r: Range) -> Range:
    """y = gamma t + beta with t in the enclosure of :func:`normalized_factors`. Rounded outward (certified
    enclosure)."""
    shape = tuple(r.lo.shape)
    gamma, beta = _affine_full(node, shape)
    t_lo, t_hi, _, _ = normalized_factors(node, r)
    t_lo, t_hi = t_lo.reshape(shape), t_hi.reshape(shape)
    a, b = gamma * t_lo, gamma * t_hi
    out = Range(torch.minimum(a, b) + beta, torch.maximum(a, b) + beta)
    return out.widened(gamma.abs() * torch.maximum(t_lo.abs(), t_hi.abs()) + beta.abs())


def norm_gamma_rows(node, shape: tuple[int, ...]) -> torch.Tensor:
    """gamma broadcast to the input's shape, as rows ``(groups, n)``."""
    return _group_rows(node, _affine_full(node, shape)[0])


register_rule("layer_norm", layer_norm_forward, _norm_lipschitz, ranges=norm_ranges, local=norm_local)
register_rule("rms_norm", rms_norm_forward, rms_norm_lipschitz, ranges=norm_ranges, local=norm_local)
register_rule("group_norm", group_norm_forward, _norm_lipschitz, ranges=norm_ranges, local=norm_local)
register_rule("instance_norm", instance_norm_forward, _norm_lipschitz, ranges=norm_ranges, local=norm_local)
