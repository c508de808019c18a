"""Selections and running sums: elementwise max/min, max/min reductions, logsumexp, where with a
constant condition, cumulative sums.

* ``maximum(a, b)`` (and min, and ONNX Max/Min over k operands): per entry
  ``|max_i a_i - max_i a'_i| <= max_i |a_i - a'_i| <= sqrt(sum_i |a_i - a'_i|^2)``, so summing squares
  ``||M(a) - M(a')||^2 <= sum_i c_i ||a_i - a'_i||^2`` with ``c_i`` the copies broadcasting makes of an
  entry of ``a_i``: ``combine="l2"``, partial_i = sqrt(|y| / |a_i|) (certified; 1 each without broadcasting).
* ``amax/amin`` (and ``max(x)``/``min(x)`` over every entry, ONNX ReduceMax/ReduceMin) over disjoint groups:
  ``|max_G a - max_G a'| <= max_G |a - a'| <= ||(a - a')_G||_2``: L = 1 (exact, attained).
* ``logsumexp`` over disjoint groups: the gradient is softmax p, ``||p||_2 <= ||p||_1 = 1``: L = 1
  (certified; approached when one entry dominates).
* ``topk`` values (ONNX TopK, indices unused): sorting a slice is 1-Lipschitz in l2
  (``||sort a - sort b|| <= ||a - b||``, rearrangement inequality) and the top k are a coordinate
  projection of it: L = 1 (exact, attained where the order is locally constant).
* ``where(c, a, b)`` with a constant condition: every output entry copies an entry of a or of b, so
  ``||dy||^2 <= k_a ||da||^2 + k_b ||db||^2``: ``combine="l2"``, partials sqrt(|y| / |a|), sqrt(|y| / |b|).
* ``cumsum`` along a dim of length n: the n x n lower-triangular all-ones matrix T_n (reverse: flipped;
  exclusive: T_{n-1} padded with a zero row and column), acting on every other index alike, so
  ``L = ||T_m||_2 = 1 / (2 sin(pi / (2 (2m + 1))))`` with m = n (m = n - 1 exclusive) (exact closed form:
  T_m^{-1} T_m^{-T} is the path-graph matrix whose eigenvalues are 4 sin^2((2k-1) pi / (2(2m+1)));
  rounded up by ROUNDING_MARGIN; checked against a float64 SVD in the tests).

Ranges (input domains): every op here is nondecreasing in each input entry, so ``monotone=True``
(``[f(lo), f(hi)]``, widened by the pass): max/min of several operands or over a group; the top-k values (the
j-th largest entry is ``max over j-subsets of the subset's min``, a max-min of coordinates); where with a
constant condition (each entry copies an input entry or a constant); cumsum (0/1 weights). ``logsumexp`` is
monotone too, with its own rule for the rounding of ``log``.
"""

from __future__ import annotations

import math

import torch

from ..core import ROUNDING_MARGIN
from ..domains import Range
from .registry import LocalConstant, Settings, exact, not_lipschitz, register_rule


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _copies(node) -> list[float]:
    out_n = _numel(node.out_shape)
    return [math.sqrt(out_n / max(_numel(s), 1)) for s in node.in_shapes]


# --- elementwise max / min ----------------------------------------------------------------------------


def elementwise_max_forward(node, *xs):
    pick = torch.maximum if node.attrs["kind"] == "max" else torch.minimum
    out = xs[0]
    for x in xs[1:]:
        out = pick(out, x)
    const = node.params.get("const")
    return pick(out, const.to(out.dtype)) if const is not None else out


def elementwise_max_lipschitz(node, ctx: Settings) -> LocalConstant:
    """max/min of k operands: |max_i a_i - max_i a'_i| <= sqrt(sum_i |da_i|^2) per entry, so combine l2 with
    partial_i = sqrt(|y| / |a_i|) (broadcast copies; 1 without broadcasting) (certified, exact for k = 1)."""
    return LocalConstant(_copies(node), True, "selection", combine="l2")


register_rule("elementwise_max", elementwise_max_forward, elementwise_max_lipschitz, monotone=True)


# --- reductions -----------------------------------------------------------------------------------------


def amax_forward(node, x):
    a = node.attrs
    fn = torch.amax if a["kind"] == "max" else torch.amin
    dim = a.get("dim")
    return fn(x, dim=tuple(range(x.ndim)) if dim is None else dim, keepdim=a.get("keepdim", False))


def amax_lipschitz(node, ctx: Settings) -> LocalConstant:
    """max/min over disjoint groups: |max_G a - max_G a'| <= ||(a - a')_G||_2, so L = 1 (exact, attained)."""
    return LocalConstant([1.0], True, "selection", lower=1.0)


register_rule("amax", amax_forward, amax_lipschitz, monotone=True)


# --- order statistics: values of sort / topk / max(dim) / kthvalue / median(dim) / cummax ------------------

#: The torch functions returning ``(values, indices)`` that an ``order_pair`` node runs.
ORDER_FUNCTIONS = ("sort", "topk", "max", "min", "kthvalue", "median", "cummax", "cummin")


def order_pair_forward(node, x):
    a = node.attrs
    out = getattr(torch, a["fn"])(x, **a["kwargs"])
    return (out[0], out[1])


def order_pair_lipschitz(node, ctx: Settings) -> LocalConstant:
    """The values part of ``(values, indices) = fn(x, dim)`` (the integer indices jump: their ``tuple_getitem``
    is not Lipschitz, and a use of the whole tuple makes this node ``inf``).

    Along ``dim`` each row's values are order statistics: sorting is a 1-Lipschitz map in l2 (the sorted
    vector is the closest point of the sorted cone; equivalently, sorting never increases
    ``sum (x_i - y_i)^2``), ``topk`` keeps the first ``k`` sorted entries, and ``max``, ``min``, ``kthvalue``,
    ``median`` keep one, so L = 1 (exact: a shift of every entry by ``t`` moves the values by ``t``).
    ``cummax``/``cummin``: ``|cummax_j(x) - cummax_j(y)| <= max_{i<=j} |x_i - y_i| <= ||x - y||_2`` for each
    of the ``n`` prefixes, so L = sqrt(n) (exact: raising the first entry of ``(0, -1, ..., -1)`` moves all ``n``
    values)."""
    a = node.attrs
    if a.get("whole_tuple_used"):
        return not_lipschitz(f"the integer indices of torch.{a['fn']} at node {node.name!r} are used (they jump)")
    if a["fn"] in ("cummax", "cummin"):
        n = int(node.in_shapes[0][a["kwargs"]["dim"]])
        return exact(math.sqrt(n), f"{a['fn']} over {n} entries: sqrt(n)")
    return exact(1.0, f"order statistics ({a['fn']} values)")


register_rule("order_pair", order_pair_forward, order_pair_lipschitz)


def logsumexp_forward(node, x):
    a = node.attrs
    dim = a.get("dim")
    return torch.logsumexp(x, dim=tuple(range(x.ndim)) if dim is None else dim, keepdim=a.get("keepdim", False))


def logsumexp_lipschitz(node, ctx: Settings) -> LocalConstant:
    """logsumexp over disjoint groups: gradient softmax p, ||p||_2 <= ||p||_1 = 1: L = 1 (certified, the sup)."""
    return LocalConstant([1.0], True, "softmax-gradient")


def logsumexp_ranges(node, r: Range) -> Range:
    """logsumexp is nondecreasing in every entry: ``[f(lo), f(hi)]``, rounded outward by
    ``ROUNDING_MARGIN * (f(max |x|) + 1)`` (an enclosure: the float64 evaluation ``m + log(sum exp(x - m))``
    errs by a few ulps of ``|m| + log(n) + 1``, and ``f(max |x|) >= max(|m|, log n)``)."""
    lo = logsumexp_forward(node, r.lo)
    hi = logsumexp_forward(node, r.hi)
    eps = ROUNDING_MARGIN * (logsumexp_forward(node, r.abs_max).abs() + 1.0)
    return Range(lo - eps, hi + eps)


register_rule("logsumexp", logsumexp_forward, logsumexp_lipschitz, ranges=logsumexp_ranges)


def topk_forward(node, x):
    a = node.attrs
    return torch.topk(x, a["k"], dim=a["dim"], largest=a["largest"], sorted=True).values


def topk_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Top-k values along a dim: a projection of the sorted slice, and sorting is 1-Lipschitz in l2
    (rearrangement inequality): L = 1 (exact, attained)."""
    return LocalConstant([1.0], True, "sorting", lower=1.0)


register_rule("topk", topk_forward, topk_lipschitz, monotone=True)


# --- where with a constant condition -----------------------------------------------------------------------


def where_forward(node, *xs):
    a = node.attrs
    it = iter(xs)
    vals = [next(it) if v else node.params[f"const{i}"] for i, v in enumerate(a["var"])]
    return torch.where(node.params["cond"], *vals)


def where_lipschitz(node, ctx: Settings) -> LocalConstant:
    """where(c, a, b), c constant: each output entry copies one entry of a or of b, so combine l2 with
    partial = sqrt(|y| / |branch|) (broadcast copies) (certified; exact without broadcasting)."""
    return LocalConstant(_copies(node), True, "selection", combine="l2")


register_rule("where_const", where_forward, where_lipschitz, monotone=True)


# --- cumulative sums ---------------------------------------------------------------------------------------


def cumsum_forward(node, x):
    a = node.attrs
    d = a["dim"]
    if a.get("reverse"):
        x = torch.flip(x, (d,))
    y = torch.cumsum(x, d)
    if a.get("exclusive"):
        zero = torch.zeros_like(torch.narrow(y, d, 0, 1))
        y = torch.cat([zero, torch.narrow(y, d, 0, y.shape[d] - 1)], d)
    if a.get("reverse"):
        y = torch.flip(y, (d,))
    return y


def triangular_ones_norm(m: int) -> float:
    """||T_m||_2 of the m x m lower-triangular all-ones matrix: 1 / (2 sin(pi / (2 (2m + 1)))) (exact)."""
    if m <= 0:
        return 0.0
    return 1.0 / (2.0 * math.sin(math.pi / (2 * (2 * m + 1))))


def cumsum_lipschitz(node, ctx: Settings) -> LocalConstant:
    """cumsum along a dim of length n: L = ||T_m|| = 1 / (2 sin(pi / (2(2m+1)))), m = n (n - 1 if exclusive),
    reverse is a flip of it (exact closed form, rounded up by ROUNDING_MARGIN)."""
    a = node.attrs
    n = node.in_shapes[0][a["dim"]]
    v = triangular_ones_norm(n - 1 if a.get("exclusive") else n)
    return LocalConstant([v * (1 + ROUNDING_MARGIN)], True, "closed-form", lower=v)


register_rule("cumsum", cumsum_forward, cumsum_lipschitz, affine=True, monotone=True)
