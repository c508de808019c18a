"""Empirical lower bound: the largest Jacobian spectral norm found by search.

For a map ``f`` differentiable at ``x``, ``||J_f(x)||_2 <= L(f)``, so any value
found is a valid lower bound (an *attained* value, not a bound from above).
The search draws random points around the example input, estimates
``||J(x)||_2`` by power iteration on ``J^T J`` (one jvp and one vjp per step),
and runs gradient ascent on ``x`` for ``||J(x) v||`` (useful for smooth
activations). Then, from each point, *secant ascent*: Adam on ``(x, d)`` for
``||f(x + d) - f(x)|| / ||d||``. Every secant ratio is a lower bound on ``L`` by
the definition of a Lipschitz constant, with no differentiability needed, and
unlike ``||J(x) v||`` its gradient does not vanish on ReLU networks (moving
``x`` and ``d`` across activation boundaries changes it).

With a ``domain`` (a convex :class:`lipgraph.domains.Domain`) every point evaluated lies in the
domain, so the value is a lower bound of the Lipschitz constant *on the domain*: a secant between two
domain points by definition, and ``||J(x)||`` at a domain point where ``f`` is differentiable when the
domain is full-dimensional (see :func:`lower_bound`).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import jvp, vjp

from ..domains import Ball, Domain

Projection = Callable[[torch.Tensor], torch.Tensor]

#: The default search's work per restart: ``(ascent_steps + 1)`` Jacobian evaluations of ``power_iters``
#: jvp/vjp pairs and a gradient, plus ``secant_steps`` forward/backward pairs (model passes).
DEFAULT_SEARCH = {"restarts": 8, "ascent_steps": 10, "power_iters": 20, "secant_steps": 30}
#: The smallest search a scaled plan keeps (one restart of 2 Jacobian evaluations and 5 secant steps, 34 passes).
#: Measured (idle, 2 cores, seed 0, 64x64): on vgg11 and resnet50 the old floor (3 evaluations, 10 secant steps,
#: 56 passes) found 0.098928 in 5.1 s and 13.043 in 1.9 s; this one the same values in 2.9 s and 1.3 s.
SMALLEST_SEARCH = {"restarts": 1, "ascent_steps": 1, "power_iters": 5, "secant_steps": 5}
#: Models on which even :data:`SMALLEST_SEARCH` costs more than ``MINIMAL_RATIO`` times :data:`SEARCH_WORK` get
#: this one: one power step at one point (a jvp, a vjp, a jvp: 4 passes). At 224x224 the smallest search was 56
#: passes of 0.84 s on vit_b_16 (47 of its 52 s, idle 2-core machine) and of 0.55 s on swin_t (31 of 32 s), whose
#: bounds are ``inf``: the attained value is all such a run reports, and one Jacobian estimate is an attained value
#: too. Three power steps (8 passes) took 8.5 s on vit_b_16 (2.598), one 6.7 s (1.948); maxvit_t 10.8 and 7.6 s.
MINIMAL_SEARCH = {"restarts": 1, "ascent_steps": 0, "power_iters": 1, "secant_steps": 0}
#: 1: the smallest search runs only where it fits :data:`SEARCH_WORK`. (It was 5, a smallest search of up to
#: 7.5e10 multiply-adds: vgg11 and wide_resnet50_2 at 64x64, 7.4e8 and 9.7e8 a pass, ran its 34 passes, 4.6 and
#: 4.2 s of their 16.9 and 17.0 s, idle 2-core machine; one power step found 0.0844 and 8.81 where the 34 passes
#: found 0.0989 and 8.45, against certified bounds of 7366 and 1.9e21. At 10, swin_t at 224 (3.0e9 a pass) ran
#: the smallest search's 34 passes, 15.9 s instead of 2.8 s.)
MINIMAL_RATIO = 1.0
#: Work the default search may spend, in multiply-adds summed over model passes (``passes x model_macs``):
#: AlexNet at 64x64 (9.8e7 multiply-adds a pass) ran the full 4176-pass search in 158 s on one loaded core,
#: 38 ms a pass; 1.5e10 is about 160 of its passes, ~6 s. The MNIST and digits networks (<= 1e6 multiply-adds)
#: keep the full search.
SEARCH_WORK = 1.5e10
#: Work charged per graph node per model pass, in multiply-add equivalents: a pass also pays each op's
#: fixed cost (dispatch, autograd bookkeeping), which dominates on small, deep models. Measured on an idle
#: 2-core machine (2 threads) at 64x64: a search pass took 5.8 ms on mobilenet_v3_small (159 nodes,
#: 6.8e6 multiply-adds) and 4.5 ms on squeezenet1_0 (68 nodes, 5.5e7); solving for both gives about 35 us a
#: node and 3.9e-11 s a multiply-add, ~9e5 multiply-adds a node. 2e5 is charged, well below it, so networks
#: of a few layers (the MNIST and digits MLPs: <= 10 nodes) keep the full search.
NODE_PASS_WORK = 2e5


def search_passes(plan: dict[str, int]) -> int:
    """Model passes (forward or backward) of a search plan."""
    per = (plan["ascent_steps"] + 1) * (2 * plan["power_iters"] + 2) + 2 * plan["secant_steps"]
    return plan["restarts"] * per


def pass_work(macs: int, nodes: int) -> float:
    """The work of one model pass in multiply-add equivalents: ``macs + NODE_PASS_WORK * nodes``."""
    return float(macs) + NODE_PASS_WORK * nodes


#: The pattern search on a domain (steering toward sign patterns, then the one-flip hill climb) may spend
#: :data:`SEARCH_WORK` in model passes too, at least this many (:func:`pattern_passes`). Unbudgeted, the climb tried
#: every unstable neuron for ``pattern_steps // 4`` passes each: PP-OCR's text-direction classifier (a trained
#: MobileNetV3 at 3x48x192, thousands of unstable ReLUs on a ball of one grey level) ran past 10 minutes, where
#: the LipSDP MNIST network's climb (35-50 unstable neurons) takes about 2000 of its 7500 allowed passes.
MIN_PATTERN_PASSES = 200


def pattern_passes(macs: float, restarts: int | None = None) -> int | None:
    """Model passes (forward or backward) the pattern search may spend: ``SEARCH_WORK / macs`` (``macs`` from
    :func:`pass_work`), at least :data:`MIN_PATTERN_PASSES`; None (no limit) when the caller set ``restarts``, as
    :func:`search_plan` then runs the default search whatever it costs."""
    if restarts is not None:
        return None
    return max(MIN_PATTERN_PASSES, int(SEARCH_WORK / max(float(macs), 1.0)))


def search_plan(macs: float, restarts: int | None = None) -> dict[str, int]:
    """The lower-bound search's sizes for a model of ``macs`` multiply-adds a pass (:func:`pass_work`).

    ``restarts`` given: the default search with that many restarts, whatever it costs (the caller asked).
    Otherwise the default search when it fits :data:`SEARCH_WORK`; else fewer restarts, then shorter
    restarts (steps scaled by the same factor), never below :data:`SMALLEST_SEARCH`, unless even that costs more
    than ``MINIMAL_RATIO`` times the budget: then :data:`MINIMAL_SEARCH`. A function of the model's shape only
    (deterministic, not timed)."""
    if restarts is not None:
        return {**DEFAULT_SEARCH, "restarts": max(1, int(restarts))}
    plan = dict(DEFAULT_SEARCH)
    allowed = SEARCH_WORK / max(float(macs), 1.0)
    one = search_passes({**plan, "restarts": 1})
    if search_passes(plan) <= allowed:
        return plan
    if one <= allowed:
        return {**plan, "restarts": max(1, int(allowed // one))}
    if search_passes(SMALLEST_SEARCH) > MINIMAL_RATIO * allowed:
        return dict(MINIMAL_SEARCH)
    f = allowed / one
    return {"restarts": 1, **{k: max(SMALLEST_SEARCH[k], int(round(v * f))) for k, v in plan.items()
                              if k != "restarts"}}


@dataclass
class LowerBound:
    value: float
    seconds: float
    points: int
    method: str = "jacobian-ascent"
    witness: tuple[Any, ...] | None = None  # ("jacobian", x, unit v) or ("secant", x, y), flat, as evaluated


@dataclass
class PatternTargets:
    """Activation patterns to reach inside a domain (the pattern search of :func:`lower_bound`).

    ``preact``: flat input -> flat pre-activations ``z`` of the targeted (unstable) neurons of
    ReLU-type activations; ``signs``: target sign vectors (``+1``: ``z_j > 0``, ``-1``: ``z_j < 0``,
    ``0``: free), one entry per targeted neuron, tried in order; ``margin``: how far past the kink a
    neuron is pushed (a number or one per neuron, in the pre-activation's units)."""

    preact: Callable[[torch.Tensor], torch.Tensor]
    signs: list[torch.Tensor]
    margin: torch.Tensor | float = 0.0


def _flat_fn(f: Callable[..., object], shapes: Sequence[tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]

    def g(z: torch.Tensor) -> torch.Tensor:
        parts = torch.split(z, sizes)
        out = f(*[p.reshape(s) for p, s in zip(parts, shapes, strict=True)])
        leaves = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]  # dicts, nested tuples
        if not leaves:
            raise ValueError("the model's output holds no tensor")
        return torch.cat([o.reshape(-1) for o in leaves])

    return g


#: Relative step of the central differences that replace forward-mode AD where an op has none (PyTorch's
#: fused CPU attention): ``h = FD_STEP (1 + max |z|)``. Only the search steers by them; a value reported from
#: them is a secant of that length evaluated again in float64 (a lower bound by definition).
FD_STEP = 1e-3


#: Set by :func:`lower_bound` (``finite_differences=True``): forward-mode AD may fall back to central differences.
_FD_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("lipgraph_fd_allowed", default=False)


def _fd_step(z: torch.Tensor) -> float:
    return FD_STEP * (1.0 + float(z.detach().abs().max())) if z.numel() else FD_STEP


def _jvp(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J_g(z) v`` by forward-mode AD, or by central differences where an op has no forward derivative
    (differentiable in ``z`` by reverse mode either way, for the ascent)."""
    try:
        return jvp(g, (z,), (v,))[1]
    except (NotImplementedError, RuntimeError):
        if not _FD_ALLOWED.get():
            raise
        h = _fd_step(z)
        return (g(z + h * v) - g(z - h * v)) / (2 * h)


def _jv_norm_attained(g: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, u: torch.Tensor,
                      proj: Projection | None = None) -> float:
    """``||J(a) u||`` for a unit ``u`` by forward-mode AD; where an op has none, the secant ratio between ``a``
    and ``a + h u`` (both projected into the domain if ``proj``), a lower bound by definition."""
    try:
        return float(jvp(g, (a,), (u,))[1].detach().norm())
    except (NotImplementedError, RuntimeError):
        if not _FD_ALLOWED.get():
            raise
        b = a + _fd_step(a) * u
        if proj is not None:
            b = proj(b)
        with torch.no_grad():
            dn = (b - a).norm()
            return float((g(b) - g(a)).norm() / dn) if float(dn) > 0 else 0.0


def _set_grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """``leaf.grad = d loss / d leaf`` for the search's own variables only: ``loss.backward()`` would also
    accumulate into the model's parameters, changing the user's model (its ``.grad``) and, on AlexNet or
    VGG, spending most of the search on weight gradients (0.5 s a step for AlexNet's 61M parameters)."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for leaf, grad in zip(leaves, grads, strict=True):
        leaf.grad = torch.zeros_like(leaf) if grad is None else grad


def jacobian_norm(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, iters: int = 30,
                  v: torch.Tensor | None = None, measure: bool = True) -> tuple[float, torch.Tensor]:
    """||J_g(z)||_2 by power iteration (returns the attained ||J v|| and the last v). ``measure=False``: the
    last ``||J v||`` is not computed (returned as ``nan``), for a caller that evaluates ``v`` itself."""
    if v is None:
        v = torch.randn_like(z)
    # every step's vector is detached: functorch's transforms record their own graphs, and a vector that carries
    # the previous step's history makes each step's graph hold all the earlier ones (swin_t at 224: 14 GB in 27 s)
    z = z.detach()
    v = (v / v.norm()).detach()
    pull = None  # the reverse pass at z, made once (z does not move here): one forward pass, not one per step
    for _ in range(iters):
        jv = _jvp(g, z, v)
        if pull is None:
            _, pull = vjp(g, z)
        (w,) = pull(jv.detach())
        wn = w.norm()
        if wn == 0:
            return 0.0, v
        v = (w / wn).detach()
    if not measure:
        return math.nan, v
    return _jv_norm_attained(g, z, v), v


def _keep_in(project: Projection, x: torch.Tensor, d: torch.Tensor) -> None:
    """In place: ``x <- project(x)``, ``d <- project(x + d) - x`` (both ends of the secant in the domain)."""
    with torch.no_grad():
        x.copy_(project(x))
        d.copy_(project(x + d) - x)


def secant_ascent(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor, length: float,
                  steps: int, witness: list | None = None, project: Projection | None = None) -> float:
    """Largest ``||g(x + d) - g(x)|| / ||d||`` found by Adam from ``x = z``, ``d = length * v / ||v||``.
    ``witness``, if given, receives ``(x, d)`` of the best ratio. ``project``, if given, maps a point into
    the domain: after every step ``x`` is projected and ``d`` becomes ``project(x + d) - x``, so both
    ends stay in the domain (a ``d`` of 0 ends the search)."""
    x = z.detach().clone().requires_grad_(True)
    d = (length * v / v.norm()).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=0.05 * length)
    best = 0.0
    for _ in range(steps):
        if project is not None:
            _keep_in(project, x, d)
        dn = d.norm()
        if float(dn.detach()) == 0.0:
            break
        ratio = (g(x + d) - g(x)).norm() / dn
        if float(ratio.detach()) > best and witness is not None:
            witness[:] = [x.detach().clone(), d.detach().clone()]
        best = max(best, float(ratio.detach()))
        if not ratio.requires_grad:
            break
        _set_grads(-ratio, [x, d])
        opt.step()
    return best


def lower_bound(
    f: Callable[..., object],
    example_inputs: Sequence[torch.Tensor],
    *,
    restarts: int = 8,
    ascent_steps: int = 10,
    power_iters: int = 20,
    radius: float = 1.0,
    secant_steps: int = 30,
    seed: int = 0,
    f64: Callable[..., object] | None = None,
    domain: Domain | None = None,
    patterns: PatternTargets | None = None,
    pattern_steps: int = 100,
    climb_rounds: int = 2,
    pattern_budget: int | None = None,
    finite_differences: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LowerBound:
    """Largest ``||J_f(x)||_2`` found around ``example_inputs`` (an attained value: a lower bound).

    ``progress(done, restarts)`` is called as each restart begins and once at the end.

    ``finite_differences``: where an op has no forward-mode derivative (PyTorch's fused CPU attention), the
    search steers by central differences of step ``FD_STEP (1 + max |z|)`` and reverse-mode gradients, and a
    point's value is the secant ratio over that step, evaluated again in float64 (a lower bound by definition);
    without it such a model raises, for the caller to try another evaluation (lipgraph's IR writes attention
    out in ops that have one).

    ``f64``: the same function in float64 (e.g. a float64 copy of the model). The search runs on ``f``;
    the value reported is the best witness (a point and a unit direction, or a secant pair) evaluated
    again on ``f64``, so float32 rounding (``0.5 x + 1e5``: a secant of 0.63) cannot exceed the true
    constant.

    ``domain`` (single-input models): a lower bound of the constant *on the domain* ``D``. Every point
    evaluated is projected into ``D``: restart 0 starts at ``domain.center(x)``, the others at
    ``domain.sample`` points (seeded), the Jacobian ascent projects after every step (once it stalls,
    as on ReLU networks where its gradient is 0, its remaining steps refine the power iteration at that
    point), a secant keeps
    ``x`` and ``x + d`` in ``D`` (``x <- P(x)``, ``d <- P(x + d) - x``), and the float64 witness is
    projected again in float64 before it is evaluated (a secant's ``d`` re-derived from its projected
    ends). The step sizes and the secant length come from the domain's size (its diameter, bounded by
    the enclosure's), not from the data. Why the values are lower bounds of ``L_D``: a secant between
    two points of ``D`` by definition. ``||J(x)||`` at a point ``x`` of ``D`` where ``f`` is
    differentiable, interior or on the boundary, when ``D`` is convex with nonempty interior: for any
    direction ``w``, ``D`` contains segments ``[z, z + t w]`` at distance ``O(t)`` from ``x`` (shrink an
    interior ball toward ``x``; convexity keeps it in ``D``), and ``f(z + t w) - f(z) = t J w + o(t)``
    by differentiability at ``x``, so ``||J w|| <= L_D ||w||``: the one-sided picture at a boundary
    point is enough because ``D`` is convex and full-dimensional. For a degenerate domain (a ball of
    radius 0, a box flat in some coordinate) only secants count, and a single point gives 0.
    On ReLU networks the Jacobian ascent has zero gradient; random corners of the enclosure evaluated
    for ``||J||`` at each restart were tried and found nothing more on the LipSDP MNIST network (l_inf
    ball 0.02 in [0, 1]: 16.47/16.06/16.06 with 0, 8 or 32 corners per restart), so there are none.

    ``patterns`` (with a ``domain`` only; ignored without one): the *pattern search* for piecewise
    linear networks, where the Jacobian is constant on each activation region and the ascent has
    nothing to follow. For each target sign vector ``s`` (e.g. the domain SeqLip's maximising pattern),
    ``pattern_steps`` steps of projected Adam from the domain's center on the hinge loss
    ``sum_j relu(margin_j - s_j z_j(x))``, every iterate projected into the domain; the point of least
    loss (and the last one) are evaluated for ``||J(x)||`` like any other point. Whatever pattern the
    point actually reaches, its Jacobian norm is a valid lower bound (the same argument as above), so
    a target that is infeasible in the domain (a partial pattern reached) still counts. Then a hill
    climb over the patterns the domain allows (:func:`pattern_climb`, ``climb_rounds`` passes): flip
    one targeted neuron of the pattern reached, steer there (``pattern_steps // 4`` steps), keep the
    point if it reaches that pattern with a larger ``||J||``. ``pattern_budget``: the most model passes the
    pattern search may spend (each steering step a forward and a backward pass, each pattern read a forward
    pass, each ``||J||`` evaluation ``2 power_iters + 2``); it stops where the budget ends (None: no limit).

    The work is fixed (``restarts`` x (``ascent_steps + 1`` Jacobian evaluations + ``secant_steps`` secant
    steps)), never timed, so the value is the same
    at any machine load; ``seconds`` is information."""
    token = _FD_ALLOWED.set(finite_differences)
    try:
        return _lower_bound(f, example_inputs, restarts=restarts, ascent_steps=ascent_steps, power_iters=power_iters,
                            radius=radius, secant_steps=secant_steps, seed=seed, f64=f64, domain=domain,
                            patterns=patterns, pattern_steps=pattern_steps, climb_rounds=climb_rounds,
                            pattern_budget=pattern_budget, progress=progress)
    finally:
        _FD_ALLOWED.reset(token)


def _lower_bound(f: Callable[..., object], example_inputs: Sequence[torch.Tensor], *, restarts: int,
                 ascent_steps: int, power_iters: int, radius: float, secant_steps: int, seed: int,
                 f64: Callable[..., object] | None, domain: Domain | None, patterns: PatternTargets | None,
                 pattern_steps: int, climb_rounds: int, pattern_budget: int | None,
                 progress: Callable[[int, int], None] | None = None) -> LowerBound:
    if domain is not None:
        return _lower_on_domain(f, example_inputs, domain, restarts=restarts, ascent_steps=ascent_steps,
                                power_iters=power_iters, secant_steps=secant_steps, seed=seed, f64=f64,
                                patterns=patterns, pattern_steps=pattern_steps, climb_rounds=climb_rounds,
                                pattern_budget=pattern_budget, progress=progress)
    t0 = time.perf_counter()
    shapes = [tuple(x.shape) for x in example_inputs]
    g = _flat_fn(f, shapes)
    dtype = example_inputs[0].dtype if example_inputs[0].is_floating_point() else torch.float32
    base = torch.cat([x.detach().reshape(-1) for x in example_inputs]).to(dtype)  # the model's own dtype
    gen = torch.Generator().manual_seed(seed)
    scale = float(base.std()) if base.numel() > 1 and float(base.std()) > 0 else 1.0
    best, points = 0.0, 0
    witness: tuple | None = None
    only_point = restarts == 1 and ascent_steps == 0 and not secant_steps  # the search evaluates one point
    for r in range(restarts):
        if progress is not None:
            progress(r, restarts)
        noise = torch.randn(base.shape, generator=gen).to(base.device)
        z = base + (0.0 if r == 0 else radius * scale) * noise
        v = None
        step = 0.1 * scale
        for step_index in range(ascent_steps + 1):
            if only_point and f64 is not None:  # its value is taken in float64 anyway: one pass saved
                _, v = jacobian_norm(g, z, power_iters, v, measure=False)
                witness, points = ("jacobian", z.detach().clone(), v.detach().clone()), points + 1
                break
            sigma, v = jacobian_norm(g, z, power_iters, v)
            points += 1
            if sigma > best:
                witness = ("jacobian", z.detach().clone(), v.detach().clone())
            best = max(best, sigma)
            if step_index == ascent_steps and not secant_steps:
                break  # the step would only move a point that nothing evaluates (the minimal search: 3 passes saved)
            zz = z.detach().requires_grad_(True)
            obj = _jvp(g, zz, v.detach()).norm()
            if not obj.requires_grad:
                break
            try:
                (grad,) = torch.autograd.grad(obj, zz, allow_unused=True)
            except RuntimeError:  # an op without a second derivative (hardsigmoid's backward): stop ascending
                break
            if grad is None or float(grad.norm()) == 0.0:
                break
            z = (zz + step * grad / grad.norm()).detach()
        if secant_steps and v is not None:
            length = 0.1 * scale * math.sqrt(base.numel())
            pair: list = []
            sec = secant_ascent(g, z, v, length, secant_steps, pair)
            if sec > best and pair:
                witness = ("secant", *pair)
            best = max(best, sec)
            points += secant_steps
    if f64 is not None and witness is not None:
        best = _reevaluate(_flat_fn(f64, shapes), witness)
    if progress is not None:
        progress(restarts, restarts)
    return LowerBound(best, time.perf_counter() - t0, points)


def _flat_projection(domain: Domain, shape: tuple[int, ...]) -> Projection:
    """The domain's projection on flat vectors (the domain works on input-shaped tensors)."""
    return lambda z: domain.project(z.reshape(shape)).reshape(-1)


def _domain_size(domain: Domain, like: torch.Tensor) -> tuple[float, bool]:
    """(the domain's l2 diameter, bounded above by its enclosure's; whether it is full-dimensional).

    A convex set is full-dimensional iff its enclosure has positive width in every coordinate (true
    for boxes; for a ball within a box, the ball's radius is positive and its center is in the box)."""
    e = domain.enclosure(like)
    width = (e.hi - e.lo).reshape(-1)
    size = float(width.norm())
    if isinstance(domain, Ball) and domain.norm == "l2":
        size = min(size, 2.0 * domain.radius)
    return size, bool((width > 0).all()) and size > 0


def _lower_on_domain(f: Callable[..., object], example_inputs: Sequence[torch.Tensor], domain: Domain, *,
                     restarts: int, ascent_steps: int, power_iters: int, secant_steps: int, seed: int,
                     f64: Callable[..., object] | None, patterns: PatternTargets | None = None,
                     pattern_steps: int = 100, climb_rounds: int = 2,
                     pattern_budget: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> LowerBound:
    """:func:`lower_bound` with every evaluated point in ``domain`` (see its docstring); ``progress`` counts the
    restarts, and the pattern search as one more step when it runs."""
    t0 = time.perf_counter()
    if len(example_inputs) != 1:
        raise ValueError(f"a domain is for single-input models, this one has {len(example_inputs)} inputs")
    x0 = example_inputs[0].detach()
    shape = tuple(x0.shape)
    g = _flat_fn(f, [shape])
    dtype = x0.dtype if x0.is_floating_point() else torch.float32
    dev = x0.device
    size, full = _domain_size(domain, x0)
    if size == 0.0:  # a single point: every secant is 0 and no Jacobian counts
        return LowerBound(0.0, time.perf_counter() - t0, 0, "domain-search")
    proj = _flat_projection(domain, shape)
    n = x0.numel()
    gen = torch.Generator().manual_seed(seed)
    starts = [domain.center(x0).reshape(-1)]
    if restarts > 1:
        starts += list(domain.sample(restarts - 1, x0, gen).reshape(restarts - 1, -1))
    best, points = 0.0, 0
    witness: tuple | None = None

    def consider(kind: str, value: float, a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal best, witness
        if kind == "jacobian" and not full:
            return  # on a flat domain only secants are lower bounds of L_D
        if value > best:
            best, witness = value, (kind, a.detach().clone(), b.detach().clone())

    steps = len(starts[:restarts]) + (1 if patterns is not None and full else 0)
    for k, start in enumerate(starts[:restarts]):
        if progress is not None:
            progress(k, steps)
        z = proj(start.to(dtype).to(dev))
        v = None
        moving = True  # False once the ascent stalls: the remaining steps refine v at the same point
        for _ in range(ascent_steps + 1):
            sigma, v = jacobian_norm(g, z, power_iters,
                                     v if v is not None else torch.randn(n, generator=gen).to(dtype).to(dev))
            points += 1
            consider("jacobian", sigma, z, v)
            z_new = _ascent_step(g, z, v, 0.1 * size, proj) if moving else None
            if z_new is None or bool(torch.equal(z_new, z)):
                moving = False
            else:
                z = z_new
        if secant_steps and v is not None and float(v.detach().norm()) > 0:
            pair: list = []
            sec = secant_ascent(g, z, v, 0.1 * size, secant_steps, pair, project=proj)
            if pair:
                consider("secant", sec, pair[0], pair[0] + pair[1])
            points += secant_steps
    if patterns is not None and full:
        if progress is not None:
            progress(steps - 1, steps)
        budget = PassBudget(pattern_budget)

        def norm_at(z: torch.Tensor) -> tuple[float, torch.Tensor]:
            budget.spend(2 * power_iters + 2)
            return jacobian_norm(g, z, power_iters, torch.randn(n, generator=gen).to(dtype).to(dev))

        for s in patterns.signs:
            if budget.spent_out():
                break
            try:
                found = [(*norm_at(z), z) for z in pattern_points(patterns, s, proj(starts[0].to(dtype).to(dev)), proj,
                                                                 size, pattern_steps, budget)]
                sigma, v, z = max(found, key=lambda t: t[0])
                sigma, v, z, evals = pattern_climb(patterns, norm_at, (sigma, v, z), proj, size,
                                                   max(1, pattern_steps // 4), climb_rounds, budget)
                consider("jacobian", sigma, z, v)
                points += len(found) + evals
            except (RuntimeError, TypeError, ValueError):  # pre-activations the search cannot run: skip
                continue
    if progress is not None:
        progress(steps, steps)
    if witness is not None:
        g_eval = _flat_fn(f64, [shape]) if f64 is not None else g
        best, witness = _reevaluate_on_domain(g_eval, witness, _flat_projection(domain, shape),
                                              torch.float64 if f64 is not None else dtype)
    return LowerBound(best, time.perf_counter() - t0, points, "domain-search", witness)


@dataclass
class PassBudget:
    """Model passes left to a search (``None``: no limit), spent as they are made; counted work, not time."""

    left: int | None

    def spend(self, passes: int) -> None:
        if self.left is not None:
            self.left -= passes

    def spent_out(self, need: int = 1) -> bool:
        return self.left is not None and self.left < need


def pattern_points(targets: PatternTargets, signs: torch.Tensor, z0: torch.Tensor, proj: Projection,
                   size: float, steps: int, budget: PassBudget | None = None) -> list[torch.Tensor]:
    """Points of the domain steered toward the sign pattern ``signs`` of ``targets.preact``: projected Adam
    (step ``0.02 size / sqrt(n)`` per coordinate, ``size`` the domain's diameter) from ``z0`` on the hinge
    loss ``sum_j relu(margin_j - s_j z_j(x))``. Returns the point of least loss and the last point (both
    projected; one point when they agree). Fixed work: ``steps`` forward and backward passes (fewer where
    ``budget`` runs out: each step spends 2 of its passes)."""
    s = signs.to(z0.dtype).to(z0.device)
    margin = targets.margin.to(z0.dtype).to(z0.device) if isinstance(targets.margin, torch.Tensor) \
        else targets.margin
    x = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.02 * size / math.sqrt(max(1, z0.numel())))
    best_loss, best = math.inf, z0.detach().clone()
    for _ in range(steps):
        if budget is not None:
            if budget.spent_out(2):
                break
            budget.spend(2)
        loss = torch.relu(margin - s * targets.preact(x)).sum()
        if float(loss.detach()) < best_loss:
            best_loss, best = float(loss.detach()), x.detach().clone()
        if best_loss == 0.0 or not loss.requires_grad:
            break
        _set_grads(loss, [x])
        opt.step()
        with torch.no_grad():
            x.copy_(proj(x))
    last = x.detach().clone()
    return [best] if torch.equal(best, last) else [best, last]


def _reached(targets: PatternTargets, z: torch.Tensor, budget: PassBudget | None = None) -> torch.Tensor:
    """The sign pattern of the targeted neurons at ``z`` (``+1``: ``z_j > 0``, else ``-1``; one forward pass)."""
    if budget is not None:
        budget.spend(1)
    with torch.no_grad():
        return torch.where(targets.preact(z).to(torch.float64) > 0, 1.0, -1.0)


def pattern_climb(targets: PatternTargets, norm_at: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
                  start: tuple[float, torch.Tensor, torch.Tensor], proj: Projection, size: float, steps: int,
                  rounds: int, budget: PassBudget | None = None) -> tuple[float, torch.Tensor, torch.Tensor, int]:
    """Hill climb over reachable patterns: from ``start = (||J(z)||, v, z)``, for each targeted neuron in
    turn, steer (:func:`pattern_points`, ``steps`` steps from ``z``) toward the pattern reached at ``z``
    with that neuron flipped; a point that reaches it with a larger ``||J||`` replaces ``z``. ``rounds``
    passes (fewer when a pass changes nothing, or where ``budget`` runs out). Returns ``(value, v, z, Jacobian
    evaluations)``."""
    sigma, v, z = start
    evals = 0
    for _ in range(rounds):
        improved = False
        for j in range(len(_reached(targets, z, budget))):
            if budget is not None and budget.spent_out():
                return sigma, v, z, evals
            want = _reached(targets, z, budget)
            want[j] = -want[j]
            for cand in pattern_points(targets, want, z, proj, size, steps, budget)[:1]:
                if not torch.equal(_reached(targets, cand, budget), want):
                    continue
                s2, v2 = norm_at(cand)
                evals += 1
                if s2 > sigma:
                    sigma, v, z, improved = s2, v2, cand, True
        if not improved:
            break
    return sigma, v, z, evals


def _ascent_step(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor, step: float,
                 proj: Projection) -> torch.Tensor | None:
    """``P(z + step * grad / ||grad||)`` for ``grad`` the gradient of ``||J(z) v||`` (None: zero gradient)."""
    zz = z.detach().requires_grad_(True)
    obj = _jvp(g, zz, v.detach()).norm()
    if not obj.requires_grad:
        return None
    try:
        (grad,) = torch.autograd.grad(obj, zz, allow_unused=True)
    except RuntimeError:  # an op without a second derivative (hardsigmoid's backward): no ascent step
        return None
    if grad is None or float(grad.norm()) == 0.0:
        return None
    return proj((zz + step * grad / grad.norm()).detach())


def _reevaluate_on_domain(g: Callable[[torch.Tensor], torch.Tensor], witness: tuple, proj: Projection,
                          dtype: torch.dtype) -> tuple[float, tuple]:
    """The witness projected again (in ``dtype``, float64 when a float64 model is given) and evaluated
    there: ``||J(x) v||`` for a unit ``v``, or the secant ratio between the two projected ends."""
    kind, a, b = witness
    a = proj(a.to(dtype))
    if kind == "secant":
        y = proj(b.to(dtype))
        d = y - a
        with torch.no_grad():
            dn = d.norm()
            value = float((g(y) - g(a)).norm() / dn) if float(dn) > 0 else 0.0
        return value, ("secant", a, y)
    u = b.to(dtype)
    u = u / u.norm()
    return _jv_norm_attained(g, a, u, proj), ("jacobian", a, u)


def _reevaluate(g64: Callable[[torch.Tensor], torch.Tensor], witness: tuple) -> float:
    """The best witness's value in float64: ``||J(z) v||`` for a unit ``v``, or the secant ratio."""
    kind, a, b = witness
    a, b = a.to(torch.float64), b.to(torch.float64)
    with torch.no_grad():
        if kind == "secant":
            dn = b.norm()
            return float((g64(a + b) - g64(a)).norm() / dn) if float(dn) > 0 else 0.0
    return _jv_norm_attained(g64, a, b / b.norm())


def secant_search(f: Callable[..., object], example_inputs: Sequence[torch.Tensor], *, restarts: int = 2,
                  steps: int = 40, seed: int = 0, f64: Callable[..., object] | None = None,
                  domain: Domain | None = None) -> LowerBound:
    """A lower bound without any derivative (a model whose ops only a non-differentiable runtime evaluates,
    such as the ONNX reference evaluator): the largest secant ratio ``||f(x + d) - f(x)|| / ||d||`` found by a
    (1+1) evolution strategy on ``(x, d)`` (a seeded Gaussian step on both, kept when the ratio grows; its
    scale times 1.5 on success and 0.8 otherwise), from ``restarts`` starting points (the example input, or the
    domain's center, then seeded samples) with ``d`` a seeded direction of length a tenth of the input's scale
    (of the domain's diameter). On a domain both ends are projected into it. The best pair is evaluated again on
    ``f64``. Work: ``restarts (steps + 1)`` pairs of forward passes, never timed."""
    t0 = time.perf_counter()
    shapes = [tuple(x.shape) for x in example_inputs]
    g = _flat_fn(f, shapes)
    dtype = example_inputs[0].dtype if example_inputs[0].is_floating_point() else torch.float32
    base = torch.cat([x.detach().reshape(-1) for x in example_inputs]).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    n = base.numel()
    proj: Projection | None = None
    if domain is not None:
        if len(example_inputs) != 1:
            raise ValueError(f"a domain is for single-input models, this one has {len(example_inputs)} inputs")
        size, _ = _domain_size(domain, example_inputs[0].detach())
        if size == 0.0:
            return LowerBound(0.0, time.perf_counter() - t0, 0, "secant-search")
        proj = _flat_projection(domain, shapes[0])
        starts = [domain.center(example_inputs[0].detach()).reshape(-1).to(dtype)]
        if restarts > 1:
            starts += list(domain.sample(restarts - 1, example_inputs[0].detach(), gen).reshape(restarts - 1, -1)
                           .to(dtype))
        length = 0.1 * size
    else:
        scale = float(base.std()) if n > 1 and float(base.std()) > 0 else 1.0
        starts = [base] + [base + scale * torch.randn(n, generator=gen).to(dtype) for _ in range(restarts - 1)]
        length = 0.1 * scale * math.sqrt(n)

    def ratio(x: torch.Tensor, d: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        if proj is not None:
            x = proj(x)
            d = proj(x + d) - x
        dn = float(d.norm())
        if dn == 0.0:
            return 0.0, x, d
        with torch.no_grad():
            return float((g(x + d) - g(x)).norm()) / dn, x, d

    best, witness, points = 0.0, None, 0
    for start in starts[:restarts]:
        x = start.clone()
        d = torch.randn(n, generator=gen).to(dtype)
        d = length * d / d.norm()
        cur, x, d = ratio(x, d)
        points += 1
        sigma = 0.3 * length
        for _ in range(steps):
            x2 = x + sigma * torch.randn(n, generator=gen).to(dtype) / math.sqrt(n)
            d2 = d + sigma * torch.randn(n, generator=gen).to(dtype) / math.sqrt(n)
            val, x2, d2 = ratio(x2, d2)
            points += 1
            if val > cur:
                cur, x, d, sigma = val, x2, d2, sigma * 1.5
            else:
                sigma *= 0.8
        if cur > best:
            best, witness = cur, ("secant", x.clone(), (x + d).clone())
    if f64 is not None and witness is not None:
        g64 = _flat_fn(f64, shapes)
        if proj is not None:
            best = _reevaluate_on_domain(g64, witness, _flat_projection(domain, shapes[0]), torch.float64)[0]
        else:
            _, a, b = witness
            best = _reevaluate(g64, ("secant", a, b - a))
    return LowerBound(best, time.perf_counter() - t0, points, "secant-search")
