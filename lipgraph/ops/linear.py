"""Affine ops: Linear, Conv, ConvTranspose, BatchNorm (eval), constant scales and matmuls.

An affine map ``x -> A x + b`` has Lipschitz constant ``||A||_2`` (the bias does
not matter). The norms come from :mod:`lipgraph.norms`; whether a node is
certified is whatever the norm routine reports.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import ir, norms
from ..core import ROUNDING_MARGIN
from ..domains import Range
from .registry import LocalConstant, Settings, register_rule


def _from_norm(r: norms.NormResult) -> LocalConstant:
    return LocalConstant([r.upper], r.certified, r.method, lower=r.lower)


# --- Linear -------------------------------------------------------------------


def linear_forward(node, x):
    return F.linear(x, node.params["weight"], node.params.get("bias"))


def linear_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = W x + b over the last dimension: L = ||W||_2 (certified: float64 SVD, or Gram + Lanczos + Cholesky
    certificate for large W; see lipgraph.norms.dense_norm)."""
    return _from_norm(norms.dense_norm(node.params["weight"], ctx.device))


def linear_ranges(node, r: Range) -> Range:
    """Center-radius interval arithmetic: ``W mid + b -+ |W| rad``, rounded outward by
    ``ROUNDING_MARGIN * (|W| (|mid| + rad) + |b|)`` (float64 dot products of n <= 1e6 terms err by less)."""
    w = node.params["weight"].detach().to(torch.float64)
    b = node.params.get("bias")
    b = b.detach().to(torch.float64) if b is not None else None
    mid = F.linear(r.mid, w, b)
    mag = F.linear(r.mid.abs() + r.rad, w.abs()) + (b.abs() if b is not None else 0.0)
    return _center_radius(mid, F.linear(r.rad, w.abs()), mag)


register_rule("linear", linear_forward, linear_lipschitz, affine=True, ranges=linear_ranges)


def embedding_forward(node, ids):
    return F.embedding(ids, node.params["weight"])


def embedding_lipschitz(node, ctx: Settings) -> LocalConstant:
    """``y[t] = W[i_t]`` for integer ids ``i``: the lookup is the linear map ``one_hot(i) -> W^T one_hot(i)`` of
    the ids' one-hot encoding (block diagonal over the tokens), so in that metric ``L = ||W||_2`` (certified:
    :func:`lipgraph.norms.dense_norm`). The ids themselves are discrete: the report's constant is with respect
    to their one-hot vectors (on two one-hot inputs the ratio is at most ``max_{i != j} ||W_i - W_j|| / sqrt 2
    <= ||W||_2``)."""
    lc = _from_norm(norms.dense_norm(node.params["weight"], ctx.device))
    return dataclasses.replace(lc, reason="with respect to the one-hot encoding of the integer ids")


register_rule("embedding", embedding_forward, embedding_lipschitz)


def _center_radius(mid: torch.Tensor, rad: torch.Tensor, mag: torch.Tensor) -> Range:
    """``[mid - rad, mid + rad]`` rounded outward by ``ROUNDING_MARGIN * mag`` (``mag`` bounds the sizes of the
    terms the float64 evaluation summed)."""
    err = ROUNDING_MARGIN * mag
    return Range(mid - rad - err, mid + rad + err)


def _with_abs_weight(node):
    """The float64 node with its weight replaced by ``|weight|`` and no bias (for radii)."""
    n64 = ir.as_float64(node)
    params = {k: v for k, v in n64.params.items() if k != "bias"}
    params["weight"] = n64.params["weight"].abs()
    return dataclasses.replace(n64, params=params)


def _bias_abs(node, out: torch.Tensor) -> torch.Tensor | float:
    """``|b|`` of a conv-like node's bias, shaped to broadcast over its channel dim 1 (0 without a bias)."""
    b = node.params.get("bias")
    if b is None:
        return 0.0
    return b.detach().to(torch.float64).abs().reshape(1, -1, *([1] * (out.ndim - 2)))


# --- Convolution ----------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_apply(node, x, bias: bool = True):
    """Run the conv node on ``x`` (with or without its bias)."""
    a = node.attrs
    b = node.params.get("bias") if bias else None
    if ir.padding_mode(a) != ir.DEFAULT_PADDING_MODE:
        x = F.pad(x, a["pad_reversed"], mode=a["padding_mode"])
        padding = 0
    else:
        padding = a["padding"]
    return _CONV[a["ndim"]](x, node.params["weight"], b, a["stride"], padding, a["dilation"], a["groups"])


def conv_forward(node, x):
    return conv_apply(node, x)


def conv_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = conv(x) + b: L = ||conv||_2 at the traced input size, an interval [power-method value,
    certified Fourier bound] (see lipgraph.norms.conv_norm)."""
    shape = node.in_shapes[0]
    return _from_norm(
        norms.conv_norm(lambda x: conv_apply(node, x, bias=False), shape, ctx, node.params["weight"], node.attrs,
                        out_shape=node.out_shape)
    )


def weighted_ranges(apply):
    """The range rule of a conv-like op ``apply(node, x, bias=True)``: center-radius interval arithmetic,
    ``op_W(mid) + b -+ op_|W|(rad)``, rounded outward by ``ROUNDING_MARGIN * (op_|W|(|mid| + rad) + |b|)`` (an
    enclosure; padding modes only copy entries, so they commute with taking the radius)."""

    def ranges(node, r: Range) -> Range:
        n64 = ir.as_float64(node)
        na = _with_abs_weight(node)
        mid = apply(n64, r.mid)
        rad = apply(na, r.rad, bias=False)
        mag = apply(na, r.mid.abs() + r.rad, bias=False) + _bias_abs(node, mid)
        return _center_radius(mid, rad, mag)

    ranges.__doc__ = weighted_ranges.__doc__
    return ranges


conv_ranges = weighted_ranges(conv_apply)


register_rule("conv", conv_forward, conv_lipschitz, affine=True, ranges=conv_ranges)


def conv_transpose_apply(node, x, bias: bool = True):
    a = node.attrs
    b = node.params.get("bias") if bias else None
    return _CONV_T[a["ndim"]](
        x, node.params["weight"], b, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"]
    )


def conv_transpose_forward(node, x):
    return conv_transpose_apply(node, x)


def conv_transpose_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = conv_transpose(x) + b: L = ||conv^T||_2 = ||conv|| on the output size, an interval [power-method
    value, certified Fourier bound] (see lipgraph.norms.conv_norm)."""
    shape = node.in_shapes[0]
    return _from_norm(
        norms.conv_norm(
            lambda x: conv_transpose_apply(node, x, bias=False), shape, ctx, node.params["weight"], node.attrs,
            out_shape=node.out_shape, transposed=True,
        )
    )


conv_transpose_ranges = weighted_ranges(conv_transpose_apply)


register_rule("conv_transpose", conv_transpose_forward, conv_transpose_lipschitz, affine=True,
              ranges=conv_transpose_ranges)


# --- BatchNorm (eval) ---------------------------------------------------------


def batch_norm_scale(node) -> torch.Tensor:
    """Per-channel factor gamma / sqrt(running_var + eps) of an eval-mode BatchNorm."""
    p = node.params
    var = p["running_var"].detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + node.attrs["eps"])
    if p.get("weight") is not None:
        scale = scale * p["weight"].detach().to(torch.float64)
    return scale


def batch_norm_forward(node, x):
    p = node.params
    return F.batch_norm(
        x, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0, node.attrs["eps"]
    )


def batch_norm_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Eval BatchNorm is diagonal: y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c,
    L = max_c |gamma_c| / sqrt(var_c + eps) (exact, float64)."""
    r = norms.diagonal_norm(batch_norm_scale(node))
    return LocalConstant([r.upper], True, "diagonal", lower=r.lower)


def batch_norm_ranges(node, r: Range) -> Range:
    """Eval BatchNorm per channel (dim 1): ``y = s x + t`` with ``s = gamma / sqrt(var + eps)``,
    ``t = beta - s mu``: ``s mid + t -+ |s| rad``, rounded outward by
    ``ROUNDING_MARGIN * (|s| (|mid| + rad) + |s mu| + |beta| + |t|)`` (an enclosure; the extra terms cover the
    forward's ``(x - mu) s + beta`` order of operations)."""
    p = node.params
    view = (1, -1, *([1] * (r.mid.ndim - 2)))
    s = batch_norm_scale(node).reshape(view)
    mu = p["running_mean"].detach().to(torch.float64).reshape(view)
    beta = p["bias"].detach().to(torch.float64).reshape(view) if p.get("bias") is not None else torch.zeros_like(mu)
    t = beta - s * mu
    mid = s * r.mid + t
    rad = s.abs() * r.rad
    mag = s.abs() * (r.mid.abs() + r.rad) + (s * mu).abs() + beta.abs() + t.abs()
    return _center_radius(mid, rad, mag)


register_rule("batch_norm", batch_norm_forward, batch_norm_lipschitz, affine=True, ranges=batch_norm_ranges)


# --- Constant scales and matmuls -----------------------------------------------


def _broadcast_scale_norm(const: torch.Tensor | float, in_shape, out_shape) -> float:
    """||x -> x * c|| with broadcasting: max over x's entries of the l2 norm of the
    factors it is multiplied by (exact: the map is block diagonal per entry of x)."""
    c = torch.as_tensor(const, dtype=torch.float64)
    if c.numel() == 1:
        reps = math.prod(out_shape) / max(math.prod(in_shape), 1)
        return abs(float(c)) * math.sqrt(reps)
    cb = c.broadcast_to(tuple(out_shape)).abs()
    in_full = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
    dims = [d for d, (i, o) in enumerate(zip(in_full, out_shape, strict=True)) if i == 1 and o != 1]
    if dims:
        cb = (cb * cb).sum(dim=dims).sqrt()
    return float(cb.max()) if cb.numel() else 0.0


def scale_forward(node, x):
    c = node.params["const"]
    return x / c if node.attrs.get("divide") else x * c


def scale_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = x * c or x / c with a constant c (broadcast): L = max_i ||c over x_i's copies||_2,
    i.e. max |c| without broadcasting of x (exact)."""
    c = node.params["const"].detach().to(torch.float64)
    if node.attrs.get("divide"):
        if bool((c == 0).any()):
            return LocalConstant([math.inf], True, "scale", reason="division by a constant containing 0")
        c = 1.0 / c
    v = _broadcast_scale_norm(c, node.in_shapes[0], node.out_shape)
    return LocalConstant([v], True, "scale", lower=v)


def scale_ranges(node, r: Range) -> Range | None:
    """``y = x c`` (or ``x / c`` = ``x (1/c)``), c constant, broadcast: ``c mid -+ |c| rad``, rounded outward by
    ``ROUNDING_MARGIN * |c| (|mid| + rad)`` (an enclosure). A division by a constant containing 0: None."""
    c = node.params["const"].detach().to(torch.float64)
    if node.attrs.get("divide"):
        if bool((c == 0).any()):
            return None
        c = 1.0 / c
    mid = r.mid * c
    rad = r.rad * c.abs()
    return _center_radius(mid, rad, (r.mid.abs() + r.rad) * c.abs())


register_rule("scale", scale_forward, scale_lipschitz, affine=True, ranges=scale_ranges)


def matmul_const_forward(node, x):
    w = node.params["const"]
    return torch.matmul(w, x) if node.attrs.get("left") else torch.matmul(x, w)


def matmul_const_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = x @ W or W @ x with constant W (batched over leading dims): L = max_batch ||W_b||_2 (SVD,
    certified); when W is broadcast over a batch of x it acts on each slice separately."""
    w = node.params["const"]
    if w.ndim == 1:
        w = w[:, None] if not node.attrs.get("left") else w[None, :]
    r = norms.dense_norm(w)
    x_shape, out_shape = node.in_shapes[0], node.out_shape
    x_batch = math.prod(x_shape[:-2]) if len(x_shape) > 2 else 1
    out_batch = math.prod(out_shape[:-2]) if len(out_shape) > 2 else 1
    if w.ndim > 2 and x_batch < out_batch:
        # x is broadcast over W's batch: each slice of x meets several W_b, so
        # ||y||^2 <= sum_b ||W_b||^2 ||x||^2 (certified, no longer a max).
        per = torch.linalg.matrix_norm(w.detach().double().reshape(-1, *w.shape[-2:]), ord=2)
        v = float(per.square().sum().sqrt()) * (1 + 1e-9)
        return LocalConstant([v], True, "svd-broadcast", lower=float(per.max()))
    return _from_norm(r)


def matmul_const_ranges(node, r: Range) -> Range:
    """``y = x @ W`` (or ``W @ x``), W constant: ``mid @ W -+ rad @ |W|``, rounded outward by
    ``ROUNDING_MARGIN * (|mid| + rad) @ |W|`` (an enclosure)."""
    w = node.params["const"].detach().to(torch.float64)
    left = node.attrs.get("left")

    def mm(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, x) if left else torch.matmul(x, a)

    return _center_radius(mm(w, r.mid), mm(w.abs(), r.rad), mm(w.abs(), r.mid.abs() + r.rad))


register_rule("matmul_const", matmul_const_forward, matmul_const_lipschitz, affine=True,
              ranges=matmul_const_ranges)
