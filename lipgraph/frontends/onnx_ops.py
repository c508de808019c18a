"""ONNX op -> canonical IR op: the mapping table of the ONNX frontend.

Each mapping ``fn(builder, node, inputs, attrs)`` receives the node's inputs
as :class:`~lipgraph.frontends.onnx_values.Value` s (``None`` for absent optional
inputs) and emits IR nodes of the kinds the rule table already knows, with
exactly the attrs and params the PyTorch frontend gives their twins, so the
same rules (forward and Lipschitz) run. Defaults that ONNX does not share with
PyTorch (pool strides, ``count_include_pad``, HardSigmoid's alpha) are filled
here. A mapping raises :class:`~lipgraph.frontends.onnx_values.Unsupported` (or
returns ``None``) when it cannot express the node; the node then stays
``opaque`` (an honest ``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import torch

from .. import ir
from ..ops import structural
from .onnx_values import Unsupported, Value

#: The ONNX frontend's builder (:class:`lipgraph.frontends.onnx.Builder`, which imports this table; named by
#: its role here so that the two modules do not import each other).
Builder = Any
Mapping = Callable[[Builder, onnx.NodeProto, list[Value | None], dict[str, Any]], Any]

MAPPINGS: dict[str, Mapping] = {}

#: Ops whose output depends only on the input's shape: folded to constants on the example input.
SHAPE_ONLY = frozenset({"Shape", "Size"})
#: Ops never folded even with constant inputs (random generators).
NEVER_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def mapping(*ops: str) -> Callable[[Mapping], Mapping]:
    def deco(fn: Mapping) -> Mapping:
        for op in ops:
            MAPPINGS[op] = fn
        return fn

    return deco


def _var(v: Value | None) -> Value:
    if v is None or not v.is_var:
        raise Unsupported("expected an input-dependent first operand")
    return v


def _ints(v: Value | None) -> list[int] | None:
    if v is None:
        return None
    if v.is_var:
        raise Unsupported("shape-like operand depends on the input")
    return [int(x) for x in v.value.reshape(-1).tolist()]


def _scalar(v: Value | None, default: float) -> float:
    if v is None or (not v.is_var and v.value.numel() == 0):
        return default
    if v.is_var:
        raise Unsupported("scalar operand depends on the input")
    return float(v.value.reshape(-1)[0])


def _input_or_attr(b: Builder, ins: list[Value | None], idx: int, at: dict[str, Any], name: str,
                   since: int) -> list[int] | None:
    """An int-list that moved from an attribute to an input at opset ``since``."""
    if b.opset >= since:
        return _ints(ins[idx]) if len(ins) > idx else None
    v = at.get(name)
    return [int(x) for x in v] if v is not None else None


# --- identity-like ----------------------------------------------------------------------------


@mapping("Identity")
def _identity(b, node, ins, at):
    return b.emit("identity", [_var(ins[0])])


@mapping("Dropout")
def _dropout(b, node, ins, at):
    x = _var(ins[0])
    if len(ins) > 2 and ins[2] is not None and (ins[2].is_var or bool(ins[2].value.reshape(-1)[0])):
        raise Unsupported("training-mode dropout")
    out = b.emit("identity", [x])
    mask = Value(None, torch.ones(x.shape, dtype=torch.bool))
    return [out, mask]


@mapping("Cast", "CastLike")
def _cast(b, node, ins, at):
    x = _var(ins[0])
    if node.op_type == "Cast":
        dtype = _np_to_torch(onnx.helper.tensor_dtype_to_np_dtype(int(at["to"])))
    else:
        dtype = ins[1].value.dtype if ins[1] is not None else x.value.dtype
    if not (dtype.is_floating_point and x.value.dtype.is_floating_point):
        raise Unsupported("a cast to or from a non-float type")
    return b.emit("identity", [x], {"dtype": dtype} if dtype != x.value.dtype else {})


def _np_to_torch(np_dtype: Any) -> torch.dtype:
    import numpy as np  # noqa: PLC0415

    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


# --- activations ------------------------------------------------------------------------------------

_SIMPLE = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus", "Mish": "mish",
           "HardSwish": "hardswish", "Abs": "abs", "Sin": "sin", "Cos": "cos"}


@mapping(*_SIMPLE)
def _simple(b, node, ins, at):
    kind = _SIMPLE[node.op_type]
    attrs = {"beta": 1.0, "threshold": float("inf")} if kind == "softplus" else {}  # ONNX: no threshold switch
    return b.emit(kind, [_var(ins[0])], attrs)


def unary_mapping(kind: str) -> Mapping:
    """The mapping of an ONNX op that a rule declares as a unary spelling of ``kind`` (see ``OpRule.onnx_ops``)."""

    def emit(b, node, ins, at):
        return b.emit(kind, [_var(ins[0])], {})

    return emit


@mapping("LeakyRelu")
def _leaky(b, node, ins, at):
    return b.emit("leaky_relu", [_var(ins[0])], {"negative_slope": float(at.get("alpha", 0.01))})


@mapping("Elu")
def _elu(b, node, ins, at):
    return b.emit("elu", [_var(ins[0])], {"alpha": float(at.get("alpha", 1.0))})


@mapping("Celu")
def _celu(b, node, ins, at):
    return b.emit("celu", [_var(ins[0])], {"alpha": float(at.get("alpha", 1.0))})


_SELU_ALPHA, _SELU_GAMMA = 1.6732632423543772, 1.0507009873554805


@mapping("Selu")
def _selu(b, node, ins, at):
    """The default alpha/gamma (absent attributes): the ``selu`` rule; otherwise ``gamma * elu(x, alpha)`` (elu
    then scale) with the file's constants, so float32 attributes (exported ``nn.SELU``: 1.6732632, 1.0507010)
    keep their own value of the constant, ``gamma * max(1, alpha)``, which the float64 SELU's can undercut."""
    x = _var(ins[0])
    alpha, gamma = float(at.get("alpha", _SELU_ALPHA)), float(at.get("gamma", _SELU_GAMMA))
    if alpha == _SELU_ALPHA and gamma == _SELU_GAMMA:
        return b.emit("selu", [x])
    y = b.emit("elu", [x], {"alpha": alpha})
    return b.emit("scale", [y], {"divide": False}, {"const": torch.tensor(gamma)})


@mapping("Where")
def _where(b, node, ins, at):
    """A constant condition: ``where_const``. The dynamo exporter spells softplus's linear regime as
    Where(x > t, x, Softplus(x)): map it to ``softplus`` with that threshold. Any other Where stays opaque."""
    cond, x, sp = ins
    if cond is not None and not cond.is_var and x is not None and sp is not None and (x.is_var or sp.is_var):
        # a constant condition: a selection (the ``where_const`` rule)
        params = {"cond": cond.value.bool()}
        for i, v in enumerate((x, sp)):
            if not v.is_var:
                params[f"const{i}"] = v.value
        return b.emit("where_const", [v for v in (x, sp) if v.is_var], {"var": (x.is_var, sp.is_var)}, params)
    if cond is None or x is None or sp is None or not (cond.is_var and x.is_var and sp.is_var):
        raise Unsupported("Where")
    soft = _node_if(b, sp.node, "softplus")
    greater = _node_if(b, cond.node, "discontinuous", origin="ONNX Greater")
    if soft is None or greater is None or soft.inputs != [x.node] or greater.inputs != [x.node]:
        raise Unsupported("Where")
    t = greater.attrs["args"][1]
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or not isinstance(greater.attrs["args"][0], structural.ARG):
        raise Unsupported("Where")
    b.drop(greater.name)
    b.drop(soft.name)
    return b.emit("softplus", [x], {"beta": 1.0, "threshold": float(t)})


@mapping("Gelu")
def _gelu(b, node, ins, at):
    return b.emit("gelu", [_var(ins[0])], {"approximate": str(at.get("approximate", "none"))})


@mapping("HardSigmoid")
def _hardsigmoid(b, node, ins, at):
    """PyTorch's (alpha=1/6, beta=1/2 exactly): the ``hardsigmoid`` rule; otherwise clamp(alpha x + beta, 0, 1)
    as scale -> add -> hardtanh, the file's own constants (ONNX's default is alpha=0.2; an exported
    ``nn.Hardsigmoid`` has alpha = float32(1/6), whose kinks lie 1.8e-7 from PyTorch's)."""
    x = _var(ins[0])
    alpha, beta = float(at.get("alpha", 0.2)), float(at.get("beta", 0.5))
    if alpha == 1 / 6 and beta == 0.5:  # exactly (a float32 attribute never is): a near 1/6 moves the kinks
        return b.emit("hardsigmoid", [x])
    y = b.emit("scale", [x], {"divide": False}, {"const": torch.tensor(alpha, dtype=x.value.dtype)})
    y = b.emit("add", [y], {"coeffs": [1.0]}, {"const": torch.tensor(beta, dtype=x.value.dtype)})
    return b.emit("hardtanh", [y], {"min_val": 0.0, "max_val": 1.0})


@mapping("PRelu")
def _prelu(b, node, ins, at):
    x = _var(ins[0])
    slope = b.const(ins[1], "slope")
    if slope.numel() == 1:
        w = slope.reshape(1)
    elif b.opset < 7 and slope.ndim == 1 and x.ndim > 1 and slope.numel() == x.shape[1]:
        w = slope  # legacy PRelu: a 1-D slope is per channel
    else:
        full = (1,) * (x.ndim - slope.ndim) + tuple(slope.shape)
        if x.ndim < 2 or any(s != 1 for i, s in enumerate(full) if i != 1) or full[1] != x.shape[1]:
            raise Unsupported("a PRelu slope that is not per-channel")
        w = slope.reshape(-1)
    return b.emit("prelu", [x], params={"weight": w})


@mapping("Clip")
def _clip(b, node, ins, at):
    x = _var(ins[0])
    if b.opset < 11:
        lo, hi = float(at.get("min", -math.inf)), float(at.get("max", math.inf))
    else:
        lo = _scalar(ins[1] if len(ins) > 1 else None, -math.inf)
        hi = _scalar(ins[2] if len(ins) > 2 else None, math.inf)
    if lo == -math.inf and hi == math.inf:
        return b.emit("identity", [x])
    if lo == 0.0 and hi == 6.0:
        return b.emit("relu6", [x])
    return b.emit("hardtanh", [x], {"min_val": lo, "max_val": hi})


def _softmax_like(kind: str) -> Mapping:
    def fn(b, node, ins, at):
        x = _var(ins[0])
        nd = max(x.ndim, 1)
        if b.opset >= 13:
            return b.emit(kind, [x], {"dim": int(at.get("axis", -1)) % nd})
        axis = int(at.get("axis", 1)) % nd
        if axis == nd - 1:
            return b.emit(kind, [x], {"dim": axis})
        # before opset 13: softmax over the input flattened to 2-D at ``axis``
        shape = x.shape
        flat = (math.prod(shape[:axis]), math.prod(shape[axis:]))
        y = b.emit("reshape", [x], {"shape": flat})
        y = b.emit(kind, [y], {"dim": 1})
        return b.emit("reshape", [y], {"shape": shape})

    return fn


MAPPINGS["Softmax"] = _softmax_like("softmax")
MAPPINGS["LogSoftmax"] = _softmax_like("log_softmax")


# --- affine ops ------------------------------------------------------------------------------------


@mapping("Gemm")
def _gemm(b, node, ins, at):
    """Y = alpha A' B' + beta C -> linear (weight alpha B'^T, bias beta C when C is per-output)."""
    a_v, b_v = ins[0], ins[1]
    c_v = ins[2] if len(ins) > 2 else None
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    if a_v is None or b_v is None:
        raise Unsupported("missing Gemm operand")
    if b_v.is_var or not a_v.is_var or (c_v is not None and c_v.is_var):
        return _gemm_general(b, a_v, b_v, c_v, alpha, beta, ta, tb)
    x = a_v
    if ta:
        x = b.emit("permute", [x], {"dims": (1, 0)})
    w = b_v.value
    w = w if tb else w.t()  # (N, K)
    weight = (w * alpha if alpha != 1.0 else w).contiguous()
    n = weight.shape[0]
    params = {"weight": weight}
    extra = None
    if c_v is not None and beta != 0.0:
        c = c_v.value * beta if beta != 1.0 else c_v.value
        if c.numel() == 1:
            params["bias"] = c.reshape(1).expand(n).clone()
        elif c.numel() == n and (c.ndim == 1 or c.shape[-1] == n):
            params["bias"] = c.reshape(n).clone()
        else:
            extra = c
    y = b.emit("linear", [x], params=params)
    if extra is not None:
        y = b.emit("add", [y], {"coeffs": [1.0]}, {"const": extra})
    return y


def _gemm_general(b: Builder, a_v: Value, b_v: Value, c_v: Value | None, alpha: float, beta: float, ta: int,
                  tb: int) -> Value:
    """Gemm with a variable B or C: transposes, a matmul (of two variables: inf), scale, add."""
    ops = []
    for v, t in ((a_v, ta), (b_v, tb)):
        if t and v.is_var:
            v = b.emit("permute", [v], {"dims": (1, 0)})
        elif t:
            v = Value(None, v.value.t())
        ops.append(v)
    a2, b2 = ops
    if a2.is_var and b2.is_var:
        y = b.emit("matmul_var", [a2, b2])
    elif a2.is_var:
        y = b.emit("matmul_const", [a2], {"left": False}, {"const": b2.value})
    else:
        y = b.emit("matmul_const", [b2], {"left": True}, {"const": a2.value})
    if alpha != 1.0:
        y = b.emit("scale", [y], {"divide": False}, {"const": torch.tensor(alpha, dtype=y.value.dtype)})
    if c_v is None or beta == 0.0:
        return y
    if c_v.is_var:
        return b.emit("add", [y, c_v], {"coeffs": [1.0, beta]})
    return b.emit("add", [y], {"coeffs": [1.0]}, {"const": c_v.value * beta if beta != 1.0 else c_v.value})


@mapping("MatMul")
def _matmul(b, node, ins, at):
    a_v, b_v = ins[0], ins[1]
    if a_v.is_var and b_v.is_var:
        return b.emit("matmul_var", [a_v, b_v])
    if a_v.is_var:
        w = b_v.value
        if w.ndim == 2 and a_v.ndim >= 1:
            return b.emit("linear", [a_v], params={"weight": w.t().contiguous()})
        return b.emit("matmul_const", [a_v], {"left": False}, {"const": w})
    return b.emit("matmul_const", [b_v], {"left": True}, {"const": a_v.value})


def _spatial_pads(b: Builder, at: dict[str, Any], in_spatial: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b_1..b_n, e_1..e_n] after resolving ``auto_pad``."""
    nd = len(in_spatial)
    auto = str(at.get("auto_pad", "NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            out = -(-in_spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i], 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * nd)
    pads = [int(p) for p in at.get("pads", [0] * (2 * nd))]
    if len(pads) != 2 * nd:
        raise Unsupported("pads of the wrong length")
    return pads


def _fpad(pads: Sequence[int]) -> tuple[int, ...]:
    """ONNX spatial pads [b..., e...] -> F.pad order (last dim first)."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[nd + i]]
    return tuple(out)


def _pool_geometry(x: Value, at: dict[str, Any], kernel: Sequence[int] | None = None):
    nd = x.ndim - 2
    if nd < 1:
        raise Unsupported("pooling/conv needs (N, C, spatial...) input")
    k = [int(v) for v in (kernel if kernel is not None else at["kernel_shape"])]
    s = [int(v) for v in at.get("strides", [1] * nd)]
    d = [int(v) for v in at.get("dilations", [1] * nd)]
    return nd, k, s, d


@mapping("Conv")
def _conv(b, node, ins, at):
    x = _var(ins[0])
    weight = b.const(ins[1], "weight")
    bias = b.const(ins[2], "bias") if len(ins) > 2 and ins[2] is not None else None
    nd, k, s, d = _pool_geometry(x, at, weight.shape[2:])
    pads = _spatial_pads(b, at, x.shape[2:], k, s, d)
    if pads[:nd] != pads[nd:]:
        x = b.emit("pad", [x], {"pad": _fpad(pads), "mode": "constant", "value": 0.0})
        padding = (0,) * nd
    else:
        padding = tuple(pads[:nd])
    attrs = ir.conv_attrs(nd, tuple(s), padding, tuple(d), int(at.get("group", 1)))
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return b.emit("conv", [x], attrs, params)


@mapping("ConvTranspose")
def _conv_transpose(b, node, ins, at):
    x = _var(ins[0])
    weight = b.const(ins[1], "weight")
    bias = b.const(ins[2], "bias") if len(ins) > 2 and ins[2] is not None else None
    nd, k, s, d = _pool_geometry(x, at, weight.shape[2:])
    out_pad = [int(v) for v in at.get("output_padding", [0] * nd)]
    in_sp = x.shape[2:]
    natural = [s[i] * (in_sp[i] - 1) + out_pad[i] + (k[i] - 1) * d[i] + 1 for i in range(nd)]
    auto = str(at.get("auto_pad", "NOTSET"))
    if "output_shape" in at or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [int(v) for v in at["output_shape"]][-nd:] if "output_shape" in at else [
            in_sp[i] * s[i] for i in range(nd)]
        total = [natural[i] - target[i] for i in range(nd)]
        if any(t < 0 for t in total):
            raise Unsupported("ConvTranspose output_shape larger than the natural size")
        if auto == "SAME_UPPER":
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = [int(v) for v in at.get("pads", [0] * (2 * nd))]
    common = [min(pads[i], pads[nd + i]) for i in range(nd)]
    attrs = ir.conv_transpose_attrs(nd, tuple(s), tuple(common), tuple(out_pad), tuple(d), int(at.get("group", 1)))
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    y = b.emit("conv_transpose", [x], attrs, params)
    if any(pads[i] != pads[nd + i] for i in range(nd)):
        index: list[Any] = [slice(None), slice(None)]
        for i in range(nd):
            lo, hi = pads[i] - common[i], pads[nd + i] - common[i]
            index.append(slice(lo, y.shape[2 + i] - hi))
        y = b.emit("getitem", [y], {"index": tuple(index)})
    return y


@mapping("BatchNormalization")
def _batch_norm(b, node, ins, at):
    x = _var(ins[0])
    if int(at.get("training_mode", 0)) or (b.opset < 7 and not int(at.get("is_test", 1 if b.opset >= 6 else 0))):
        raise Unsupported("training-mode BatchNormalization")
    scale, bias, mean, var = (b.const(v, "statistic") for v in ins[1:5])
    c = x.shape[1] if x.ndim > 1 else 1
    if any(t.numel() != c for t in (scale, bias, mean, var)):
        raise Unsupported("BatchNormalization with non per-channel statistics")
    params = {"running_mean": mean.reshape(c), "running_var": var.reshape(c), "weight": scale.reshape(c),
              "bias": bias.reshape(c)}
    return b.emit("batch_norm", [x], ir.batch_norm_attrs(at.get("epsilon", 1e-5)), params)


@mapping("InstanceNormalization")
def _instance_norm(b, node, ins, at):
    x = _var(ins[0])
    scale, bias = b.const(ins[1], "scale"), b.const(ins[2], "bias")
    return b.emit("instance_norm", [x], {"eps": float(at.get("epsilon", 1e-5))},
                  {"weight": scale.reshape(-1), "bias": bias.reshape(-1)})


@mapping("LayerNormalization")
def _layer_norm(b, node, ins, at):
    x = _var(ins[0])
    axis = int(at.get("axis", -1)) % x.ndim
    shape = tuple(x.shape[axis:])
    params = {}
    for key, v in (("weight", ins[1] if len(ins) > 1 else None), ("bias", ins[2] if len(ins) > 2 else None)):
        if v is not None:
            params[key] = b.const(v, key).expand(shape).contiguous()
    return b.emit("layer_norm", [x], {"normalized_shape": shape, "eps": float(at.get("epsilon", 1e-5))}, params)


@mapping("RMSNormalization")
def _rms_norm(b, node, ins, at):
    """Opset 23: ``X / sqrt(mean(X^2 over axes [axis, rank)) + epsilon) * Scale`` (``stash_type`` only chooses
    the precision of the computation; the IR evaluates in the input's dtype, float64 for the bounds)."""
    x = _var(ins[0])
    axis = int(at.get("axis", -1)) % x.ndim
    shape = tuple(x.shape[axis:])
    if len(ins) < 2 or ins[1] is None:
        raise Unsupported("RMSNormalization without its Scale input")
    weight = b.const(ins[1], "scale").expand(shape).contiguous()
    return b.emit("rms_norm", [x], {"normalized_shape": shape, "eps": float(at.get("epsilon", 1e-5))},
                  {"weight": weight})


# --- arithmetic ----------------------------------------------------------------------------------------


def _legacy_broadcast(b: Builder, at: dict[str, Any], x: Value, c: torch.Tensor) -> torch.Tensor:
    """Opset < 7 ``broadcast=1, axis=k``: align the constant's dims at axis k of x."""
    if b.opset >= 7 or not int(at.get("broadcast", 0)) or "axis" not in at:
        return c
    axis = int(at["axis"]) % x.ndim
    return c.reshape(tuple(c.shape) + (1,) * (x.ndim - axis - c.ndim))


def _operands(b: Builder, at: dict[str, Any], ins: list[Value | None]) -> tuple[Value, Value]:
    a, c = ins[0], ins[1]
    if a is None or c is None:
        raise Unsupported("missing operand")
    if a.is_var and not c.is_var:
        c = Value(None, _legacy_broadcast(b, at, a, c.value))
    return a, c


def _fuse_bias(b: Builder, x: Value, const: torch.Tensor) -> Value | None:
    """MatMul + Add(bias) from the exporter: fold the bias into the preceding linear node."""
    n = ir.node(b.g, x.node)
    if n.op != "linear" or "bias" in n.params or not b.single_use(n.name):
        return None
    nout = n.params["weight"].shape[0]
    if const.numel() != nout or const.ndim < 1 or const.shape[-1] != nout or const.dtype != x.value.dtype:
        return None
    n.params["bias"] = const.reshape(nout).clone()
    return Value(n.name, x.value + n.params["bias"])


def _fused_activation(b: Builder, a: Value, c: Value) -> Value | None:
    """Exporters decompose SiLU as x * sigmoid(x) and Mish as x * tanh(softplus(x)): map them back to
    the ``silu`` / ``mish`` rules (the product of two variables would be an inf)."""
    for x, other in ((a, c), (c, a)):
        n = ir.node(b.g, other.node)
        if n.op == "sigmoid" and n.inputs == [x.node] and b.single_use(n.name):
            b.drop(n.name)
            return b.emit("silu", [x])
        if n.op == "tanh" and b.single_use(n.name):
            p = ir.node(b.g, n.inputs[0])
            if (p.op == "softplus" and p.inputs == [x.node] and p.attrs.get("beta", 1.0) == 1.0
                    and b.uses.get(b.produced.get(p.name, ""), 0) == 1):
                b.drop(n.name)
                b.drop(p.name)
                return b.emit("mish", [x])
    for x, other in ((a, c), (c, a)):
        y = _fused_hardswish(b, x, other)
        if y is not None:
            return y
    return _fused_gelu(b, a, c)


def _exactly(n: ir.IRNode, value: float, key: str = "const") -> bool:
    """``n``'s scalar constant is ``value`` exactly (no tolerance: a fused rule must be the same function)."""
    c = n.params.get(key)
    return c is not None and c.numel() == 1 and float(c) == value


def _fused_hardswish(b: Builder, x: Value, other: Value) -> Value | None:
    """Hard-swish as exporters spell it, rewritten exactly (constants compared exactly, shapes equal), where the
    product of two variables would be an ``inf``: ``x * clip(x + 3, 0, 6) = 6 hardswish(x)`` (the trailing
    ``/ 6`` stays a scale); ``x * hardsigmoid(x) = hardswish(x)`` (the ``hardsigmoid`` rule is PyTorch's, slope
    1/6 and offset 1/2 exactly); and ``x * clip(k x + 1/2, 0, 1) = hardswish(6 k x) / (6 k)`` for any ``k != 0``
    (an ONNX HardSigmoid with ``alpha = float32(1/6)`` is such a clip), its scales by ``k`` and by 6 applied one at
    a time so that every constant is the file's own or 6. Hard-swish's slope lies in [-1/2, 3/2]."""
    if tuple(other.value.shape) != tuple(x.value.shape):  # a broadcasting constant would change the shape
        return None
    relu6 = _node_if(b, other.node, "relu6")
    if relu6 is not None:
        add = _node_if(b, relu6.inputs[0], "add")
        if (add is not None and add.inputs == [x.node] and add.attrs.get("coeffs") == [1.0]
                and _exactly(add, 3.0) and tuple(add.out_shape) == tuple(x.value.shape)):
            for n in (relu6, add):
                b.drop(n.name)
            y = b.emit("hardswish", [x])
            return b.emit("scale", [y], {"divide": False}, {"const": torch.tensor(6.0, dtype=x.value.dtype)})
        return None
    hsig = _node_if(b, other.node, "hardsigmoid")
    if hsig is not None and hsig.inputs == [x.node]:
        b.drop(hsig.name)
        return b.emit("hardswish", [x])
    clip = _node_if(b, other.node, "hardtanh")  # clip(k x + 1/2, 0, 1): HardSigmoid, or written out
    if clip is None or clip.attrs.get("min_val") != 0.0 or clip.attrs.get("max_val") != 1.0:
        return None
    add = _node_if(b, clip.inputs[0], "add", inner=True)
    if add is None or add.attrs.get("coeffs") != [1.0] or not _exactly(add, 0.5):
        return None
    scale = _node_if(b, add.inputs[0], "scale", inner=True)
    if (scale is None or scale.inputs != [x.node] or scale.params["const"].numel() != 1
            or tuple(add.out_shape) != tuple(x.value.shape)):
        return None
    k = scale.params["const"].reshape(()).clone()
    if not math.isfinite(float(k)) or float(k) == 0.0:
        return None
    divide = bool(scale.attrs.get("divide"))
    for n in (clip, add, scale):
        b.drop(n.name)
    six = torch.tensor(6.0, dtype=x.value.dtype)
    u = b.emit("scale", [x], {"divide": divide}, {"const": k})  # k x (or x / c)
    u = b.emit("scale", [u], {"divide": False}, {"const": six})  # 6 k x
    y = b.emit("hardswish", [u])
    y = b.emit("scale", [y], {"divide": True}, {"const": six})
    return b.emit("scale", [y], {"divide": not divide}, {"const": k})  # / (6 k)


def _node_if(b: Builder, name: str | None, op: str, uses: int = 1, origin: str | None = None,
             inner: bool = False) -> ir.IRNode | None:
    """The IR node ``name`` if it has kind ``op`` (and ``origin``), and its ONNX value is read ``uses`` times.
    ``inner``: it may also be a node inside one ONNX node's mapping (no ONNX value of its own, as HardSigmoid's
    scale and add), read by one IR node."""
    if name is None or name not in b.g:
        return None
    n = ir.node(b.g, name)
    if n.op != op or (origin is not None and n.origin != origin):
        return None
    if inner and name not in b.produced:
        return n if b.g.out_degree(name) == 1 and uses == 1 else None
    if b.uses.get(b.produced.get(name, ""), 0) != uses:
        return None
    return n


def _is_const(n: ir.IRNode, value: float, key: str = "const") -> bool:
    """``n``'s scalar constant is ``value`` as the file's dtype writes it (``value`` rounded to that dtype)."""
    c = n.params.get(key)
    if c is None or c.numel() != 1:
        return False
    return float(c) == float(torch.tensor(value, dtype=c.dtype if c.is_floating_point() else torch.float64))


def _fused_gelu(b: Builder, a: Value, c: Value) -> Value | None:
    """Exporters before opset 20 spell GELU as x * (1 + erf(x / sqrt 2)) [* 0.5]. With the file's own constant
    ``m`` in the place of ``1 / sqrt 2`` (``x / c`` or ``x * c``: float32's sqrt 2 is not sqrt 2), the product is
    ``x (1 + erf(m x)) = (sqrt 2 / m) gelu(sqrt 2 m x)``, written so: scales by ``m`` and by ``sqrt 2`` (float64),
    ``gelu``, then by ``sqrt 2`` and ``1 / m`` (the trailing ``* 0.5`` stays a scale), for any ``m != 0``. The
    same function up to the float64 rounding of ``sqrt 2``; the product of two variables would be an ``inf``.
    (The tanh form's two constants are matched as the file's dtype rounds them: :func:`_fused_gelu_tanh`.)"""
    for x, other in ((a, c), (c, a)):
        if tuple(other.value.shape) != tuple(x.value.shape):
            continue
        add = _node_if(b, other.node, "add")
        if add is None or add.attrs.get("coeffs") != [1.0] or not _is_const(add, 1.0):
            continue
        erf = _node_if(b, add.inputs[0], "opaque", origin="ONNX Erf")
        div = _node_if(b, erf.inputs[0] if erf else None, "scale")
        if erf is None or div is None or div.inputs != [x.node]:
            continue
        c0 = div.params["const"].reshape(()).clone()
        if c0.numel() != 1 or not math.isfinite(float(c0)) or float(c0) == 0.0:
            continue
        divide = bool(div.attrs.get("divide"))
        for n in (add, erf, div):
            b.drop(n.name)
        root2 = torch.tensor(math.sqrt(2.0), dtype=torch.float64)
        u = b.emit("scale", [x], {"divide": divide}, {"const": c0})  # m x
        u = b.emit("scale", [u], {"divide": False}, {"const": root2})  # sqrt 2 m x
        y = b.emit("gelu", [u], {"approximate": "none"})
        y = b.emit("scale", [y], {"divide": False}, {"const": root2})
        return b.emit("scale", [y], {"divide": not divide}, {"const": c0})  # (sqrt 2 / m) gelu(sqrt 2 m x)
    for x, other in ((a, c), (c, a)):
        y = _fused_gelu_tanh(b, x, other)
        if y is not None:
            return y
    return None


def _fused_gelu_tanh(b: Builder, x: Value, other: Value) -> Value | None:
    """x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -> ``2 * gelu(x, 'tanh')``."""
    add1 = _node_if(b, other.node, "add")
    if add1 is None or add1.attrs.get("coeffs") != [1.0] or not _is_const(add1, 1.0):
        return None
    tanh = _node_if(b, add1.inputs[0], "tanh")
    s1 = _node_if(b, tanh.inputs[0] if tanh else None, "scale")
    if s1 is None or s1.attrs.get("divide") or not _is_const(s1, math.sqrt(2 / math.pi)):
        return None
    inner = _node_if(b, s1.inputs[0], "add")
    if inner is None or inner.attrs.get("coeffs") != [1.0, 1.0] or "const" in inner.params:
        return None
    cube_scale = next((ir.node(b.g, i) for i in inner.inputs if i != x.node), None)
    if sorted(inner.inputs) != sorted([x.node, cube_scale.name if cube_scale else ""]):
        return None
    s2 = _node_if(b, cube_scale.name, "scale")
    if s2 is None or s2.attrs.get("divide") or not _is_const(s2, 0.044715):
        return None
    cube = _node_if(b, s2.inputs[0], "mul_var")
    if cube is None:
        return None
    square_name = next((i for i in cube.inputs if i != x.node), None)
    square = _node_if(b, square_name, "mul_var")
    if square is None or square.inputs != [x.node, x.node] or sorted(cube.inputs) != sorted([x.node, square.name]):
        return None
    for n in (add1, tanh, s1, inner, s2, cube, square):
        b.drop(n.name)
    y = b.emit("gelu", [x], {"approximate": "tanh"})
    return b.emit("scale", [y], {"divide": False}, {"const": torch.tensor(2.0, dtype=x.value.dtype)})


def _fused_layer_norm(b: Builder, a: Value, c: Value) -> Value | None:
    """Exporters before opset 17 spell LayerNorm as (x - mean) / sqrt(mean((x - mean)^2) + eps):
    map the quotient to ``layer_norm`` (the affine part that follows stays scale and add)."""
    sub = _node_if(b, a.node, "add", uses=2)
    sqrt = _node_if(b, c.node, "opaque", origin="ONNX Sqrt")
    if sub is None or sqrt is None or sub.attrs.get("coeffs") != [1.0, -1.0] or "const" in sub.params:
        return None
    x_name, mean_name = sub.inputs
    mean = _node_if(b, mean_name, "mean")
    eps_add = _node_if(b, sqrt.inputs[0], "add")
    var = _node_if(b, eps_add.inputs[0] if eps_add else None, "mean")
    pow_ = _node_if(b, var.inputs[0] if var else None, "opaque", origin="ONNX Pow")
    if None in (mean, eps_add, var, pow_) or mean.inputs != [x_name] or pow_.inputs != [sub.name]:
        return None
    exponent = pow_.attrs["args"][1]
    if not isinstance(exponent, torch.Tensor) or exponent.numel() != 1 or float(exponent) != 2.0:
        return None
    eps = eps_add.params.get("const")
    if eps_add.attrs.get("coeffs") != [1.0] or eps is None or eps.numel() != 1 or float(eps) <= 0:
        return None
    x_shape = ir.node(b.g, x_name).out_shape
    nd = len(x_shape)
    dims = mean.attrs.get("dim")
    dims = tuple(sorted(d % nd for d in ((dims,) if isinstance(dims, int) else dims)))
    if dims != tuple(range(nd - len(dims), nd)) or var.attrs.get("dim") != mean.attrs.get("dim"):
        return None
    if not (mean.attrs.get("keepdim") and var.attrs.get("keepdim")):
        return None
    for n in (sqrt, eps_add, var, pow_, sub, mean):
        b.drop(n.name)
    x = Value(x_name, _values_of(b, x_name))
    shape = tuple(x_shape[nd - len(dims):])
    return b.emit("layer_norm", [x], {"normalized_shape": shape, "eps": float(eps)})


def _values_of(b: Builder, name: str) -> torch.Tensor:
    out = b.produced.get(name)
    if out is not None and out in b.env:
        return b.env[out].value
    return b.env[name].value  # a graph input


@mapping("Add", "Sub")
def _add_sub(b, node, ins, at):
    a, c = _operands(b, at, ins)
    sign = -1.0 if node.op_type == "Sub" else 1.0
    if a.is_var and c.is_var:
        return b.emit("add", [a, c], {"coeffs": [1.0, sign]})
    if a.is_var:
        if sign > 0:
            fused = _fuse_bias(b, a, c.value)
            if fused is not None:
                return fused
        return b.emit("add", [a], {"coeffs": [1.0]}, {"const": c.value * sign if sign < 0 else c.value})
    return b.emit("add", [c], {"coeffs": [sign]}, {"const": a.value})


@mapping("Sum", "Mean")
def _sum(b, node, ins, at):
    present = [v for v in ins if v is not None]
    w = 1.0 / len(present) if node.op_type == "Mean" else 1.0
    vars_ = [v for v in present if v.is_var]
    consts = [v.value for v in present if not v.is_var]
    params = {}
    if consts:
        total = consts[0]
        for t in consts[1:]:
            total = total + t
        params["const"] = total * w if w != 1.0 else total
    if len(vars_) == 1 and not consts and w == 1.0:
        return b.emit("identity", vars_)
    return b.emit("add", vars_, {"coeffs": [w] * len(vars_)}, params)


@mapping("Neg")
def _neg(b, node, ins, at):
    return b.emit("add", [_var(ins[0])], {"coeffs": [-1.0]})


@mapping("Mul")
def _mul(b, node, ins, at):
    a, c = _operands(b, at, ins)
    if a.is_var and c.is_var:
        return _fused_activation(b, a, c) or b.emit("mul_var", [a, c])
    var, const = (a, c) if a.is_var else (c, a)
    return b.emit("scale", [var], {"divide": False}, {"const": const.value})


@mapping("Div")
def _div(b, node, ins, at):
    a, c = _operands(b, at, ins)
    if a.is_var and c.is_var:
        return _fused_layer_norm(b, a, c) or b.emit("div_var", [a, c])
    if not a.is_var:
        raise Unsupported("a constant divided by a variable")
    if not c.value.dtype.is_floating_point:
        raise Unsupported("integer division")
    return b.emit("scale", [a], {"divide": True}, {"const": c.value})


# --- shapes -----------------------------------------------------------------------------------------------


@mapping("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, ins, at):
    x = _var(ins[0])
    shape = _reshaped(b, node, x, ins, at)
    return b.emit("reshape", [x], {"shape": tuple(shape)})


def _reshaped(b: Builder, node: onnx.NodeProto, x: Value, ins: list[Value | None], at: dict[str, Any]) -> list[int]:
    s = list(x.shape)
    op = node.op_type
    if op == "Reshape":
        target = _ints(ins[1]) if b.opset >= 5 else [int(v) for v in at["shape"]]
        if target is None:
            raise Unsupported("Reshape without a shape")
        if not int(at.get("allowzero", 0)):
            target = [s[i] if t == 0 else t for i, t in enumerate(target)]
        try:
            return list(torch.empty(s, dtype=torch.int8).reshape(target).shape)
        except RuntimeError as exc:
            from ..errors import InputShapeError  # noqa: PLC0415

            raise InputShapeError(f"ONNX Reshape {node.name!r} cannot reshape {tuple(s)} to {target}: "
                                  "is the example input shape right for this model?") from exc
    if op == "Flatten":
        axis = int(at.get("axis", 1)) % (len(s) + 1) if s else 0
        return [math.prod(s[:axis]), math.prod(s[axis:])]
    if op == "Squeeze":
        axes = _input_or_attr(b, ins, 1, at, "axes", 13)
        if not axes:
            return [d for d in s if d != 1]
        axes = {a % len(s) for a in axes}
        return [d for i, d in enumerate(s) if i not in axes]
    axes = _input_or_attr(b, ins, 1, at, "axes", 13) or []
    n = len(s) + len(axes)
    axes = sorted(a % n for a in axes)
    out, it = [], iter(s)
    for i in range(n):
        out.append(1 if i in axes else next(it))
    return out


@mapping("Transpose")
def _transpose(b, node, ins, at):
    x = _var(ins[0])
    perm = at.get("perm")
    dims = tuple(int(p) % x.ndim for p in perm) if perm else tuple(reversed(range(x.ndim)))
    return b.emit("permute", [x], {"dims": dims})


@mapping("Expand")
def _expand(b, node, ins, at):
    x = _var(ins[0])
    shape = tuple(torch.broadcast_shapes(x.shape, tuple(_ints(ins[1]) or [])))
    if shape == x.shape:
        return b.emit("identity", [x])
    return b.emit("expand", [x], {"shape": shape})


@mapping("Tile")
def _tile(b, node, ins, at):
    x = _var(ins[0])
    return b.emit("repeat", [x], {"repeats": tuple(_ints(ins[1]) or [])})


@mapping("Concat")
def _concat(b, node, ins, at):
    present = [v for v in ins if v is not None]
    first = next(v for v in present if v.is_var)
    dim = int(at.get("axis", 1 if b.opset < 4 else 0)) % first.ndim
    return b.emit("cat", present, {"dim": dim})


@mapping("Split")
def _split(b, node, ins, at):
    x = _var(ins[0])
    dim = int(at.get("axis", 0)) % x.ndim
    n_out = len(node.output)
    sizes = _input_or_attr(b, ins, 1, at, "split", 13)
    if not sizes:
        length = x.shape[dim]
        if b.opset >= 18 and "num_outputs" in at:
            n_out = int(at["num_outputs"])
            chunk = -(-length // n_out)
            sizes = [min(chunk, length - i * chunk) for i in range(n_out)]
        else:
            sizes = [length // n_out] * n_out
    parts = b.emit("split", [x], ir.split_attrs(dim, list(sizes)))
    return [b.emit("tuple_getitem", [parts], {"index": i}) for i in range(len(sizes))]


@mapping("Slice")
def _slice(b, node, ins, at):
    x = _var(ins[0])
    if b.opset < 10:
        starts, ends = [int(v) for v in at["starts"]], [int(v) for v in at["ends"]]
        axes = [int(v) for v in at["axes"]] if "axes" in at else None
        steps = None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 else None
        steps = _ints(ins[4]) if len(ins) > 4 else None
    if starts is None or ends is None:
        raise Unsupported("Slice without starts/ends")
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        if sp <= 0:
            raise Unsupported("Slice with a negative step")
        index[ax % x.ndim] = slice(st, en, sp)
    return b.emit("getitem", [x], {"index": tuple(index)})


@mapping("Gather")
def _gather(b, node, ins, at):
    x = _var(ins[0])
    idx = b.const(ins[1], "indices").to(torch.int64)
    axis = int(at.get("axis", 0)) % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    key: Any = int(idx) if idx.ndim == 0 else idx
    return b.emit("getitem", [x], {"index": (slice(None),) * axis + (key,)})


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@mapping("Pad")
def _pad(b, node, ins, at):
    x = _var(ins[0])
    mode = _PAD_MODES.get(str(at.get("mode", "constant")))
    if mode is None:
        raise Unsupported("unknown pad mode")
    if b.opset < 11:
        pads = [int(v) for v in at.get("pads", at.get("paddings", []))]
        value = float(at.get("value", 0.0))
        axes = None
    else:
        pads = _ints(ins[1]) or []
        value = _scalar(ins[2] if len(ins) > 2 else None, 0.0)
        axes = _ints(ins[3]) if len(ins) > 3 else None
    axes = [a % x.ndim for a in axes] if axes else list(range(x.ndim))
    k = len(axes)
    per_dim = {ax: (pads[i], pads[k + i]) for i, ax in enumerate(axes)}
    fpad: list[int] = []
    last_nonzero = -1
    for d in reversed(range(x.ndim)):
        fpad += list(per_dim.get(d, (0, 0)))
        if per_dim.get(d, (0, 0)) != (0, 0):
            last_nonzero = len(fpad)
    fpad = fpad[:max(last_nonzero, 0)]
    if not fpad:
        return b.emit("identity", [x])
    return b.emit("pad", [x], {"pad": tuple(fpad), "mode": mode, "value": value if mode == "constant" else None})


# --- pooling and reductions --------------------------------------------------------------------------------


def _pool_pads(b: Builder, x: Value, at: dict[str, Any], k: list[int], s: list[int], d: list[int],
               fill: float) -> tuple[Value, tuple[int, ...]]:
    """Symmetric pads PyTorch accepts (<= half the effective kernel) stay in the op; others become a pad node."""
    nd = len(k)
    pads = _spatial_pads(b, at, x.shape[2:], k, s, d)
    sym = pads[:nd] == pads[nd:]
    fits = all(pads[i] <= ((k[i] - 1) * d[i] + 1) // 2 for i in range(nd))
    if sym and fits:
        return x, tuple(pads[:nd])
    if int(at.get("ceil_mode", 0)):
        raise Unsupported("ceil_mode with padding PyTorch cannot express")
    return b.emit("pad", [x], {"pad": _fpad(pads), "mode": "constant", "value": fill}), (0,) * nd


@mapping("MaxPool")
def _max_pool(b, node, ins, at):
    x = _var(ins[0])
    if len(node.output) > 1 and node.output[1] and b.uses.get(node.output[1], 0):
        raise Unsupported("MaxPool indices")
    if int(at.get("storage_order", 0)):
        pass  # only affects the indices output
    nd, k, s, d = _pool_geometry(x, at)
    x2, padding = _pool_pads(b, x, at, k, s, d, -math.inf)
    attrs = ir.max_pool_attrs(nd, k, s, padding, d, bool(int(at.get("ceil_mode", 0))))
    return b.emit("max_pool", [x2], attrs)


@mapping("AveragePool")
def _avg_pool(b, node, ins, at):
    """avg_pool; padding PyTorch cannot express becomes a zero pad node, and when the padding is
    excluded from the count (ONNX's default) the result is rescaled by the constant k / count."""
    x = _var(ins[0])
    nd, k, s, d = _pool_geometry(x, at)
    if any(v != 1 for v in d):
        raise Unsupported("dilated AveragePool")
    include = bool(int(at.get("count_include_pad", 0)))
    ceil = bool(int(at.get("ceil_mode", 0)))
    x2, padding = _pool_pads(b, x, at, k, s, d, 0.0)
    padded = x2 is not x
    attrs = ir.avg_pool_attrs(nd, k, s, padding, ceil, include or padded)
    y = b.emit("avg_pool", [x2], attrs)
    if padded and not include:
        from ..ops.pooling import _AVG  # noqa: PLC0415

        pads = _spatial_pads(b, at, x.shape[2:], k, s, d)
        ones = torch.nn.functional.pad(torch.ones((1, 1) + x.shape[2:], dtype=torch.float64), _fpad(pads))
        frac = _AVG[nd](ones, tuple(k), tuple(s), 0, ceil, True)
        y = b.emit("scale", [y], {"divide": True}, {"const": frac.to(y.value.dtype)})
    return y


@mapping("LpPool")
def _lp_pool(b, node, ins, at):
    """LpPool, (sum_W |x|^p)^(1/p): ``lp_pool`` with ONNX's |x| (any pads become a zero pad node)."""
    x = _var(ins[0])
    nd, k, s, d = _pool_geometry(x, at)
    if any(v != 1 for v in d):
        raise Unsupported("dilated LpPool")
    pads = _spatial_pads(b, at, x.shape[2:], k, s, d)
    if any(pads):
        x = b.emit("pad", [x], {"pad": _fpad(pads), "mode": "constant", "value": 0.0})
    attrs = ir.lp_pool_attrs(nd, float(at.get("p", 2)), k, s, bool(int(at.get("ceil_mode", 0))), abs_value=True)
    return b.emit("lp_pool", [x], attrs)


@mapping("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b, node, ins, at):
    x = _var(ins[0])
    nd = x.ndim - 2
    if nd < 1:
        raise Unsupported("global pooling needs spatial dims")
    kind = "adaptive_avg_pool" if node.op_type == "GlobalAveragePool" else "adaptive_max_pool"
    return b.emit(kind, [x], {"ndim": nd, "output_size": (1,) * nd})


def _reduce(kind: str) -> Mapping:
    def fn(b, node, ins, at):
        x = _var(ins[0])
        since = 13 if node.op_type == "ReduceSum" else 18
        axes = _input_or_attr(b, ins, 1, at, "axes", since)
        keep = bool(int(at.get("keepdims", 1)))
        if not axes:
            if int(at.get("noop_with_empty_axes", 0)):
                return b.emit("identity", [x])
            axes = list(range(x.ndim))
        dims = tuple(sorted({a % x.ndim for a in axes}))
        attrs = {"dim": dims, "keepdim": keep}
        if kind == "amax":
            attrs["kind"] = "max" if node.op_type == "ReduceMax" else "min"
        return b.emit(kind, [x], attrs)

    return fn


MAPPINGS["ReduceMean"] = _reduce("mean")
MAPPINGS["ReduceMax"] = _reduce("amax")
MAPPINGS["ReduceMin"] = _reduce("amax")
MAPPINGS["ReduceLogSumExp"] = _reduce("logsumexp")


@mapping("Max", "Min")
def _max_min(b, node, ins, at):
    """Elementwise max/min of k operands: ``elementwise_max`` (constants folded into one)."""
    present = [v for v in ins if v is not None]
    vars_ = [v for v in present if v.is_var]
    if not vars_:
        raise Unsupported("Max/Min of constants")
    pick = torch.maximum if node.op_type == "Max" else torch.minimum
    const = None
    for v in present:
        if not v.is_var:
            const = v.value if const is None else pick(const, v.value)
    kind = "max" if node.op_type == "Max" else "min"
    return b.emit("elementwise_max", vars_, {"kind": kind}, {"const": const} if const is not None else {})


@mapping("TopK")
def _topk(b, node, ins, at):
    """TopK values (``topk``); the integer indices jump, so a graph that uses them keeps the node opaque."""
    x = _var(ins[0])
    if len(node.output) > 1 and node.output[1] and b.uses.get(node.output[1], 0):
        raise Unsupported("TopK indices")
    if not int(at.get("sorted", 1)):
        raise Unsupported("TopK with sorted=0 (order unspecified)")
    k = int(at["k"]) if b.opset < 10 else (_ints(ins[1]) or [0])[0]
    dim = int(at.get("axis", -1)) % x.ndim
    y = b.emit("topk", [x], {"k": k, "dim": dim, "largest": bool(int(at.get("largest", 1)))})
    return [y, Value(None, torch.topk(x.value, k, dim=dim, largest=bool(int(at.get("largest", 1)))).indices)]


@mapping("CumSum")
def _cumsum(b, node, ins, at):
    x = _var(ins[0])
    axis = _ints(ins[1])
    if not axis:
        raise Unsupported("CumSum without an axis")
    return b.emit("cumsum", [x], {"dim": axis[0] % x.ndim, "exclusive": bool(int(at.get("exclusive", 0))),
                                  "reverse": bool(int(at.get("reverse", 0)))})
MAPPINGS["ReduceSum"] = _reduce("sum")


# --- resampling --------------------------------------------------------------------------------------------

_RESIZE_MODES = {"nearest": "nearest", "linear": "linear", "bilinear": "linear", "cubic": "cubic"}


@mapping("Resize", "Upsample")
def _resize(b, node, ins, at):
    """Resize (opsets 10-19) and Upsample (7-9): the ``resize`` op with ONNX's own per-axis formulas.
    Not expressed (so opaque, inf): tf_crop_and_resize, antialias, keep_aspect_ratio_policy != stretch."""
    x = _var(ins[0])
    mode = _RESIZE_MODES.get(str(at.get("mode", "nearest")))
    if mode is None:
        raise Unsupported(f"Resize mode {at.get('mode')!r}")
    legacy = node.op_type == "Upsample" or b.opset < 11
    coord = "asymmetric" if legacy else str(at.get("coordinate_transformation_mode", "half_pixel"))
    nearest_mode = "simple" if legacy else str(at.get("nearest_mode", "round_prefer_floor"))
    if coord == "tf_crop_and_resize":
        raise Unsupported("Resize with tf_crop_and_resize")
    if int(at.get("antialias", 0)):
        raise Unsupported("Resize with antialias")
    if str(at.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise Unsupported("Resize with keep_aspect_ratio_policy")
    if node.op_type == "Upsample" and b.opset < 9:
        scales_v = [float(s) for s in at["scales"]]
        sizes = None
    elif node.op_type == "Upsample" or b.opset < 11:
        scales_v = [float(s) for s in b.const(ins[1], "scales").reshape(-1).tolist()]
        sizes = None
    else:
        sc = ins[2] if len(ins) > 2 else None
        scales_v = [float(s) for s in b.const(sc, "scales").reshape(-1).tolist()] \
            if sc is not None and not (not sc.is_var and sc.value.numel() == 0) else None
        sizes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    axes = [int(a) % x.ndim for a in at.get("axes", range(x.ndim))]
    n_in = list(x.shape)
    scales, outs = [1.0] * x.ndim, list(n_in)
    if sizes:
        for ax, s in zip(axes, sizes, strict=True):
            outs[ax], scales[ax] = int(s), int(s) / n_in[ax]
    elif scales_v:
        for ax, s in zip(axes, scales_v, strict=True):
            # the product in float32, as onnxruntime computes it (5 * 1.8f is 9, not 8.99999976)
            prod = torch.tensor(n_in[ax], dtype=torch.float32) * torch.tensor(s, dtype=torch.float32)
            scales[ax], outs[ax] = s, int(math.floor(float(prod)))
    else:
        raise Unsupported("Resize without scales or sizes")
    # the leading axes that are left alone (batch, channels: scale 1, same size) are not part of the op
    first = next((k for k in range(x.ndim) if scales[k] != 1.0 or outs[k] != n_in[k]), x.ndim)
    if first == x.ndim:
        return b.emit("identity", [x])
    attrs = {"spec": "onnx", "ndim": x.ndim - first, "mode": mode, "coordinate_transformation_mode": coord,
             "nearest_mode": nearest_mode, "cubic_coeff_a": float(at.get("cubic_coeff_a", -0.75)),
             "exclude_outside": bool(int(at.get("exclude_outside", 0))), "scales": tuple(scales[first:]),
             "out_sizes": tuple(outs[first:])}
    return b.emit("resize", [x], attrs)


@mapping("DepthToSpace")
def _depth_to_space(b, node, ins, at):
    x = _var(ins[0])
    if str(at.get("mode", "DCR")) != "CRD" or x.ndim != 4:
        raise Unsupported("DepthToSpace in DCR mode")
    return b.emit("pixel_shuffle", [x], {"factor": int(at["blocksize"])})


# --- torch versions of ops without a rule -------------------------------------------------------------------
# They stay ``opaque`` (an honest inf), but run in torch, so the IR remains differentiable for the
# lower-bound search; any other op runs through the ONNX reference evaluator.

_UNARY = {"Erf": torch.erf, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
          "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign, "Floor": torch.floor, "Ceil": torch.ceil,
          "Softsign": torch.nn.functional.softsign, "Sinh": torch.sinh, "Cosh": torch.cosh, "Atan": torch.atan}


#: ONNX ops that jump (kept executable, bounded by inf as discontinuous). Cast/CastLike reach the opaque
#: path only for casts to or from non-float types (float casts map to ``identity``).
DISCONTINUOUS = frozenset({
    "Sign", "Floor", "Ceil", "Round", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "Not", "And",
    "Or", "Xor", "Mod", "ArgMax", "ArgMin", "Cast", "CastLike", "IsNaN", "IsInf", "BitShift",
})


def torch_impl(node: onnx.NodeProto, at: dict[str, Any]) -> Callable[..., torch.Tensor] | None:
    """A torch function computing ``node`` from its inputs (in ONNX order), or None."""
    op = node.op_type
    if op in _UNARY:
        fn = _UNARY[op]
        return lambda x: fn(x)
    if op == "Pow":
        return lambda x, y: torch.pow(x, y.to(x.dtype) if isinstance(y, torch.Tensor) and y.is_floating_point()
                                      else y)
    if op in ("Max", "Min"):
        pick = torch.maximum if op == "Max" else torch.minimum

        def fold(*xs: torch.Tensor) -> torch.Tensor:
            out = xs[0]
            for x in xs[1:]:
                out = pick(out, x)
            return out

        return fold
    if op == "LRN" and int(at["size"]) % 2 == 1:  # odd windows: PyTorch's and ONNX's windows agree
        size, alpha = int(at["size"]), float(at.get("alpha", 1e-4))
        beta, bias = float(at.get("beta", 0.75)), float(at.get("bias", 1.0))
        return lambda x: torch.nn.functional.local_response_norm(x, size, alpha, beta, bias)
    return None


__all__ = ["MAPPINGS", "SHAPE_ONLY", "NEVER_FOLD", "DISCONTINUOUS", "mapping", "torch_impl"]
