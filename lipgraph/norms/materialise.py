"""Exact norms of small convolutions by materialising them: the per-group Gram matrices ``A_g^T A_g`` (from
the tap products or from the exact per-group matrices), or, for other paddings and transposed convs, the
dense matrix from basis responses; then the certified Gram / dense norm of :mod:`lipgraph.norms.dense`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ir
from .. import norms as _pkg
from .conv_geometry import ConvGeometry, _tap_reads, _tap_selection, geometry_from_attrs
from .dense import gram_norm, gram_rows
from .fourier import CHUNK_ENTRIES
from .psd import U64, NormResult

# Names that tests and benchmarks patch on the package (``lipgraph.norms.X``) are read from it at call
# time, so that one patch reaches every caller: see ``lipgraph/norms/__init__.py``.


def _conv64(weight: torch.Tensor, attrs: dict, transposed: bool,
            device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conv (or transposed conv) node without bias, in float64 (for attained values)."""
    w = weight.detach().to(device=device, dtype=torch.float64)
    nd, a = attrs["ndim"], attrs

    def run(x: torch.Tensor) -> torch.Tensor:
        if transposed:
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
            return fn(x, w, None, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"])
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        if ir.padding_mode(a) != ir.DEFAULT_PADDING_MODE:
            return fn(F.pad(x, a["pad_reversed"], mode=a["padding_mode"]), w, None, a["stride"], 0, a["dilation"],
                      a["groups"])
        return fn(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])

    return run


#: Convolutions with at most this many inputs per sample (and a matrix of at most 2^24 entries) are
#: materialised exactly and get a dense certified norm.
SMALL_CONV_INPUTS = 4096
#: ... and, for zero padding (per-group Gram matrices), at most this many Gram entries over all groups.
SMALL_CONV_GRAM_ENTRIES = 1 << 25
#: ... and, for the other paddings and transposed convs (the dense matrix), at most this many matrix entries.
SMALL_CONV_MATRIX_ENTRIES = 1 << 24


def conv_input_gram(w: torch.Tensor, geom: ConvGeometry, device: torch.device) -> tuple[torch.Tensor, float]:
    """Exact-structure Gram matrix ``A^T A`` of a zero-padded conv on its input (per group):
    (g, c_in/g * P, c_in/g * P), ``P`` input pixels (row-major, channels inner), float64, and a bound on
    its rounding. Block ``(p, q)`` is ``sum W_k^T W_k'`` over output positions ``o`` and taps with
    ``p = o s + off_k``, ``q = o s + off_k'`` both inside the signal; so only the ``T^2`` products
    ``W_k^T W_k'`` are multiplied, never the dense matrix. Rounding: each entry sums at most ``T`` such
    products of inner size ``c_out/g``, so ``||fl(G) - G||_2 <= ||.||_F <= 4 (c_out/g + T + 2) u ||A||_F^2``
    with ``||A||_F^2 <= (outputs) ||W||_F^2``."""
    g = geom.groups
    w64 = w.detach().to(device=device, dtype=torch.float64)
    co, ci = w64.shape[0] // g, w64.shape[1]
    taps = w64.reshape(g, co, ci, -1).permute(0, 3, 1, 2)  # (g, T, co, ci)
    t_n = taps.shape[1]
    inside, flat = _tap_reads(geom)
    used = torch.nonzero(inside.any(0)).flatten()  # taps that ever read the signal
    slot = torch.full((t_n,), -1, dtype=torch.int64)
    slot[used] = torch.arange(used.numel())
    tu = taps[:, used.to(device)]
    prod = torch.einsum("gkoc,glod->gklcd", tu, tu)  # W_k^T W_l over the used taps: (g, U, U, ci, ci)
    o_idx, k_idx = torch.nonzero(inside, as_tuple=True)
    # all (k, l) pairs at the same output: p = flat[o, k], q = flat[o, l]
    per_o = torch.zeros(inside.shape[0], dtype=torch.int64).index_add_(0, o_idx, torch.ones_like(o_idx))
    first = torch.cumsum(per_o, 0) - per_o
    pairs_o, pairs_a, pairs_b = [], [], []
    for cnt in torch.unique(per_o).tolist():
        if cnt == 0:
            continue
        os_ = torch.nonzero(per_o == cnt).flatten()
        a = torch.arange(cnt)
        aa, bb = torch.meshgrid(a, a, indexing="ij")
        pairs_o.append(os_.repeat_interleave(cnt * cnt))
        pairs_a.append((first[os_][:, None] + aa.reshape(1, -1)).reshape(-1))
        pairs_b.append((first[os_][:, None] + bb.reshape(1, -1)).reshape(-1))
    n_pix = math.prod(geom.spatial)
    if not pairs_a:  # every output reads padding only: the operator is zero
        return torch.zeros(g, n_pix * ci, n_pix * ci, dtype=torch.float64, device=device), 0.0
    ia, ib = torch.cat(pairs_a), torch.cat(pairs_b)
    ka, kb = k_idx[ia], k_idx[ib]
    p, q = flat[o_idx[ia], ka], flat[o_idx[ib], kb]
    n_pix = math.prod(geom.spatial)
    gram = torch.zeros(n_pix, n_pix, g, ci, ci, dtype=torch.float64, device=device)
    p, q, ka, kb = (x.to(device) for x in (p, q, ka, kb))
    gram.index_put_((p, q), prod[:, slot[ka].to(device), slot[kb].to(device)].movedim(0, 1), accumulate=True)
    gram = gram.permute(2, 0, 3, 1, 4).reshape(g, n_pix * ci, n_pix * ci)
    frob = float(sum(float(taps[:, k].square().sum()) * int(inside[:, k].sum()) for k in range(t_n)))
    err = 4.0 * (co + t_n + 2) * U64 * frob
    return gram, err

#: Materialising costs about ``groups * (inputs per group)^3 / 3`` flops (a Cholesky or eigensolve per
#: group). Above this it is done only on small maps, where the torus bound is loose.
SMALL_CONV_FLOPS = 2e9
#: ... or on maps whose every side is at most this many kernel extents: there the torus bound is loose (2-50%
#: at 2x2-8x8 signals; depthwise on 14x14 maps 1.3% for 3x3, 3.3% for 5x5, 9.5% for 7x7), while a
#: 48-channel depthwise 3x3 on 28x28 keeps the torus bound (0.4% above, 0.05 s; docs/norms.md).
SMALL_MAP_EXTENTS = 4
#: Thin groups: ``A_g^T A_g`` by a dense matmul when ``c_out/g * P^2 <= SELECTION_GRAM_RATIO * T^2``
#: (``2 c_out/g P^2`` flops per input against ~400 flops' time per scattered tap-product entry, ``T^2`` of
#: them per output), else by scattering the tap products (:func:`conv_input_gram`).
SELECTION_GRAM_RATIO = 200


def _worth_materialising(groups: int, per_group: int, geom: ConvGeometry) -> bool:
    """Cheap (``SMALL_CONV_FLOPS``), or a small map: every side at most ``SMALL_MAP_EXTENTS`` kernel extents,
    where the zero padding boundary is a large part of the map and the torus bound is percents above the norm.
    (On a 28x28 map a 3x3 depthwise conv's torus bound is 0.4% above its norm, at a fiftieth of the cost.)"""
    small = all(n <= SMALL_MAP_EXTENTS * ((k - 1) * d + 1)
                for n, k, d in zip(geom.spatial, geom.kernel, geom.dilation, strict=True))
    return small or groups * per_group**3 / 3 <= SMALL_CONV_FLOPS


def conv_group_matrices(w: torch.Tensor, geom: ConvGeometry, device: torch.device,
                        groups: slice | None = None, sel: torch.Tensor | None = None) -> torch.Tensor:
    """The exact matrices ``A_g`` (g, c_out/g * O, c_in/g * P) of a zero-padded conv, per group (rows: output
    channel major, then output pixel; columns: input channel major, then pixel): ``A_g = sum_k W_gk (x) S_k``
    with ``S_k`` (O x P) selecting the pixel tap ``k`` reads at each output. For one output and pixel at most
    one tap matches, so every entry is one weight or zero: exact. One matmul ``(g co ci, T) @ (T, O P)``
    (``sel``: :func:`_tap_selection`, when the caller already has it)."""
    sl = groups if groups is not None else slice(0, geom.groups)
    co = w.shape[0] // geom.groups
    wg = w.detach().to(device=device, dtype=torch.float64)[sl.start * co: sl.stop * co]
    g, ci = sl.stop - sl.start, w.shape[1]
    sel = _tap_selection(geom, device) if sel is None else sel
    t_n, n_out, n_pix = sel.shape
    a = (wg.reshape(g * co * ci, t_n) @ sel.reshape(t_n, n_out * n_pix)).reshape(g, co, ci, n_out, n_pix)
    return a.permute(0, 1, 3, 2, 4).reshape(g, co * n_out, ci * n_pix)


def conv_matrix(weight: torch.Tensor, attrs: dict, in_shape: Sequence[int], device: torch.device,
                max_entries: int = SMALL_CONV_MATRIX_ENTRIES) -> torch.Tensor | None:
    """The exact float64 matrix ``(c_out * O, c_in * P)`` of a zero-padded (strided, dilated, grouped) conv
    without bias on one sample of ``in_shape`` (``(1, c_in, *spatial)`` or ``(c_in, *spatial)``), rows and
    columns flattened channel-major as the tensors are: block-diagonal over the groups of
    :func:`conv_group_matrices`, so every entry is one weight or zero (exact). Its cost is writing the
    entries, not one conv per basis vector (the float64 conv of a 2048-vector basis on resnet18's layer4
    took 0.26 s, this 2 ms). None for other paddings or above ``max_entries`` entries."""
    if ir.padding_mode(attrs) != ir.DEFAULT_PADDING_MODE:
        return None
    nd = attrs["ndim"]
    spatial = tuple(in_shape[-nd:])
    geom = geometry_from_attrs(attrs, weight, spatial)
    n_out = weight.shape[0] * math.prod(geom.out)
    n_in = weight.shape[1] * geom.groups * math.prod(spatial)
    if n_out * n_in > max_entries or in_shape[-(nd + 1)] != weight.shape[1] * geom.groups:
        return None
    blocks = conv_group_matrices(weight, geom, device)
    if geom.groups == 1:
        return blocks[0]
    return torch.block_diag(*blocks.unbind(0))


def _selection_input_gram(w: torch.Tensor, geom: ConvGeometry, device: torch.device) -> tuple[torch.Tensor, float]:
    """``A_g^T A_g`` per group from :func:`conv_group_matrices` (a chunk of groups at a time), with rounding
    bound ``4 (m + 2) u max_g ||A_g||_F^2``, ``m = c_out/g * O``. Cheaper than :func:`conv_input_gram`'s
    scatter of tap products when the groups are thin (depthwise): see :func:`_small_conv_norm`."""
    g = geom.groups
    per = (w.shape[0] // g) * math.prod(geom.out) * w.shape[1] * math.prod(geom.spatial)
    step = max(1, CHUNK_ENTRIES // max(per, 1))
    grams, frob = [], 0.0
    sel = _tap_selection(geom, device)  # shared by every chunk of groups
    for start in range(0, g, step):
        a = conv_group_matrices(w, geom, device, slice(start, min(g, start + step)), sel)
        frob = max(frob, float(a.square().sum((1, 2)).max()))
        grams.append(gram_rows(a.mT))
    m = (w.shape[0] // g) * math.prod(geom.out)
    return torch.cat(grams), 4.0 * (m + 2) * U64 * frob


def _small_conv_norm(weight: torch.Tensor, attrs: dict, transposed: bool, in_shape: Sequence[int],
                     device: torch.device, geom: ConvGeometry | None = None) -> NormResult | None:
    """Exact norm of a small conv. Zero padding (at most ``SMALL_CONV_INPUTS`` inputs per group): its
    Gram matrix ``A^T A`` per group from the tap products (:func:`conv_input_gram`), then :func:`gram_norm`
    (the max over groups; depthwise convs on small maps are exact this way).
    Other paddings and transposed convs: the exact matrix, the float64 conv of each basis vector (every
    output entry is one weight), then :func:`dense_norm`. None when too large."""
    nd = attrs["ndim"]
    per = tuple(in_shape[-(nd + 1):])
    n_in = math.prod(per)
    zero_pad = geom is not None and not transposed and geom.mode == "zeros"
    if zero_pad and ir.padding_mode(attrs) == ir.DEFAULT_PADDING_MODE:
        # groups are independent blocks: the limit is per group (depthwise convs: one channel each)
        per_group = weight.shape[1] * math.prod(geom.spatial)
        if (per_group > _pkg.SMALL_CONV_INPUTS or geom.groups * per_group * per_group > SMALL_CONV_GRAM_ENTRIES
                or not _worth_materialising(geom.groups, per_group, geom)):
            return None
        # thin groups: A_g^T A_g by a dense matmul (2 c_out/g P^2 flops per input) beats scattering the tap
        # products (~400 flops' time per scattered entry, T^2 of them per output) by far
        t_n = math.prod(geom.kernel)
        p_n, o_n = math.prod(geom.spatial), math.prod(geom.out)
        # wide convs on tiny maps: the one-triangle Gram of the matrix (``(c_in P)^2 c_out O / 2`` multiply-adds)
        # is cheaper than the tap products (``T^2 c_out c_in^2``) when ``P^2 O / 2 <= T^2``: wide_resnet50_2's
        # 1024-channel 3x3 convs on 2x2 maps, 3.1 s each by tap products
        if ((weight.shape[0] // geom.groups) * p_n ** 2 <= SELECTION_GRAM_RATIO * t_n * t_n
                or p_n * p_n * o_n <= 2 * t_n * t_n):
            gram, err = _selection_input_gram(weight, geom, device)
        else:
            gram, err = conv_input_gram(weight, geom, device)
        r = gram_norm(gram, err)
        return NormResult(r.upper, True, "materialised-" + r.method, r.lower, {"gram": tuple(gram.shape)})
    if n_in > _pkg.SMALL_CONV_INPUTS or (geom is not None and not _worth_materialising(1, n_in, geom)):
        return None
    run = _conv64(weight, attrs, transposed, device)
    n_out = math.prod(run(torch.zeros(1, *per, dtype=torch.float64, device=device)).shape)
    if n_in * n_out > SMALL_CONV_MATRIX_ENTRIES:
        return None
    basis = torch.eye(n_in, dtype=torch.float64, device=device).reshape(n_in, *per)
    mat = run(basis).reshape(n_in, -1)
    r = _pkg.dense_norm(mat, device)
    return NormResult(r.upper, True, "materialised-" + r.method, r.lower, {"matrix": (n_out, n_in)})


