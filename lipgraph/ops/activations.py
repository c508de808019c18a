"""Elementwise activations.

An elementwise map ``y_j = s(x_j)`` has the diagonal Jacobian ``diag(s'(x))``,
so its l2 Lipschitz constant is exactly ``sup_t |s'(t)|``. Each rule records
the interval ``[a, b]`` containing every derivative (``slope``), which SeqLip
uses; the constant is ``max(|a|, |b|)``. All values are certified: closed forms
where they exist, otherwise the sup of the derivative found on a 1e-5 grid
over [-30, 30] in float64 (outside it the derivative is monotone to its limit)
and rounded *outward* at the 6th decimal, which exceeds the grid error of
order ``1e-10`` (tested against a numerical sup in ``tests/test_rules.py``).

On an input domain (issue 12) every activation also has a range (``monotone=True`` or a ``ranges`` function)
and per-neuron derivative intervals (``neuron_slopes``); the interval math is in
:mod:`lipgraph.ops.activation_domain`. softmax / log_softmax get ranges and ``local`` constants from the
probability ranges (tested in ``tests/test_domain_rules.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..domains import Range
from . import activation_domain as AD
from .registry import LocalConstant, Settings, exact, not_lipschitz, register_rule

_SELU_SCALE = 1.0507009873554805
_SELU_ALPHA = 1.6732632423543772
# d/dx x*Phi(x) = Phi(x) + x*phi(x); extremes at x = +-sqrt(2).
_GELU_MAX = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1) / math.sqrt(2 * math.pi)
_GELU_MIN = 1.0 - _GELU_MAX  # Phi(-sqrt2) - sqrt2*phi(sqrt2) = 1 - (Phi(sqrt2) + sqrt2*phi(sqrt2))


def _up(x: float) -> float:
    """Round outward at the 6th decimal (away from zero)."""
    return math.copysign(math.ceil(abs(x) * 1e6 + 1e-9) / 1e6, x)


def _fixed(kind: str, fn, slope: tuple[float, float], doc: str, **capabilities) -> None:
    register_rule(kind, lambda node, x, _f=fn: _f(x), slope=slope, doc=doc, **capabilities)


def relu_neuron_slopes(node, r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    """relu' on [lo, hi]: 0 where hi < 0 (dead), 1 where lo > 0 (active), [0, 1] otherwise (exact intervals;
    at 0 the Clarke derivative is [0, 1])."""
    lo = (r.lo > 0).to(torch.float64)
    hi = (r.hi >= 0).to(torch.float64)
    return lo, hi


_fixed("relu", F.relu, (0.0, 1.0), "relu' in {0,1}: L = 1 (exact).", monotone=True,
       neuron_slopes=relu_neuron_slopes)
_fixed("relu6", F.relu6, (0.0, 1.0), "min(max(x,0),6)' in {0,1}: L = 1 (exact).", monotone=True,
       neuron_slopes=lambda node, r: AD.clamp_slopes(r, 0.0, 6.0))
_fixed("sigmoid", torch.sigmoid, (0.0, 0.25), "sigma' = sigma(1-sigma) in (0,1/4]: L = 1/4 (exact, at 0).",
       monotone=True, neuron_slopes=lambda node, r: AD.even_decreasing_slopes(r, AD.sigmoid_prime, 0.25))
_fixed("tanh", torch.tanh, (0.0, 1.0), "tanh' = 1 - tanh^2 in (0,1]: L = 1 (exact, at 0).", monotone=True,
       neuron_slopes=lambda node, r: AD.even_decreasing_slopes(r, AD.tanh_prime, 1.0))
_fixed("selu", F.selu, (0.0, _up(_SELU_SCALE * _SELU_ALPHA)),
       "selu' = scale*alpha*e^x (x<0), scale (x>0): L = scale*alpha = 1.758100 (sup at 0-).", monotone=True,
       neuron_slopes=lambda node, r: AD.exp_branch_slopes(r, _SELU_SCALE * _SELU_ALPHA, 1.0, _SELU_SCALE))
_fixed("silu", F.silu, (-0.09984, 1.09984), "(x sigma(x))' in [-0.099840, 1.099840] (numerical sup at x=+-2.3994).",
       ranges=lambda node, r: AD.quasi_convex_range(F.silu, "silu", r),
       neuron_slopes=lambda node, r: AD.critical_slopes(r, AD.silu_prime, "silu", (-0.09984, 1.09984)))
_fixed("mish", F.mish, (-0.112527, 1.088499), "mish' in [-0.112527, 1.088499] (numerical sup at x=1.4906).",
       ranges=lambda node, r: AD.quasi_convex_range(F.mish, "mish", r),
       neuron_slopes=lambda node, r: AD.critical_slopes(r, AD.mish_prime, "mish", (-0.112527, 1.088499)))
_fixed("hardswish", F.hardswish, (-0.5, 1.5), "hardswish' = (2x+3)/6 on [-3,3], 0 or 1 outside: L = 3/2 (exact, at 3).",
       ranges=lambda node, r: AD.quasi_convex_range(F.hardswish, "hardswish", r),
       neuron_slopes=lambda node, r: AD.hardswish_slopes(r))
_fixed("hardsigmoid", F.hardsigmoid, (0.0, 1.0 / 6.0), "hardsigmoid' = 1/6 on (-3,3), 0 outside: L = 1/6 (exact).",
       monotone=True, neuron_slopes=lambda node, r: AD.hardsigmoid_slopes(r))
_fixed("abs", torch.abs, (-1.0, 1.0), "|x|' = +-1: L = 1 (exact).", ranges=lambda node, r: AD.abs_range(r),
       neuron_slopes=lambda node, r: AD.abs_slopes(r))
_fixed("sin", torch.sin, (-1.0, 1.0), "sin' = cos in [-1, 1]: L = 1 (exact, at 0).",
       ranges=lambda node, r: AD.sin_range(r.lo, r.hi),
       neuron_slopes=lambda node, r: _as_pair(AD.cos_range(r.lo, r.hi)))
_fixed("cos", torch.cos, (-1.0, 1.0), "cos' = -sin in [-1, 1]: L = 1 (exact, at pi/2).",
       ranges=lambda node, r: AD.cos_range(r.lo, r.hi),
       neuron_slopes=lambda node, r: _negated(AD.sin_range(r.lo, r.hi)))


def _as_pair(r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    return r.lo, r.hi


def _negated(r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    return -r.hi, -r.lo


def _attr(node, name, default):
    return node.attrs.get(name, default)


class _NotLipschitz(Exception):  # noqa: N818 - internal signal from a slope interval
    """Raised by an interval function whose parameters make the activation unbounded or discontinuous."""


def _interval_rule(kind: str, fn, interval, doc: str, **capabilities) -> None:
    """An activation whose slope interval depends on its attributes."""

    def lipschitz(node, ctx: Settings) -> LocalConstant:
        try:
            a, b = interval(node)
        except _NotLipschitz as exc:
            return not_lipschitz(f"{kind} at node {node.name!r} ({node.source}): {exc}")
        if not (math.isfinite(a) and math.isfinite(b)):
            return not_lipschitz(f"{kind} at node {node.name!r} ({node.source}): its parameters are not finite")
        return exact(max(abs(a), abs(b)), "slope-bound")

    register_rule(kind, fn, lipschitz, slope=None, doc=doc, **capabilities)
    _PARAM_SLOPES[kind] = interval


#: kind -> function(node) -> (a, b), for activations whose interval depends on attributes.
_PARAM_SLOPES: dict = {}


def slope_interval(node) -> tuple[float, float] | None:
    """The derivative interval [a, b] of an elementwise activation node, else None."""
    from .registry import RULES

    if node.op in _PARAM_SLOPES:
        try:
            a, b = _PARAM_SLOPES[node.op](node)
        except _NotLipschitz:
            return None
        return (a, b) if math.isfinite(a) and math.isfinite(b) else None
    rule = RULES.get(node.op)
    return rule.slope if rule is not None else None


def _param(node, name, default, *, allow_inf: bool = False) -> float:
    """A float attribute, refused (inf with the reason) when NaN, or infinite unless ``allow_inf``."""
    v = float(_attr(node, name, default))
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise _NotLipschitz(f"{name} = {v} is not a finite number")
    return v


def _leaky_interval(node):
    a = _param(node, "negative_slope", 0.01)
    return (min(a, 1.0), max(a, 1.0))


def _elu_interval(node):
    a = _param(node, "alpha", 1.0)
    return (min(0.0, a), max(1.0, a))


def _hardtanh_interval(node):
    lo = _param(node, "min_val", -1.0, allow_inf=True)
    hi = _param(node, "max_val", 1.0, allow_inf=True)
    return (0.0, 1.0) if hi > lo else (0.0, 0.0)


def _prelu_interval(node):
    w = node.params["weight"].detach().double()
    return (min(float(w.min()), 1.0), max(float(w.max()), 1.0))


def _celu_interval(node):
    a = _param(node, "alpha", 1.0)
    if not a > 0:
        raise _NotLipschitz(f"alpha = {a} <= 0: the slope e^(x/alpha) of the negative branch is unbounded")
    return (0.0, 1.0)


def _softplus_interval(node):
    """softplus is 1-Lipschitz, but PyTorch switches to x where beta*x > threshold: a jump of
    log1p(exp(-threshold))/beta at x = threshold/beta, which makes the map discontinuous unless it is 0."""
    beta = _param(node, "beta", 1.0)
    threshold = _param(node, "threshold", 20.0, allow_inf=True)
    if not beta > 0:
        raise _NotLipschitz(f"beta = {beta} <= 0 is not a proven case")
    jump = math.log1p(math.exp(-threshold)) / beta if threshold != math.inf else 0.0
    if jump != 0.0:
        raise _NotLipschitz(
            f"the switch to x at x = threshold/beta = {threshold / beta:g} is a jump of {jump:.3g} "
            "(log1p(exp(-threshold))/beta), so the map is discontinuous"
        )
    return (0.0, 1.0)


def _gelu_interval(node):
    if _attr(node, "approximate", "none") == "tanh":
        return (-0.128994, 1.128994)
    return (_up(_GELU_MIN), _up(_GELU_MAX))


def _leaky_fn(node):
    a = _param(node, "negative_slope", 0.01)
    return lambda t: F.leaky_relu(t, a)


def _leaky_slopes(node, r: Range):
    """leaky_relu' = a (x < 0), 1 (x > 0), [min, max](a, 1) at 0 (exact)."""
    a = _param(node, "negative_slope", 0.01)
    full = torch.full_like(r.lo, a)
    return AD.two_branch_slopes(r, full, full, 1.0)


def _prelu_weight(node, like: torch.Tensor) -> torch.Tensor:
    """The prelu weight broadcast like F.prelu does: one value, or one per channel (dim 1 of the input)."""
    w = node.params["weight"].detach().to(torch.float64).reshape(-1)
    if w.numel() == 1:
        return torch.broadcast_to(w.reshape(()), like.shape)
    return torch.broadcast_to(w.reshape((1, -1) + (1,) * (like.dim() - 2)), like.shape)


def _prelu_ranges(node, r: Range) -> Range:
    """Each branch is linear with the kink at 0 (value 0): the endpoint values and 0 where it is inside."""
    w = _prelu_weight(node, r.lo)
    return AD.endpoint_range(lambda t: torch.where(t >= 0, t, w * t), r, kink=0.0)


def _prelu_slopes(node, r: Range):
    """prelu' = a_c (x < 0), 1 (x > 0), Clarke hull at 0 (exact), a_c broadcast over the channel dim."""
    w = _prelu_weight(node, r.lo)
    return AD.two_branch_slopes(r, w, w, 1.0)


def _elu_slopes(node, r: Range):
    """elu' = alpha e^x (x < 0, monotone: endpoint values widened), 1 (x > 0)."""
    return AD.exp_branch_slopes(r, _param(node, "alpha", 1.0), 1.0, 1.0)


def _celu_slopes(node, r: Range):
    """celu' = e^(x/alpha) (x < 0, alpha > 0), 1 (x > 0)."""
    a = _param(node, "alpha", 1.0)
    if not a > 0:
        raise _NotLipschitz(f"alpha = {a} <= 0: the slope of the negative branch is unbounded")
    return AD.exp_branch_slopes(r, 1.0, 1.0 / a, 1.0)


def _softplus_params(node) -> tuple[float, float, float]:
    beta = _param(node, "beta", 1.0)
    threshold = _param(node, "threshold", 20.0, allow_inf=True)
    if not beta > 0:
        raise _NotLipschitz(f"beta = {beta} <= 0 is not a proven case")
    jump = math.log1p(math.exp(-threshold)) / beta if threshold != math.inf else 0.0
    return beta, threshold, jump


def _softplus_ranges(node, r: Range) -> Range:
    """PyTorch's softplus is within ``jump = log1p(exp(-threshold))/beta`` below the (monotone) exact softplus
    c (it switches to x past the threshold): f(x) in [c(lo) - jump, c(hi)] within [f(lo) - jump, f(hi) + jump]."""
    beta, threshold, jump = _softplus_params(node)
    a = F.softplus(r.lo, beta, threshold) - jump
    b = F.softplus(r.hi, beta, threshold) + jump
    return Range(a, b).widened()


def _softplus_slopes(node, r: Range):
    """softplus' = sigma(beta x), increasing: [sigma(beta lo), sigma(beta hi)] widened; with a finite threshold
    (a jump at x = threshold/beta) exactly 1 on ranges past it, and inf (no finite slope: the global rule) on
    ranges that meet it."""
    beta, threshold, jump = _softplus_params(node)
    lo, hi = AD.widen_rel(torch.sigmoid(beta * r.lo), torch.sigmoid(beta * r.hi))
    lo, hi = lo.clamp(min=0.0), hi.clamp(max=1.0)
    if jump == 0.0:
        return lo, hi
    slack = 1e-6 * (1 + abs(threshold))  # the model may compare beta * x with the threshold in float32
    below = beta * r.hi < threshold - slack
    above = beta * r.lo > threshold + slack
    one, inf = torch.ones_like(lo), torch.full_like(lo, math.inf)
    lo = torch.where(below, lo, torch.where(above, one, -inf))
    hi = torch.where(below, hi, torch.where(above, one, inf))
    return lo, hi


def _hardtanh_slopes(node, r: Range):
    lo = _param(node, "min_val", -1.0, allow_inf=True)
    hi = _param(node, "max_val", 1.0, allow_inf=True)
    return AD.clamp_slopes(r, lo, hi)


def _gelu_ranges(node, r: Range) -> Range:
    approx = _attr(node, "approximate", "none")
    return AD.quasi_convex_range(lambda t: F.gelu(t, approximate=approx),
                                 "gelu_tanh" if approx == "tanh" else "gelu", r)


def _gelu_slopes(node, r: Range):
    glob = _gelu_interval(node)
    if _attr(node, "approximate", "none") == "tanh":
        return AD.critical_slopes(r, AD.gelu_tanh_prime, "gelu_tanh", glob)
    return AD.critical_slopes(r, AD.gelu_prime, "gelu", glob)


_interval_rule(
    "leaky_relu",
    lambda node, x: F.leaky_relu(x, float(_attr(node, "negative_slope", 0.01))),
    _leaky_interval,
    "leaky_relu' in {alpha, 1}: L = max(1, |alpha|) (exact).",
    ranges=lambda node, r: AD.endpoint_range(_leaky_fn(node), r, kink=0.0),
    neuron_slopes=_leaky_slopes,
)
_interval_rule(
    "elu",
    lambda node, x: F.elu(x, float(_attr(node, "alpha", 1.0))),
    _elu_interval,
    "elu' = alpha e^x (x<0), 1 (x>0): L = max(1, |alpha|) (exact).",
    ranges=lambda node, r: AD.endpoint_range(lambda t: F.elu(t, _param(node, "alpha", 1.0)), r, kink=0.0),
    neuron_slopes=_elu_slopes,
)
_interval_rule(
    "celu",
    lambda node, x: F.celu(x, float(_attr(node, "alpha", 1.0))),
    _celu_interval,
    "celu' = e^(x/alpha) (x<0), 1 (x>0): L = 1 for alpha > 0 (exact); alpha <= 0: inf.",
    ranges=lambda node, r: AD.endpoint_range(lambda t: F.celu(t, _param(node, "alpha", 1.0)), r, kink=0.0),
    neuron_slopes=_celu_slopes,
)
_interval_rule(
    "softplus",
    lambda node, x: F.softplus(x, float(_attr(node, "beta", 1.0)), float(_attr(node, "threshold", 20.0))),
    _softplus_interval,
    "softplus' = sigma(beta x) in (0,1): L = 1 (exact) when beta > 0 and the threshold switch is no jump "
    "(threshold = inf, as ONNX Softplus); PyTorch's finite threshold makes a jump of log1p(exp(-threshold))/beta: "
    "L = inf.",
    ranges=_softplus_ranges,
    neuron_slopes=_softplus_slopes,
)
_interval_rule(
    "hardtanh",
    lambda node, x: F.hardtanh(x, float(_attr(node, "min_val", -1.0)), float(_attr(node, "max_val", 1.0))),
    _hardtanh_interval,
    "clamp(x, lo, hi)' in {0,1}: L = 1 (exact).",
    monotone=True,
    neuron_slopes=_hardtanh_slopes,
)
_interval_rule(
    "gelu",
    lambda node, x: F.gelu(x, approximate=_attr(node, "approximate", "none")),
    _gelu_interval,
    "gelu' = Phi(x) + x phi(x) in [-0.128905, 1.128905], extremes at +-sqrt2 (exact form, rounded out); "
    "tanh approximation: [-0.128994, 1.128994] (numerical).",
    ranges=_gelu_ranges,
    neuron_slopes=_gelu_slopes,
)
_interval_rule(
    "prelu",
    lambda node, x: F.prelu(x, node.params["weight"]),
    _prelu_interval,
    "prelu' in {a_c, 1} per channel: L = max(1, max_c |a_c|) (exact).",
    ranges=_prelu_ranges,
    neuron_slopes=_prelu_slopes,
)


def _softmax_forward(node, x):
    return F.softmax(x, dim=node.attrs["dim"])


def _softmax_lipschitz(node, ctx: Settings) -> LocalConstant:
    """J = diag(p) - p p^T is PSD with Gershgorin rows 2 p_i (1 - p_i) <= 1/2: L <= 1/2 (certified)."""
    return exact(0.5, "gershgorin")


def _log_softmax_forward(node, x):
    return F.log_softmax(x, dim=node.attrs["dim"])


def _log_softmax_lipschitz(node, ctx: Settings) -> LocalConstant:
    """J = I - 1 p^T: ||J|| <= 1 + ||1|| ||p|| <= 1 + sqrt(n), n the softmax dimension (certified)."""
    n = node.in_shapes[0][node.attrs["dim"]]
    return LocalConstant([1.0 + math.sqrt(n)], True, "triangle", lower=math.sqrt(max(n - 1, 0)))


_F64_U = 2.0 ** -52


def _sum_except(v: torch.Tensor, dim: int, upper: bool) -> torch.Tensor:
    """``sum_{j != i} v_j`` along ``dim`` for v >= 0, as ``sum_j v_j - v_i`` rounded up (``upper``) or down: the
    float sum of n terms has relative error below (n + 2) u, u = 2^-52."""
    n = v.shape[dim]
    g = (n + 4) * _F64_U
    total = v.sum(dim=dim, keepdim=True)
    if upper:
        return total * (1 + g) - v * (1 - g)
    return torch.clamp(total * (1 - g) - v * (1 + g), min=0.0)


def _softmax_logit_bounds(node, r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_i`` with ``p_i = sigmoid(-z_i)``, ``z_i = log sum_{j != i} exp(x_j - x_i)``: a lower bound ``z_lo``
    (others at their lower ends, x_i at its upper end) and an upper bound ``z_hi`` (the reverse), computed with
    the shift c = max along the dim, rounding of the exps, sums and logs covered by an absolute margin."""
    dim = node.attrs["dim"]
    c_lo = r.lo.amax(dim=dim, keepdim=True)
    c_hi = r.hi.amax(dim=dim, keepdim=True)
    s_lo = _sum_except(torch.exp(r.lo - c_lo), dim, upper=False)  # sum_{j != i} e^{l_j - c_lo}, from below
    s_hi = _sum_except(torch.exp(r.hi - c_hi), dim, upper=True)  # sum_{j != i} e^{u_j - c_hi}, from above
    z_lo = torch.log(s_lo) + (c_lo - r.hi)
    z_hi = torch.log(s_hi) + (c_hi - r.lo)
    # each exp/log/subtraction: relative errors of O(u) on the terms, i.e. an absolute error in z below
    # 1e-15 (|log s| + |c| + |x| + 1); 1e-12 of that is ample.
    err_lo = 1e-12 * (z_lo.abs().nan_to_num(0.0, 0.0, 0.0) + c_lo.abs() + r.hi.abs() + 1)
    err_hi = 1e-12 * (z_hi.abs() + c_hi.abs() + r.lo.abs() + 1)
    return z_lo - err_lo, z_hi + err_hi


def softmax_ranges(node, r: Range) -> Range:
    """p_i in [1/(1 + sum_{j!=i} e^{u_j - l_i}), 1/(1 + sum_{j!=i} e^{l_j - u_i})] (exact enclosure of each
    coordinate: p_i increases in x_i and decreases in the others), as sigmoids of the shifted log-sums,
    rounded outward and kept in [0, 1]."""
    z_lo, z_hi = _softmax_logit_bounds(node, r)
    lo, hi = AD.widen_rel(torch.sigmoid(-z_hi), torch.sigmoid(-z_lo))
    return Range(lo.clamp(min=0.0), hi.clamp(max=1.0))


def log_softmax_ranges(node, r: Range) -> Range:
    """log p_i = log sigmoid(-z_i), with the bounds of :func:`softmax_ranges`, rounded outward, <= 0."""
    z_lo, z_hi = _softmax_logit_bounds(node, r)
    lo, hi = F.logsigmoid(-z_hi), F.logsigmoid(-z_lo)
    return Range(lo - 1e-12 * (1 + lo.abs()), (hi + 1e-12 * (1 + hi.abs())).clamp(max=0.0))


def _max_p1mp(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max of p (1 - p) over [lo, hi] within [0, 1]: 1/4 if 1/2 is inside, else at the end closest to 1/2."""
    closest = torch.clamp(torch.full_like(lo, 0.5), lo, hi)
    return closest * (1 - closest)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The tensor as (rows, n): one row per softmax vector."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def softmax_local(node, ins, settings: Settings) -> LocalConstant | None:
    """J = diag(p) - p p^T per softmax vector (blocks of a block-diagonal Jacobian: the norm is the max over
    rows). J is PSD with J <= diag(p), so ||J|| <= max_i p_i, and its Gershgorin rows are 2 p_i (1 - p_i):
    ||J|| <= min(max_i p_hi_i, max_i 2 max_{p in [p_lo_i, p_hi_i]} p (1 - p)) over the p ranges (certified)."""
    p = softmax_ranges(node, ins[0])
    dim = node.attrs["dim"]
    lo, hi = _rows(p.lo, dim), _rows(p.hi, dim)
    if lo.numel() == 0:
        return None
    loewner = hi.amax(dim=1)
    gersh = (2 * _max_p1mp(lo, hi)).amax(dim=1)
    v = float(torch.minimum(loewner, gersh).amax()) * (1 + 1e-9)
    return LocalConstant([min(v, 0.5)], True, "domain: softmax ranges (max p, Gershgorin)")


def log_softmax_local(node, ins, settings: Settings) -> LocalConstant | None:
    """J = I - 1 p^T has singular values 1 (n - 2 times), 0 (J 1 = 0) and sqrt(n) ||p||_2 (the Frobenius norm
    is n - 2 + n ||p||^2), and n ||p||^2 >= 1: ||J|| = sqrt(n) ||p||_2 (exact). With ||p||^2 <= max_i p_i (as
    sum p = 1) and <= sum_i p_hi_i^2 over the p ranges: ||J|| <= sqrt(n min(max p_hi, sum p_hi^2)), max over
    rows (certified)."""
    p = softmax_ranges(node, ins[0])
    dim = node.attrs["dim"]
    hi = _rows(p.hi, dim)
    if hi.numel() == 0:
        return None
    n = hi.shape[1]
    q = torch.minimum(hi.amax(dim=1), (hi * hi).sum(dim=1) * (1 + (n + 4) * _F64_U))
    v = math.sqrt(n * float(q.amax())) * (1 + 1e-9)
    return LocalConstant([min(v, 1.0 + math.sqrt(n))], True, "domain: log_softmax ranges (sqrt(n) ||p||)")


register_rule("softmax", _softmax_forward, _softmax_lipschitz, ranges=softmax_ranges, local=softmax_local)
register_rule("log_softmax", _log_softmax_forward, _log_softmax_lipschitz, ranges=log_softmax_ranges,
              local=log_softmax_local)
