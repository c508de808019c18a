"""Power-method estimates of linear maps' norms (from below: values the map attains, never certificates)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import norms as _pkg
from ..core import Settings
from .psd import NormResult

# Names that tests and benchmarks patch on the package (``lipgraph.norms.X``) are read from it at call
# time, so that one patch reaches every caller: see ``lipgraph/norms/__init__.py``.


def power_method(
    op: Callable[[torch.Tensor], torch.Tensor],
    in_shape: Sequence[int],
    ctx: Settings,
    iterations: int | None = None,
    dtype: torch.dtype = torch.float32,
    x0: torch.Tensor | None = None,
    tol: float | None = None,
    exact_op: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Largest singular value of the linear map ``op`` by the autograd power method.

    Iterates ``x <- A^T A x / ||A^T A x||`` with ``A^T A x = grad_x 0.5||A x||^2``
    (one forward and one backward pass per step), from ``x0`` or a seeded random
    start; stops early when ``tol`` is given and the relative change of
    ``||A x||`` falls below it. Returns the largest ``||A x||`` seen for unit ``x``:
    a value the operator attains, so an *estimate from below*, never a certificate. With
    ``exact_op`` (the same map in float64) the returned value is ``||A x|| / ||x||`` for the final
    ``x`` evaluated in float64, so float32 rounding cannot push it above the true norm.
    """
    iterations = ctx.power_iterations if iterations is None else iterations
    if x0 is None:
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        x = torch.randn(tuple(in_shape), generator=gen, dtype=dtype).to(ctx.device)
    else:
        x = x0.detach().to(device=ctx.device, dtype=dtype).reshape(tuple(in_shape))
    nx = x.norm()
    if nx == 0:
        return 0.0
    x = x / nx
    best, prev = 0.0, 0.0
    for _ in range(iterations):
        x = x.detach().requires_grad_(True)
        y = op(x)
        sigma = float(y.detach().norm())
        best = max(best, sigma)
        (g,) = torch.autograd.grad(0.5 * (y * y).sum(), x)
        gn = g.norm()
        if gn == 0:
            return best
        x = g / gn
        if tol is not None and prev > 0 and abs(sigma - prev) <= tol * sigma:
            break
        prev = sigma
    with torch.no_grad():
        if exact_op is not None:
            x64 = x.detach().to(torch.float64)
            return float(exact_op(x64).norm() / x64.norm())
        best = max(best, float(op(x).norm()))
    return best


def linear_op_estimate(
    op: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], ctx: Settings
) -> NormResult:
    """Power-method estimate of a linear op's norm (not certified)."""
    s = _pkg.power_method(op, in_shape, ctx)
    return NormResult(s, False, "power-method", s)

