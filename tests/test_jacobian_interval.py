"""Interval Jacobian propagation (lipgraph.bounds.jacobian_interval): its bound on a domain is >= the float64
Jacobian norm at sampled domain points (independent ground truth: torch.func.jacrev), it says nothing without
a domain, and a model whose ops lack range or Jacobian rules gets no relation at the output."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph import ir
from lipgraph.bounds import METHODS
from lipgraph.bounds import jacobian_interval as ji
from lipgraph.bounds.local import local_constants
from lipgraph.bounds.on_domain import domain_constants
from lipgraph.bounds.ranges import propagate
from lipgraph.core import Settings
from lipgraph.domains import Ball, Box, Range
from lipgraph.ops import RULES

_DT = torch.float64
SAMPLES = 2000


class Gated(nn.Module):
    """``w(a(x) * gate(g(x)))`` with linear ``a``, ``g``, ``w``."""

    def __init__(self, d: int = 3, h: int = 6, o: int = 2, gate=torch.sigmoid) -> None:
        super().__init__()
        self.a, self.g, self.w = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, o)
        self.gate = gate

    def forward(self, x):
        return self.w(self.a(x) * self.gate(self.g(x)))


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.w = nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.w(h * h)


def _relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _smooth_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))


def _analyse(model: nn.Module, x: torch.Tensor, domain) -> tuple[ji.AlgorithmResult, object]:
    g = lipgraph.trace(model, x)
    loc = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    rr = propagate(g, domain, x)
    dc = domain_constants(g, loc, rr)
    return ji.run(g, loc, Settings(neuron_slopes=dc.slopes, extra={"ranges": rr})), g


def _output_bound(res, g) -> float | None:
    out = [r for r in res.relations if r.node == g.graph["output"]]
    if not out:
        return None
    (r,) = out
    (t,) = r.terms
    assert t.entry == g.graph["inputs"][0] and t.certified and r.source == "jacobian-interval"
    return t.factor


def _max_sampled_norm(model: nn.Module, x: torch.Tensor, domain, n: int = SAMPLES) -> float:
    f = lambda z: model(z[None]).reshape(-1)  # noqa: E731
    xs = domain.sample(n, x, torch.Generator().manual_seed(7)).reshape(n, -1).to(_DT)
    if isinstance(domain, Ball) and domain.norm == "l2" and domain.clip is None:  # the sphere too (sup often there)
        c = domain.center_point.reshape(1, -1)
        d = xs - c
        xs = torch.cat([xs, c + domain.radius * d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)])
    jac = torch.func.vmap(torch.func.jacrev(f))(xs)
    return float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())


def _model(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build().double().eval()


def _smooth_slopes(deriv):
    """Per-neuron derivative intervals of a map whose derivative increases up to 0 and decreases after (sigmoid,
    tanh): min at an endpoint, max at the point of [lo, hi] nearest 0; widened outward (test-local rule)."""

    def slopes(node, r: Range):
        lo = torch.minimum(deriv(r.lo), deriv(r.hi))
        hi = deriv(torch.minimum(torch.maximum(torch.zeros_like(r.lo), r.lo), r.hi))
        return (lo * (1 - 1e-9) - 1e-300).clamp_min(0.0), hi * (1 + 1e-9) + 1e-300

    return slopes


def _sigmoid_d(t):
    s = torch.sigmoid(t)
    return s * (1 - s)


def _tanh_d(t):
    return 1 - torch.tanh(t) ** 2


def _has_smooth_rules() -> bool:
    return all(RULES[k].neuron_slopes is not None and (RULES[k].monotone or RULES[k].ranges is not None)
               for k in ("sigmoid", "tanh"))


@pytest.fixture
def smooth_rules(monkeypatch):
    """sigmoid/tanh ranges (monotone) and per-neuron slopes where the registry lacks them (another helper adds
    the real ones; this keeps the tightness measurement meaningful until then)."""
    for kind, d in (("sigmoid", _sigmoid_d), ("tanh", _tanh_d)):
        rule = RULES[kind]
        new = rule
        if not rule.monotone and rule.ranges is None:
            new = dataclasses.replace(new, monotone=True)
        if rule.neuron_slopes is None:
            new = dataclasses.replace(new, neuron_slopes=_smooth_slopes(d))
        monkeypatch.setitem(RULES, kind, new)


DOMAINS = {
    "ball-l2-0.1": lambda c: Ball(c, 0.1),
    "ball-l2-1": lambda c: Ball(c, 1.0),
    "ball-linf-0.3": lambda c: Ball(c, 0.3, "linf"),
    "box": lambda c: Box(-1.0, 1.0),
    "ball-clipped": lambda c: Ball(c, 0.5, clip=(-0.6, 0.6)),
}


def _center(d: int, seed: int = 3) -> torch.Tensor:
    return (0.5 * torch.rand(1, d, generator=torch.Generator().manual_seed(seed), dtype=_DT) - 0.25)


@pytest.mark.parametrize("dom", sorted(DOMAINS))
@pytest.mark.parametrize("build", [_relu_mlp, _smooth_mlp, Gated, Square], ids=["relu", "smooth", "gated", "square"])
def test_bound_dominates_sampled_jacobian_norms(build, dom) -> None:
    model = _model(build)
    d = next(model.parameters()).shape[1]
    x = _center(d)
    domain = DOMAINS[dom](x)
    res, g = _analyse(model, x, domain)
    bound = _output_bound(res, g)
    if bound is None:  # only where an operand's range is missing (sigmoid gate before its range rule exists)
        assert build is Gated and RULES["sigmoid"].ranges is None and not RULES["sigmoid"].monotone
        assert "no range" in str(res.records[-1]["stopped"].get(g.graph["output"], ""))
        return
    sampled = _max_sampled_norm(model, x, domain)
    assert sampled <= bound, (sampled, bound)
    assert all(r.terms[0].factor >= 0 for r in res.relations)


@pytest.mark.parametrize("dom", sorted(DOMAINS))
@pytest.mark.parametrize("build", [_smooth_mlp, Gated], ids=["smooth", "gated"])
def test_sound_with_per_neuron_smooth_slopes(build, dom, smooth_rules) -> None:
    model = _model(build)
    x = _center(3 if build is Gated else 2)
    domain = DOMAINS[dom](x)
    res, g = _analyse(model, x, domain)
    bound = _output_bound(res, g)
    assert bound is not None
    assert _max_sampled_norm(model, x, domain) <= bound


def test_gated_relu_uses_mul_var_ranges() -> None:
    """a(x) * relu(g(x)): linear and relu have range rules, so mul_var is enclosed with the registry as it is."""
    model = _model(lambda: Gated(gate=torch.relu))
    x = _center(3)
    for domain in (Ball(x, 0.1), Box(-1.0, 1.0)):
        res, g = _analyse(model, x, domain)
        bound = _output_bound(res, g)
        assert bound is not None
        assert _max_sampled_norm(model, x, domain) <= bound


def test_small_ball_is_tight_for_smooth_models(smooth_rules) -> None:
    """On a ball of radius 0.1 the enclosure's radius is small: bound / max sampled norm (issue 12's target for a
    gated model: within 5%)."""
    ratios = {}
    for name, build in (("gated", Gated), ("smooth", _smooth_mlp)):
        model = _model(build)
        x = _center(3 if build is Gated else 2)
        domain = Ball(x, 0.1)
        res, g = _analyse(model, x, domain)
        bound = _output_bound(res, g)
        sampled = _max_sampled_norm(model, x, domain, n=4000)
        ratios[name] = bound / sampled
        assert 1.0 <= ratios[name]
    print("bound / max sampled norm at r = 0.1:", ratios)
    # measured: gated 1.085, smooth 1.114 (the interval hull forgets that a, sigmoid(g) and its slope move
    # together with x); the 5% needs a centred (mean-value) form: test_gated_within_five_percent
    assert ratios["gated"] <= 1.10, ratios
    assert ratios["smooth"] <= 1.15, ratios


@pytest.mark.xfail(reason="issue 12 target (5% on radius 0.1): the interval hull gives 8.5%", strict=True)
def test_gated_within_five_percent(smooth_rules) -> None:
    model = _model(Gated)
    x = _center(3)
    res, g = _analyse(model, x, Ball(x, 0.1))
    assert _output_bound(res, g) <= 1.05 * _max_sampled_norm(model, x, Ball(x, 0.1), n=4000)


@pytest.mark.xfail(not _has_smooth_rules(), reason="needs the sigmoid/tanh range and neuron_slopes rules", strict=False)
def test_small_ball_is_tight_with_the_registry_rules() -> None:
    model = _model(Gated)
    x = _center(3)
    domain = Ball(x, 0.1)
    res, g = _analyse(model, x, domain)
    bound = _output_bound(res, g)
    assert bound is not None and bound <= 1.10 * _max_sampled_norm(model, x, domain, n=4000)


def test_relu_ball_bound_below_global_product() -> None:
    """On a small ball most ReLUs are stable: the enclosure is far below the product of layer norms."""
    model = _model(_relu_mlp)
    x = _center(2)
    res, g = _analyse(model, x, Ball(x, 0.01))
    bound = _output_bound(res, g)
    prod = 1.0
    for m in model:
        if isinstance(m, nn.Linear):
            prod *= float(torch.linalg.matrix_norm(m.weight, ord=2))
    sampled = _max_sampled_norm(model, x, Ball(x, 0.01))
    assert sampled <= bound <= prod
    assert bound <= 1.01 * sampled


def test_no_domain_no_relation() -> None:
    model = _model(_relu_mlp)
    x = _center(2)
    g = lipgraph.trace(model, x)
    loc = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    res = ji.run(g, loc, Settings())
    assert res.relations == [] and "needs a domain" in res.records[0]["skipped"]
    assert METHODS["jacobian-interval"].default


class _MaxScaled(nn.Module):
    """``b(max(h) * h)`` with ``h = relu(a(x))``: amax (a max-reduction) has no interval Jacobian rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h.reshape(1, 1, 4).amax(dim=-1, keepdim=True).reshape(1, 1).expand(1, 4) * h)


def test_op_without_rule_gets_no_relation() -> None:
    """amax has no interval Jacobian rule: it and everything downstream get no relation, with a reason; the
    nodes before it keep theirs."""
    torch.manual_seed(0)
    model = _MaxScaled().double().eval()
    x = _center(2)
    res, g = _analyse(model, x, Ball(x, 0.1))
    assert _output_bound(res, g) is None
    nodes = {r.node for r in res.relations}
    am = next(n.name for n in ir.nodes(g) if n.op == "amax")
    assert am not in nodes and any(ir.node(g, n).op == "relu" for n in nodes)
    assert g.graph["output"] in res.records[-1]["stopped"]


def test_work_limit_is_counted_in_entries(monkeypatch) -> None:
    monkeypatch.setattr(ji, "JACOBIAN_ENTRIES", 10)
    model = _model(_relu_mlp)
    x = _center(2)
    res, g = _analyse(model, x, Ball(x, 0.1))
    assert _output_bound(res, g) is None
    assert "work limit" in str(res.records[-1]["stopped"])


def test_softmax_jacobian_encloses_sampled_points() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 4, generator=gen, dtype=_DT) * 0.3 + torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=_DT)
    p = torch.softmax(z, dim=-1)
    rng = Range(p.min(0).values, p.max(0).values)
    c, r = ji.softmax_jacobian(rng)
    jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert bool(((jac - c).abs() <= r).all())
    assert float(r.max()) < 0.2


def test_interval_product_encloses_products() -> None:
    gen = torch.Generator().manual_seed(1)
    xc, yc = torch.randn(3, 4, generator=gen, dtype=_DT), torch.randn(4, 2, generator=gen, dtype=_DT)
    xr, yr = torch.rand(3, 4, generator=gen, dtype=_DT) * 0.1, torch.rand(4, 2, generator=gen, dtype=_DT) * 0.1
    c, r = ji.bilinear(torch.matmul, xc, xr, yc, yr)
    for _ in range(200):
        x = xc + xr * (2 * torch.rand(3, 4, generator=gen, dtype=_DT) - 1)
        y = yc + yr * (2 * torch.rand(4, 2, generator=gen, dtype=_DT) - 1)
        assert bool(((x @ y - c).abs() <= r).all())
