"""Canonicalisation table: every spelling of an op in PyTorch -> one IR op kind.

Handlers have the exact signature of the PyTorch function, method or module
they translate, so arguments bind as in PyTorch. A handler receives, for each
tensor argument, either a :class:`Var` (a value that depends on the model input)
or the concrete constant, and returns a :class:`Canon`: the op kind, its
inputs (``Var`` s, or constant tensors that become ``constant`` nodes), attrs
and params. Returning ``None`` means "no rule": the call stays executable as an
``opaque`` node whose constant is an honest ``inf``.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ir
from ..ops.registry import as_tuple


@dataclass(frozen=True)
class Var:
    """A traced value that depends on the model input: a tensor, or a tuple of tensors."""

    name: str
    shape: Any  # tuple for tensors, list of tuples for tuple values
    is_tuple: bool = False
    producer: str = ""  # the canonical op that computed it (an order statistic's tuple: "order_pair")
    dtype: torch.dtype | None = None  # a tensor's dtype on the example (None: a tuple, or not known)


@dataclass
class Canon:
    op: str
    inputs: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def is_var(x: Any) -> bool:
    return isinstance(x, Var)


def _t(x: Any) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.tensor(x)


def _params(**kw: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in kw.items() if isinstance(v, torch.Tensor)}


# --- activations -------------------------------------------------------------------


def relu_like(kind: str):
    def handler(input, inplace=False):  # noqa: A002
        return Canon(kind, [input])

    return handler


def leaky_relu(input, negative_slope=0.01, inplace=False):  # noqa: A002
    return Canon("leaky_relu", [input], {"negative_slope": float(negative_slope)})


def elu(input, alpha=1.0, inplace=False):  # noqa: A002
    return Canon("elu", [input], {"alpha": float(alpha)})


def celu(input, alpha=1.0, inplace=False):  # noqa: A002
    return Canon("celu", [input], {"alpha": float(alpha)})


def gelu(input, approximate="none"):  # noqa: A002
    return Canon("gelu", [input], {"approximate": approximate})


def softplus(input, beta=1.0, threshold=20.0):  # noqa: A002
    return Canon("softplus", [input], {"beta": float(beta), "threshold": float(threshold)})


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):  # noqa: A002
    return Canon("hardtanh", [input], {"min_val": float(min_val), "max_val": float(max_val)})


def relu6(input, inplace=False):  # noqa: A002
    return Canon("relu6", [input])


def clamp(input, min=None, max=None):  # noqa: A002
    lo = -float("inf") if min is None else float(min)
    hi = float("inf") if max is None else float(max)
    return Canon("hardtanh", [input], {"min_val": lo, "max_val": hi})


def prelu(input, weight):  # noqa: A002
    if is_var(weight):  # max(0, x) + w min(0, x) with an input-dependent w: not x * w (that is only its x < 0 half)
        return None
    return Canon("prelu", [input], params={"weight": _t(weight)})


def softmax(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002
    return Canon("softmax", [input], {"dim": _dim(dim, input)})


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002
    return Canon("log_softmax", [input], {"dim": _dim(dim, input)})


def _dim(dim, v: Var) -> int:
    nd = len(v.shape)
    if dim is None:
        dim = 0 if nd in (0, 1, 3) else 1  # PyTorch's legacy implicit choice
    return dim % nd


# --- affine ops ------------------------------------------------------------------------


def linear(input, weight, bias=None):  # noqa: A002
    if is_var(weight) or is_var(bias):
        return None
    return Canon("linear", [input], params=_params(weight=weight, bias=bias))


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,  # noqa: A002
              sparse=False):
    """``F.embedding``: a lookup of rows of a constant table (``padding_idx``, ``scale_grad_by_freq`` and
    ``sparse`` change gradients only). With ``max_norm`` PyTorch renormalises the table's rows in place on
    every call: no rule (opaque, inf)."""
    if is_var(weight) or max_norm is not None:
        return None
    return Canon("embedding", [input], params=_params(weight=weight))


def _conv(ndim: int):
    def handler(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,  # noqa: A002
                padding_mode=ir.DEFAULT_PADDING_MODE, pad_reversed=None):
        if is_var(weight) or is_var(bias):
            return None
        attrs = ir.conv_attrs(ndim, as_tuple(stride, ndim),
                              padding if isinstance(padding, str) else as_tuple(padding, ndim),
                              as_tuple(dilation, ndim), groups, padding_mode, pad_reversed)
        return Canon("conv", [input], attrs, _params(weight=weight, bias=bias))

    return handler


def _conv_transpose(ndim: int):
    def handler(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):  # noqa: A002
        if is_var(weight) or is_var(bias):
            return None
        attrs = ir.conv_transpose_attrs(ndim, as_tuple(stride, ndim), as_tuple(padding, ndim),
                                        as_tuple(output_padding, ndim), as_tuple(dilation, ndim), groups)
        return Canon("conv_transpose", [input], attrs, _params(weight=weight, bias=bias))

    return handler


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):  # noqa: A002
    if training or running_mean is None or running_var is None:
        return None  # batch statistics: the output depends on the whole batch
    return Canon("batch_norm", [input], ir.batch_norm_attrs(eps),
                 _params(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002
    return Canon(
        "layer_norm", [input], {"normalized_shape": tuple(normalized_shape), "eps": float(eps)},
        _params(weight=weight, bias=bias),
    )


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002
    return Canon("group_norm", [input], {"num_groups": int(num_groups), "eps": float(eps)},
                 _params(weight=weight, bias=bias))


def rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: A002
    if is_var(weight):
        return None
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return Canon("rms_norm", [input], {"normalized_shape": shape, "eps": None if eps is None else float(eps)},
                 _params(weight=weight))


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,  # noqa: A002
                  momentum=0.1, eps=1e-5):
    if not use_input_stats or is_var(weight) or is_var(bias):
        return None  # running statistics: an affine map lipgraph does not spell yet (honest inf)
    return Canon("instance_norm", [input], {"eps": float(eps)}, _params(weight=weight, bias=bias))


def _instance_norm_module(m: nn.Module, x: Var) -> Canon | None:
    if m.track_running_stats and not m.training:
        return None
    return instance_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


# --- pooling ------------------------------------------------------------------------------


def _max_pool(ndim: int):
    def handler(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):  # noqa: A002
        if return_indices:
            return None
        k = as_tuple(kernel_size, ndim)
        attrs = ir.max_pool_attrs(ndim, k, as_tuple(stride, ndim) if stride not in (None, [], ()) else k,
                                  as_tuple(padding, ndim), as_tuple(dilation, ndim), ceil_mode)
        return Canon("max_pool", [input], attrs)

    return handler


def _avg_pool(ndim: int):
    def handler(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,  # noqa: A002
                divisor_override=None):
        k = as_tuple(kernel_size, ndim)
        attrs = ir.avg_pool_attrs(ndim, k, as_tuple(stride, ndim) if stride not in (None, [], ()) else k,
                                  as_tuple(padding, ndim), ceil_mode, count_include_pad, divisor_override)
        return Canon("avg_pool", [input], attrs)

    return handler


def _lp_pool(ndim: int):
    def handler(input, norm_type, kernel_size, stride=None, ceil_mode=False):  # noqa: A002
        k = as_tuple(kernel_size, ndim)
        attrs = ir.lp_pool_attrs(ndim, norm_type, k, as_tuple(stride, ndim) if stride not in (None, [], ()) else k,
                                 ceil_mode)
        return Canon("lp_pool", [input], attrs)

    return handler


def _adaptive_size(output_size, v: Var, ndim: int) -> tuple[int, ...]:
    spatial = v.shape[-ndim:]
    size = output_size if isinstance(output_size, (list, tuple)) else [output_size] * ndim
    return tuple(int(s) if s is not None else int(spatial[i]) for i, s in enumerate(size))


def _adaptive_avg(ndim: int):
    def handler(input, output_size):  # noqa: A002
        size = _adaptive_size(output_size, input, ndim)
        return Canon("adaptive_avg_pool", [input], {"ndim": ndim, "output_size": size})

    return handler


def _adaptive_max(ndim: int):
    def handler(input, output_size, return_indices=False):  # noqa: A002
        if return_indices:
            return None
        size = _adaptive_size(output_size, input, ndim)
        return Canon("adaptive_max_pool", [input], {"ndim": ndim, "output_size": size})

    return handler


def _reduce(kind: str):
    def handler(input, dim=None, keepdim=False, *, dtype=None, **_):  # noqa: A002
        if isinstance(dim, (list, tuple)) and len(dim) == 0:
            dim = None
        if dim is not None:
            nd = len(input.shape)
            dim = dim % nd if isinstance(dim, int) else tuple(d % nd for d in dim)
        return Canon(kind, [input], {"dim": dim, "keepdim": bool(keepdim)})

    return handler


# --- resampling ------------------------------------------------------------------------------


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,  # noqa: A002
                recompute_scale_factor=None, antialias=False):
    """F.interpolate / nn.Upsample: the ``resize`` op, with PyTorch's own arguments (per-axis tuples)."""
    ndim = len(input.shape) - 2
    if ndim < 1:
        return None
    attrs = {
        "spec": "torch",
        "ndim": ndim,
        "mode": mode,
        "size": tuple(int(s) for s in size) if isinstance(size, (list, tuple))
        else (None if size is None else (int(size),) * ndim),
        "scale_factor": tuple(float(s) for s in scale_factor) if isinstance(scale_factor, (list, tuple))
        else (None if scale_factor is None else (float(scale_factor),) * ndim),
        "align_corners": align_corners,
        "recompute_scale_factor": recompute_scale_factor,
        "antialias": bool(antialias),
    }
    return Canon("resize", [input], attrs)


def _upsample_module(m: nn.Module, x: Var) -> Canon | None:
    return interpolate(x, m.size, m.scale_factor, m.mode, m.align_corners, getattr(m, "recompute_scale_factor", None))


# --- selections and running sums ---------------------------------------------------------------


def _elementwise_pick(kind: str):
    def handler(input, other, *, out=None):  # noqa: A002
        vars_ = [v for v in (input, other) if is_var(v)]
        consts = [_const(v) for v in (input, other) if not is_var(v)]
        params = {"const": consts[0]} if consts else {}
        return Canon("elementwise_max", vars_, {"kind": kind}, params)

    return handler


def _norm_dims(dim, v: Var):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    nd = len(v.shape)
    return dim % nd if isinstance(dim, int) else tuple(d % nd for d in dim)


def _amax(kind: str):
    def handler(input, dim=(), keepdim=False, *, out=None):  # noqa: A002
        return Canon("amax", [input], {"kind": kind, "dim": _norm_dims(dim, input), "keepdim": bool(keepdim)})

    return handler


def _max_overloads(kind: str):
    """torch.max / torch.min: over every entry (values), elementwise against a tensor, or over ``dim``: the
    ``(values, indices)`` pair of an order statistic (its integer indices get no finite rule)."""

    def handler(input, *args, **kwargs):  # noqa: A002
        other = args[0] if args else kwargs.get("other", kwargs.get("dim"))
        if other is None:
            return _amax(kind)(input)
        if is_var(other) or isinstance(other, torch.Tensor):
            return _elementwise_pick(kind)(input, other)
        if isinstance(other, int) and is_var(input):
            keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
            return _order(kind, input, dim=other % len(input.shape), keepdim=bool(keepdim))
        return None

    return handler


def _order(fn: str, input: Any, **kwargs: Any) -> Canon:  # noqa: A002
    """``(values, indices) = torch.<fn>(input, **kwargs)``: an ``order_pair`` node (rule in ops.selections)."""
    return Canon("order_pair", [input], {"fn": fn, "kwargs": kwargs})


def sort(input, dim=-1, descending=False, stable=False, *, out=None):  # noqa: A002
    if out is not None:
        return None
    return _order("sort", input, dim=dim % len(input.shape), descending=bool(descending), stable=bool(stable))


def topk(input, k, dim=-1, largest=True, sorted=True, *, out=None):  # noqa: A002
    if out is not None:
        return None
    return _order("topk", input, k=int(k), dim=dim % len(input.shape), largest=bool(largest), sorted=bool(sorted))


def kthvalue(input, k, dim=-1, keepdim=False, *, out=None):  # noqa: A002
    if out is not None:
        return None
    return _order("kthvalue", input, k=int(k), dim=dim % len(input.shape), keepdim=bool(keepdim))


def msort(input):  # noqa: A002
    """``torch.msort(x)``: ``x`` sorted ascending along dim 0, a values-only ``topk`` of every entry."""
    return Canon("topk", [input], {"k": int(input.shape[0]), "dim": 0, "largest": False})


def median_dim(input, dim=None, keepdim=False, *, out=None):  # noqa: A002
    if dim is None or out is not None:
        return None  # median over every entry returns one value: no rule here (opaque, inf)
    return _order("median", input, dim=dim % len(input.shape), keepdim=bool(keepdim))


def _cumulative(fn: str):
    def handler(input, dim, *, out=None):  # noqa: A002
        if out is not None:
            return None
        return _order(fn, input, dim=dim % len(input.shape))

    return handler


def logsumexp(input, dim, keepdim=False, *, out=None):  # noqa: A002
    return Canon("logsumexp", [input], {"dim": _norm_dims(dim, input), "keepdim": bool(keepdim)})


def where(condition, input=None, other=None, *, out=None):  # noqa: A002
    if input is None or is_var(condition):
        return None  # a data-dependent condition switches between branches: no rule
    vars_, params, flags = [], {"cond": _t(condition).bool()}, []
    for i, v in enumerate((input, other)):
        flags.append(is_var(v))
        if is_var(v):
            vars_.append(v)
        else:
            params[f"const{i}"] = _t(v)
    return Canon("where_const", vars_, {"var": tuple(flags)}, params)


def cumsum(input, dim, *, dtype=None, out=None):  # noqa: A002
    return Canon("cumsum", [input], {"dim": dim % max(len(input.shape), 1)})


# --- dropout and friends ---------------------------------------------------------------


def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002
    if training and p > 0:
        return None
    return Canon("identity", [input])


def stochastic_depth(input, p, mode, training=True):  # noqa: A002
    if training and p > 0:
        return None
    return Canon("identity", [input])


def identity(input, *args, **kwargs):  # noqa: A002
    return Canon("identity", [input])


def to_dtype(input, *args, **kwargs):  # noqa: A002
    """A cast between float types (casts to integer or bool types are discontinuous: see fx._discontinuity)."""
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            dtype = a.dtype
    return Canon("identity", [input], {"dtype": dtype} if dtype is not None else {})


# --- shapes -----------------------------------------------------------------------------------
# Reshape-like calls are recorded with their *traced* output shape (the IR is
# specialised to the example input's shape), so every spelling maps to one op.


def reshape_like(input, *args, **kwargs):  # noqa: A002
    return Canon("reshape", [input], {"shape": None})  # shape filled from the traced output


def permute(input, *dims):  # noqa: A002
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    nd = len(input.shape)
    return Canon("permute", [input], {"dims": tuple(d % nd for d in dims)})


def transpose(input, dim0, dim1):  # noqa: A002
    nd = len(input.shape)
    dims = list(range(nd))
    a, b = dim0 % nd, dim1 % nd
    dims[a], dims[b] = dims[b], dims[a]
    return Canon("permute", [input], {"dims": tuple(dims)})


def t(input):  # noqa: A002
    return Canon("permute", [input], {"dims": tuple(reversed(range(len(input.shape))))})


def expand(input, *sizes):  # noqa: A002
    return Canon("expand", [input], {"shape": None})


def repeat(input, *repeats):  # noqa: A002
    if len(repeats) == 1 and isinstance(repeats[0], (list, tuple)):
        repeats = tuple(repeats[0])
    return Canon("repeat", [input], {"repeats": tuple(int(r) for r in repeats)})


def flip(input, *dims):  # noqa: A002
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return Canon("flip", [input], {"dims": tuple(dims)})


def roll(input, shifts, dims=None):  # noqa: A002
    return Canon("roll", [input], {"shifts": shifts, "dims": dims})


def pad(input, pad, mode="constant", value=None):  # noqa: A002
    return Canon("pad", [input], {"pad": tuple(pad), "mode": mode, "value": value})


def pixel_shuffle(input, upscale_factor):  # noqa: A002
    return Canon("pixel_shuffle", [input], {"factor": int(upscale_factor)})


def unfold(input, kernel_size, dilation=1, padding=0, stride=1):  # noqa: A002
    return Canon("unfold", [input], {"kernel_size": kernel_size, "dilation": dilation, "padding": padding,
                                     "stride": stride})


def pixel_unshuffle(input, downscale_factor):  # noqa: A002
    return Canon("pixel_shuffle", [input], {"factor": int(downscale_factor), "inverse": True})


def channel_shuffle(input, groups):  # noqa: A002
    return Canon("channel_shuffle", [input], {"groups": int(groups)})


def cat(tensors, dim=0, *, out=None):
    first = next((x for x in tensors if is_var(x)), None)
    nd = len(first.shape) if first is not None else 1
    return Canon("cat", list(tensors), {"dim": dim % nd})


def stack(tensors, dim=0, *, out=None):
    first = next((x for x in tensors if is_var(x)), None)
    nd = len(first.shape) + 1 if first is not None else 1
    return Canon("stack", list(tensors), {"dim": dim % nd})


def split(tensor, split_size_or_sections, dim=0):
    return Canon("split", [tensor], ir.split_attrs(dim % len(tensor.shape), None))


def chunk(input, chunks, dim=0):  # noqa: A002
    return Canon("split", [input], ir.split_attrs(dim % len(input.shape), None))


def unbind(input, dim=0):  # noqa: A002
    return Canon("unbind", [input], {"dim": dim % len(input.shape)})


def getitem(obj, index):
    if is_var(obj) and obj.is_tuple:
        if obj.producer == "order_pair" and index in (1, -1):
            return Canon("tuple_getitem", [obj], {"index": 1, "integer_part": True})
        return Canon("tuple_getitem", [obj], {"index": index})
    if _contains_var(index):
        return None  # data-dependent indexing
    return Canon("getitem", [obj], {"index": index})


def _contains_var(x: Any) -> bool:
    if is_var(x):
        return True
    if isinstance(x, (list, tuple)):
        return any(_contains_var(y) for y in x)
    return False


def getattr_(obj, name):
    if is_var(obj) and obj.producer == "order_pair" and name in ("values", "indices"):
        return getitem(obj, 0 if name == "values" else 1)
    if name == "T":
        return t(obj)
    if name == "mT":
        return transpose(obj, -2, -1)
    return None


# --- arithmetic ---------------------------------------------------------------------------------


def _const(x: Any, like: Any = None) -> torch.Tensor:
    """A constant operand as a tensor. A Python number takes the dtype of the tensor ``like`` it scales, as
    PyTorch computes with it (``torch.tensor(0.3)`` is float32, so a float64 model's ``x / 0.3`` was bounded by
    ``1 / float32(0.3)``, 4e-8 below its slope)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        dtype = getattr(like, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return torch.tensor(float(x), dtype=dtype)
    return _t(x)


def add(input, other, *, alpha=1, out=None):  # noqa: A002
    return _lincomb(input, other, 1.0, float(alpha))


def sub(input, other, *, alpha=1, out=None):  # noqa: A002
    return _lincomb(input, other, 1.0, -float(alpha))


def rsub(input, other, alpha=1):  # noqa: A002
    return _lincomb(input, other, -float(alpha), 1.0)


def _lincomb(a: Any, b: Any, ca: float, cb: float) -> Canon:
    """ca * a + cb * b, with variables as inputs and constants folded into ``const``."""
    inputs, coeffs, const = [], [], None
    for x, c in ((a, ca), (b, cb)):
        if is_var(x):
            inputs.append(x)
            coeffs.append(c)
        else:
            term = _const(x) * c if c != 1 else _const(x)
            const = term if const is None else const + term
    params = {"const": const} if const is not None else {}
    return Canon("add", inputs, {"coeffs": coeffs}, params)


def neg(input):  # noqa: A002
    return Canon("add", [input], {"coeffs": [-1.0]})


def mul(input, other, *, out=None):  # noqa: A002
    if is_var(input) and is_var(other):
        return Canon("mul_var", [input, other])
    var, const = (input, other) if is_var(input) else (other, input)
    return Canon("scale", [var], {"divide": False}, {"const": _const(const, var)})


def div(input, other, *, rounding_mode=None, out=None):  # noqa: A002
    if rounding_mode is not None:
        return None
    if is_var(other):
        return Canon("div_var", [input, other]) if is_var(input) else None
    return Canon("scale", [input], {"divide": True}, {"const": _const(other, input)})


def matmul(input, other, *, out=None):  # noqa: A002
    if is_var(input) and is_var(other):
        return Canon("matmul_var", [input, other])
    if is_var(input):
        return Canon("matmul_const", [input], {"left": False}, {"const": _const(other)})
    return Canon("matmul_const", [other], {"left": True}, {"const": _const(input)})


def sdpa(query, key, value, *args, **kwargs):
    return Canon("matmul_var", [query, key])


# --- the tables ----------------------------------------------------------------------------------

FUNCTIONS: dict[Any, Callable[..., Canon | None]] = {}
METHODS: dict[str, Callable[..., Canon | None]] = {}
MODULES: dict[type, Callable[..., Canon | None]] = {}


def _fn(handler: Callable[..., Canon | None], *targets: Any) -> None:
    for t_ in targets:
        FUNCTIONS[t_] = handler


def _method(handler: Callable[..., Canon | None], *names: str) -> None:
    for n in names:
        METHODS[n] = handler


for _kind in ("relu", "sigmoid", "tanh", "silu", "mish", "hardswish", "hardsigmoid", "selu", "abs", "sin", "cos"):
    _h = relu_like(_kind)
    _targets = [getattr(m, _kind) for m in (F, torch) if hasattr(m, _kind)]
    _targets += [getattr(m, _kind + "_") for m in (F, torch) if hasattr(m, _kind + "_")]
    _fn(_h, *_targets)
    _method(_h, _kind, _kind + "_")

_fn(leaky_relu, F.leaky_relu, F.leaky_relu_)
_fn(elu, F.elu, F.elu_)
_fn(celu, F.celu, torch.celu)
_fn(gelu, F.gelu)
_fn(softplus, F.softplus)
_fn(hardtanh, F.hardtanh, F.hardtanh_)
_fn(relu6, F.relu6)
_fn(clamp, torch.clamp, torch.clip)
_method(clamp, "clamp", "clamp_", "clip")
_fn(prelu, F.prelu, torch.prelu)
_fn(softmax, F.softmax, torch.softmax)
_method(softmax, "softmax")
_fn(log_softmax, F.log_softmax, torch.log_softmax)
_method(log_softmax, "log_softmax")
_fn(linear, F.linear, torch._C._nn.linear)
_fn(embedding, F.embedding)
for _n in (1, 2, 3):
    _fn(_conv(_n), getattr(F, f"conv{_n}d"), getattr(torch, f"conv{_n}d"))
    _fn(_conv_transpose(_n), getattr(F, f"conv_transpose{_n}d"), getattr(torch, f"conv_transpose{_n}d"))
    _fn(_max_pool(_n), getattr(F, f"max_pool{_n}d"), getattr(torch, f"max_pool{_n}d"))
    _fn(_avg_pool(_n), getattr(F, f"avg_pool{_n}d"))
    _fn(_adaptive_avg(_n), getattr(F, f"adaptive_avg_pool{_n}d"))
    _fn(_adaptive_max(_n), getattr(F, f"adaptive_max_pool{_n}d"))
    if hasattr(F, f"lp_pool{_n}d"):
        _fn(_lp_pool(_n), getattr(F, f"lp_pool{_n}d"))
_fn(batch_norm, F.batch_norm)
_fn(layer_norm, F.layer_norm)
_fn(group_norm, F.group_norm)
_fn(instance_norm, F.instance_norm)
if hasattr(F, "rms_norm"):
    _fn(rms_norm, F.rms_norm)
_fn(_reduce("mean"), torch.mean)
_fn(_reduce("sum"), torch.sum)
_method(_reduce("mean"), "mean")
_method(_reduce("sum"), "sum")
_fn(dropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_fn(identity, torch.clone, torch.detach)
_method(identity, "contiguous", "clone", "detach")
_method(to_dtype, "to", "type_as")
for _name, _dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                      ("bfloat16", torch.bfloat16)):
    METHODS[_name] = lambda input, *a, _d=_dtype, **k: to_dtype(input, _d)  # noqa: A002
_fn(reshape_like, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten)
_method(reshape_like, "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
        "squeeze_", "unsqueeze_")
_fn(permute, torch.permute)
_method(permute, "permute")
_fn(transpose, torch.transpose, torch.swapaxes)
_method(transpose, "transpose", "swapaxes")
_fn(t, torch.t)
_method(t, "t")
_method(expand, "expand", "expand_as")
_fn(lambda input, size: Canon("expand", [input], {"shape": None}), torch.broadcast_to)
_method(repeat, "repeat")
_fn(flip, torch.flip)
_method(flip, "flip")
_fn(roll, torch.roll)
_method(roll, "roll")
_fn(pad, F.pad)
_fn(interpolate, F.interpolate, F.upsample)
_fn(_elementwise_pick("max"), torch.maximum, torch.fmax)
_fn(_elementwise_pick("min"), torch.minimum, torch.fmin)
_method(_elementwise_pick("max"), "maximum", "fmax")
_method(_elementwise_pick("min"), "minimum", "fmin")
_fn(sort, torch.sort)
_method(sort, "sort")
_fn(topk, torch.topk)
_method(topk, "topk")
_fn(msort, torch.msort)
_method(msort, "msort")
_fn(kthvalue, torch.kthvalue)
_method(kthvalue, "kthvalue")
_fn(median_dim, torch.median)
_method(median_dim, "median")
_fn(_cumulative("cummax"), torch.cummax)
_method(_cumulative("cummax"), "cummax")
_fn(_cumulative("cummin"), torch.cummin)
_method(_cumulative("cummin"), "cummin")
_fn(_max_overloads("max"), torch.max)
_fn(_max_overloads("min"), torch.min)
_method(_max_overloads("max"), "max")
_method(_max_overloads("min"), "min")
_fn(_amax("max"), torch.amax)
_fn(_amax("min"), torch.amin)
_method(_amax("max"), "amax")
_method(_amax("min"), "amin")
_fn(logsumexp, torch.logsumexp)
_method(logsumexp, "logsumexp")
_fn(where, torch.where)
_fn(cumsum, torch.cumsum)
_method(cumsum, "cumsum")
_fn(pixel_shuffle, F.pixel_shuffle, torch.pixel_shuffle)
_fn(unfold, F.unfold)
_fn(pixel_unshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
_fn(channel_shuffle, F.channel_shuffle, torch.channel_shuffle)
_fn(cat, torch.cat, torch.concat, torch.concatenate)
_fn(stack, torch.stack)
_fn(split, torch.split)
_method(split, "split")
_fn(chunk, torch.chunk)
_method(chunk, "chunk")
_fn(unbind, torch.unbind)
_method(unbind, "unbind")
_fn(getitem, operator.getitem)
_fn(getattr_, builtins.getattr)
_fn(add, operator.add, operator.iadd, torch.add)
_method(add, "add", "add_")
_fn(sub, operator.sub, operator.isub, torch.sub, torch.subtract)
_method(sub, "sub", "sub_", "subtract")
_fn(rsub, torch.rsub)
_fn(neg, operator.neg, torch.neg)
_method(neg, "neg")
_fn(mul, operator.mul, operator.imul, torch.mul, torch.multiply)
_method(mul, "mul", "mul_", "multiply")
_fn(div, operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide)
_method(div, "div", "div_", "true_divide", "divide")
_fn(matmul, operator.matmul, torch.matmul, torch.mm, torch.bmm)
_method(matmul, "matmul", "mm", "bmm")
_fn(sdpa, F.scaled_dot_product_attention)
_fn(lambda x, y: None, torch.einsum)

try:  # torchvision's wrapped helpers, when torchvision is installed
    import torchvision.ops as _tvops

    _fn(stochastic_depth, _tvops.stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is optional
    pass


# --- modules --------------------------------------------------------------------------------------


def _module(types: tuple[type, ...], handler: Callable[..., Canon | None]) -> None:
    for ty in types:
        MODULES[ty] = handler


_module((nn.ReLU,), lambda m, x: Canon("relu", [x]))
_module((nn.ReLU6,), lambda m, x: Canon("relu6", [x]))
_module((nn.LeakyReLU,), lambda m, x: leaky_relu(x, m.negative_slope))
_module((nn.ELU,), lambda m, x: elu(x, m.alpha))
_module((nn.CELU,), lambda m, x: celu(x, m.alpha))
_module((nn.SELU,), lambda m, x: Canon("selu", [x]))
_module((nn.GELU,), lambda m, x: gelu(x, m.approximate))
_module((nn.SiLU,), lambda m, x: Canon("silu", [x]))
_module((nn.Mish,), lambda m, x: Canon("mish", [x]))
_module((nn.Sigmoid,), lambda m, x: Canon("sigmoid", [x]))
_module((nn.Tanh,), lambda m, x: Canon("tanh", [x]))
_module((nn.Softplus,), lambda m, x: softplus(x, m.beta, m.threshold))
_module((nn.Hardtanh,), lambda m, x: hardtanh(x, m.min_val, m.max_val))  # ReLU6 subclasses Hardtanh
_module((nn.ReLU6,), lambda m, x: Canon("relu6", [x]))
_module((nn.Hardswish,), lambda m, x: Canon("hardswish", [x]))
_module((nn.Hardsigmoid,), lambda m, x: Canon("hardsigmoid", [x]))
_module((nn.PReLU,), lambda m, x: prelu(x, m.weight))
_module((nn.Softmax,), lambda m, x: softmax(x, m.dim))
_module((nn.LogSoftmax,), lambda m, x: log_softmax(x, m.dim))
_module((nn.Identity,), lambda m, x, *a, **k: Canon("identity", [x]))
_module((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout),
        lambda m, x: dropout(x, m.p, m.training))
_module((nn.Flatten, nn.Unflatten), lambda m, x: Canon("reshape", [x], {"shape": None}))
_module((nn.Linear,), lambda m, x: linear(x, m.weight, m.bias))
_module((nn.Embedding,), lambda m, x: embedding(x, m.weight, max_norm=m.max_norm))
_module((nn.LayerNorm,), lambda m, x: layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps))
_module((nn.GroupNorm,), lambda m, x: group_norm(x, m.num_groups, m.weight, m.bias, m.eps))
_module((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _instance_norm_module)
if hasattr(nn, "RMSNorm"):
    _module((nn.RMSNorm,), lambda m, x: rms_norm(x, m.normalized_shape, m.weight, m.eps))


def _conv_module(m: nn.Module, x: Var) -> Canon | None:
    ndim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)] if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) \
        else len(m.kernel_size)
    return _conv(ndim)(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode,
                       tuple(m._reversed_padding_repeated_twice))


def _conv_transpose_module(m: nn.Module, x: Var, output_size=None) -> Canon | None:
    ndim = len(m.kernel_size)
    if output_size is not None:
        return None
    return _conv_transpose(ndim)(x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


def _bn_module(m: nn.Module, x: Var) -> Canon | None:
    if m.training or not m.track_running_stats:
        return None
    return batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _pool_module(kind: str):
    def handler(m: nn.Module, x: Var) -> Canon | None:
        ndim = int(type(m).__name__[-2])
        if kind == "max":
            return _max_pool(ndim)(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        if kind == "avg":
            return _avg_pool(ndim)(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                   getattr(m, "divisor_override", None))
        if kind == "lp":
            return _lp_pool(ndim)(x, m.norm_type, m.kernel_size, m.stride, m.ceil_mode)
        if kind == "adaptive_avg":
            return _adaptive_avg(ndim)(x, m.output_size)
        return _adaptive_max(ndim)(x, m.output_size, m.return_indices)

    return handler


_module((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_module)
_module((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_transpose_module)
_module((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _bn_module)
_module((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), _pool_module("max"))
_module((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _pool_module("avg"))
_module(tuple(getattr(nn, f"LPPool{_n}d") for _n in (1, 2, 3) if hasattr(nn, f"LPPool{_n}d")), _pool_module("lp"))
_module((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _pool_module("adaptive_avg"))
_module((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _pool_module("adaptive_max"))
_module((nn.PixelShuffle,), lambda m, x: pixel_shuffle(x, m.upscale_factor))
_module((nn.Unfold,), lambda m, x: unfold(x, m.kernel_size, m.dilation, m.padding, m.stride))
_module((nn.Upsample,), _upsample_module)  # UpsamplingNearest2d / UpsamplingBilinear2d subclass it
_module((nn.ChannelShuffle,), lambda m, x: channel_shuffle(x, m.groups))


def module_handler(m: nn.Module) -> Callable[..., Canon | None] | None:
    """The handler of a module type (exact type first, then its bases)."""
    for ty in type(m).__mro__:
        if ty in MODULES:
            return MODULES[ty]
    return None


#: Modules kept as one node, with a dedicated honest rule (tracing through them adds noise).
ATTENTION_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


# --- aten overloads (graphs from torch.export) -----------------------------------------------------
# ``torch.export`` graphs call ``torch.ops.aten.*`` overloads. Most share the
# signature of the torch.* function they implement and reuse its handler; the
# few that differ get a small adapter here.

_aten = torch.ops.aten


def _aten_fn(handler: Callable[..., Canon | None], *names: str) -> None:
    """Map every tensor overload of each named aten op onto ``handler``."""
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            if "out" in overload:
                continue
            FUNCTIONS[getattr(packet, overload)] = handler


def _aten_conv(ndim: int, transposed: bool):
    if transposed:
        return lambda input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1: \
            _conv_transpose(ndim)(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: \
        _conv(ndim)(input, weight, bias, stride, padding, dilation, groups)


def aten_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):  # noqa: A002
    ndim = weight.dim() - 2
    if transposed:
        return _conv_transpose(ndim)(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _conv(ndim)(input, weight, bias, stride, padding, dilation, groups)


def aten_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):  # noqa: A002
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def aten_bn_no_training(input, weight, bias, running_mean, running_var, momentum, eps):  # noqa: A002
    return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)


def aten_elu(input, alpha=1.0, scale=1.0, input_scale=1.0):  # noqa: A002
    if scale != 1 or input_scale != 1:
        return None
    return elu(input, alpha)


def aten_reduce(kind: str, overload: str):
    def handler(input, *args, dtype=None, **kwargs):  # noqa: A002
        if overload == "default":  # aten.mean(self, *, dtype): every entry
            return _reduce(kind)(input)
        return _reduce(kind)(input, *args[:2], **{k: v for k, v in kwargs.items() if k in ("dim", "keepdim")})

    return handler


def aten_slice(input, dim=0, start=None, end=None, step=1):  # noqa: A002
    nd = len(input.shape)
    return getitem(input, (slice(None),) * (dim % nd) + (slice(start, end, step),))


def aten_select(input, dim, index):  # noqa: A002
    return getitem(input, (slice(None),) * (dim % len(input.shape)) + (index,))


def aten_narrow(input, dim, start, length):  # noqa: A002
    if isinstance(start, torch.Tensor):
        start = int(start)
    return aten_slice(input, dim, start, start + length)


def aten_index(input, indices):  # noqa: A002
    if _contains_var(list(indices)):
        return None
    return getitem(input, tuple(slice(None) if i is None else i for i in indices))


def aten_pad_mode(mode: str):
    return lambda input, padding: pad(input, padding, mode)  # noqa: A002


_aten_fn(relu_like("relu"), "relu", "relu_")
for _kind in ("sigmoid", "tanh", "silu", "mish", "hardswish", "hardsigmoid", "selu", "abs"):
    _aten_fn(relu_like(_kind), _kind, _kind + "_")
_aten_fn(lambda input, negative_slope=0.01: leaky_relu(input, negative_slope), "leaky_relu", "leaky_relu_")  # noqa: A002
_aten_fn(aten_elu, "elu", "elu_")
_aten_fn(celu, "celu", "celu_")
_aten_fn(gelu, "gelu", "gelu_")
_aten_fn(softplus, "softplus")
_aten_fn(hardtanh, "hardtanh", "hardtanh_")
_aten_fn(relu6, "relu6", "relu6_")
_aten_fn(clamp, "clamp", "clamp_", "clip", "clip_")
_aten_fn(prelu, "prelu", "_prelu_kernel")
_aten_fn(lambda input, dim, *a: softmax(input, dim), "softmax", "_softmax", "_safe_softmax")  # noqa: A002
_aten_fn(lambda input, dim, *a: log_softmax(input, dim), "log_softmax", "_log_softmax")  # noqa: A002
_aten_fn(linear, "linear")
for _n in (1, 2, 3):
    _aten_fn(_aten_conv(_n, False), f"conv{_n}d")
    _aten_fn(_aten_conv(_n, True), f"conv_transpose{_n}d")
    _aten_fn(_max_pool(_n), f"max_pool{_n}d")
    _aten_fn(_avg_pool(_n), f"avg_pool{_n}d")
    _aten_fn(_adaptive_avg(_n), f"adaptive_avg_pool{_n}d", f"_adaptive_avg_pool{_n}d")
    _aten_fn(_adaptive_max(_n), f"adaptive_max_pool{_n}d")
    _aten_fn(aten_pad_mode("reflect"), f"reflection_pad{_n}d")
    _aten_fn(aten_pad_mode("replicate"), f"replication_pad{_n}d")
_aten_fn(aten_pad_mode("circular"), "_pad_circular")
_aten_fn(aten_convolution, "convolution", "_convolution")
_aten_fn(aten_batch_norm, "batch_norm")
_aten_fn(aten_bn_no_training, "_native_batch_norm_legit_no_training")
_aten_fn(lambda input, shape, weight=None, bias=None, eps=1e-5, *a: layer_norm(input, shape, weight, bias, eps),  # noqa: A002
         "layer_norm")
_aten_fn(lambda input, groups, weight=None, bias=None, eps=1e-5, *a: group_norm(input, groups, weight, bias, eps),  # noqa: A002
         "group_norm")
for _kind in ("mean", "sum"):
    _packet = getattr(_aten, _kind)
    for _ov in _packet.overloads():
        if "out" not in _ov and _ov in ("default", "dim", "dim_IntList"):
            FUNCTIONS[getattr(_packet, _ov)] = aten_reduce(_kind, _ov)
_aten_fn(lambda input, p=0.5, train=False: dropout(input, p, train), "dropout", "dropout_",  # noqa: A002
         "feature_dropout", "alpha_dropout")
_aten_fn(identity, "clone", "contiguous", "alias", "detach", "lift_fresh_copy")
_aten_fn(to_dtype, "_to_copy", "to")
_aten_fn(reshape_like, "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_",
         "unsqueeze", "unsqueeze_", "view_as", "reshape_as")
_aten_fn(permute, "permute")
_aten_fn(transpose, "transpose", "swapaxes")
_aten_fn(t, "t")
_aten_fn(lambda input, size, *, implicit=False: expand(input, size), "expand", "expand_as", "broadcast_to")  # noqa: A002
_aten_fn(repeat, "repeat")
_aten_fn(flip, "flip")
_aten_fn(roll, "roll")
_aten_fn(lambda input, padding, value=0.0: pad(input, padding, "constant", value), "constant_pad_nd")  # noqa: A002
_aten_fn(pad, "pad")
_aten_fn(pixel_shuffle, "pixel_shuffle")
_aten_fn(unfold, "im2col")
_aten_fn(pixel_unshuffle, "pixel_unshuffle")
_aten_fn(channel_shuffle, "channel_shuffle", "native_channel_shuffle")
_aten_fn(cat, "cat", "concat", "concatenate")
_aten_fn(stack, "stack")
_aten_fn(split, "split", "split_with_sizes")
_aten_fn(chunk, "chunk")
_aten_fn(unbind, "unbind")
_aten_fn(aten_slice, "slice")
_aten_fn(aten_select, "select")
_aten_fn(aten_narrow, "narrow")
_aten_fn(aten_index, "index")
_aten_fn(add, "add", "add_")
_aten_fn(sub, "sub", "sub_", "subtract")
_aten_fn(rsub, "rsub")
_aten_fn(neg, "neg", "neg_")
_aten_fn(mul, "mul", "mul_", "multiply")
_aten_fn(div, "div", "div_", "true_divide", "divide")
_aten_fn(matmul, "matmul", "mm", "bmm")
_aten_fn(sdpa, "scaled_dot_product_attention")
_aten_fn(lambda *a, **k: None, "einsum")

for _kind in ("sin", "cos"):
    _aten_fn(relu_like(_kind), _kind, _kind + "_")
_aten_fn(cumsum, "cumsum")
_aten_fn(_elementwise_pick("max"), "maximum", "fmax")
_aten_fn(_elementwise_pick("min"), "minimum", "fmin")
_aten_fn(_amax("max"), "amax")
_aten_fn(_amax("min"), "amin")
_aten_fn(logsumexp, "logsumexp")
FUNCTIONS[_aten.where.self] = where
_aten_fn(lambda input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *a:  # noqa: A006
         instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps),
         "instance_norm")
_aten_fn(lambda input, normalized_shape, weight=None, eps=None: rms_norm(input, normalized_shape, weight, eps),  # noqa: A006
         "rms_norm")
# The ``.vec`` upsample overloads carry F.interpolate's size / scale_factor (the other overloads'
# per-axis scales are left unmapped: opaque, inf).
_UPSAMPLE_ATEN = {"upsample_nearest1d": "nearest", "upsample_nearest2d": "nearest", "upsample_nearest3d": "nearest",
                  "_upsample_nearest_exact1d": "nearest-exact", "_upsample_nearest_exact2d": "nearest-exact",
                  "_upsample_nearest_exact3d": "nearest-exact", "upsample_linear1d": "linear",
                  "upsample_bilinear2d": "bilinear", "upsample_trilinear3d": "trilinear",
                  "upsample_bicubic2d": "bicubic"}
for _name, _mode in _UPSAMPLE_ATEN.items():
    _packet = getattr(_aten, _name, None)
    if _packet is None or "vec" not in _packet.overloads():
        continue
    if _mode.startswith("nearest"):
        FUNCTIONS[_packet.vec] = lambda input, output_size, scale_factors, _m=_mode: interpolate(  # noqa: A006
            input, output_size, scale_factors, _m)
    else:
        FUNCTIONS[_packet.vec] = lambda input, output_size, align_corners, scale_factors, _m=_mode: interpolate(  # noqa: A006
            input, output_size, scale_factors, _m, align_corners)

#: aten ops returning a tuple whose first entry is the op's result: (op, equivalent torch function, arg adapter).
TUPLE_FIRST: dict[Any, tuple[Callable[..., Any], Callable[..., tuple[tuple, dict]]]] = {
    _aten._native_batch_norm_legit_no_training.default: (
        F.batch_norm,
        lambda x, w, b, rm, rv, momentum, eps: ((x, rm, rv, w, b, False, momentum, eps), {}),
    ),
    _aten.native_layer_norm.default: (
        F.layer_norm, lambda x, shape, w, b, eps: ((x, shape, w, b, eps), {}),
    ),
    _aten.max_pool2d_with_indices.default: (
        F.max_pool2d, lambda x, k, s=(), p=0, d=1, c=False: ((x, k, s or None, p, d, c), {}),
    ),
    _aten.adaptive_max_pool2d.default: (F.adaptive_max_pool2d, lambda x, size: ((x, size), {})),
}

_fn(aten_narrow, torch.narrow)
_method(aten_narrow, "narrow")
