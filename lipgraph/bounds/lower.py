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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import jvp, vjp


@dataclass
class LowerBound:
    value: float
    seconds: float
    points: int
    method: str = "jacobian-ascent"


def _flat_fn(f: Callable[..., object], shapes: Sequence[tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]

    def g(z: torch.Tensor) -> torch.Tensor:
        parts = torch.split(z, sizes)
        out = f(*[p.reshape(s) for p, s in zip(parts, shapes, strict=True)])
        leaves = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        return torch.cat([o.reshape(-1) for o in leaves])

    return g


def jacobian_norm(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, iters: int = 30,
                  v: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """||J_g(z)||_2 by power iteration (returns the attained ||J v|| and the last v)."""
    if v is None:
        v = torch.randn_like(z)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = jvp(g, (z,), (v,))
        _, pull = vjp(g, z)
        (w,) = pull(jv)
        wn = w.norm()
        if wn == 0:
            return 0.0, v
        v = w / wn
    _, jv = jvp(g, (z,), (v,))
    sigma = float(jv.detach().norm())
    return sigma, v


def secant_ascent(g: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor, length: float,
                  steps: int, witness: list | None = None) -> float:
    """Largest ``||g(x + d) - g(x)|| / ||d||`` found by Adam from ``x = z``, ``d = length * v / ||v||``.
    ``witness``, if given, receives ``(x, d)`` of the best ratio."""
    x = z.detach().clone().requires_grad_(True)
    d = (length * v / v.norm()).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=0.05 * length)
    best = 0.0
    for _ in range(steps):
        dn = d.norm()
        if float(dn.detach()) == 0.0:
            break
        ratio = (g(x + d) - g(x)).norm() / dn
        if float(ratio.detach()) > best and witness is not None:
            witness[:] = [x.detach().clone(), d.detach().clone()]
        best = max(best, float(ratio.detach()))
        if not ratio.requires_grad:
            break
        opt.zero_grad()
        (-ratio).backward()
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
) -> LowerBound:
    """Largest ``||J_f(x)||_2`` found around ``example_inputs`` (an attained value: a lower bound).

    ``f64``: the same function in float64 (e.g. a float64 copy of the model). The search runs on ``f``;
    the value reported is the best witness (a point and a unit direction, or a secant pair) evaluated
    again on ``f64``, so float32 rounding (``0.5 x + 1e5``: a secant of 0.63) cannot exceed the true
    constant.

    The work is fixed (``restarts`` x (``ascent_steps + 1`` Jacobian evaluations + ``secant_steps`` secant
    steps)), never timed, so the value is the same at any machine load; ``seconds`` is information."""
    t0 = time.perf_counter()
    shapes = [tuple(x.shape) for x in example_inputs]
    g = _flat_fn(f, shapes)
    dtype = example_inputs[0].dtype if example_inputs[0].is_floating_point() else torch.float32
    base = torch.cat([x.detach().reshape(-1) for x in example_inputs]).to(dtype)  # the model's own dtype
    gen = torch.Generator().manual_seed(seed)
    scale = float(base.std()) if base.numel() > 1 and float(base.std()) > 0 else 1.0
    best, points = 0.0, 0
    witness: tuple | None = None
    for r in range(restarts):
        noise = torch.randn(base.shape, generator=gen).to(base.device)
        z = base + (0.0 if r == 0 else radius * scale) * noise
        v = None
        step = 0.1 * scale
        for _ in range(ascent_steps + 1):
            sigma, v = jacobian_norm(g, z, power_iters, v)
            points += 1
            if sigma > best:
                witness = ("jacobian", z.detach().clone(), v.detach().clone())
            best = max(best, sigma)
            zz = z.detach().requires_grad_(True)
            _, jv = jvp(g, (zz,), (v.detach(),))
            obj = jv.norm()
            if not obj.requires_grad:
                break
            (grad,) = torch.autograd.grad(obj, zz, allow_unused=True)
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
    return LowerBound(best, time.perf_counter() - t0, points)


def _reevaluate(g64: Callable[[torch.Tensor], torch.Tensor], witness: tuple) -> float:
    """The best witness's value in float64: ``||J(z) v||`` for a unit ``v``, or the secant ratio."""
    kind, a, b = witness
    a, b = a.to(torch.float64), b.to(torch.float64)
    with torch.no_grad():
        if kind == "secant":
            dn = b.norm()
            return float((g64(a + b) - g64(a)).norm() / dn) if float(dn) > 0 else 0.0
    _, jv = jvp(g64, (a,), (b / b.norm(),))
    return float(jv.detach().norm())
