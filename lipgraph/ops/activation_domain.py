"""Interval math of elementwise activations on an input range (ranges and per-neuron derivative intervals).

Everything is float64 and rounded outward. Two kinds of derivative intervals:

* *piecewise exact*: ReLU-like maps (relu6, hardtanh, hardsigmoid, hardswish, abs, leaky/prelu, and the linear
  branch of elu/celu/selu) get the exact set of derivatives on ``[lo, hi]`` (Clarke hull at a kink), and the
  monotone derivatives (sigmoid/tanh: even and decreasing in ``|x|``; softplus: increasing; the exponential
  branch of elu/celu/selu: monotone) get their endpoint values, rounded outward relatively;
* *critical points*: for a smooth activation whose derivative is not monotone (silu, gelu, mish), f' has two
  bracketed critical points (:data:`SLOPE_CRITICAL`) and is monotone between them, so the endpoint values and
  the global extremes (where a bracket is met) give its range; intersected with the *Taylor* enclosure
  ``f'(x) in f'(m) +- K2 (hi - lo)/2`` (``m`` the midpoint, ``K2 >= sup |f''|``, mean value theorem) and the
  global slope interval. ``f'`` is a closed form in float64 with an absolute margin
  :data:`SLOPE_EVAL_MARGIN`.

Ranges: monotone pieces give endpoint values; the quasi-convex activations (silu, gelu, mish, hardswish:
decreasing then increasing, one minimiser ``x*``) give ``[min f, max(f(lo), f(hi))]`` where ``min f`` is a
certified lower bound of ``f(x*)`` when a bracket of ``x*`` meets ``[lo, hi]``, else the smaller endpoint
value; sin/cos use their periodicity.
"""

from __future__ import annotations

import math

import torch

from ..core import ROUNDING_MARGIN
from ..domains import Range

_TINY = 2.2250738585072014e-308
#: Absolute margin on a derivative evaluated in float64 at one point (its rounding is a few ulp of O(1) terms).
SLOPE_EVAL_MARGIN = 1e-9
#: Relative margin on exp/sigmoid/tanh-derived values (their arguments are below 745 in size where the value is
#: not 0 or 1 in float64, so the relative error is below 745 * 2^-52 < 1e-12).
REL_MARGIN = 1e-9

# sup |f''| constants (K2 of the Taylor slope rule):
#: silu'' = s(1-s)(2 + x(1-2s)) with s = sigmoid(x): its sup |.| is 1/2, at x = 0 (s(1-s) <= 1/4 there and the
#: factor 2 + x(1-2s) is 2 at 0 and decays with s(1-s) elsewhere; the minimum of silu'' is about -0.0998);
#: checked on a 1e-5 grid of [-12, 12] in tests/test_domain_rules.py.
K2_SILU = 0.5 * (1 + 1e-12)
#: gelu'' = phi(x)(2 - x^2): critical points 0 and +-2 (d/dx = phi(x) x (x^2 - 4)), values 2 phi(0) = sqrt(2/pi)
#: and -2 phi(2) = -0.108: sup = sqrt(2/pi) = 0.7978845608... (exact, rounded up).
K2_GELU = math.sqrt(2.0 / math.pi) * (1 + 1e-12)
#: tanh-approximate gelu: numerical sup |f''| = 0.7978846 at x = 0 (1e-5 grid on [-12, 12], |f''| decays like
#: x^3 e^(-x^2) beyond), rounded up to 0.80.
K2_GELU_TANH = 0.80
#: mish: numerical sup |f''| = 0.644205 at x = -0.0879 (1e-5 grid on [-12, 12]), rounded up to 0.66.
K2_MISH = 0.66

#: Quasi-convex activations: (bracket of the minimiser x*, certified lower bound of f(x*)). The brackets hold a
#: sign change of f' (tested) and the lower bounds are the float64 minimum rounded down at the 7th decimal.
MINIMA = {
    "silu": ((-1.27847, -1.27846), -0.2784646),  # f(x*) = x* + 1, x* = -1.2784645...
    "gelu": ((-0.751792, -0.751791), -0.1699713),  # x* = -0.7517915...
    "gelu_tanh": ((-0.752462, -0.752461), -0.1700408),  # x* = -0.7524614...
    "mish": ((-1.192432, -1.192431), -0.3088435),  # x* = -1.1924312...
    "hardswish": ((-1.5, -1.5), -0.375),  # x(x+3)/6 on [-3, 3]: x* = -3/2, f = -3/8 (exact)
}


def widen_rel(lo: torch.Tensor, hi: torch.Tensor, rel: float = REL_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lo, hi]`` widened by ``rel`` of each end's size plus the smallest normal float."""
    return lo - rel * lo.abs() - _TINY, hi + rel * hi.abs() + _TINY


def endpoint_range(f, r: Range, kink: float | None = None) -> Range:
    """The range of a map that is monotone on each side of ``kink`` (or everywhere when None):
    ``[min, max]`` of ``f(lo)``, ``f(hi)`` and, where ``lo <= kink <= hi``, ``f(kink)``; widened."""
    a, b = f(r.lo), f(r.hi)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    if kink is not None:
        inside = (r.lo <= kink) & (r.hi >= kink)
        fk = f(torch.full_like(r.lo, kink))
        lo = torch.where(inside, torch.minimum(lo, fk), lo)
        hi = torch.where(inside, torch.maximum(hi, fk), hi)
    return _widened_by_value_and_argument(Range(lo, hi), r)


def quasi_convex_range(f, name: str, r: Range) -> Range:
    """``f`` decreasing then increasing (minimiser in the bracket ``MINIMA[name]``): the max is at an endpoint,
    the min is ``f(x*)`` (its certified lower bound) where ``[lo, hi]`` meets the bracket, else at an endpoint."""
    (b_lo, b_hi), fmin = MINIMA[name]
    a, b = f(r.lo), f(r.hi)
    meets = (r.lo <= b_hi) & (r.hi >= b_lo)
    lo = torch.where(meets, torch.full_like(a, fmin), torch.minimum(a, b))
    return _widened_by_value_and_argument(Range(lo, torch.maximum(a, b)), r)


def _widened_by_value_and_argument(out: Range, r: Range) -> Range:
    """Widened by the margin times ``|f| + |x|``: covers the absolute rounding of float evaluations whose
    cancellation is relative to the argument (e.g. gelu's ``x Phi(x)`` with ``Phi = (1 + erf)/2`` in the tail)."""
    return out.widened(out.abs_max + r.abs_max)


def abs_range(r: Range) -> Range:
    """|x| on [lo, hi]: [abs_min, abs_max] (exact)."""
    return Range(r.abs_min, r.abs_max)


def cos_range(lo: torch.Tensor, hi: torch.Tensor) -> Range:
    """cos on [lo, hi]: the endpoint values, 1 where a multiple of 2 pi lies inside, -1 where an odd multiple of
    pi does (decided on float quotients: a wrong call near a boundary only changes the value by O(ulp^2),
    covered by the absolute widening), [-1, 1] when the width exceeds 2 pi."""
    ca, cb = torch.cos(lo), torch.cos(hi)
    k_even_lo = torch.ceil(lo / (2 * math.pi) - 1e-9)
    k_even_hi = torch.floor(hi / (2 * math.pi) + 1e-9)
    has_max = k_even_hi >= k_even_lo
    k_odd_lo = torch.ceil((lo - math.pi) / (2 * math.pi) - 1e-9)
    k_odd_hi = torch.floor((hi - math.pi) / (2 * math.pi) + 1e-9)
    has_min = k_odd_hi >= k_odd_lo
    wide = (hi - lo) >= 2 * math.pi
    out_hi = torch.where(has_max | wide, torch.ones_like(ca), torch.maximum(ca, cb))
    out_lo = torch.where(has_min | wide, -torch.ones_like(ca), torch.minimum(ca, cb))
    # cos/sin of a float64 argument x: error a few ulp plus the argument's own ulp, below 1e-15 (1 + |x|).
    err = ROUNDING_MARGIN * (1 + torch.maximum(lo.abs(), hi.abs()))
    return Range((out_lo - err).clamp(min=-1.0), (out_hi + err).clamp(max=1.0))


def sin_range(lo: torch.Tensor, hi: torch.Tensor) -> Range:
    """sin x = cos(x - pi/2): the cos enclosure of the shifted interval (its rounding, below ulp(|x| + 2), is
    covered by the absolute margin of :func:`cos_range`, which grows with |x|)."""
    return cos_range(lo - math.pi / 2, hi - math.pi / 2)


def two_branch_slopes(r: Range, neg_lo: torch.Tensor, neg_hi: torch.Tensor,
                      pos: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of a map with branches on x < 0 and x > 0: ``[neg_lo, neg_hi]`` bounds the negative
    branch's derivative on ``[lo, min(hi, 0)]``, ``pos`` the (constant) positive one; the hull of the branches
    that ``[lo, hi]`` meets (both at 0: Clarke)."""
    pos_t = torch.broadcast_to(torch.as_tensor(pos, dtype=r.lo.dtype), r.lo.shape)
    has_neg, has_pos = r.lo <= 0, r.hi >= 0
    inf = torch.full_like(r.lo, math.inf)
    lo = torch.minimum(torch.where(has_neg, neg_lo, inf), torch.where(has_pos, pos_t, inf))
    hi = torch.maximum(torch.where(has_neg, neg_hi, -inf), torch.where(has_pos, pos_t, -inf))
    return lo, hi


def exp_branch_slopes(r: Range, scale: float, rate: float, pos: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``f'(x) = scale * exp(rate x)`` for x < 0 (monotone: its endpoint values on ``[lo, min(hi, 0)]``,
    rounded outward relatively), ``pos`` for x > 0 (exact)."""
    top = torch.clamp(r.hi, max=0.0)
    a = scale * torch.exp(rate * r.lo)
    b = scale * torch.exp(rate * top)
    neg_lo, neg_hi = widen_rel(torch.minimum(a, b), torch.maximum(a, b))
    return two_branch_slopes(r, neg_lo, neg_hi, pos)


def clamp_slopes(r: Range, a: float, b: float, value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` * clamp(x, a, b)': ``value`` where ``a < lo <= hi < b`` (exact), 0 where ``[lo, hi]`` misses
    ``[a, b]``, ``[0, value]`` (Clarke) where it meets a kink."""
    inner = (r.lo > a) & (r.hi < b)
    meets = (r.hi >= a) & (r.lo <= b) & (b > a)
    z = torch.zeros_like(r.lo)
    return torch.where(inner, z + value, z), torch.where(meets, z + value, z)


def hardsigmoid_slopes(r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    """1/6 on (-3, 3), 0 outside: ``[1/6 rounded down, 1/6 rounded up]`` inside, [0, ...] at the kinks."""
    lo, _ = clamp_slopes(r, -3.0, 3.0, math.nextafter(1.0 / 6.0, 0.0))
    _, hi = clamp_slopes(r, -3.0, 3.0, math.nextafter(1.0 / 6.0, 1.0))
    return lo, hi


def hardswish_slopes(r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    """0 on x < -3, (2x + 3)/6 on (-3, 3) (increasing: its values at the clipped ends, widened), 1 on x > 3;
    the hull of the pieces ``[lo, hi]`` meets (Clarke at -3: [-1/2, 0], at 3: [1, 3/2])."""
    inf = torch.full_like(r.lo, math.inf)
    zero, one = torch.zeros_like(r.lo), torch.ones_like(r.lo)
    a = torch.clamp(r.lo, -3.0, 3.0)
    b = torch.clamp(r.hi, -3.0, 3.0)
    mid_lo, mid_hi = widen_rel((2 * a + 3) / 6, (2 * b + 3) / 6)
    mid_lo, mid_hi = mid_lo - 1e-15, mid_hi + 1e-15
    has_left, has_mid, has_right = r.lo <= -3, (r.hi >= -3) & (r.lo <= 3), r.hi >= 3
    lo = torch.minimum(torch.minimum(torch.where(has_left, zero, inf), torch.where(has_mid, mid_lo, inf)),
                       torch.where(has_right, one, inf))
    hi = torch.maximum(torch.maximum(torch.where(has_left, zero, -inf), torch.where(has_mid, mid_hi, -inf)),
                       torch.where(has_right, one, -inf))
    return lo, hi


def abs_slopes(r: Range) -> tuple[torch.Tensor, torch.Tensor]:
    """|x|' = -1 (x < 0), 1 (x > 0), [-1, 1] at 0 (exact)."""
    one = torch.ones_like(r.lo)
    return torch.where(r.lo > 0, one, -one), torch.where(r.hi < 0, -one, one)


def even_decreasing_slopes(r: Range, fprime, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``f'`` even and decreasing in ``|x|`` (sigmoid, tanh): max at the point closest to 0 (``abs_min``), min at
    the farthest (``abs_max``); rounded outward relatively, within ``[0, top]``."""
    lo, hi = widen_rel(fprime(r.abs_max), fprime(r.abs_min))
    return lo.clamp(min=0.0), hi.clamp(max=top)


def sigmoid_prime(t: torch.Tensor) -> torch.Tensor:
    """sigma'(t) = e^-|t| / (1 + e^-|t|)^2 (no cancellation)."""
    e = torch.exp(-t.abs())
    return e / (1 + e) ** 2


def tanh_prime(t: torch.Tensor) -> torch.Tensor:
    """tanh'(t) = 4 e^-2|t| / (1 + e^-2|t|)^2 (no cancellation)."""
    e = torch.exp(-2 * t.abs())
    return 4 * e / (1 + e) ** 2


def taylor_slopes(r: Range, fprime, k2: float, glob: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``f'(x) in f'(m) +- K2 (rad + ulp)`` for x in [lo, hi] (mean value theorem on f'), ``m`` the float
    midpoint (within ``rad`` of both ends up to rounding, covered by the 1e-9 relative slack), plus the absolute
    evaluation margin; intersected with the global interval ``glob``."""
    m = r.mid
    d = fprime(m)
    err = k2 * (r.rad * (1 + 1e-9) + 1e-300) + SLOPE_EVAL_MARGIN
    lo = torch.clamp(d - err, min=glob[0])
    hi = torch.clamp(d + err, max=glob[1])
    return lo, hi


#: The two critical points of f' (zeros of f''), bracketed: f' falls to its global minimum at the first,
#: rises to its global maximum at the second, and is monotone on each side. silu: x tanh(x/2) = 2 (even, and
#: increasing on x > 0: exactly two roots, +-2.39936); gelu: 2 - x^2 = 0, +-sqrt(2) (exact); the tanh gelu
#: and mish: the only sign changes of f'' on a 1e-5 grid of [-30, 30] (tested; f' tends monotonically to its
#: limits beyond).
SLOPE_CRITICAL = {
    "silu": ((-2.3994, -2.3993), (2.3993, 2.3994)),
    "gelu": ((-1.414214, -1.414213), (1.414213, 1.414214)),
    "gelu_tanh": ((-1.41852, -1.41849), (1.41849, 1.41852)),
    "mish": ((-2.25639, -2.25636), (1.49056, 1.49059)),
}


def critical_slopes(r: Range, fprime, name: str, glob: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact derivative range of a smooth activation whose f' has the two critical points
    ``SLOPE_CRITICAL[name]`` (a minimum then a maximum, the global interval's ends ``glob``): f' is monotone on
    any interval missing both brackets, so its range is the hull of the endpoint values (plus the evaluation
    margin), extended to ``glob[0]`` / ``glob[1]`` where ``[lo, hi]`` meets the minimum's / maximum's bracket;
    intersected with the Taylor enclosure (both are sound)."""
    (a0, b0), (a1, b1) = SLOPE_CRITICAL[name]
    da, db = fprime(r.lo), fprime(r.hi)
    lo = torch.minimum(da, db) - SLOPE_EVAL_MARGIN
    hi = torch.maximum(da, db) + SLOPE_EVAL_MARGIN
    lo = torch.where((r.lo <= b0) & (r.hi >= a0), torch.full_like(lo, glob[0]), lo).clamp(min=glob[0])
    hi = torch.where((r.lo <= b1) & (r.hi >= a1), torch.full_like(hi, glob[1]), hi).clamp(max=glob[1])
    k2 = {"silu": K2_SILU, "gelu": K2_GELU, "gelu_tanh": K2_GELU_TANH, "mish": K2_MISH}[name]
    t_lo, t_hi = taylor_slopes(r, fprime, k2, glob)
    return torch.maximum(lo, t_lo), torch.minimum(hi, t_hi)


def silu_prime(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def gelu_prime(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) + x phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def gelu_tanh_prime(x: torch.Tensor) -> torch.Tensor:
    """d/dx 0.5 x (1 + tanh u), u = c (x + 0.044715 x^3), c = sqrt(2/pi)."""
    c = math.sqrt(2 / math.pi)
    u = c * (x + 0.044715 * x ** 3)
    return 0.5 * (1 + torch.tanh(u)) + 0.5 * x * tanh_prime(u) * c * (1 + 3 * 0.044715 * x * x)


def mish_prime(x: torch.Tensor) -> torch.Tensor:
    """d/dx x tanh(sp(x)) = tanh(sp) + x sech^2(sp) sigma(x), sp = softplus (stable form)."""
    sp = torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))
    return torch.tanh(sp) + x * tanh_prime(sp) * torch.sigmoid(x)
