"""Interval Jacobian propagation on an input domain: ``L_D(v) <= sup_{x in D} ||J_v(x)||_2``, enclosed.

For every node ``v`` the pass encloses the Jacobian ``J_v(x) = d v / d input`` over all ``x`` of the domain as
an interval matrix ``[Jc - Jr, Jc + Jr]`` (dense float64, ``Jr >= 0``), walking the graph once in its order
with the chain rule in interval arithmetic. Columns are kept batched: a node's enclosure is a pair of
tensors of shape ``(numel(input), *shape(v))`` (column ``j`` is ``d v / d x_j``).

* input: ``J = I``, radius 0; constant: ``J = 0``; a single-tensor output: its input's enclosure.
* linear / conv / conv_transpose: centre ``W Jc`` (the op without bias on every column), radius ``|W| Jr``
  (the same op with ``|W|``).
* any other affine op (``rule.affine``, tensor-valued): its dense linear part ``M_i`` in each variable input,
  materialised as ``f(e_j) - f(0)`` (constants at their values), with an entry error ``dM = margin (|f(e_j)|
  + |f(0)|)`` for the cancellation of that difference; then ``J = sum_i M_i J_i`` in interval arithmetic.
* elementwise activations: the derivative ``d`` lies in the per-neuron interval of
  ``settings.neuron_slopes`` (else the rule's global slope interval): ``J = diag(d) J_in``.
* ``mul_var`` ``a * b``: ``J = diag(b) J_a + diag(a) J_b`` with ``a``, ``b`` in their ranges (broadcasting).
* ``matmul_var`` ``A @ B``: ``dA B + A dB`` with ``A``, ``B`` in their ranges.
* ``softmax``: ``J_sm = diag(p) - p p^T`` per slice, with ``p`` in the softmax's range (entrywise intervals:
  ``p_i (1 - p_i)`` on the diagonal, ``-p_i p_j`` off it).
* layer / rms / group / instance norm: ``J = diag(gamma) (1/s) (I - 11^T/n - t t^T/n) J_in`` per group, the
  middle matrix entrywise enclosed from the input's range (:func:`norm_jacobian`).
* any other op, or an operand without a range: no enclosure, for that node and everything downstream.

Interval products (certified). For ``X in [Xc -+ Xr]``, ``Y in [Yc -+ Yr]`` and a bilinear map ``op`` with
nonnegative structure (``|op(x, y)| <= op(|x|, |y|)``: products, matmuls, the ops with ``|W|``):
``|op(X, Y) - op(Xc, Yc)| <= op(|Xc|, Yr) + op(Xr, |Yc| + Yr)``. The float64 evaluation of ``op(Xc, Yc)`` errs by
at most ``gamma_k op(|Xc|, |Yc|)`` (``k`` terms, ``gamma_k ~ k u < ROUNDING_MARGIN`` for ``k <= 4e6``), so every
product adds ``ROUNDING_MARGIN op(|Xc| + Xr, |Yc| + Yr)`` to the radius, sums add ``ROUNDING_MARGIN (|a| + |b|)``,
and every radius is finally multiplied by ``1 + ROUNDING_MARGIN`` for its own rounding. The materialised
``M`` of a generic affine op assumes ``f(e_j)`` is a few-flop evaluation (selections, scalings, means,
batch norm), so its error is covered by ``dM``.

The bound: for every ``x`` in ``D``, ``J_v(x) = Jc + E`` with ``|E| <= Jr`` entrywise, so
``||J_v(x)||_2 <= ||Jc||_2 + ||E||_2 <= ||Jc||_2 + ||Jr||_2`` (a nonnegative matrix dominates the norm of every
matrix it bounds entrywise); also ``|J_v(x)| <= |Jc| + Jr``, so ``|| |Jc| + Jr ||_2`` bounds it too: the smaller wins.
All norms are certified by :func:`lipgraph.norms.dense_norm`.
With the domain known (``settings.extra["domain"] = (domain, example)``, set by analyze): every enclosed node's
range is intersected with its mean-value range (:func:`mean_value_range`), normalization factors come from the
input's enclosure (:func:`_centred_factors`), and where the second-order rules reach (:func:`second_order`) the
centred form :func:`centred_bound` competes (second-order rules: linear / affine ops, sigmoid, tanh, exact GELU,
mul_var, matmul_var, softmax, layer / rms norm; see :func:`_step2`); up to :data:`ROUNDS` passes feed each node's
best certified bound to its norm consumers' factors (:func:`_rounds`). The relation
``L(v) <= min(||Jc|| + ||Jr||, || |Jc| + Jr ||) * L(input)`` is emitted for every node with an
enclosure (the combinator multiplies by ``L(input) = 1``). Convexity of the domain makes this a Lipschitz
constant on ``D``.

Work limits count entries, never seconds: a node whose enclosure would exceed :data:`JACOBIAN_ENTRIES`
entries (``numel(v) * numel(input)``), or whose materialised linear part would exceed it, stops there with
a record; :data:`TOTAL_ENTRIES` bounds the whole pass. Without a domain (``settings.extra["ranges"]`` unset:
the global analysis) the pass returns no relation, at once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx
import torch

from .. import ir, norms
from ..core import ROUNDING_MARGIN, Settings
from ..domains import Ball, Range
from ..ops import RULES, LocalConstant, slope_interval
from ..ops.normalization import norm_gamma_rows, normalized_factors
from .ranges import propagate as range_pass
from .relations import AlgorithmResult, Relation, Term

#: Largest enclosure (entries of ``Jc``) of one node, and largest materialised linear part of an affine op:
#: 4e6 float64 entries are 32 MB per tensor.
JACOBIAN_ENTRIES = 4_000_000
#: Entries of all enclosures of one pass together; later nodes stop with a record.
TOTAL_ENTRIES = 100_000_000
SOURCE = "jacobian-interval"
_DT = torch.float64
_M = ROUNDING_MARGIN
_WEIGHTED = ("linear", "conv", "conv_transpose")

Enc = tuple[torch.Tensor, torch.Tensor]


class _Stop(Exception):  # noqa: N818 - internal signal: no enclosure at this node, with the reason
    """This node gets no enclosure (the message says why)."""


def _up(r: torch.Tensor) -> torch.Tensor:
    """A radius rounded up for its own float64 evaluation."""
    return r * (1 + _M)


def bilinear(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], xc: torch.Tensor, xr: torch.Tensor,
             yc: torch.Tensor, yr: torch.Tensor) -> Enc:
    """Enclosure of ``op(X, Y)`` for ``X in [xc -+ xr]``, ``Y in [yc -+ yr]``: centre ``op(xc, yc)``, radius
    ``op(|xc|, yr) + op(xr, |yc| + yr) + margin op(|xc| + xr, |yc| + yr)`` (certified for bilinear ``op`` with
    ``|op(x, y)| <= op(|x|, |y|)``; the margin covers the rounding of the centre)."""
    ax, ay = xc.abs(), yc.abs()
    rad = op(ax, yr) + op(xr, ay + yr) + _M * op(ax + xr, ay + yr)
    return op(xc, yc), _up(rad)


def add_enc(a: Enc, b: Enc) -> Enc:
    """Sum of two enclosures, the centre's rounding added to the radius."""
    c = a[0] + b[0]
    return c, _up(a[1] + b[1] + _M * (a[0].abs() + b[0].abs()))


def _pad(t: torch.Tensor, ndim: int, batched: bool) -> torch.Tensor:
    """``t`` with leading singleton dims so that its value part has ``ndim`` dims (after the column dim)."""
    k = t.dim() - (1 if batched else 0)
    if k >= ndim:
        return t
    shape = list(t.shape)
    at = 1 if batched else 0
    return t.reshape(shape[:at] + [1] * (ndim - k) + shape[at:])


def _interval(r: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(r, Range):
        raise _Stop(f"no range for {name}")
    return r.mid, _up(r.rad + _M * r.abs_max)


# --- per-op rules ---------------------------------------------------------------------------------------


def _weighted(n: ir.IRNode, enc: Enc) -> Enc:
    """linear / conv / conv_transpose: centre ``W Jc``, radius ``|W| Jr + margin |W| (|Jc| + Jr)``."""
    n64 = ir.as_float64(n)
    params = {k: v for k, v in n64.params.items() if k != "bias"}
    plain = dataclasses.replace(n64, params=params)
    absw = dataclasses.replace(n64, params={**params, "weight": params["weight"].abs()})
    f = RULES[n.op].forward

    def lin(x: torch.Tensor, node: ir.IRNode) -> torch.Tensor:
        return torch.vmap(lambda col: f(node, col))(x)

    c, r = enc
    centre = lin(c, plain)
    rad = lin(r, absw) + _M * lin(c.abs() + r, absw)
    return centre, _up(rad)


def _linear_parts(n: ir.IRNode, consts: Mapping[str, torch.Tensor], var_pos: list[int]) -> list[Enc]:
    """For each variable argument position: ``(M^T, dM^T)`` of shape ``(numel(u), numel(v))``, with
    ``M = f(e_j) - f(0)`` (other variable arguments 0, constants at their values) and ``dM`` its entry error."""
    n64 = ir.as_float64(n)
    f = RULES[n.op].forward
    shapes = [tuple(s) for s in n.in_shapes]
    base = [consts[i] if i in consts else torch.zeros(shapes[k], dtype=_DT) for k, i in enumerate(n.inputs)]
    y0 = f(n64, *base)
    if not isinstance(y0, torch.Tensor):
        raise _Stop(f"{n.op} is not tensor-valued")
    y0 = y0.reshape(-1)
    out = []
    for k in var_pos:
        nu = math.prod(shapes[k])
        if nu * y0.numel() > JACOBIAN_ENTRIES:
            raise _Stop(f"linear part of {n.op} has {nu * y0.numel()} entries (limit {JACOBIAN_ENTRIES})")
        eye = torch.eye(nu, dtype=_DT).reshape(nu, *shapes[k])

        def at(e: torch.Tensor, k: int = k) -> torch.Tensor:
            args = list(base)
            args[k] = e
            return f(n64, *args).reshape(-1)

        fe = torch.vmap(at)(eye)  # (nu, numel(v))
        mt = fe - y0
        dm = _up(_M * (fe.abs() + y0.abs()) + 2.2250738585072014e-308)
        out.append((mt, dm))
    return out


def _affine(n: ir.IRNode, encs: list[Enc | None], consts: Mapping[str, torch.Tensor]) -> Enc:
    """A generic affine op: ``J = sum_i M_i J_i`` with each ``M_i`` materialised (interval ``[M -+ dM]``)."""
    var_pos = [k for k, i in enumerate(n.inputs) if i not in consts]
    if not var_pos:
        raise _Stop("no variable input")
    total: Enc | None = None
    for k, (mt, dm) in zip(var_pos, _linear_parts(n, consts, var_pos), strict=True):
        c, r = encs[k]
        nc = c.shape[0]
        c2, r2 = c.reshape(nc, -1), r.reshape(nc, -1)
        term = bilinear(torch.matmul, c2, r2, mt, dm)
        total = term if total is None else add_enc(total, term)
    shape = (total[0].shape[0], *tuple(n.out_shape))
    return total[0].reshape(shape), total[1].reshape(shape)


def _activation(n: ir.IRNode, enc: Enc, settings: Settings, refined: Range | None = None) -> Enc:
    """``J = diag(d) J_in`` with ``d`` in its per-neuron interval (or the rule's global slope interval),
    intersected with the rule's per-neuron interval on the refined input range when there is one."""
    shape = tuple(n.in_shapes[0])
    slopes = (settings.neuron_slopes or {}).get(n.name)
    rule = RULES[n.op]
    if refined is not None and rule.neuron_slopes is not None:
        lo2, hi2 = rule.neuron_slopes(n, refined)
        lo2 = torch.broadcast_to(torch.as_tensor(lo2, dtype=_DT), shape)
        hi2 = torch.broadcast_to(torch.as_tensor(hi2, dtype=_DT), shape)
        if slopes is not None:
            lo2 = torch.maximum(lo2, torch.broadcast_to(torch.as_tensor(slopes[0], dtype=_DT), shape))
            hi2 = torch.minimum(hi2, torch.broadcast_to(torch.as_tensor(slopes[1], dtype=_DT), shape))
        if bool((lo2 <= hi2).all()):
            slopes = (lo2, hi2)
    if slopes is not None:
        lo = torch.broadcast_to(torch.as_tensor(slopes[0], dtype=_DT), shape)
        hi = torch.broadcast_to(torch.as_tensor(slopes[1], dtype=_DT), shape)
    else:
        s = slope_interval(n)
        if s is None:
            raise _Stop(f"no slope interval for {n.op}")
        lo, hi = torch.full(shape, float(s[0]), dtype=_DT), torch.full(shape, float(s[1]), dtype=_DT)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise _Stop(f"non-finite slopes at {n.name}")
    return bilinear(torch.mul, enc[0], enc[1], *_centre_radius(lo, hi))


def _centre_radius(lo: torch.Tensor, hi: torch.Tensor) -> Enc:
    """``[lo, hi]`` as centre and radius (rounded up)."""
    dc = 0.5 * (lo + hi)
    return dc, _up(torch.maximum(hi - dc, dc - lo).clamp_min(0.0) + _M * torch.maximum(lo.abs(), hi.abs()))


def _mul_var(n: ir.IRNode, encs: list[Enc], ranges: Mapping[str, Any]) -> Enc:
    """``d(a b) = da * b + a * db`` (elementwise, broadcast), ``a``, ``b`` in their ranges."""
    nd = len(n.out_shape)
    (ac, ar), (bc, br) = (_interval(ranges.get(i), i) for i in n.inputs)
    ta = bilinear(torch.mul, _pad(encs[0][0], nd, True), _pad(encs[0][1], nd, True), _pad(bc, nd, False),
                  _pad(br, nd, False))
    tb = bilinear(torch.mul, _pad(encs[1][0], nd, True), _pad(encs[1][1], nd, True), _pad(ac, nd, False),
                  _pad(ar, nd, False))
    return add_enc(ta, tb)


def _matmul_var(n: ir.IRNode, encs: list[Enc], ranges: Mapping[str, Any]) -> Enc:
    """``d(A B) = dA B + A dB``, ``A``, ``B`` in their ranges (both at least 2-d)."""
    if any(len(s) < 2 for s in n.in_shapes):
        raise _Stop("matmul_var of a vector")
    nd = len(n.out_shape)
    (ac, ar), (bc, br) = (_interval(ranges.get(i), i) for i in n.inputs)
    ta = bilinear(torch.matmul, _pad(encs[0][0], nd, True), _pad(encs[0][1], nd, True), _pad(bc, nd, False),
                  _pad(br, nd, False))
    tb = bilinear(lambda x, a: torch.matmul(a, x), _pad(encs[1][0], nd, True), _pad(encs[1][1], nd, True),
                  _pad(ac, nd, False), _pad(ar, nd, False))
    return add_enc(ta, tb)


def softmax_jacobian(p: Range) -> Enc:
    """Entrywise enclosure ``(centre, radius)`` of ``diag(p) - p p^T`` over ``p`` in ``p`` (last dim: the softmax
    dim; result ``(..., k, k)``): ``p_i (1 - p_i)`` on the diagonal (increasing up to 1/2), ``-p_i p_j`` off it."""
    lo, hi = p.lo.clamp(0.0, 1.0), p.hi.clamp(0.0, 1.0)
    k = lo.shape[-1]
    off_lo = -(hi[..., :, None] * hi[..., None, :])
    off_hi = -(lo[..., :, None] * lo[..., None, :])

    def g(t: torch.Tensor) -> torch.Tensor:
        return t * (1 - t)

    d_lo = torch.minimum(g(lo), g(hi))
    d_hi = g(torch.minimum(torch.maximum(torch.full_like(lo, 0.5), lo), hi))
    eye = torch.eye(k, dtype=torch.bool)
    m_lo = torch.where(eye, torch.diag_embed(d_lo), off_lo)
    m_hi = torch.where(eye, torch.diag_embed(d_hi), off_hi)
    c = 0.5 * (m_lo + m_hi)
    r = torch.maximum(m_hi - c, c - m_lo).clamp_min(0.0) + 4 * _M * torch.maximum(m_lo.abs(), m_hi.abs())
    return c, _up(r + 2.2250738585072014e-308)


def _softmax(n: ir.IRNode, enc: Enc, ranges: Mapping[str, Any]) -> Enc:
    """``J = J_sm J_in`` per slice along the softmax dim, ``J_sm`` entrywise enclosed from the output's range."""
    p = ranges.get(n.name)
    if not isinstance(p, Range):
        raise _Stop(f"no range for {n.name}")
    nd = len(n.out_shape)
    dim = n.attrs["dim"] % nd
    p_last = Range(p.lo.movedim(dim, -1), p.hi.movedim(dim, -1))
    mc, mr = softmax_jacobian(p_last)
    c, r = enc[0].movedim(dim + 1, -1), enc[1].movedim(dim + 1, -1)

    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.matmul(m, x[..., None])[..., 0]

    oc, orad = bilinear(op, c, r, mc, mr)
    return oc.movedim(-1, dim + 1), orad.movedim(-1, dim + 1)


_NORMS = ("layer_norm", "rms_norm", "group_norm", "instance_norm")


def _interval_mul(alo: torch.Tensor, ahi: torch.Tensor, blo: torch.Tensor,
                  bhi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a] * [b]`` entrywise (the four corners; rounding left to the caller's margin)."""
    corners = torch.stack([alo * blo, alo * bhi, ahi * blo, ahi * bhi])
    return corners.amin(dim=0), corners.amax(dim=0)


def norm_jacobian(n: ir.IRNode, r: Range, factors: tuple[torch.Tensor, ...] | None = None) -> Enc:
    """Entrywise enclosure ``(centre, radius)``, shape ``(groups, n, n)``, of the per-group Jacobian of a
    normalization over the input range ``r``: ``J = diag(gamma) (1/s) (I - 11^T/n - t t^T/n)`` (no ``11^T/n``
    for RMSNorm), ``t = (x - mu)/s`` and ``s = sqrt(var + eps)`` in the enclosures of
    :func:`~lipgraph.ops.normalization.normalized_factors`. Interval arithmetic entry by entry: ``t_i t_j``,
    then ``delta_ij - 1/n - t_i t_j / n``, then times ``1/s in [1/s_hi, 1/s_lo]`` and ``gamma_i``; every step
    a few flops, covered by a radius margin of ``16 margin max(|lo|, |hi|)`` (certified)."""
    shape = tuple(r.lo.shape)
    t_lo, t_hi, s_lo, s_hi = normalized_factors(n, r) if factors is None else factors
    gamma = norm_gamma_rows(n, shape)
    k = t_lo.shape[1]
    p_lo, p_hi = _interval_mul(t_lo[:, :, None], t_hi[:, :, None], t_lo[:, None, :], t_hi[:, None, :])
    eye = torch.eye(k, dtype=_DT)
    base = eye if n.op == "rms_norm" else eye - 1.0 / k
    a_lo, a_hi = base - p_hi / k, base - p_lo / k
    inv_lo, inv_hi = (1.0 / s_hi)[:, :, None], (1.0 / s_lo)[:, :, None]
    m_lo, m_hi = _interval_mul(a_lo, a_hi, inv_lo, inv_hi)
    g = gamma[:, :, None]
    m_lo, m_hi = torch.minimum(g * m_lo, g * m_hi), torch.maximum(g * m_lo, g * m_hi)
    c = 0.5 * (m_lo + m_hi)
    rad = torch.maximum(m_hi - c, c - m_lo).clamp_min(0.0) + 16 * _M * torch.maximum(m_lo.abs(), m_hi.abs())
    return c, _up(rad + 2.2250738585072014e-308)


def _rho(domain: Any) -> float:
    """``sup_{x in D} ||x - c||_2`` bounded: the l2 norm of the box half-widths about ``c``, and the radius of an
    l2 ball (the smaller; rounded up)."""
    dom, x = domain
    c = dom.center(x).to(_DT).reshape(-1)
    box = dom.enclosure(x)
    w = torch.maximum(box.hi.reshape(-1) - c, c - box.lo.reshape(-1)).clamp_min(0.0)
    rho = float(torch.linalg.vector_norm(w)) * (1 + 4 * _M)
    if getattr(dom, "norm", None) == "l2":
        rho = min(rho, float(dom.radius))
    return rho


def _group_norm_bound(jc: torch.Tensor, jr: torch.Tensor) -> float:
    """``sup ||M||_2`` over ``M`` in ``[jc -+ jr]`` (matrices), as in :func:`enclosure_bound`; inf if uncertified."""
    value, certified = enclosure_bound((jc.T.contiguous(), jr.T.contiguous()))
    return value if certified else math.inf


def _centred_factors(n: ir.IRNode, r: Range, enc: Enc, at_c: Range, rho: float,
                     cap: float = math.inf) -> tuple[torch.Tensor, ...]:
    """The enclosures of :func:`normalized_factors` tightened by the input's Jacobian enclosure ``enc`` (certified,
    each intersected with the plain one). With ``N = P u`` (``P`` removes the group mean; ``I`` for RMSNorm) and
    ``u(x) - u(c) = M (x - c)``, ``M = int J_u`` in ``[Jc -+ Jr]``, ``||x - c||_2 <= rho``:
    ``N_i(x) in N_i(c) -+ rho (||(P Jc)_i||_2 + ||(|P| Jr)_i||_2)``; ``A = ||N_g||_2 / sqrt(n)`` moves by at most
    ``rho ||M_g||_2 / sqrt(n)`` (``||P|| <= 1``), ``||M_g||`` bounded as in :func:`enclosure_bound` on the group's
    rows and by ``cap`` (a certified ``sup_D ||J_u||_2`` from an earlier round, the centred form: a group's rows are
    a submatrix, ``||M_g|| <= sup ||J_u||``); ``s = sqrt(A^2 + eps)``; ``t = N / s``. Centre values from the range
    pass at ``c`` (``at_c``)."""
    t0_lo, t0_hi, s0_lo, s0_hi = normalized_factors(n, r)
    _, _, sc_lo, sc_hi = normalized_factors(n, at_c)
    jc, jr = matrices(enc)  # (numel(u), nin)
    k = t0_lo.shape[1]
    jc_g, jr_g = jc.reshape(-1, k, jc.shape[1]), jr.reshape(-1, k, jr.shape[1])
    if n.op == "rms_norm":
        pjc, pjr = jc_g, jr_g
    else:
        pjc = jc_g - jc_g.mean(dim=1, keepdim=True)
        pjr = jr_g * (1 - 1 / k) + (jr_g.sum(dim=1, keepdim=True) - jr_g) / k
    dev_n = rho * (torch.linalg.vector_norm(pjc, dim=2) + torch.linalg.vector_norm(pjr, dim=2)
                   + _M * 8 * (torch.linalg.vector_norm(jc_g.abs() + jr_g, dim=2) * k))
    dev_n = _up(dev_n)
    lo_c, hi_c = at_c.lo.reshape(-1, k), at_c.hi.reshape(-1, k)
    if n.op == "rms_norm":
        nlo, nhi = lo_c, hi_c
    else:
        wdt = (hi_c - lo_c) / k
        err = 1e-9 * (lo_c.abs().amax(dim=1, keepdim=True) + hi_c.abs().amax(dim=1, keepdim=True))
        nlo = lo_c - hi_c.mean(dim=1, keepdim=True) + wdt - err
        nhi = hi_c - lo_c.mean(dim=1, keepdim=True) - wdt + err
    nlo, nhi = nlo - dev_n, nhi + dev_n
    mg = torch.tensor([_group_norm_bound(c_, r_) for c_, r_ in zip(jc_g, jr_g, strict=True)], dtype=_DT)
    mg = torch.clamp(mg, max=cap)
    eps = n.attrs["eps"]
    eps = torch.finfo(_DT).eps if eps is None else float(eps)
    a_c_lo = torch.sqrt(torch.clamp(sc_lo[:, 0] ** 2 - eps, min=0.0)) * (1 - 1e-9)
    a_c_hi = torch.sqrt(sc_hi[:, 0] ** 2) * (1 + 1e-9)
    da = _up(rho * mg / math.sqrt(k) * (1 + 1e-9))
    a_lo, a_hi = torch.clamp(a_c_lo - da, min=0.0), a_c_hi + da
    s_lo = torch.maximum(torch.sqrt(a_lo * a_lo + eps) * (1 - 1e-9), s0_lo[:, 0])[:, None]
    s_hi = torch.minimum(torch.sqrt(a_hi * a_hi + eps) * (1 + 1e-9), s0_hi[:, 0])[:, None]
    t_lo = torch.where(nlo >= 0, nlo / s_hi, nlo / s_lo)
    t_hi = torch.where(nhi >= 0, nhi / s_lo, nhi / s_hi)
    t_lo = t_lo - 1e-12 * t_lo.abs() - 1e-300
    t_hi = t_hi + 1e-12 * t_hi.abs() + 1e-300
    return torch.maximum(t_lo, t0_lo), torch.minimum(t_hi, t0_hi), s_lo, s_hi


def _norm(n: ir.IRNode, enc: Enc, ranges: Mapping[str, Any], domain: Any = None,
          at_center: Mapping[str, Any] | None = None, cap: float = math.inf) -> Enc:
    """``J = J_norm J_in`` per normalization group, ``J_norm`` entrywise enclosed (:func:`norm_jacobian`), its
    factors tightened by the input's enclosure when the domain is known (:func:`_centred_factors`)."""
    r = ranges.get(n.inputs[0])
    if not isinstance(r, Range):
        raise _Stop(f"no range for {n.inputs[0]}")
    factors = None
    at_c = (at_center or {}).get(n.inputs[0])
    if domain is not None and isinstance(at_c, Range):
        factors = _centred_factors(n, r, enc, at_c, _rho(domain), cap)
        if not bool((factors[0] <= factors[1]).all() and (factors[2] <= factors[3]).all()):
            factors = None
    mc, mr = norm_jacobian(n, r, factors)
    ncol, k = enc[0].shape[0], mc.shape[-1]
    c, rad = enc[0].reshape(ncol, -1, k), enc[1].reshape(ncol, -1, k)

    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.matmul(m, x[..., None])[..., 0]

    oc, orad = bilinear(op, c, rad, mc, mr)
    return oc.reshape(enc[0].shape), orad.reshape(enc[1].shape)


def _intersect(a: Any, b: Range) -> Range:
    """The intersection of two enclosures of the same values (``b`` alone when ``a`` is not a matching Range)."""
    if not isinstance(a, Range) or tuple(a.lo.shape) != tuple(b.lo.shape):
        return b
    lo, hi = torch.maximum(a.lo, b.lo), torch.minimum(a.hi, b.hi)
    if not bool((lo <= hi).all()):  # cannot happen for two sound enclosures; keep the first
        return a
    return Range(lo, hi)


def _with_own_range(n: ir.IRNode, ranges: Mapping[str, Any]) -> Mapping[str, Any]:
    """``ranges`` with the node's own range recomputed by its rule from its (refined) input ranges and
    intersected with the range pass's (both sound enclosures)."""
    rule = RULES[n.op]
    ins = [ranges.get(i) for i in n.inputs]
    if rule.ranges is None or not all(isinstance(r, Range) for r in ins):
        return ranges
    try:
        own = rule.ranges(n, *ins)
    except Exception:  # noqa: BLE001 - no recomputed range: the pass's own stands
        return ranges
    if not isinstance(own, Range):
        return ranges
    return {**ranges, n.name: _intersect(ranges.get(n.name), own)}


def mean_value_range(enc: Enc, at_center: Range, domain: Any, x: torch.Tensor) -> Range:
    """Mean-value enclosure of ``v`` over a convex domain: ``v(x) = v(c) + int_0^1 J_v(c + t(x - c)) (x - c) dt``
    with ``J_v`` in ``[Jc -+ Jr]`` on the domain, so ``v_i(x) in v_i(c) + Jc_i (x - c) -+ Jr_i |x - c|``;
    ``Jc_i (x - c)`` ranges over ``domain.linear_range(Jc, .) - Jc_i c`` (rounding of ``Jc_i c`` added), and
    ``Jr_i |x - c| <= Jr_i w`` (``w``: the half-widths of the domain's box about ``c``), also
    ``<= r ||Jr_i||_2`` on an l2 ball of radius ``r``; ``v(c)`` in ``at_center`` (the range pass at the point ``c``).
    Certified (outward margins)."""
    jc, jr = matrices(enc)
    c = domain.center(x).to(_DT).reshape(-1)
    box = domain.enclosure(x)
    w = torch.maximum(box.hi.reshape(-1) - c, c - box.lo.reshape(-1)).clamp_min(0.0)
    lin = domain.linear_range(jc, x)
    jcc = jc @ c
    err = _M * (jc.abs() @ c.abs()) * 4
    dev = jr @ w
    if getattr(domain, "norm", None) == "l2" and hasattr(domain, "radius"):
        dev = torch.minimum(dev, domain.radius * torch.linalg.vector_norm(jr, dim=1))
    dev = _up(dev * (1 + 4 * _M))
    lo = at_center.lo.reshape(-1) + (lin.lo.reshape(-1) - jcc) - dev - err
    hi = at_center.hi.reshape(-1) + (lin.hi.reshape(-1) - jcc) + dev + err
    shape = tuple(at_center.lo.shape)
    out = Range(lo.reshape(shape), hi.reshape(shape))
    return out.widened(out.abs_max)


# --- second order: the centred (mean-value) form --------------------------------------------------------

_SMOOTH2 = ("sigmoid", "tanh", "gelu")


def _second_slopes(n: ir.IRNode, ranges: Mapping[str, Any], first: Enc) -> Enc:
    """Enclosure of ``f''(u)`` on the input range: sigmoid ``s' (1 - 2 s)``, tanh ``-2 t t'`` with ``s``, ``t`` in
    the node's output range and ``s'``, ``t'`` in the first-derivative enclosure ``first`` (certified: interval
    products, rounding in the radius)."""
    out = ranges.get(n.name)
    if not isinstance(out, Range):
        raise _Stop(f"no range for {n.name}")
    dlo, dhi = first[0] - first[1], first[0] + first[1]
    if n.op == "sigmoid":
        lo, hi = _interval_mul(dlo, dhi, 1 - 2 * out.hi, 1 - 2 * out.lo)
    else:
        lo, hi = _interval_mul(dlo, dhi, -2 * out.hi, -2 * out.lo)
    c, r = _centre_radius(lo, hi)
    return c, _up(r + 4 * _M * torch.maximum(lo.abs(), hi.abs()))


def _slopes_on(n: ir.IRNode, ranges: Mapping[str, Any], settings: Settings) -> Enc:
    """The first-derivative enclosure that :func:`_activation` uses."""
    one = torch.ones((1, *tuple(n.in_shapes[0])), dtype=_DT)
    r = ranges.get(n.inputs[0])
    c, rad = _activation(n, (one, torch.zeros_like(one)), settings, r if isinstance(r, Range) else None)
    return c[0], rad[0]


def _outer(ja: Enc, jb: Enc) -> Enc:
    """``J_a[j] * J_b[k]`` for all column pairs: shape ``(nin, nin, *shape)``."""
    return bilinear(torch.mul, ja[0][:, None], ja[1][:, None], jb[0][None], jb[1][None])


def _flat2(h: Enc) -> Enc:
    return h[0].reshape(-1, *h[0].shape[2:]), h[1].reshape(-1, *h[1].shape[2:])


def _gelu_second(x: torch.Tensor) -> torch.Tensor:
    """``gelu''(x) = phi(x) (2 - x^2)`` (exact GELU), in float64."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (2 - x * x)


def _gelu_second_slopes(n: ir.IRNode, ranges: Mapping[str, Any]) -> Enc:
    """Enclosure of ``gelu''(u) = phi(u) (2 - u^2)`` on the input range ``[lo, hi]`` (exact GELU only): its
    derivative ``phi(u) u (u^2 - 4)`` vanishes only at ``0, -2, 2``, so the extremes on ``[lo, hi]`` are among the
    endpoints and those critical points inside; each value is a few float64 flops plus ``exp`` (relative error far
    below ``1e-12``), covered by a margin ``1e-12 max|value| + 1e-300`` (certified)."""
    if n.attrs.get("approximate", "none") != "none":
        raise _Stop("second order: tanh-approximate gelu")
    r = ranges.get(n.inputs[0])
    if not isinstance(r, Range) or not (torch.isfinite(r.lo).all() and torch.isfinite(r.hi).all()):
        raise _Stop(f"no finite range for {n.inputs[0]}")
    lo, hi = r.lo.to(_DT), r.hi.to(_DT)
    vals = [_gelu_second(lo), _gelu_second(hi)]
    for c in (-2.0, 0.0, 2.0):
        inside = (lo <= c) & (c <= hi)
        v = torch.full_like(lo, float(_gelu_second(torch.tensor(c, dtype=_DT))))
        vals.append(torch.where(inside, v, vals[0]))
    st = torch.stack(vals)
    vlo, vhi = st.amin(dim=0), st.amax(dim=0)
    pad = 1e-12 * torch.maximum(vlo.abs(), vhi.abs()) + 1e-300
    return _centre_radius(vlo - pad, vhi + pad)


def _softmax_second(p: Range) -> Enc:
    """Entrywise enclosure, shape ``(..., k, k, k)`` (indices ``i, j, k``), of the softmax's second derivative
    ``d^2 p_i / ds_j ds_k = p_i [(delta_ij - p_j)(delta_ik - p_k) - p_j (delta_jk - p_k)]`` over ``p`` in the
    range (last dim the softmax dim; certified: interval products of the factors, each a few flops, rounding
    covered by ``16 margin max(|lo|, |hi|)``)."""
    lo, hi = p.lo.clamp(0.0, 1.0), p.hi.clamp(0.0, 1.0)
    k = lo.shape[-1]
    eye = torch.eye(k, dtype=_DT)
    # a_ij = delta_ij - p_j in [delta_ij - hi_j, delta_ij - lo_j]
    a_lo, a_hi = eye - hi[..., None, :], eye - lo[..., None, :]
    # (delta_ij - p_j)(delta_ik - p_k): (..., i, j, k)
    f_lo, f_hi = _interval_mul(a_lo[..., :, :, None], a_hi[..., :, :, None], a_lo[..., :, None, :],
                               a_hi[..., :, None, :])
    # p_j (delta_jk - p_k): (..., j, k), broadcast over i
    g_lo, g_hi = _interval_mul(lo[..., :, None], hi[..., :, None], a_lo, a_hi)
    d_lo, d_hi = f_lo - g_hi[..., None, :, :], f_hi - g_lo[..., None, :, :]
    m_lo, m_hi = _interval_mul(lo[..., :, None, None], hi[..., :, None, None], d_lo, d_hi)
    c = 0.5 * (m_lo + m_hi)
    r = torch.maximum(m_hi - c, c - m_lo).clamp_min(0.0) + 16 * _M * torch.maximum(m_lo.abs(), m_hi.abs())
    return c, _up(r + 2.2250738585072014e-308)


def norm_second(n: ir.IRNode, factors: tuple[torch.Tensor, ...], gamma: torch.Tensor) -> Enc:
    """Entrywise enclosure, shape ``(groups, n, n, n)`` (indices ``i, j, k``), of the second derivative of a
    layer / rms norm per group: with ``t = N/s``, ``N = P x`` (``P = I - 11^T/n``; ``I`` for RMSNorm),
    ``s = sqrt(|N|^2/n + eps)``: ``ds/dx_k = t_k/n``, ``dt_i/dx_j = A_ij/s`` with ``A_ij = P_ij - t_i t_j/n``, so
    ``d^2 y_i / dx_j dx_k = -gamma_i (A_ik t_j + A_jk t_i + A_ij t_k) / (n s^2)``; interval arithmetic entry by entry
    from the enclosures ``factors = (t_lo, t_hi, s_lo, s_hi)`` (certified, rounding covered by a radius margin
    ``32 margin max(|lo|, |hi|)``)."""
    t_lo, t_hi, s_lo, s_hi = factors
    k = t_lo.shape[1]
    eye = torch.eye(k, dtype=_DT)
    base = eye if n.op == "rms_norm" else eye - 1.0 / k
    tt_lo, tt_hi = _interval_mul(t_lo[:, :, None], t_hi[:, :, None], t_lo[:, None, :], t_hi[:, None, :])
    a_lo, a_hi = base - tt_hi / k, base - tt_lo / k  # (G, n, n), symmetric
    # A_ik t_j: (G, i, j, k); A_jk t_i; A_ij t_k
    x1 = _interval_mul(a_lo[:, :, None, :], a_hi[:, :, None, :], t_lo[:, None, :, None], t_hi[:, None, :, None])
    x2 = _interval_mul(a_lo[:, None, :, :], a_hi[:, None, :, :], t_lo[:, :, None, None], t_hi[:, :, None, None])
    x3 = _interval_mul(a_lo[:, :, :, None], a_hi[:, :, :, None], t_lo[:, None, None, :], t_hi[:, None, None, :])
    sum_lo, sum_hi = x1[0] + x2[0] + x3[0], x1[1] + x2[1] + x3[1]
    inv_lo = (1.0 / (s_hi * s_hi * k))[:, :, None, None]
    inv_hi = (1.0 / (s_lo * s_lo * k))[:, :, None, None]
    m_lo, m_hi = _interval_mul(-sum_hi, -sum_lo, inv_lo, inv_hi)
    g = gamma[:, :, None, None]
    m_lo, m_hi = torch.minimum(g * m_lo, g * m_hi), torch.maximum(g * m_lo, g * m_hi)
    c = 0.5 * (m_lo + m_hi)
    r = torch.maximum(m_hi - c, c - m_lo).clamp_min(0.0) + 32 * _M * torch.maximum(m_lo.abs(), m_hi.abs())
    return c, _up(r + 2.2250738585072014e-308)


def _contract2(d1h: Enc, d2: Enc, j: Enc) -> Enc:
    """``H_out[a, b, g, i] = (D1 H_in)[a, b, g, i] + sum_{j, k} D2[g, i, j, k] J[a, g, j] J[b, g, k]`` (the chain rule
    of a map applied per group ``g``), the second term by two nested interval contractions (:func:`bilinear`):
    ``M[a, g, i, k] = sum_j D2[g, i, j, k] J[a, g, j]``, then ``sum_k M[a, g, i, k] J[b, g, k]``; ``d1h`` the first
    term, already enclosed, shape ``(nin, nin, G, n)``."""
    m = bilinear(lambda x, y: torch.einsum("agj,gijk->agik", x, y), j[0], j[1], d2[0], d2[1])
    t = bilinear(lambda x, y: torch.einsum("agik,bgk->abgi", x, y), m[0], m[1], j[0], j[1])
    return add_enc(d1h, t)


def _matmul_var2(n: ir.IRNode, hs: list[Enc], js: list[Enc], ranges: Mapping[str, Any]) -> Enc:
    """``C = A B``: ``d^2 C / dx_j dx_k = H_A[j, k] B + A H_B[j, k] + J_A[j] J_B[k] + J_A[k] J_B[j]`` (matrix
    products; ``A``, ``B`` in their ranges, equal ranks, no batch broadcasting of the enclosures needed)."""
    if not (len(n.in_shapes[0]) == len(n.in_shapes[1]) == len(n.out_shape) >= 2):
        raise _Stop("second order: matmul_var of unequal ranks")
    nin = hs[0][0].shape[0]
    (ac, ar), (bc, br) = (_interval(ranges.get(i), i) for i in n.inputs)
    ha, hb = _flat2(hs[0]), _flat2(hs[1])
    ta = bilinear(torch.matmul, ha[0], ha[1], bc, br)
    tb = bilinear(lambda x, a: torch.matmul(a, x), hb[0], hb[1], ac, ar)
    t = add_enc(ta, tb)
    t = (t[0].reshape(nin, nin, *t[0].shape[1:]), t[1].reshape(nin, nin, *t[1].shape[1:]))
    ab = bilinear(torch.matmul, js[0][0][:, None], js[0][1][:, None], js[1][0][None], js[1][1][None])
    ba = (ab[0].transpose(0, 1), ab[1].transpose(0, 1))
    return add_enc(t, add_enc(ab, ba))


def _apply_rows(m: Enc, x: Enc) -> Enc:
    """``out[..., g, i] = sum_j M[g, i, j] x[..., g, j]`` in interval arithmetic."""
    def op(v: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        return torch.matmul(mm, v[..., None])[..., 0]

    return bilinear(op, x[0], x[1], m[0], m[1])


def _softmax2(n: ir.IRNode, h: Enc, j: Enc, ranges: Mapping[str, Any]) -> Enc:
    """``p = softmax(s)`` per slice: ``H_p = J_sm H_s + D2[J_s, J_s]`` (:func:`softmax_jacobian`,
    :func:`_softmax_second` from the output's range, contracted by :func:`_contract2`)."""
    p = _with_own_range(n, ranges).get(n.name)
    if not isinstance(p, Range):
        raise _Stop(f"no range for {n.name}")
    nd = len(n.out_shape)
    dim = n.attrs["dim"] % nd
    nin = j[0].shape[0]
    p_last = Range(p.lo.movedim(dim, -1), p.hi.movedim(dim, -1))
    moved = tuple(p_last.lo.shape)
    k = moved[-1]
    d1 = tuple(t.reshape(-1, k, k) for t in softmax_jacobian(p_last))
    d2 = tuple(t.reshape(-1, k, k, k) for t in _softmax_second(p_last))
    hl = tuple(t.movedim(dim + 2, -1).reshape(nin, nin, -1, k) for t in h)
    jl = tuple(t.movedim(dim + 1, -1).reshape(nin, -1, k) for t in j)
    out = _contract2(_apply_rows(d1, hl), d2, jl)
    return tuple(t.reshape(nin, nin, *moved).movedim(-1, dim + 2) for t in out)  # type: ignore[return-value]


def _norm2(n: ir.IRNode, h: Enc, j: Enc, ranges: Mapping[str, Any], domain: Any = None,
           at_center: Mapping[str, Any] | None = None, cap: float = math.inf) -> Enc:
    """Layer / rms norm per group: ``H_y = J_norm H_u + D2[J_u, J_u]`` (:func:`norm_jacobian`, :func:`norm_second`
    from the factors' enclosures, tightened as in :func:`_norm` when the domain is known)."""
    r = ranges.get(n.inputs[0])
    if not isinstance(r, Range):
        raise _Stop(f"no range for {n.inputs[0]}")
    factors = normalized_factors(n, r)
    at_c = (at_center or {}).get(n.inputs[0])
    if domain is not None and isinstance(at_c, Range):
        f2 = _centred_factors(n, r, j, at_c, _rho(domain), cap)
        if bool((f2[0] <= f2[1]).all() and (f2[2] <= f2[3]).all()):
            factors = f2
    shape = tuple(r.lo.shape)
    gamma = norm_gamma_rows(n, shape)
    d1 = norm_jacobian(n, r, factors)
    d2 = norm_second(n, factors, gamma)
    k = d1[0].shape[-1]
    nin = j[0].shape[0]
    hl = tuple(t.reshape(nin, nin, -1, k) for t in h)
    jl = tuple(t.reshape(nin, -1, k) for t in j)
    out = _contract2(_apply_rows(d1, hl), d2, jl)
    return out[0].reshape(h[0].shape), out[1].reshape(h[1].shape)


def _step2(n: ir.IRNode, hs: list[Enc | None], js: list[Enc | None], consts: Mapping[str, torch.Tensor],
           ranges: Mapping[str, Any], settings: Settings, nin: int, domain: Any = None,
           at_center: Mapping[str, Any] | None = None, caps: Mapping[str, float] | None = None) -> Enc:
    """Second-order rule: ``H_v[j, k] = d^2 v / dx_j dx_k`` enclosed (``(nin, nin, *shape)``). Linear ops act on
    ``H`` as on ``J``; ``sigmoid``/``tanh``/exact ``gelu``: ``f'(u) H_u + f''(u) J_u[j] J_u[k]``; ``mul_var``:
    ``b H_a + a H_b + J_a[j] J_b[k] + J_b[j] J_a[k]``; ``matmul_var`` likewise with matrix products
    (:func:`_matmul_var2`); ``softmax`` and layer / rms norm: ``D1 H_in + D2[J_in, J_in]`` per slice or group
    (:func:`_softmax2`, :func:`_norm2`); anything else stops (the op may not be twice differentiable)."""
    def back(e: Enc) -> Enc:
        return e[0].reshape(nin, nin, *e[0].shape[1:]), e[1].reshape(nin, nin, *e[1].shape[1:])

    if n.op == "output":
        return hs[0]
    if n.op in _WEIGHTED and len(n.inputs) == 1 and "weight" in n.params:
        return back(_weighted(n, _flat2(hs[0])))
    if n.op in _SMOOTH2 and len(n.inputs) == 1:
        d1 = _slopes_on(n, ranges, settings)
        d2 = _gelu_second_slopes(n, ranges) if n.op == "gelu" else _second_slopes(n, ranges, d1)
        t1 = bilinear(torch.mul, hs[0][0], hs[0][1], *d1)
        jj = _outer(js[0], js[0])
        return add_enc(t1, bilinear(torch.mul, jj[0], jj[1], *d2))
    if n.op == "mul_var" and len(n.inputs) == 2 and all(h is not None for h in hs):
        (ac, ar), (bc, br) = (_interval(ranges.get(i), i) for i in n.inputs)
        if any(tuple(s) != tuple(n.out_shape) for s in n.in_shapes):
            raise _Stop("second order: broadcasting mul_var")
        t = add_enc(bilinear(torch.mul, hs[0][0], hs[0][1], bc, br), bilinear(torch.mul, hs[1][0], hs[1][1], ac, ar))
        ab = _outer(js[0], js[1])
        ba = (ab[0].transpose(0, 1), ab[1].transpose(0, 1))
        return add_enc(t, add_enc(ab, ba))
    if n.op == "matmul_var" and len(n.inputs) == 2 and all(h is not None for h in hs):
        return _matmul_var2(n, hs, js, ranges)
    if n.op == "softmax" and len(n.inputs) == 1:
        return _softmax2(n, hs[0], js[0], ranges)
    if n.op in ("layer_norm", "rms_norm") and len(n.inputs) == 1:
        return _norm2(n, hs[0], js[0], ranges, domain, at_center, (caps or {}).get(n.inputs[0], math.inf))
    rule = RULES.get(n.op)
    if rule is not None and rule.affine and n.op not in ("split", "unbind", "tuple_getitem") and all(
            h is not None for k, h in enumerate(hs) if n.inputs[k] not in consts):
        flat = [_flat2(h) if h is not None else None for h in hs]
        return back(_affine(n, flat, consts))
    raise _Stop(f"no second-order rule for {n.op}")


def _keep_constant(n: ir.IRNode, consts: dict[str, torch.Tensor]) -> None:
    """Record a constant node's float64 value in ``consts`` (tensor-valued constants only)."""
    v = RULES["constant"].forward(ir.as_float64(n))
    if isinstance(v, torch.Tensor):
        consts[n.name] = v.detach().to(_DT)


def second_order(g: nx.DiGraph, ranges: Mapping[str, Any], settings: Settings, encs: Mapping[str, Enc],
                 domain: Any = None, at_center: Mapping[str, Any] | None = None,
                 caps: Mapping[str, float] | None = None) -> dict[str, Enc]:
    """Enclosures of every node's second derivatives over the domain (``(nin, nin, *shape)``), as far as the
    rules of :func:`_step2` reach (small inputs only: ``nin^2 numel(v)`` entries within the work limits)."""
    (inp,) = g.graph["inputs"]
    nin = math.prod(tuple(ir.node(g, inp).out_shape))
    hs: dict[str, Enc] = {}
    if nin ** 3 > JACOBIAN_ENTRIES:  # even the input's (zero) second derivatives exceed the work limit
        return hs
    consts: dict[str, torch.Tensor] = {}
    for n in ir.nodes(g):
        if n.op == "input":
            z = torch.zeros((nin, nin, *tuple(n.out_shape)), dtype=_DT)
            hs[n.name] = (z, z)
            continue
        if n.op == "constant":
            _keep_constant(n, consts)
            continue
        var = [i for i in n.inputs if i not in consts]
        if not var or any(i not in hs or i not in encs for i in var) or n.name not in encs:
            continue
        size = _numel(n.out_shape)
        if size is None or size * nin * nin > JACOBIAN_ENTRIES:
            continue
        try:
            h = _step2(n, [hs.get(i) for i in n.inputs], [encs.get(i) for i in n.inputs], consts, ranges,
                       settings, nin, domain, at_center, caps)
        except Exception:  # noqa: BLE001 - no second-order enclosure here (a _Stop or an op it cannot handle)
            continue
        if torch.isfinite(h[0]).all() and torch.isfinite(h[1]).all():
            hs[n.name] = h
    return hs


def centred_bound(h: Enc, at_center: Enc, rho: float) -> float:
    """``sup_D ||J|| <= ||J(c)|| + rho min(sup ||[H_1 ... H_n]||, sqrt(sum_k sup ||H_k||^2))``: ``J(x) - J(c) =
    int_0^1 sum_k delta_k H_k(c + t delta) dt`` with ``H_k = dJ/dx_k`` in its enclosure on the (convex) domain and
    ``||delta||_2 <= rho``; ``sum_k delta_k H_k = [H_1 ... H_n] (delta (x) I)`` with ``||delta (x) I|| = ||delta||``
    (and Cauchy-Schwarz for the second form); ``||J(c)||`` from the zero-radius enclosure at ``c``, the sups by
    :func:`enclosure_bound` (certified; inf when a norm is not)."""
    jc_val, ok = enclosure_bound(at_center)
    if not ok:
        return math.inf
    wide, ok = enclosure_bound(_flat2(h))  # (numel(v), n*n): columns (j, k), the blocks H_j side by side
    step = math.inf
    if ok:
        step = wide * (1 + 4 * _M)
    total = 0.0
    for k in range(h[0].shape[1]):
        b, ok = enclosure_bound((h[0][:, k], h[1][:, k]))
        if not ok:
            return math.inf
        total += b * b
    step = min(step, math.sqrt(total * (1 + 4 * _M)) * (1 + 4 * _M))
    return (jc_val + rho * step) * (1 + 4 * _M)


# --- the pass -------------------------------------------------------------------------------------------


def _step(n: ir.IRNode, encs: list[Enc | None], consts: Mapping[str, torch.Tensor], ranges: Mapping[str, Any],
          settings: Settings, domain: Any = None, at_center: Mapping[str, Any] | None = None,
          caps: Mapping[str, float] | None = None) -> Enc:
    rule = RULES.get(n.op)
    if rule is None:
        raise _Stop(f"no rule for {n.op}")
    if n.op == "output":
        if len(n.inputs) != 1:
            raise _Stop("output of several tensors")
        return encs[0]
    if not isinstance(n.out_shape, (tuple, list)) or not all(isinstance(d, int) for d in n.out_shape):
        raise _Stop(f"{n.op} is not tensor-valued")
    dtype = n.attrs.get("dtype")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:  # a cast to an integer type jumps
        raise _Stop(f"{n.op} casts to {dtype}: discontinuous")
    if n.op in _WEIGHTED and len(n.inputs) == 1 and "weight" in n.params:
        return _weighted(n, encs[0])
    if n.op in ("mul_var", "matmul_var") and len(n.inputs) == 2:
        fill = [e if e is not None else _zero(n.in_shapes[k], encs) for k, e in enumerate(encs)]
        return (_mul_var if n.op == "mul_var" else _matmul_var)(n, fill, ranges)
    if n.op == "softmax" and len(n.inputs) == 1:
        return _softmax(n, encs[0], _with_own_range(n, ranges))
    if n.op in _NORMS and len(n.inputs) == 1:
        return _norm(n, encs[0], ranges, domain, at_center, (caps or {}).get(n.inputs[0], math.inf))
    if slope_interval(n) is not None and len(n.inputs) == 1:
        r = ranges.get(n.inputs[0])
        return _activation(n, encs[0], settings, r if isinstance(r, Range) else None)
    if rule.affine and n.op not in ("split", "unbind", "tuple_getitem"):
        return _affine(n, encs, consts)
    raise _Stop(f"no interval Jacobian rule for {n.op}")


def _zero(shape: Any, encs: list[Enc | None]) -> Enc:
    ncol = next(e[0].shape[0] for e in encs if e is not None)
    z = torch.zeros((ncol, *tuple(shape)), dtype=_DT)
    return z, z


def propagate(g: nx.DiGraph, ranges: Mapping[str, Any], settings: Settings, domain: Any = None,
              at_center: Mapping[str, Any] | None = None,
              caps: Mapping[str, float] | None = None) -> tuple[dict[str, Enc], dict[str, str]]:
    """Enclosures ``name -> (Jc, Jr)`` (column-batched, see the module doc) and ``name -> reason`` where none.
    With ``domain = (Domain, example)`` and ``at_center`` (the range pass at the domain's center), every enclosed
    node's range is intersected with its mean-value range (:func:`mean_value_range`) before later nodes use it.
    ``caps``: certified ``sup_D ||J_u||_2`` per node from an earlier round (they tighten the norm factors)."""
    ranges = dict(ranges)
    (inp,) = g.graph["inputs"]
    shape = tuple(ir.node(g, inp).out_shape)
    nin = math.prod(shape)
    encs: dict[str, Enc] = {}
    reasons: dict[str, str] = {}
    consts: dict[str, torch.Tensor] = {}
    used = 0
    for n in ir.nodes(g):
        if n.op == "input":
            if nin * nin > JACOBIAN_ENTRIES:
                reasons[n.name] = f"input of {nin} entries: J has {nin * nin} entries (limit {JACOBIAN_ENTRIES})"
                continue
            eye = torch.eye(nin, dtype=_DT).reshape(nin, *shape)
            encs[n.name] = (eye, torch.zeros_like(eye))
            used += nin * nin
            continue
        if n.op == "constant":
            _keep_constant(n, consts)
            continue
        var = [i for i in n.inputs if i not in consts]
        missing = [i for i in var if i not in encs]
        if missing:
            reasons[n.name] = reasons.get(missing[0], f"no enclosure for {missing[0]}")
            continue
        if not var:
            reasons[n.name] = "constant-valued node"
            continue
        size = _numel(n.out_shape) * nin
        if size is None or size > JACOBIAN_ENTRIES or used + size > TOTAL_ENTRIES:
            reasons[n.name] = (f"work limit: enclosure of {size} entries (node limit {JACOBIAN_ENTRIES}, "
                               f"pass limit {TOTAL_ENTRIES}, used {used})")
            continue
        try:
            e = _step(n, [encs.get(i) for i in n.inputs], consts, ranges, settings, domain, at_center, caps)
        except _Stop as exc:
            reasons[n.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a rule that cannot handle this node: no enclosure, said why
            reasons[n.name] = f"interval Jacobian of {n.op} failed ({type(exc).__name__}: {exc})"
            continue
        if not (torch.isfinite(e[0]).all() and torch.isfinite(e[1]).all()):
            reasons[n.name] = "non-finite enclosure"
            continue
        encs[n.name] = e
        used += size
        if domain is not None and at_center is not None and isinstance(at_center.get(n.name), Range):
            try:
                mv = mean_value_range(e, at_center[n.name], domain[0], domain[1])
            except Exception:  # noqa: BLE001 - no refinement: the range pass's range stands
                continue
            if torch.isfinite(mv.lo).all() and torch.isfinite(mv.hi).all():
                ranges[n.name] = _intersect(ranges.get(n.name), mv)
    return encs, reasons


def _numel(shape: Any) -> int | None:
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]  # a single-tensor output
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        return math.prod(shape)
    return None


def matrices(enc: Enc) -> Enc:
    """The enclosure as ``(numel(v), numel(input))`` matrices ``(Jc, Jr)``."""
    c, r = enc
    return c.reshape(c.shape[0], -1).T, r.reshape(r.shape[0], -1).T


def enclosure_bound(enc: Enc) -> tuple[float, bool]:
    """``min(||Jc||_2 + ||Jr||_2, || |Jc| + Jr ||_2)`` (certified when its norms are), rounded up."""
    jc, jr = matrices(enc)
    a, b = norms.dense_norm(jc), norms.dense_norm(jr)
    m = norms.dense_norm(_up(jc.abs() + jr))  # |J| <= |Jc| + Jr entrywise, so ||J|| <= || |Jc| + Jr ||
    best = (a.upper + b.upper) * (1 + _M)
    if m.certified and m.upper < best:
        return m.upper, True
    return best, a.certified and b.certified


def _refined_ranges(g: nx.DiGraph, ranges: Mapping[str, Any], encs: Mapping[str, Enc], at_center: Mapping[str, Any],
                    domain: Any) -> dict[str, Any]:
    """The ranges intersected with every enclosed node's mean-value range, as :func:`propagate` uses them."""
    out = dict(ranges)
    for name, e in encs.items():
        if isinstance(at_center.get(name), Range):
            try:
                mv = mean_value_range(e, at_center[name], domain[0], domain[1])
            except Exception:  # noqa: BLE001 - the range pass's range stands
                continue
            if torch.isfinite(mv.lo).all() and torch.isfinite(mv.hi).all():
                out[name] = _intersect(out.get(name), mv)
    return out


#: Rounds of the domain-aware pass: each feeds its certified node bounds to the next one's norm factors.
ROUNDS = 3


def _rounds(g: nx.DiGraph, ranges: Mapping[str, Any], settings: Settings, domain: Any, at_center: Mapping[str, Any],
            encs: dict[str, Enc], reasons: dict[str, str],
            encs0: Mapping[str, Enc]) -> tuple[dict[str, Enc], dict[str, str], dict[str, float]]:
    """The centred bounds of :func:`second_order`, then up to :data:`ROUNDS` - 1 reruns of :func:`propagate` with
    every node's best certified bound so far as its ``cap`` (the norm factors of its consumers tighten), while some
    bound improves. Every round's enclosures are sound on their own, so the last one stands."""
    rho = _rho(domain)
    centred: dict[str, float] = {}
    caps: dict[str, float] = {}
    for rnd in range(ROUNDS):
        refined = _refined_ranges(g, ranges, encs, at_center, domain)
        for name, h in second_order(g, refined, settings, encs, domain, at_center, caps).items():
            if name in encs0 and ir.node(g, name).op not in ("input", "constant"):
                centred[name] = min(centred.get(name, math.inf), centred_bound(h, encs0[name], rho))
        new = dict(caps)
        for name, e in encs.items():
            value, certified = enclosure_bound(e)
            best = min(value if certified else math.inf, centred.get(name, math.inf))
            if math.isfinite(best):
                new[name] = min(best, new.get(name, math.inf))
        if rnd == ROUNDS - 1 or not any(ir.node(g, n).op in _NORMS for n in encs) or all(
                new[k] >= caps.get(k, math.inf) * (1 - 1e-6) for k in new):
            break
        caps = new
        encs2, reasons2 = propagate(g, ranges, settings, domain, at_center, caps)
        if not set(encs).issubset(encs2):
            break
        encs, reasons = encs2, reasons2
    return encs, reasons, centred


def run(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """Relations ``L(v) <= (||Jc_v|| + ||Jr_v||) L(input)`` for every node with an interval Jacobian on the domain
    (``settings.extra["ranges"]``); none without a domain (see the module doc)."""
    t0 = time.perf_counter()
    settings = settings or Settings()
    rr = settings.extra.get("ranges")
    if rr is None:
        return AlgorithmResult([], [{"method": SOURCE, "skipped": "needs a domain (no ranges: global analysis)"}],
                               time.perf_counter() - t0)
    if len(g.graph["inputs"]) != 1:
        return AlgorithmResult([], [{"method": SOURCE, "skipped": "single-input models only"}],
                               time.perf_counter() - t0)
    domain, at_center = settings.extra.get("domain"), None
    if domain is not None:
        try:
            c = domain[0].center(domain[1]).to(_DT).reshape(tuple(domain[1].shape))
            at_center = range_pass(g, Ball(c, 0.0), domain[1]).ranges
        except Exception:  # noqa: BLE001 - no centre pass: the plain interval pass, without refinements
            domain = None
    encs, reasons = propagate(g, rr.ranges, settings, domain, at_center)
    centred: dict[str, float] = {}
    if domain is not None:
        encs0, _ = propagate(g, at_center, settings)
        encs, reasons, centred = _rounds(g, rr.ranges, settings, domain, at_center, encs, reasons, encs0)
    inp = g.graph["inputs"][0]
    relations: list[Relation] = []
    records: list[dict[str, Any]] = []
    for n in ir.nodes(g):
        if n.name not in encs or n.op in ("input", "constant"):
            continue
        value, certified = enclosure_bound(encs[n.name])
        if certified and centred.get(n.name, math.inf) < value:
            value = centred[n.name]
        if not math.isfinite(value):
            continue
        records.append({"node": n.name, "bound": value, "certified": certified,
                        "radius_max": float(matrices(encs[n.name])[1].abs().max())})
        relations.append(Relation(n.name, (Term(inp, value, certified),), SOURCE, f"interval Jacobian at {n.name}"))
    stopped = {k: v for k, v in reasons.items() if ir.node(g, k).op not in ("constant",)}
    if stopped:
        records.append({"method": SOURCE, "stopped": stopped})
    return AlgorithmResult(relations, records, time.perf_counter() - t0,
                           {"enclosed": len(encs), "stopped": len(stopped)})


__all__ = ["JACOBIAN_ENTRIES", "SOURCE", "TOTAL_ENTRIES", "add_enc", "bilinear", "enclosure_bound", "matrices",
           "norm_jacobian", "propagate", "run", "softmax_jacobian"]
