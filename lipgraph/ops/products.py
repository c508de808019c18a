"""Products of two input-dependent tensors on an input domain: ranges and local partial constants.

``a * b``, ``a / b`` and ``a @ b`` have no global Lipschitz constant (they grow with the inputs), but on
a bounded domain each partial derivative is bounded by the other factor's worst values over its range:

* ``mul_var``: ``d_a (a * b) v = broadcast(v) * b``; its operator norm is
  :func:`broadcast_multiply_norm` of ``max |b|`` (exact as a sup over the box of ``b``).
* ``div_var``: ``d_a = v / b`` and ``d_b = -a v / b^2``: the same norm with ``1 / min |b|`` and
  ``max |a| / min |b|^2``; only when ``b``'s range excludes 0 (otherwise the global ``inf`` stands).
* ``matmul_var``: ``d_a (a @ b) v = v @ b``: per batch ``||b_batch||_2 <= || M ||_2`` for the nonnegative
  matrix ``M`` of entrywise ``max |b|`` (:func:`abs_bound_spectral_norm`), combined over the batches
  that share one slice of ``a`` by :func:`batched_product_norm`.

Ranges are interval arithmetic rounded outward by ``ROUNDING_MARGIN`` times the magnitude of the
products (float64 products and sums of at most 1e6 terms err by far less). Every function returns
``None`` where a range is not finite (no NaN, the global rule stands).
"""

from __future__ import annotations

import math

import torch

from ..core import ROUNDING_MARGIN, Settings
from ..domains import Range
from .registry import LocalConstant

_DT = torch.float64


def _finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _up(x: float) -> float:
    """Round a nonnegative float64 bound up by the rounding margin."""
    return x * (1.0 + ROUNDING_MARGIN) + 1e-300


# --- mul_var / div_var ---------------------------------------------------------------------------


def broadcast_multiply_norm(in_shape: tuple[int, ...], weight_abs_max: torch.Tensor) -> float:
    """``sup ||v -> broadcast(v) * w||_2`` over every ``w`` with ``|w| <= weight_abs_max`` elementwise.

    ``v`` has shape ``in_shape``; ``w`` (``weight_abs_max``) has the output's shape (``v`` broadcast to
    it). Output position ``p`` reads the single entry ``j = pi(p)`` of ``v``, so the columns of the map
    for different ``j`` have disjoint supports and ``D^T D = diag_j(sum_{p: pi(p) = j} w_p^2)``:
    ``||D||_2 = sqrt(max_j sum_{pi(p) = j} w_p^2)`` exactly. Its sup over the box of ``w`` puts every
    ``|w_p|`` at its maximum. Equal shapes give ``max |w|``; a per-channel scale ``s [1,C,1,1]`` times
    ``x [1,C,H,W]`` gives ``max_c sqrt(sum_{h,w} max x_{c,h,w}^2)``. Certified: float64 sums of squares,
    rounded up by ``ROUNDING_MARGIN``.
    """
    w2 = weight_abs_max.to(_DT) ** 2
    if w2.numel() == 0:
        return 0.0
    per_entry = w2.sum_to_size(tuple(in_shape)) if tuple(in_shape) != tuple(w2.shape) else w2
    return _up(math.sqrt(float(per_entry.max())))


def _outer_shape(a: Range, b: Range) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(a.lo.shape, b.lo.shape))


def interval_product(a: Range, b: Range) -> Range | None:
    """Elementwise ``a * b`` (broadcast): min and max of the four endpoint products, rounded outward by
    ``ROUNDING_MARGIN * max |a| max |b|`` (exact interval product up to that rounding)."""
    if not _finite(a.lo, a.hi, b.lo, b.hi):
        return None
    cands = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    mag = a.abs_max * b.abs_max
    return Range(cands.min(0).values, cands.max(0).values).widened(torch.broadcast_to(mag, cands.shape[1:]))


def excludes_zero(r: Range) -> bool:
    """Every entry of the range is strictly positive or strictly negative."""
    return bool(((r.lo > 0) | (r.hi < 0)).all())


def reciprocal_range(b: Range) -> Range | None:
    """``1 / b`` for a range excluding 0: ``[1/hi, 1/lo]`` (1/x decreases on each sign branch), rounded
    outward by ``ROUNDING_MARGIN * max |1/b|``."""
    if not excludes_zero(b) or not _finite(b.lo, b.hi):
        return None
    lo, hi = 1.0 / b.hi, 1.0 / b.lo
    return Range(lo, hi).widened()


def mul_var_ranges(node, a: Range, b: Range) -> Range | None:
    """a * b: the interval product (rounded outward)."""
    return interval_product(a, b)


def div_var_ranges(node, a: Range, b: Range) -> Range | None:
    """a / b with 0 outside b's range: ``a * [1/b_hi, 1/b_lo]`` (interval product, rounded outward);
    None when b's range contains 0."""
    inv = reciprocal_range(b)
    return interval_product(a, inv) if inv is not None else None


def mul_var_local(node, ins: list[Range], settings: Settings) -> LocalConstant | None:
    """a * b on the ranges: ``d_a = broadcast_multiply_norm(shape a, max |b|)`` and symmetrically for b
    (certified; exact as a sup over the boxes of the ranges)."""
    a, b = ins
    if not _finite(a.lo, a.hi, b.lo, b.hi):
        return None
    out = _outer_shape(a, b)
    pa = broadcast_multiply_norm(tuple(a.lo.shape), torch.broadcast_to(b.abs_max, out))
    pb = broadcast_multiply_norm(tuple(b.lo.shape), torch.broadcast_to(a.abs_max, out))
    return LocalConstant([pa, pb], True, "domain: product with the other factor's max |.|")


def div_var_local(node, ins: list[Range], settings: Settings) -> LocalConstant | None:
    """a / b on the ranges, b's range excluding 0: ``d_a = broadcast_multiply_norm(shape a, 1/min|b|)``,
    ``d_b = broadcast_multiply_norm(shape b, max|a| / min|b|^2)`` (certified); None if b's range holds 0."""
    a, b = ins
    if not excludes_zero(b) or not _finite(a.lo, a.hi, b.lo, b.hi):
        return None
    out = _outer_shape(a, b)
    bmin = b.abs_min
    inv = (1.0 / bmin) * (1.0 + ROUNDING_MARGIN)
    da_w = torch.broadcast_to(inv, out)
    db_w = torch.broadcast_to(a.abs_max, out) * torch.broadcast_to(inv * inv, out) * (1.0 + ROUNDING_MARGIN)
    if not _finite(da_w, db_w):
        return None
    pa = broadcast_multiply_norm(tuple(a.lo.shape), da_w)
    pb = broadcast_multiply_norm(tuple(b.lo.shape), db_w)
    return LocalConstant([pa, pb], True, "domain: quotient with 1/min|b| and max|a|/min|b|^2")


# --- matmul_var --------------------------------------------------------------------------------------


def abs_bound_spectral_norm(m: torch.Tensor) -> torch.Tensor:
    """Certified upper bounds of ``||B||_2`` for every matrix ``B`` with ``|B_ij| <= M_ij`` (batched over
    the leading dims of ``m``, the nonnegative entrywise bound).

    Proof: for any x, ``|(Bx)_i| = |sum_j B_ij x_j| <= sum_j M_ij |x_j| = (M|x|)_i``, so
    ``||Bx||_2 <= ||M |x|||_2 <= ||M||_2 ||x||_2``. ``||M||_2`` is the largest singular value of a float64
    SVD, rounded up by ``ROUNDING_MARGIN`` (backward-stable SVD errs by a small multiple of
    ``eps ||M||_2``, below 1e-9 relative for any size held in memory), and never above the Frobenius
    norm (rounded up), which bounds it too.
    """
    m = m.to(_DT)
    if m.numel() == 0:
        return torch.zeros(m.shape[:-2], dtype=_DT)
    sv = torch.linalg.matrix_norm(m, ord=2)
    fro = torch.linalg.matrix_norm(m, ord="fro")
    return torch.minimum(sv, fro) * (1.0 + ROUNDING_MARGIN) + 1e-300


def batched_product_norm(in_batch: tuple[int, ...], per_batch: torch.Tensor) -> float:
    """``sup ||v -> (v_{pi(i)} X_i)_i||_2`` where output batch ``i`` reads slice ``pi(i)`` of ``v`` (batch
    broadcasting) and ``||X_i||_2 <= per_batch[i]``: the batches reading one slice ``j`` stack as
    ``v_j [X_i]_i``, whose norm is at most ``sqrt(sum_{pi(i) = j} per_batch[i]^2)``, and distinct slices
    write disjoint outputs, so the norm is the max over ``j`` (certified; exact without broadcasting)."""
    return broadcast_multiply_norm(in_batch, per_batch)


def _as_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.matmul's promotion of 1-D operands: a vector a is a row [1, k], a vector b a column [k, 1]
    (removing the added dimension afterwards does not change any norm)."""
    return (a.unsqueeze(0) if a.dim() == 1 else a), (b.unsqueeze(-1) if b.dim() == 1 else b)


def _interval_matmul(a: Range, b: Range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ma, ra, mb, rb = a.mid, a.rad, b.mid, b.rad
    mid = torch.matmul(ma, mb)
    rad = torch.matmul(ma.abs(), rb) + torch.matmul(ra, mb.abs()) + torch.matmul(ra, rb)
    err = ROUNDING_MARGIN * torch.matmul(ma.abs() + ra, mb.abs() + rb)
    return mid, rad, err


def matmul_var_ranges(node, a: Range, b: Range) -> Range | None:
    """a @ b (torch.matmul, batched): center-radius interval matmul ``mid_a mid_b -+ (|mid_a| rad_b +
    rad_a |mid_b| + rad_a rad_b)``, rounded outward by ``ROUNDING_MARGIN (|mid_a| + rad_a)(|mid_b| + rad_b)``
    (for ``a = mid_a + d_a``, ``a b - mid_a mid_b = mid_a d_b + d_a mid_b + d_a d_b``; certified)."""
    if not _finite(a.lo, a.hi, b.lo, b.hi):
        return None
    mid, rad, err = _interval_matmul(a, b)
    if not _finite(mid, rad, err):
        return None
    return Range(mid - rad - err, mid + rad + err)


def matmul_var_local(node, ins: list[Range], settings: Settings) -> LocalConstant | None:
    """a @ b on the ranges: ``d_a v = v @ b`` has norm ``max over batches ||b_i||_2 <= ||max|b_i| ||_2``
    (:func:`abs_bound_spectral_norm`), batches sharing a slice of a (broadcast) combined in l2
    (:func:`batched_product_norm`); symmetrically ``d_b v = a @ v`` with ``||max|a_i| ||_2`` (certified)."""
    a, b = ins
    if not _finite(a.lo, a.hi, b.lo, b.hi):
        return None
    am, bm = _as_matrices(a.abs_max, b.abs_max)
    batch = tuple(torch.broadcast_shapes(am.shape[:-2], bm.shape[:-2]))
    nb = abs_bound_spectral_norm(bm)
    na = abs_bound_spectral_norm(am)
    pa = batched_product_norm(tuple(am.shape[:-2]), torch.broadcast_to(nb, batch))
    pb = batched_product_norm(tuple(bm.shape[:-2]), torch.broadcast_to(na, batch))
    return LocalConstant([pa, pb], True, "domain: matrix product with the other factor's ||max|.| ||_2")


__all__ = [
    "abs_bound_spectral_norm",
    "batched_product_norm",
    "broadcast_multiply_norm",
    "div_var_local",
    "div_var_ranges",
    "interval_product",
    "matmul_var_local",
    "matmul_var_ranges",
    "mul_var_local",
    "mul_var_ranges",
    "reciprocal_range",
]
