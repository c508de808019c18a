"""Basis responses of an affine node, built from its weights instead of by running it.

Materialising an affine map (SeqLip's group matrices, affine folding's partial Jacobians) evaluates it on every
basis vector of its input. When the map starts with a conv or a linear layer, that first evaluation is the whole
cost: one float64 conv per basis vector (resnet18 at 64x64 spent 22 of its 50 s there), although the answer is
the layer's matrix, whose entries are its weights. :func:`linear_part_columns` writes that matrix directly.
"""

from __future__ import annotations

import math

import torch

from .. import ir, norms

#: Largest basis-response matrix (entries) built directly; larger maps are not materialised by the callers either.
MAX_ENTRIES = 1 << 25


def linear_part_columns(node: ir.IRNode, in_shape: tuple[int, ...], device: torch.device | str = "cpu"
                        ) -> torch.Tensor | None:
    """``L e_j`` for every basis vector ``e_j`` of ``in_shape`` (one sample), where ``L`` is the linear part of
    ``node`` (a conv with zero padding, or a linear layer on a ``(1, n)`` / ``(n,)`` input): a float64
    ``(n_in, *out_shape)`` tensor, exact (every entry is one weight or zero). None for other nodes."""
    n_in = math.prod(in_shape)
    w = node.params.get("weight")
    if not isinstance(w, torch.Tensor):
        return None
    if node.op == "conv":
        m = norms.conv_matrix(w, node.attrs, in_shape, torch.device(device), MAX_ENTRIES)
    elif node.op == "linear" and len(in_shape) <= 2 and n_in == w.shape[-1] and w.ndim == 2:
        m = w.detach().to(device=device, dtype=torch.float64)
    else:
        return None
    if m is None or m.shape[1] != n_in or m.shape[0] != math.prod(node.out_shape):
        return None
    return m.T.reshape(n_in, *node.out_shape)


__all__ = ["MAX_ENTRIES", "linear_part_columns"]
