"""Taylor models of every node's value and Jacobian on an l2 ball around the domain's center (third-order jets).

Interval Jacobians (:mod:`lipgraph.bounds.jacobian_interval`) enclose each entry over the box that holds the
domain, and every product of enclosures widens them again; on an l2 ball in ``n`` dimensions the box is
``sqrt(n)`` times wider than the ball, and through attention and LayerNorm the enclosures grow by orders of
magnitude. A Taylor model keeps every term of the Jacobian up to second order in ``delta = x - c`` exact (of the
value, up to third) and bounds only what is of higher order. For every node ``v`` and every ``x = c + delta``
with ``||delta||_2 <= rho``:

* value: ``v(x) = c_v + A_v delta + G_v[delta, delta] / 2 + e``, ``|e| <= E_v`` entrywise, and past the cubic
  term ``v(x) = c_v + A_v delta + G_v[delta, delta] / 2 + T_v[delta, delta, delta] / 6 + e4``, ``|e4| <= E4_v``;
* Jacobian: ``J_v(x) = A_v + G_v[delta] + T_v[delta, delta] / 2 + F``, ``|F| <= P_v`` entrywise,

where ``A_v = J_v(c)``, ``G_v`` and ``T_v`` (the second and third derivatives at ``c``) are computed in
float64 as forward-mode jets and ``E_v``, ``E4_v``, ``P_v`` collect the Lagrange remainders and every rounding
error. ``E_v`` is lowered to ``cub + E4_v`` where that is smaller, ``cub >= |T_v[delta, delta, delta]| / 6`` (the
spectral norm of each entry's ``n x n^2`` flattening of ``T``): the cubic term is known exactly, so what the rules
bound is of fourth order. On the one-block transformer of ``tests/test_domain_tightness.py`` at radius 0.1 this
takes the value remainder at the second LayerNorm's input from 0.026 to 0.0031 (sampled: 1.3e-5), its own
Jacobian remainder from 1.02 to 0.118 and GELU's from 0.62 to 0.062.
Then for every ``x`` of the ball

    ``||J_v(x)||_2 <= ||A_v||_2 + rho ||G_v||_flat + rho^2 / 2 ||T_v||_flat + ||P_v||_2``

(certified norms, :func:`lipgraph.norms.dense_norm`), or where smaller the Schur-complement bound of
:func:`_schur_bound`, which charges the first-order term only along the top singular direction of ``A_v``
(gated model at radius 0.1: 0.182104 -> 0.177969, attained 0.17637); on a domain inside the ball,
``||P_v||_2`` gives way to the smaller remainder that the chain rule carries with the domain's constants
(:func:`carry_remainders`).
``G[delta]`` has norm ``sup_{|w|=|u|=1} sum w_i G[k, j, i]
u_j delta_k``, at most ``rho`` times the norm of either flattening of ``G``, rows ``i`` against columns
``(k, j)`` or rows ``j`` against ``(k, i)``, since ``||delta (x) u|| = ||delta|| ||u||``; ``||.||_flat`` is the
smaller of the two, and likewise for ``T[delta, delta]`` with ``||delta (x) delta (x) u|| = ||delta||^2``. A
nonnegative matrix dominates the norm of every matrix it bounds entrywise. The ball is convex, so this bounds the
Lipschitz constant of ``x -> v(x)`` on the ball and on every domain inside it (``rho``:
:func:`lipgraph.bounds.mean_value.l2_radius`).

The carry multiplies the partials' norms node by node; through attention that product can be far above the norm
of the derivative it stands for (on the one-block transformer at radius 0.1, 18.5 from the first LayerNorm to
the output where the derivative's norm is at most 0.44). A *seeded tangent* (:class:`Tangent`,
:func:`tangent_bounds`) is a second-order model of ``K(x) = d v / d w`` (``w``'s value perturbed, everything
else as the input gives it) for every descendant ``v`` of a seed ``w``, built by the same rules run on one more
set of coefficients; :func:`carry_remainders` takes the seeds' own remainders out of the product of partials
with it. The domain pass seeds the nodes whose own remainders carry the largest shares to the output
(:data:`TANGENT_SEEDS`, :data:`SEED_SHARE`): on that block the output's remainder falls from 0.42 to 0.046 and
the bound from 0.927 to 0.554 (0.549 with the Schur-complement bound of the polynomial part, below). The
seeds' brackets are added entrywise before the norm is taken (:func:`_seed_part`): 0.549 -> 0.531.

The value remainder past the cubic term is also kept as an *affine form* (:attr:`TaylorModel.noise`): ``e4(x) =
sum_k coef_k xi_k(x) + z(x)``, where each symbol block ``xi_k`` is one elementwise or bilinear rule's own
remainder (``|xi_k| <= box_k``, :func:`_fresh_noise`) and ``|z| <= noise_rest``. Affine ops map the
coefficients exactly; ``s(u)`` multiplies them by ``s'(c_u)`` and a product ``B(a, b)`` maps them to ``B(c_a,
coef_b) + B(coef_a, c_b)``, the rest (``B(a3 - c_a, e4_b) + B(e4_a, b - c_b)``, ``s''`` terms) going into the
node's own symbols. A symbol is the same function of ``x`` wherever it arrives, so its coefficients cancel where
the entrywise rule adds absolute values: through LayerNorm's centring and variance, the attention's products
and the linear layers after them. On the one-block transformer at radius 0.1 the value remainder at the second
LayerNorm's output falls from 0.0194 to 0.00105, that LayerNorm's own Jacobian remainder from 0.118 to 0.032,
GELU's from 0.062 to 0.0072, and the bound from 0.531 to 0.5176 (attained 0.4978: 1.040).

Entrywise bounds the rules use: ``lin = rho ||A[:, i]||_2 >= |A delta|``, ``quad = rho^2 ||G[:, :, i]||_2 / 2
>= |G[delta, delta]| / 2`` (the smaller of the symmetric matrix's largest eigenvalue in absolute value, with a
margin, and its Frobenius norm), ``dev = lin + quad + E >= |v(x) - c_v|``, ``V = |c_v| + dev >= |v(x)|``; for the
Jacobian ``g >= |G[delta]|`` and ``t >= |T[delta, delta]| / 2`` the same way, and ``W = |A| + g + t + P >=
|J_v(x)|``.

* affine ops (linear, conv, reshapes, sums, means, scalings, ...): the linear part ``M`` materialised with its
  entry error ``dM`` (:func:`lipgraph.bounds.jacobian_interval._linear_parts`); ``c, A, G, T`` mapped by ``M``,
  ``E -> |M| E + (dM + m |M|) V``, ``E4 -> |M| E4 + (dM + m |M|)(V + cub)``, ``P -> |M| P + (dM + m |M|) W``
  (``m``: the rounding allowance).
* a smooth elementwise ``s`` with derivatives ``s_1, s_2, s_3`` at ``c_u`` and ``M3``, ``M4`` bounding
  ``|s^(3)|``, ``|s^(4)|`` on ``[c_u - dev_u, c_u + dev_u]``: the jet rules ``A -> s_1 A``, ``G -> s_1 G + s_2
  A A``, ``T -> s_1 T + s_2 (three products A G) + s_3 A A A``. With ``D = A delta + G[delta, delta] / 2 + e``,
  ``s(c + D) = s_0 + s_1 D + s_2 D^2 / 2 + s^(3)(xi) D^3 / 6`` gives ``E -> |s_1| E + |s_2| (quad + E)(2 lin +
  quad + E) / 2 + M3 dev^3 / 6``; the same expansion of ``s'(c + D)`` one order higher (remainder ``R``) times
  ``J_u`` gives ``P -> |s_1| P + |s_2| lin (t + P) + (|s_2| quad + |s_3| lin^2 / 2)(g + t + P) + R W``; one
  order further, ``E4 -> |s_1| E4 + |s_2| ((quad + E)^2 + 2 lin E) / 2 + |s_3| (quad + E)(dev^2 + dev lin +
  lin^2) / 6 + M4 dev^4 / 24`` plus the errors of the computed ``s_k`` and the rounding allowance. Rules:
  sigmoid, tanh, exact GELU, SiLU (global ``M3``, ``M4``, derived at :data:`_SMOOTH`), and inside softmax and the
  norms ``exp`` and ``(u + a)^p`` for ``p < 0`` (their higher derivatives are monotone: sups at an end of the
  range).
* a bilinear ``B`` (elementwise product with broadcasting, matmul) of two models: the product of the two
  expansions, every term of order at most 2 kept (at most 3 for ``E4``), the others bounded with ``|B(x, y)| <=
  B(|x|, |y|)``.
* the value remainder's affine form: affine ops ``coef -> M coef`` (``noise_rest -> |M| noise_rest`` plus the
  rounding of ``M`` on ``V + cub + sum |coef| box``); ``s(u)``: ``coef -> s_1 coef``, ``z -> |s_1| z``, and a
  new block with the rule's ``E4`` terms other than ``|s_1| E4``, plus ``e_1 E4`` for the error of the computed
  ``s_1``; ``B(a, b)``: ``coef -> B(coef_a, c_b) + B(c_a, coef_b)`` (one symbol in both: coefficients added),
  ``z -> B(z_a, |c_b|) + B(|c_a|, z_b)``, a new block with the fourth-order cross terms, ``B(d3_a, E4_b) +
  B(E4_a, dev_b)`` (``d3_a >= |a3 - c_a|``) and the rounding. Past :data:`NOISE_ENTRIES` a node's symbols fold
  into its rest. ``E4`` is the smaller of the entrywise rule and ``noise_rest + sum_k |coef_k| box_k``.
* tangents: ``K0, K1, K2, Q`` go through affine ops as ``A, G, T, P`` do; through ``s(u)``, ``K_v = s'(u(x))
  K_u`` with the same expansion of ``s'(u(x))`` as for the Jacobian (``Q -> |s_1| Q + |s_2| lin (k2 + Q) + (|s_2|
  quad + |s_3| lin^2 / 2)(k1 + k2 + Q) + R W_K``, ``k1 >= |K1[delta]|``, ``k2 >= |K2[delta, delta]| / 2``,
  ``W_K >= |K|``); through ``B(a, b)``, ``K_v = B(K_a, b) + B(a, K_b)`` with ``Q -> B(Q_a, V_b) + B(W_Ka, E_b) +
  B(k1_a, quad_b) + B(k2_a, lin_b + quad_b)`` and the mirror terms. The seed's own tangent is ``I`` exactly.
* softmax as ``e = exp(u - k)`` (``k``: the center's maximum, a constant) and ``p = e (sum e)^-1``; layer / rms
  norm as ``z = u - mean u`` (``z = u`` for rms), ``q = mean(z z)``, ``y = gamma z (q + eps)^-1/2 + beta``.

Every rounding error of a computed coefficient is at most ``m`` times the same op applied to the operands'
bounds ``V``, ``W`` (``gamma_k <= m`` for ``k <= 4e6`` terms); it is added to ``E`` or ``P``. (For ``G`` and
``T`` the error scales with their entries, which ``quad`` and ``t`` bound only up to a factor ``sqrt(n)``;
``m = 1e-9`` is about ``1e5`` times the float64 error for ``n <= 44``, which covers it.) Function values
(exp, erf, tanh, powers) get the allowance :data:`FUNCTION_ERROR`. Work limits count entries: a node whose
third derivatives would exceed ``JACOBIAN_ENTRIES`` entries stops there, and so does everything after it; ops
without a rule stop likewise (the records say where and why). Exact for affine graphs up to rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx
import torch

from .. import ir, norms
from ..core import ROUNDING_MARGIN, Settings
from ..ops import RULES, LocalConstant
from .jacobian_interval import JACOBIAN_ENTRIES, _keep_constant, _linear_parts
from .jacobian_interval import _Stop as _PartsStop
from .mean_value import l2_radius
from .relations import AlgorithmResult, Cumulative, Relation, Term, own_rule

SOURCE = "taylor"
_DT = torch.float64
_M = ROUNDING_MARGIN
#: Allowance for one float64 evaluation of exp, erf, tanh, sigmoid, a power or a short formula of them:
#: ``|computed - exact| <= FUNCTION_ERROR (1 + |computed|)``. Their errors are a few units in the last place
#: (2.2e-16) relative, and cancellations such as ``1 + erf(x)`` for negative ``x`` or ``1 - tanh(x)^2`` are
#: off by about 1e-16 absolute; 1e-12 is ample.
FUNCTION_ERROR = 1e-12
#: Allowance for the rounding of one rule's coefficients, as a multiple of ``op(|.|, |.|)`` (a few operations
#: per rule, each within ``ROUNDING_MARGIN``).
_ROUND = 8 * _M


#: Seeds per domain pass at most (:func:`tangent_bounds`: one more build of the seed's descendants each, 0.6 to
#: 4 s on the one-block transformer of ``tests/test_domain_tightness.py``). There, at radius 0.1, the first
#: LayerNorm and the softmax carry 0.35 and 0.10 of the output's remainder 0.42 through products of partials of
#: 18.5 and 6.9 where their seeds' ``k`` are 0.44 and 0.62; with those two seeds the bound is 0.660, with all six
#: nodes whose share is at least 0.02, 0.554 (both with the triangle inequality for the polynomial part).
TANGENT_SEEDS = 6
#: Entries of one node's second-order tangent coefficients ``K2`` (``n^2 m`` per value entry, ``m``: the seed's
#: size) at most; a seeded build stops at a node past it. The block's GELU seed needs 4.2e6 (64 MB) at GELU.
TANGENT_ENTRIES = 8_000_000
#: Entries of one node's value-remainder coefficients (:attr:`TaylorModel.noise`: symbols times value entries)
#: at most; past it the node's symbols are folded into its entrywise rest. The block has about 340 symbols.
NOISE_ENTRIES = 4_000_000
_NOISE_IDS = itertools.count()
#: Seeds are tried only where the output's carried remainder is at least this share of the output's bound ...
SEED_GATE = 0.05
#: ... and a seed only where its own remainder carries at least this share of that remainder.
SEED_SHARE = 0.02


class _Stop(Exception):  # noqa: N818 - internal signal: no model at this node, with the reason
    """This node gets no Taylor model (the message says why)."""


def _up(t: torch.Tensor) -> torch.Tensor:
    return t * (1 + 4 * _M)


def _sym_norms(m: torch.Tensor, lead: int) -> torch.Tensor:
    """``||m[..., :, :]||_2`` of the symmetric part of each ``n x n`` matrix, certified: ``m`` has shape
    ``(n, n, *rest)`` after ``lead`` leading dims (``rest`` indexes the matrices, as do the leading dims); the
    smaller of the largest eigenvalue in absolute value plus ``1e-12 n`` times the Frobenius norm (LAPACK's
    symmetric eigenvalues err by a small multiple of ``n u ||m||_2``) and the Frobenius norm, rounded up."""
    k = lead
    x = m.movedim(k, -1).movedim(k, -1)  # (*lead, *rest, n, n)
    x = 0.5 * (x + x.transpose(-1, -2))
    n = x.shape[-1]
    fro = torch.linalg.matrix_norm(x, "fro") * (1 + 4 * _M)
    if n <= 1:
        return fro
    eig = torch.linalg.eigvalsh(x).abs().amax(dim=-1)
    return torch.minimum(fro, eig + 1e-12 * n * fro + 1e-300)


def _cubic_norms(t: torch.Tensor) -> torch.Tensor:
    """``sup_{||d||_2 <= 1} |t[:, :, :, s][d, d, d]|`` for every value entry ``s``, certified: ``t`` has shape ``(n,
    n, n, *S)``; ``t[d, d, d] = d^T M (d (x) d)`` with ``M`` the ``n x n^2`` flattening and ``||d (x) d|| = 1``, so
    at most ``||M||_2 = sqrt(lambda_max(M M^T))``. The ``n x n`` Gram matrix in float64 errs by at most ``gamma_{n^2}
    ||M||_F^2`` in norm and LAPACK's symmetric eigenvalues by a small multiple of ``n u ||M M^T||_2`` (the margin
    ``(n^2 u' + 1e-12 n) ||M||_F^2``, ``u' = 2.3e-16``); the smaller of that and the Frobenius norm, rounded up."""
    n = t.shape[0]
    rest = t.shape[3:]
    m = t.reshape(n, n * n, -1).movedim(-1, 0)  # (numel S, n, n^2)
    fro2 = (m * m).sum(dim=(-1, -2))
    fro = fro2.sqrt() * (1 + 4 * _M)
    if n <= 1 or m.shape[0] == 0:
        return fro.reshape(rest)
    lam = torch.linalg.eigvalsh(m @ m.transpose(-1, -2)).amax(dim=-1).clamp_min(0.0)
    top = torch.sqrt(lam + (n * n * 2.3e-16 + 1e-12 * n) * fro2) * (1 + 4 * _M)
    return torch.minimum(fro, top + 1e-300).reshape(rest)


def _coefficient_norms(first: torch.Tensor, second: torch.Tensor, third: torch.Tensor) -> tuple[Any, Any, Any]:
    """``||first||``, ``||second||_flat``, ``||third||_flat`` (:func:`lipgraph.norms.dense_norm` results, the
    smaller certified flattening where there are two, else the first) of a model's coefficients: ``first`` ``(m,
    *S)``, ``second`` ``(n, m, *S)`` and ``third`` ``(n, n, m, *S)`` with ``delta`` on the ``n`` dims (``m = n``
    for a Jacobian's ``A, G, T``; see the module doc)."""
    m, n = first.shape[0], second.shape[0]

    def smaller(*cands: Any) -> Any:
        return min((x for x in cands if x.certified), key=lambda x: x.upper, default=cands[0])

    return (norms.dense_norm(first.reshape(m, -1).T),
            smaller(norms.dense_norm(second.reshape(n * m, -1).T),
                    norms.dense_norm(second.transpose(0, 1).reshape(m, -1))),
            smaller(norms.dense_norm(third.reshape(n * n * m, -1).T),
                    norms.dense_norm(third.movedim(2, 0).reshape(m, -1))))


@dataclasses.dataclass
class Tangent:
    """A node's derivative with respect to a perturbation at a seed node (see :func:`tangent_bounds`): with the
    seed's value ``w`` replaced by ``w + e``, ``K(x) = d v / d e`` at ``e = 0``, for every ``x = c + delta`` of the
    ball, is ``K0 + K1[delta] + K2[delta, delta] / 2 + R`` with ``|R| <= Q`` entrywise. Shapes: ``K0, Q`` ``(m,
    *S)`` (``m``: the seed's entries), ``K1`` ``(n, m, *S)``, ``K2`` ``(n, n, m, *S)`` (symmetric in its first
    two dims)."""

    K0: torch.Tensor
    K1: torch.Tensor
    K2: torch.Tensor
    Q: torch.Tensor
    rho: float

    @functools.cached_property
    def k1(self) -> torch.Tensor:
        """``>= |K1[delta]|`` entrywise."""
        return _up(self.rho * torch.linalg.vector_norm(self.K1, dim=0))

    @functools.cached_property
    def k2(self) -> torch.Tensor:
        """``>= |K2[delta, delta]| / 2`` entrywise."""
        return _up(0.5 * self.rho ** 2 * _sym_norms(self.K2, 0))

    @functools.cached_property
    def bound(self) -> torch.Tensor:
        """``>= |K(x)|`` entrywise on the ball."""
        return _up(self.K0.abs() + self.k1 + self.k2 + self.Q)

    def map(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Tangent:
        return Tangent(fn(self.K0, 1), fn(self.K1, 2), fn(self.K2, 3), fn(self.Q, 1), self.rho)

    def norm(self) -> float:
        """``sup ||K(x)||_2`` on the ball, certified (``inf`` if a norm is not): ``||K0|| + rho ||K1||_flat +
        rho^2 / 2 ||K2||_flat + ||Q||`` (:func:`_coefficient_norms`, as for :meth:`TaylorModel.norm_parts`)."""
        k0, k1, k2 = (x.upper if x.certified else math.inf for x in _coefficient_norms(self.K0, self.K1, self.K2))
        value = (k0 + self.rho * k1 + 0.5 * self.rho ** 2 * k2 + _remainder_norm(self.Q)) * (1 + 16 * _M)
        return value if math.isfinite(value) else math.inf


def _tan_add(a: Tangent | None, b: Tangent | None) -> Tangent | None:
    if a is None or b is None:
        return a if b is None else b
    q = a.Q + b.Q + _ROUND * (a.bound + b.bound)
    return Tangent(a.K0 + b.K0, a.K1 + b.K1, a.K2 + b.K2, _up(q), a.rho)


def seed_tangent(shape: tuple[int, ...], n: int, rho: float) -> Tangent:
    """The seed's own tangent: ``K = I`` exactly."""
    m = math.prod(shape)
    return Tangent(torch.eye(m, dtype=_DT).reshape(m, *shape), torch.zeros((n, m, *shape), dtype=_DT),
                   torch.zeros((n, n, m, *shape), dtype=_DT), torch.zeros((m, *shape), dtype=_DT), rho)


@dataclasses.dataclass
class TaylorModel:
    """One node's model (see the module doc). Shapes: ``c, E`` the value's ``S``; ``A, P`` ``(n, *S)`` (column
    ``j`` is ``d v / d x_j``); ``G`` ``(n, n, *S)`` (``G[k, j] = d^2 v / dx_k dx_j``); ``T`` ``(n, n, n, *S)``."""

    c: torch.Tensor
    A: torch.Tensor
    G: torch.Tensor
    T: torch.Tensor
    E: torch.Tensor
    P: torch.Tensor
    rho: float
    #: ``r >= ||F(x)||_2`` on the domain (``inf``: unknown; :func:`models` with ``local`` sets it), the remainder
    #: of the Jacobian as an operator, carried by the chain rule past the entrywise ``P`` (see :func:`models`).
    norm_remainder: float = math.inf
    #: ``>= |v(x) - c - A delta - G[delta, delta] / 2 - T[delta, delta, delta] / 6|`` entrywise: the value's
    #: remainder past its cubic term (fourth order). ``E`` is lowered to ``cub + E4`` where that is smaller
    #: (:meth:`__post_init__`), as ``|T[delta, delta, delta]| / 6 <= cub``; left out, it is ``E + cub``.
    E4: torch.Tensor | None = None
    #: The derivative with respect to a seed's perturbation (:class:`Tangent`), ``None`` where the node does not
    #: depend on the seed or no seed is set (:func:`build` with ``seed``).
    tan: Tangent | None = None
    #: The value's remainder past its cubic term as an affine form: ``e4(x) = sum_k coef_k xi_k(x) + z(x)`` with
    #: ``noise[k] = (box_k, coef_k)``, ``|xi_k| <= box_k`` (``(m_k,)``; each symbol block is one node's own
    #: remainder, shared by every node it reaches), ``coef_k`` ``(m_k, *S)``, and ``|z| <= noise_rest``
    #: entrywise. ``E4`` is lowered to ``noise_rest + sum_k |coef_k| box_k`` where that is smaller; left out,
    #: everything is in the rest (see :func:`_fresh_noise`).
    noise: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    noise_rest: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.E4 is None:
            self.E4 = _up(self.E + self.cub)
        if self.noise is None or self.noise_rest is None:
            self.noise, self.noise_rest = {}, self.E4
        self.noise, self.noise_rest = _fold(self.noise, self.noise_rest, self.c, self.c.numel())
        self.E4 = torch.minimum(self.E4, _up(self.noise_rest + self.noise_bound))
        self.E = torch.minimum(self.E, _up(self.cub + self.E4))

    @functools.cached_property
    def noise_bound(self) -> torch.Tensor:
        """``>= |sum_k coef_k xi_k|`` entrywise (the symbols' part of ``e4``)."""
        assert self.noise is not None
        return _noise_abs(self.noise, self.c)

    @functools.cached_property
    def cub(self) -> torch.Tensor:
        """``>= |T[delta, delta, delta]| / 6`` entrywise (:func:`_cubic_norms`)."""
        return _up(self.rho ** 3 / 6 * _cubic_norms(self.T))

    @functools.cached_property
    def lin(self) -> torch.Tensor:
        return _up(self.rho * torch.linalg.vector_norm(self.A, dim=0))

    @functools.cached_property
    def quad(self) -> torch.Tensor:
        return _up(0.5 * self.rho ** 2 * _sym_norms(self.G, 0))

    @functools.cached_property
    def dev(self) -> torch.Tensor:
        return _up(self.lin + self.quad + self.E)

    @functools.cached_property
    def value_bound(self) -> torch.Tensor:
        return _up(self.c.abs() + self.dev)

    @functools.cached_property
    def g(self) -> torch.Tensor:
        return _up(self.rho * torch.linalg.vector_norm(self.G, dim=0))

    @functools.cached_property
    def t(self) -> torch.Tensor:
        # T[:, :, j] for every column j: (n_j, *S) after moving j first
        return _up(0.5 * self.rho ** 2 * _sym_norms(self.T.movedim(2, 0), 1))

    @functools.cached_property
    def jac_bound(self) -> torch.Tensor:
        return _up(self.A.abs() + self.g + self.t + self.P)

    @functools.cached_property
    def norm_parts(self) -> tuple[float, float, float, float, bool]:
        """Certified ``||A||``, ``||G||_flat``, ``||T||_flat`` and ``||P||_2`` (``inf`` if not certified), and
        whether the first three are certified (see the module doc); kept, as a domain pass asks once per round."""
        a, fg, ft = _coefficient_norms(self.A, self.G, self.T)
        return a.upper, fg.upper, ft.upper, _remainder_norm(self.P), all(x.certified for x in (a, fg, ft))

    @functools.cached_property
    def schur_norm(self) -> float:
        """:func:`_schur_bound` of the polynomial part (no remainder), ``inf`` where the norms are not certified
        or ``G`` is 0; kept, as it does not depend on the remainder :func:`bound` adds each round."""
        a, fg, ft, _, certified = self.norm_parts
        return _schur_bound(self, a, fg, ft, 0.0) if certified and fg > 0 else math.inf

    def map(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> TaylorModel:
        """The model with ``fn(tensor, leading dims)`` (a permutation or reshape of the value dims) applied."""
        assert self.noise is not None and self.noise_rest is not None
        return TaylorModel(fn(self.c, 0), fn(self.A, 1), fn(self.G, 2), fn(self.T, 3), fn(self.E, 0),
                           fn(self.P, 1), self.rho, E4=fn(self.E4, 0),
                           tan=None if self.tan is None else self.tan.map(fn),
                           noise={k: (box, fn(coef, 1)) for k, (box, coef) in self.noise.items()},
                           noise_rest=fn(self.noise_rest, 0))


# --- the value remainder's symbols ------------------------------------------------------------------------


def _noise_size(noise: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(box.numel() for box, _ in noise.values())


def _noise_abs(noise: Mapping[int, tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """``sum_k |coef_k| box_k`` (shape of ``like``), rounded up: sums of nonnegative products, which float64
    gets within ``(symbols) u`` relative, far inside the margin for fewer than 1e6 symbols."""
    total = torch.zeros_like(like)
    for box, coef in noise.values():
        total = total + (coef.abs() * box.reshape(-1, *([1] * (coef.dim() - 1)))).sum(dim=0)
    return _up(total)


def _fold(noise: dict[int, tuple[torch.Tensor, torch.Tensor]], rest: torch.Tensor, like: torch.Tensor,
          out_numel: int) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The symbols and rest, folded into the rest (``like``'s shape) where their coefficients for ``out_numel``
    value entries would pass :data:`NOISE_ENTRIES`."""
    if _noise_size(noise) * max(out_numel, 1) > NOISE_ENTRIES:
        return {}, _up(rest + _noise_abs(noise, like))
    return noise, rest


def _noise_for(tm: TaylorModel, out_numel: int) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]],
                                                          torch.Tensor]:
    """``tm``'s symbols and rest, folded first where mapping them to ``out_numel`` value entries would pass
    :data:`NOISE_ENTRIES` (checked before the coefficients are computed)."""
    assert tm.noise is not None and tm.noise_rest is not None
    return _fold(tm.noise, tm.noise_rest, tm.c, out_numel)


def _noise_merge(a: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                 b: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The sum of two affine forms: a symbol in both gets the sum of its coefficients (the same function of x)."""
    out = dict(a)
    for k, (box, coef) in b.items():
        out[k] = (box, out[k][1] + coef) if k in out else (box, coef)
    return out


def _fresh_noise(noise: dict[int, tuple[torch.Tensor, torch.Tensor]], rest: torch.Tensor,
                 fresh: torch.Tensor) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The node's own remainder ``|xi| <= fresh`` (the value's shape) as a new block of symbols, or, past
    :data:`NOISE_ENTRIES`, added to the rest. A symbol is the same function of ``x`` wherever it goes, so
    through LayerNorm's centring, the products' center values and the linear layers the coefficients cancel
    where the entrywise ``E4`` adds absolute values."""
    m = fresh.numel()
    if (_noise_size(noise) + m) * m > NOISE_ENTRIES:
        return noise, _up(rest + fresh)
    out = dict(noise)
    out[next(_NOISE_IDS)] = (_up(fresh).reshape(-1), torch.eye(m, dtype=_DT).reshape(m, *fresh.shape))
    return out, rest


# --- affine maps ----------------------------------------------------------------------------------------


def _linear(tm: TaylorModel, lin: Callable[[torch.Tensor], torch.Tensor],
            lin_abs: Callable[[torch.Tensor], torch.Tensor]) -> TaylorModel:
    """``v = L(u)`` for a linear ``L`` of the trailing value dims (``lin`` works under any leading dims), with
    ``lin_abs(t) >= |L|(t)`` for ``t >= 0``."""
    e = lin_abs(tm.E) + _ROUND * lin_abs(tm.value_bound)
    p = lin_abs(tm.P) + _ROUND * lin_abs(tm.jac_bound)
    e4 = lin_abs(tm.E4) + _ROUND * lin_abs(tm.value_bound + tm.cub)
    k = tm.tan
    tan = None if k is None else Tangent(lin(k.K0), lin(k.K1), lin(k.K2),
                                         _up(lin_abs(k.Q) + _ROUND * lin_abs(k.bound)), k.rho)
    c = lin(tm.c)
    noise, rest = _noise_for(tm, c.numel())
    rest = lin_abs(rest) + _ROUND * lin_abs(tm.value_bound + tm.cub + tm.noise_bound)
    noise = {key: (box, lin(coef)) for key, (box, coef) in noise.items()}
    return TaylorModel(c, lin(tm.A), lin(tm.G), lin(tm.T), _up(e), _up(p), tm.rho, E4=_up(e4), tan=tan,
                       noise=noise, noise_rest=_up(rest))


def _shift(tm: TaylorModel, b: torch.Tensor) -> TaylorModel:
    """``v = u + b`` for a constant ``b`` that broadcasts to ``u``'s shape (never past it: the coefficients, the
    symbols' included, keep ``u``'s shape)."""
    c = tm.c + b
    if c.shape != tm.c.shape:
        raise _Stop(f"a constant of shape {tuple(b.shape)} widens a value of shape {tuple(tm.c.shape)}")
    e = tm.E + _ROUND * (tm.c.abs() + b.abs())
    e4 = tm.E4 + _ROUND * (tm.c.abs() + b.abs())
    assert tm.noise_rest is not None
    rest = tm.noise_rest + _ROUND * (tm.c.abs() + b.abs())
    return TaylorModel(c, tm.A, tm.G, tm.T, _up(e.expand_as(c).clone()), tm.P, tm.rho,
                       E4=_up(e4.expand_as(c).clone()), tan=tm.tan, noise=tm.noise,
                       noise_rest=_up(rest.expand_as(c).clone()))


def _constant(value: torch.Tensor, n: int, rho: float) -> TaylorModel:
    s = tuple(value.shape)
    z1 = torch.zeros((n, *s), dtype=_DT)
    return TaylorModel(value, z1, torch.zeros((n, n, *s), dtype=_DT), torch.zeros((n, n, n, *s), dtype=_DT),
                       torch.zeros_like(value), z1, rho, E4=torch.zeros_like(value))


def _add(a: TaylorModel, b: TaylorModel) -> TaylorModel:
    e = a.E + b.E + _ROUND * (a.value_bound + b.value_bound)
    p = a.P + b.P + _ROUND * (a.jac_bound + b.jac_bound)
    e4 = a.E4 + b.E4 + _ROUND * (a.value_bound + b.value_bound + a.cub + b.cub)
    assert a.noise is not None and b.noise is not None and a.noise_rest is not None and b.noise_rest is not None
    rest = (a.noise_rest + b.noise_rest
            + _ROUND * (a.value_bound + b.value_bound + a.cub + b.cub + a.noise_bound + b.noise_bound))
    return TaylorModel(a.c + b.c, a.A + b.A, a.G + b.G, a.T + b.T, _up(e), _up(p), a.rho, E4=_up(e4),
                       tan=_tan_add(a.tan, b.tan), noise=_noise_merge(a.noise, b.noise), noise_rest=_up(rest))


def _affine(n: ir.IRNode, tms: list[TaylorModel | None], consts: Mapping[str, torch.Tensor]) -> TaylorModel:
    """A generic affine op: ``v = sum_i M_i u_i + f(0)``, each ``M_i`` materialised with its entry error."""
    var_pos = [k for k, i in enumerate(n.inputs) if i not in consts]
    if not var_pos:
        raise _Stop("no variable input")
    shapes = [tuple(s) for s in n.in_shapes]
    base = [consts[i] if i in consts else torch.zeros(shapes[k], dtype=_DT) for k, i in enumerate(n.inputs)]
    y0 = RULES[n.op].forward(ir.as_float64(n), *base)
    if not isinstance(y0, torch.Tensor):
        raise _Stop(f"{n.op} is not tensor-valued")
    out_shape = tuple(n.out_shape)
    total: TaylorModel | None = None
    for k, (mt, dm) in zip(var_pos, _linear_parts(n, consts, var_pos), strict=True):
        tm = tms[k]
        assert tm is not None
        mabs = mt.abs()
        slack = dm + _ROUND * mabs

        def apply(t: torch.Tensor, lead: int, m: torch.Tensor) -> torch.Tensor:
            return (t.reshape((*t.shape[:lead], -1)) @ m).reshape((*t.shape[:lead], *out_shape))

        k = tm.tan
        tan = None if k is None else Tangent(apply(k.K0, 1, mt), apply(k.K1, 2, mt), apply(k.K2, 3, mt),
                                             _up(apply(k.Q, 1, mabs) + apply(k.bound, 1, slack)), k.rho)
        noise, rest = _noise_for(tm, math.prod(out_shape))
        part = TaylorModel(apply(tm.c, 0, mt), apply(tm.A, 1, mt), apply(tm.G, 2, mt), apply(tm.T, 3, mt),
                           _up(apply(tm.E, 0, mabs) + apply(tm.value_bound, 0, slack)),
                           _up(apply(tm.P, 1, mabs) + apply(tm.jac_bound, 1, slack)), tm.rho,
                           E4=_up(apply(tm.E4, 0, mabs) + apply(tm.value_bound + tm.cub, 0, slack)), tan=tan,
                           noise={key: (box, apply(coef, 1, mt)) for key, (box, coef) in noise.items()},
                           noise_rest=_up(apply(rest, 0, mabs)
                                          + apply(tm.value_bound + tm.cub + tm.noise_bound, 0, slack)))
        total = part if total is None else _add(total, part)
    assert total is not None
    return _shift(total, y0.detach().to(_DT).reshape(out_shape))


# --- smooth elementwise functions -----------------------------------------------------------------------

_SQRT2PI = math.sqrt(2.0 * math.pi)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / _SQRT2PI


Derivs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _gelu_derivs(x: torch.Tensor) -> Derivs:
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    ph = _phi(x)
    return x * cdf, cdf + x * ph, ph * (2.0 - x * x), ph * (x * x * x - 4.0 * x)


def _sigmoid_derivs(x: torch.Tensor) -> Derivs:
    s = torch.sigmoid(x)
    q = s * (1 - s)
    return s, q, q * (1 - 2 * s), q * (1 - 6 * q)


def _silu_derivs(x: torch.Tensor) -> Derivs:
    s = torch.sigmoid(x)
    q = s * (1 - s)
    return x * s, s + x * q, q * (2 + x * (1 - 2 * s)), 3 * q * (1 - 2 * s) + x * q * (1 - 6 * q)


def _tanh_derivs(x: torch.Tensor) -> Derivs:
    t = torch.tanh(x)
    d = 1 - t * t
    return t, d, -2 * t * d, -2 * d * (1 - 3 * t * t)


#: ``op -> (value and derivatives 1-3, M3 >= sup |s'''|, M4 >= sup |s''''|)`` over the real line.
#: sigmoid: ``q = s (1 - s)`` in ``(0, 1/4]``, ``s''' = q (1 - 6q)``: ``|.| <= 1/8`` (``q = 1/4``); with
#: ``u = 1 - 2s`` in ``(-1, 1)``, ``s'''' = q u (1 - 12 q) = (-3u^5 + 5u^3 - 2u) / 4``, whose extrema solve
#: ``15u^4 - 15u^2 + 2 = 0`` (``u^2 = (15 -+ sqrt 105) / 30``): ``0.12768`` at ``u^2 = 0.15843``, ``0.0191`` at
#: ``0.84157``, 0 at ``u = -+1``: 0.1277.
#: tanh: ``t''' = -2 (1 - t^2)(1 - 3 t^2)``: ``|.| <= 2`` (``t = 0``); ``t'''' = 8 (3t^5 - 5t^3 + 2t)``, extrema
#: at the same ``t^2 = (15 -+ sqrt 105) / 30``: ``4.0859`` and ``0.610``: 4.086.
#: exact GELU ``x Phi(x)``: ``s''' = phi(x)(x^3 - 4x)``, whose extrema solve ``x^4 - 7x^2 + 4 = 0``
#: (``x^2 = (7 -+ sqrt 33) / 2``): ``0.77877`` at ``|x| = 0.79229``, ``0.0990`` at ``2.5243``: 0.779;
#: ``s'''' = phi(x)(-x^4 + 7x^2 - 4)``, extrema where ``x (x^4 - 11 x^2 + 18) = 0`` (``x^2`` in 0, 2, 9):
#: ``4 phi(0) = 1.59577``, ``6 phi(sqrt 2) = 0.8806``, ``22 phi(3) = 0.0975``: 1.5958.
#: SiLU ``x s(x)``: ``silu''' = 3 s'' + x s'''``, ``silu'''' = 4 s''' + x s''''`` (``s``: the sigmoid), with
#: ``q = s (1 - s) <= e^-|x|`` and ``|x| e^-|x| <= 1/e``: ``|x s'''| = |x| q |1 - 6q| <= 1/e`` and
#: ``|x s''''| = |x| q |1 - 2s| |1 - 12 q| <= 2/e``, so ``3 / (6 sqrt 3) + 1/e = 0.65655`` and
#: ``4/8 + 2/e = 1.23576``.
_SMOOTH: dict[str, tuple[Callable[[torch.Tensor], Derivs], float, float]] = {
    "sigmoid": (_sigmoid_derivs, 0.125 * (1 + 1e-9), 0.1277),
    "tanh": (_tanh_derivs, 2.0 * (1 + 1e-9), 4.086),
    "gelu": (_gelu_derivs, 0.779, 1.5958),
    "silu": (_silu_derivs, 0.6567, 1.2359),
}


def _end_remainders(tm: TaylorModel, d: Derivs, at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    m3: torch.Tensor | float, m4: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``|s(c + D) - s_0 - s_1 D - s_2 D^2 / 2|`` and ``|s'(c + D) - s_1 - s_2 D - s_3 D^2 / 2|`` over
    ``|D| <= dev``, for an ``s`` whose third and fourth derivatives keep one sign on the range (exp; powers with
    ``p < 0`` on a positive range): each remainder is ``int_0^D s^(k)(c + t) (D - t)^(k-1) / (k-1)! dt``, whose
    absolute value grows with ``|D|`` on either side, so its values at ``D = -dev`` and ``D = +dev`` bound it
    (evaluated at ends pushed out past the rounding of ``c -+ dev``, ``FUNCTION_ERROR`` on every term). The
    smaller of that and the Lagrange bounds ``m3 dev^3 / 6``, ``m4 dev^3 / 6``. ``at(x)``: ``(s(x), s'(x))``."""
    s0, s1, s2, s3 = d
    dev = tm.dev
    push = dev + 4 * 2.220446049250313e-16 * (tm.c.abs() + dev) + 1e-300
    best3, best4 = torch.zeros_like(dev), torch.zeros_like(dev)
    for sign in (-1.0, 1.0):
        x = tm.c + sign * push
        dd = x - tm.c
        f0, f1 = at(x)
        v3 = f0 - s0 - s1 * dd - 0.5 * s2 * dd * dd
        v4 = f1 - s1 - s2 * dd - 0.5 * s3 * dd * dd
        err3 = 4 * FUNCTION_ERROR * (4 + f0.abs() + s0.abs() + (s1 * dd).abs() + (s2 * dd * dd).abs())
        err4 = 4 * FUNCTION_ERROR * (4 + f1.abs() + s1.abs() + (s2 * dd).abs() + (s3 * dd * dd).abs())
        best3 = torch.maximum(best3, v3.abs() + err3)
        best4 = torch.maximum(best4, v4.abs() + err4)
    return torch.minimum(best3, m3 * dev ** 3 / 6), torch.minimum(best4, m4 * dev ** 3 / 6)


def _elementwise(tm: TaylorModel, d: Derivs, m3: torch.Tensor | float, m4: torch.Tensor | float,
                 at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> TaylorModel:
    """``v = s(u)`` with ``d = (s, s', s'', s''')`` at ``c_u`` (each within ``FUNCTION_ERROR (1 + |.|)``) and
    ``m3``, ``m4`` bounding ``|s'''|``, ``|s''''|`` on ``[c_u -+ dev_u]`` (see the module doc). With ``at`` (only
    for functions whose third and fourth derivatives keep one sign there) the Lagrange terms are the tighter
    :func:`_end_remainders`."""
    s0, s1, s2, s3 = d
    e0, e1, e2, e3 = (FUNCTION_ERROR * (1 + x.abs()) for x in d)
    a1, a2, a3 = s1.abs() + e1, s2.abs() + e2, s3.abs() + e3
    lin, quad, dev, big_e = tm.lin, tm.quad, tm.dev, tm.E
    if at is None:
        rem3, rem4 = m3 * dev ** 3 / 6, m4 * dev ** 3 / 6
    else:
        rem3, rem4 = _end_remainders(tm, d, at, m3, m4)
    aa = tm.A[:, None] * tm.A[None, :]  # [k, j] = A[k] A[j]
    g_new = s1 * tm.G + s2 * aa
    ag = tm.A[:, None, None] * tm.G[None]  # [k, l, j] = A[k] G[l, j]
    t_new = (s1 * tm.T + s2 * (ag + ag.transpose(0, 1) + tm.G[:, :, None] * tm.A[None, None])
             + s3 * aa[:, :, None] * tm.A[None, None])
    mix = (quad + big_e) * (2 * lin + quad + big_e)
    e = (a1 * big_e + e1 * (lin + quad) + 0.5 * a2 * mix + 0.5 * e2 * lin * lin + rem3 + e0
         + _ROUND * (s0.abs() + a1 * (lin + quad) + a2 * lin * lin))
    r = (e1 + a2 * big_e + e2 * (lin + quad) + 0.5 * a3 * mix + 0.5 * e3 * lin * lin + rem4)
    b1 = a2 * lin
    b2 = a2 * quad + 0.5 * a3 * lin * lin
    w = tm.jac_bound
    p = (a1 * tm.P + b1 * (tm.t + tm.P) + b2 * (tm.g + tm.t + tm.P) + r * w
         + _ROUND * (a1 + b1 + b2) * w)
    # past the cubic term, with D = L + Q + C + e4 (|L| <= lin, |Q| <= quad, |C + e4| <= E): s(c + D) - [s_0 +
    # s_1 (L + Q + C) + s_2 (L^2 + 2 L Q) / 2 + s_3 L^3 / 6] = s_1 e4 + s_2 [(D - L)^2 + 2 L (C + e4)] / 2 +
    # s_3 (D - L)(D^2 + D L + L^2) / 6 + s^(4)(xi) D^4 / 24, |D - L| <= quad + E
    dl = quad + big_e
    e4_rest = (0.5 * a2 * (dl * dl + 2 * lin * big_e) + a3 * dl * (dev * dev + dev * lin + lin * lin) / 6
               + m4 * dev ** 4 / 24 + e0 + e1 * dev + 0.5 * e2 * dev * dev + e3 * dev ** 3 / 6
               + _ROUND * (s0.abs() + a1 * (lin + quad + tm.cub) + a2 * lin * (lin + quad) + a3 * lin ** 3))
    e4 = a1 * tm.E4 + e4_rest
    # symbols: e4_v = s'(c) e4_u + rest, s'(c) = s1 within e1: the coefficients times s1 (rounding into the
    # fresh block), the rest and e1 E4 the node's own symbols
    assert tm.noise is not None and tm.noise_rest is not None
    noise, rest = _fresh_noise({key: (box, s1 * coef) for key, (box, coef) in tm.noise.items()},
                               s1.abs() * tm.noise_rest,
                               e4_rest + e1 * tm.E4 + _ROUND * s1.abs() * tm.noise_bound)
    tan = None
    if tm.tan is not None:
        # K_v = s'(u(x)) K_u with s'(u(x)) = s_1 + s_2 L + (s_2 Q + s_3 L^2 / 2) + r as for the Jacobian
        k = tm.tan
        k1 = s1 * k.K1 + s2 * tm.A[:, None] * k.K0[None]  # [k, j] += s_2 A[k] K0[j]
        x = tm.A[:, None, None] * k.K1[None]  # [k, l, j] = A[k] K1[l, j]
        k2 = (s1 * k.K2 + s2 * (x + x.transpose(0, 1)) + (s2 * tm.G + s3 * aa)[:, :, None] * k.K0[None, None])
        wk = k.bound
        q = (a1 * k.Q + b1 * (k.k2 + k.Q) + b2 * (k.k1 + k.k2 + k.Q) + r * wk + _ROUND * (a1 + b1 + b2) * wk)
        tan = Tangent(s1 * k.K0, k1, k2, _up(q), k.rho)
    return TaylorModel(s0, s1 * tm.A, g_new, t_new, _up(e), _up(p), tm.rho, E4=_up(e4), tan=tan, noise=noise,
                       noise_rest=_up(rest))


def _smooth(op: str, tm: TaylorModel) -> TaylorModel:
    derivs, m3, m4 = _SMOOTH[op]
    return _elementwise(tm, derivs(tm.c), m3, m4)


def _exp(tm: TaylorModel) -> TaylorModel:
    top = torch.exp(tm.c + tm.dev) * (1 + 1e-12)
    e0 = torch.exp(tm.c)

    def at(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ex = torch.exp(x)
        return ex, ex

    return _elementwise(tm, (e0, e0, e0, e0), top, top, at)


def _power(tm: TaylorModel, shift: float, p: float) -> TaylorModel:
    """``v = (u + shift)^p`` for ``p < 0`` where ``u + shift > 0`` on the range; ``|d^3|`` and ``|d^4|`` decrease
    in ``u``, so their sups are at the range's low end."""
    lo = tm.c - tm.dev * (1 + 1e-9) - 1e-300 + shift  # also below the ends _end_remainders evaluates
    if not bool((lo > 0).all()):
        raise _Stop(f"(u + {shift:g})^{p:g}: the range reaches {float(lo.min()):.3g} <= 0")
    lo = lo * (1 - 1e-12)
    x = tm.c + shift
    k1, k2, k3, k4 = p, p * (p - 1), p * (p - 1) * (p - 2), p * (p - 1) * (p - 2) * (p - 3)
    d = (x ** p, k1 * x ** (p - 1), k2 * x ** (p - 2), k3 * x ** (p - 3))
    m3 = abs(k3) * lo ** (p - 3) * (1 + 1e-12)
    m4 = abs(k4) * lo ** (p - 4) * (1 + 1e-12)

    def at(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = u + shift
        return y ** p, k1 * y ** (p - 1)

    return _elementwise(tm, d, m3, m4, at)


# --- products -------------------------------------------------------------------------------------------


def _bilinear(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: TaylorModel, b: TaylorModel,
              nd: int) -> TaylorModel:
    """``v = op(a, b)`` for a bilinear ``op`` with ``|op(x, y)| <= op(|x|, |y|)`` that broadcasts over leading
    dims; ``nd``: the output's value dims (see the module doc)."""

    def bl(x: torch.Tensor, lx: int, y: torch.Tensor, ly: int) -> torch.Tensor:
        """``op`` of ``x`` (``lx`` leading column dims) and ``y`` (``ly``), leading dims aligned on the left."""
        x = x.reshape((*x.shape[:lx], *([1] * (nd - (x.dim() - lx))), *x.shape[lx:]))
        y = y.reshape((*y.shape[:ly], *([1] * (nd - (y.dim() - ly))), *y.shape[ly:]))
        lead = max(lx, ly)
        x = x.reshape((*x.shape[:lx], *([1] * (lead - lx)), *x.shape[lx:]))
        y = y.reshape((*y.shape[:ly], *([1] * (lead - ly)), *y.shape[ly:]))
        return op(x, y)

    ca, cb, aa, ab, ga, gb = a.c, b.c, a.A, b.A, a.G, b.G
    c = bl(ca, 0, cb, 0)
    amat = bl(aa, 1, cb, 0) + bl(ca, 0, ab, 1)
    cross = bl(aa[None], 2, ab[:, None], 2)  # [k, j] = op(A_a[j], A_b[k])
    gmat = bl(ga, 2, cb, 0) + bl(ca, 0, gb, 2) + cross + cross.transpose(0, 1)
    # third order, [k, l, j]: op(Ga[k,j], Ab[l]) + op(Ga[l,j], Ab[k]) + op(Ga[k,l], Ab[j]) and the same with
    # the roles of a and b exchanged
    g_a = bl(ga[:, None], 3, ab[None, :, None], 3)  # op(Ga[k, j], Ab[l])
    ga_kl = bl(ga[:, :, None], 3, ab[None, None], 3)  # op(Ga[k, l], Ab[j])
    a_g = bl(aa[None, :, None], 3, gb[:, None], 3)  # op(Aa[l], Gb[k, j])
    aj_g = bl(aa[None, None], 3, gb[:, :, None], 3)  # op(Aa[j], Gb[k, l])
    tmat = (bl(a.T, 3, cb, 0) + bl(ca, 0, b.T, 3) + g_a + g_a.transpose(0, 1) + ga_kl
            + a_g + a_g.transpose(0, 1) + aj_g)
    lin_a, lin_b, quad_a, quad_b = a.lin, b.lin, a.quad, b.quad
    vab_a, vab_b, jab_a, jab_b = a.value_bound, b.value_bound, a.jac_bound, b.jac_bound
    e = (bl(lin_a, 0, quad_b, 0) + bl(quad_a, 0, lin_b, 0) + bl(quad_a, 0, quad_b, 0)
         + bl(a.E, 0, vab_b, 0) + bl(vab_a, 0, b.E, 0) + _ROUND * bl(vab_a, 0, vab_b, 0))
    p = (bl(a.P, 1, vab_b, 0) + bl(jab_a, 1, b.E, 0) + bl(a.g, 1, quad_b, 0) + bl(a.t, 1, lin_b + quad_b, 0)
         + bl(vab_a, 0, b.P, 1) + bl(a.E, 0, jab_b, 1) + bl(quad_a, 0, b.g, 1) + bl(lin_a + quad_a, 0, b.t, 1)
         + _ROUND * (bl(jab_a, 1, vab_b, 0) + bl(vab_a, 0, jab_b, 1)))
    # past the cubic term: a = a3 + e4_a with a3 the cubic polynomial, |a3| <= |c| + lin + quad + cub; the
    # product a3 b3 loses L_a C_b + Q_a (Q_b + C_b) + C_a (L_b + Q_b + C_b), and a b - a3 b3 = a3 e4_b + e4_a b
    cub_a, cub_b = a.cub, b.cub
    d3_a = torch.minimum(lin_a + quad_a + cub_a, a.dev + a.E4)  # >= |a3 - c_a|
    v3_a = torch.minimum(a.c.abs() + lin_a + quad_a + cub_a, vab_a + a.E4)
    e4_rest = (bl(lin_a, 0, cub_b, 0) + bl(quad_a, 0, quad_b + cub_b, 0) + bl(cub_a, 0, lin_b + quad_b + cub_b, 0)
               + _ROUND * bl(vab_a + cub_a, 0, vab_b + cub_b, 0))
    e4 = bl(v3_a, 0, b.E4, 0) + bl(a.E4, 0, vab_b, 0) + e4_rest
    # symbols: a3 e4_b + e4_a b = B(c_a, e4_b) + B(e4_a, c_b) + B(a3 - c_a, e4_b) + B(e4_a, b - c_b)
    noise_a, rest_a = _noise_for(a, c.numel())
    noise_b, rest_b = _noise_for(b, c.numel())
    na = {k: (box, bl(coef, 1, cb, 0)) for k, (box, coef) in noise_a.items()}
    nb = {k: (box, bl(ca, 0, coef, 1)) for k, (box, coef) in noise_b.items()}
    sym = bl(a.noise_bound, 0, cb.abs(), 0) + bl(ca.abs(), 0, b.noise_bound, 0)
    noise, rest = _fresh_noise(_noise_merge(na, nb), bl(rest_a, 0, cb.abs(), 0) + bl(ca.abs(), 0, rest_b, 0),
                               e4_rest + bl(d3_a, 0, b.E4, 0) + bl(a.E4, 0, b.dev, 0) + _ROUND * sym)
    tan = _tan_add(_tan_product(bl, a.tan, b, False), _tan_product(bl, b.tan, a, True))
    return TaylorModel(c, amat, gmat, tmat, _up(e), _up(p), a.rho, E4=_up(e4), tan=tan, noise=noise,
                       noise_rest=_up(rest))


def _tan_product(bl: Callable[[torch.Tensor, int, torch.Tensor, int], torch.Tensor], k: Tangent | None,
                 other: TaylorModel, swapped: bool) -> Tangent | None:
    """The part ``B(K_a, b)`` of ``K_v = B(K_a, b) + B(a, K_b)`` (``swapped``: ``B(a, K_b)``, ``k`` being ``b``'s
    tangent and ``other`` the value model of ``a``): the products of the expansions up to second order in
    ``delta`` kept, the rest bounded as for the Jacobian's remainder."""
    if k is None:
        return None

    def op(x: torch.Tensor, lx: int, y: torch.Tensor, ly: int) -> torch.Tensor:
        return bl(y, ly, x, lx) if swapped else bl(x, lx, y, ly)

    c, a_, g_ = other.c, other.A, other.G
    k0 = op(k.K0, 1, c, 0)
    k1 = op(k.K1, 2, c, 0) + op(k.K0[None], 2, a_[:, None], 2)  # [k, j]: B(K1[k, j], c) + B(K0[j], A[k])
    x = op(k.K1[:, None], 3, a_[None, :, None], 3)  # [k, l, j] = B(K1[k, j], A[l])
    k2 = op(k.K2, 3, c, 0) + x + x.transpose(0, 1) + op(k.K0[None, None], 3, g_[:, :, None], 3)
    q = (op(k.Q, 1, other.value_bound, 0) + op(k.bound, 1, other.E, 0) + op(k.k1, 1, other.quad, 0)
         + op(k.k2, 1, other.lin + other.quad, 0) + _ROUND * op(k.bound, 1, other.value_bound, 0))
    return Tangent(k0, k1, k2, _up(q), k.rho)


def _mul(a: TaylorModel, b: TaylorModel, nd: int) -> TaylorModel:
    return _bilinear(torch.mul, a, b, nd)


# --- composite ops --------------------------------------------------------------------------------------


def _softmax(n: ir.IRNode, tm: TaylorModel) -> TaylorModel:
    """``p = e (sum e)^-1`` along ``dim``, ``e = exp(u - k)`` with the center's maximum ``k`` (softmax is
    invariant under a constant shift of its slice)."""
    nd = len(n.out_shape)
    dim = n.attrs["dim"] % nd
    t = tm.map(lambda x, lead: x.movedim(lead + dim, -1))
    e = _exp(_shift(t, -t.c.amax(dim=-1, keepdim=True)))
    s = _linear(e, lambda x: x.sum(dim=-1, keepdim=True), lambda x: x.sum(dim=-1, keepdim=True))
    p = _mul(e, _power(s, 0.0, -1.0), nd)
    return p.map(lambda x, lead: x.movedim(-1, lead + dim))


def _norm(n: ir.IRNode, tm: TaylorModel) -> TaylorModel:
    """layer / rms norm over the trailing ``normalized_shape``: ``y = gamma z (mean(z z) + eps)^-1/2 + beta``
    with ``z = u - mean u`` (``z = u`` for rms norm)."""
    normalized = tuple(n.attrs["normalized_shape"])
    k = math.prod(normalized)
    shape = tuple(n.out_shape)
    groups = shape[: len(shape) - len(normalized)]
    t = tm.map(lambda x, lead: x.reshape(*x.shape[:lead], *groups, k))
    nd = len(groups) + 1
    if n.op == "layer_norm":
        # |I - 11^T / k| t = (1 - 2/k) t + mean(t) for t >= 0
        z = _linear(t, lambda x: x - x.mean(dim=-1, keepdim=True),
                    lambda x: (1 - 2 / k) * x + x.mean(dim=-1, keepdim=True))
    else:
        z = t
    q = _linear(_mul(z, z, nd), lambda x: x.mean(dim=-1, keepdim=True), lambda x: x.mean(dim=-1, keepdim=True))
    eps = n.attrs.get("eps")
    if eps is None:  # PyTorch takes the input dtype's epsilon: the IR's float64 one is another function
        raise _Stop(f"{n.op} with eps=None (the input dtype's epsilon): no Taylor-model rule")
    y = _mul(z, _power(q, float(eps), -0.5), nd)
    params = ir.as_float64(n).params
    w, b = params.get("weight"), params.get("bias")
    if w is not None:
        wv = w.detach().to(_DT).reshape(k)
        y = _linear(y, lambda x: x * wv, lambda x: x * wv.abs())
    if b is not None:
        y = _shift(y, b.detach().to(_DT).reshape(k))
    return y.map(lambda x, lead: x.reshape(*x.shape[:lead], *shape))


_NORMS = ("layer_norm", "rms_norm")


def _step(n: ir.IRNode, tms: list[TaylorModel | None], consts: Mapping[str, torch.Tensor], nin: int,
          rho: float) -> TaylorModel:
    if n.op == "output":
        if len(n.inputs) != 1:
            raise _Stop("output of several tensors")
        assert tms[0] is not None
        return tms[0]
    if not isinstance(n.out_shape, (tuple, list)) or not all(isinstance(d, int) for d in n.out_shape):
        raise _Stop(f"{n.op} is not tensor-valued")
    dtype = n.attrs.get("dtype")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise _Stop(f"{n.op} casts to {dtype}: discontinuous")
    nd = len(n.out_shape)
    if n.op in ("mul_var", "matmul_var") and len(n.inputs) == 2:
        if n.op == "matmul_var" and any(len(s) < 2 for s in n.in_shapes):
            raise _Stop("matmul_var of a vector")
        a, b = (t if t is not None else _constant(consts[i], nin, rho) for t, i in zip(tms, n.inputs, strict=True))
        return _bilinear(torch.mul if n.op == "mul_var" else torch.matmul, a, b, nd)
    if n.op == "softmax" and len(n.inputs) == 1 and tms[0] is not None:
        return _softmax(n, tms[0])
    if n.op in _NORMS and len(n.inputs) == 1 and tms[0] is not None:
        return _norm(n, tms[0])
    if n.op in _SMOOTH and len(n.inputs) == 1 and tms[0] is not None:
        if n.op == "gelu" and n.attrs.get("approximate", "none") != "none":
            raise _Stop("tanh-approximated GELU: no Taylor-model rule")
        return _smooth(n.op, tms[0])
    rule = RULES.get(n.op)
    if rule is not None and rule.affine and n.op not in ("split", "unbind", "tuple_getitem"):
        return _affine(n, tms, consts)
    raise _Stop(f"no Taylor-model rule for {n.op}")


def bound(tm: TaylorModel) -> tuple[float, bool]:
    """``sup ||J_v||_2`` on the ball: ``||A|| + rho ||G||_flat + rho^2 / 2 ||T||_flat + ||P||`` (certified when
    its norms are; see the module doc), rounded up, or where smaller :func:`_schur_bound` of the polynomial part
    plus the remainder's norm (inside the Schur bound the remainder would also widen its off-diagonal terms: on
    the block at 0.1, 0.5688 against 0.5484); ``||P||`` is replaced by ``norm_remainder`` where that is smaller
    (then the bound holds on the domain whose constants gave it: :func:`carry_remainders`)."""
    a, fg, ft, p, certified = tm.norm_parts
    rem = min(p, tm.norm_remainder)
    value = min((a + tm.rho * fg + 0.5 * tm.rho ** 2 * ft + rem) * (1 + 16 * _M),
                (tm.schur_norm + rem) * (1 + 4 * _M))
    return value, certified and math.isfinite(rem)


def _schur_bound(tm: TaylorModel, a: float, fg: float, ft: float, rem: float) -> float:
    """``sup ||J(x)||_2`` on the ball by the Schur complement at the top singular direction of ``J0 = J(c)``.

    Write ``J(x) = J0 + E`` with ``E = G[delta] + T[delta, delta] / 2 + F``, ``||E|| <= e = rho ||G||_flat +
    rho^2 / 2 ||T||_flat + r``, and take the side of ``J0`` with ``p`` rows, ``p`` the smaller dimension, ``B =
    J0 J0^T``. ``J J^T = B + X`` with ``X = J0 E^T + E J0^T + E E^T``, ``||X|| <= x = 2 ||J0|| e + e^2``. For a
    unit ``v`` (the computed top eigenvector of ``B``) and an orthonormal basis ``V_r`` of its complement, in the
    basis ``[v, V_r]``: the corner is ``a' = v^T B v + v^T X v``, the rest of ``v``'s column has norm at most
    ``b = ||B v - (v^T B v) v|| + x`` and the rest block has ``lambda_max <= c = lambda_max(P B P) + x`` (``P = I -
    v v^T``). An eigenvalue ``lambda > c`` makes the rest block minus ``lambda`` negative definite, and its Schur
    complement gives ``(lambda - a')(lambda - c) <= b^2``; so ``lambda_max(J J^T) <= ((a + c) + sqrt((a - c)^2 +
    4 b^2)) / 2`` for every ``a >= a'``, increasing in ``a, b, c``. ``v^T X v = 2 (J0^T v) . (E^T v) + ||E^T
    v||^2``; its part linear in ``delta``, ``2 sum_k delta_k (J0^T v) . (G_k^T v)``, is at most ``2 rho ||h||``
    with ``h_k = (J0^T v) . (G_k^T v)`` exactly, the rest at most ``2 ||J0^T v|| (rho^2 / 2 ||T||_flat + r) +
    e^2``. So the first-order term enters along ``v`` only, where the triangle inequality charges ``rho
    ||G||_flat`` in every direction. Float64 errors: ``B``'s entries err by at most ``q u tr(B) <= p q u ||B||``
    (``q``: the other side; ``p q n^2 = |S| n^3 <=`` ``JACOBIAN_ENTRIES``, so at most ``1.1e-10 ||B||``), and
    ``v^T B v``, the residual, ``lambda_max(P B P)`` (LAPACK: a small multiple of ``p u ||B||``) and ``h`` by as
    little; ``1e-12 p (||B||_F + 1)``, ``1e-12 ||J0^T v|| ||[G_k^T v]||_F`` and the final factors ``1 + 16 m``
    (relative ``3.2e-8`` on ``lambda``) cover them. ``inf`` where ``B`` has one row (nothing to gain) or anything
    is not finite."""
    n = tm.A.shape[0]
    j0 = tm.A.reshape(n, -1).T  # (S, n): J(c)
    gk = tm.G.reshape(n, n, -1).transpose(1, 2)  # [k] = G_k^T (S, n): d J / d x_k at c
    if j0.shape[0] > n:
        j0, gk = j0.T, gk.transpose(1, 2)
    p = j0.shape[0]
    if p < 2:
        return math.inf
    bmat = j0 @ j0.T
    if not bool(torch.isfinite(bmat).all()) or not bool(torch.isfinite(gk).all()):
        return math.inf
    mu = 1e-12 * p * (float(torch.linalg.matrix_norm(bmat)) + 1.0)
    _, vecs = torch.linalg.eigh(bmat)
    v = vecs[:, -1]
    v = v / torch.linalg.vector_norm(v)
    bv = bmat @ v
    lam_v = float(v @ bv)
    res = float(torch.linalg.vector_norm(bv - lam_v * v))
    proj = torch.eye(p, dtype=bmat.dtype) - torch.outer(v, v)
    rest = float(torch.linalg.eigvalsh(proj @ bmat @ proj)[-1])
    w = j0.T @ v  # J0^T v
    y = torch.einsum("i,kij->kj", v, gk)  # row k: G_k^T v
    h = y @ w
    sw = float(torch.linalg.vector_norm(w)) * (1 + 4 * _M)
    hn = float(torch.linalg.vector_norm(h)) + 1e-12 * sw * float(torch.linalg.matrix_norm(y))
    rho = tm.rho
    tail = 0.5 * rho ** 2 * ft + rem
    e = (rho * fg + tail) * (1 + 4 * _M)
    x = (2 * a * e + e * e) * (1 + 4 * _M)
    corner = lam_v + mu + 2 * rho * hn + 2 * sw * tail + e * e
    side = res + mu + x
    other = max(rest, 0.0) + mu + x
    lam = 0.5 * ((corner + other) + math.hypot(corner - other, 2 * side))
    value = math.sqrt(lam * (1 + 16 * _M)) * (1 + 16 * _M)
    return value if math.isfinite(value) else math.inf


def _remainder_norm(m: torch.Tensor) -> float:
    """A certified ``||m||_2`` of a ``(n, *S)`` remainder tensor as an ``S x n`` matrix, ``inf`` if none."""
    nm = norms.dense_norm(m.reshape(m.shape[0], -1).T)
    return nm.upper if nm.certified else math.inf


def _fresh_remainder(n: ir.IRNode, ins: list[TaylorModel | None], consts: Mapping[str, torch.Tensor], nin: int,
                     rho: float, p: torch.Tensor, own: float) -> tuple[torch.Tensor, float]:
    """``P0_v`` and ``||P0_v||_2``: the node's entrywise remainder with every input's ``P`` set to 0 (its own
    part; see :func:`carry_remainders`); ``p`` (``P_v``) and ``own`` (its norm) where no input has a remainder
    to drop."""
    if all(t is None or not bool(t.P.any()) for t in ins):
        return p, own
    zeroed: list[TaylorModel | None] = [None if t is None else dataclasses.replace(t, P=torch.zeros_like(t.P))
                                        for t in ins]
    p0 = _step(n, zeroed, consts, nin, rho).P
    return p0, _remainder_norm(p0)


@dataclasses.dataclass
class Models:
    """What :func:`build` computes once per ball (it does not depend on any node's constants): every node's
    model, ``node -> reason`` where none, and per node ``||P_v||_2`` (``own``), ``||P0_v||_2`` (``fresh``) and
    ``P0_v`` itself (``fresh_entries``, ``(n, *S)``: the entrywise bound of the node's own bracket)."""

    tms: dict[str, TaylorModel]
    reasons: dict[str, str]
    own: dict[str, float]
    fresh: dict[str, float]
    fresh_entries: dict[str, torch.Tensor]


def build(g: nx.DiGraph, center: torch.Tensor, rho: float, seed: str | None = None,
          base: Models | None = None) -> Models:
    """Every node's Taylor model on the ball ``B(center, rho)`` as far as the rules reach (see the module doc),
    with the remainder norms that :func:`carry_remainders` combines. With ``seed`` (a node) the models of the
    seed's descendants also carry their :class:`Tangent` with respect to a perturbation of the seed's value, and
    no remainder norms are kept; the models of other nodes are ``base``'s where given."""
    (inp,) = g.graph["inputs"]
    after = nx.descendants(g, seed) | {seed} if seed is not None else set()  # the nodes with a tangent
    seed_size = math.prod(tuple(ir.node(g, seed).out_shape)) if seed is not None else 0
    shape = tuple(ir.node(g, inp).out_shape)
    nin = math.prod(shape)
    tms: dict[str, TaylorModel] = {}
    reasons: dict[str, str] = {}
    consts: dict[str, torch.Tensor] = {}
    own: dict[str, float] = {}
    fresh: dict[str, float] = {}
    fresh_entries: dict[str, torch.Tensor] = {}
    for n in ir.nodes(g):
        if n.op == "input":
            tm = _constant(center.detach().to(_DT).reshape(shape), nin, rho)
            tm.A = torch.eye(nin, dtype=_DT).reshape(nin, *shape)
            tms[n.name] = tm
            continue
        if n.op == "constant":
            _keep_constant(n, consts)
            continue
        var = [i for i in n.inputs if i not in consts]
        missing = [i for i in var if i not in tms]
        if missing:
            reasons[n.name] = reasons.get(missing[0], f"no model for {missing[0]}")
            continue
        if not var:
            reasons[n.name] = "constant-valued node"
            continue
        out = n.out_shape[0] if n.op == "output" else n.out_shape
        size = math.prod(tuple(out)) * nin ** 3 if isinstance(out, (tuple, list)) else None
        if size is None or size > JACOBIAN_ENTRIES:
            reasons[n.name] = f"work limit: third derivatives of {size} entries (limit {JACOBIAN_ENTRIES})"
            continue
        if n.name in after:
            tan_size = math.prod(tuple(out)) * nin ** 2 * seed_size
            if tan_size > TANGENT_ENTRIES:  # no model here, so no tangent (never a zero one) downstream
                reasons[n.name] = f"work limit: a tangent of {tan_size} entries (limit {TANGENT_ENTRIES})"
                continue
        ins = [tms.get(i) for i in n.inputs]
        if seed is not None and base is not None and n.name not in after:
            if n.name in base.tms:
                tms[n.name] = base.tms[n.name]
            else:
                reasons[n.name] = base.reasons.get(n.name, "no model")
            continue
        try:
            tm = _step(n, ins, consts, nin, rho)
            if n.name == seed:
                tm = dataclasses.replace(tm, tan=seed_tangent(tuple(tm.c.shape), nin, rho))
            if n.op != "output" and seed is None:
                own[n.name] = tm.norm_parts[3]  # kept on the model: bound() reads it again
                fresh_entries[n.name], fresh[n.name] = _fresh_remainder(n, ins, consts, nin, rho, tm.P,
                                                                         own[n.name])
        except (_Stop, _PartsStop) as exc:
            reasons[n.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a rule that cannot handle this node: no model, said why
            reasons[n.name] = f"Taylor model of {n.op} failed ({type(exc).__name__}: {exc})"
            continue
        checked = (tm.c, tm.A, tm.G, tm.T, tm.E, tm.P) + (
            () if tm.tan is None else (tm.tan.K0, tm.tan.K1, tm.tan.K2, tm.tan.Q))
        if not all(bool(torch.isfinite(x).all()) for x in checked):
            reasons[n.name] = "non-finite Taylor model"
            continue
        tms[n.name] = tm
    return Models(tms, reasons, own, fresh, fresh_entries)


@dataclasses.dataclass
class SeedBounds:
    """What a seed ``w`` gives :func:`carry_remainders`, per descendant ``v`` (and ``w`` itself): ``k[v] >= sup
    ||d v / d w||_2`` on the ball (``inf`` where no :class:`Tangent` reached ``v``) and, where one did,
    ``weight[v] >= |d v / d w|`` entrywise, an ``(m_w, numel S_v)`` matrix (:attr:`Tangent.bound`)."""

    k: dict[str, float]
    weight: dict[str, torch.Tensor]


def tangent_bounds(g: nx.DiGraph, center: torch.Tensor, rho: float, seed: str, base: Models) -> SeedBounds:
    """``k_v >= sup ||d v / d w||_2`` and ``|d v / d w|``'s entrywise bound over the ball for the seed ``w`` and
    every descendant ``v``: the derivative of ``v`` with respect to a perturbation of ``w``'s value, all other
    nodes' dependence on the input kept (the chain rule's sum over every path from ``w`` to ``v``), from the
    seeded :func:`build`. ``k_w = 1``, ``weight_w = I``."""
    seeded = build(g, center, rho, seed=seed, base=base)
    m = math.prod(tuple(ir.node(g, seed).out_shape))
    out = SeedBounds({seed: 1.0}, {seed: torch.eye(m, dtype=_DT)})
    for v in nx.descendants(g, seed):
        tm = seeded.tms.get(v)
        if ir.node(g, v).op == "output":
            continue
        if tm is None or tm.tan is None:
            out.k[v] = math.inf
            continue
        out.k[v] = tm.tan.norm()
        out.weight[v] = tm.tan.bound.reshape(m, -1)
    return out


def contributions(g: nx.DiGraph, built: Models, local: Mapping[str, LocalConstant], target: str,
                  ) -> dict[str, float]:
    """Each node's share of the carried remainder at ``target``: ``||P0_w||_2`` carried alone by the domain's
    constants (without the minima of :func:`carry_remainders`, an estimate used to pick seeds)."""
    order = [n for n in ir.nodes(g) if n.name in built.own]
    out: dict[str, float] = {}
    for w, f in built.fresh.items():
        if f <= 0 or not math.isfinite(f) or target not in nx.descendants(g, w) | {w}:
            continue
        r: dict[str, float] = {w: f}
        for n in order:
            lc = local.get(n.name)
            if n.name == w or lc is None or not lc.certified or len(lc.partials) != len(n.inputs):
                continue
            rs = [r.get(i, 0.0) for i in n.inputs]
            if any(rs):
                r[n.name] = own_rule(lc, [Cumulative(x, True) for x in rs]).value
        out[w] = r.get(target, 0.0)
    return out


def carry_remainders(g: nx.DiGraph, built: Models, local: Mapping[str, LocalConstant],
                     seeds: Mapping[str, SeedBounds] | None = None) -> None:
    """Set every model's ``norm_remainder``: ``r_v >= ||F_v(x)||_2`` for ``x`` in a domain ``D`` inside the ball,
    from ``local``, every node's constants on ``D`` (``partials[i] >= sup_{x in D} ||D_i f_v(u(x))||_2``).

    The entrywise ``P`` loses what cancels through ``|M|`` and products (a LayerNorm's ``|I - 11^T/n - z
    z^T/n|`` has norm near 3 where the projection has 1). By the chain rule ``J_v(x) = sum_i D_i f_v(u(x))
    J_i(x)``, and ``J_i(x) = Jhat_i(x) + F_i(x)`` with ``Jhat_i`` the polynomial part, so ``J_v(x) - Jhat_v(x) =
    [sum_i D_i f_v(u(x)) Jhat_i(x) - Jhat_v(x)] + sum_i D_i f_v(u(x)) F_i(x)``. The rule run with every input's
    ``P`` set to 0 bounds the bracket entrywise (``P0_v``: the rule's own case ``F_i = 0``, the value models
    and their remainders ``E`` unchanged), and the sum has norm at most ``sum_i p_i r_i`` (in ``l2`` for ops
    that stack their inputs, as AutoLip combines them: :func:`~lipgraph.bounds.relations.own_rule`). So ``r_v =
    min(||P_v||_2, sum_i p_i r_i + ||P0_v||_2)``, ``r = 0`` at the input and for constants, and ``||P_v||_2``
    where a node's constant is not certified. It holds on ``D`` only (the partials are ``D``'s), which is
    where the domain pass uses the relations. Cheap: ``P`` and ``P0`` are :func:`build`'s, so each round of a
    domain pass (new constants) costs a walk over the graph.

    ``seeds`` (``w -> SeedBounds``, :func:`tangent_bounds`) take some brackets out of the product of partials:
    unrolled, the recursion is linear in the brackets, ``F_v(x) = sum_u K_vu(x) B_u(x)`` with ``K_vu = d v / d u``
    (zero unless ``v`` descends from ``u``), so ``F_v = sum_{w in seeds} K_vw B_w + R_v`` where ``R_v`` solves the
    same recursion without the seeds' brackets: ``||R_v|| <= min(||P_v|| + s_v, sum_i p_i ||R_i|| + [v not a
    seed] ||P0_v||)`` with ``s_v >= ||sum_w K_vw B_w||``, and ``r_v`` is also at most ``s_v + ||R_v||``. The
    seed's ``k`` is the norm of a derivative of the whole sub-graph from ``w`` to ``v``, where the product of
    partials multiplies norms node by node. ``s_v`` is the smaller of ``sum_w k_vw ||P0_w||`` and ``||sum_w
    W_vw P0_w||_2`` with ``W_vw >= |K_vw|`` entrywise (:class:`SeedBounds`), as ``|sum_w K_vw B_w| <= sum_w
    |K_vw| |B_w|`` and a nonnegative matrix dominates the norm of every matrix it bounds entrywise: the seeds'
    brackets are added before the norm is taken (on the one-block transformer at radius 0.1, 0.0285 at the head
    against 0.0462)."""
    tms = built.tms
    seeds = seeds or {}
    fs = {w: built.fresh.get(w, math.inf) for w in seeds}
    entries = {w: built.fresh_entries[w].reshape(built.fresh_entries[w].shape[0], -1) for w in seeds
               if w in built.fresh_entries}
    rest: dict[str, float] = {}
    for n in ir.nodes(g):
        tm = tms.get(n.name)
        if tm is None:
            continue
        if n.op == "input":
            tm.norm_remainder = 0.0  # J = I exactly
            rest[n.name] = 0.0
            continue
        if n.op == "output" or n.name not in built.own:
            continue  # the output's model is its input's, remainder included
        own = built.own[n.name]
        lc = local.get(n.name)
        r = own
        carries = lc is not None and lc.certified and len(lc.partials) == len(n.inputs)
        if carries:
            rs = [tms[i].norm_remainder if i in tms else 0.0 for i in n.inputs]
            carried = own_rule(lc, [Cumulative(x, True) for x in rs]).value
            if math.isfinite(carried):
                r = min(own, (carried + built.fresh[n.name]) * (1 + 4 * _M))
        if seeds:
            part = _seed_part(n.name, seeds, fs, entries)
            rest_v = own + part
            if carries:
                rr = [rest.get(i, 0.0) for i in n.inputs]
                carried = own_rule(lc, [Cumulative(x, True) for x in rr]).value
                fresh = 0.0 if n.name in seeds else built.fresh[n.name]
                if math.isfinite(carried):
                    rest_v = min(rest_v, (carried + fresh) * (1 + 4 * _M))
            rest[n.name] = rest_v * (1 + 4 * _M)
            r = min(r, (part + rest[n.name]) * (1 + 4 * _M))
        tm.norm_remainder = r


def _seed_part(v: str, seeds: Mapping[str, SeedBounds], fs: Mapping[str, float],
               entries: Mapping[str, torch.Tensor]) -> float:
    """``s_v >= ||sum_w K_vw B_w||_2`` (see :func:`carry_remainders`): the smaller of the sum of the seeds' norms
    and the norm of the sum of their entrywise bounds, ``(n, m_w) @ (m_w, S_v)`` per seed."""
    near = [w for w, sb in seeds.items() if v in sb.k and fs[w] > 0 and sb.k[v] > 0]  # a zero factor: no inf * 0
    by_norms = sum(seeds[w].k[v] * fs[w] for w in near)
    if not near or any(w not in entries or v not in seeds[w].weight for w in near):
        return by_norms
    total = sum(entries[w] @ seeds[w].weight[v] for w in near)
    assert isinstance(total, torch.Tensor)
    # nonnegative sums of products: float64 errs by at most (m + seeds) u relative, far inside _up's margin
    return min(by_norms, _remainder_norm(_up(total)))


def models(g: nx.DiGraph, center: torch.Tensor, rho: float, local: Mapping[str, LocalConstant] | None = None,
           ) -> tuple[dict[str, TaylorModel], dict[str, str]]:
    """Every node's Taylor model on the ball ``B(center, rho)`` and ``node -> reason`` where none (:func:`build`);
    with ``local`` (constants on a domain inside the ball) the remainders carried by :func:`carry_remainders`."""
    built = build(g, center, rho)
    if local is not None:
        carry_remainders(g, built, local)
    return built.tms, built.reasons


def run(g: nx.DiGraph, local: Mapping[str, LocalConstant], settings: Settings | None = None) -> AlgorithmResult:
    """Relations ``L(v) <= bound(model of v)`` for every node with a Taylor model on the ball of radius ``rho``
    (:func:`l2_radius`) around the domain's center, its remainder carried with the domain's constants
    ``local``; none without a domain or where the input is too large. The models are built once per domain
    pass (``settings.extra["domain_cache"]``, a dict that lives for one pass) and each round with new constants
    only carries the remainders again."""
    t0 = time.perf_counter()
    settings = settings or Settings()
    domain = settings.extra.get("domain")

    def skipped(why: str) -> AlgorithmResult:
        return AlgorithmResult([], [{"method": SOURCE, "skipped": why}], time.perf_counter() - t0)

    if domain is None:
        return skipped("needs a domain (global analysis)")
    if len(g.graph["inputs"]) != 1:
        return skipped("single-input models only")
    dom, example = domain
    (inp,) = g.graph["inputs"]
    nin = math.prod(tuple(ir.node(g, inp).out_shape))
    if nin ** 4 > JACOBIAN_ENTRIES:
        return skipped(f"input of {nin} entries: the input's third derivatives alone have {nin ** 4} entries "
                       f"(limit {JACOBIAN_ENTRIES})")
    rho = l2_radius(dom, example)
    if rho is None or not math.isfinite(rho):
        return skipped("the domain's center is not in its enclosure")
    center = dom.center(example.detach().to(_DT)).to(_DT)
    key = (id(g), rho, tuple(center.reshape(-1).tolist()))  # a cache met with another graph or ball is not used
    cache = settings.extra.get("domain_cache")
    kept = cache.get(SOURCE) if cache is not None else None
    built = kept[1] if kept is not None and kept[0] == key else None
    if built is None:
        built = build(g, center, rho)
        if cache is not None:
            cache[SOURCE] = (key, built)
    carry_remainders(g, built, local)
    seeds = _seeds(g, built, local, center, rho, cache, key)
    if seeds:
        carry_remainders(g, built, local, seeds)
    relations: list[Relation] = []
    records: list[dict[str, Any]] = []
    for n in ir.nodes(g):
        if n.name not in built.tms or n.op in ("input", "constant"):
            continue
        value, certified = bound(built.tms[n.name])
        if not math.isfinite(value):
            continue
        records.append({"node": n.name, "bound": value, "certified": certified})
        relations.append(Relation(n.name, (Term(inp, value, certified),), SOURCE, f"Taylor model at {n.name}"))
    stopped = {k: v for k, v in built.reasons.items() if ir.node(g, k).op != "constant"}
    if stopped:
        records.append({"method": SOURCE, "stopped": stopped})
    return AlgorithmResult(relations, records, time.perf_counter() - t0,
                           {"modelled": len(built.tms), "stopped": len(stopped), "rho": rho, "seeds": sorted(seeds)})


def _seeds(g: nx.DiGraph, built: Models, local: Mapping[str, LocalConstant], center: torch.Tensor, rho: float,
           cache: dict[str, Any] | None, key: Any) -> dict[str, SeedBounds]:
    """The seeds for :func:`carry_remainders`: at most :data:`TANGENT_SEEDS` nodes whose own remainders carry
    the largest shares (:func:`contributions`, each at least :data:`SEED_SHARE` of the carried remainder) to
    the output, where that remainder is at least :data:`SEED_GATE` of the output's bound; their
    :func:`tangent_bounds` kept in the pass's cache (they do not depend on the constants)."""
    outs = [n for n in ir.nodes(g) if n.op == "output"]
    if len(outs) != 1 or len(outs[0].inputs) != 1 or outs[0].inputs[0] not in built.own:
        return {}
    target = outs[0].inputs[0]
    tm = built.tms[target]
    r = tm.norm_remainder
    value, _ = bound(tm)
    if not math.isfinite(r) or not math.isfinite(value) or r < SEED_GATE * value:
        return {}
    shares = contributions(g, built, local, target)
    picked = sorted((w for w, c in shares.items() if c >= SEED_SHARE * r), key=lambda w: (-shares[w], w))
    out: dict[str, SeedBounds] = {}
    for w in picked[:TANGENT_SEEDS]:
        kept = cache.get((SOURCE, w)) if cache is not None else None
        if kept is not None and kept[0] == key:
            out[w] = kept[1]
            continue
        out[w] = tangent_bounds(g, center, rho, w, built)
        if cache is not None:
            cache[(SOURCE, w)] = (key, out[w])
    return out


__all__ = ["FUNCTION_ERROR", "SEED_GATE", "SEED_SHARE", "SOURCE", "TANGENT_ENTRIES", "TANGENT_SEEDS", "Models",
           "SeedBounds", "Tangent", "TaylorModel", "bound", "build", "carry_remainders", "contributions", "models",
           "run", "seed_tangent", "tangent_bounds"]
