"""lipgraph.penalty: a differentiable power-iteration estimate (not a certificate)."""

from __future__ import annotations

import torch
import torch.nn as nn

from lipgraph.penalty import penalty
from tests.conftest import dense_jacobian


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()


def test_penalty_converges_to_product_of_norms_from_below() -> None:
    net = _net()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    state: dict = {}
    for _ in range(50):
        p = penalty(net, x, iterations=5, state=state).detach()
    conv_mat = dense_jacobian(lambda z: net[0]._conv_forward(z, net[0].weight, None), x[:1])
    true = float(torch.linalg.matrix_norm(conv_mat, 2) * torch.linalg.matrix_norm(net[3].weight.detach(), 2))
    assert float(p) <= true * (1 + 1e-9)  # an estimate from below, never a bound
    assert float(p) >= true * 0.999
    assert len(state) == 2


def test_penalty_gradient_matches_finite_differences() -> None:
    net = _net()
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    state: dict = {}
    penalty(net, x, iterations=3, state=state)
    p = penalty(net, x, iterations=0, state=state)  # vectors frozen: a smooth function of the weights
    p.backward()
    gen = torch.Generator().manual_seed(3)
    for param in (net[0].weight, net[3].weight):
        d = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        h = 1e-6
        with torch.no_grad():
            param += h * d
            up = float(penalty(net, x, iterations=0, state=state))
            param -= 2 * h * d
            dn = float(penalty(net, x, iterations=0, state=state))
            param += h * d
        fd = (up - dn) / (2 * h)
        an = float((param.grad * d).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (fd, an)
        assert abs(an) > 1e-3  # a real gradient, not a vacuous zero
