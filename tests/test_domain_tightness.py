"""Issue 12 must-show: certified bounds on l2 balls of radius 0.1 for a gated model ``w(a(x) * sigmoid(g(x)))``
and a one-block transformer, against the attained value (report.lower and float64 sampling of ||J(x)||_2 inside
the ball, independent ground truth via torch.autograd.functional.jacobian). Also the soundness of the pieces
the transformer needs: the interval Jacobian of layer/rms norm against sampled float64 Jacobians, and the whole
domain-aware pass (mean-value ranges, LN factors from the input's enclosure) against sampled Jacobian norms
and sampled node values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph import execute, ir
from lipgraph.bounds import jacobian_interval as ji
from lipgraph.bounds.local import local_constants
from lipgraph.bounds.on_domain import domain_constants
from lipgraph.bounds.ranges import propagate
from lipgraph.core import Settings
from lipgraph.domains import Ball, Range

_DT = torch.float64


class Gated(nn.Module):
    """``w(a(x) * sigmoid(g(x)))``, x in R^8, a, g: 8 -> 16, w: 16 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.w = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.w(self.a(x) * torch.sigmoid(self.g(x)))


class Block(nn.Module):
    """Pre-norm transformer block on (1, 4, 8): x + MHA(LN(x)), then + MLP(LN(.)) with GELU; mean-pool, Linear
    head to 3 outputs."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


class NormMLP(nn.Module):
    """Linear -> norm -> tanh -> Linear (the norm's input is not the model's input)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.n = nn.LayerNorm(8) if norm == "layer" else nn.RMSNorm(8, eps=1e-5)

    def forward(self, x):
        return self.b(torch.tanh(self.n(self.a(x))))


def _build(cls, *args, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = cls(*args).double().eval()
    if isinstance(m, NormMLP) and m.n.weight is not None:  # non-trivial gamma / beta
        with torch.no_grad():
            m.n.weight.uniform_(0.5, 1.5)
            if getattr(m.n, "bias", None) is not None:
                m.n.bias.uniform_(-0.5, 0.5)
    return m


def _point(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=_DT)


def _jnorm(model: nn.Module, x: torch.Tensor) -> float:
    j = torch.autograd.functional.jacobian(lambda t: model(t.reshape(x.shape)).reshape(-1), x.reshape(-1))
    return float(torch.linalg.matrix_norm(j, 2))


def _ball_points(x: torch.Tensor, r: float, n: int, seed: int = 0) -> list[torch.Tensor]:
    """The center, ``n`` uniform points of the ball and ``n`` points on its sphere."""
    gen = torch.Generator().manual_seed(seed)
    out = [x]
    for k in range(2 * n):
        d = torch.randn(x.shape, generator=gen, dtype=_DT)
        scale = 1.0 if k % 2 else float(torch.rand((), generator=gen, dtype=_DT)) ** (1 / x.numel())
        out.append(x + r * scale * d / d.norm())
    return out


def _max_sampled(model: nn.Module, x: torch.Tensor, r: float, n: int) -> float:
    return max(_jnorm(model, p) for p in _ball_points(x, r, n))


def _pass(model: nn.Module, x: torch.Tensor, domain) -> tuple[ji.AlgorithmResult, object, dict]:
    """The interval Jacobian pass as analyze runs it on a domain (ranges, neuron slopes, the domain itself)."""
    g = lipgraph.trace(model, x)
    loc = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    rr = propagate(g, domain, x)
    dc = domain_constants(g, loc, rr)
    st = Settings(neuron_slopes=dc.slopes, extra={"ranges": rr, "domain": (domain, x)})
    return ji.run(g, loc, st), g, st


def _bound_at(res, name: str) -> float | None:
    return next((r.terms[0].factor for r in res.relations if r.node == name), None)


# --- layer / rms norm Jacobian enclosure -----------------------------------------------------------------


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_jacobian_encloses_sampled_jacobians(op) -> None:
    """Every float64 Jacobian of the norm at sampled points of a box lies in the entrywise enclosure."""
    gen = torch.Generator().manual_seed(5)
    k = 6
    mod = nn.LayerNorm(k) if op == "layer_norm" else nn.RMSNorm(k, eps=1e-5)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(k, generator=gen) + 0.2)
        if op == "layer_norm":
            mod.bias.copy_(torch.randn(k, generator=gen))
    mod = mod.double()
    x = torch.randn(1, 3, k, generator=gen, dtype=_DT)
    g = lipgraph.trace(mod, x)
    node = next(n for n in ir.nodes(g) if n.op == op)
    for w in (0.05, 0.3):
        r = Range(x - w, x + w)
        mc, mr = ji.norm_jacobian(node, r)
        for _ in range(300):
            p = x + w * (2 * torch.rand(x.shape, generator=gen, dtype=_DT) - 1)
            for t in range(3):
                j = torch.autograd.functional.jacobian(lambda v, t=t: mod(v.reshape(1, 1, k)).reshape(-1),
                                                        p[0, t])
                assert bool(((j - mc[t]).abs() <= mr[t]).all()), (op, w, float(((j - mc[t]).abs() - mr[t]).max()))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("radius", [0.1, 0.5])
def test_norm_models_sound_with_domain(norm, radius) -> None:
    """Bounds at every node with a relation dominate the sampled float64 Jacobian norms of that node, and the
    pass's refined ranges hold the sampled node values."""
    model = _build(NormMLP, norm)
    x = _point((1, 6))
    res, g, st = _pass(model, x, Ball(x, radius))
    out = g.graph["output"]
    bound = _bound_at(res, out)
    assert bound is not None
    assert bound >= _max_sampled(model, x, radius, 300)


def test_block_sound_at_every_node() -> None:
    """The transformer block: every node's interval-Jacobian bound >= its float64 Jacobian norm at sampled
    ball points (the nodes after ln2 use mean-value ranges and the LN factors from the enclosure)."""
    model = _build(Block)
    x = _point((1, 4, 8))
    res, g, _ = _pass(model, x, Ball(x, 0.1))
    bounds = {r.node: r.terms[0].factor for r in res.relations}
    assert g.graph["output"] in bounds
    for p in _ball_points(x, 0.1, 20, seed=3):
        _, vals = execute(g, p, keep=True)
        for name, b in bounds.items():
            j = torch.autograd.functional.jacobian(
                lambda t, name=name: execute(g, t.reshape(x.shape), keep=True)[1][name].reshape(-1),
                p.reshape(-1))
            assert float(torch.linalg.matrix_norm(j, 2)) <= b, name


def test_mean_value_ranges_hold_sampled_values() -> None:
    """The ranges the pass refines (mean-value form) enclose every sampled node value of the block."""
    model = _build(Block)
    x = _point((1, 4, 8))
    dom = Ball(x, 0.1)
    g = lipgraph.trace(model, x)
    rr = propagate(g, dom, x)
    at_c = propagate(g, Ball(x, 0.0), x).ranges
    encs, _ = ji.propagate(g, rr.ranges, Settings(), (dom, x), at_c)
    mv = {n: ji.mean_value_range(e, at_c[n], dom, x) for n, e in encs.items() if isinstance(at_c.get(n), Range)}
    assert len(mv) > 20
    for p in _ball_points(x, 0.1, 100, seed=4):
        _, vals = execute(g, p, keep=True)
        for name, r in mv.items():
            v = vals[name].to(_DT).reshape(r.lo.shape)
            assert bool(((r.lo <= v) & (v <= r.hi)).all()), name


# --- tightness (issue 12 must-show) ----------------------------------------------------------------------


def _tightness(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    rep = lipgraph.analyze(model, x, domain=Ball(x, 0.1, "l2"), lower_budget=8)
    attained = max(rep.lower, _max_sampled(model, x, 0.1, 150))
    return rep.upper, attained


def test_gated_tightness_on_ball() -> None:
    """Gated model on Ball(x, 0.1) (issue 12's 5%): measured certified 0.177969 (the third-order Taylor models of
    lipgraph.bounds.taylor with the Schur-complement bound of their polynomial part; 0.182104 with the triangle
    inequality ||A|| + rho ||G|| + rho^2/2 ||T|| + r, 0.18431 with the interval Jacobian's centred form ||J(c)||
    + rho ||[H_1 ... H_n]||, 0.22947 with its plain hull; no seeded tangent: the output's carried remainder is
    2.6e-5), attained 0.17637 (report.lower; float64 sampling 0.17600): ratio 1.009 (1.033 earlier in stop 34)."""
    upper, attained = _tightness(_build(Gated), _point((1, 8)))
    assert upper >= attained
    assert upper == pytest.approx(0.177969, rel=1e-4)
    assert attained == pytest.approx(0.17637, rel=1e-3)
    assert upper <= 1.01 * attained


def test_block_tightness_on_ball() -> None:
    """One-block transformer on Ball(x, 0.1) (issue 12's 5%): measured certified 0.51762, attained 0.49777
    (report.lower; float64 sampling 0.49544): ratio 1.040.

    History of the bound: 116.1x the attained value at first, 57.774 after the mean-value ranges of stop 31,
    8.9138 with the Taylor models, 1.95752 with their remainders carried by the chain rule, 1.78295 with the
    value's cubic term, 0.92739 then 0.54857 in stop 34 (seeded tangents take six nodes' own remainders out of
    the product of partials; the Schur-complement bound of the polynomial part). Stop 35: 0.53090 with the seeds'
    brackets added entrywise before the norm (||sum_w |K_w| P0_w|| instead of sum_w k_w ||P0_w||), then 0.51762
    with the value remainders as affine forms, whose symbols cancel through LayerNorm, the attention's products
    and the linear layers (the value remainder at the second LayerNorm's output: 0.0194 -> 0.00105; that
    LayerNorm's own Jacobian remainder 0.118 -> 0.032, GELU's 0.062 -> 0.0072).

    What remains: 0.502 of the bound is the polynomial part at the output (Schur; attained 0.498) and 0.015 the
    carried remainder, mostly the first LayerNorm's and the softmax's own remainders (0.019 and 0.013, third-order
    Jacobian terms) through their tangents."""
    upper, attained = _tightness(_build(Block), _point((1, 4, 8)))
    assert upper >= attained
    assert upper == pytest.approx(0.51762, rel=1e-3)
    assert attained == pytest.approx(0.49777, rel=1e-3)
    assert upper / attained <= 1.05


def test_mean_value_ranges_hold_on_the_ball() -> None:
    """The mean-value enclosures (every node's center value +- its constant on the ball times the radius, from the
    domain pass's constants and relations) contain every node's float64 value at 100 sampled points of the ball,
    and LayerNorm's spread-based variance bound is below every sampled token variance."""
    from lipgraph.bounds.mean_value import center_ranges, l2_radius, mean_value_ranges, spreads  # noqa: PLC0415
    from lipgraph.bounds.relations import combine  # noqa: PLC0415
    from lipgraph.ops.normalization import spread_scale_lower  # noqa: PLC0415

    model = _build(Block)
    x = _point((1, 4, 8))
    dom = Ball(x, 0.1)
    g = lipgraph.trace(model, x)
    loc = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    rr = propagate(g, dom, x)
    dc = domain_constants(g, loc, rr)
    spread = spreads(center_ranges(g, dom, x), l2_radius(dom, x), combine(g, dc.local))
    mv = mean_value_ranges(spread)
    assert len(mv) > 20
    ln2 = ir.node(g, "ln2")
    var_low = spread_scale_lower(ln2, *spread[ln2.inputs[0]])
    g64 = ir.to_float64(g)
    for p in _ball_points(x, 0.1, 100, seed=5):
        _, vals = execute(g64, p, keep=True)
        for name, r in mv.items():
            v = vals[name].to(_DT).reshape(r.lo.shape)
            assert bool(((r.lo <= v) & (v <= r.hi)).all()), name
        y = vals[ln2.inputs[0]].to(_DT).reshape(-1, 8)
        assert bool((var_low <= y.var(dim=1, unbiased=False)).all())


# --- second order (the centred form) ---------------------------------------------------------------------


class TanhSquare(nn.Module):
    """``w(tanh(a(x)) * b(x))``: tanh, a full-shape product and linear maps (all with second-order rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.w = nn.Linear(5, 7), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.w(torch.tanh(self.a(x)) * self.b(x))


class SoftAttn(nn.Module):
    """Single-head attention on a (3, 2) input: ``softmax(q k^T) v`` with q, k, v linear (matmul_var, softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        s = torch.matmul(self.q(x), self.k(x).transpose(-1, -2))
        return torch.matmul(torch.softmax(s, dim=-1), self.v(x))


class NormGelu(nn.Module):
    """``w(gelu(norm(a(x))))`` with a layer or rms norm (non-trivial gamma/beta) and exact GELU."""

    def __init__(self, norm: str = "layer") -> None:
        super().__init__()
        self.a, self.w = nn.Linear(5, 6), nn.Linear(6, 3)
        self.n = nn.LayerNorm(6) if norm == "layer" else nn.RMSNorm(6, eps=1e-5)
        with torch.no_grad():
            self.n.weight.uniform_(0.5, 1.5)
            if getattr(self.n, "bias", None) is not None:
                self.n.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.w(nn.functional.gelu(self.n(self.a(x))))


_SHAPES = {Gated: (1, 8), TanhSquare: (1, 5), SoftAttn: (3, 2), NormGelu: (1, 5)}


@pytest.mark.parametrize("cls,arg", [(Gated, None), (TanhSquare, None), (SoftAttn, None), (NormGelu, "layer"),
                                     (NormGelu, "rms")])
@pytest.mark.parametrize("radius", [0.01, 0.1, 0.6])  # 0.01: tight enough that dropping any D2 term fails
def test_second_order_encloses_sampled_hessians(cls, arg, radius) -> None:
    """Every float64 second derivative d^2 out / dx_j dx_k at sampled ball points lies in the second-order
    enclosure (the rules of linear ops, sigmoid, tanh, mul_var, matmul_var, softmax, layer / rms norm, exact
    GELU), and the centred bound dominates the sampled Jacobian norms."""
    torch.manual_seed(0)
    model = (cls() if arg is None else cls(arg)).double().eval()
    x = _point(_SHAPES[cls])
    dom = Ball(x, radius)
    res, g, st = _pass(model, x, dom)
    rr = st.extra["ranges"]
    at_c = propagate(g, Ball(x, 0.0), x).ranges
    encs, _ = ji.propagate(g, rr.ranges, st, (dom, x), at_c)
    refined = ji._refined_ranges(g, rr.ranges, encs, at_c, (dom, x))
    hs = ji.second_order(g, refined, st, encs)
    out = g.graph["output"]
    assert out in hs
    hc, hr = hs[out]  # (nin, nin, 1, m)
    for p in _ball_points(x, radius, 40, seed=7):
        h = torch.autograd.functional.jacobian(
            lambda t: torch.autograd.functional.jacobian(lambda u: model(u.reshape(x.shape)).reshape(-1), t,
                                                         create_graph=True), p.reshape(-1))  # (m, nin, nin)
        h = h.permute(1, 2, 0).reshape(hc.shape)
        assert bool((hr < 1e6).all())  # a finite, non-vacuous enclosure
        assert bool(((h - hc).abs() <= hr).all()), float(((h - hc).abs() - hr).max())
    bound = _bound_at(res, out)
    assert bound is not None and bound >= _max_sampled(model, x, radius, 200)
