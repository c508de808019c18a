"""The LipSDP MNIST network (784 -> 50 -> ReLU -> 10) from ../shared/benchmarks, against published figures.

Its true l2 constant lies in [23.584, 24.366] (best sampled Jacobian norm, LipSDP-Neuron);
AutoLip (product of spectral norms) is 31.504. A certified bound below 23.584 would be a bug.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import lipsdp_mnist_net

import lipgraph

KNOWN_LOWER = 23.584  # a Jacobian norm this network attains
LIPSDP_NEURON = 24.366
AUTOLIP_PUBLISHED = 31.504


@pytest.fixture(scope="module")
def lipsdp_net() -> nn.Module:
    return lipsdp_mnist_net()


def test_autolip_matches_published_product_of_norms(lipsdp_net: nn.Module) -> None:
    report = lipgraph.analyze(lipsdp_net, torch.randn(1, 784), method="autolip", lower=False)
    b = report.bounds["autolip"]
    assert b.certified
    assert b.value == pytest.approx(AUTOLIP_PUBLISHED, rel=2e-4)
    assert b.value >= KNOWN_LOWER


def test_best_certified_bound_is_sound_and_lower_bound_is_below_it(lipsdp_net: nn.Module) -> None:
    report = lipgraph.analyze(lipsdp_net, torch.randn(1, 784), lower=True, lower_budget=10)
    for name, b in report.bounds.items():
        if b.certified:
            assert b.value >= KNOWN_LOWER, f"{name} certified {b.value} below an attained Jacobian norm"
    assert report.certified and math.isfinite(report.upper)
    assert report.lower is not None and 0 < report.lower <= LIPSDP_NEURON


def test_exact_seqlip_is_the_true_constant_and_attained(lipsdp_net: nn.Module) -> None:
    """One hidden layer with input dim 784 >= width 50: every activation pattern is reachable, so the
    exact SeqLip inner maximum max_s ||W2 diag(s) W1|| IS the Lipschitz constant. Check it against the
    published interval and independently: the model's own autograd Jacobian at a point realising the
    maximising pattern attains the certified value."""
    from lipgraph.bounds import seqlip

    w1 = lipsdp_net[0].weight.detach().double()
    w2 = lipsdp_net[2].weight.detach().double()
    res = seqlip.seqlip_chain([w1, w2], [(0.0, 1.0)], max_nodes=10**6)
    assert res.certified and res.inner[0].exact
    assert KNOWN_LOWER <= res.value <= LIPSDP_NEURON  # tighter than the best published SDP bound
    pattern = res.inner[0].pattern.to(torch.float64)
    target = 2.0 * pattern - 1.0  # pre-activations with the maximising signs
    x = torch.linalg.lstsq(w1, target[:, None]).solution[:, 0]
    assert bool(((w1 @ x > 0) == pattern.bool()).all())
    jac = torch.autograd.functional.jacobian(lambda t: lipsdp_net.double()(t), x)
    attained = float(torch.linalg.matrix_norm(jac, ord=2))
    assert attained == pytest.approx(res.value, rel=1e-6)
