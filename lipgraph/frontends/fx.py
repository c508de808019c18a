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

import contextlib
import inspect
import io
import linecache
import logging
import math
import operator
import re
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .. import ir
from ..core import restore_training_modes, run_seed, training_modes
from ..errors import InputShapeError, TraceError
from ..ops import execute, structural
from ..ops.registry import kind_spelled, module_spellings, torch_spellings
from . import finite, fuse, fx_attention, fx_canon, fx_windows
from .fx_canon import Canon, Var

#: Custom ops registered through :func:`lipgraph.register_op`: module type or function -> op kind.
CUSTOM_MODULES: dict[type, str] = {}
CUSTOM_FUNCTIONS: dict[Any, str] = {}


class _Tracer(fx.Tracer):
    def __init__(self, leaf_paths: set[str], leaf_types: set[type],
                 examples: dict[Callable[..., Any], list[fx_windows.Example]] | None = None,
                 write: bool = True) -> None:
        super().__init__(autowrap_functions=tuple(f for f in CUSTOM_FUNCTIONS if callable(f)) + torch_spellings())
        self.write = write  # False: attention, einsum and torchvision's wrapped calls stay one node each
        self.examples = {fn: list(v) for fn, v in (examples or {}).items()}  # consumed in call order
        self.writers = fx_windows.written_functions() if self.examples else {}
        # fx marks the node a wrapped function returns ("is_wrapped"), and the generated code then registers its
        # target as a wrapped global: for a written-out call that node is ours (torch.cat, torch.roll), and the
        # registration would break every later trace (fx looks "torch.cat" up in a module's globals)
        self.written_outputs: list[fx.Node] = []
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types
        self.record_stack_traces = True
        self._inlining: nn.Module | None = None
        self.decomposed = 0  # attention calls written out in primitive ops

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """MultiheadAttention calls that :mod:`fx_attention` reproduces are traced through its primitive
        forward (projections, matmuls, softmax) instead of one opaque ``attention`` node."""
        qualname = self.path_of_module(m)
        if (self.write and qualname not in self.leaf_paths and type(m).__name__ not in self.leaf_paths
                and fx_attention.mha_decomposable(m, args, kwargs)):
            outer, self._inlining = self._inlining, m
            try:
                self.decomposed += 1
                return super().call_module(m, lambda *a, **k: fx_attention.mha_forward(m, *a, **k), args, kwargs)
            finally:
                self._inlining = outer
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *rest: Any, **more: Any) -> Any:
        if not self.write or kind != "call_function":
            return super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if target is torch.nn.functional.scaled_dot_product_attention and fx_attention.sdpa_decomposable(args, kwargs):
            self.decomposed += 1
            return fx_attention.sdpa_forward(*args, **kwargs)
        if target in self.writers and self.examples.get(target):
            written = self.writers[target](target, self.examples[target].pop(0), args, kwargs)
            if isinstance(written, fx.Proxy):
                self.decomposed += 1
                self.written_outputs.append(written.node)
                return written
        if target is torch.einsum and not kwargs:
            operands = fx_attention.einsum_operands(args)
            plan = fx_attention.einsum_plan(operands[0]) if operands is not None else None
            if plan is not None:
                self.decomposed += 1
                return fx_attention.einsum_forward(plan, operands[1], operands[2])
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or type(m).__name__ in self.leaf_paths:
            return True
        if m is self._inlining:
            return False
        if isinstance(m, tuple(self.leaf_types) + fx_canon.ATTENTION_MODULES + tuple(CUSTOM_MODULES)
                      + module_spellings()):
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


_TRACE_HINT = (
    "torch.fx cannot follow Python control flow or calls that depend on tensor values; "
    "rewrite that line with tensor ops (torch.where, masking), or treat the module holding it as a "
    "black box with constants={'module.path': L}"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _defaults_after(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """``forward``'s parameters after the first ``n_inputs`` that have a non-tensor default (``mask=None``,
    ``scale=2.0``): fixed at that default for the trace, as the example call leaves them, so a branch such as
    ``if mask is not None:`` is taken as the call takes it (traced as a proxy, ``mask`` is never None). fx keeps
    a placeholder for each, holding its default, which the count of inputs leaves out."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            out[p.name] = p.default
    return out


def _trace(model: nn.Module, leaf_paths: set[str], leaf_types: set[type],
           examples: dict[Callable[..., Any], list[fx_windows.Example]] | None = None,
           write: bool = True, n_inputs: int | None = None) -> fx.GraphModule:
    tracer = _Tracer(leaf_paths, leaf_types, examples, write)
    concrete = _defaults_after(model, n_inputs) if n_inputs is not None else {}
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear error
        where = _user_frame(exc)
        at = f" at {where}" if where else ""
        raise TraceError(f"cannot trace {type(model).__name__}{at}: {_first_line(exc)}. {_TRACE_HINT}") from exc
    for n in tracer.written_outputs:
        n.meta.pop("is_wrapped", None)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["decomposed_attention"] = tracer.decomposed
    gm.meta["unused_examples"] = sum(len(v) for v in tracer.examples.values())
    return gm


def _outputs_agree(got: Any, expected: Any) -> bool:
    """The tensors of two output structures are equal (floats up to rtol 1e-4 and atol 1e-5 of their scale)."""
    exp = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    out = [x for x in pytree.tree_leaves(got) if isinstance(x, torch.Tensor)]
    if len(exp) != len(out):
        return False
    for e, o in zip(exp, out, strict=True):
        if e.shape != o.shape:
            return False
        if e.is_floating_point():
            scale = float(e.abs().max()) if e.numel() else 0.0
            if not torch.allclose(o.to(e.dtype), e, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                return False
        elif not torch.equal(o, e):
            return False
    return True


#: Seed of the random probe on which written-out calls are checked beside the example input.
PROBE_SEED = 0


def _written_out_faithfully(gm: fx.GraphModule, model: nn.Module,
                            inputs: tuple[torch.Tensor, ...]) -> tuple[bool, Any]:
    """A trace with calls written out in primitive ops (attention, einsum, Swin's windows) keeps them only if
    the traced module computes the model's output on the example input *and* on a seeded random probe of the
    same shapes (example + noise of its spread): a writer that agrees on the example only (a constant input
    hides a wrong mask) is not kept. Every recorded shape must have been used, and the traced module must
    run (a size-1 summed einsum index, which matmul does not broadcast). A probe on which the model's output
    is not finite is not compared. Returns ``(kept, the model's output on the example)`` (the reference the IR
    is checked against afterwards)."""
    if gm.meta.get("unused_examples"):
        return False, None
    gen = torch.Generator().manual_seed(run_seed(PROBE_SEED))

    def probe(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        spread = float(x.double().std()) if x.numel() > 1 else 0.0
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
        return x + noise * (spread if math.isfinite(spread) and spread > 0 else 1.0)

    on_example = None
    for z in (inputs, tuple(probe(x) for x in inputs)):
        try:
            with torch.no_grad():
                got = gm(*(x.clone() if isinstance(x, torch.Tensor) else x for x in z))
                expected = model(*(x.clone() if isinstance(x, torch.Tensor) else x for x in z))
        except Exception:  # noqa: BLE001 - a written-out graph that does not run is not kept
            return False, None
        on_example = expected if on_example is None else on_example
        finite = all(bool(torch.isfinite(e).all()) for e in pytree.tree_leaves(expected)
                     if isinstance(e, torch.Tensor) and e.is_floating_point())
        if finite and not _outputs_agree(got, expected):
            return False, None
    return True, on_example


def _export_frame(exc: BaseException) -> str | None:
    """The user's ``file:line: code`` that torch.export names in its message ("The following call raised ...")."""
    lines = str(exc).splitlines()
    found = None
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if m and "/torch/" not in m.group(1).replace("\\", "/"):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found = f"{m.group(1)}:{m.group(2)}: {code}"
    return found or _user_frame(exc)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], leaf_paths: set[str],
            fx_error: TraceError) -> fx.GraphModule:
    """Fallback when torch.fx fails: ``torch.export`` specialises shape-dependent Python control flow
    to the example input; data-dependent control flow still fails (re-raised with the user's line)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch.export logs graphs and guard failures; the error says it all
    try:
        sink = io.StringIO()  # it also prints the partial graph of a failed guard
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, inputs, strict=False)
    except Exception as exc:  # noqa: BLE001 - report both failures in one line
        cause = fx_error.__cause__ or fx_error
        where = _user_frame(cause) or _export_frame(exc)
        at = f" at {where}" if where else ""
        raise TraceError(
            f"cannot trace {type(model).__name__}{at}: {_first_line(cause)} (torch.export also failed: "
            f"{_first_line(exc)}). {_TRACE_HINT}"
        ) from exc
    finally:
        logging.disable(previous)
    gm = ep.module()
    if leaf_paths:
        for n in gm.graph.nodes:
            for path, ty in (n.meta.get("nn_module_stack") or {}).values():
                name = str(getattr(ty, "__name__", ty)).rsplit(".", 1)[-1]
                if any(path == p or path.startswith(p + ".") or name == p for p in leaf_paths):
                    raise TraceError(
                        f"{fx_error} torch.export can trace the model but cannot keep module {path!r} as a "
                        "black box for the constants given; rewrite the control flow instead"
                    )
    _rewrite_tuple_ops(gm)
    _write_out_attention(gm)
    return gm


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _write_out_attention(gm: fx.GraphModule) -> None:
    """``aten.scaled_dot_product_attention(q, k, v)`` without a mask, dropout, causality or grouped heads as
    ``softmax(q k^T * scale) v`` in aten ops (``scale = q.size(-1) ** -0.5`` unless given), as the fx path
    writes ``F.scaled_dot_product_attention`` out. torch.export keeps the fused call (``TransformerEncoderLayer``
    cannot be traced by fx: its fast-path checks branch on the input), which has no rule; the IR is checked
    against the model afterwards, as every trace is."""
    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not _SDPA:
            continue
        if not fx_attention.sdpa_decomposable(tuple(n.args), dict(n.kwargs)):
            continue
        a = fx_attention._bind_sdpa(tuple(n.args), dict(n.kwargs))
        q = a["query"]
        shape = getattr(q, "meta", {}).get("val")
        if shape is None:
            continue
        scale = a["scale"] if a["scale"] is not None else int(shape.shape[-1]) ** -0.5
        aten = torch.ops.aten
        with gm.graph.inserting_before(n):
            kt = gm.graph.call_function(aten.transpose.int, (a["key"], -2, -1))
            scores = gm.graph.call_function(aten.matmul.default, (q, kt))
            scaled = gm.graph.call_function(aten.mul.Tensor, (scores, float(scale)))
            probs = gm.graph.call_function(aten._softmax.default, (scaled, -1, False))
            out = gm.graph.call_function(aten.matmul.default, (probs, a["value"]))
        for new in (kt, scores, scaled, probs, out):
            new.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")}
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        changed = True
    if changed:
        gm.recompile()


def _rewrite_tuple_ops(gm: fx.GraphModule) -> None:
    """Replace ``getitem(native_batch_norm(...), 0)`` and the like by the plain function (F.batch_norm)."""
    changed = False
    for n in list(gm.graph.nodes):
        entry = fx_canon.TUPLE_FIRST.get(n.target) if n.op == "call_function" else None
        if entry is None:
            continue
        users = list(n.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        fn, adapt = entry
        args, kwargs = adapt(*n.args, **n.kwargs)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(fn, args, kwargs)
        new.meta = dict(n.meta)
        for u in users:
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        changed = True
    if changed:
        gm.recompile()


def _checked_graph(g: nx.DiGraph, inputs: tuple[torch.Tensor, ...], expected: Any, model_name: str,
                   inplace: Sequence[str]) -> nx.DiGraph:
    """The IR that reproduces the model (:func:`_check_reproduces`): ``g`` with products ``x * f(x)`` fused into
    their elementwise rules (:mod:`lipgraph.frontends.fuse`) when that one passes the check, else ``g`` as built,
    checked (its error raised). The fused op rounds once where the model rounds twice, which a float16 model's
    check can see, and integer tensors have no such kernels."""
    h = fuse.fused(g)
    if h is not None:
        try:
            _check_reproduces(h, inputs, expected, model_name, inplace)
            return h
        except Exception:  # noqa: BLE001 - the unfused graph is checked next, and its error is the one raised
            pass
    _check_reproduces(g, inputs, expected, model_name, inplace)
    return g


def _check_reproduces(g: nx.DiGraph, inputs: tuple[torch.Tensor, ...], expected: Any, model_name: str,
                      inplace: Sequence[str] = ()) -> None:
    """The IR must compute the model's output on the example input (catches in-place writes through
    views, Python-side state and other semantics a translation could miss)."""
    with torch.no_grad():
        got = execute(g, *(x.clone() for x in inputs))
    exp_leaves = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    for e in exp_leaves:
        if e.is_floating_point() and not bool(torch.isfinite(e).all()):
            raise TraceError(
                f"the output of {model_name} on the example input is not finite (NaN or inf): a non-finite "
                "weight, statistic or parameter, or an overflow; no bound is computed"
            )
    if not _outputs_agree(got, expected):
        if inplace:
            raise TraceError(
                f"the traced graph of {model_name} does not reproduce the model's output on the example input: "
                f"the in-place write at node {', '.join(inplace)} cannot be followed (a write through a view?); "
                "write it out of place (e.g. y = torch.relu(a) instead of torch.relu_(a))"
            )
        raise TraceError(
            f"the traced graph of {model_name} does not reproduce the model's output on the example input "
            "(state kept outside tensors?); please report this model"
        )


class _Recorder(fx.Interpreter):
    """Runs the traced graph once, recording every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False  # our error names the node; fx would append lines to it

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            where = _where(n).rstrip(": ")
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            raise InputShapeError(
                f"running the model on the example input failed at node {n.name!r} ({n.op} {target})"
                f"{' ' + where if where else ''}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from exc


def _is_tensor_value(v: Any) -> bool:
    """A tensor, or a tuple/list holding at least one tensor (e.g. MultiheadAttention's ``(out, None)``)."""
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in v]


#: Calls that read only a tensor's metadata (shape, dtype, device), never its values.
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device", "is_contiguous", "nelement"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})
_SHAPE_ATEN = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})


def _reads_metadata_only(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    if n.op == "call_function":
        if n.target is getattr and len(n.args) > 1:
            return n.args[1] in _SHAPE_ATTRS
        if isinstance(n.target, torch._ops.OpOverload):
            return n.target.overloadpacket.__name__ in _SHAPE_ATEN
        return n.target in (torch.numel,)
    return False


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})


def _mutated_input(n: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The fx node an in-place call overwrites (``x += y``, ``relu(x, inplace=True)``, ``x.add_(y)``)."""
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return None
    if n.op == "call_module":
        return first if getattr(gm.get_submodule(n.target), "inplace", False) is True else None
    if n.op == "call_method":
        name = str(n.target)
        return first if name.endswith("_") and not name.endswith("__") else None
    if n.op != "call_function":
        return None
    out = n.kwargs.get("out")
    if isinstance(out, fx.Node):  # torch.add(a, b, out=c) overwrites c
        return out
    if n.target in _INPLACE_OPERATORS:
        return first
    name = getattr(n.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__") and not isinstance(
        n.target, torch._ops.OpOverload
    ):  # torch.relu_, torch.exp_, F.elu_: the in-place spellings of functions
        return first
    if isinstance(n.target, torch._ops.OpOverload):
        args = n.target._schema.arguments
        return first if args and args[0].alias_info is not None and args[0].alias_info.is_write else None
    if n.kwargs.get("inplace") is True:
        return first
    try:
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
    except (TypeError, ValueError):
        return None
    return first if bound.arguments.get("inplace") is True else None


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
    finite.check_inputs(example_inputs, [f"#{i}" for i in range(len(example_inputs))])
    for pname, p in list(model.named_parameters()) + [
        (b, t) for b, t in model.named_buffers() if b.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    ]:
        if finite.bad(p):
            raise TraceError(f"{type(model).__name__}: tensor {pname!r} is not finite ({finite.describe(p.detach())}); "
                             "no bound can be computed from a NaN or infinite weight or statistic")
    modes = training_modes(model)
    state = _state_snapshot(model)
    model.eval()
    try:
        leaf_paths = set(leaves)
        frontend = "torch.fx"
        model_output = None  # the model's own output on the example, where calls were written out
        try:
            gm = _trace(model, leaf_paths, set(), fx_windows.record_shapes(model, example_inputs),
                        n_inputs=len(example_inputs))
            if gm.meta["decomposed_attention"]:
                kept, model_output = _written_out_faithfully(gm, model, example_inputs)
                if not kept:  # each such call one node (inf), as before
                    gm = _trace(model, leaf_paths, set(), write=False, n_inputs=len(example_inputs))
        except TraceError as fx_error:
            gm = _export(model, example_inputs, leaf_paths, fx_error)
            frontend = "torch.export"
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) > len(example_inputs):  # the rest hold forward's defaults (fixed, not inputs)
            placeholders = placeholders[:len(example_inputs)] + [
                p for p in placeholders[len(example_inputs):] if not p.args]
        if len(placeholders) != len(example_inputs):
            raise InputShapeError(
                f"{type(model).__name__}.forward takes {len(placeholders)} tensor argument(s) "
                f"({', '.join(p.target for p in placeholders)}), but {len(example_inputs)} example input(s) were given"
            )
        recorder = _Recorder(gm)
        with torch.no_grad():  # clones: an in-place write in the model must not change the caller's input
            expected = recorder.run(*(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs))
            if gm.meta.get("decomposed_attention"):  # written-out attention: check against the model itself
                expected = model_output
        out_spec = None
        if frontend == "torch.export":
            out_spec = gm.graph._codegen.pytree_info.out_spec  # Interpreter.run already applied it
        g = _build(gm, recorder.env, type(model).__name__, frontend, out_spec)
        finite.check_graph(g, TraceError)
        inplace = [f"{n.name!r} ({_origin(n, gm)})" for n in gm.graph.nodes
                   if n.op in ("call_function", "call_method", "call_module") and _mutated_input(n, gm) is not None]
        g = _checked_graph(g, example_inputs, expected, type(model).__name__, inplace)
    finally:
        restore_training_modes(modes)
        changed = _restore_state(state)
    if changed:
        raise TraceError(
            f"{type(model).__name__}.forward changes the model's state ({', '.join(changed)}): each call computes "
            "another function, so no constant can be certified. The model was given back as it was; guard the "
            "update with `if self.training:` (lipgraph analyses in eval mode) or move it out of forward")
    return g


def _state_snapshot(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Per submodule: its buffer and parameter dicts (which objects they hold), each tensor's version counter
    (bumped by every in-place write) and a copy of every buffer, so :func:`_restore_state` can tell what a
    forward changed and put it back."""
    snap = []
    for path, m in model.named_modules():
        bufs, params = dict(m._buffers), dict(m._parameters)
        versions = {k: t._version for k, t in {**bufs, **params}.items() if isinstance(t, torch.Tensor)}
        copies = {k: t.detach().clone() for k, t in bufs.items() if isinstance(t, torch.Tensor)}
        snap.append((path, m, {"buffers": bufs, "parameters": params}, versions, copies))
    return snap


def _restore_state(snap: list[tuple[str, nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Put back every buffer and parameter a trace or run replaced or wrote in place; the names of those changed
    (a parameter written in place cannot be restored and is named as such)."""
    changed = []
    for path, m, held, versions, copies in snap:
        for kind, table in (("buffer", m._buffers), ("parameter", m._parameters)):
            before = held[kind + "s"]
            for k in set(before) | set(table):
                name = f"{kind} {(path + '.' if path else '') + k!r}"
                if table.get(k) is not before.get(k):
                    changed.append(name + " reassigned")
                    if k in before:
                        table[k] = before[k]
                    else:
                        del table[k]
                t = before.get(k)
                if isinstance(t, torch.Tensor) and t._version != versions.get(k):
                    changed.append(name + " written in place")
                    if k in copies:
                        with torch.no_grad():
                            t.copy_(copies[k])
    return changed


def _source(n: fx.Node) -> tuple[str, str]:
    """(module path, owning module class) of a node, from fx's nn_module_stack."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, ty = list(stack.values())[-1]
    return path, str(getattr(ty, "__name__", ty)).rsplit(".", 1)[-1]


def _origin(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional") or getattr(torch.nn.functional, name, None) is t:
        return f"F.{name}"
    if getattr(torch, name, None) is t:
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


def _where(n: fx.Node) -> str:
    """``file:line: code `` of the user's line that created ``n`` (from its stack trace), or ''."""
    trace = (n.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', trace[i])
        f = m.group(1).replace("\\", "/") if m else ""
        if m and "/torch/" not in f and "/lipgraph/frontends/" not in f:  # the tracer's own hooks are not the user's
            code = trace[i + 1].strip() if i + 1 < len(trace) else ""
            return f"at {m.group(1)}:{m.group(2)}: {code}: "
    return ""


def _build(gm: fx.GraphModule, env: dict[fx.Node, Any], model_name: str, frontend: str = "torch.fx",
           out_spec: Any = None) -> nx.DiGraph:
    g = ir.new_graph(model_name, frontend)
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
            var[n] = Var(n.name, tuple(v.shape), dtype=v.dtype)
            continue
        if n.op == "output":
            leaves, spec = pytree.tree_flatten(n.args[0])
            if out_spec is not None:  # torch.export: the graph returns the flat outputs
                spec = out_spec
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
        if n.op == "get_attr" or not depends(n):
            continue  # folded: its value is substituted where it is used
        if not _is_tensor_value(env[n]):
            # A Python value computed from the input: fine when it only reads shapes (x.size(0)),
            # unsound to freeze when it reads tensor values (x.item(), x.tolist()).
            direct = [a for a in n.all_input_nodes if a in var]
            if env[n] is not None and direct and not _reads_metadata_only(n):
                raise TraceError(
                    f"{model_name}: {_where(n)}reads tensor values into Python ({n.format_node()}); the result "
                    "would be frozen to the example input's value. Keep the computation in tensor ops "
                    "(e.g. use x.sum() instead of x.sum().item())"
                )
            continue
        value = env[n]
        path, owner = _source(n)
        origin = _origin(n, gm)
        args, kwargs = resolve(n.args), resolve(n.kwargs)
        canon = _canonicalise(n, gm, args, kwargs)
        what = _discontinuity(n, env, var, origin)
        if what is not None:  # never an identity or a smooth rule: it jumps
            canon = _opaque(n, gm, args, kwargs)
            canon.op = "discontinuous"
            canon.attrs["what"] = what
        elif canon is None:
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
        var[n] = Var(n.name, out_shape, is_tuple=not isinstance(value, torch.Tensor), producer=canon.op,
                     dtype=value.dtype if isinstance(value, torch.Tensor) else None)
        mutated = _mutated_input(n, gm)
        if mutated is not None and mutated in var:
            var[mutated] = var[n]  # later reads of the overwritten tensor see the new value
    if g.graph["output"] is None:
        raise TraceError(f"{model_name} has no output that depends on its input")
    for name in list(g.nodes):  # an order statistic's tuple used whole carries its integer indices on
        node = ir.node(g, name)
        if node.op == "order_pair" and any(ir.node(g, s).op != "tuple_getitem" for s in g.successors(name)):
            node.attrs["whole_tuple_used"] = True
    return g


#: Calls that jump: rounding, sign, comparisons, integer division and remainders.
_DISCONTINUOUS_NAMES = frozenset({
    "round", "floor", "ceil", "trunc", "fix", "frac", "sign", "sgn", "signbit", "heaviside", "floor_divide",
    "floordiv", "remainder", "fmod", "mod", "bucketize", "searchsorted", "gt", "ge", "lt", "le", "eq", "ne",
    "greater", "greater_equal", "less", "less_equal", "not_equal", "isclose", "argmax", "argmin", "argsort",
})
#: Calls that are discontinuous when one of their inputs is an input-dependent mask (bool/int tensor).
_MASKED_NAMES = frozenset({"where", "masked_fill", "masked_scatter", "masked_select"})


def _call_name(n: fx.Node) -> str:
    if n.op == "call_method":
        name = str(n.target)
    elif n.op == "call_function":
        t = n.target
        name = t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", "")
    else:
        return ""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _discontinuity(n: fx.Node, env: dict[fx.Node, Any], var: dict[fx.Node, Var], origin: str) -> str | None:
    """What makes node ``n`` discontinuous in the model input, or None.

    A float tensor mapped to an integer or bool tensor (casts, comparisons, argmax) takes values in a
    discrete set, so it is constant or it jumps; rounding and sign jump; a ``where`` on an
    input-dependent mask switches between branches."""
    value = env[n]
    float_in = [a for a in n.all_input_nodes if a in var and isinstance(env.get(a), torch.Tensor)
                and env[a].is_floating_point()]
    if (isinstance(value, torch.Tensor) and float_in and not value.is_floating_point()
            and not value.is_complex()):
        return f"{origin} (a float tensor mapped to {value.dtype})"
    name = _call_name(n)
    if name in _DISCONTINUOUS_NAMES and float_in:
        return origin
    if name == "div" and (n.kwargs.get("rounding_mode") is not None or len(n.args) > 2):
        return f"{origin} with rounding"
    if name in _MASKED_NAMES and any(
        a in var and isinstance(env.get(a), torch.Tensor) and not env[a].is_floating_point()
        for a in n.all_input_nodes
    ):
        return f"{origin} on an input-dependent condition"
    return None


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
        spelled = kind_spelled(torch_module=type(mod))
        if spelled is not None and len(args) == 1 and not kwargs and isinstance(args[0], Var):
            return Canon(spelled, [args[0]])
        if isinstance(mod, fx_canon.ATTENTION_MODULES):
            c = _opaque(n, gm, args, kwargs)
            c.op = "attention"
            return c
        handler = fx_canon.module_handler(mod)
        return _call(handler, (mod, *args), kwargs) if handler else None
    if n.op == "call_function":
        if n.target in CUSTOM_FUNCTIONS:
            return _custom(CUSTOM_FUNCTIONS[n.target], n.target, args, kwargs)
        spelled = kind_spelled(torch_function=n.target)
        if spelled is not None and len(args) == 1 and not kwargs and isinstance(args[0], Var):
            return Canon(spelled, [args[0]])
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
    if _mutated_input(n, gm) is not None:  # run on copies: the IR rewires later readers to this node instead
        inner = fn

        def fn(*a: Any, _f: Callable[..., Any] = inner, **k: Any) -> Any:
            a, k = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (a, k))
            return _f(*a, **k)
    return Canon("opaque", list(inputs), {"callable": fn, "args": targs, "kwargs": tkwargs})


def _custom(kind: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Canon:
    inputs, targs, tkwargs = _template(args, kwargs)
    return Canon(kind, list(inputs), {"callable": fn, "args": targs, "kwargs": tkwargs})


__all__ = ["trace", "CUSTOM_MODULES", "CUSTOM_FUNCTIONS"]
