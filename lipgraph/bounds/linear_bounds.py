"""Backward linear bounds (CROWN-style) of a chain's outputs over an input domain.

For a graph whose output is a chain ``x -> h_1 -> ... -> h_k`` (every node on the path reads one variable
input; the others are constants) of affine ops and elementwise activations, each output entry ``o`` is bounded
below by a linear function of the input, ``o(x) >= a . x + c``, built backward from the output:

* an affine node ``h = A z + b`` turns ``lam . h`` into ``(A^T lam) . z + lam . b`` (``A^T lam`` by a
  vector-Jacobian product of the node's forward, in float64);
* an activation ``h = s(z)`` with ``z`` in ``[l, u]`` (the pre-activation range, from
  :func:`lipgraph.bounds.ranges.propagate` and, with ``intermediate=True``, tightened by this same backward
  pass from that node) is replaced per neuron by a line below ``s`` (where ``lam >= 0``) or above it
  (``lam < 0``): ReLU and leaky ReLU (slope ``a <= 1``, convex) get the chord above and a line
  ``alpha z`` below with ``alpha`` in ``[a, 1]`` (CROWN's adaptive choice, then optimised by projected
  gradient ascent on the bound, ``alpha_steps`` steps: every ``alpha`` in ``[a, 1]`` is sound, so the
  optimisation only tightens); other activations with per-neuron derivative intervals ``[s_lo, s_hi]`` on
  ``[l, u]`` get ``s(l) + s_lo (z - l)`` below and ``s(l) + s_hi (z - l)`` above (or the same anchored at
  ``u`` with the slopes swapped, whichever is tighter at the midpoint): sound by the mean value theorem;
* at the input, ``a . x`` is minimised exactly over the domain (:meth:`Domain.linear_range`).

Upper bounds are lower bounds of ``-o``. Soundness, floating point included: each line of an activation is
checked at both ends of its interval and moved outward by what the check shows plus a relative margin; every
vector-Jacobian product ``A^T lam`` is computed in float64 with an error of at most ``GAMMA |A|^T |lam|``
per entry (``|A|`` is the op with its parameters' absolute values, or ``A`` itself for an op with a
nonnegative matrix), and the bound subtracts ``GAMMA (|A|^T |lam|) . max |z|`` over the range of ``z`` for it,
and ``GAMMA |lam| . |b|`` for the offset. Only ops whose ``|A|`` is known this way take part
(:data:`ABS_PARAM_OPS`, and affine ops flagged ``monotone``, whose matrices are nonnegative); anything else
gives None.

Reference: Zhang et al., "Efficient Neural Network Robustness Certification with General Activation
Functions" (CROWN, NeurIPS 2018); Xu et al., "Fast and Complete" (alpha-CROWN, ICLR 2021).
"""

from __future__ import annotations

import copy
import heapq
import math
from dataclasses import dataclass

import networkx as nx
import torch

from .. import ir
from ..domains import Domain, Range
from ..ops import RULES
from .ranges import RangeResult, propagate

_DT = torch.float64
#: Relative error of one float64 dot product or vector-Jacobian product entry against the sum of its terms'
#: sizes: ``n * 2^-53`` for ``n`` terms; 1e-10 covers fan-ins below 9e5.
GAMMA = 1e-10
#: Relative margin on an activation's value at one point (float64 activations are accurate to a few ulp).
VALUE_MARGIN = 1e-9
#: Affine ops whose matrix entries are each one parameter value or zero (batch_norm: one channel's
#: ``w / sqrt(var + eps)``), so ``|A|`` is the op run with every floating parameter replaced by its absolute value.
ABS_PARAM_OPS = frozenset({"linear", "conv", "conv_transpose", "batch_norm", "scale", "matmul_const"})
#: Ops whose matrix is a scalar times a nonnegative one (the identity with ``add``'s coefficient) that are not
#: flagged monotone in the registry. For these and the monotone affine ops ``|A|^T |lam| = |A^T |lam||``.
NONNEGATIVE_OPS = frozenset({"identity", "add"})
#: Tuple-valued ops (no single tensor to pull back through).
TUPLE_OPS = frozenset({"split", "unbind", "tuple_getitem", "output"})
#: Most pre-activation neurons whose ranges ``intermediate=True`` tightens (two backward passes each).
INTERMEDIATE_NEURONS = 4096
#: Projected-gradient steps on the ReLU lower slopes, and the step size.
ALPHA_STEPS = 20
ALPHA_LR = 0.1


@dataclass
class LinearBound:
    """``lower[i] <= output_i(x)`` (flattened output) for every ``x`` of the domain; ``upper`` likewise when
    asked for. ``tightened``: activation inputs whose ranges the intermediate passes tightened."""

    lower: torch.Tensor
    upper: torch.Tensor | None
    tightened: int = 0


def chain_path(g: nx.DiGraph, end: str | None = None) -> list[str] | None:
    """The nodes from the first op after the input to ``end`` (default: the node the output reads), when ``end``
    is a chain of the input (each of them reads exactly one non-constant node and every op takes part in the
    backward pass), else None."""
    out = ir.node(g, g.graph["output"])
    if len(g.graph["inputs"]) != 1:
        return None
    if end is None:
        if len(out.inputs) != 1:
            return None
        end = out.inputs[0]
    path: list[str] = []
    v = end
    while v != g.graph["inputs"][0]:
        n = ir.node(g, v)
        var = [i for i in n.inputs if ir.node(g, i).op != "constant"]
        if len(var) != 1 or not _supported(n):
            return None
        path.append(v)
        v = var[0]
    return path[::-1]


def _supported(n: ir.IRNode) -> bool:
    rule = RULES.get(n.op)
    if rule is None or n.attrs.get("dtype") is not None or n.op in TUPLE_OPS:  # a cast rounds: not affine
        return False
    if rule.affine:
        return n.op in ABS_PARAM_OPS or n.op in NONNEGATIVE_OPS or rule.monotone
    return rule.neuron_slopes is not None


def _is_activation(n: ir.IRNode) -> bool:
    return not RULES[n.op].affine


class _Chain:
    """The path's float64 nodes, constant operands and ranges, and the backward pass over a prefix of it."""

    def __init__(self, g: nx.DiGraph, path: list[str], ranges: RangeResult, domain: Domain,
                 example: torch.Tensor) -> None:
        self.g, self.path, self.domain = g, path, domain
        self.example = example.detach().to(_DT)
        self.input = g.graph["inputs"][0]
        self.n64 = {v: ir.as_float64(ir.node(g, v)) for v in path}
        self.consts = {}
        for v in path:
            for i in ir.node(g, v).inputs:
                c = ir.node(g, i)
                if c.op == "constant":
                    self.consts[i] = RULES["constant"].forward(ir.as_float64(c)).detach().to(_DT)
        self.splits: dict[str, torch.Tensor] = {}  # a branch's fixed neurons (see backward)
        self.ranges: dict[str, Range] = {}
        for v in [self.input, *path]:
            r = ranges.ranges.get(v)
            if isinstance(r, Range):
                self.ranges[v] = r

    def out_shape(self, k: int) -> tuple[int, ...]:
        """The output shape of ``path[k]``."""
        return tuple(ir.node(self.g, self.path[k]).out_shape)

    def var_of(self, v: str) -> str:
        return next(i for i in ir.node(self.g, v).inputs if i not in self.consts)

    def _apply(self, v: str, z: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        n = self.n64[v]
        if absolute and n.op in ABS_PARAM_OPS:
            n = ir.IRNode(n.name, n.op, n.inputs, n.attrs,
                          {k: (t.abs() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                           for k, t in n.params.items()}, n.source, n.origin, n.in_shapes, n.out_shape)
        args = [z if i not in self.consts else self.consts[i] for i in n.inputs]
        return RULES[n.op].forward(n, *args)

    def in_shape(self, v: str) -> tuple[int, ...]:
        """The shape of the variable input of ``v``."""
        u = self.var_of(v)
        return tuple(ir.node(self.g, u).out_shape) if u != self.input else tuple(self.example.shape)

    def _zero_input(self, v: str) -> torch.Tensor:
        return torch.zeros(self.in_shape(v), dtype=_DT)

    def _transpose(self, v: str, lam: torch.Tensor, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^T lam, b)`` for the affine node ``v`` (``|A|^T lam`` when ``absolute``), ``lam`` batched on dim 0."""
        z0 = self._zero_input(v)
        b = self._apply(v, z0)
        n = self.n64[v]
        w = n.params.get("weight")
        if n.op == "linear" and isinstance(w, torch.Tensor) and w.dim() == 2:  # y = x W^T + b: lam W, directly
            return (lam @ (w.abs() if absolute else w)).reshape(lam.shape[0], *z0.shape), b
        if absolute and n.op in ABS_PARAM_OPS:
            b_abs = self._apply(v, z0, absolute=True)

            def lin(z: torch.Tensor) -> torch.Tensor:
                return self._apply(v, z, absolute=True) - b_abs
        else:
            def lin(z: torch.Tensor) -> torch.Tensor:
                return self._apply(v, z) - b
        _, pullback = torch.func.vjp(lin, z0)
        at = torch.vmap(lambda w: pullback(w)[0])(lam)
        if absolute and n.op not in ABS_PARAM_OPS:  # c P with P >= 0: |A|^T |lam| = |A^T |lam||
            at = at.abs()
        return at, b

    def lines(self, v: str, lam: torch.Tensor, alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch, per-neuron ``(slope, intercept)`` of the activation ``v``: lines below where ``lam >= 0``,
        above where ``lam < 0``, valid on the input range (checked at its ends, moved outward)."""
        n = self.n64[v]
        r = self.ranges[self.var_of(v)]
        lo, hi = r.lo.reshape(lam.shape[1:]), r.hi.reshape(lam.shape[1:])
        f = RULES[n.op].forward
        flo, fhi = f(n, lo), f(n, hi)
        a = _negative_slope(n)
        if a is not None:  # convex piecewise linear: the chord above, alpha z below (alpha in [a, 1])
            width = hi - lo
            chord = torch.where(width > 0, (fhi - flo) / torch.where(width > 0, width, 1.0),
                                torch.ones_like(lo))
            up_s = torch.where(lo >= 0, torch.ones_like(lo), torch.where(hi <= 0, torch.full_like(lo, a), chord))
            up_b = torch.where((lo >= 0) | (hi <= 0), torch.zeros_like(lo), flo - up_s * lo)
            up_b = up_b + _violation(flo, fhi, lo, hi, up_s, up_b)
            if alpha is None:
                alpha = torch.where(hi >= -lo, torch.ones_like(lo), torch.full_like(lo, a))
            low_s = torch.where(lo >= 0, torch.ones_like(lo), torch.where(hi <= 0, torch.full_like(lo, a),
                                                                          alpha.clamp(min(a, 1.0), 1.0)))
            low_b = torch.zeros_like(lo)  # max(z, a z) >= alpha z for every z when a <= alpha <= 1: exact
        else:
            s_lo, s_hi = RULES[n.op].neuron_slopes(n, Range(r.lo, r.hi))
            s_lo, s_hi = s_lo.reshape(lo.shape).to(_DT), s_hi.reshape(lo.shape).to(_DT)
            mid = 0.5 * (lo + hi)
            # below: f(l) + s_lo (z - l) or f(u) + s_hi (z - u); above: f(l) + s_hi (z - l) or f(u) + s_lo (z - u)
            use_l = (flo + s_lo * (mid - lo)) >= (fhi + s_hi * (mid - hi))
            low_s = torch.where(use_l, s_lo, s_hi)
            low_b = torch.where(use_l, flo - s_lo * lo, fhi - s_hi * hi)
            use_l_up = (flo + s_hi * (mid - lo)) <= (fhi + s_lo * (mid - hi))
            up_s = torch.where(use_l_up, s_hi, s_lo)
            up_b = torch.where(use_l_up, flo - s_hi * lo, fhi - s_lo * hi)
            low_b = low_b - _margin(flo, fhi, lo, hi, low_s, low_b)
            up_b = up_b + _margin(flo, fhi, lo, hi, up_s, up_b)
        pos = lam >= 0
        return torch.where(pos, low_s, up_s), torch.where(pos, low_b, up_b)

    def backward(self, stop: int, lam: torch.Tensor, alphas: dict[str, torch.Tensor] | None = None,
                 betas: dict[str, torch.Tensor] | None = None,
                 record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Lower bounds of ``lam_k . h_stop(x)`` over the domain for each row ``lam_k`` of ``lam`` (shape
        ``(K, *shape of path[stop])``), from the backward pass through ``path[: stop + 1]``.

        On a branch (:attr:`splits`: per activation, ``+1`` for a neuron fixed active, ``z_i >= 0``, ``-1`` for
        one fixed inactive, ``z_i <= 0``, 0 for free), the ranges are clamped to the branch and ``betas`` (``>= 0``,
        one per neuron and row) add the branch's constraints: on it ``-sign_i z_i <= 0``, so
        ``lam . z >= (lam - beta sign) . z`` (beta-CROWN's multipliers; any ``beta >= 0`` is sound, the bound
        then holds on the branch). ``record``: each activation's coefficient ``lam`` (its output side) is stored."""
        const = torch.zeros(lam.shape[0], dtype=_DT)
        err = torch.zeros(lam.shape[0], dtype=_DT)
        dims = lambda t: tuple(range(1, t.dim()))  # noqa: E731 - sums over everything but the batch
        for k in range(stop, -1, -1):
            v = self.path[k]
            n = self.n64[v]
            z = self.var_of(v)
            zmax = self.ranges[z].abs_max.reshape(self.in_shape(v))
            if _is_activation(n):
                alpha = None if alphas is None else alphas.get(v)
                if record is not None:
                    record[v] = lam.detach()
                s, b = self.lines(v, lam, alpha)
                const = const + (lam * b).sum(dims(lam))
                err = err + GAMMA * (lam.abs() * b.abs()).sum(dims(lam))
                lam = lam * s
                if betas is not None and v in betas:
                    lam = lam - betas[v] * self.splits[v].reshape(lam.shape[1:])
                err = err + GAMMA * (lam.abs() * zmax).sum(dims(lam))
            else:
                at, b = self._transpose(v, lam)
                const = const + (lam * b).sum(dims(lam))
                err = err + GAMMA * (lam.abs() * b.abs()).sum(dims(lam))
                with torch.no_grad():
                    mag, _ = self._transpose(v, lam.detach().abs(), absolute=True)
                err = err + GAMMA * (mag * zmax).sum(dims(mag)) * (1 + GAMMA)
                lam = at
        flat = lam.reshape(lam.shape[0], -1)
        lin = _linear_lower(self.domain, flat, self.example)
        err = err + GAMMA * const.abs()
        return lin + const - err


def _linear_lower(domain: Domain, a: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """``min a_k . x`` over the domain, differentiable in ``a`` where the domain's formula is."""
    return domain.linear_range(a, example).lo


def _negative_slope(n: ir.IRNode) -> float | None:
    """The slope ``a <= 1`` of a convex piecewise-linear ``max(z, a z)`` activation, or None."""
    if n.op == "relu":
        return 0.0
    if n.op == "leaky_relu":
        a = float(n.attrs.get("negative_slope", 0.01))
        return a if math.isfinite(a) and a <= 1.0 else None
    return None


def _violation(flo: torch.Tensor, fhi: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    """How far to move a line meant to lie above a convex function on ``[lo, hi]``: the computed
    gap at both ends (a convex function lies below its chord), plus the relative margin."""
    gap = torch.maximum(flo - (s * lo + b), fhi - (s * hi + b)).clamp_min(0.0)
    return gap + _margin(flo, fhi, lo, hi, s, b)


def _margin(flo: torch.Tensor, fhi: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    mag = torch.maximum(flo.abs(), fhi.abs()) + s.abs() * torch.maximum(lo.abs(), hi.abs()) + b.abs()
    return VALUE_MARGIN * mag + 1e-300


def linear_bounds(g: nx.DiGraph, domain: Domain, example: torch.Tensor, *, upper: bool = True,
                  intermediate: bool = True, alpha_steps: int = ALPHA_STEPS,
                  ranges: RangeResult | None = None, enough: float | None = None) -> LinearBound | None:
    """Certified lower (and upper) bounds of every entry of the output of ``g`` over ``domain``.

    Parameters
    ----------
    g : the IR; its output must be a chain of supported ops (:func:`chain_path`), else None is returned.
    domain, example : the input domain and an input of the model's shape.
    upper : also bound the output from above.
    intermediate : tighten each activation's pre-activation range by a backward pass from it (when the chain
        has at most :data:`INTERMEDIATE_NEURONS` such neurons), before bounding the output.
    alpha_steps : projected-gradient steps on the ReLU lower slopes, per output bound (0: CROWN's choice).
    ranges : precomputed :func:`propagate` result over the same domain.
    enough : stop optimising the lower bounds once every one exceeds it (a check that only needs the sign, as
        certify's ``f_y - f_j > 0``, passes ``0.0``); the bounds returned are then sound but not the best.

    Returns
    -------
    A :class:`LinearBound`, or None when the output is not such a chain or a range is missing.
    """
    prepared = _output_chain(g, domain, example, ranges, intermediate)
    if prepared is None:
        return None
    ch, eye, tightened = prepared
    last = len(ch.path) - 1
    lower = _optimised(ch, last, eye, alpha_steps, enough)
    up = -_optimised(ch, last, -eye, alpha_steps) if upper else None
    box = ch.ranges[ch.path[-1]]  # the interval range holds too: keep the tighter end of each
    lower = torch.maximum(lower, box.lo.reshape(-1))
    up = torch.minimum(up, box.hi.reshape(-1)) if up is not None else None
    return LinearBound(lower, up, tightened)


def _output_chain(g: nx.DiGraph, domain: Domain, example: torch.Tensor, ranges: RangeResult | None,
                  intermediate: bool) -> tuple[_Chain, torch.Tensor, int] | None:
    """The chain to the output of ``g`` with its ranges (tightened by :func:`tightened_ranges` when
    ``intermediate``), the identity rows of its output, and how many neurons the tightening moved; None when the
    output is not a chain of supported ops or a range is missing."""
    path = chain_path(g)
    if not path:
        return None
    if ranges is None:
        ranges = propagate(g, domain, example)
    ch = _Chain(g, path, ranges, domain, example)
    if any(v not in ch.ranges for v in [ch.input, *path]):
        return None
    tightened = 0
    if intermediate:
        for name, r in tightened_ranges(g, domain, example, ranges).items():
            old = ch.ranges[name]
            tightened += int(((r.lo > old.lo) | (r.hi < old.hi)).sum())
            ch.ranges[name] = r
    shape = ch.out_shape(len(path) - 1)
    size = math.prod(shape)
    return ch, torch.eye(size, dtype=_DT).reshape(size, *shape), tightened


def tightened_ranges(g: nx.DiGraph, domain: Domain, example: torch.Tensor, ranges: RangeResult, *,
                     budget: int = INTERMEDIATE_NEURONS) -> dict[str, Range]:
    """Pre-activation ranges tightened by backward linear bounds: for each activation (graph order) whose input
    is a chain of the input (:func:`chain_path`) and not already an exact affine range, the lower and upper
    bound of every input neuron by the backward pass through that chain (CROWN's slopes, the ranges tightened
    so far), intersected with its range. At most ``budget`` neurons in all (two passes of that many rows).

    Returns ``{node: Range}`` for the activation inputs it tightened (each an enclosure over the domain);
    empty when none qualifies."""
    out: dict[str, Range] = {}
    spent = 0
    known = {k: v for k, v in ranges.ranges.items() if isinstance(v, Range)}
    for n in ir.nodes(g):
        rule = RULES.get(n.op)
        if rule is None or rule.affine or rule.neuron_slopes is None or len(n.inputs) != 1:
            continue
        v = n.inputs[0]
        if v in ranges.exact_affine or v not in known or v == g.graph["inputs"][0]:
            continue
        size = int(known[v].lo.numel())
        if spent + size > budget:
            break
        path = chain_path(g, v)
        if not path or any(p not in known for p in [g.graph["inputs"][0], *path]):
            continue
        ch = _Chain(g, path, ranges, domain, example)
        ch.ranges.update({k: r for k, r in out.items() if k in ch.ranges})
        shape = tuple(known[v].lo.shape)
        eye = torch.eye(size, dtype=_DT).reshape(size, *shape)
        with torch.no_grad():
            lo = ch.backward(len(path) - 1, eye)
            hi = -ch.backward(len(path) - 1, -eye)
        r = ch.ranges[v]
        out[v] = Range(torch.maximum(r.lo, lo.reshape(shape)), torch.minimum(r.hi, hi.reshape(shape)))
        spent += size
    return out


def _optimised(ch: _Chain, last: int, lam: torch.Tensor, steps: int, enough: float | None = None) -> torch.Tensor:
    """The backward pass's lower bounds, the ReLU lower slopes optimised by projected gradient ascent (every
    iterate is sound; the best value of each row is kept), stopped once every row exceeds ``enough``."""
    with torch.no_grad():
        best = ch.backward(last, lam)
    relus = [v for v in ch.path[: last + 1] if _is_activation(ch.n64[v]) and _negative_slope(ch.n64[v]) is not None]
    if steps <= 0 or not relus or (enough is not None and bool((best > enough).all())):
        return best
    betas = {v: torch.zeros(lam.shape[0], *ch.in_shape(v), dtype=_DT, requires_grad=True)
             for v in ch.splits if v in relus} or None
    alphas: dict[str, torch.Tensor] = {}
    for v in relus:
        r = ch.ranges[ch.var_of(v)]
        a = _negative_slope(ch.n64[v])
        shape = (lam.shape[0], *ch.in_shape(v))
        # started at the chord's slope (inside [a, 1] for an unstable neuron): from CROWN's vertex choice the
        # projected gradient often cannot move (measured: no gain on 3-layer ReLU nets); its value is kept in best
        width = (r.hi - r.lo).clamp_min(1e-300)
        init = ((r.hi - float(a) * r.lo) / width).clamp(float(a), 1.0).reshape(shape[1:]).to(_DT)
        alphas[v] = init.expand(shape).clone().requires_grad_(True)
    opt = torch.optim.Adam([*alphas.values(), *(betas or {}).values()], lr=ALPHA_LR)
    for _ in range(steps):
        opt.zero_grad()
        val = ch.backward(last, lam, alphas, betas)
        best = torch.maximum(best, val.detach())
        if enough is not None and bool((best > enough).all()):
            return best
        (-val.sum()).backward()
        opt.step()
        with torch.no_grad():
            for v, t in alphas.items():
                t.clamp_(float(_negative_slope(ch.n64[v])), 1.0)
            for t in (betas or {}).values():
                t.clamp_(min=0.0)
    with torch.no_grad():
        best = torch.maximum(best, ch.backward(last, lam, alphas, betas))
    return best


#: Branches :func:`prove_above` may bound (each one a backward pass with its slope and multiplier optimisation):
#: counted work, not seconds. Measured on the shared MNIST network's margins: see ``certify.MARGIN_BRANCHES``.
BRANCHES = 64


def _branch(ch: _Chain, base: dict[str, Range], splits: dict[str, torch.Tensor]) -> _Chain:
    """A shallow copy of ``ch`` on the branch ``splits``: ranges clamped (``z >= 0`` where the sign is +1,
    ``z <= 0`` where it is -1), everything else shared."""
    sub = copy.copy(ch)
    sub.ranges = dict(base)
    sub.splits = splits
    for v, sign in splits.items():
        z = ch.var_of(v)
        r = base[z]
        lo, hi = r.lo.reshape(-1), r.hi.reshape(-1)
        lo = torch.where(sign > 0, lo.clamp_min(0.0), lo)
        hi = torch.where(sign < 0, hi.clamp_max(0.0), hi)
        sub.ranges[z] = Range(lo.reshape(r.lo.shape), hi.reshape(r.hi.shape))
    return sub


def prove_above(g: nx.DiGraph, domain: Domain, example: torch.Tensor, threshold: float = 0.0, *,
                branches: int = BRANCHES, alpha_steps: int = ALPHA_STEPS,
                ranges: RangeResult | None = None) -> bool | None:
    """Whether every output entry of ``g`` is ``> threshold`` on all of ``domain``, proved by branch and bound
    over the unstable ReLU / leaky-ReLU neurons of its chain.

    The root is :func:`linear_bounds`'s lower bound (``branches=1``: that bound alone). Each branch fixes some
    neurons' phases (``z_i >= 0`` or ``z_i <= 0``); the domain is the union of the branches, so the claim holds
    once it is proved on every leaf. A branch is bounded by the same backward pass (its lines exact for the fixed
    neurons) with the branch's constraints added by multipliers (see :meth:`_Chain.backward`); the slopes and
    multipliers are optimised together, every iterate sound. The branch with the lowest bound is split first, on
    the free unstable neuron with the largest ``|coefficient| * u l / (u - l)`` (the gap of its relaxation,
    weighted by how much the bound reads it: BaBSR's choice). At most ``branches`` branches are bounded (work,
    not seconds). A bound proves its branch only when it is finite.

    Returns True when proved, False when a branch stays at or below ``threshold`` after the budget (not a
    counterexample: the claim may still hold), None when the output is not a chain of supported ops.
    """
    prepared = _output_chain(g, domain, example, ranges, True)
    if prepared is None:
        return None
    ch, eye, _ = prepared
    last = len(ch.path) - 1
    box = ch.ranges[ch.path[-1]].lo.reshape(-1)
    base = dict(ch.ranges)
    relus = [v for v in ch.path if _is_activation(ch.n64[v]) and _negative_slope(ch.n64[v]) is not None]

    def bound(splits: dict[str, torch.Tensor]) -> float:
        low = torch.maximum(_optimised(_branch(ch, base, splits), last, eye, alpha_steps, threshold), box)
        return float(low.min()) if bool(torch.isfinite(low).all()) else -math.inf

    def pick(splits: dict[str, torch.Tensor]) -> tuple[str, int] | None:
        record: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            _branch(ch, base, splits).backward(last, eye, record=record)
        best, choice = 0.0, None
        for v in relus:
            r = base[ch.var_of(v)]
            lo, hi = r.lo.reshape(-1), r.hi.reshape(-1)
            free = (lo < 0) & (hi > 0)
            if v in splits:
                free &= splits[v] == 0
            if not bool(free.any()):
                continue
            gap = torch.where(free, -lo * hi / (hi - lo).clamp_min(1e-300), torch.zeros_like(lo))
            score = gap * record[v].abs().sum(0).reshape(-1)
            i = int(torch.argmax(score))
            if float(score[i]) > best:
                best, choice = float(score[i]), (v, i)
        return choice

    low = bound({})
    if low > threshold:
        return True
    heap: list[tuple[float, int, dict[str, torch.Tensor]]] = [(low, 0, {})]
    counter, spent = 0, 1
    while heap:
        _, _, splits = heapq.heappop(heap)
        if spent >= branches:
            return False
        choice = pick(splits)
        if choice is None:  # every neuron fixed and still not proved
            return False
        v, i = choice
        for sign in (1.0, -1.0):
            if spent >= branches:
                return False
            child = {k: t.clone() for k, t in splits.items()}
            if v not in child:
                child[v] = torch.zeros(base[ch.var_of(v)].lo.numel(), dtype=_DT)
            child[v][i] = sign
            spent += 1
            low = bound(child)
            if low > threshold:
                continue
            counter += 1
            heapq.heappush(heap, (low, counter, child))
    return True

__all__ = ["ALPHA_STEPS", "BRANCHES", "GAMMA", "LinearBound", "chain_path", "linear_bounds", "prove_above",
           "tightened_ranges"]
