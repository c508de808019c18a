"""Range propagation: an elementwise enclosure of every node's value over an input domain.

``propagate(G, domain, example)`` walks the graph once in its fixed order. Each node's range comes from

1. its rule's ``ranges`` capability (interval arithmetic written per op family, rounded outward), or
   ``monotone=True`` (``[f(lo), f(hi)]``, widened by ``ROUNDING_MARGIN * f(max(|lo|, |hi|))``, which
   bounds the rounding of sums, means and pools whatever the cancellation);
2. intersected, for a node that is an affine function of the input with a dense Jacobian ``A`` of at most
   :data:`AFFINE_RANGE_ENTRIES` entries, with the exact range of ``A x + b`` over the domain (the domain's
   ``linear_range``: ``A c -+ |A| r`` on a box, ``A c -+ r ||a_i||_2`` on an l2 ball), which is what
   symbolic (CROWN-style) propagation gives on the affine part before the first activation.

A node without a range rule, or reading a node without a range, gets ``None`` with the reason, and every
node downstream falls back to its global rule. Constants get their exact value. Everything is float64.

Soundness: for every x in the domain, every node's value at x lies in its range (each rule maps
enclosures of its inputs to an enclosure of its output; rounding is covered by the widening). Tested by
sampling in ``tests/test_domains.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from .. import ir
from ..core import ROUNDING_MARGIN
from ..domains import Domain, Range
from ..ops import RULES

#: Largest dense Jacobian (entries) of an affine-from-input node kept for exact ranges: 4e6 float64 entries
#: are 32 MB (the first layer of the 784-input MNIST networks is 50 x 784 = 39200).
AFFINE_RANGE_ENTRIES = 4_000_000
_DT = torch.float64


@dataclass
class RangeResult:
    """``ranges[name]``: the node's enclosure (a :class:`Range`, a tuple of them for tuple-valued ops, or None);
    ``reasons[name]``: why a node has none; ``exact_affine``: nodes whose range came from their exact affine
    form; ``seconds``."""

    ranges: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    exact_affine: set[str] = field(default_factory=set)
    seconds: float = 0.0


def _map_pair(f: Any, lo: Any, hi: Any) -> Any:
    if isinstance(lo, torch.Tensor):
        return f(lo, hi)
    if isinstance(lo, (tuple, list)):
        return tuple(_map_pair(f, a, b) for a, b in zip(lo, hi, strict=True))
    return None


def _as_range(lo: Any, hi: Any, mag: Any) -> Any:
    if isinstance(lo, torch.Tensor):
        return Range(torch.minimum(lo, hi), torch.maximum(lo, hi)).widened(mag.abs())
    if isinstance(lo, (tuple, list)):
        return tuple(_as_range(a, b, m) for a, b, m in zip(lo, hi, mag, strict=True))
    return None


def monotone_range(n: ir.IRNode, ins: list[Range]) -> Any:
    """``[f(lo), f(hi)]`` for an op nondecreasing in every input, widened by ``margin * f(max |.|)``."""
    n64 = ir.as_float64(n)
    f = RULES[n.op].forward
    lo = f(n64, *[r.lo for r in ins])
    hi = f(n64, *[r.hi for r in ins])
    mag = f(n64, *[r.abs_max for r in ins])
    return _as_range(lo, hi, mag)


def _range_of(n: ir.IRNode, ins: list[Any]) -> Any:
    rule = RULES.get(n.op)
    if rule is None:
        return None
    if rule.ranges is not None:
        return rule.ranges(n, *ins)
    if rule.monotone:
        return monotone_range(n, ins)
    return None


def _flat_count(shape: Any) -> int | None:
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        return math.prod(shape)
    return None


def _affine_jacobian(n: ir.IRNode, g: nx.DiGraph, forms: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, y(c))`` with ``y(x) = y(c) + A (x - c)`` for an affine node whose variable inputs all have affine
    forms (``A`` maps the flattened input to the flattened output), or None."""
    rule = RULES[n.op]
    if not rule.affine or n.op in ("split", "unbind", "tuple_getitem", "output"):
        return None
    if n.attrs.get("dtype") is not None:  # a cast rounds (or truncates): its own range rule encloses that
        return None
    var = [i for i in n.inputs if i not in values or i in forms]
    if not var or any(i not in forms for i in var):
        return None
    out_n = _flat_count(n.out_shape)
    n_in = next(iter(forms[var[0]][0].shape[1:]), None) if var else None
    if out_n is None or n_in is None or out_n * n_in > AFFINE_RANGE_ENTRIES:
        return None
    n64 = ir.as_float64(n)

    def linear_part(*cols: torch.Tensor) -> torch.Tensor:
        args = []
        k = 0
        for i in n.inputs:
            if i in forms:
                args.append(cols[k].reshape(values[i].shape))
                k += 1
            else:
                args.append(torch.zeros_like(values[i]))
        return rule.forward(n64, *args).reshape(-1)

    base_args = [torch.zeros_like(values[i]) for i in n.inputs]
    y0 = rule.forward(n64, *base_args).reshape(-1)
    cols = [forms[i][0].T for i in n.inputs if i in forms]  # (n_in, numel(u)) each
    try:
        a_t = torch.vmap(lambda *c: linear_part(*c) - y0)(*cols)
    except Exception:  # noqa: BLE001 - an op vmap cannot batch: no exact form, the interval rule stands
        return None
    yc = rule.forward(n64, *[values[i] for i in n.inputs]).reshape(-1)
    return a_t.T.contiguous(), yc


def propagate(g: nx.DiGraph, domain: Domain, example: torch.Tensor,
              overrides: dict[str, Range] | None = None) -> RangeResult:
    """Ranges of every node of ``g`` over ``domain`` (inputs shaped like ``example``; one input only).

    ``overrides``: enclosures over the same domain found otherwise (the backward linear bounds of
    :func:`lipgraph.bounds.linear_bounds.tightened_ranges`); each node's range is intersected with its own
    before the nodes after it are computed, so they inherit the tightening.

    Returns a :class:`RangeResult`. Nodes after an op without a range rule get ``None`` with the reason.
    """
    t0 = time.perf_counter()
    res = RangeResult()
    names = g.graph["inputs"]
    if len(names) != 1:
        for n in ir.nodes(g):
            res.ranges[n.name] = None
            res.reasons[n.name] = "input domains are supported for single-input models"
        return res
    example = example.detach().to(_DT)
    box = domain.enclosure(example)
    center = domain.center(example).to(_DT)
    res.ranges[names[0]] = box
    forms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    values: dict[str, torch.Tensor] = {names[0]: center}  # values at the center (for affine forms)
    if example.numel() ** 2 <= AFFINE_RANGE_ENTRIES:
        forms[names[0]] = (torch.eye(example.numel(), dtype=_DT), center.reshape(-1))
    const_values: dict[str, Any] = {}
    for n in ir.nodes(g):
        if n.op == "input":
            continue
        if n.op == "constant":
            v = RULES["constant"].forward(ir.as_float64(n))
            const_values[n.name] = v
            res.ranges[n.name] = _map_pair(lambda a, b: Range(a.detach().to(_DT), b.detach().to(_DT)), v, v)
            values[n.name] = v
            continue
        ins = [res.ranges.get(i) for i in n.inputs]
        missing = [i for i, r in zip(n.inputs, ins, strict=True) if r is None]
        if missing:
            res.ranges[n.name] = None
            res.reasons[n.name] = res.reasons.get(missing[0], f"no range for {missing[0]}")
            continue
        try:
            r = _range_of(n, ins)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot handle these ranges: no range, said why
            r = None
            res.reasons[n.name] = f"range rule of {n.op} failed at {n.name} ({type(exc).__name__}: {exc})"
        if r is None:
            res.ranges[n.name] = None
            res.reasons.setdefault(n.name, f"no range rule for {n.op} (node {n.name}, {n.source or n.origin})")
            continue
        if isinstance(r, Range):
            try:
                form = _affine_jacobian(n, g, forms, values) if forms else None
            except Exception:  # noqa: BLE001 - exact affine form is an optional tightening
                form = None
            if form is not None:
                a_mat, yc = form
                forms[n.name] = (a_mat, yc)
                values[n.name] = yc.reshape(r.lo.shape)
                c_flat = center.reshape(-1)
                lin = domain.linear_range(a_mat, example)  # a x over the domain
                shift = yc - a_mat @ c_flat
                err = ROUNDING_MARGIN * (yc.abs() + a_mat.abs() @ c_flat.abs())
                lo = (lin.lo + shift - err).reshape(r.lo.shape)
                hi = (lin.hi + shift + err).reshape(r.lo.shape)
                r = Range(torch.maximum(r.lo, lo), torch.minimum(r.hi, hi))
                res.exact_affine.add(n.name)
            if overrides and n.name in overrides:
                o = overrides[n.name]
                r = Range(torch.maximum(r.lo, o.lo.reshape(r.lo.shape)), torch.minimum(r.hi, o.hi.reshape(r.hi.shape)))
        res.ranges[n.name] = r
    res.seconds = time.perf_counter() - t0
    return res


__all__ = ["AFFINE_RANGE_ENTRIES", "RangeResult", "monotone_range", "propagate"]
