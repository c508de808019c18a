"""Pass: mean-value ranges, which tighten interval ranges with the constants the domain pass has proven.

For a convex domain ``D``, a point ``c`` of it and ``R >= sup_{x in D} ||x - c||_2``, every node ``v`` satisfies
``||v(x) - v(c)||_2 <= L_D(v) ||x - c||_2 <= L_D(v) R`` for every ``x`` of ``D``, where ``L_D(v)`` is any
certified bound of the Lipschitz constant of ``x -> v(x)`` on ``D`` (the segment ``[c, x]`` lies in ``D``). So
each entry of ``v(x)`` lies in ``[v_i(c) - L_D(v) R, v_i(c) + L_D(v) R]``, with ``v(c)`` enclosed by the ranges
over the single point ``{c}`` (interval arithmetic rounded outward, :func:`lipgraph.bounds.ranges.propagate`).
Interval arithmetic widens with every layer (dependencies between entries are lost); this enclosure widens
only as the constant grows, so after a few dense ops it is often the tighter one: on the one-block
transformer of ``tests/test_domain_tightness.py`` the residual sum feeding the second LayerNorm gets
``+-0.85`` per entry, and LayerNorm's smallest variance on the domain stops being 0.

:func:`mean_value_ranges` returns these enclosures; the domain pass intersects them with the interval
ranges (``propagate(..., overrides=...)``), so later nodes inherit the tightening.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import networkx as nx
import torch

from ..core import ROUNDING_MARGIN
from ..domains import Ball, Domain, Range
from .ranges import propagate
from .relations import Cumulative

_DT = torch.float64


def l2_radius(domain: Domain, example: torch.Tensor) -> float | None:
    """``R >= sup_{x in D} ||x - c||_2`` for ``c = domain.center(example)``: the ball's radius for an l2 ball,
    else the half-diagonal of the enclosing box seen from ``c``; None when ``c`` is not in the enclosure (no
    segment argument then)."""
    box = domain.enclosure(example.detach().to(_DT))
    c = domain.center(example.detach().to(_DT)).to(_DT).reshape(box.lo.shape)
    if not bool(((box.lo <= c) & (c <= box.hi)).all()):
        return None
    r = float(torch.linalg.vector_norm(torch.maximum(c - box.lo, box.hi - c)))
    if isinstance(domain, Ball) and domain.norm == "l2":
        r = min(r, domain.radius)
    return r * (1 + ROUNDING_MARGIN)


def center_ranges(g: nx.DiGraph, domain: Domain, example: torch.Tensor) -> dict[str, object]:
    """Every node's enclosure at the domain's center ``c`` (the ranges over ``{c}``: its value, rounded outward)."""
    c = domain.center(example.detach().to(_DT)).to(_DT).reshape(example.shape)
    return propagate(g, Ball(c, 0.0, "l2"), c).ranges


def spreads(at_center: Mapping[str, object], radius: float,
            cumulative: Mapping[str, Cumulative]) -> dict[str, tuple[Range, float]]:
    """``{node: (enclosure of v(c), d)}`` with ``||v(x) - v(c)||_2 <= d`` on the domain, ``d = L_D(v) R``
    (rounded up), for every node with a tensor range at the center (``at_center``, :func:`center_ranges`) and a
    finite, certified ``cumulative[node]`` (a bound of its constant on the domain), ``R = radius``
    (:func:`l2_radius`). Norm layers read these (``Settings.extra["spread"]``): a group's spread bounds how far
    its variance can fall (:func:`lipgraph.ops.normalization.norm_local`)."""
    out: dict[str, tuple[Range, float]] = {}
    for name, r in at_center.items():
        cum = cumulative.get(name)
        if not isinstance(r, Range) or cum is None or not cum.certified or not math.isfinite(cum.value):
            continue
        d = cum.value * radius * (1 + ROUNDING_MARGIN)
        if math.isfinite(d):
            out[name] = (r, d)
    return out


def mean_value_ranges(spread: Mapping[str, tuple[Range, float]]) -> dict[str, Range]:
    """``{node: [v(c) - d, v(c) + d]}`` from :func:`spreads` (each entry moves by at most the l2 spread),
    rounded outward."""
    return {name: Range(r.lo - d, r.hi + d).widened(r.abs_max + d) for name, (r, d) in spread.items()}


def tightens(ranges: Mapping[str, object], candidates: Mapping[str, Range]) -> bool:
    """Whether some candidate enclosure is strictly inside its node's range at some entry."""
    for name, o in candidates.items():
        r = ranges.get(name)
        if isinstance(r, Range) and r.lo.numel() == o.lo.numel():
            lo, hi = o.lo.reshape(r.lo.shape), o.hi.reshape(r.hi.shape)
            if bool(((lo > r.lo) | (hi < r.hi)).any()):
                return True
    return False


def intersect(a: Mapping[str, Range] | None, b: Mapping[str, Range]) -> dict[str, Range]:
    """Entrywise intersection of two override maps (a node in one only keeps its enclosure)."""
    out = dict(a or {})
    for name, r in b.items():
        if name in out:
            o = out[name]
            out[name] = Range(torch.maximum(o.lo.reshape(r.lo.shape), r.lo),
                              torch.minimum(o.hi.reshape(r.hi.shape), r.hi))
        else:
            out[name] = r
    return out


__all__ = ["center_ranges", "intersect", "l2_radius", "mean_value_ranges", "spreads", "tightens"]
