"""PyTorch frontend: ``torch.fx`` trace -> shapes from a real run -> IR.

1. Trace with :class:`torch.fx.Tracer` (torch.nn modules are leaves; modules
   given user constants or registered as custom ops are leaves too).
2. Run the traced graph once on the example input, recording every value
   (a small interpreter, like ``torch.fx.passes.shape_prop``).
3. Fold everything that is not an input-dependent tensor (``x.size(0)``,
   parameters, constant subgraphs) into constants, and translate each
   remaining call through the canonicalisation table
   (:mod:`lipgraph.frontends.fx_canon`) into one IR op.
"""

from __future__ import annotations

import linecache
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .. import ir
from ..errors import InputShapeError, TraceError
from ..ops import structural
from . import fx_canon
from .fx_canon import Canon, Var

#: Custom ops registered through :func:`lipgraph.register_op`: module type or function -> op kind.
CUSTOM_MODULES: dict[type, str] = {}
CUSTOM_FUNCTIONS: dict[Any, str] = {}


class _Tracer(fx.Tracer):
    def __init__(self, leaf_paths: set[str], leaf_types: set[type]) -> None:
        super().__init__(autowrap_functions=tuple(f for f in CUSTOM_FUNCTIONS if callable(f)))
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or type(m).__name__ in self.leaf_paths:
            return True
        if isinstance(m, tuple(self.leaf_types) + fx_canon.ATTENTION_MODULES + tuple(CUSTOM_MODULES)):
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: code`` of the deepest frame outside torch and lipgraph, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    best = None
    for fr in frames:
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/lipgraph/" in f or f.startswith("<frozen"):
            continue
        best = fr
    if best is None:
        return None
    code = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno}: {code}"


def _trace(model: nn.Module, leaf_paths: set[str], leaf_types: set[type]) -> fx.GraphModule:
    tracer = _Tracer(leaf_paths, leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear error
        where = _user_frame(exc)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "torch.fx cannot follow Python control flow or calls that depend on tensor values; "
            "rewrite that line with tensor ops (torch.where, masking), or treat the module holding it as a "
            "black box with constants={'module.path': L}"
        )
        at = f" at {where}" if where else ""
        raise TraceError(f"cannot trace {type(model).__name__}{at}: {msg}. {hint}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _Recorder(fx.Interpreter):
    """Runs the traced graph once, recording every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            trace = (n.meta.get("stack_trace") or "").strip().splitlines()
            where = next((ln.strip() for ln in reversed(trace) if "/torch/" not in ln and ln.strip()), "")
            raise InputShapeError(
                f"running the model on the example input failed at {n.format_node()}"
                f"{' (' + where + ')' if where else ''}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from exc


def _is_tensor_value(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return True
    return False


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return [tuple(x.shape) for x in v]


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaves: Sequence[str] = (),
) -> nx.DiGraph:
    """Trace ``model`` on ``example_inputs`` into the IR (see :mod:`lipgraph.ir`).

    ``leaves``: module paths or class names to keep as single opaque nodes.
    The model is analysed in eval mode (dropout off, BatchNorm on running stats).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        leaf_paths = set(leaves)
        gm = _trace(model, leaf_paths, set())
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise InputShapeError(
                f"{type(model).__name__}.forward takes {len(placeholders)} tensor argument(s) "
                f"({', '.join(p.target for p in placeholders)}), but {len(example_inputs)} example input(s) were given"
            )
        recorder = _Recorder(gm)
        with torch.no_grad():
            recorder.run(*example_inputs)
        return _build(gm, recorder.env, type(model).__name__)
    finally:
        model.train(was_training)


def _source(n: fx.Node) -> tuple[str, str]:
    """(module path, owning module class) of a node, from fx's nn_module_stack."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, ty = list(stack.values())[-1]
    return path, getattr(ty, "__name__", str(ty))


def _origin(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    t = n.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional") or getattr(torch.nn.functional, name, None) is t:
        return f"F.{name}"
    if getattr(torch, name, None) is t:
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


def _build(gm: fx.GraphModule, env: dict[fx.Node, Any], model_name: str) -> nx.DiGraph:
    g = ir.new_graph(model_name, "torch.fx")
    var: dict[fx.Node, Var] = {}  # fx nodes that are input-dependent tensors
    const_nodes: dict[int, str] = {}  # id(tensor) -> IR constant node name

    def depends(n: fx.Node) -> bool:
        return any(isinstance(a, fx.Node) and a in var for a in n.all_input_nodes)

    def resolve(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: var[n] if n in var else env[n])

    def constant_node(t: torch.Tensor, hint: str) -> str:
        key = id(t)
        if key not in const_nodes:
            name = _unique(g, f"const_{hint}")
            ir.add_node(g, ir.IRNode(name, "constant", [], {}, {"value": t.detach()}, hint, "constant",
                                     [], tuple(t.shape)))
            const_nodes[key] = name
        return const_nodes[key]

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = env[n]
            if not isinstance(v, torch.Tensor):
                continue
            ir.add_node(g, ir.IRNode(n.name, "input", [], {}, {}, n.name, "input", [], tuple(v.shape)))
            var[n] = Var(n.name, tuple(v.shape))
            continue
        if n.op == "output":
            leaves, spec = pytree.tree_flatten(n.args[0])
            inputs = []
            for leaf in leaves:
                if isinstance(leaf, fx.Node) and leaf in var:
                    inputs.append(var[leaf].name)
                else:
                    val = env[leaf] if isinstance(leaf, fx.Node) else leaf
                    inputs.append(constant_node(torch.as_tensor(val), "output"))
            shapes = [ir.node(g, i).out_shape for i in inputs]
            ir.add_node(g, ir.IRNode("output", "output", inputs, {"spec": spec}, {}, "output", "output",
                                     shapes, shapes))
            continue
        if n.op == "get_attr" or not depends(n) or not _is_tensor_value(env[n]):
            continue  # folded: its value is substituted where it is used
        value = env[n]
        path, owner = _source(n)
        origin = _origin(n, gm)
        args, kwargs = resolve(n.args), resolve(n.kwargs)
        canon = _canonicalise(n, gm, args, kwargs)
        if canon is None:
            canon = _opaque(n, gm, args, kwargs)
        in_names = []
        for x in canon.inputs:
            if isinstance(x, Var):
                in_names.append(x.name)
            else:
                in_names.append(constant_node(torch.as_tensor(x), n.name))
        out_shape = _shape_of(value)
        attrs = dict(canon.attrs)
        if attrs.get("shape", 0) is None:  # reshape-like: specialise to the traced shape
            attrs["shape"] = out_shape
        if attrs.get("sizes", 0) is None:  # split/chunk: the traced sizes
            attrs["sizes"] = [s[attrs["dim"]] for s in out_shape]
        source = n.target if n.op == "call_module" else (path or model_name)
        attrs["module_path"] = n.target if n.op == "call_module" else path
        attrs["owner"] = owner
        in_shapes = [ir.node(g, i).out_shape for i in in_names]
        ir.add_node(g, ir.IRNode(n.name, canon.op, in_names, attrs, dict(canon.params), str(source), origin,
                                 in_shapes, out_shape))
        var[n] = Var(n.name, out_shape, is_tuple=not isinstance(value, torch.Tensor))
    if g.graph["output"] is None:
        raise TraceError(f"{model_name} has no output that depends on its input")
    return g


def _unique(g: nx.DiGraph, base: str) -> str:
    name, i = base, 1
    while name in g:
        i += 1
        name = f"{base}_{i}"
    return name


def _call(handler: Callable[..., Canon | None], args: Sequence[Any], kwargs: dict[str, Any]) -> Canon | None:
    try:
        return handler(*args, **kwargs)
    except TypeError:
        return None  # an unexpected signature: keep the call opaque (honest inf)


def _canonicalise(n: fx.Node, gm: fx.GraphModule, args: Any, kwargs: Any) -> Canon | None:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        kind = next((k for ty, k in CUSTOM_MODULES.items() if isinstance(mod, ty)), None)
        if kind is not None:
            return _custom(kind, mod, args, kwargs)
        if isinstance(mod, fx_canon.ATTENTION_MODULES):
            c = _opaque(n, gm, args, kwargs)
            c.op = "attention"
            return c
        handler = fx_canon.module_handler(mod)
        return _call(handler, (mod, *args), kwargs) if handler else None
    if n.op == "call_function":
        if n.target in CUSTOM_FUNCTIONS:
            return _custom(CUSTOM_FUNCTIONS[n.target], n.target, args, kwargs)
        handler = fx_canon.FUNCTIONS.get(n.target)
        return _call(handler, args, kwargs) if handler else None
    if n.op == "call_method":
        handler = fx_canon.METHODS.get(n.target)
        return _call(handler, args, kwargs) if handler else None
    return None


def _template(args: Any, kwargs: Any) -> tuple[list[Var], Any, Any]:
    inputs: list[Var] = []

    def mark(a: Any) -> Any:
        if isinstance(a, Var):
            inputs.append(a)
            return structural.ARG(len(inputs) - 1)
        return a

    targs = pytree.tree_map(mark, args)
    tkwargs = pytree.tree_map(mark, kwargs)
    return inputs, targs, tkwargs


def _opaque(n: fx.Node, gm: fx.GraphModule, args: Any, kwargs: Any) -> Canon:
    """A call with no rule: kept executable, bounded by an honest inf."""
    inputs, targs, tkwargs = _template(args, kwargs)
    if n.op == "call_module":
        fn: Callable[..., Any] = gm.get_submodule(n.target)
    elif n.op == "call_method":
        name = n.target

        def fn(self: Any, *a: Any, _name: str = name, **k: Any) -> Any:
            return getattr(self, _name)(*a, **k)
    else:
        fn = n.target
    return Canon("opaque", list(inputs), {"callable": fn, "args": targs, "kwargs": tkwargs})


def _custom(kind: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Canon:
    inputs, targs, tkwargs = _template(args, kwargs)
    return Canon(kind, list(inputs), {"callable": fn, "args": targs, "kwargs": tkwargs})


__all__ = ["trace", "CUSTOM_MODULES", "CUSTOM_FUNCTIONS"]
