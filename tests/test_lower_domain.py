"""The attained lower bound confined to an input domain: every witness point lies in the domain and
the value never exceeds the true constant on the domain (known exactly, or by brute force over the
activation patterns of the unstable neurons)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lipsdp_mnist_net
from torch import nn

from lipgraph.bounds.lower import jacobian_norm, lower_bound
from lipgraph.domains import Ball, Box, Domain

TOL = 1e-12


def _inside(domain: Domain, z: torch.Tensor, like: torch.Tensor) -> bool:
    """``z`` (flat, float64) lies in ``domain`` (exactly for boxes / l_inf balls; l2 up to 1e-12)."""
    z = z.detach().to(torch.float64).reshape(like.shape)
    box = domain.enclosure(like)
    if not box.contains(z):
        return False
    if isinstance(domain, Ball) and domain.norm == "l2":
        return float((z - domain.center(like)).norm()) <= domain.radius * (1 + TOL)
    return True


def _witness_points(lb) -> list[torch.Tensor]:
    kind, a, b = lb.witness
    return [a, b] if kind == "secant" else [a]


def _linear() -> tuple[nn.Module, float]:
    torch.manual_seed(3)
    m = nn.Linear(5, 3).double()
    return m, float(torch.linalg.matrix_norm(m.weight.detach(), 2))


def _domains(x: torch.Tensor) -> dict[str, Domain]:
    return {
        "box": Box(-0.3, 0.7),
        "l2": Ball(x, 0.25, "l2"),
        "linf-clip": Ball(x, 0.4, "linf", clip=(0, 1)),
        "l2-clip": Ball(x, 0.5, "l2", clip=(0, 1)),
    }


@pytest.mark.parametrize("name", ["box", "l2", "linf-clip", "l2-clip"])
def test_linear_map_attains_its_norm_inside_every_domain(name: str) -> None:
    m, norm = _linear()
    x = torch.full((1, 5), 0.5, dtype=torch.float64) + 0.1 * torch.arange(5, dtype=torch.float64) / 5
    dom = _domains(x)[name]
    lb = lower_bound(m, (x,), restarts=3, seed=1, domain=dom, f64=m)
    assert lb.value == pytest.approx(norm, abs=1e-9)
    assert all(_inside(dom, p, x) for p in _witness_points(lb))


@pytest.mark.parametrize("lo,hi,expected", [(-1.0, -0.5, 0.0), (-1.0, 1.0, 1.0), (0.2, 3.0, 1.0)])
def test_relu_on_an_interval(lo: float, hi: float, expected: float) -> None:
    x = torch.tensor([[0.0]], dtype=torch.float64)
    dom = Box(lo, hi)
    lb = lower_bound(torch.relu, (x,), restarts=4, seed=0, domain=dom, f64=torch.relu)
    assert lb.value <= expected + 1e-12
    assert lb.value == pytest.approx(expected, abs=1e-9)
    if lb.witness is not None:
        assert all(_inside(dom, p, x) for p in _witness_points(lb))


def test_relu_near_its_kink_is_not_overestimated() -> None:
    """relu on [-1, 1e-3]: the search runs into the right end; the value stays <= 1."""
    x = torch.tensor([[-0.5]], dtype=torch.float64)
    lb = lower_bound(torch.relu, (x,), restarts=6, seed=2, domain=Box(-1.0, 1e-3), f64=torch.relu)
    assert 0.0 <= lb.value <= 1.0 + 1e-12


def test_radius_zero_ball_gives_zero() -> None:
    m, _ = _linear()
    x = torch.rand(1, 5, dtype=torch.float64)
    lb = lower_bound(m, (x,), restarts=3, domain=Ball(x, 0.0, "l2"), f64=m)
    assert lb.value == 0.0


def test_flat_box_counts_only_secants() -> None:
    """A box flat in one coordinate: secants only, along the free coordinates; the value is the
    norm of W restricted to those columns (its constant on the box), not ||W||."""
    m, norm = _linear()
    lo = torch.tensor([[0.0, -1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    hi = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    dom = Box(lo, hi)
    x = torch.zeros(1, 5, dtype=torch.float64)
    lb = lower_bound(m, (x,), restarts=4, seed=0, domain=dom, f64=m)
    restricted = float(torch.linalg.matrix_norm(m.weight.detach()[:, 1:], 2))
    assert restricted < norm
    assert lb.value <= restricted * (1 + 1e-9)
    assert lb.witness is not None and lb.witness[0] == "secant"
    assert all(_inside(dom, p, x) for p in _witness_points(lb))


def test_float32_search_witness_is_projected_in_float64() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    m64 = copy.deepcopy(net).double()
    x = torch.rand(1, 6)
    for dom in [Ball(x, 0.3, "l2", clip=(0, 1)), Box(0.1, 0.4)]:
        lb = lower_bound(net, (x,), restarts=4, seed=5, domain=dom, f64=lambda z: m64(z.double()))
        assert lb.witness is not None and lb.witness[1].dtype == torch.float64
        assert all(_inside(dom, p, x) for p in _witness_points(lb))


def test_deterministic_for_a_seed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.rand(1, 6, dtype=torch.float64)
    dom = Ball(x, 0.2, "linf", clip=(0, 1))
    a = lower_bound(net, (x,), restarts=4, seed=9, domain=dom, f64=net)
    b = lower_bound(net, (x,), restarts=4, seed=9, domain=dom, f64=net)
    assert a.value == b.value and a.points == b.points


# --- the shared MNIST network on an l_inf ball within [0, 1] -------------------------------------


def _pattern_brute_force(w1: torch.Tensor, w2: torch.Tensor, dom: Domain, x: torch.Tensor) -> tuple[float, int]:
    """max ||W2 diag(s) W1|| over the patterns s of the unstable neurons (stable ones fixed), from the
    exact interval of W1 x over the domain's box (an l_inf ball within a box is a box): an upper bound
    of the constant of x -> W2 relu(W1 x) on the domain."""
    e = dom.enclosure(x)
    c = w1 @ e.mid.reshape(-1)
    r = w1.abs() @ e.rad.reshape(-1)
    lo, hi = c - r, c + r
    unstable = ((lo <= 0) & (hi >= 0)).nonzero().reshape(-1)
    k = len(unstable)
    assert k <= 16, f"{k} unstable neurons: use a smaller radius"
    codes = torch.arange(2 ** k).unsqueeze(1)
    bits = ((codes >> torch.arange(k)) & 1).to(torch.float64)
    s = (lo > 0).to(torch.float64).repeat(2 ** k, 1)
    s[:, unstable] = bits
    a = w2.unsqueeze(0) * s.unsqueeze(1)  # W2 diag(s)
    gram = a @ (w1 @ w1.T) @ a.transpose(1, 2)  # (W2 S W1)(W2 S W1)^T, 10 x 10
    return float(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).max().sqrt()), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mnist_value_is_positive_and_below_the_pattern_brute_force(seed: int) -> None:
    net = lipsdp_mnist_net()
    m64 = copy.deepcopy(net).double()
    w1, w2 = m64[0].weight.detach(), m64[2].weight.detach()
    x = torch.rand(1, 784, generator=torch.Generator().manual_seed(seed))
    dom = Ball(x, 0.02, "linf", clip=(0, 1))
    upper, _ = _pattern_brute_force(w1, w2, dom, x)
    lb = lower_bound(net, (x,), restarts=8, seed=seed, domain=dom, f64=lambda z: m64(z.double()))
    assert 0.0 < lb.value <= upper * (1 + 1e-9)
    assert all(_inside(dom, p, x) for p in _witness_points(lb))


def test_power_steps_keep_no_history_between_them() -> None:
    """functorch's transforms record their own graphs: a power-method vector that carried the previous step's
    history made each step's graph hold all the earlier ones (a one-restart search on swin_t at 224 grew past
    14 GB in 27 s, and the benchmark's box search was killed at 24 GB). The value is a plain power method's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    z, v0 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    sigma, v = jacobian_norm(model, z.clone().requires_grad_(True), 5, v0)
    assert not v.requires_grad and v.grad_fn is None
    jac = torch.autograd.functional.jacobian(model, z)  # the independent ground truth: the same 5 steps on J
    u = v0 / v0.norm()
    for _ in range(5):
        u = jac.T @ (jac @ u)
        u = u / u.norm()
    assert sigma == pytest.approx(float((jac @ u).norm()), rel=1e-12)
    assert torch.allclose(v, u, atol=1e-12)
