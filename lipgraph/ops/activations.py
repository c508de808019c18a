"""Elementwise activations.

An elementwise map ``y_j = s(x_j)`` has the diagonal Jacobian ``diag(s'(x))``,
so its l2 Lipschitz constant is exactly ``sup_t |s'(t)|``. Each rule records
the interval ``[a, b]`` containing every derivative (``slope``), which SeqLip
uses; the constant is ``max(|a|, |b|)``. All values are certified: closed forms
where they exist, otherwise the sup of the derivative found on a 1e-5 grid
over [-30, 30] in float64 (outside it the derivative is monotone to its limit)
and rounded *outward* at the 6th decimal, which exceeds the grid error of
order ``1e-10`` (tested against a numerical sup in ``tests/test_rules.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..domains import Range
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
_fixed("relu6", F.relu6, (0.0, 1.0), "min(max(x,0),6)' in {0,1}: L = 1 (exact).")
_fixed("sigmoid", torch.sigmoid, (0.0, 0.25), "sigma' = sigma(1-sigma) in (0,1/4]: L = 1/4 (exact, at 0).")
_fixed("tanh", torch.tanh, (0.0, 1.0), "tanh' = 1 - tanh^2 in (0,1]: L = 1 (exact, at 0).")
_fixed("selu", F.selu, (0.0, _up(_SELU_SCALE * _SELU_ALPHA)),
       "selu' = scale*alpha*e^x (x<0), scale (x>0): L = scale*alpha = 1.758100 (sup at 0-).")
_fixed("silu", F.silu, (-0.09984, 1.09984), "(x sigma(x))' in [-0.099840, 1.099840] (numerical sup at x=+-2.3994).")
_fixed("mish", F.mish, (-0.112527, 1.088499), "mish' in [-0.112527, 1.088499] (numerical sup at x=1.4906).")
_fixed("hardswish", F.hardswish, (-0.5, 1.5), "hardswish' = (2x+3)/6 on [-3,3], 0 or 1 outside: L = 3/2 (exact, at 3).")
_fixed("hardsigmoid", F.hardsigmoid, (0.0, 1.0 / 6.0), "hardsigmoid' = 1/6 on (-3,3), 0 outside: L = 1/6 (exact).")
_fixed("abs", torch.abs, (-1.0, 1.0), "|x|' = +-1: L = 1 (exact).")
_fixed("sin", torch.sin, (-1.0, 1.0), "sin' = cos in [-1, 1]: L = 1 (exact, at 0).")
_fixed("cos", torch.cos, (-1.0, 1.0), "cos' = -sin in [-1, 1]: L = 1 (exact, at pi/2).")


def _attr(node, name, default):
    return node.attrs.get(name, default)


class _NotLipschitz(Exception):  # noqa: N818 - internal signal from a slope interval
    """Raised by an interval function whose parameters make the activation unbounded or discontinuous."""


def _interval_rule(kind: str, fn, interval, doc: str) -> None:
    """An activation whose slope interval depends on its attributes."""

    def lipschitz(node, ctx: Settings) -> LocalConstant:
        try:
            a, b = interval(node)
        except _NotLipschitz as exc:
            return not_lipschitz(f"{kind} at node {node.name!r} ({node.source}): {exc}")
        if not (math.isfinite(a) and math.isfinite(b)):
            return not_lipschitz(f"{kind} at node {node.name!r} ({node.source}): its parameters are not finite")
        return exact(max(abs(a), abs(b)), "slope-bound")

    register_rule(kind, fn, lipschitz, slope=None, doc=doc)
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


_interval_rule(
    "leaky_relu",
    lambda node, x: F.leaky_relu(x, float(_attr(node, "negative_slope", 0.01))),
    _leaky_interval,
    "leaky_relu' in {alpha, 1}: L = max(1, |alpha|) (exact).",
)
_interval_rule(
    "elu",
    lambda node, x: F.elu(x, float(_attr(node, "alpha", 1.0))),
    _elu_interval,
    "elu' = alpha e^x (x<0), 1 (x>0): L = max(1, |alpha|) (exact).",
)
_interval_rule(
    "celu",
    lambda node, x: F.celu(x, float(_attr(node, "alpha", 1.0))),
    _celu_interval,
    "celu' = e^(x/alpha) (x<0), 1 (x>0): L = 1 for alpha > 0 (exact); alpha <= 0: inf.",
)
_interval_rule(
    "softplus",
    lambda node, x: F.softplus(x, float(_attr(node, "beta", 1.0)), float(_attr(node, "threshold", 20.0))),
    _softplus_interval,
    "softplus' = sigma(beta x) in (0,1): L = 1 (exact) when beta > 0 and the threshold switch is no jump "
    "(threshold = inf, as ONNX Softplus); PyTorch's finite threshold makes a jump of log1p(exp(-threshold))/beta: "
    "L = inf.",
)
_interval_rule(
    "hardtanh",
    lambda node, x: F.hardtanh(x, float(_attr(node, "min_val", -1.0)), float(_attr(node, "max_val", 1.0))),
    _hardtanh_interval,
    "clamp(x, lo, hi)' in {0,1}: L = 1 (exact).",
)
_interval_rule(
    "gelu",
    lambda node, x: F.gelu(x, approximate=_attr(node, "approximate", "none")),
    _gelu_interval,
    "gelu' = Phi(x) + x phi(x) in [-0.128905, 1.128905], extremes at +-sqrt2 (exact form, rounded out); "
    "tanh approximation: [-0.128994, 1.128994] (numerical).",
)
_interval_rule(
    "prelu",
    lambda node, x: F.prelu(x, node.params["weight"]),
    _prelu_interval,
    "prelu' in {a_c, 1} per channel: L = max(1, max_c |a_c|) (exact).",
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


register_rule("softmax", _softmax_forward, _softmax_lipschitz)
register_rule("log_softmax", _log_softmax_forward, _log_softmax_lipschitz)
