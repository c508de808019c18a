"""The graph IR: a ``networkx.DiGraph`` of canonical ops, and its interpreter.

Each graph node ``n`` stores one :class:`IRNode` under ``G.nodes[n]["ir"]``
(also reachable as :func:`node`). An edge ``u -> v`` exists when ``u`` feeds
``v``; ``v``'s argument order is ``IRNode.inputs`` (a name may repeat) and the
edge's ``positions`` attribute lists where ``u`` appears. Graph attributes:
``inputs`` (input node names, in order), ``output`` (the name of the single
``output`` node), ``order`` (a fixed topological order, for determinism),
``name`` (the model's name) and ``frontend``.

The IR is executable: :func:`execute` runs every node's rule ``forward``, so a
frontend's translation can be checked against the original model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

Shape = tuple[int, ...]


@dataclass
class IRNode:
    """One op of the IR.

    ``op``: canonical kind (a key of :data:`lipgraph.ops.RULES`).
    ``inputs``: names of the tensor-valued nodes it reads, in argument order.
    ``attrs``: static attributes (ints, floats, strings, shapes).
    ``params``: constant tensors (weights, running stats, constant operands).
    ``source``: where it came from (module path such as ``layer1.0.conv1``, or
    the function for functional calls); ``origin``: the module class or
    function name as written by the user (``Conv2d``, ``torch.relu``).
    ``in_shapes`` / ``out_shape``: shapes on the example input (``out_shape``
    is a list of shapes for tuple-valued ops such as ``split``).
    """

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    origin: str = ""
    in_shapes: list[Any] = field(default_factory=list)
    out_shape: Any = None

    @property
    def module_path(self) -> str:
        """The dotted module path (empty for top-level functional calls)."""
        return self.attrs.get("module_path", "")


#: Padding of a convolution's input when its attributes name none (PyTorch's and ONNX's default).
DEFAULT_PADDING_MODE = "zeros"


def conv_attrs(ndim: int, stride: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...],
               groups: int, padding_mode: str = DEFAULT_PADDING_MODE,
               pad_reversed: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The attributes of a ``conv`` node, built the same way by both frontends. ``padding``: per spatial
    dimension (or PyTorch's ``"same"``/``"valid"``); a ``padding_mode`` other than zeros comes with
    ``pad_reversed``, the ``F.pad`` argument that applies it."""
    attrs: dict[str, Any] = {"ndim": ndim, "stride": tuple(stride), "dilation": tuple(dilation),
                             "padding": padding if isinstance(padding, str) else tuple(padding),
                             "groups": int(groups), "padding_mode": padding_mode}
    if padding_mode != DEFAULT_PADDING_MODE:
        if pad_reversed is None:
            raise ValueError(f"padding_mode {padding_mode!r} needs pad_reversed")
        attrs["pad_reversed"] = tuple(pad_reversed)
    return attrs


def conv_transpose_attrs(ndim: int, stride: tuple[int, ...], padding: tuple[int, ...],
                         output_padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> dict[str, Any]:
    """The attributes of a ``conv_transpose`` node (zero padding only, as in PyTorch and ONNX)."""
    return {"ndim": ndim, "stride": tuple(stride), "padding": tuple(padding),
            "output_padding": tuple(output_padding), "dilation": tuple(dilation), "groups": int(groups)}


def max_pool_attrs(ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                   dilation: tuple[int, ...], ceil_mode: bool) -> dict[str, Any]:
    """The attributes of a ``max_pool`` node (both frontends)."""
    return {"ndim": ndim, "kernel_size": tuple(kernel_size), "stride": tuple(stride), "padding": tuple(padding),
            "dilation": tuple(dilation), "ceil_mode": bool(ceil_mode)}


def avg_pool_attrs(ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                   ceil_mode: bool, count_include_pad: bool, divisor_override: int | None = None) -> dict[str, Any]:
    """The attributes of an ``avg_pool`` node (both frontends)."""
    return {"ndim": ndim, "kernel_size": tuple(kernel_size), "stride": tuple(stride), "padding": tuple(padding),
            "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad),
            "divisor_override": divisor_override}


def lp_pool_attrs(ndim: int, norm_type: float, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                  ceil_mode: bool, abs_value: bool = False) -> dict[str, Any]:
    """The attributes of an ``lp_pool`` node: ``abs_value`` for ONNX's ``(sum |x|^p)^(1/p)`` (PyTorch's has no
    absolute value)."""
    attrs: dict[str, Any] = {"ndim": ndim, "norm_type": float(norm_type), "kernel_size": tuple(kernel_size),
                             "stride": tuple(stride), "ceil_mode": bool(ceil_mode)}
    if abs_value:
        attrs["abs"] = True
    return attrs


def batch_norm_attrs(eps: float) -> dict[str, Any]:
    """The attributes of a ``batch_norm`` node (inference statistics; they are its parameters)."""
    return {"eps": float(eps)}


def split_attrs(dim: int, sizes: list[int] | None) -> dict[str, Any]:
    """The attributes of a ``split`` node: ``sizes`` of the parts along ``dim`` (None: read from the traced
    output)."""
    return {"dim": int(dim), "sizes": None if sizes is None else [int(v) for v in sizes]}


def padding_mode(attrs: dict[str, Any]) -> str:
    """A convolution's padding mode (:data:`DEFAULT_PADDING_MODE` when its attributes name none)."""
    return attrs.get("padding_mode", DEFAULT_PADDING_MODE)


def new_graph(name: str, frontend: str) -> nx.DiGraph:
    g = nx.DiGraph(name=name, frontend=frontend, inputs=[], output=None, order=[])
    return g


def add_node(g: nx.DiGraph, n: IRNode) -> IRNode:
    """Append ``n`` (its inputs must already be in ``g``) and wire its edges."""
    if n.name in g:
        raise ValueError(f"duplicate IR node name {n.name!r}")
    for src in n.inputs:
        if src not in g:
            raise ValueError(f"IR node {n.name!r} reads unknown node {src!r}")
    g.add_node(n.name, ir=n)
    for pos, src in enumerate(n.inputs):
        if g.has_edge(src, n.name):
            g.edges[src, n.name]["positions"].append(pos)
        else:
            g.add_edge(src, n.name, positions=[pos])
    g.graph["order"].append(n.name)
    if n.op == "input":
        g.graph["inputs"].append(n.name)
    elif n.op == "output":
        g.graph["output"] = n.name
    return n


def as_float64(n: IRNode) -> IRNode:
    """The node evaluated in float64: floating parameters cast, and a float cast (``attrs["dtype"]``) dropped so
    that a ``.to(torch.float32)`` inside a chain does not round the float64 evaluation. The one conversion
    every pass uses (SeqLip's group matrices, affine folding's Jacobians)."""
    params = {k: (v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in n.params.items()}
    attrs = dict(n.attrs)
    if attrs.get("dtype") is not None:
        attrs["dtype"] = None
    return dataclasses.replace(n, params=params, attrs=attrs)


def to_float64(g: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``g`` whose every node is :func:`as_float64` (the same structure; for float64 evaluation)."""
    h = g.copy()
    for name in h.nodes:
        h.nodes[name]["ir"] = as_float64(g.nodes[name]["ir"])
    h.graph = dict(g.graph)
    return h


def node(g: nx.DiGraph, name: str) -> IRNode:
    return g.nodes[name]["ir"]


def nodes(g: nx.DiGraph) -> Iterator[IRNode]:
    """All IR nodes in the graph's fixed topological order."""
    for name in g.graph["order"]:
        yield g.nodes[name]["ir"]


def summary(g: nx.DiGraph) -> dict[str, int]:
    """Op kind -> count, for quick inspection."""
    counts: dict[str, int] = {}
    for n in nodes(g):
        counts[n.op] = counts.get(n.op, 0) + 1
    return dict(sorted(counts.items()))


def numel(shape: Any) -> int:
    """Entries of a shape (a tuple of ints), of a list of shapes (summed: tuple-valued ops), else 0."""
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        n = 1
        for d in shape:
            n *= d
        return n
    if isinstance(shape, (tuple, list)):
        return sum(numel(s) for s in shape)
    return 0


def model_macs(g: nx.DiGraph) -> int:
    """Multiply-adds of one evaluation of ``g`` on its example shapes: ``linear`` ``rows x in x out``, ``conv``
    ``outputs x (inputs per group) x kernel``, ``conv_transpose`` ``inputs x (outputs per group) x kernel``,
    every other node its output size. A function of the graph only (budgets count it, not seconds)."""
    total = 0
    for n in nodes(g):
        w = n.params.get("weight")
        out = numel(n.out_shape)
        if n.op == "linear" and isinstance(w, torch.Tensor):
            total += out * int(w.shape[-1])
        elif n.op == "conv" and isinstance(w, torch.Tensor):
            total += out * int(w[0].numel())
        elif n.op == "conv_transpose" and isinstance(w, torch.Tensor) and n.in_shapes:
            total += numel(n.in_shapes[0]) * int(w[0].numel())
        else:
            total += out
    return total
