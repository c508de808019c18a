"""Operator norms of the linear ops (Linear, Conv, BatchNorm, linear regions).

Every function returns a :class:`NormResult` that says whether ``upper`` is a
proven upper bound (``certified``) or an estimate, and carries a ``lower``
value (a norm actually attained, up to rounding) when one is known.

All norm computations live in this module so that improving them touches one
place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .ops.registry import ROUNDING_MARGIN, BoundContext


@dataclass
class NormResult:
    upper: float
    certified: bool
    method: str
    lower: float | None = None


def dense_norm(w: torch.Tensor) -> NormResult:
    """||W||_2 of a dense matrix (batched: max over leading dims) by float64 SVD.

    Certified: LAPACK's singular values are backward stable, |sigma_hat - sigma|
    <= c * eps64 * ||W||; the result is inflated by ``ROUNDING_MARGIN`` (1e-9).
    """
    w64 = w.detach().to(torch.float64).cpu()
    if w64.ndim == 1:
        w64 = w64[None, :]
    if w64.numel() == 0:
        return NormResult(0.0, True, "svd", 0.0)
    s = float(torch.linalg.matrix_norm(w64, ord=2).max())
    return NormResult(s * (1 + ROUNDING_MARGIN), True, "svd", s)


def power_method(
    op: Callable[[torch.Tensor], torch.Tensor],
    in_shape: Sequence[int],
    ctx: BoundContext,
    iterations: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Largest singular value of the linear map ``op`` by the autograd power method.

    Iterates ``x <- A^T A x / ||A^T A x||`` with ``A^T A x = grad_x 0.5||A x||^2``
    (one forward and one backward pass per step). Returns ``||A x||`` for the
    final unit ``x``: a value the operator attains, so an *estimate from below*,
    never a certificate.
    """
    iterations = ctx.power_iterations if iterations is None else iterations
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    x = torch.randn(tuple(in_shape), generator=gen, dtype=dtype).to(ctx.device)
    x = x / x.norm()
    sigma = 0.0
    for _ in range(iterations):
        x = x.detach().requires_grad_(True)
        y = op(x)
        (g,) = torch.autograd.grad(0.5 * (y * y).sum(), x)
        gn = g.norm()
        if gn == 0:
            return 0.0
        x = g / gn
    with torch.no_grad():
        sigma = float(op(x).norm())
    return sigma


def linear_op_estimate(
    op: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], ctx: BoundContext
) -> NormResult:
    """Power-method estimate of a linear op's norm (not certified)."""
    s = power_method(op, in_shape, ctx)
    return NormResult(s, False, "power-method", s)


def conv_norm(forward_no_bias: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int],
              ctx: BoundContext, weight: torch.Tensor | None = None, attrs: dict | None = None) -> NormResult:
    """Norm of a convolution at the traced input size.

    Currently the autograd power method (an estimate from below).
    """
    return linear_op_estimate(forward_no_bias, in_shape, ctx)


def diagonal_norm(scale: torch.Tensor) -> NormResult:
    """||diag(d)|| = max |d_i| (exact)."""
    v = float(scale.detach().abs().max()) if scale.numel() else 0.0
    return NormResult(v, True, "diagonal", v)


def window_norm(matrices: Sequence[torch.Tensor]) -> NormResult:
    """Norm of a Kronecker product of small matrices: the product of their norms (exact by SVD)."""
    total, lower = 1.0, 1.0
    for m in matrices:
        r = dense_norm(m)
        total *= r.upper
        lower *= r.lower if r.lower is not None else r.upper
    return NormResult(total, True, "kronecker-svd", lower)


def sqrt_count(max_count: int) -> NormResult:
    """Norm of a 0/1 selection matrix whose columns hold at most ``max_count`` ones: sqrt(max_count) (exact)."""
    v = math.sqrt(max_count)
    return NormResult(v, True, "selection-count", v)
