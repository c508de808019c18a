"""Randomized soundness: on seeded random models (dense and conv, residual adds, concatenations, poolings,
every activation with a global rule) no float64 Jacobian norm or secant ratio exceeds the certified bound.
A larger run: ``python bench/bench_soundness.py --models 200``."""

from __future__ import annotations

import math

import pytest
from random_models import attained, make

import lipgraph


@pytest.mark.parametrize("seed", range(12))
def test_certified_bound_is_never_below_what_the_model_attains(seed: int) -> None:
    model, x = make(seed)
    r = lipgraph.analyze(model, x, lower=False)
    seen = attained(model, x, samples=20, seed=seed)
    for name, b in r.bounds.items():
        assert not math.isnan(b.value), name
        if b.certified:
            assert seen <= b.value * (1 + 1e-9), f"{name} certified {b.value} but the model attains {seen}"
    assert r.certified and math.isfinite(r.upper)


@pytest.mark.parametrize("seed", range(8))
def test_chain_sdp_bounds_are_never_below_what_the_model_attains(seed: int) -> None:
    """The same check for the opt-in chain SDP (LipSDP by lipgraph's interior point) beside the closed forms."""
    model, x = make(seed)
    r = lipgraph.analyze(model, x, lower=False, method=["lipsdp", "eclipse-fast", "combettes-pesquet"])
    seen = attained(model, x, samples=20, seed=seed)
    assert "autolip+lipsdp" in r.bounds
    for name, b in r.bounds.items():
        assert not math.isnan(b.value), name
        if b.certified:
            assert seen <= b.value * (1 + 1e-9), f"{name} certified {b.value} but the model attains {seen}"


def test_the_ground_truth_reaches_an_exact_bound() -> None:
    """The sampled ground truth is not vacuous: on a linear map it attains the exact certified norm, so a bound
    that was off by even 0.1% there would fail the check above."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(1, 5)
    r = lipgraph.analyze(model, x, lower=False)
    assert attained(model, x, samples=4, seed=0) >= r.upper * (1 - 1e-3)
