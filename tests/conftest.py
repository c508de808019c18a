"""Shared helpers: dense Jacobians (the independent ground truth) and node lookup."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipgraph
from lipgraph import norms
from lipgraph.ops import RULES, LocalConstant, Settings

#: ``../shared/benchmarks`` beside the repository (``LIPGRAPH_SHARED`` overrides it; a git worktree one level
#: deeper also looks one folder further up). Tests that need it fail loudly when it is missing.
_SHARED_CANDIDATES = [Path(p) for p in [os.environ.get("LIPGRAPH_SHARED", "")] if p] + [
    Path(__file__).resolve().parents[2] / "shared" / "benchmarks",
    Path(__file__).resolve().parents[3] / "shared" / "benchmarks"]
SHARED = next((c for c in _SHARED_CANDIDATES if c.exists()), _SHARED_CANDIDATES[-2])


def shared_file(name: str) -> Path:
    """A file of the shared benchmark data, or a loud test failure naming where it was looked for."""
    path = SHARED / name
    if not path.exists():
        pytest.fail(f"BENCHMARK DATA MISSING: {path} not found (looked in {[str(c) for c in _SHARED_CANDIDATES]}); "
                    "these tests need ../shared/benchmarks beside the repository (see its README)", pytrace=False)
    return path


def lipsdp_mnist_net() -> nn.Module:
    """The shared LipSDP MNIST network 784 -> 50 -> ReLU -> 10 (float32 copy of the float64 weights)."""
    w = np.load(shared_file("lipsdp_mnist_784_50_10.npz"))
    net = nn.Sequential(nn.Linear(784, 50, bias=False), nn.ReLU(), nn.Linear(50, 10, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w["W1"]))
        net[2].weight.copy_(torch.from_numpy(w["W2"]))
    return net.float()


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
    ctx = Settings(power_iterations=200)
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


@pytest.fixture
def cheap_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Power-method estimates (uncertified) for conv norms and dense layers wider than 512: the certified
    norms are tested in test_rules.py; model-scale tests (zoo, CLI) check everything else fast."""

    def conv_norm(fwd, in_shape, ctx, weight=None, attrs=None, **kwargs):  # type: ignore[no-untyped-def]
        if weight is None or attrs is None or "output_padding" in attrs:
            return norms.linear_op_estimate(fwd, in_shape, ctx)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[attrs["ndim"]]

        def op(v: torch.Tensor) -> torch.Tensor:  # rebuilt from the attrs: callers may pass a placeholder fwd
            return conv(v, weight.to(v), None, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])

        return norms.linear_op_estimate(op, in_shape, ctx)

    dense = norms.dense_norm

    def dense_norm(w: torch.Tensor, device=None):  # type: ignore[no-untyped-def]
        if min(w.shape[-2:]) <= 512:
            return dense(w, device)
        ctx = Settings(power_iterations=3)
        return norms.linear_op_estimate(lambda v: v @ w.detach().to(v).T, (w.shape[-1],), ctx)

    monkeypatch.setattr(norms, "conv_norm", conv_norm)
    monkeypatch.setattr(norms, "dense_norm", dense_norm)
