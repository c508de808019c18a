"""ONNX frontend: an ``.onnx`` file -> the same IR as the PyTorch path.

1. Read the file with the ``onnx`` package (external data checked and loaded,
   the checker run, model-local functions inlined). Weights come from
   initializers, ``Constant`` nodes and graph inputs that have an initializer
   (old IR versions).
2. Walk the nodes in order, running each on the example input (a random one
   when every input dimension is static): values that do not depend on the
   input (``Shape``, ``ConstantOfShape``, shape arithmetic, weights computed by
   nodes) are folded into constants with the ONNX reference evaluator, so
   shapes are exact and specialised to the example input, as in the PyTorch
   path. Every other node is mapped by :mod:`lipgraph.frontends.onnx_ops` onto
   the canonical op kinds of the rule table (``Gemm`` -> ``linear``,
   ``Conv`` -> ``conv``, ``Add`` -> ``add`` ...), so the same rules bound it.
3. A node with no mapping stays executable as an ``opaque`` node (run by the
   ONNX reference evaluator) whose constant is an honest ``inf`` naming the
   node and op; one that cannot even be run raises :class:`ModelLoadError`.

The module hierarchy (``attrs['module_path']``) comes from the exporter's node
metadata (``pkg.torch.onnx.name_scopes`` of the dynamo exporter) or from
TorchScript-style node names such as ``/layer1/layer1.0/conv1/Conv``.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from .. import ir
from ..core import run_seed
from ..errors import InputShapeError, LipgraphError, ModelLoadError
from ..ops import RULES, structural
from ..ops.registry import kind_spelled
from . import finite

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError as _exc:  # pragma: no cover - onnx is a dependency
    raise ModelLoadError("reading .onnx files needs the 'onnx' package: pip install onnx") from _exc

from . import onnx_ops  # noqa: E402 - after the check that onnx is installed
from .onnx_values import Unsupported, Value  # noqa: E402

#: Domains whose ops are the standard ONNX operators.
DEFAULT_DOMAINS = ("", "ai.onnx")


def _to_torch(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if arr.dtype == object or arr.dtype.kind in "SU":
        return arr  # strings: kept as numpy (only opaque nodes can use them)
    return torch.from_numpy(np.array(arr, copy=True))


def _to_numpy(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode("utf-8", "replace") for x in v]
        out[a.name] = v
    return out


def _describe(node: onnx.NodeProto) -> str:
    op = f"{node.domain}.{node.op_type}" if node.domain not in DEFAULT_DOMAINS else node.op_type
    name = node.name or (node.output[0] if node.output else "?")
    return f"node {name!r} ({op})"


# --- reading the file -----------------------------------------------------------------------


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx import external_data_helper as edh  # noqa: PLC0415

    return [t for t in edh._get_all_tensors(model) if edh.uses_external_data(t)]


def read_model(path: str) -> onnx.ModelProto:
    """Read, validate and complete an ONNX file; clear :class:`ModelLoadError` on any problem."""
    from onnx import external_data_helper as edh  # noqa: PLC0415

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"no such file: {path}")
    if p.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises various types on garbage
        raise ModelLoadError(f"{path} is not a readable ONNX model (protobuf parse failed: {exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path} is not a valid ONNX model: it has no graph (empty or not an ONNX file?)")
    external = _external_tensors(model)
    base = p.parent
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        inside = base.resolve()
        target = (base / loc).resolve()
        if loc and (Path(loc).is_absolute() or (target != inside and inside not in target.parents)):
            raise ModelLoadError(
                f"tensor {t.name!r} of {path} points its external data outside the model's folder ({loc!r}); "
                "lipgraph reads external data only from files beside the model"
            )
        if not loc or not (base / loc).is_file():
            raise ModelLoadError(
                f"tensor {t.name!r} of {path} stores its data in the external file {loc!r}, "
                f"which is missing (expected at {base / loc}); copy it next to the model"
            )
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        size = target.stat().st_size
        if offset < 0 or offset > size or (length is not None and (int(length) < 0 or offset + int(length) > size)):
            raise ModelLoadError(
                f"tensor {t.name!r} of {path} reads bytes {offset}..{offset + int(length or 0)} of its external "
                f"file {loc!r}, which has {size} bytes (truncated or wrong file?)"
            )
    try:  # fills the types of values (graph outputs too) that the file leaves out
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001, S110 - inference is best effort; the checker and the run decide
        pass
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelLoadError(
            f"{path} uses ONNX opset {opset}, newer than the installed onnx {onnx.__version__} knows "
            f"(up to {newest}); upgrade onnx"
        )
    try:  # with external data, the checker reads the file itself (and handles models over 2 GB)
        onnx.checker.check_model(str(p) if external else model)
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Field 'shape' of 'type' is required" not in first:  # an output type left open: harmless
            raise ModelLoadError(f"{path} is not a valid ONNX model: {first}") from exc
    if external:
        try:
            edh.load_external_data_for_model(model, str(base))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"loading the external data of {path} failed: {exc}") from exc
    if model.functions:
        try:
            from onnx import inliner  # noqa: PLC0415

            model = inliner.inline_local_functions(model)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot inline the local functions of {path}: {exc}") from exc
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return int(o.version)
    return 1 if not model.opset_import else int(model.opset_import[0].version)


# --- module hierarchy from the exporter ----------------------------------------------------


def _join_scope(parts: Sequence[str]) -> str:
    """TorchScript scope parts (``layer1``, ``layer1.0``, ``conv1``) -> ``layer1.0.conv1``."""
    path = ""
    for part in parts:
        if not part:
            continue
        if path and part.startswith(path + "."):
            path = part
        elif path:
            path = f"{path}.{part}"
        else:
            path = part
    return path


def scope_of(node: onnx.NodeProto) -> tuple[str, str, bool]:
    """(module path, owning module class, whether the node is the op of a torch.nn leaf module)."""
    md = {p.key: p.value for p in node.metadata_props}
    scopes_txt = md.get("pkg.torch.onnx.name_scopes")
    if scopes_txt:
        try:
            scopes = [str(s) for s in ast.literal_eval(scopes_txt)]
            classes = [str(c) for c in ast.literal_eval(md.get("pkg.torch.onnx.class_hierarchy", "[]"))]
        except (ValueError, SyntaxError):
            scopes, classes = [], []
        mods = [s for s in scopes[1:-1] if s]
        path = mods[-1] if mods else ""
        owner_full = classes[-2] if len(classes) >= 2 else (classes[0] if classes else "")
        owner = owner_full.rsplit(".", 1)[-1]
        return path, owner, owner_full.startswith("torch.nn.modules.")
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        return _join_scope(parts), "", False
    return "", "", False


# --- the translation ------------------------------------------------------------------------


class Builder:
    """Translates one ONNX graph into the IR, running it on the example input as it goes."""

    def __init__(self, model: onnx.ModelProto, name: str) -> None:
        self.model = model
        self.opset = default_opset(model)
        self.opsets = {o.domain or "": int(o.version) for o in model.opset_import}
        self.g = ir.new_graph(name, "onnx")
        self.env: dict[str, Value] = {}
        self.produced: dict[str, str] = {}  # IR node -> the ONNX value it computes
        self.const_nodes: dict[int, str] = {}
        self.uses: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.uses[i] = self.uses.get(i, 0) + 1
        for o in model.graph.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1
        # the node being translated
        self.cur: onnx.NodeProto | None = None
        self.cur_scope: tuple[str, str, bool] = ("", "", False)
        self.cur_count = 0

    # -- naming and emitting --------------------------------------------------------------

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.g:
            i += 1
            name = f"{base}_{i}"
        return name

    def constant_node(self, t: torch.Tensor, hint: str) -> str:
        key = id(t)
        if key not in self.const_nodes:
            name = self.unique(f"const_{hint}")
            ir.add_node(self.g, ir.IRNode(name, "constant", [], {}, {"value": t}, hint, "constant", [],
                                          tuple(t.shape)))
            self.const_nodes[key] = name
        return self.const_nodes[key]

    def emit(self, op: str, inputs: Sequence[Value | torch.Tensor], attrs: dict[str, Any] | None = None,
             params: dict[str, torch.Tensor] | None = None, origin: str | None = None) -> Value:
        """Add one IR node for the current ONNX node, run it on the example values, return its value."""
        node = self.cur
        assert node is not None
        base = node.name or (node.output[0] if node.output else node.op_type)
        self.cur_count += 1
        name = self.unique(base if self.cur_count == 1 else f"{base}:{op}")
        in_names, vals = [], []
        for x in inputs:
            if isinstance(x, Value) and x.is_var:
                in_names.append(x.node)
                vals.append(x.value)
            else:
                t = x.value if isinstance(x, Value) else x
                in_names.append(self.constant_node(t, name))
                vals.append(t)
        path, owner, leaf = self.cur_scope
        a = dict(attrs or {})
        a["module_path"] = path
        a["owner"] = owner
        a["onnx_op"] = node.op_type
        if origin is None:
            origin = owner if leaf and owner else node.op_type
        in_shapes = [ir.node(self.g, i).out_shape for i in in_names]
        irn = ir.IRNode(name, op, in_names, a, dict(params or {}), path or self.g.graph["name"], origin, in_shapes,
                        None)
        try:
            with torch.no_grad():
                out = RULES[op].forward(irn, *vals)
        except Exception as exc:  # noqa: BLE001 - report which node failed on which shapes
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shapes = ", ".join(str(tuple(v.shape)) for v in vals)
            raise InputShapeError(
                f"running ONNX {_describe(node)} as {op} on input shapes {shapes} failed: {msg} "
                "(is the example input shape right for this model?)"
            ) from exc
        irn.out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else [tuple(o.shape) for o in out]
        ir.add_node(self.g, irn)
        return Value(name, out)

    # -- helpers for mappings ----------------------------------------------------------------

    def const(self, v: Value | None, what: str = "operand") -> torch.Tensor:
        if v is None:
            raise Unsupported(f"missing {what}")
        if v.is_var:
            raise Unsupported(f"the {what} depends on the input")
        return v.value

    # -- the walk -----------------------------------------------------------------------------

    def lookup(self, name: str, node: onnx.NodeProto) -> Value | None:
        if not name:
            return None
        if name not in self.env:
            raise ModelLoadError(f"ONNX {_describe(node)} reads {name!r}, which no earlier node or input provides")
        v = self.env[name]
        if v.value is None:
            raise ModelLoadError(
                f"ONNX {_describe(node)} reads {name!r}, an output that lipgraph does not model "
                "(e.g. a training-mode statistic or pooling indices)"
            )
        return v

    def translate(self, node: onnx.NodeProto) -> None:

        self.cur = node
        self.cur_scope = scope_of(node)
        self.cur_count = 0
        ins = [self.lookup(i, node) for i in node.input]
        at = _attrs(node)
        present = [v for v in ins if v is not None]
        if any(isinstance(a, onnx.GraphProto) for a in at.values()):
            raise ModelLoadError(f"ONNX {_describe(node)}: control flow with subgraphs is not supported")
        outs: Sequence[Value | None]
        if node.domain in DEFAULT_DOMAINS and node.op_type in onnx_ops.SHAPE_ONLY:
            outs = self.fold(node, ins)
        elif all(not v.is_var for v in present) and node.op_type not in onnx_ops.NEVER_FOLD:
            outs = self.fold(node, ins)
        else:
            fn = onnx_ops.MAPPINGS.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
            spelled = kind_spelled(onnx_op=node.op_type) if fn is None else None
            if spelled is not None and len(present) == 1 and present[0].is_var and not at:
                fn = onnx_ops.unary_mapping(spelled)
            result = None
            if fn is not None:
                try:
                    result = fn(self, node, ins, at)
                except Unsupported:
                    result = None
                except LipgraphError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a malformed node: say which one
                    raise ModelLoadError(
                        f"cannot translate ONNX {_describe(node)}: {type(exc).__name__}: {exc}"
                    ) from exc
            if result is None:
                result = self.opaque(node, ins)
            outs = [result] if isinstance(result, Value) else list(result)
        for i, o in enumerate(node.output):
            if o:
                v = outs[i] if i < len(outs) and outs[i] is not None else Value(None, None)
                self.env[o] = v
                if v.node is not None:
                    self.produced.setdefault(v.node, o)

    def single_use(self, ir_name: str) -> bool:
        """Whether the ONNX value computed by IR node ``ir_name`` is read exactly once (by the current node)."""
        out = self.produced.get(ir_name)
        return out is not None and self.uses.get(out, 0) == 1 and self.g.out_degree(ir_name) == 0

    def drop(self, ir_name: str) -> None:
        """Remove a node that a fused pattern replaced (it must have no consumers left)."""
        self.g.remove_node(ir_name)
        self.g.graph["order"].remove(ir_name)

    def fold(self, node: onnx.NodeProto, ins: list[Value | None]) -> list[Value]:
        """Evaluate a node whose result does not depend on the input values (a constant)."""
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            return [Value(None, _constant_value(node))]
        try:
            outs = run_reference(node, [None if v is None else v.value for v in ins], self.opsets)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot evaluate constant ONNX {_describe(node)}: {exc}") from exc
        return [Value(None, _to_torch(o)) for o in outs]

    def opaque(self, node: onnx.NodeProto, ins: list[Value | None]) -> list[Value]:
        """A node without a rule: executable through the ONNX reference evaluator, bounded by inf."""
        args: list[Any] = []
        var_in: list[Value] = []
        for v in ins:
            if v is not None and v.is_var:
                args.append(structural.ARG(len(var_in)))
                var_in.append(v)
            else:
                args.append(None if v is None else v.value)
        opsets = self.opsets
        n_out = len(node.output)
        where = _describe(node)

        def run(*xs: Any, _node: onnx.NodeProto = node) -> Any:
            if any(isinstance(x, torch.Tensor) and (x.requires_grad or _wrapped(x)) for x in xs):
                raise LipgraphError(
                    f"ONNX {where} runs only through the ONNX reference evaluator (numpy), which cannot be "
                    "differentiated (the lower-bound search uses secants without derivatives for such a model)"
                )
            outs = run_reference(_node, list(xs), opsets)
            ts = [_to_torch(o) for o in outs]
            return ts[0] if n_out == 1 else tuple(ts)


        origin = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
        impl = onnx_ops.torch_impl(node, _attrs(node)) if node.domain in DEFAULT_DOMAINS and n_out == 1 else None
        kind, extra = "opaque", {}
        if node.domain in DEFAULT_DOMAINS and (
            node.op_type in onnx_ops.DISCONTINUOUS
            or (node.op_type == "Where" and ins and ins[0] is not None and ins[0].is_var)
        ):  # rounding, comparisons, casts to integer/bool, a switch on an input-dependent condition: inf
            kind, extra = "discontinuous", {"what": f"ONNX {origin}"}
        out = None
        if impl is not None:  # a torch version keeps the IR differentiable (lower bounds)
            try:
                out = self.emit(kind, var_in, {"callable": impl, "args": args, "kwargs": {}, **extra},
                                origin=f"ONNX {origin}")
            except InputShapeError:
                self.cur_count = 0
        try:
            if out is None:
                out = self.emit(kind, var_in, {"callable": run, "args": args, "kwargs": {}, **extra},
                                origin=f"ONNX {origin}")
        except InputShapeError as exc:
            why = str(exc.__cause__ or exc).strip().splitlines()
            raise ModelLoadError(
                f"ONNX {_describe(node)} is not supported: lipgraph has no rule for it and the ONNX reference "
                f"evaluator cannot run it either ({why[0] if why else 'no implementation'})"
            ) from exc
        if n_out == 1:
            return [out]
        return [self.emit("tuple_getitem", [out], {"index": i}) for i in range(n_out)]


def _wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a functorch-wrapped tensor (inside jvp/vmap), which has no numpy view."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def _constant_value(node: onnx.NodeProto) -> torch.Tensor:
    at = {a.name: a for a in node.attribute}
    if "value" in at:
        return _to_torch(numpy_helper.to_array(at["value"].t))
    if "value_float" in at:
        return torch.tensor(at["value_float"].f, dtype=torch.float32)
    if "value_floats" in at:
        return torch.tensor(list(at["value_floats"].floats), dtype=torch.float32)
    if "value_int" in at:
        return torch.tensor(at["value_int"].i, dtype=torch.int64)
    if "value_ints" in at:
        return torch.tensor(list(at["value_ints"].ints), dtype=torch.int64)
    if "sparse_value" in at:
        return _to_torch(numpy_helper.to_array(at["sparse_value"].sparse_tensor.values))  # pragma: no cover
    raise ModelLoadError(f"ONNX {_describe(node)}: unsupported Constant attribute {list(at)}")


def run_reference(node: onnx.NodeProto, inputs: Sequence[Any], opsets: dict[str, int]) -> list[Any]:
    """Run one node with the ONNX reference evaluator (numpy), at the model's opsets;
    ``inputs`` in the node's input order (``None`` for absent ones)."""
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

    feeds: dict[str, Any] = {}
    for name, v in zip(node.input, inputs, strict=False):
        if name and v is not None:
            feeds[name] = _to_numpy(v)
    g_in = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype) if a.dtype != object
                                          else onnx.TensorProto.STRING, None) for n, a in feeds.items()]
    g_out = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", g_in, g_out)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    ev = ReferenceEvaluator(model)
    outs = ev.run(None, feeds)
    result, it = [], iter(outs)
    for o in node.output:
        result.append(next(it) if o else None)
    return result


# --- inputs ---------------------------------------------------------------------------------


def _declared(vi: onnx.ValueInfoProto) -> tuple[list[int | str | None], torch.dtype]:
    if vi.type.WhichOneof("value") != "tensor_type":
        raise ModelLoadError(f"input {vi.name!r} is a {vi.type.WhichOneof('value')}, not a tensor: lipgraph "
                             "analyses models with numeric tensor inputs")
    tt = vi.type.tensor_type
    if tt.elem_type == onnx.TensorProto.STRING:
        raise ModelLoadError(f"input {vi.name!r} holds strings: lipgraph analyses models with numeric inputs")
    dims: list[int | str | None] = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
    try:
        np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype("float32")
        dtype = torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except (KeyError, TypeError, ValueError):
        dtype = torch.float32
    return dims, dtype


def _fmt(dims: Sequence[Any]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _example_inputs(real: list[onnx.ValueInfoProto], example: Any, path: str) -> list[torch.Tensor]:
    declared = [_declared(vi) for vi in real]
    sig = ", ".join(f"{vi.name}{_fmt(d)}" for vi, (d, _) in zip(real, declared, strict=True))
    gen = torch.Generator().manual_seed(run_seed(0))  # inputs drawn for a missing example or a shape: seeded
    if example is None:
        xs = []
        for vi, (dims, dtype) in zip(real, declared, strict=True):
            if any(not isinstance(d, int) for d in dims):
                raise InputShapeError(
                    f"input {vi.name!r} of {path} has dynamic dimensions {_fmt(dims)}: give an example input "
                    "or --input-shape with concrete sizes"
                )
            if dtype.is_floating_point:
                xs.append(torch.randn(tuple(dims), generator=gen).to(dtype))
            else:
                xs.append(torch.zeros(tuple(dims), dtype=dtype))
        return xs
    if isinstance(example, (str, bytes)):
        raise InputShapeError(f"the example input of {path} must be a tensor, a shape such as (1, 3, 32, 32) or a "
                              f"tuple of them, not the string {example!r}")
    if isinstance(example, torch.Tensor):
        items: list[Any] = [example]
    elif isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        items = [tuple(example)]  # one shape
    else:
        items = list(example)
    if len(items) != len(real):
        raise InputShapeError(f"{path} takes {len(real)} input(s) [{sig}], but {len(items)} were given")
    xs = []
    for vi, (dims, dtype), item in zip(real, declared, items, strict=True):
        if isinstance(item, torch.Tensor):
            x = item.detach()
        elif isinstance(item, (tuple, list, torch.Size)):
            shape = tuple(int(d) for d in item)
            x = torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        else:
            raise InputShapeError(f"example input for {vi.name!r} must be a tensor or a shape, got {type(item)}")
        if dims and (len(dims) != x.ndim or any(isinstance(d, int) and d != s for d, s in
                                                zip(dims, x.shape, strict=False))):
            raise InputShapeError(
                f"input {vi.name!r} of {path} has shape {_fmt(dims)}, but the example input has shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype != dtype and (x.dtype.is_floating_point == dtype.is_floating_point):
            x = x.to(dtype)
        xs.append(x)
    return xs


# --- entry point ----------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], example_inputs: Any = None) -> nx.DiGraph:
    """Read the ONNX model at ``path`` into the IR (see :mod:`lipgraph.ir`).

    ``example_inputs``: a tensor, a tuple of tensors, or shapes; needed where
    the graph has dynamic dimensions (otherwise a random input of the declared
    shape is used). Raises :class:`ModelLoadError` for unreadable, invalid or
    unsupported files and :class:`InputShapeError` for inputs that do not fit.
    """
    path = str(path)
    model = read_model(path)
    graph = model.graph
    inits: dict[str, torch.Tensor] = {}
    for t in graph.initializer:
        try:
            inits[t.name] = _to_torch(numpy_helper.to_array(t))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read initializer {t.name!r} of {path}: {exc}") from exc
    for st in graph.sparse_initializer:
        dense = np.zeros(tuple(st.dims), dtype=helper.tensor_dtype_to_np_dtype(st.values.data_type))
        idx = numpy_helper.to_array(st.indices)
        vals = numpy_helper.to_array(st.values)
        if idx.ndim == 1:
            dense.reshape(-1)[idx] = vals
        else:
            dense[tuple(idx.T)] = vals
        inits[st.values.name] = torch.from_numpy(dense)
    for name, t in inits.items():
        if finite.bad(t, allow_inf=True):  # inf may be a mask or a clamp bound: checked per node below
            raise ModelLoadError(f"initializer {name!r} of {path} is not finite ({finite.describe(t)}): "
                                 "no bound can be computed from a NaN weight")
    real = [vi for vi in graph.input if vi.name not in inits]
    if not real:
        raise ModelLoadError(f"{path} has no input (every graph input has an initializer)")
    xs = _example_inputs(real, example_inputs, path)
    finite.check_inputs(xs, [vi.name for vi in real])
    b = Builder(model, Path(path).stem)
    for name, t in inits.items():
        b.env[name] = Value(None, t)
    for vi, x in zip(real, xs, strict=True):
        ir.add_node(b.g, ir.IRNode(vi.name, "input", [], {}, {}, vi.name, "input", [], tuple(x.shape)))
        b.env[vi.name] = Value(vi.name, x)
    for node in graph.node:
        b.translate(node)
    out_names = []
    fake = onnx.NodeProto()
    fake.name = "output"
    b.cur, b.cur_scope, b.cur_count = fake, ("", "", False), 0
    for o in graph.output:
        v = b.lookup(o.name, fake)
        assert v is not None
        out_names.append(v.node if v.is_var else b.constant_node(v.value, "output"))
    # no check of the outputs' values: the weights were checked above, and a NaN output on an example input
    # (shipped test data included) can just mean the input is outside an op's domain (sqrt, log, pow)
    finite.check_graph(b.g, ModelLoadError)
    b.g.graph["example_inputs"] = tuple(xs)  # what the graph was built on (given, or drawn for shapes, seeded)
    if all(ir.node(b.g, n).op == "constant" for n in out_names):
        raise ModelLoadError(f"{path}: no output depends on the model input")
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    spec = pytree.tree_flatten(out_names[0] if len(out_names) == 1 else tuple(out_names))[1]
    shapes = [ir.node(b.g, n).out_shape for n in out_names]
    ir.add_node(b.g, ir.IRNode(b.unique("output"), "output", out_names, {"spec": spec}, {}, "output", "output",
                               shapes, shapes))
    return b.g


__all__ = ["load", "read_model", "run_reference", "scope_of", "Builder", "Value", "Unsupported"]
