"""Geometry of a convolution: spatial sizes, kernel, strides, dilation, padding and groups
(:class:`ConvGeometry`), tap offsets and grids, which input pixel each tap reads, the minimal torus, and the
pointwise-axis and one-cell reductions that keep a norm exact."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ir


@dataclass
class ConvGeometry:
    """A convolution ``y[o] = sum_k W_k x[o s + k dil - pad_l]`` per spatial axis, on input size ``n``.

    ``mode`` is ``"zeros"`` (out-of-range entries are 0) or ``"circular"`` (indices mod n).
    """

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_l: tuple[int, ...]
    pad_r: tuple[int, ...]
    groups: int = 1
    mode: str = "zeros"

    @property
    def out(self) -> tuple[int, ...]:
        return tuple(
            (n + pl + pr - d * (k - 1) - 1) // s + 1
            for n, k, s, d, pl, pr in zip(self.spatial, self.kernel, self.stride, self.dilation, self.pad_l,
                                           self.pad_r, strict=True)
        )

    def min_torus(self) -> tuple[int, ...]:
        """Smallest torus on which the zero-padded conv is a restriction of the circular one:
        ``N >= n + max(pad_l, pad_r)`` (no wrapped index lands on the signal), ``N > (out - 1) s``
        (distinct output positions), ``s | N`` (polyphase)."""
        sizes = []
        for n, s, pl, pr, o in zip(self.spatial, self.stride, self.pad_l, self.pad_r, self.out, strict=True):
            m = max(n + max(pl, pr), (o - 1) * s + 1, 1)
            sizes.append(-(-m // s) * s)
        return tuple(sizes)


def _pairs(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(x) for x in v)
    return v * nd if len(v) == 1 else v


def geometry_from_attrs(attrs: dict, weight: torch.Tensor, spatial: Sequence[int]) -> ConvGeometry:
    """ConvGeometry of a ``conv`` IR node (padding may be an int tuple, ``"same"`` or ``"valid"``)."""
    nd = attrs["ndim"]
    kernel = tuple(weight.shape[2:])
    stride, dil = _pairs(attrs["stride"], nd), _pairs(attrs["dilation"], nd)
    pad = attrs["padding"]
    if pad == "valid":
        pl = pr = (0,) * nd
    elif pad == "same":
        total = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
        pl = tuple(t // 2 for t in total)
        pr = tuple(t - t // 2 for t in total)
    else:
        pl = pr = _pairs(pad, nd)
    return ConvGeometry(tuple(spatial), kernel, stride, dil, pl, pr, int(attrs["groups"]),
                        "circular" if ir.padding_mode(attrs) == "circular" else "zeros")


def _tap_offsets(geom: ConvGeometry) -> list[list[int]]:
    """Per axis, the input offset ``k dil - pad_l`` of each kernel tap."""
    return [[k * d - pl for k in range(kn)] for kn, d, pl in zip(geom.kernel, geom.dilation, geom.pad_l, strict=True)]


def _grid_rows(axes: Sequence[Sequence[int]]) -> torch.Tensor:
    """The points of a grid, one row each, row-major (last axis fastest): (prod len, d) int64."""
    grids = torch.meshgrid(*[torch.tensor(list(a), dtype=torch.int64) for a in axes], indexing="ij")
    return torch.stack([t.reshape(-1) for t in grids], dim=1)


def drop_pointwise_axes(geom: ConvGeometry) -> ConvGeometry:
    """The same norm on fewer pixels: along an axis with kernel size 1 (zero padding), output ``o`` reads input
    ``o s - pad_l`` alone, so the conv is a direct sum, over the outputs that read inside the signal, of one and
    the same conv on the other axes (outputs reading the padding are 0). Its norm is that conv's: the axis
    shrinks to size 1. Kept as is when every axis is pointwise (1x1 convs have their own exact route) or an
    axis reads nothing inside. Inception's 1x7 / 7x1 convs on 12x12 maps become 1-D convs on 12 pixels,
    small enough to materialise: exact instead of 3-5% above."""
    axes = []
    for n, k, s, pl, o in zip(geom.spatial, geom.kernel, geom.stride, geom.pad_l, geom.out, strict=True):
        first = -(-pl // s)  # smallest o with o s - pl >= 0
        axes.append(k == 1 and n > 1 and first <= o - 1 and first * s - pl <= n - 1)
    if not any(axes) or all(k == 1 for k in geom.kernel):
        return geom

    def pick(vals: tuple[int, ...], dropped: int) -> tuple[int, ...]:
        return tuple(dropped if d else v for v, d in zip(vals, axes, strict=True))

    return ConvGeometry(pick(geom.spatial, 1), geom.kernel, pick(geom.stride, 1), pick(geom.dilation, 1),
                        pick(geom.pad_l, 0), pick(geom.pad_r, 0), geom.groups, geom.mode)


def _one_cell_attained(geom: ConvGeometry) -> bool:
    """True when every tap lies in one stride cell (1x1 convs, patchify) and, for zero padding, some output
    reads all its taps inside the signal. Outputs then read disjoint cells, so the conv is ``W_flat`` (taps
    side by side) on each cell, with columns dropped at the border: its norm is exactly ``||W_flat||``."""
    for offs, s, n, o in zip(_tap_offsets(geom), geom.stride, geom.spatial, geom.out, strict=True):
        if len({x // s for x in offs}) != 1:
            return False
        if geom.mode == "zeros":
            first = -(min(offs) // s)  # smallest output o with o s + min(offs) >= 0
            if first > o - 1 or first * s + max(offs) > n - 1:
                return False
        elif n % s or (o - 1) * s >= n:  # circular: exact only on the op's own torus (conv_operator_norm)
            return False
    return True


def _pad_copies(n: int, pl: int, pr: int, mode: str) -> int:
    """Max number of copies of one entry made by 1-D ``mode`` padding (reflect / replicate)."""
    code = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n)
    idx = F.pad(code, (pl, pr), mode=mode).round().long().flatten()
    return int(torch.bincount(idx).max())


def _tap_reads(geom: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Which input pixel each tap reads at each output of a zero-padded conv: ``inside`` (O, T) says the read
    is in the signal, ``flat`` (O, T) its row-major pixel index (clamped where it is not)."""
    outs = _grid_rows([range(o) for o in geom.out])  # (O, d)
    toff = _grid_rows(_tap_offsets(geom))  # (T, d)
    pos = outs[:, None, :] * torch.tensor(geom.stride, dtype=torch.int64) + toff[None]  # (O, T, d)
    inside = ((pos >= 0) & (pos < torch.tensor(geom.spatial, dtype=torch.int64))).all(-1)
    flat = torch.zeros(pos.shape[:2], dtype=torch.int64)
    for ax in range(len(geom.spatial)):
        flat = flat * geom.spatial[ax] + pos[..., ax].clamp(0, geom.spatial[ax] - 1)
    return inside, flat


def _tap_selection(geom: ConvGeometry, device: torch.device) -> torch.Tensor:
    """The 0/1 matrices ``S_k`` (T, O, P): ``S_k[o, p] = 1`` where tap ``k`` reads pixel ``p`` at output ``o``."""
    inside, flat = _tap_reads(geom)
    o_idx, k_idx = torch.nonzero(inside, as_tuple=True)
    sel = torch.zeros(inside.shape[1], inside.shape[0], math.prod(geom.spatial), dtype=torch.float64, device=device)
    sel[k_idx.to(device), o_idx.to(device), flat[o_idx, k_idx].to(device)] = 1.0
    return sel

