"""Public entry points: :func:`trace`, :func:`analyze`, :func:`register_op`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
import torch.nn as nn

from . import ir
from .bounds import autolip as autolip_mod
from .bounds.local import UserConstant, local_constants
from .bounds.lower import lower_bound
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
    method: str = "auto",
    device: str | torch.device | None = None,
    constants: Mapping[str, float | UserConstant] | None = None,
    lower: bool = True,
    lower_budget: float = 20.0,
    power_iterations: int = 100,
    progress: Progress | None = None,
) -> Report:
    """Bound the l2 Lipschitz constant of ``model`` around nothing in particular: globally.

    ``method``: ``"autolip"``, ``"seqlip"`` (AutoLip with SeqLip on linear
    chains) or ``"auto"`` (every method available; ``Report.upper`` is the best
    certified one). ``constants`` maps module paths, class names or node names
    to user-supplied constants (floats are unverified assumptions; use
    :class:`UserConstant` with ``certified=True`` to assert a proof). ``lower``
    runs the Jacobian-ascent search for an attained value (time-boxed by
    ``lower_budget`` seconds). ``progress(stage, done, total)`` is called
    during long work.
    """
    if method not in ("auto", "autolip", "seqlip"):
        raise LipgraphError(f"unknown method {method!r}: use 'auto', 'autolip' or 'seqlip'")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LipgraphError("--device cuda was given but torch.cuda.is_available() is False on this machine")
    seconds: dict[str, float] = {}
    was_training = model.training if isinstance(model, nn.Module) else False

    t0 = time.perf_counter()
    g = trace(model, example_input, leaves=_leaf_keys(constants) if isinstance(model, nn.Module) else ())
    seconds["trace"] = time.perf_counter() - t0
    inputs_shapes = [ir.node(g, n).out_shape for n in g.graph["inputs"]]

    ctx = Settings(device=dev, power_iterations=power_iterations)
    t0 = time.perf_counter()
    cb = (lambda i, n, node: progress("constants", i, n)) if progress else None
    local_full = local_constants(g, ctx, constants, cb)
    seconds["local"] = time.perf_counter() - t0
    local = {k: v[0] for k, v in local_full.items()}

    t0 = time.perf_counter()
    cum = autolip_mod.autolip(g, local)
    out = g.graph["output"]
    seconds["autolip"] = time.perf_counter() - t0
    bounds = {
        "autolip": BoundResult(
            cum[out].value, cum[out].certified, "AutoLip: product/sum of per-node constants over the DAG",
            seconds["local"] + seconds["autolip"],
        )
    }
    segments: list[dict[str, Any]] = []
    if method in ("auto", "seqlip"):
        extra = _seqlip(g, local, ctx)
        if extra is not None:
            result, segments, seconds["seqlip"] = extra
            bounds["autolip+seqlip"] = result

    # --- affine regions (lipgraph.bounds.affine): each maximal linear region bounded as one operator; the
    # exits' folded values enter AutoLip as overrides. "autolip" above stays the plain product.
    if method == "auto":
        from .bounds import affine as affine_mod  # noqa: PLC0415

        aff = affine_mod.fold(g, local, ctx)
        cum_aff = autolip_mod.autolip(g, local, aff.overrides)
        seconds["affine"] = aff.seconds
        bounds["autolip+affine"] = BoundResult(
            cum_aff[out].value, cum_aff[out].certified,
            "AutoLip with maximal affine regions folded into single operators (sum_e ||J_e|| L(e) at exits)",
            seconds["local"] + aff.seconds, aff.details,
        )

    # --- both: SeqLip relations on chains and folded affine regions compound in one AutoLip pass
    if "autolip+seqlip" in bounds and "autolip+affine" in bounds:
        t0 = time.perf_counter()
        alternatives: dict[str, list[list[autolip_mod.Term]]] = {}
        for rec in segments:
            if rec.get("certified") and rec["seqlip"] < rec["autolip"]:
                relation = [autolip_mod.Term(rec["entry"], rec["seqlip"], True)]
                alternatives.setdefault(rec["nodes"][-1], []).append(relation)
        by_exit: dict[str, list[autolip_mod.Term]] = {}
        for p in aff.partials:
            by_exit.setdefault(p.exit, []).append(autolip_mod.Term(p.entry, p.norm, p.certified))
        for v, terms in by_exit.items():
            alternatives.setdefault(v, []).append(terms)
        both = autolip_mod.autolip_with(g, local, alternatives)[out]
        seconds["combine"] = time.perf_counter() - t0
        bounds["autolip+seqlip+affine"] = BoundResult(
            both.value, both.certified,
            "AutoLip with SeqLip chain bounds and folded affine regions, each applied where it is tighter",
            seconds["local"] + seconds.get("seqlip", 0.0) + aff.seconds + seconds["combine"],
        )

    lower_value = None
    if lower:
        t0 = time.perf_counter()
        fn = model if isinstance(model, nn.Module) else (lambda *xs: ir.execute(g, *xs))
        xs = _as_inputs(example_input) if example_input is not None else tuple(
            torch.randn(s) for s in inputs_shapes
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
        try:
            lb = lower_bound(fn, xs, time_budget=lower_budget, f64=f64)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        lower_value = lb.value
        seconds["lower"] = time.perf_counter() - t0

    nodes = []
    for n in ir.nodes(g):
        lc, secs = local_full[n.name]
        nodes.append(_node_report(n, lc, cum[n.name], secs))
    return Report(
        model=g.graph["name"],
        frontend=g.graph["frontend"],
        input_shapes=[tuple(s) for s in inputs_shapes],
        device=str(dev),
        bounds=bounds,
        nodes=nodes,
        segments=segments,
        lower=lower_value,
        seconds=seconds,
        graph=g,
    )


def _seqlip(g: nx.DiGraph, local: Mapping[str, LocalConstant], ctx: Settings):
    """AutoLip with SeqLip on linear-chain segments, when the SeqLip module is present."""
    try:
        from .bounds import seqlip  # noqa: PLC0415 - added by the SeqLip work
    except ImportError:
        return None
    return seqlip.bound(g, local, ctx)


def _node_report(n: ir.IRNode, lc: LocalConstant, c: autolip_mod.Cumulative, secs: float) -> NodeReport:
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
