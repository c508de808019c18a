"""Structural ops: graph inputs/outputs, constants, sums, concatenation, shape
changes, indexing, and the honest ``inf`` rules (products of variables, opaque
calls).

Shape ops are selections: every output entry is one input entry (or a
constant). Such a 0/1 matrix ``P`` has ``P^T P = diag(count)``, so
``||P|| = sqrt(max_p count_p)`` exactly: 1 for reshape/permute/slicing, the
square root of the number of copies for expand/repeat/reflect padding.

Ranges (input domains): a selection copies entries (or writes a constant, the pad value), so it is
nondecreasing in its input and ``monotone=True`` gives its exact range ``[f(lo), f(hi)]``; split and unbind
return the tuple of their parts' ranges and ``tuple_getitem`` picks one. ``add`` and ``identity`` (casts)
have their own rules, each an enclosure rounded outward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .. import ir
from ..core import ROUNDING_MARGIN
from ..domains import Range
from . import products
from .registry import LocalConstant, Settings, exact, not_lipschitz, register_rule


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def selection_count(fn, in_shape) -> int:
    """Max number of output entries that copy the same input entry of a selection op ``fn``."""
    n = _numel(in_shape)
    if n == 0:
        return 0
    code = torch.arange(1, n + 1, dtype=torch.float64).reshape(tuple(in_shape))
    out = fn(code)
    idx = out.flatten().round().long()
    idx = idx[(idx >= 1) & (idx <= n)]
    if idx.numel() == 0:
        return 0
    return int(torch.bincount(idx, minlength=n + 1).max())


def _selection_constant(node, fn) -> LocalConstant:
    c = selection_count(fn, node.in_shapes[0])
    v = math.sqrt(c)
    return LocalConstant([v], True, "selection-count", lower=v)


# --- graph boundary and constants ---------------------------------------------


def _no_forward(node, *xs):
    raise RuntimeError("input nodes are bound by execute(), not run")


register_rule("input", _no_forward, lambda node, ctx: exact(1.0, "input", 1), doc="A model input: L = 1 by definition.")


def output_forward(node, *xs):
    return pytree.tree_unflatten(list(xs), node.attrs["spec"])


def output_lipschitz(node, ctx: Settings) -> LocalConstant:
    """The model output is the tuple of its output tensors: L = sqrt(sum_i L_i^2) (exact, disjoint coordinates)."""
    return exact(1.0, "concatenation", len(node.inputs), combine="l2")


register_rule("output", output_forward, output_lipschitz, monotone=True)


def constant_forward(node):
    return node.params["value"]


register_rule("constant", constant_forward, lambda node, ctx: exact(0.0, "constant", 0),
              doc="A tensor that does not depend on the input: L = 0.")


# --- sums and concatenation ----------------------------------------------------------


def add_forward(node, *xs):
    coeffs = node.attrs.get("coeffs") or [1.0] * len(xs)
    out = None
    for c, x in zip(coeffs, xs, strict=True):
        term = x if c == 1 else x * c
        out = term if out is None else out + term
    const = node.params.get("const")
    if const is not None:
        out = out + const if out is not None else const
    return out


def add_lipschitz(node, ctx: Settings) -> LocalConstant:
    """y = sum_i c_i x_i + b (add, sub, neg, +=, with broadcasting): partial_i = |c_i| sqrt(|y|/|x_i|),
    where the square root counts the copies that broadcasting makes (exact per input, combined by the
    triangle inequality)."""
    coeffs = node.attrs.get("coeffs") or [1.0] * len(node.inputs)
    out_n = _numel(node.out_shape)
    partials = [abs(c) * math.sqrt(out_n / max(_numel(s), 1)) for c, s in zip(coeffs, node.in_shapes, strict=True)]
    return LocalConstant(partials, True, "linear-combination")


def add_ranges(node, *rs: Range) -> Range:
    """``y = sum_i c_i x_i + b``: center-radius, ``sum_i c_i mid_i + b -+ sum_i |c_i| rad_i``, rounded outward
    by ``ROUNDING_MARGIN * (sum_i |c_i| (|mid_i| + rad_i) + |b|)`` (an enclosure; broadcasting as the forward)."""
    coeffs = node.attrs.get("coeffs") or [1.0] * len(rs)
    const = node.params.get("const")
    const = const.detach().to(torch.float64) if const is not None else None
    mid = add_forward(ir.as_float64(node), *[r.mid for r in rs])
    rad: Any = 0.0
    mag: Any = const.abs() if const is not None else 0.0
    for c, r in zip(coeffs, rs, strict=True):
        rad = rad + abs(c) * r.rad
        mag = mag + abs(c) * (r.mid.abs() + r.rad)
    err = ROUNDING_MARGIN * mag
    lo, hi = mid - rad - err, mid + rad + err
    return Range(torch.broadcast_to(lo, mid.shape).clone(), torch.broadcast_to(hi, mid.shape).clone())


register_rule("add", add_forward, add_lipschitz, affine=True, ranges=add_ranges)


def cat_forward(node, *xs):
    return torch.cat(xs, dim=node.attrs["dim"])


def stack_forward(node, *xs):
    return torch.stack(xs, dim=node.attrs["dim"])


def _concat_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Concatenation / stack: inputs land on disjoint coordinates, L = sqrt(sum_i L_i^2) (exact)."""
    return exact(1.0, "concatenation", len(node.inputs), combine="l2")


register_rule("cat", cat_forward, _concat_lipschitz, affine=True, monotone=True)
register_rule("stack", stack_forward, _concat_lipschitz, affine=True, monotone=True)


def split_forward(node, x):
    return tuple(torch.split(x, node.attrs["sizes"], dim=node.attrs["dim"]))


register_rule("split", split_forward, lambda node, ctx: exact(1.0, "partition"), affine=True, monotone=True,
              doc="split / chunk / unbind partition the input: L = 1 (exact).")


def unbind_forward(node, x):
    return tuple(torch.unbind(x, dim=node.attrs["dim"]))


register_rule("unbind", unbind_forward, lambda node, ctx: exact(1.0, "partition"), affine=True, monotone=True,
              doc="unbind partitions the input: L = 1 (exact).")


def tuple_getitem_forward(node, x):
    return x[node.attrs["index"]]


def tuple_getitem_ranges(node, r: Any) -> Any:
    """Part ``index`` of a tuple-valued op's ranges (the input's range is the tuple of its parts' ranges):
    exact, no arithmetic."""
    return r[node.attrs["index"]] if isinstance(r, (tuple, list)) else None


def tuple_getitem_lipschitz(node, ctx: Settings) -> LocalConstant:
    """One part of a tuple-valued op: a projection, L <= 1 (certified); the integer indices of an order
    statistic (``attrs["integer_part"]``: ``torch.sort(x)[1]``, ``x.max(1).indices``) jump, L = inf."""
    if node.attrs.get("integer_part"):
        return not_lipschitz(f"the integer indices at node {node.name!r} ({node.source}) jump between values, so "
                             "they have no finite Lipschitz constant")
    return exact(1.0, "projection")


register_rule("tuple_getitem", tuple_getitem_forward, tuple_getitem_lipschitz, affine=True,
              ranges=tuple_getitem_ranges, doc="One part of a tuple-valued op: a projection, L <= 1 (certified).")


# --- shape ops (selections) ------------------------------------------------------------


def reshape_forward(node, x):
    return x.reshape(node.attrs["shape"])


register_rule("reshape", reshape_forward, lambda node, ctx: exact(1.0, "permutation"), affine=True, monotone=True,
              doc="view/reshape/flatten/squeeze/unsqueeze reorder entries: L = 1 (exact).")


def permute_forward(node, x):
    return x.permute(node.attrs["dims"])


register_rule("permute", permute_forward, lambda node, ctx: exact(1.0, "permutation"), affine=True, monotone=True,
              doc="permute/transpose reorder entries: L = 1 (exact).")


def identity_forward(node, x):
    dtype = node.attrs.get("dtype")
    return x.to(dtype) if dtype is not None else x


def identity_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Identity, eval-mode dropout / stochastic depth, contiguous, clone, casts between float types: L = 1.
    A cast to an integer or bool type is discontinuous: L = inf."""
    dtype = node.attrs.get("dtype")
    if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex):
        return not_lipschitz(f"the cast to {dtype} at node {node.name!r} ({node.source}) rounds its input: "
                             "it is discontinuous, so it has no finite Lipschitz constant")
    return exact(1.0, "identity")


def identity_ranges(node, r: Range) -> Range | None:
    """Identity and casts. No cast or a float cast: the input's range, widened by the target type's relative
    rounding ``eps * max(|lo|, |hi|)`` for a narrower float (an enclosure of the rounded value). A cast to an
    integer type truncates toward zero, a nondecreasing map: ``[trunc(lo), trunc(hi)]`` (exact) when the range
    fits the type, else None (it would wrap). A cast to bool: ``{0, 1}``, exactly 1 or 0 where the range
    excludes or is 0. Complex casts: None."""
    dtype = node.attrs.get("dtype")
    if dtype is None or not isinstance(dtype, torch.dtype) or dtype == torch.float64:
        return Range(r.lo, r.hi)
    if dtype.is_complex:
        return None
    if dtype.is_floating_point:
        if bool((r.abs_max > torch.finfo(dtype).max).any()):
            return None  # the cast overflows to inf
        return r.widened(r.abs_max, margin=float(torch.finfo(dtype).eps))
    if dtype == torch.bool:
        zero = (r.lo == 0) & (r.hi == 0)
        nonzero = (r.lo > 0) | (r.hi < 0)
        return Range(torch.where(nonzero, 1.0, 0.0).to(torch.float64), torch.where(zero, 0.0, 1.0).to(torch.float64))
    info = torch.iinfo(dtype)
    if bool((r.lo < info.min).any() or (r.hi > info.max).any()):
        return None
    return Range(torch.trunc(r.lo), torch.trunc(r.hi))


register_rule("identity", identity_forward, identity_lipschitz, affine=True, ranges=identity_ranges)


def getitem_forward(node, x):
    return x[node.attrs["index"]]


def getitem_lipschitz(node, ctx: Settings) -> LocalConstant:
    """x[index]: a selection, L = sqrt(max copies of one entry) (1 for slicing; exact)."""
    index = node.attrs["index"]
    return _selection_constant(node, lambda t: t[index])


register_rule("getitem", getitem_forward, getitem_lipschitz, affine=True, monotone=True)


def expand_forward(node, x):
    return x.expand(node.attrs["shape"])


register_rule("expand", expand_forward,
              lambda node, ctx: _selection_constant(node, lambda t: t.expand(node.attrs["shape"])), affine=True,
              monotone=True, doc="expand/broadcast copies each entry k times: L = sqrt(k) (exact).")


def repeat_forward(node, x):
    return x.repeat(node.attrs["repeats"])


register_rule("repeat", repeat_forward,
              lambda node, ctx: _selection_constant(node, lambda t: t.repeat(node.attrs["repeats"])), affine=True,
              monotone=True, doc="repeat copies each entry k times: L = sqrt(k) (exact).")


def flip_forward(node, x):
    return torch.flip(x, node.attrs["dims"])


register_rule("flip", flip_forward, lambda node, ctx: exact(1.0, "permutation"), affine=True, monotone=True,
              doc="flip reorders entries: L = 1 (exact).")


def roll_forward(node, x):
    return torch.roll(x, node.attrs["shifts"], node.attrs.get("dims"))


register_rule("roll", roll_forward, lambda node, ctx: exact(1.0, "permutation"), affine=True, monotone=True,
              doc="roll reorders entries: L = 1 (exact).")


def pad_forward(node, x):
    a = node.attrs
    if a["mode"] == "constant":
        return F.pad(x, a["pad"], mode="constant", value=a.get("value") or 0.0)
    return F.pad(x, a["pad"], mode=a["mode"])


def pad_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Constant padding (or cropping) keeps each entry at most once: L = 1; reflect/replicate/circular
    copy border entries: L = sqrt(max copies) (exact)."""
    a = node.attrs
    if a["mode"] == "constant":
        return exact(1.0, "selection")
    return _selection_constant(node, lambda t: F.pad(t, a["pad"], mode=a["mode"]))


register_rule("pad", pad_forward, pad_lipschitz, affine=True, monotone=True)


def pixel_shuffle_forward(node, x):
    r = node.attrs["factor"]
    return F.pixel_shuffle(x, r) if node.attrs.get("inverse") is not True else F.pixel_unshuffle(x, r)


def unfold_forward(node, x):
    a = node.attrs
    return F.unfold(x, a["kernel_size"], a["dilation"], a["padding"], a["stride"])


def unfold_lipschitz(node, ctx: Settings) -> LocalConstant:
    """F.unfold / nn.Unfold (im2col): every output entry copies one input entry or a zero pad, so the op is a
    0/1 matrix with at most one 1 per row: L = sqrt(max copies of one entry) (exact; up to prod(kernel) for
    overlapping windows)."""
    return _selection_constant(node, lambda t: unfold_forward(node, t))


register_rule("unfold", unfold_forward, unfold_lipschitz, affine=True, monotone=True)


register_rule("pixel_shuffle", pixel_shuffle_forward, lambda node, ctx: exact(1.0, "permutation"), affine=True,
              monotone=True,
              doc="pixel (un)shuffle reorders entries: L = 1 (exact).")


def channel_shuffle_forward(node, x):
    return F.channel_shuffle(x, node.attrs["groups"])


register_rule("channel_shuffle", channel_shuffle_forward, lambda node, ctx: exact(1.0, "permutation"),
              affine=True, monotone=True, doc="channel shuffle reorders entries: L = 1 (exact).")


# --- products of variables and opaque calls -------------------------------------------


def _product_rule(kind: str, fn, what: str, **capabilities: Any) -> None:
    def lipschitz(node, ctx: Settings) -> LocalConstant:
        return not_lipschitz(
            f"{what} of two input-dependent tensors is not globally Lipschitz "
            f"(it grows with the inputs' magnitude), at node {node.name!r} ({node.source})",
            len(node.inputs),
        )

    lipschitz.__doc__ = (f"{what} of two variables: no global constant, L = inf (certified statement); finite on "
                         "an input domain from the factors' ranges (lipgraph.ops.products).")
    register_rule(kind, fn, lipschitz, **capabilities)


_product_rule("mul_var", lambda node, a, b: a * b, "the elementwise product",
              ranges=products.mul_var_ranges, local=products.mul_var_local)
_product_rule("div_var", lambda node, a, b: a / b, "the quotient",
              ranges=products.div_var_ranges, local=products.div_var_local)
_product_rule("matmul_var", lambda node, a, b: torch.matmul(a, b), "the matrix product",
              ranges=products.matmul_var_ranges, local=products.matmul_var_local)


class _Arg:
    """Placeholder for the i-th tensor input inside an opaque call's argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"<input {self.i}>"


def fill_template(template: Any, xs) -> Any:
    return pytree.tree_map(lambda a: xs[a.i] if isinstance(a, _Arg) else a, template)


def opaque_forward(node, *xs):
    a = node.attrs
    args = fill_template(a["args"], xs)
    kwargs = fill_template(a["kwargs"], xs)
    return a["callable"](*args, **kwargs)


def opaque_lipschitz(node, ctx: Settings) -> LocalConstant:
    """An op with no Lipschitz rule: L = inf (no silent 1). Supply a constant with
    ``constants={...}`` or register a rule."""
    return not_lipschitz(
        f"no Lipschitz rule for {node.origin} at node {node.name!r} ({node.source}); "
        f"pass constants={{{node.source!r}: L}} or register a rule",
        len(node.inputs),
    )


register_rule("opaque", opaque_forward, opaque_lipschitz)


def discontinuous_lipschitz(node, ctx: Settings) -> LocalConstant:
    """A discontinuous op (rounding, sign, comparisons, casts to integer or bool, a ``where`` on an
    input-dependent condition): it jumps, so it has no finite Lipschitz constant, L = inf."""
    what = node.attrs.get("what") or node.origin
    return not_lipschitz(
        f"{what} at node {node.name!r} ({node.source}) is discontinuous (it jumps between values), "
        "so it has no finite Lipschitz constant",
        len(node.inputs),
    )


register_rule("discontinuous", opaque_forward, discontinuous_lipschitz)

ARG = _Arg


def attention_lipschitz(node, ctx: Settings) -> LocalConstant:
    """Dot-product attention multiplies two input-dependent tensors (queries and keys): L = inf."""
    return not_lipschitz(
        f"dot-product attention at node {node.name!r} ({node.source}) multiplies input-dependent queries and "
        "keys, so it is not globally Lipschitz",
        len(node.inputs),
    )


register_rule("attention", opaque_forward, attention_lipschitz)
