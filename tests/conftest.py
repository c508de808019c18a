"""Shared helpers: dense Jacobians (the independent ground truth) and node lookup."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph.ops import RULES, BoundContext, LocalConstant


def dense_jacobian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The (out x in) Jacobian of ``f`` at ``x`` in float64."""
    x = x.detach().to(torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), x)
    return jac.reshape(-1, x.numel())


def jacobian_norm(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """||J_f(x)||_2 from the dense Jacobian's SVD (float64)."""
    return float(torch.linalg.matrix_norm(dense_jacobian(f, x), ord=2))


def as_double(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy (for exact Jacobians)."""
    return copy.deepcopy(model).double().eval()


def node_constants(model: nn.Module, x: torch.Tensor, op: str) -> list[LocalConstant]:
    """The rule constants of every IR node of kind ``op`` in ``model`` traced at ``x``."""
    g = lipgraph.trace(model, x)
    ctx = BoundContext(power_iterations=200)
    out = [RULES[n.op].lipschitz(n, ctx) for n in lipgraph.ir.nodes(g) if n.op == op]
    assert out, f"no {op!r} node in {lipgraph.ir.summary(g)}"
    return out


def one_constant(model: nn.Module, x: torch.Tensor, op: str) -> LocalConstant:
    (lc,) = node_constants(model, x, op)
    return lc


class Fn(nn.Module):
    """Wrap a function of one tensor as a module (for tracing)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
