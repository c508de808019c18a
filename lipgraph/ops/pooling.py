"""Pooling and reductions.

Pooling over a d-dimensional window acts separably on each spatial axis, so
its linear pieces are Kronecker products of 1-D matrices built from PyTorch's
own 1-D op (the same index arithmetic: padding, ceil mode, clipped windows):

* average pooling is linear, ``A = A_1 (x) ... (x) A_d`` per channel, so
  ``||A|| = prod_k ||A_k||`` (exact, float64 SVD of the small 1-D matrices);
* max pooling is piecewise linear: every Jacobian selects one input per
  window, ``J^T J`` is diagonal with the number of windows that chose each
  input, and an input can win every window that contains it. So
  ``L = sqrt(max_p #windows containing p) = sqrt(prod_k max count_k)``
  (exact). Non-overlapping pools give 1; kernel 3, stride 2 in 2-D gives 2.

Ranges (input domains): max pools, average pools (nonnegative weights, zero padding a constant), sums and
means are nondecreasing in every input entry, so ``monotone=True`` (``[f(lo), f(hi)]``, widened by the pass);
Lp pooling has its own rule (a norm is nondecreasing in the entries' absolute values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ir, norms
from ..domains import Range
from .registry import LocalConstant, Settings, as_tuple, not_lipschitz, register_rule

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_AAVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _spatial(node) -> tuple[int, ...]:
    nd = node.attrs["ndim"]
    return tuple(node.in_shapes[0][-nd:])


def _basis(n: int) -> torch.Tensor:
    """n one-hot signals of length n, shaped (batch=n, channels=1, length=n)."""
    return torch.eye(n, dtype=torch.float64)[:, None, :]


def pool_1d_matrix(kind: str, length: int, attrs: dict, axis: int) -> torch.Tensor:
    """The (out x in) matrix of the 1-D average / window-membership op along one axis."""
    e = _basis(length)
    if kind == "avg":
        k, s, p = (as_tuple(attrs[x], attrs["ndim"])[axis] for x in ("kernel_size", "stride", "padding"))
        y = F.avg_pool1d(e, k, s, p, attrs.get("ceil_mode", False), attrs.get("count_include_pad", True))
    elif kind == "adaptive":
        y = F.adaptive_avg_pool1d(e, as_tuple(attrs["output_size"], attrs["ndim"])[axis])
    else:
        raise ValueError(kind)
    return y[:, 0, :].T.contiguous()


def max_window_counts(length: int, attrs: dict, axis: int) -> int:
    """Max over input positions of the number of max-pool windows containing it (1 axis)."""
    nd = attrs["ndim"]
    k, s, p, d = (as_tuple(attrs[x], nd)[axis] for x in ("kernel_size", "stride", "padding", "dilation"))
    out = F.max_pool1d(torch.zeros(1, 1, length), k, s, p, d, attrs.get("ceil_mode", False)).shape[-1]
    counts = [0] * length
    for i in range(out):
        for j in range(k):
            idx = i * s - p + j * d
            if 0 <= idx < length:
                counts[idx] += 1
    return max(counts) if counts else 0


# --- max pooling -----------------------------------------------------------------


def max_pool_forward(node, x):
    a = node.attrs
    return _MAX[a["ndim"]](x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a.get("ceil_mode", False))


def max_pool_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Max pooling: L = sqrt(max_p #windows containing p) = sqrt(prod_axes max count) (exact)."""
    count = math.prod(max_window_counts(n, node.attrs, ax) for ax, n in enumerate(_spatial(node)))
    r = norms.sqrt_count(count)
    return LocalConstant([r.upper], True, "window-count", lower=r.lower)


register_rule("max_pool", max_pool_forward, max_pool_lipschitz, monotone=True)


def adaptive_max_pool_forward(node, x):
    return _AMAX[node.attrs["ndim"]](x, node.attrs["output_size"])


def adaptive_max_pool_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Adaptive max pooling, windows [floor(i n/m), ceil((i+1) n/m)): L = sqrt(max window count) (exact)."""
    count = 1
    for ax, n in enumerate(_spatial(node)):
        member = pool_1d_matrix("adaptive", n, node.attrs, ax) > 0
        count *= int(member.sum(dim=0).max())
    r = norms.sqrt_count(count)
    return LocalConstant([r.upper], True, "window-count", lower=r.lower)


register_rule("adaptive_max_pool", adaptive_max_pool_forward, adaptive_max_pool_lipschitz, monotone=True)


# --- average pooling -------------------------------------------------------------


def avg_pool_forward(node, x):
    a = node.attrs
    args = [x, a["kernel_size"], a["stride"], a["padding"], a.get("ceil_mode", False), a.get("count_include_pad", True)]
    if a["ndim"] > 1:
        args.append(a.get("divisor_override"))
    return _AVG[a["ndim"]](*args)


def avg_pool_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Average pooling is linear and separable: L = prod_axes ||A_axis||_2 (exact, float64 SVD);
    with divisor_override D: L = prod_axes ||B_axis|| / D, B the 0/1 window-membership matrices."""
    a = node.attrs
    mats = [pool_1d_matrix("avg", n, a, ax) for ax, n in enumerate(_spatial(node))]
    divisor = a.get("divisor_override")
    if divisor:
        mats = [(m > 0).to(torch.float64) for m in mats]
    r = norms.window_norm(mats)
    scale = 1.0 / float(divisor) if divisor else 1.0
    return LocalConstant([r.upper * scale], True, r.method, lower=(r.lower or 0.0) * scale)


register_rule("avg_pool", avg_pool_forward, avg_pool_lipschitz, affine=True, monotone=True)


def adaptive_avg_pool_forward(node, x):
    return _AAVG[node.attrs["ndim"]](x, node.attrs["output_size"])


def adaptive_avg_pool_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Adaptive average pooling is linear and separable: L = prod_axes ||A_axis||_2 (exact, SVD)."""
    mats = [pool_1d_matrix("adaptive", n, node.attrs, ax) for ax, n in enumerate(_spatial(node))]
    r = norms.window_norm(mats)
    return LocalConstant([r.upper], True, r.method, lower=r.lower)


register_rule("adaptive_avg_pool", adaptive_avg_pool_forward, adaptive_avg_pool_lipschitz, affine=True, monotone=True)


# --- reductions --------------------------------------------------------------------


def _reduced_count(node) -> int:
    shape = node.in_shapes[0]
    dims = node.attrs.get("dim")
    if dims is None:
        return math.prod(shape)
    dims = [dims] if isinstance(dims, int) else list(dims)
    return math.prod(shape[d] for d in dims)


def mean_forward(node, x):
    dim = node.attrs.get("dim")
    if dim is None:
        return x.mean()
    return x.mean(dim=dim, keepdim=node.attrs.get("keepdim", False))


def mean_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Mean over n entries: each output averages a disjoint block, L = 1/sqrt(n) (exact)."""
    v = 1.0 / math.sqrt(max(_reduced_count(node), 1))
    return LocalConstant([v], True, "exact", lower=v)


register_rule("mean", mean_forward, mean_lipschitz, affine=True, monotone=True)


def sum_forward(node, x):
    dim = node.attrs.get("dim")
    if dim is None:
        return x.sum()
    return x.sum(dim=dim, keepdim=node.attrs.get("keepdim", False))


def sum_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Sum over n entries: L = sqrt(n) (exact, the all-ones row has norm sqrt(n))."""
    v = math.sqrt(max(_reduced_count(node), 1))
    return LocalConstant([v], True, "exact", lower=v)


register_rule("sum", sum_forward, sum_lipschitz, affine=True, monotone=True)


# --- power-average (Lp) pooling ------------------------------------------------------------------------


def lp_pool_forward(node, x):
    a = node.attrs
    p, nd = float(a["norm_type"]), a["ndim"]
    if a.get("abs"):  # ONNX LpPool: (sum_W |x|^p)^(1/p)
        s = _AVG[nd](x.abs().pow(p), a["kernel_size"], a["stride"], 0, a.get("ceil_mode", False)) \
            * math.prod(a["kernel_size"])
        return s.pow(1.0 / p)
    fn = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}[nd]
    k = a["kernel_size"][0] if nd == 1 else a["kernel_size"]
    s = a["stride"][0] if nd == 1 else a["stride"]
    return fn(x, p, k, s, a.get("ceil_mode", False))


def lp_pool_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Lp pooling, y_W = ||x_W||_p per window W (PyTorch: relu(sum_W x^p)^(1/p), the same for even p).
    With c = max #windows containing an input and B the 0/1 window-membership matrix:
    p = 1: piecewise linear, J = D B S (D, S diagonal 0/+-1): L = ||B|| = prod_axes ||B_axis|| (exact);
    p >= 2 (even integers for PyTorch, any p for ONNX's |x|): ||.||_p <= ||.||_2, so
    sum_W (||a_W||_p - ||b_W||_p)^2 <= c ||a - b||^2: L = sqrt(c) (exact: a one-hot difference attains it);
    1 < p < 2 (ONNX): ||.||_p <= k^(1/p - 1/2) ||.||_2 on a k-window: L = k^(1/p-1/2) sqrt(c) (certified).
    PyTorch with odd p >= 3 or fractional p: relu(sum x^p)^(1/p) has unbounded slope where the sum
    crosses 0 (or is NaN for negative entries): inf."""
    a = node.attrs
    p = float(a["norm_type"])
    geo = {"ndim": a["ndim"], "kernel_size": a["kernel_size"], "stride": a["stride"], "padding": (0,) * a["ndim"],
           "dilation": (1,) * a["ndim"], "ceil_mode": a.get("ceil_mode", False), "count_include_pad": True}
    spatial = _spatial(node)
    if p == 1:
        mats = [(pool_1d_matrix("avg", n, geo, ax) > 0).to(torch.float64) for ax, n in enumerate(spatial)]
        r = norms.window_norm(mats)
        return LocalConstant([r.upper], True, "window-membership", lower=r.lower)
    if not a.get("abs") and not (p >= 2 and p == int(p) and int(p) % 2 == 0):
        return not_lipschitz(f"PyTorch lp_pool with norm_type {p:g} (not 1 or an even integer) computes "
                             f"relu(sum x^p)^(1/p), whose slope is unbounded, at node {node.name!r} ({node.source})")
    if p < 1:
        return not_lipschitz(f"LpPool with p = {p:g} < 1 is not a norm and not Lipschitz, at node {node.name!r}")
    count = math.prod(max_window_counts(n, geo, ax) for ax, n in enumerate(spatial))
    r = norms.sqrt_count(count)
    if p >= 2:
        return LocalConstant([r.upper], True, "window-count", lower=r.lower)
    factor = math.prod(a["kernel_size"]) ** (1.0 / p - 0.5)
    return LocalConstant([r.upper * factor * (1 + 1e-12)], True, "window-count, p<2 norm comparison")


def lp_pool_ranges(node, r: Range) -> Range | None:
    """Lp pooling ranges (enclosures, rounded outward by ``ROUNDING_MARGIN * f(max |x|)``):

    * ONNX (``|x|``) or PyTorch with an even integer p: ``y_W = ||x_W||_p`` is nondecreasing in every ``|x_i|``:
      ``[f(abs_min), f(abs_max)]``;
    * PyTorch p = 1 (``sum_W x``): nondecreasing in every x_i: ``[f(lo), f(hi)]`` (``f(abs_max)`` bounds
      ``sum_W |x|``);
    * PyTorch with another p (odd or fractional): the forward is ``(sum_W x^p)^(1/p)``, NaN where the sum is
      negative, and nondecreasing where ``lo >= 0``: ``[f(lo), f(hi)]`` there, else None.
    """
    a = node.attrs
    p = float(a["norm_type"])
    n64 = ir.as_float64(node)
    top = lp_pool_forward(n64, r.abs_max)
    if a.get("abs") or (p == int(p) and int(p) % 2 == 0):
        lo, hi = lp_pool_forward(n64, r.abs_min), top
    elif p == 1 or bool((r.lo >= 0).all()):
        lo, hi = lp_pool_forward(n64, r.lo), lp_pool_forward(n64, r.hi)
    else:
        return None
    out = Range(torch.minimum(lo, hi), torch.maximum(lo, hi)).widened(top.abs())
    if not (torch.isfinite(out.lo).all() and torch.isfinite(out.hi).all()):
        return None
    return out


register_rule("lp_pool", lp_pool_forward, lp_pool_lipschitz, ranges=lp_pool_ranges)
