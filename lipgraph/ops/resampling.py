"""Resampling: interpolation (``F.interpolate``, ``nn.Upsample``, ONNX ``Resize`` / ``Upsample``).

Every interpolation mode lipgraph supports (nearest, nearest-exact, linear, bilinear, trilinear,
bicubic, area, and their ONNX twins) resamples each spatial axis independently: output entry
``(i_1, ..., i_d)`` is ``sum_j prod_k A_k[i_k, j_k] x[j_1, ..., j_d]`` per channel. So the op is
linear with matrix ``A = A_1 (x) ... (x) A_d`` (Kronecker product, the same for every channel),
and ``||A||_2 = prod_k ||A_k||_2`` exactly. The 1-D matrices are small and built in float64:

* PyTorch spelling: by running ``F.interpolate`` itself on one-hot signals along axis k (size 1
  elsewhere, which every mode maps to itself), so the index arithmetic (align_corners, the scale
  used for coordinates, border clamping, the antialias filter's support) is PyTorch's; antialiased
  modes are also checked to equal the Kronecker product at the node's shape (else inf);
* ONNX spelling: from the ``Resize`` formulas (coordinate transformation modes, nearest rounding
  modes, cubic coefficient ``a``, ``exclude_outside``); the forward applies the same matrices, so
  forward and rule agree by construction (the tests check them against onnxruntime).

The norms come from a float64 SVD plus :data:`~lipgraph.core.ROUNDING_MARGIN` (certified, exact
up to rounding). Nearest 2x upsampling in 2-D copies every entry 4 times: ``L = 2``.

Ranges (input domains): center-radius with the same matrices, ``A mid -+ |A| rad``; for nearest, linear and
area (nonnegative weights) that is the exact range, for cubic (negative weights) an enclosure.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import norms
from ..core import ROUNDING_MARGIN, run_seed
from ..domains import Range
from .registry import LocalConstant, Settings, not_lipschitz, register_rule

_TORCH_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "bicubic", "area"}


def _spatial_axes(node) -> list[int]:
    nd = len(node.in_shapes[0])
    return list(range(nd - node.attrs["ndim"], nd))


# --- the 1-D matrices -------------------------------------------------------------------------------


def torch_axis_matrix(attrs: dict, n_in: int, n_out: int, axis: int) -> torch.Tensor:
    """The (n_out x n_in) matrix of ``F.interpolate`` along spatial axis ``axis`` (float64)."""
    d = attrs["ndim"]
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *[n_in if k == axis else 1 for k in range(d)])
    kw = {"mode": attrs["mode"], "align_corners": attrs.get("align_corners")}
    if attrs.get("antialias"):
        kw["antialias"] = True
    scales = attrs.get("scale_factor")
    if scales is not None and not attrs.get("recompute_scale_factor"):
        kw["scale_factor"] = tuple(float(scales[axis]) if k == axis else 1.0 for k in range(d))
    else:
        kw["size"] = tuple(n_out if k == axis else 1 for k in range(d))
    if attrs.get("antialias"):
        # one signal per call, 2 wide (kept, scale 1) on the other axis: PyTorch's CPU antialias kernel gives
        # wrong rows for a batch of signals and for a size-1 axis (measured: errors of order 1 either way)
        other = [2 if k != axis else 1 for k in range(d)]
        kw2 = dict(kw)
        if "size" in kw2:
            kw2["size"] = tuple(n_out if k == axis else 2 for k in range(d))
        y = torch.cat([F.interpolate(basis[j:j + 1].repeat(1, 1, *other), **kw2)
                       .select(3 - axis, 0).reshape(1, -1) for j in range(n_in)])
    else:
        y = F.interpolate(basis, **kw).reshape(n_in, -1)
    if y.shape[1] != n_out:
        raise ValueError(f"1-D interpolation gave {y.shape[1]} outputs, expected {n_out}")
    return y.T.contiguous()


def _onnx_coordinate(i: int, n_in: int, n_out: int, scale: float, mode: str) -> float:
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if n_out > 1 else 0.0
    if mode == "align_corners":
        return i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    if mode == "asymmetric":
        return i / scale
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (i + 0.5) / scale - 0.5
    raise ValueError(f"unsupported coordinate_transformation_mode {mode!r}")


def _onnx_nearest(x: float, mode: str, downsampling: bool) -> int:
    if mode == "round_prefer_floor":
        return math.floor(x) if x == math.floor(x) + 0.5 else round(x)
    if mode == "round_prefer_ceil":
        return math.ceil(x) if x == math.floor(x) + 0.5 else math.floor(x + 0.5)
    if mode == "floor":
        return math.floor(x)
    if mode == "ceil":
        return math.ceil(x)
    if mode == "simple":  # Resize-10 / Upsample: ceil when downsampling, else truncate
        return math.ceil(x) if downsampling else int(x)
    raise ValueError(f"unsupported nearest_mode {mode!r}")


def _cubic_weights(r: float, a: float) -> list[float]:
    def w(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    return [w(r + 1), w(r), w(1 - r), w(2 - r)]


def onnx_axis_matrix(attrs: dict, n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """The (n_out x n_in) matrix of ONNX Resize along one axis (float64), per the operator spec."""
    key = (attrs["mode"], attrs["coordinate_transformation_mode"], attrs.get("nearest_mode"),
           attrs.get("cubic_coeff_a"), bool(attrs.get("exclude_outside")), n_in, n_out, scale)
    return _onnx_matrix(*key).clone()


@functools.lru_cache(maxsize=256)
def _onnx_matrix(mode: str, coord: str, nearest_mode: str | None, cubic_a: float | None, exclude: bool,
                 n_in: int, n_out: int, scale: float) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = _onnx_coordinate(i, n_in, n_out, scale, coord)
        if mode == "nearest":
            j = _onnx_nearest(x, nearest_mode, scale < 1)
            m[i, min(max(j, 0), n_in - 1)] = 1.0
            continue
        x0 = math.floor(x)
        r = x - x0
        if mode == "linear":
            taps, ws = [x0, x0 + 1], [1 - r, r]
        elif mode == "cubic":
            taps, ws = [x0 - 1, x0, x0 + 1, x0 + 2], _cubic_weights(r, cubic_a)
        else:
            raise ValueError(f"unsupported Resize mode {mode!r}")
        if exclude:
            keep = [(t, w) for t, w in zip(taps, ws, strict=True) if 0 <= t < n_in]
            total = sum(w for _, w in keep)
            for t, w in keep:
                m[i, t] += w / total
        else:
            for t, w in zip(taps, ws, strict=True):
                m[i, min(max(t, 0), n_in - 1)] += w
    return m


def axis_matrices(node) -> list[torch.Tensor]:
    """One float64 1-D matrix per spatial axis of a ``resize`` node."""
    a = node.attrs
    axes = _spatial_axes(node)
    ins = [node.in_shapes[0][k] for k in axes]
    if a["spec"] == "torch":
        outs = [node.out_shape[k] for k in axes]
        return [torch_axis_matrix(a, ni, no, k) for k, (ni, no) in enumerate(zip(ins, outs, strict=True))]
    return [onnx_axis_matrix(a, ni, no, float(s)) for ni, no, s in zip(ins, a["out_sizes"], a["scales"], strict=True)]


# --- the rule ----------------------------------------------------------------------------------------


def apply_axis_matrices(x: torch.Tensor, mats: list[torch.Tensor], axes: list[int]) -> torch.Tensor:
    for m, k in zip(mats, axes, strict=True):
        if m.shape[0] == m.shape[1] and torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)):
            continue
        x = torch.movedim(torch.tensordot(x, m.to(x.dtype), dims=([k], [1])), -1, k)
    return x


def resize_forward(node, x):
    a = node.attrs
    if a["spec"] == "torch":
        kw = {k: a[k] for k in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")}
        if a.get("antialias"):
            kw["antialias"] = True
        return F.interpolate(x, **kw)
    nd = a["ndim"]
    return apply_axis_matrices(x, axis_matrices(node), list(range(x.ndim - nd, x.ndim)))


#: Relative agreement asked of the Kronecker product and ``F.interpolate(antialias=True)`` in float64 (a few
#: hundred ulps: both sum at most a few hundred products of weights in [-1, 1]).
SEPARABLE_TOLERANCE = 1e-12


def separable_as_built(node, mats: list[torch.Tensor]) -> bool:
    """Antialiased interpolation (bilinear/bicubic, 2-D) resamples rows then columns with a normalised filter
    per output index (PyTorch's separable ``_upsample_*_aa``), so its matrix is the Kronecker product of the
    1-D matrices that one-hot signals give. Checked at the node's shape: the product and the op itself agree
    in float64 on two fixed random inputs. A mismatch means the structure was assumed wrongly (inf)."""
    a = node.attrs
    axes = _spatial_axes(node)
    gen = torch.Generator().manual_seed(run_seed(0))
    kw = {k: a[k] for k in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")}
    for _ in range(2):
        x = torch.randn(*node.in_shapes[0], generator=gen, dtype=torch.float64)
        want = F.interpolate(x, **kw, antialias=True)
        got = apply_axis_matrices(x, mats, axes)
        if got.shape != want.shape or float((got - want).abs().max()) > SEPARABLE_TOLERANCE * float(
                x.abs().max() * math.prod(float(m.abs().sum(1).max()) for m in mats)):
            return False
    return True


def resize_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Interpolation is linear and separable: A = A_1 (x) ... (x) A_d, L = prod_axes ||A_axis||_2
    (exact up to rounding: float64 SVD of the 1-D matrices + ROUNDING_MARGIN). Nearest 2x in 2-D: L = 2."""
    a = node.attrs
    if a["spec"] == "torch" and a["mode"] not in _TORCH_MODES:
        return not_lipschitz(f"no rule for interpolation mode {a['mode']!r} at node {node.name!r}")
    try:
        mats = axis_matrices(node)
    except ValueError as e:
        return not_lipschitz(f"{e} at node {node.name!r} ({node.source})")
    if a["spec"] == "torch" and a.get("antialias") and not separable_as_built(node, mats):
        return not_lipschitz(f"antialiased interpolation at node {node.name!r} ({node.source}) is not the "
                             "Kronecker product of its 1-D matrices here")
    r = norms.window_norm(mats)
    return LocalConstant([r.upper], True, "kronecker-svd", lower=r.lower)


def resize_ranges(node, r: Range) -> Range | None:
    """``y = A x`` per channel, ``A = A_1 (x) ... (x) A_d``: center-radius ``A mid -+ |A| rad`` (``|A|`` is
    the Kronecker product of the ``|A_k|``), rounded outward by ``ROUNDING_MARGIN * |A| (|mid| + rad)``
    (an enclosure). Modes without a verified matrix (unknown modes, an antialias check that fails): None."""
    a = node.attrs
    if a["spec"] == "torch" and a["mode"] not in _TORCH_MODES:
        return None
    try:
        mats = axis_matrices(node)
    except ValueError:
        return None
    if a["spec"] == "torch" and a.get("antialias") and not separable_as_built(node, mats):
        return None
    axes = list(range(r.mid.ndim - a["ndim"], r.mid.ndim))
    pos = [m.abs() for m in mats]
    mid = apply_axis_matrices(r.mid, mats, axes)
    rad = apply_axis_matrices(r.rad, pos, axes)
    err = ROUNDING_MARGIN * apply_axis_matrices(r.mid.abs() + r.rad, pos, axes)
    return Range(mid - rad - err, mid + rad + err)


register_rule("resize", resize_forward, resize_lipschitz, affine=True, ranges=resize_ranges)
