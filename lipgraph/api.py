"""Public entry points: :func:`trace`, :func:`analyze`, :func:`register_op`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
import torch.nn as nn

from . import ir
from .bounds import METHODS
from .bounds.linear_bounds import tightened_ranges
from .bounds.local import UserConstant, check_constants, local_constants, unmatched_constants
from .bounds.lower import PatternTargets, lower_bound, pass_work, pattern_passes, search_plan, secant_search
from .bounds.mean_value import center_ranges, intersect, l2_radius, mean_value_ranges, spreads, tightens
from .bounds.on_domain import domain_constants
from .bounds.ranges import propagate
from .bounds.relations import AlgorithmResult, Cumulative, Relation, combine, subgraph_constant
from .core import restore_training_modes, seeds_from_argument, training_modes
from .domains import Domain, Range
from .errors import InconsistentBoundsError, InputShapeError, LipgraphError
from .frontends import fx as fx_frontend
from .ops import RULES, LocalConstant, Settings, execute, register_rule
from .report import BoundResult, NodeReport, Report

Progress = Callable[[str, int, int], None]


def trace(model: nn.Module | str | nx.DiGraph, example_inputs: Any = None, *, leaves: Sequence[str] = ()) -> nx.DiGraph:
    """Translate a model into the IR (a ``networkx.DiGraph``, see :mod:`lipgraph.ir`).

    ``model`` is an ``nn.Module`` (traced with torch.fx on ``example_inputs``) or
    the path of an ``.onnx`` file (``example_inputs`` then optional: shapes for
    dynamic dimensions), or an IR graph that :func:`trace` already returned (given back as it is, so a graph
    built or edited on the IR, such as :mod:`lipgraph.certify`'s logit differences of an ONNX model, is
    analysed like a model).
    """
    if isinstance(model, nx.DiGraph):
        if not {"inputs", "output", "order", "name", "frontend"} <= set(model.graph):
            raise LipgraphError("a networkx graph given as a model must be a lipgraph IR (from lipgraph.trace)")
        return model
    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        from .frontends import onnx as onnx_frontend  # noqa: PLC0415 - optional dependency

        return onnx_frontend.load(str(model), example_inputs)
    if example_inputs is None:
        raise InputShapeError("an example input is needed to trace a PyTorch model (e.g. torch.randn(1, 3, 224, 224))")
    return fx_frontend.trace(model, example_inputs, leaves=leaves)


def _all_tensors(example_inputs: Any) -> bool:
    """A tensor or a non-empty tuple/list of tensors (not shapes, not None)."""
    if isinstance(example_inputs, torch.Tensor):
        return True
    return (isinstance(example_inputs, (tuple, list)) and bool(example_inputs)
            and all(isinstance(x, torch.Tensor) for x in example_inputs))


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _leaf_keys(constants: Mapping[str, Any] | None) -> list[str]:
    return list(constants or {})


@seeds_from_argument
def analyze(
    model: nn.Module | str | nx.DiGraph,
    example_input: Any = None,
    *,
    method: str | Sequence[str] = "auto",
    device: str | torch.device | None = None,
    constants: Mapping[str, float | UserConstant] | None = None,
    lower: bool = True,
    lower_budget: int | None = None,
    power_iterations: int = 100,
    progress: Progress | None = None,
    seed: int = 0,
    domain: Domain | Sequence[Domain] | None = None,
    domain_only: bool = False,
    effort: float = 1.0,
) -> Report | list[Report]:
    """Bound the l2 Lipschitz constant of ``model``: globally, or on an input ``domain``.

    ``method``: ``"autolip"``, ``"seqlip"`` (AutoLip with SeqLip on linear
    chains) or ``"auto"`` (every method available; ``Report.upper`` is the best
    certified one). ``constants`` maps module paths, class names or node names
    to user-supplied constants (floats are unverified assumptions; use
    :class:`UserConstant` with ``certified=True`` to assert a proof). ``lower``
    runs the Jacobian-ascent search for an attained value: ``lower_budget`` restarts when given (a work
    count, not seconds: each restart is 11 Jacobian evaluations and 30 secant steps; a float is truncated, at
    least 1); by default a plan scaled to the model (:func:`lipgraph.bounds.lower.search_plan`: 8 restarts
    where they fit :data:`~lipgraph.bounds.lower.SEARCH_WORK` multiply-adds, fewer and shorter ones on large
    or deep models, counted from the graph's shapes and node count), so the value does not depend on machine load.
    ``effort`` scales the work budgets of the refinements that ``method="auto"`` runs (SeqLip's dense work,
    :data:`~lipgraph.bounds.seqlip.DENSE_WORK`; affine folding's materialised maps,
    :data:`~lipgraph.bounds.affine.AFFINE_WORK_BUDGET`; the dense chain methods,
    :data:`~lipgraph.bounds.chain_mats.CHAIN_WORK_BUDGET`): ``effort=4`` spends up to four times as much, for a
    bound that is usually tighter (more segments and maps are served; SeqLip's node budget, shared in graph
    order, is the one thing not scaled), ``math.inf`` lifts them, as naming the methods does. Budgets count
    work from the graph's shapes, never seconds, so every run at the same ``effort`` gives the same numbers.
    ``progress(stage, done, total)`` is called during long work. ``seed`` fixes every random choice
    (power-method, Lanczos and Rayleigh starts, the trace's random probe, structure checks, an ONNX file's
    default example input, the lower-bound search and its random inputs; :func:`lipgraph.core.seeded`)
    without touching the caller's global random state.

    ``domain`` (a :class:`~lipgraph.domains.Box`, :class:`~lipgraph.domains.Ball` or ball within a box, see
    :mod:`lipgraph.domains`): the constant on that convex set of inputs. Ranges of every node are propagated
    over it, each node's constant is taken on its inputs' ranges (per-neuron slopes, products, softmax,
    norms), the domain-aware algorithms run again on those constants, and every global relation is kept (it
    holds on the domain too): the global pass runs every algorithm as it does without a domain, so each
    node's domain bound is at most its global one. ``domain_only=True`` skips the global runs of the
    domain-aware algorithms (they run on the domain only): faster when the caller takes the minimum with a
    global value itself (as :mod:`lipgraph.certify` does), but a node's domain bound may then exceed its
    global one, where the domain leaves most neurons unstable and the domain run has the smaller budget.
    ``Report.upper`` is then the domain bound, the global ones stay in ``Report.bounds``, and the lower
    bound is attained inside the domain. A list of domains (e.g. balls around a batch of points,
    :meth:`Ball.batch`) gives a list of reports sharing the trace and the global pass.
    """
    names = _method_names(method)
    domains = _as_domains(domain)
    check_constants(constants)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LipgraphError("--device cuda was given but torch.cuda.is_available() is False on this machine")
    seconds: dict[str, float] = {}
    modes = training_modes(model)
    model, example_input = _widened(model, example_input)

    t0 = time.perf_counter()
    if progress:
        progress("trace", 0, 1)
    g = trace(model, example_input, leaves=_leaf_keys(constants) if isinstance(model, nn.Module) else ())
    seconds["trace"] = time.perf_counter() - t0
    if progress:
        progress("trace", 1, 1)
    if not isinstance(model, nn.Module) and "example_inputs" in g.graph and not _all_tensors(example_input):
        example_input = g.graph["example_inputs"]  # an ONNX file given shapes or nothing: the inputs it was read on
    inputs_shapes = [ir.node(g, n).out_shape for n in g.graph["inputs"]]
    unmatched = unmatched_constants(g, constants)
    if unmatched:
        raise LipgraphError(f"constants key {unmatched[0]!r} matches no node, module path or module class of "
                            f"{g.graph['name']} (keys are module paths like 'layer1.0', class names like "
                            "'Conv2d' or node names from the report)")

    ctx = Settings(device=dev, power_iterations=power_iterations, seed=seed)
    ctx.extra.update(work_budgets(method, effort))
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
    global_names = list(names)
    cum = combine(g, local)  # AutoLip alone: every node's bound without relations
    blocker = unbounded_by(g, local, cum)
    skipped: dict[str, BoundResult] = {}
    if blocker is not None:  # no relation can bound the output: the refinements would only cost time
        why = (f"skipped: node {blocker!r} has no finite constant and lies on a path from the input to the "
               "output, so no relation can bound the output")
        auto_out = cum[out]  # what every skipped algorithm would have returned at the output
        # on a domain the blocker may be finite: the algorithms that do not read the domain run here, once,
        # for the domain pass to use (the domain-aware ones run there)
        keep = [n for n in global_names if n == "autolip" or (domains is not None and not METHODS[n].uses_domain)]
        skipped = {f"autolip+{n}": BoundResult(auto_out.value, auto_out.certified, why, 0.0, {"skipped": blocker})
                   for n in global_names if n not in keep}
        global_names = keep
    elif domains is not None and domain_only:  # the caller asked for the domain runs alone
        global_names = [n for n in global_names if not METHODS[n].uses_domain]
    for k, name in enumerate(global_names):
        stage = f"bounds {k + 1}/{len(global_names)} ({name})"
        if progress:
            progress(stage, 0, 1)
            # an algorithm with parts of its own (SeqLip's segments) reports them under its stage's name
            ctx.extra["progress"] = lambda d, t, _stage=stage: progress(_stage, d, t)
        t0 = time.perf_counter()
        res = METHODS[name].runner()(g, local, ctx)
        ctx.extra.pop("progress", None)
        if progress:
            progress(stage, 1, 1)
        results[name] = res
        if name == "seqlip":
            segments = res.records
        cum_alone = combine(g, local, res.relations)
        key = "autolip" if name == "autolip" else f"autolip+{name}"
        seconds[name] = time.perf_counter() - t0
        bounds[key] = BoundResult(cum_alone[out].value, cum_alone[out].certified, METHODS[name].doc,
                                  seconds["local"] + seconds[name], dict(res.details))
    bounds.update(skipped)
    refining = [n for n in global_names if n != "autolip"]
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
    modules = module_constants(g, local, relations)
    base = dict(model=model, example_input=example_input, g=g, names=names, ctx=ctx, dev=dev, local=local,
                local_full=local_full, results=results, relations=relations, bounds=bounds, cum=cum,
                cum_best=cum_best, modules=modules, segments=segments, seconds=seconds, lower=lower,
                lower_budget=lower_budget, seed=seed, modes=modes, inputs_shapes=inputs_shapes,
                progress=progress, float64={}, constants=constants)
    if domains is None:
        return _finish(base, None)
    return [_finish(base, d) for d in domains] if isinstance(domain, Sequence) else _finish(base, domains[0])


def work_budgets(method: str | Sequence[str], effort: float = 1.0) -> dict[str, float]:
    """The refinements' work budgets (``Settings.extra`` keys) for ``analyze(method=..., effort=...)``: the
    defaults times ``effort`` for ``"auto"``; none (``inf``) where the caller names the methods (they run
    whatever they cost) or ``effort`` is ``inf``."""
    if isinstance(effort, bool) or not isinstance(effort, (int, float)) or math.isnan(effort) or effort <= 0:
        raise LipgraphError(f"effort must be a positive number (1 is the default, inf lifts every budget), "
                            f"not {effort!r}")
    from .bounds.affine import AFFINE_WORK_BUDGET  # noqa: PLC0415 - the algorithms load when used
    from .bounds.chain_mats import CHAIN_FLOPS, CHAIN_WORK_BUDGET  # noqa: PLC0415
    from .bounds.seqlip import DENSE_WORK  # noqa: PLC0415

    defaults = {"chain_flops": CHAIN_FLOPS, "chain_work": CHAIN_WORK_BUDGET, "affine_work": AFFINE_WORK_BUDGET,
                "seqlip_work": DENSE_WORK}
    scale = math.inf if method != "auto" else float(effort)
    # inf lifts a budget outright (0 * inf would be NaN, which no cost passes)
    return {k: math.inf if math.isinf(scale) else v * scale for k, v in defaults.items()}


def unbounded_by(g: nx.DiGraph, local: Mapping[str, LocalConstant], cum: Mapping[str, Cumulative]) -> str | None:
    """A node that leaves the output unbounded whatever the bound algorithms find, or None.

    That is a node whose own constant is ``inf``, whose rule is neither affine nor an activation with a
    slope interval (so it is a member of no linear chain or affine region, and every relation that reaches
    past it has it, or a node after it, as an entry), whose AutoLip bound is ``inf`` (it depends on the input),
    and which the output reads (its AutoLip bound is ``inf`` too); ``cum``: AutoLip's bounds
    (``combine(g, local)``). The first such node in graph order."""
    out = g.graph["output"]
    if math.isfinite(cum[out].value):
        return None
    reaching = nx.ancestors(g, out)
    for n in ir.nodes(g):
        rule = RULES.get(n.op)
        if (n.name in reaching and math.isinf(local[n.name].value) and math.isinf(cum[n.name].value)
                and not (rule is not None and (rule.affine or rule.slope is not None))):
            return n.name
    return None


#: Floating dtypes whose models are analysed on a float64 copy: their arithmetic is too coarse for the
#: trace's reproduction check, the lower-bound search and its re-evaluation (CPU forward AD refuses them).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _widened(model: Any, example_input: Any) -> tuple[Any, Any]:
    """An fp16/bf16 ``nn.Module`` (any parameter, buffer or input in :data:`LOW_PRECISION`) as a float64 copy
    with float64 inputs. Every low-precision weight is exact in float64, so the constants are those of the
    model's weights; the copy's function is the exact-arithmetic one (low-precision rounding itself is a
    step function, not Lipschitz). The caller's model is not touched. Anything else is returned as it is."""
    if not isinstance(model, nn.Module):
        return model, example_input
    xs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    tensors = [*model.parameters(), *model.buffers(), *(x for x in xs if isinstance(x, torch.Tensor))]
    if not any(t.dtype in LOW_PRECISION for t in tensors):
        return model, example_input
    import copy  # noqa: PLC0415

    def wide(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    widened = copy.deepcopy(model).double()
    return widened, (type(example_input)(wide(x) for x in example_input)
                     if isinstance(example_input, (tuple, list)) else wide(example_input))


def _attained(model: Any, g: nx.DiGraph, xs: tuple[torch.Tensor, ...], domain: Domain | None,
              plan: dict[str, int], seed: int, patterns: PatternTargets | None = None,
              copies: dict[str, Any] | None = None, pattern_budget: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Any:
    """The lower-bound search on the model (its float64 copy re-evaluates the witness), else on the IR (float32
    search, float64 IR re-evaluation): the IR path serves ONNX files and models whose ops lack forward-mode AD
    (PyTorch's fused CPU attention), since the IR runs attention as matmuls and softmax. Where neither has
    forward-mode AD (attention inside an opaque node), the same tries with central differences
    (``lower_bound(finite_differences=True)``); where nothing can be differentiated (an ONNX op only the reference
    evaluator runs), :func:`~lipgraph.bounds.lower.secant_search` on the IR. None if all fail.
    ``copies`` keeps the float64 model and IR made for one search, so the reports of a list of domains make
    them once."""
    copies = {} if copies is None else copies

    def run_ir(*zs: torch.Tensor) -> Any:
        return execute(g, *zs)

    def run_ir64(*zs: torch.Tensor) -> Any:
        if "ir" not in copies:
            copies["ir"] = ir.to_float64(g)
        return execute(copies["ir"], *(z.double() for z in zs))

    tries: list[tuple[Any, Any]] = []
    if isinstance(model, nn.Module):
        model.eval()  # restored by the caller: analyze leaves the model as it was
        if "model" not in copies:
            import copy  # noqa: PLC0415

            try:
                copies["model"] = copy.deepcopy(model).double()
            except Exception:  # noqa: BLE001 - a model that cannot be copied: the IR's float64 copy re-evaluates
                copies["model"] = None
        m64 = copies["model"]
        tries.append((model, run_ir64 if m64 is None else (lambda *zs, _m=m64: _m(*(z.double() for z in zs)))))
    tries += [(run_ir, run_ir64), (run_ir, None)]
    kw: dict[str, Any] = ({"domain": domain, "patterns": patterns, "pattern_budget": pattern_budget}
                          if domain is not None else {})
    for fd in (False, True):  # exact forward-mode AD on the model or the IR first, central differences last
        for fn, f64 in tries:
            torch.manual_seed(seed)
            try:
                return lower_bound(fn, xs, **plan, f64=f64, seed=seed, finite_differences=fd, progress=progress,
                                   **kw)
            except (NotImplementedError, RuntimeError, TypeError, LipgraphError):  # no AD, a dtype refused: next
                continue
    # no derivative at all (an ONNX op only the reference evaluator runs): secants, searched without gradients
    steps = max(10, plan.get("secant_steps", 0) + 4 * plan.get("ascent_steps", 0))
    for fn, f64 in ((run_ir, run_ir64), (run_ir, None)):
        try:
            return secant_search(fn, xs, restarts=max(1, plan.get("restarts", 1)), steps=steps, seed=seed,
                                 f64=f64, domain=domain)
        except (NotImplementedError, RuntimeError, TypeError, LipgraphError):
            continue
    return None


def _as_domains(domain: Any) -> list[Domain] | None:
    if domain is None:
        return None
    items = list(domain) if isinstance(domain, Sequence) else [domain]
    for d in items:
        if not isinstance(d, Domain):
            raise LipgraphError(f"domain must be a lipgraph.domains.Box or Ball (or a list of them), not "
                                f"{type(d).__name__}")
    return items


def _finish(base: dict[str, Any], domain: Domain | None) -> Report:
    """The report of one analysis: the global pass in ``base`` and, with a ``domain``, the domain pass."""
    g, model, example_input = base["g"], base["model"], base["example_input"]
    dev, seed, segments = base["dev"], base["seed"], base["segments"]
    seconds = dict(base["seconds"])
    bounds = dict(base["bounds"])
    local_full, cum, cum_best = base["local_full"], base["cum"], base["cum_best"]
    modules, inputs_shapes = base["modules"], base["inputs_shapes"]
    dom = None
    progress = base["progress"]
    if domain is not None:
        if progress:
            progress("domain", 0, 1)
        dom = _domain_pass(base, domain, seconds, bounds)
        if progress:
            progress("domain", 1, 1)
        modules = module_constants(g, dom["local"], dom["relations"])

    lower_value = None
    discrete = example_input is not None and any(
        isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()) for x in _as_inputs(example_input)
    )
    lower, lower_budget = base["lower"], base["lower_budget"]
    if lower and not discrete:  # no Jacobian along integer inputs (token ids, indices): no lower-bound search
        if progress:
            progress("lower bound", 0, 1)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        xs = _as_inputs(example_input) if example_input is not None else tuple(
            torch.randn(s, generator=gen) for s in inputs_shapes
        )
        rng_devices = [dev.index or 0] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):  # the search's own draws, seeded, then restored
                work = pass_work(ir.model_macs(g), g.number_of_nodes())
                plan = search_plan(work, lower_budget)
                patterns = dom["patterns"] if dom is not None else None
                lb = _attained(model, g, xs, domain, plan, seed, patterns, base["float64"],
                               pattern_passes(work, lower_budget),
                               (lambda d, t: progress("lower bound", d, t)) if progress else None)
        finally:
            restore_training_modes(base["modes"])
        lower_value = lb.value if lb is not None else None
        seconds["lower"] = time.perf_counter() - t0
        if progress:
            progress("lower bound", 1, 1)

    nodes = []
    for n in ir.nodes(g):
        lc, secs = local_full[n.name]
        nodes.append(_node_report(n, lc, cum[n.name], cum_best[n.name], secs, dom))
    report = Report(
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
        domain=None if domain is None else {**domain.to_dict(), "description": domain.describe(),
                                            "ranges_missing": dom["missing"]},
    )
    check_consistent(report, base["constants"])
    return report


#: Relative slack of :func:`check_consistent`: the attained value is a float64 re-evaluation (a Jacobian norm
#: by Lanczos or a secant quotient), exact to a few units of 1e-16 relative; an exact bound (a lone linear
#: layer) may equal it to rounding. Far below every certified margin (ROUNDING_MARGIN is 1e-6 and up).
CONSISTENCY_SLACK = 1e-9


def check_consistent(report: Report, constants: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`~lipgraph.errors.InconsistentBoundsError` when the attained ``report.lower`` exceeds a
    certified ``report.upper`` (beyond :data:`CONSISTENCY_SLACK`): one of the two is wrong, and a report that
    contradicts itself must not reach an audit. A user's ``UserConstant(certified=True)`` or a node of an op
    registered with :func:`register_op` is named as the likely cause when there is one; otherwise it is a defect
    of lipgraph."""
    lo, up = report.lower, report.upper
    if lo is None or not report.certified or lo <= up * (1 + CONSISTENCY_SLACK):
        return
    user = sorted(k for k, v in (constants or {}).items() if isinstance(v, UserConstant) and v.certified)
    user += sorted(n.name for n in report.nodes if n.method == "user-rule")
    cause = (f"the constants given as certified or by a registered op ({', '.join(map(repr, user))}) are the "
             "likely cause: check them" if user else
             "this is a defect of lipgraph: please report the model and these numbers")
    raise InconsistentBoundsError(f"the attained value {lo:.9g} exceeds the certified upper bound {up:.9g} of "
                                  f"{report.model}: {cause}")


def _domain_relations(base: dict[str, Any], dc: Any, rr: Any, domain: Domain, example: torch.Tensor,
                      seconds: dict[str, float], once: dict[str, Any] | None = None,
                      cache: dict[str, Any] | None = None,
                      ) -> tuple[list[Relation], list[dict[str, Any]], list[str]]:
    """The global relations and those of every domain-aware algorithm run on the domain's constants ``dc`` and
    ranges ``rr`` (each algorithm's seconds added to ``seconds``), SeqLip's records, and what failed. ``once``
    keeps the results of the algorithms that do not read the constants (``Method.reads_constants``) between
    the calls of one domain pass; ``cache`` (``Settings.extra["domain_cache"]``) is where an algorithm keeps
    work that does not depend on the constants between them (the Taylor models)."""
    g, ctx = base["g"], base["ctx"]
    dctx = dataclasses.replace(ctx, neuron_slopes=dc.slopes, extra={
        **ctx.extra, "ranges": rr, "domain": (domain, example), "domain_cache": {} if cache is None else cache})
    relations = list(base["relations"])
    seq_records: list[dict[str, Any]] = []
    failures: list[str] = []
    for name in base["names"]:
        if not METHODS[name].uses_domain:
            continue
        if once is not None and name in once:
            relations.extend(once[name].relations)
            continue
        t0 = time.perf_counter()
        try:
            res = METHODS[name].runner()(g, dc.local, dctx)
        except Exception as exc:  # noqa: BLE001 - a refinement that fails adds nothing; the bound stands, said why
            failures.append(f"{name} on the domain failed ({type(exc).__name__}: {str(exc)[:200]}); not used")
            seconds[f"domain:{name}"] = seconds.get(f"domain:{name}", 0.0) + time.perf_counter() - t0
            continue
        relations.extend(res.relations)
        if once is not None and not METHODS[name].reads_constants:
            once[name] = res
        if name == "seqlip":
            seq_records = list(res.records)
        seconds[f"domain:{name}"] = seconds.get(f"domain:{name}", 0.0) + time.perf_counter() - t0
    return relations, seq_records, failures


#: Rounds of mean-value ranges in a domain pass (:mod:`lipgraph.bounds.mean_value`): each bounds every node's
#: spread by what the domain pass has proven so far (its constants and the algorithms' relations), computes the
#: ranges and constants again and, where a constant moved, reruns the domain-aware algorithms.
MEAN_VALUE_ROUNDS = 2


def _domain_pass(base: dict[str, Any], domain: Domain, seconds: dict[str, float],
                 bounds: dict[str, BoundResult]) -> dict[str, Any]:
    """Ranges over ``domain``, the nodes' constants on it, the domain-aware algorithms rerun on them, and the
    combination with every global relation. Adds ``domain:*`` entries to ``bounds``."""
    g, ctx, local = base["g"], base["ctx"], base["local"]
    example = _as_inputs(base["example_input"]) if base["example_input"] is not None else None
    if example is None or len(example) != 1:
        raise LipgraphError("an input domain needs a single-input model and its example input")
    out = g.graph["output"]
    t0 = time.perf_counter()
    try:
        rr = propagate(g, domain, example[0])
    except ValueError as exc:  # a domain that does not fit the input (shape of the center)
        raise LipgraphError(f"domain: {exc}") from None
    tight = tightened_ranges(g, domain, example[0], rr)  # backward linear bounds on the pre-activations
    if tight:
        rr = propagate(g, domain, example[0], overrides=tight)
    dc = domain_constants(g, local, rr, ctx)
    seconds["domain:ranges"] = time.perf_counter() - t0
    once: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    relations, seq_records, failures = _domain_relations(base, dc, rr, domain, example[0], seconds, once, cache)
    radius = l2_radius(domain, example[0])
    if radius is not None and math.isfinite(radius):
        t0 = time.perf_counter()
        at_center = center_ranges(g, domain, example[0])
        seconds["domain:ranges"] += time.perf_counter() - t0
        for _ in range(MEAN_VALUE_ROUNDS):  # what is proven on the domain bounds every node's spread (mean value)
            t0 = time.perf_counter()
            spread = spreads(at_center, radius, combine(g, dc.local, relations))
            mv = mean_value_ranges(spread)
            rr_next = rr
            if tightens(rr.ranges, mv):
                tight = intersect(tight, mv)
                rr_next = propagate(g, domain, example[0], overrides=tight)
            dc_next = domain_constants(g, local, rr_next, dataclasses.replace(ctx, extra={**ctx.extra,
                                                                                          "spread": spread}))
            seconds["domain:ranges"] += time.perf_counter() - t0
            if all(dc_next.local[n].partials == dc.local[n].partials for n in dc.local):
                break  # no constant moved: the algorithms would find the same
            rr, dc = rr_next, dc_next
            relations, seq_records, failures = _domain_relations(base, dc, rr, domain, example[0], seconds, once,
                                                                 cache)
    t0 = time.perf_counter()
    cum_auto = combine(g, dc.local)
    cum_best = combine(g, dc.local, relations)
    seconds["domain:combine"] = time.perf_counter() - t0
    total = sum(v for k, v in seconds.items() if k.startswith("domain:"))
    bounds["domain:autolip"] = BoundResult(
        cum_auto[out].value, cum_auto[out].certified,
        f"AutoLip with every node's constant on the domain ({domain.describe()})", seconds["domain:ranges"],
        {"unstable": dict(dc.unstable)})
    bounds["domain:best"] = BoundResult(
        cum_best[out].value, cum_best[out].certified,
        "the domain's constants with every algorithm's relations (domain-aware ones rerun on the domain)", total)
    missing = sorted({r for r in rr.reasons.values()})[:5] + failures
    return {"ranges": rr, "constants": dc, "local": dc.local, "cum": cum_best, "relations": relations,
            "missing": missing, "patterns": pattern_targets(g, dc.slopes, rr, seq_records)}


#: Ops whose derivative is at the top of its interval exactly for positive inputs (piecewise linear, one kink
#: at 0): the pattern search steers their unstable neurons by the sign of the pre-activation.
_SIGN_OPS = ("relu", "leaky_relu")
#: The pattern search's margin past the kink, as a share of the smaller side of the pre-activation range.
MARGIN = 0.05


def _sign_nodes(g: nx.DiGraph, slopes: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[ir.IRNode]:
    """The ReLU-type activations (slope 1 for ``z > 0``, a smaller one for ``z < 0``) with unstable neurons."""
    out = []
    for n in ir.nodes(g):
        if n.op not in _SIGN_OPS or n.name not in slopes:
            continue
        if n.op == "leaky_relu" and float(n.attrs.get("negative_slope", 0.01)) > 1.0:
            continue
        lo, hi = slopes[n.name]
        if bool((hi > lo).any()):
            out.append(n)
    return out


def pattern_targets(g: nx.DiGraph, slopes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rr: Any,
                    records: Sequence[Mapping[str, Any]]) -> PatternTargets | None:
    """Targets of the lower bound's pattern search on a domain (see :class:`PatternTargets`): the unstable
    neurons of the ReLU-type activations, their pre-activations read from ``execute(g, x, keep=True)``,
    and sign vectors to reach: the domain SeqLip's maximising pattern (every segment's inner maximum over a
    single activation; neurons of activations without one stay free), then every unstable neuron active.
    Margin: ``MARGIN`` times the smaller side of each neuron's pre-activation range on the domain
    (``min(hi, -lo)``, so each neuron alone can reach either sign with it). None without such neurons."""
    nodes = _sign_nodes(g, slopes)
    if not nodes:
        return None
    idx = {n.name: torch.nonzero((slopes[n.name][1] > slopes[n.name][0]).reshape(-1)).reshape(-1) for n in nodes}
    shape = tuple(g.nodes[g.graph["inputs"][0]]["ir"].out_shape)
    margins = []
    for n in nodes:
        r = rr.ranges.get(n.inputs[0])
        if isinstance(r, Range):  # the smaller side of the kink: a margin every neuron can reach alone
            side = torch.minimum(r.hi, -r.lo).reshape(-1)[idx[n.name]].clamp_min(0.0)
        else:
            side = torch.zeros(len(idx[n.name]))
        margins.append(MARGIN * side.to(torch.float64))
    hinted: dict[str, torch.Tensor] = {}
    for rec in records:
        for inner in rec.get("inner", ()):
            acts, at_hi = inner.get("activations") or [], inner.get("at_hi")
            if len(acts) == 1 and acts[0] in idx and at_hi is not None:
                lo, _ = slopes[acts[0]]
                s = -torch.ones(lo.numel(), dtype=torch.float64)
                s[torch.tensor(at_hi, dtype=torch.long)] = 1.0
                hinted[acts[0]] = s[idx[acts[0]]]
    signs = []
    if hinted:
        signs.append(torch.cat([hinted.get(n.name, torch.zeros(len(idx[n.name]), dtype=torch.float64))
                                for n in nodes]))
    signs.append(torch.ones(sum(len(v) for v in idx.values()), dtype=torch.float64))

    def preact(x: torch.Tensor) -> torch.Tensor:
        _, values = execute(g, x.reshape(shape), keep=True)
        return torch.cat([values[n.inputs[0]].reshape(-1)[idx[n.name]] for n in nodes])

    return PatternTargets(preact, signs, torch.cat(margins))


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


def _node_report(n: ir.IRNode, lc: LocalConstant, c: Cumulative, best: Cumulative, secs: float,
                 dom: dict[str, Any] | None = None) -> NodeReport:
    extra: dict[str, Any] = {}
    if dom is not None:
        r = dom["ranges"].ranges.get(n.name)
        dl = dom["local"][n.name]
        dcum = dom["cum"][n.name]
        extra = {
            "domain_local": dl.value, "domain_bound": dcum.value, "domain_certified": dcum.certified,
            "domain_via": dcum.via, "unstable": dom["constants"].unstable.get(n.name),
            "range": [r.summary()["lo"], r.summary()["hi"]] if isinstance(r, Range) else None,
            "domain_note": dom["constants"].sources.get(n.name) or dom["ranges"].reasons.get(n.name),
        }
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
        **extra,
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
