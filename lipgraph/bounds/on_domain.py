"""Pass: every node's constant on an input domain, from the ranges of its inputs.

For a convex domain ``D`` and a node ``v``, ``L_D(v) = sup_{x in D} ||J_v(x)||`` (the Jacobian of ``v``'s
value with respect to the input) bounds the Lipschitz constant of ``x -> v(x)`` on ``D``. The chain rule
gives ``J_v = sum_i d_i f_v(u(x)) J_{u_i}(x)``, so AutoLip's recursion holds with each partial replaced by
its sup over the values the inputs take on ``D``, which lie in their ranges
(:mod:`lipgraph.bounds.ranges`). So a node's constant on the domain is

* for an elementwise activation with ``neuron_slopes``: ``max_j max(|a_j|, |b_j|)`` over the per-neuron
  derivative intervals on the input's range (0 for a dead ReLU, 1 for an active one);
* for an op with a ``local`` rule: that rule's partials on the input ranges;
* otherwise (or with no range): the global rule, valid everywhere.

Each partial is the smaller of the domain value and the global one when both are certified. The
per-neuron intervals are also returned for the local SeqLip pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from .. import ir
from ..core import Settings
from ..domains import Range
from ..ops import RULES, LocalConstant
from .ranges import RangeResult


@dataclass
class DomainConstants:
    """``local[name]``: the constant on the domain (the global one where nothing better is known);
    ``slopes[name]``: per-neuron derivative intervals ``(lo, hi)`` of activations; ``unstable[name]``: the
    share of an activation's neurons whose interval is not a single point; ``sources[name]``: "domain"
    where the domain rule was used, else why the global rule stands; ``seconds``."""

    local: dict[str, LocalConstant] = field(default_factory=dict)
    slopes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    unstable: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _tighter(glob: LocalConstant, dom: LocalConstant) -> LocalConstant:
    """Partialwise minimum of a certified domain constant and the global one (never above the global)."""
    if not dom.certified or len(dom.partials) != len(glob.partials):
        return glob
    if not glob.certified:
        return dom
    parts = [min(a, b) for a, b in zip(glob.partials, dom.partials, strict=True)]
    if all(b >= a for a, b in zip(glob.partials, dom.partials, strict=True)):
        return glob
    return LocalConstant(parts, True, dom.method, glob.combine, dom.reason, lower=None)


def domain_constants(g: nx.DiGraph, global_local: Mapping[str, LocalConstant], ranges: RangeResult,
                     settings: Settings | None = None) -> DomainConstants:
    """The constants of every node of ``g`` on the domain whose ranges are ``ranges`` (see the module doc)."""
    t0 = time.perf_counter()
    settings = settings or Settings()
    out = DomainConstants()
    for n in ir.nodes(g):
        glob = global_local[n.name]
        rule = RULES.get(n.op)
        ins = [ranges.ranges.get(i) for i in n.inputs]
        if rule is None or (not rule.neuron_slopes and not rule.local) or n.op in ("input", "constant", "output"):
            out.local[n.name] = glob
            continue
        if any(r is None for r in ins):
            out.local[n.name] = glob
            missing = next(i for i, r in zip(n.inputs, ins, strict=True) if r is None)
            out.sources[n.name] = "global rule: " + ranges.reasons.get(missing, f"no range for {missing}")
            continue
        try:
            dom = _domain_constant(n, rule, ins, settings, out)
        except Exception as exc:  # noqa: BLE001 - a domain rule that fails leaves the global rule, said why
            dom = None
            out.sources[n.name] = f"global rule: domain rule of {n.op} failed ({type(exc).__name__}: {exc})"
        if dom is None:
            out.local[n.name] = glob
            continue
        out.local[n.name] = _tighter(glob, dom)
        out.sources[n.name] = "domain"
    out.seconds = time.perf_counter() - t0
    return out


def _domain_constant(n: ir.IRNode, rule: Any, ins: list[Range], settings: Settings,
                     out: DomainConstants) -> LocalConstant | None:
    if rule.neuron_slopes is not None and len(ins) == 1 and isinstance(ins[0], Range):
        lo, hi = rule.neuron_slopes(n, ins[0])
        lo, hi = torch.broadcast_to(lo, ins[0].lo.shape), torch.broadcast_to(hi, ins[0].lo.shape)
        out.slopes[n.name] = (lo, hi)
        out.unstable[n.name] = float((hi > lo).to(torch.float64).mean()) if lo.numel() else 0.0
        bound = float(torch.maximum(lo.abs(), hi.abs()).max()) if lo.numel() else 0.0
        if not math.isfinite(bound):
            return None
        return LocalConstant([bound], True, "domain: per-neuron slopes on the input range")
    if rule.local is not None:
        return rule.local(n, ins, settings)
    return None


__all__ = ["DomainConstants", "domain_constants"]
