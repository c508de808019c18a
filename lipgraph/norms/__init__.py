"""Operator norms of the linear ops (Linear, Conv, BatchNorm, linear regions).

Every function returns a :class:`NormResult` that says whether ``upper`` is a
proven upper bound (``certified``) or an estimate, and carries a ``lower``
value (a norm actually attained, up to rounding) when one is known.

All norm computations live in this package so that improving them touches one
place; this module is the dispatch (:func:`conv_norm`, the diagonal, Kronecker and
selection norms) and re-exports every name of its submodules that callers use:

* :mod:`.psd`: certified ``lambda_max`` of batches of PSD matrices (Lanczos, the
  Cholesky test and its rounding terms, :func:`certify_psd_max`), :class:`NormResult`;
* :mod:`.dense`: dense norms by the float64 Gram matrix's eigenvalues or certificate;
* :mod:`.power`: power-method estimates (from below);
* :mod:`.conv_geometry`: tap offsets, grids, strides / padding geometry, minimal tori;
* :mod:`.fourier`: polyphase Fourier blocks, autocorrelation, torus certificates,
  warm starts, scratch buffers;
* :mod:`.materialise`: exact norms of small convs (per-group Gram matrices).

Patching. Tests and benchmarks patch names on this package (``conv_norm``,
``dense_norm``, ``power_method``, ``DENSE_SVD_MAX``, ``SMALL_CONV_INPUTS``,
``ESTIMATE_BLOCKS``); the submodules read those names from the package at call
time (``_pkg.X``), so one patch of ``lipgraph.norms.X`` reaches every caller, as
it did when this was one module. Patch them here, not on a submodule.

See ``docs/norms.md`` for the mathematics; in short:

* dense matrices: the float64 Gram matrix ``G = W W^T`` of the smaller side;
  its LAPACK eigenvalues when small; otherwise a Lanczos estimate ``theta`` of ``lambda_max(G)`` and a
  Cholesky factorisation of ``c I - G`` with ``c = theta (1 + delta)``: its
  success proves ``||W||^2 <= c`` (rounding accounted for, below);
* convolutions: a zero-padded (strided, dilated, grouped) convolution is a
  restriction of a circular one on a torus of size ``N >= n + pad`` (divisible
  by the stride), whose norm is ``max_f ||B(f)||_2`` over the Fourier blocks
  ``B(f)`` of its polyphase form (Sedghi et al. 2019, with strides: each
  block is ``c_out x c_in s^d``). The Gram blocks ``H(f) = B(f) B(f)^H`` come
  straight from the autocorrelation kernel of ``A A^T`` (a circular conv on the
  coarse torus ``N / s``: ``K(m) = sum W_k W_k'^T`` over tap pairs ``s m`` apart),
  so the cubic work is a few real matmuls per layer instead of one complex
  Gram matrix per frequency. The block maxima are certified with a batched
  Lanczos estimate + one batched Cholesky test; blocks that fail it are
  estimated again, then bracketed by bisection.

Rounding. Weights are converted to float64 / complex128 exactly. The
certified values add explicit bounds for (a) the rounding in forming the
blocks, ``||B_hat - B|| <= c1 u ||sum_k |W_k| ||_F``; (b) forming the Gram
matrices, ``||H_hat - B B^H|| <= 4 (m + 2) u ||B||_F^2`` (from the
autocorrelation kernel: ``2 (c_in + P + S + 128) u ||sum_k |W_k| ||_F^2``, see
:func:`autocorrelation`); (c) Cholesky:
success of floating-point Cholesky on ``M = (c - e - a - 4uc) I - H_hat`` with
``a = 8 (n + 2) n u c`` proves ``M + E`` positive definite for
``||E|| <= a`` (Demmel 1989, Rump 2006), hence ``lambda_max(H_hat) < c - e``
(``4uc`` covers rounding the shift and the diagonal, :func:`cholesky_shift`; the
blocks may be built already shifted, since negating the phases is exact);
and (d) LAPACK eigenvalues, accurate to ``p(n) u ||H||``, covered by the
relative ``ROUNDING_MARGIN`` (1e-9, far above ``64 n u`` for any n < 1e5).
``u = 2^-53`` is the float64 unit roundoff.
"""

# ruff: noqa: F401  (this module re-exports the submodules' names: callers and tests use ``norms.X``)
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ir
from ..core import Settings
from .conv_geometry import (
    ConvGeometry,
    _grid_rows,
    _one_cell_attained,
    _pad_copies,
    _pairs,
    _tap_offsets,
    _tap_reads,
    _tap_selection,
    drop_pointwise_axes,
    geometry_from_attrs,
)
from .dense import (
    BATCHED_GRAM_MIN,
    BATCHED_GRAM_MIN_BLOCKS,
    DENSE_SVD_MAX,
    GRAM_LANCZOS_STEPS,
    _gram_err,
    dense_norm,
    gram_norm,
)
from .fourier import (
    CHUNK_ENTRIES,
    EXTRA_TORI_WORK,
    Autocorrelation,
    CircularNorm,
    _abs_sum_frob,
    _extra_tori,
    _lag_phases,
    _pack_lags,
    _phase_tables,
    _top_right_vector,
    _warm_start,
    autocorrelation,
    block_traces,
    certify_autocorrelation,
    circular_conv_norm,
    conv_operator_norm,
    fourier_blocks,
    gram_blocks,
    gram_blocks_at,
    half_spectrum,
    release_scratch,
    scratch,
    single_block,
)
from .materialise import (
    SELECTION_GRAM_RATIO,
    SMALL_CONV_FLOPS,
    SMALL_CONV_GRAM_ENTRIES,
    SMALL_CONV_INPUTS,
    SMALL_CONV_MATRIX_ENTRIES,
    SMALL_MAP_EXTENTS,
    _conv64,
    _selection_input_gram,
    _small_conv_norm,
    _worth_materialising,
    conv_group_matrices,
    conv_input_gram,
    conv_matrix,
)
from .power import linear_op_estimate, power_method
from .psd import (
    CHOLESKY_DELTA,
    ESTIMATE_BLOCKS,
    THREADED_CHOLESKY_MAX,
    U64,
    NormResult,
    PsdMax,
    _cholesky_passes,
    _lanczos_batched,
    _rayleigh_power,
    certify_psd_max,
    cholesky_in_place,
    cholesky_shift,
    factor_chunks,
    lanczos_max,
)

#: Power steps from the Fourier warm start used for the attained (lower) value of a convolution.
WARM_ITERATIONS = 2


def conv_norm(forward_no_bias: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int],
              ctx: Settings, weight: torch.Tensor | None = None, attrs: dict | None = None,
              out_shape: Sequence[int] | None = None, transposed: bool = False, lower: bool = True) -> NormResult:
    """Norm of a convolution (or transposed convolution) at the traced input size: an interval.

    Small ops (``SMALL_CONV_INPUTS``) are materialised exactly (:func:`_small_conv_norm`). Otherwise
    ``upper``: certified, from the Fourier blocks of a circular conv that the op restricts
    (:func:`conv_operator_norm`); reflect / replicate padding: ``||conv_valid|| * ||P||``, with
    ``||P|| = prod_axes sqrt(max copies)`` the norm of the padding operator. A transposed conv is the
    adjoint of the conv with the same weight on the transposed op's *output* size (same norm).
    ``lower``: the autograd power method on the real op, warm-started from the top Fourier mode
    (``WARM_ITERATIONS`` steps): a value the operator attains (skipped with ``lower=False``).
    """
    if weight is None or attrs is None:
        return linear_op_estimate(forward_no_bias, in_shape, ctx)
    dev = ctx.device
    nd = attrs["ndim"]
    spatial = tuple(out_shape[-nd:]) if transposed and out_shape is not None else tuple(in_shape[-nd:])
    mode = ir.padding_mode(attrs)
    factor = 1.0
    if mode in ("reflect", "replicate"):
        pr_ = attrs["pad_reversed"]  # (last axis l, r, ..., first axis l, r)
        pads = [(pr_[2 * (nd - 1 - ax)], pr_[2 * (nd - 1 - ax) + 1]) for ax in range(nd)]
        for ax in range(nd):
            factor *= math.sqrt(_pad_copies(spatial[ax], pads[ax][0], pads[ax][1], mode))
        padded = tuple(n + a + b for n, (a, b) in zip(spatial, pads, strict=True))
        zero_padded = {**attrs, "padding": (0,) * nd, "padding_mode": ir.DEFAULT_PADDING_MODE}
        geom = geometry_from_attrs(zero_padded, weight, padded)
    else:
        plain = attrs if not transposed else {**attrs, "padding_mode": ir.DEFAULT_PADDING_MODE}
        geom = geometry_from_attrs(plain, weight, spatial)
    # a conv whose taps lie in one stride cell (1x1, patchify) is ||W_flat|| on disjoint cells: the Fourier route
    # certifies that single block exactly in milliseconds (resnet50's 1x1 256->1024 conv on 4x4: 8 ms for
    # 3.00859, where materialising its 4096-wide Gram took 0.92 s for 3.01009)
    one_cell = not transposed and factor == 1.0 and geom.mode == "zeros" and _one_cell_attained(geom)
    exact = None if one_cell else _small_conv_norm(
        weight, attrs, transposed, in_shape, dev,
        drop_pointwise_axes(geom) if not transposed and geom.mode == "zeros" else geom)
    if exact is not None:
        return exact
    upper, cn, f2 = conv_operator_norm(weight, geom, dev, _extra_tori(geom, weight))
    upper *= factor
    method = "fourier-" + ("circular" if geom.mode == "circular" else "torus") + "x".join(map(str, cn.torus))
    if factor != 1.0:
        method += f"*pad{factor:.3g}"
    details = {"torus": cn.torus, "blocks": cn.blocks, "cholesky_tests": cn.cholesky_tests, "circular": cn.upper,
               "estimate": cn.estimate * f2 * factor}
    if not lower:
        return NormResult(upper, True, method, None, details)
    if factor == 1.0 and f2 == 1.0 and _one_cell_attained(geom):
        # the op is W_flat on disjoint cells: the dense norm's own attained value is the op's
        return NormResult(upper, True, method, cn.estimate, details)
    # lower: warm-started power method on the real operator
    x0 = None
    try:
        x0 = _warm_start(weight, geom, cn, dev)
        if x0 is not None and mode in ("reflect", "replicate"):
            crop = tuple(slice(a, a + n) for n, (a, _) in zip(spatial, pads, strict=True))
            x0 = x0[(slice(None), slice(None), *crop)]
        if x0 is not None and transposed:
            a = attrs
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
            x0 = conv(x0, weight.detach().to(device=dev, dtype=torch.float64), None, a["stride"], a["padding"],
                      a["dilation"], a["groups"])
        if x0 is not None:
            full = torch.zeros(tuple(in_shape), dtype=x0.dtype, device=x0.device)
            if len(in_shape) == nd + 2 and tuple(full.shape[1:]) == tuple(x0.shape[1:]):
                full[0] = x0[0]
                x0 = full
            elif len(in_shape) == nd + 1 and tuple(full.shape) == tuple(x0.shape[1:]):
                x0 = x0[0]
            else:
                x0 = None
    except (RuntimeError, ValueError, IndexError):
        x0 = None
    low = power_method(forward_no_bias, in_shape, ctx, iterations=WARM_ITERATIONS if x0 is not None else None,
                       x0=x0.to(torch.float32) if x0 is not None else None,
                       exact_op=_conv64(weight, attrs, transposed, dev))
    return NormResult(upper, True, method, low, details)


# --- diagonal and selection operators --------------------------------------------------------------


def diagonal_norm(scale: torch.Tensor) -> NormResult:
    """||diag(d)|| = max |d_i| (exact)."""
    v = float(scale.detach().abs().max()) if scale.numel() else 0.0
    return NormResult(v, True, "diagonal", v)


def window_norm(matrices: Sequence[torch.Tensor]) -> NormResult:
    """Norm of a Kronecker product of small matrices: the product of their norms (each exact:
    :func:`dense_norm`, Gram eigenvalues)."""
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
