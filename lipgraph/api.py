"""Public entry points: :func:`trace`, :func:`analyze`, :func:`register_op`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
import torch.nn as nn

from . import ir
from .bounds import METHODS
from .bounds.local import UserConstant, check_constants, local_constants, unmatched_constants
from .bounds.lower import lower_bound
from .bounds.relations import AlgorithmResult, Cumulative, Relation, combine, subgraph_constant
from .errors import InputShapeError, LipgraphError
from .frontends import fx as fx_frontend
from .ops import LocalConstant, Settings, register_rule
from .report import BoundResult, NodeReport, Report

Progress = Callable[[str, int, int], None]


def trace(model: nn.Module | str, example_inputs: Any = None, *, leaves: Sequence[str] = ()) -> nx.DiGraph:
    """Translate a model into the IR (a ``networkx.DiGraph``, see :mod:`lipgraph.ir`).

    ``model`` is an ``nn.Module`` (traced with torch.fx on ``example_inputs``) or
    the path of an ``.onnx`` file (``example_inputs`` then optional: shapes for
    dynamic dimensions).
    """
    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        from .frontends import onnx as onnx_frontend  # noqa: PLC0415 - optional dependency

        return onnx_frontend.load(str(model), example_inputs)
    if example_inputs is None:
        raise InputShapeError("an example input is needed to trace a PyTorch model (e.g. torch.randn(1, 3, 224, 224))")
    return fx_frontend.trace(model, example_inputs, leaves=leaves)


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _leaf_keys(constants: Mapping[str, Any] | None) -> list[str]:
    return list(constants or {})


def analyze(
    model: nn.Module | str,
    example_input: Any = None,
    *,
    method: str | Sequence[str] = "auto",
    device: str | torch.device | None = None,
    constants: Mapping[str, float | UserConstant] | None = None,
    lower: bool = True,
    lower_budget: int = 8,
    power_iterations: int = 100,
    progress: Progress | None = None,
    seed: int = 0,
) -> Report:
    """Bound the l2 Lipschitz constant of ``model`` around nothing in particular: globally.

    ``method``: ``"autolip"``, ``"seqlip"`` (AutoLip with SeqLip on linear
    chains) or ``"auto"`` (every method available; ``Report.upper`` is the best
    certified one). ``constants`` maps module paths, class names or node names
    to user-supplied constants (floats are unverified assumptions; use
    :class:`UserConstant` with ``certified=True`` to assert a proof). ``lower``
    runs the Jacobian-ascent search for an attained value with ``lower_budget``
    restarts (a work count, not seconds: each restart is 11 Jacobian evaluations and 30 secant steps;
    a float is truncated, at least 1), so the value does not depend on machine load.
    ``progress(stage, done, total)`` is called during long work. ``seed`` fixes every random choice
    (power-method starts, the lower-bound search and its random inputs) without touching the caller's
    global random state.
    """
    names = _method_names(method)
    check_constants(constants)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LipgraphError("--device cuda was given but torch.cuda.is_available() is False on this machine")
    seconds: dict[str, float] = {}
    was_training = model.training if isinstance(model, nn.Module) else False

    t0 = time.perf_counter()
    g = trace(model, example_input, leaves=_leaf_keys(constants) if isinstance(model, nn.Module) else ())
    seconds["trace"] = time.perf_counter() - t0
    inputs_shapes = [ir.node(g, n).out_shape for n in g.graph["inputs"]]
    unmatched = unmatched_constants(g, constants)
    if unmatched:
        raise LipgraphError(f"constants key {unmatched[0]!r} matches no node, module path or module class of "
                            f"{g.graph['name']} (keys are module paths like 'layer1.0', class names like "
                            "'Conv2d' or node names from the report)")

    ctx = Settings(device=dev, power_iterations=power_iterations, seed=seed)
    t0 = time.perf_counter()
    cb = (lambda i, n, node: progress("constants", i, n)) if progress else None
    local_full = local_constants(g, ctx, constants, cb)
    seconds["local"] = time.perf_counter() - t0
    local = {k: v[0] for k, v in local_full.items()}

    # every algorithm alone (with AutoLip's own rule), then all of them in one pass of the combinator
    out = g.graph["output"]
    bounds: dict[str, BoundResult] = {}
    results: dict[str, AlgorithmResult] = {}
    segments: list[dict[str, Any]] = []
    for name in names:
        t0 = time.perf_counter()
        res = METHODS[name].runner()(g, local, ctx)
        results[name] = res
        if name == "seqlip":
            segments = res.records
        cum_alone = combine(g, local, res.relations)
        key = "autolip" if name == "autolip" else f"autolip+{name}"
        seconds[name] = time.perf_counter() - t0
        bounds[key] = BoundResult(cum_alone[out].value, cum_alone[out].certified, METHODS[name].doc,
                                  seconds["local"] + seconds[name], dict(res.details))
    refining = [n for n in names if n != "autolip"]
    t0 = time.perf_counter()
    relations = [r for n in refining for r in results[n].relations]
    cum_best = combine(g, local, relations)
    if len(refining) > 1:
        seconds["combine"] = time.perf_counter() - t0
        bounds["autolip+" + "+".join(refining)] = BoundResult(
            cum_best[out].value, cum_best[out].certified,
            "AutoLip with every algorithm's relations, each applied where it is tighter",
            seconds["local"] + sum(seconds[n] for n in refining) + seconds["combine"],
        )
    cum = combine(g, local)
    modules = module_constants(g, local, relations)

    lower_value = None
    discrete = example_input is not None and any(
        isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()) for x in _as_inputs(example_input)
    )
    if lower and not discrete:  # no Jacobian along integer inputs (token ids, indices): no lower-bound search
        t0 = time.perf_counter()
        fn = model if isinstance(model, nn.Module) else (lambda *xs: ir.execute(g, *xs))
        gen = torch.Generator().manual_seed(seed)
        xs = _as_inputs(example_input) if example_input is not None else tuple(
            torch.randn(s, generator=gen) for s in inputs_shapes
        )
        f64 = None
        if isinstance(model, nn.Module):
            model.eval()  # restored below: analyze leaves the model as it was
            import copy  # noqa: PLC0415

            try:
                m64 = copy.deepcopy(model).double()
                f64 = lambda *zs, _m=m64: _m(*(z.double() for z in zs))  # noqa: E731
            except Exception:  # noqa: BLE001 - a model that cannot be copied: the float32 value stands
                f64 = None
        rng_devices = [dev.index or 0] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):  # the search's own draws, seeded, then restored
                torch.manual_seed(seed)
                lb = lower_bound(fn, xs, restarts=max(1, int(lower_budget)), f64=f64, seed=seed)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        lower_value = lb.value
        seconds["lower"] = time.perf_counter() - t0

    nodes = []
    for n in ir.nodes(g):
        lc, secs = local_full[n.name]
        nodes.append(_node_report(n, lc, cum[n.name], cum_best[n.name], secs))
    return Report(
        model=g.graph["name"],
        frontend=g.graph["frontend"],
        input_shapes=[tuple(s) for s in inputs_shapes],
        device=str(dev),
        bounds=bounds,
        nodes=nodes,
        segments=segments,
        modules=modules,
        lower=lower_value,
        seconds=seconds,
        graph=g,
    )


def _method_names(method: str | Sequence[str]) -> list[str]:
    """``"auto"`` -> every default algorithm; a name or a list of names (``"autolip"`` always runs first)."""
    if method == "auto":
        wanted = [m.name for m in METHODS.values() if m.default]
    else:
        wanted = [method] if isinstance(method, str) else list(method)
    unknown = [w for w in wanted if w not in METHODS]
    if unknown:
        raise LipgraphError(f"unknown method {unknown[0]!r}: use 'auto' or one or more of {', '.join(METHODS)}")
    return ["autolip"] + [w for w in METHODS if w in wanted and w != "autolip"]


def module_constants(g: nx.DiGraph, local: Mapping[str, LocalConstant],
                     relations: Sequence[Relation] = ()) -> dict[str, dict[str, Any]]:
    """The constant of every module's sub-DAG (its external inputs at 1, exits combined in l2), by the combinator.

    Keyed by module path; relations whose entries all lie inside the module are used too. Stored in the
    report so the renderer draws these numbers instead of computing them.
    """
    by_path: dict[str, list[str]] = {}
    for n in ir.nodes(g):
        path = n.attrs.get("module_path", "") or ""
        if n.op in ("input", "output", "constant") or not path:
            continue
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            by_path.setdefault(".".join(parts[:k]), []).append(n.name)
    out: dict[str, dict[str, Any]] = {}
    for path, members in by_path.items():
        c = subgraph_constant(g, local, members, relations)
        out[path] = {"value": c.value, "certified": c.certified, "nodes": len(members)}
    return out


def _node_report(n: ir.IRNode, lc: LocalConstant, c: Cumulative, best: Cumulative, secs: float) -> NodeReport:
    return NodeReport(
        name=n.name,
        op=n.op,
        source=n.source,
        origin=n.origin,
        module_path=n.attrs.get("module_path", ""),
        in_shapes=list(n.in_shapes),
        out_shape=n.out_shape,
        local=lc.value,
        local_lower=lc.lower,
        partials=list(lc.partials),
        combine=lc.combine,
        certified=lc.certified,
        method=lc.method,
        reason=lc.reason,
        cumulative=c.value,
        cumulative_certified=c.certified,
        bound=best.value,
        bound_certified=best.certified,
        via=best.via,
        seconds=secs,
    )


def register_op(
    kind: str,
    lipschitz: Callable[[ir.IRNode, Settings], LocalConstant] | float,
    *,
    module: type | None = None,
    function: Callable[..., Any] | None = None,
    certified: bool = True,
    doc: str = "",
) -> None:
    """Teach lipgraph a new op in one call.

    ``module`` (an ``nn.Module`` subclass) or ``function`` (a plain function,
    traced as a leaf) is mapped to op ``kind``; ``lipschitz`` is either a rule
    ``(node, ctx) -> LocalConstant`` or a number (a constant valid for every
    input; ``certified`` says whether it is proven).
    """
    from .ops.structural import opaque_forward  # noqa: PLC0415

    if not callable(lipschitz):
        value = float(lipschitz)

        def rule_fn(node: ir.IRNode, ctx: Settings, _v: float = value) -> LocalConstant:
            return LocalConstant([_v] * len(node.inputs), certified, "user-rule")

        lipschitz = rule_fn
    register_rule(kind, opaque_forward, lipschitz, doc=doc, replace=True)
    if module is not None:
        fx_frontend.CUSTOM_MODULES[module] = kind
    if function is not None:
        fx_frontend.CUSTOM_FUNCTIONS[function] = kind
    if module is None and function is None:
        raise ValueError("register_op needs module= or function=")


__all__ = ["analyze", "trace", "register_op", "UserConstant"]
