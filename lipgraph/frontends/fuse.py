"""Elementwise functions that models write as a product of a tensor and a function of that same tensor.

``x * torch.sigmoid(x)`` (SiLU), ``x * F.relu6(x + 3) / 6`` and ``x * F.hardsigmoid(x)`` (hard-swish, as
hand-written MobileNetV3 code spells it) are one elementwise function of ``x``; traced op by op they are a
product of two input-dependent tensors, whose global constant is ``inf``. :func:`fuse_self_products` rewrites
each into the rule of that function (``silu``, ``hardswish``), which is exact: the IR computes the same values
(the frontend's check that the IR reproduces the model runs after it). ONNX files get the same rewrites while
they are read (:func:`lipgraph.frontends.onnx_ops._fused_activation`).
"""

from __future__ import annotations

import networkx as nx
import torch

from .. import ir


def _only_reader(g: nx.DiGraph, name: str, reader: str) -> bool:
    """Whether ``reader`` is the one node that reads ``name`` (once), so ``name`` can be folded into it."""
    succ = list(g.successors(name))
    return succ == [reader] and g.edges[name, reader]["positions"] in ([0], [1]) and name != g.graph["output"]


def _scalar(n: ir.IRNode, key: str = "const") -> float | None:
    """A 0-dim constant's value (a 1-element tensor with dimensions could broadcast or promote the dtype)."""
    c = n.params.get(key)
    return float(c) if isinstance(c, torch.Tensor) and c.dim() == 0 else None


def _is_shift_by_three(g: nx.DiGraph, name: str, x: str, reader: str) -> bool:
    """``name`` is ``x + 3``, read only by ``reader``."""
    n = ir.node(g, name)
    c = _scalar(n)
    return (n.op == "add" and n.inputs == [x] and n.attrs.get("coeffs") == [1.0] and c is not None
            and c == 3.0 and _only_reader(g, name, reader))


def _clips_to_six(n: ir.IRNode) -> bool:
    return n.op == "relu6" or (n.op == "hardtanh" and n.attrs.get("min_val") == 0.0
                               and n.attrs.get("max_val") == 6.0)


def _replace(g: nx.DiGraph, old: ir.IRNode, op: str, inputs: list[str], params: dict[str, torch.Tensor],
             attrs: dict | None = None, origin: str | None = None) -> None:
    """Node ``old.name`` becomes ``op`` on ``inputs`` (same name, shape and provenance); edges rewired."""
    for src in list(g.predecessors(old.name)):
        g.remove_edge(src, old.name)
    keep = {k: v for k, v in old.attrs.items() if k in ("module_path", "owner")}
    new = ir.IRNode(old.name, op, list(inputs), {**keep, **(attrs or {})}, params, old.source,
                    origin or old.origin, [ir.node(g, i).out_shape for i in inputs], old.out_shape)
    g.nodes[old.name]["ir"] = new
    for pos, src in enumerate(inputs):
        if g.has_edge(src, old.name):
            g.edges[src, old.name]["positions"].append(pos)
        else:
            g.add_edge(src, old.name, positions=[pos])


def _remove(g: nx.DiGraph, name: str) -> None:
    g.remove_node(name)
    g.graph["order"].remove(name)


def _fuse_product(g: nx.DiGraph, m: ir.IRNode, x: str, other: str) -> bool:
    """Rewrite the product ``m = x * other`` where ``other`` is a function of ``x`` alone, read only by ``m``."""
    o = ir.node(g, other)
    xn = ir.node(g, x)
    if (tuple(xn.out_shape or ()) != tuple(m.out_shape or ()) or xn.op == "output"
            or not _only_reader(g, other, m.name)):
        return False
    if o.op == "sigmoid" and o.inputs == [x]:  # x * sigmoid(x) = silu(x)
        _remove(g, other)
        _replace(g, m, "silu", [x], {}, origin="x * sigmoid(x)")
        return True
    if o.op == "hardsigmoid" and o.inputs == [x]:  # x * hardsigmoid(x) = x * relu6(x + 3) / 6 = hardswish(x)
        _remove(g, other)
        _replace(g, m, "hardswish", [x], {}, origin="x * hardsigmoid(x)")
        return True
    if _clips_to_six(o) and len(o.inputs) == 1 and _is_shift_by_three(g, o.inputs[0], x, other):
        # x * relu6(x + 3) = 6 hardswish(x): the clip's node becomes the hardswish, the product a scale by 6
        _remove(g, o.inputs[0])
        _replace(g, o, "hardswish", [x], {}, origin="x * relu6(x + 3)")
        _replace(g, m, "scale", [other], {"const": torch.tensor(6.0)}, {"divide": False},  # 6 is exact in any dtype
                 origin="x * relu6(x + 3)")
        return True
    return False


def fused(g: nx.DiGraph) -> nx.DiGraph | None:
    """A copy of ``g`` with :func:`fuse_self_products` applied, or None when there is nothing to fuse (``g``
    itself is left as it was)."""
    if not any(n.op == "mul_var" for n in ir.nodes(g)):
        return None
    h = g.copy()
    h.graph["order"] = list(g.graph["order"])
    h.graph["inputs"] = list(g.graph["inputs"])
    return h if fuse_self_products(h) else None


def fuse_self_products(g: nx.DiGraph) -> int:
    """Rewrite, in place, every product ``x * f(x)`` of a tensor and a function of it alone (read by nothing
    else) into that elementwise function: ``x * sigmoid(x)`` -> ``silu(x)``, ``x * hardsigmoid(x)`` ->
    ``hardswish(x)``, ``x * relu6(x + 3)`` (or ``hardtanh(x + 3, 0, 6)``) -> ``6 * hardswish(x)``. Returns
    how many were rewritten. Products of two different tensors (gates, attention) are left as they are."""
    count = 0
    for name in list(g.graph["order"]):
        if name not in g:
            continue
        m = ir.node(g, name)
        if m.op != "mul_var" or len(m.inputs) != 2 or m.inputs[0] == m.inputs[1]:
            continue
        a, b = m.inputs
        if _fuse_product(g, m, a, b) or _fuse_product(g, m, b, a):
            count += 1
    return count
