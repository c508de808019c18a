"""Affine ops: Linear, Conv, ConvTranspose, BatchNorm (eval), constant scales and matmuls.

An affine map ``x -> A x + b`` has Lipschitz constant ``||A||_2`` (the bias does
not matter). The norms come from :mod:`lipgraph.norms`; whether a node is
certified is whatever the norm routine reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import norms
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
    rad = F.linear(r.rad, w.abs())
    err = ROUNDING_MARGIN * (F.linear(r.mid.abs() + r.rad, w.abs()) + (b.abs() if b is not None else 0.0))
    return Range(mid - rad - err, mid + rad + err)


register_rule("linear", linear_forward, linear_lipschitz, affine=True, ranges=linear_ranges)


# --- Convolution ----------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_apply(node, x, bias: bool = True):
    """Run the conv node on ``x`` (with or without its bias)."""
    a = node.attrs
    b = node.params.get("bias") if bias else None
    if a.get("padding_mode", "zeros") != "zeros":
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


register_rule("conv", conv_forward, conv_lipschitz, affine=True)


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


register_rule("conv_transpose", conv_transpose_forward, conv_transpose_lipschitz, affine=True)


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


register_rule("batch_norm", batch_norm_forward, batch_norm_lipschitz, affine=True)


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


register_rule("scale", scale_forward, scale_lipschitz, affine=True)


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


register_rule("matmul_const", matmul_const_forward, matmul_const_lipschitz, affine=True)
