"""Input-domain capabilities of activations, softmax and normalizations against float64 ground truth.

For every rule: (1) its range encloses sampled float64 values over random boxes (including boxes around kinks,
minimisers and the box corners); (2) its per-neuron slopes contain autograd derivatives at >= 10^4 sampled
points and are exact where the map is linear on the box; (3) softmax / norm ``local`` constants are at least the
dense float64 Jacobian norm (SVD) and the secant ratios at sampled points, and far below the global constant on
boxes away from the bad region. All through ``propagate`` and ``domain_constants`` on traced one-op models.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Fn, as_double, jacobian_norm

import lipgraph
from lipgraph.bounds.on_domain import domain_constants
from lipgraph.bounds.ranges import propagate
from lipgraph.domains import Box
from lipgraph.ops import RULES, Settings
from lipgraph.ops import activation_domain as AD
from lipgraph.ops.normalization import variance_lower

DT = torch.float64
SHAPE = (1, 4, 250)
#: Points where something happens (kinks, minimisers, thresholds, pi multiples): box centers cluster there.
SPECIAL = [0.0, -3.0, 3.0, 6.0, -1.0, 1.0, 0.5, -2.0, -1.2784645, -0.7517915, -1.1924312, -1.5, 2.5,
           math.pi / 2, -math.pi, 2 * math.pi]


def _prelu() -> nn.Module:
    m = nn.PReLU(num_parameters=4)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.25, -0.5, 1.5, 0.0]))
    return m


ACTIVATIONS = {
    "relu6": nn.ReLU6(), "relu6-fn": Fn(F.relu6), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "selu": nn.SELU(),
    "silu": nn.SiLU(),
    "mish": nn.Mish(), "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(),
    "abs": Fn(torch.abs), "sin": Fn(torch.sin), "cos": Fn(torch.cos),
    "leaky_relu": nn.LeakyReLU(0.1), "leaky_relu-neg": nn.LeakyReLU(-0.5), "leaky_relu-big": nn.LeakyReLU(2.0),
    "elu": nn.ELU(1.0), "elu-neg": nn.ELU(-0.7), "elu-big": nn.ELU(2.5), "celu": nn.CELU(0.5),
    "softplus": nn.Softplus(beta=2.0, threshold=math.inf), "softplus-threshold": nn.Softplus(beta=2.0),
    "hardtanh": nn.Hardtanh(-2.0, 0.5), "gelu": nn.GELU(), "gelu-tanh": nn.GELU(approximate="tanh"),
    "prelu": _prelu(),
}


def _kind(name: str) -> str:
    """The op kind the model traces to (nn.ReLU6 becomes hardtanh(0, 6))."""
    return "hardtanh" if name == "relu6" else name.split("-")[0]


#: torch's hardsigmoid backward multiplies by float32(1/6): the exact derivative is the ground truth there.
EXACT_DERIVATIVES = {"hardsigmoid": lambda x: ((x > -3) & (x < 3)).to(DT) / 6}
#: autograd's own float64 rounding (e.g. 1 - tanh^2 near 0 has an absolute error of ~1e-16).
AUTOGRAD_TOL = 1e-14


def _box(gen: torch.Generator, center_scale: float = 1.0) -> Box:
    """Per element: a center near a special point (or uniform in [-10, 10]), a log-uniform width in [1e-4, 10]."""
    n = math.prod(SHAPE)
    special = torch.tensor(SPECIAL, dtype=DT)
    pick = special[torch.randint(len(SPECIAL), (n,), generator=gen)]
    noise = torch.randn(n, generator=gen, dtype=DT) * torch.where(torch.rand(n, generator=gen) < 0.5, 0.01, 1.0)
    uniform = (torch.rand(n, generator=gen, dtype=DT) * 20 - 10)
    center = torch.where(torch.rand(n, generator=gen) < 0.7, pick + noise, uniform) * center_scale
    width = 10 ** (torch.rand(n, generator=gen, dtype=DT) * 5 - 4)
    lo = (center - width * torch.rand(n, generator=gen, dtype=DT)).reshape(SHAPE)
    return Box(lo, lo + width.reshape(SHAPE))


def _samples(box: Box, k: int, gen: torch.Generator) -> torch.Tensor:
    """k uniform points, the two corners, and each special point clamped into the box."""
    like = torch.zeros(SHAPE, dtype=DT)
    u = box.sample(k, like, gen)
    extra = [box.lo[None], box.hi[None]] + [torch.clamp(torch.full(SHAPE, s, dtype=DT), box.lo, box.hi)[None]
                                              for s in SPECIAL]
    return torch.cat([u, *extra])


def _analyse(model: nn.Module, box: Box, example: torch.Tensor, kind: str):
    g = lipgraph.trace(copy.deepcopy(model).float(), example.float())
    (node,) = [n for n in lipgraph.ir.nodes(g) if n.op == kind]
    settings = Settings()
    glob = {n.name: RULES[n.op].lipschitz(n, settings) for n in lipgraph.ir.nodes(g)}
    res = propagate(g, box, example)
    dc = domain_constants(g, glob, res, settings)
    return node, res, dc, glob


def _run(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """The model on a stack of inputs shaped like SHAPE (batched along its first dim, which is 1)."""
    return model(xs.reshape(-1, *SHAPE[1:])).reshape(xs.shape)


def _derivatives(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    x = xs.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(_run(model, x).sum(), x)
    return d


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_ranges_and_slopes(name: str) -> None:
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    model = as_double(ACTIVATIONS[name])
    kind = _kind(name)
    box = _box(gen)
    if name == "softplus-threshold":  # keep the boxes below the jump at x = threshold/beta = 10
        box = Box(box.lo.clamp(max=8.0), box.hi.clamp(max=9.0))
    node, res, dc, glob = _analyse(ACTIVATIONS[name], box, torch.zeros(SHAPE, dtype=DT), kind)
    rng = res.ranges[node.name]
    assert rng is not None, res.reasons.get(node.name)
    xs = _samples(box, 12, gen)
    assert xs.shape[0] * math.prod(SHAPE) >= 10_000
    ys = _run(model, xs)
    assert bool(((ys >= rng.lo) & (ys <= rng.hi)).all()), f"{name}: a value leaves its range"
    assert dc.sources.get(node.name) == "domain", dc.sources.get(node.name)
    lo, hi = dc.slopes[node.name]
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and bool((lo <= hi).all())
    d = EXACT_DERIVATIVES[kind](xs) if kind in EXACT_DERIVATIVES else _derivatives(model, xs)
    bad = (d < lo - AUTOGRAD_TOL) | (d > hi + AUTOGRAD_TOL)
    assert not bool(bad.any()), f"{name}: derivative {d[bad][:3]} outside its slope interval"
    # the domain constant never exceeds the global one, and the slopes give it
    assert dc.local[node.name].value <= glob[node.name].value
    assert dc.local[node.name].value == pytest.approx(float(torch.maximum(lo.abs(), hi.abs()).max()), rel=1e-12) \
        or dc.local[node.name].value == glob[node.name].value


def _single_box(lo: float, hi: float) -> Box:
    return Box(torch.full(SHAPE, lo, dtype=DT), torch.full(SHAPE, hi, dtype=DT))


@pytest.mark.parametrize(("name", "lo", "hi", "slope"), [
    ("relu6", 0.5, 5.0, 1.0), ("relu6-fn", -4.0, -0.5, 0.0), ("relu6-fn", 6.5, 9.0, 0.0),
    ("relu6-fn", 0.5, 5.0, 1.0),
    ("hardtanh", -1.5, 0.25, 1.0), ("hardtanh", 0.6, 3.0, 0.0), ("abs", -3.0, -1.0, -1.0), ("abs", 1.0, 2.0, 1.0),
    ("leaky_relu", -3.0, -1.0, 0.1), ("leaky_relu-neg", -3.0, -1.0, -0.5), ("elu", 0.5, 3.0, 1.0),
    ("hardswish", 3.5, 5.0, 1.0), ("hardswish", -6.0, -3.5, 0.0), ("selu", 0.5, 2.0, 1.0507009873554805),
])
def test_stable_slopes_are_exact(name: str, lo: float, hi: float, slope: float) -> None:
    node, _, dc, _ = _analyse(ACTIVATIONS[name], _single_box(lo, hi), torch.zeros(SHAPE, dtype=DT), _kind(name))
    s_lo, s_hi = dc.slopes[node.name]
    assert bool((s_lo == slope).all()) and bool((s_hi == slope).all())
    assert dc.unstable[node.name] == 0.0


@pytest.mark.parametrize(("name", "lo", "hi", "below"), [
    ("sigmoid", 3.0, 4.0, 0.05), ("tanh", 2.0, 2.5, 0.08), ("silu", -6.0, -5.0, 0.03), ("gelu", 3.0, 3.5, 1.012),
    ("mish", 4.0, 5.0, 1.005), ("silu", 0.0, 2.0, 1.0999), ("gelu", 2.0, 9.0, 1.09),
    ("softplus", -3.0, -2.0, 0.02), ("softplus-threshold", -3.0, 4.0, 1.0),
    ("sin", 1.4, 1.6, 0.2), ("cos", -0.1, 0.1, 0.11), ("hardsigmoid", 3.5, 9.0, 0.0),
])
def test_local_slope_constant_is_below_the_global(name: str, lo: float, hi: float, below: float) -> None:
    node, _, dc, glob = _analyse(ACTIVATIONS[name], _single_box(lo, hi), torch.zeros(SHAPE, dtype=DT), _kind(name))
    assert dc.local[node.name].value <= below
    assert dc.local[node.name].value < glob[node.name].value


def test_softplus_straddling_its_jump_keeps_the_global_rule() -> None:
    node, _, dc, glob = _analyse(ACTIVATIONS["softplus-threshold"], _single_box(9.0, 11.0),
                                 torch.zeros(SHAPE, dtype=DT), "softplus")
    assert math.isinf(glob[node.name].value) and math.isinf(dc.local[node.name].value)


def _grid_derivative(f, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-12, 12, 480_001, dtype=DT).requires_grad_(True)
    y = f(x)
    for _ in range(k):
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return x.detach(), y.detach()


@pytest.mark.parametrize(("f", "k2", "fprime"), [
    (F.silu, AD.K2_SILU, AD.silu_prime), (F.gelu, AD.K2_GELU, AD.gelu_prime),
    (lambda t: F.gelu(t, approximate="tanh"), AD.K2_GELU_TANH, AD.gelu_tanh_prime), (F.mish, AD.K2_MISH, AD.mish_prime),
])
def test_second_derivative_bounds_and_closed_form_derivatives(f, k2: float, fprime) -> None:
    x, d2 = _grid_derivative(f, 2)
    assert float(d2.abs().max()) <= k2
    assert float(d2.abs().max()) >= 0.9 * k2  # not vacuous
    _, d1 = _grid_derivative(f, 1)
    assert torch.allclose(fprime(x), d1, atol=1e-13, rtol=0)


@pytest.mark.parametrize(("name", "f"), [
    ("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("mish", F.mish),
])
def test_slope_critical_points(name: str, f) -> None:
    """f'' changes sign only inside the two brackets (on a 1e-5 grid of [-30, 30]), from - to + at the first."""
    x = torch.linspace(-30, 30, 6_000_001, dtype=DT).requires_grad_(True)
    (d1,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    x = x.detach()
    (a0, b0), (a1, b1) = AD.SLOPE_CRITICAL[name]
    # (non-strict: f'' underflows to 0 far in the tails)
    assert bool((d2[x < a0] <= 0).all()) and bool((d2[(x > b0) & (x < a1)] > 0).all())
    assert bool((d2[x > b1] <= 0).all())


@pytest.mark.parametrize(("name", "f"), [
    ("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("mish", F.mish),
    ("hardswish", F.hardswish),
])
def test_minima_brackets(name: str, f) -> None:
    (a, b), fmin = AD.MINIMA[name]
    x, d1 = _grid_derivative(f, 1)
    # f' < 0 left of the bracket, > 0 right of it (quasi-convex: one minimiser, inside the bracket)
    assert bool((d1[x < a - 1e-9] <= 0).all()) and bool((d1[x > b + 1e-9] >= 0).all())
    fine = torch.linspace(a - 1e-3, b + 1e-3, 200_001, dtype=DT)
    assert fmin <= float(f(fine).min()) <= fmin + 1e-6


def test_cos_and_sin_ranges_against_dense_grids() -> None:
    gen = torch.Generator().manual_seed(3)
    lo = torch.rand(2000, generator=gen, dtype=DT) * 40 - 20
    hi = lo + 10 ** (torch.rand(2000, generator=gen, dtype=DT) * 2.5 - 2)
    t = torch.linspace(0, 1, 4001, dtype=DT)
    xs = lo[:, None] + t[None] * (hi - lo)[:, None]
    for f, rng in ((torch.cos, AD.cos_range(lo, hi)), (torch.sin, AD.sin_range(lo, hi))):
        v = f(xs)
        assert bool((v.amin(1) >= rng.lo).all()) and bool((v.amax(1) <= rng.hi).all())
        assert float((v.amin(1) - rng.lo).max()) < 1e-5 and float((rng.hi - v.amax(1)).max()) < 1e-5  # tight


# ---- softmax, log_softmax and the normalizations: local constants against dense Jacobians ----

def _jacobian_checks(model: nn.Module, box: Box, example: torch.Tensor, kind: str, samples: int = 60):
    gen = torch.Generator().manual_seed(11)
    node, res, dc, glob = _analyse(model, box, example, kind)
    assert dc.sources.get(node.name) == "domain", dc.sources.get(node.name)
    lc = dc.local[node.name]
    assert lc.certified and math.isfinite(lc.value)
    dbl = as_double(model)
    xs = box.sample(samples, example, gen)
    rng = res.ranges[node.name]
    ys = dbl(xs.reshape(-1, *example.shape[1:])).reshape(samples, *example.shape) if example.shape[0] == 1 \
        else torch.stack([dbl(x) for x in xs])
    assert bool(((ys >= rng.lo) & (ys <= rng.hi)).all()), "a value leaves its range"
    norms = [jacobian_norm(dbl, x) for x in xs]
    assert max(norms) <= lc.value
    for i in range(samples - 1):
        with torch.no_grad():
            num = float((dbl(xs[i]) - dbl(xs[i + 1])).norm())
        assert num <= lc.value * float((xs[i] - xs[i + 1]).norm()) * (1 + 1e-12)
    return lc.value, max(norms), glob[node.name].value


@pytest.mark.parametrize("dim", [-1, 0])
def test_softmax_local_constant(dim: int) -> None:
    gen = torch.Generator().manual_seed(5)
    lo = torch.randn(3, 6, generator=gen, dtype=DT) * 3
    lo[:, 0] += 12  # one dominant logit per row: p_0 near 1, the constant well below 1/2
    box = Box(lo, lo + 0.3)
    value, seen, glob = _jacobian_checks(Fn(lambda x: F.softmax(x, dim=dim)), box, torch.zeros(3, 6, dtype=DT),
                                         "softmax")
    assert value <= glob
    if dim == -1:
        assert value < 0.3 and value <= 6 * seen


def test_softmax_wide_box_stays_at_one_half() -> None:
    box = Box(torch.full((2, 5), -4.0, dtype=DT), torch.full((2, 5), 4.0, dtype=DT))
    value, _, glob = _jacobian_checks(Fn(lambda x: F.softmax(x, dim=-1)), box, torch.zeros(2, 5, dtype=DT),
                                      "softmax")
    assert value == glob == 0.5


def test_log_softmax_local_constant_and_exact_norm() -> None:
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):  # ||I - 1 p^T|| = sqrt(n) ||p||_2 exactly
        x = torch.randn(7, generator=gen, dtype=DT) * 3
        p = F.softmax(x, dim=-1)
        assert jacobian_norm(lambda z: F.log_softmax(z, dim=-1), x) == pytest.approx(
            math.sqrt(7) * float(p.norm()), rel=1e-10)
    lo = torch.randn(2, 7, generator=gen, dtype=DT)
    box = Box(lo, lo + 0.5)
    value, seen, glob = _jacobian_checks(Fn(lambda x: F.log_softmax(x, dim=-1)), box, torch.zeros(2, 7, dtype=DT),
                                         "log_softmax")
    assert value < glob and value < 2.0 * seen
    lo[:, 2] += 15  # a dominant logit: p is nearly one-hot, ||J|| = sqrt(n) ||p|| is nearly sqrt(n) and attained
    value, seen, glob = _jacobian_checks(Fn(lambda x: F.log_softmax(x, dim=-1)), Box(lo, lo + 0.5),
                                         torch.zeros(2, 7, dtype=DT), "log_softmax")
    assert seen <= value <= seen * (1 + 1e-6) < glob


def _affine(m: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 1.5)
    return m


@pytest.mark.parametrize("case", ["layer_norm", "layer_norm-2d", "group_norm", "instance_norm", "rms_norm"])
def test_norm_local_constants_and_ranges(case: str) -> None:
    gen = torch.Generator().manual_seed(7)
    if case == "layer_norm":
        model, shape = _affine(nn.LayerNorm(8), gen), (3, 8)
    elif case == "layer_norm-2d":
        model, shape = _affine(nn.LayerNorm((2, 4)), gen), (2, 2, 4)
    elif case == "group_norm":
        model, shape = _affine(nn.GroupNorm(3, 6), gen), (2, 6, 3)
    elif case == "instance_norm":
        model, shape = _affine(nn.InstanceNorm1d(3, affine=True), gen), (2, 3, 5)
    else:
        model, shape = _affine(nn.RMSNorm(8, eps=1e-6), gen), (3, 8)
    model = model.double()
    lo = torch.randn(shape, generator=gen, dtype=DT) * 2
    box = Box(lo, lo + 0.2)  # small boxes around spread-out inputs: the variance stays away from 0
    value, seen, glob = _jacobian_checks(model, box, torch.zeros(shape, dtype=DT), case.split("-")[0])
    assert value < glob / 20, (value, glob)
    assert value <= 10 * seen  # reasonably tight


@pytest.mark.parametrize("case", ["layer_norm", "rms_norm"])
def test_norm_on_a_box_around_constant_inputs_is_the_global_rule(case: str) -> None:
    model = (nn.LayerNorm(5) if case == "layer_norm" else nn.RMSNorm(5, eps=1e-5)).double()
    box = Box(torch.full((2, 5), -0.5 if case == "rms_norm" else 0.9, dtype=DT), torch.full((2, 5), 1.1, dtype=DT))
    node, res, dc, glob = _analyse(model, box, torch.zeros(2, 5, dtype=DT), case)
    assert dc.local[node.name].value == pytest.approx(glob[node.name].value, rel=1e-6)
    gen = torch.Generator().manual_seed(1)
    xs = box.sample(200, torch.zeros(2, 5, dtype=DT), gen)
    ys = torch.stack([model(x) for x in xs])
    rng = res.ranges[node.name]
    assert bool(((ys >= rng.lo) & (ys <= rng.hi)).all())


def test_variance_lower_bound_against_a_grid() -> None:
    gen = torch.Generator().manual_seed(9)
    lo = torch.randn(50, 4, generator=gen, dtype=DT) * 2
    hi = lo + torch.rand(50, 4, generator=gen, dtype=DT) * 1.5
    lo[:5], hi[:5] = -torch.rand(5, 4, generator=gen, dtype=DT), torch.rand(5, 4, generator=gen, dtype=DT)
    low = variance_lower(lo, hi)
    m = torch.linspace(-10, 10, 200_001, dtype=DT)[None, :, None]
    dist = torch.clamp(lo[:, None] - m, min=0) + torch.clamp(m - hi[:, None], min=0)
    grid_min = (dist * dist).mean(dim=2).amin(dim=1)  # >= the true minimum
    assert bool((low <= grid_min).all())
    assert bool((low >= grid_min * (1 - 3e-9) - 1e-8).all())  # tight: grid step 1e-4, slack 1e-9 relative
    assert bool((low > 0).any()) and bool((low == 0).any())
    # the box's variance is never below the bound (sampled points)
    xs = lo + torch.rand(2000, 50, 4, generator=gen, dtype=DT) * (hi - lo)
    assert bool((xs.var(dim=2, unbiased=False) >= low).all())


def test_layer_norm_without_eps_on_a_constant_box_has_no_nan() -> None:
    model = nn.LayerNorm(4, eps=0.0).double()
    box = Box(torch.zeros(1, 4, dtype=DT), torch.ones(1, 4, dtype=DT))
    example = torch.arange(4, dtype=DT)[None]  # tracing at a constant input would give NaN
    node, res, dc, glob = _analyse(model, box, example, "layer_norm")
    rng = res.ranges[node.name]
    assert not bool(torch.isnan(rng.lo).any() or torch.isnan(rng.hi).any())
    assert bool((rng.lo >= -math.sqrt(3) * 1.01).all()) and bool((rng.hi <= math.sqrt(3) * 1.01).all())
    assert math.isinf(dc.local[node.name].value)
