"""Work budgets that keep default runs fast and deterministic: the lower-bound search plan scaled to the model's
multiply-adds, the flop cap of the dense chain methods (skipped with the reason under ``method="auto"``, run
when named), and the per-analysis work budgets of the dense chain methods, affine folding's materialised maps and
SeqLip's dense work (served cheapest first, scaled by ``effort``, lifted by naming the methods)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph import ir
from lipgraph.bounds import affine, chain_mats, chain_sdp, combettes_pesquet, eclipse_fast, seqlip
from lipgraph.bounds.lower import (
    DEFAULT_SEARCH,
    MINIMAL_RATIO,
    MINIMAL_SEARCH,
    NODE_PASS_WORK,
    SEARCH_WORK,
    SMALLEST_SEARCH,
    pass_work,
    search_passes,
    search_plan,
)
from lipgraph.errors import LipgraphError


def test_model_macs_counts_linear_and_conv_work() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    g = lipgraph.trace(model, torch.randn(1, 2, 5, 5))
    conv = 3 * 5 * 5 * (2 * 3 * 3)  # outputs x (inputs per group x kernel)
    linear = 4 * 75
    others = 3 * 5 * 5 * 2 + 4  # relu, flatten: their output sizes; the output node: 4
    assert ir.model_macs(g) == conv + linear + others + 2 * 5 * 5  # the input node counts its size too


def test_search_plan_scales_down_and_honours_an_explicit_budget() -> None:
    assert search_plan(1000) == DEFAULT_SEARCH  # a small model: the full search
    full = search_passes(DEFAULT_SEARCH)
    mid = search_plan(int(SEARCH_WORK / (full / 2)))  # half the default work fits: fewer restarts
    assert mid["restarts"] == 4 and mid["ascent_steps"] == DEFAULT_SEARCH["ascent_steps"]
    fits = search_plan(SEARCH_WORK / search_passes(SMALLEST_SEARCH) * 0.99)  # the smallest search just fits
    assert fits == {"restarts": 1, **{k: v for k, v in SMALLEST_SEARCH.items() if k != "restarts"}}
    # more than MINIMAL_RATIO times over (vgg11 at 64, vit_b_16 at 224): one power step (a jvp, a vjp, a jvp)
    assert search_plan(SEARCH_WORK / search_passes(SMALLEST_SEARCH) * MINIMAL_RATIO * 1.01) == MINIMAL_SEARCH
    assert search_plan(SEARCH_WORK / search_passes(SMALLEST_SEARCH) * 2) == MINIMAL_SEARCH  # 2x over: past the line
    assert search_plan(10 ** 12) == MINIMAL_SEARCH and search_passes(MINIMAL_SEARCH) == 4
    assert search_plan(10 ** 12, 5) == {**DEFAULT_SEARCH, "restarts": 5}  # the caller asked: as asked
    assert search_plan(10 ** 9) == search_plan(10 ** 9)  # a function of the shape only
    for macs in (10 ** 6, 10 ** 7, 10 ** 8):
        plan = search_plan(macs)
        assert search_passes(plan) * macs <= SEARCH_WORK or plan["restarts"] == 1


def test_deep_models_pay_for_their_nodes_and_small_mlps_keep_the_full_search() -> None:
    # a pass of a deep, thin model costs its ops' fixed overhead: 160 nodes of 1e4 multiply-adds each are
    # charged as ~3.4e7, so the search shrinks; without the node term the full search would run
    assert search_plan(160 * 10_000) == DEFAULT_SEARCH
    deep = search_plan(pass_work(160 * 10_000, 160))
    assert search_passes(deep) < search_passes(DEFAULT_SEARCH) / 2
    assert pass_work(1000, 10) == 1000 + 10 * NODE_PASS_WORK
    mlp = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 200),
                        nn.ReLU(), nn.Linear(200, 10))
    g = lipgraph.trace(mlp, torch.randn(1, 64))
    assert search_plan(pass_work(ir.model_macs(g), g.number_of_nodes())) == DEFAULT_SEARCH


def test_large_chains_skip_the_dense_methods_by_default_and_run_when_named(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(1, 6)
    cost = chain_mats.chain_flops([(12, 6), (12, 12), (3, 12)])
    monkeypatch.setattr(chain_mats, "CHAIN_FLOPS", cost / 2)
    rep = lipgraph.analyze(model, x, lower=False)
    fast = rep.bounds["autolip+eclipse-fast"]
    assert "skipped" in fast.details and "flops exceed the default budget" in fast.details["skipped"][0]
    assert fast.value == rep.bounds["autolip"].value  # no relation from the skipped chain
    named = lipgraph.analyze(model, x, lower=False, method=["eclipse-fast"])
    ran = named.bounds["autolip+eclipse-fast"]
    assert "skipped" not in ran.details and ran.value < rep.bounds["autolip"].value


class TwoBranches(nn.Module):
    """``f(x) + h(x)``: two linear-chain segments, ``f`` narrow (width 8) and ``h`` wide (width 40)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.h = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x) + self.h(x)


def _two_branches() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TwoBranches().eval(), torch.randn(1, 6)


def test_chain_methods_share_a_budget_cheapest_segment_first(monkeypatch) -> None:
    model, x = _two_branches()
    narrow = eclipse_fast.work([(8, 6), (3, 8)])
    wide = eclipse_fast.work([(40, 6), (3, 40)])
    assert 0 < narrow < wide
    monkeypatch.setattr(chain_mats, "CHAIN_WORK_BUDGET", (narrow + wide) / 2)  # room for the narrow one only
    runs = [lipgraph.analyze(model, x, lower=False, method="auto") for _ in range(2)]
    res = runs[0].bounds["autolip+eclipse-fast"]
    assert res.details["work"] == narrow
    [skip] = res.details["skipped"]
    assert "would pass the analysis's budget" in skip and "segment h_0" in skip
    assert runs[1].bounds["autolip+eclipse-fast"].value == res.value  # counted, not timed: the same choice
    # effort scales the budget; naming the method or effort=inf lifts it, and then both segments give relations
    assert "skipped" not in lipgraph.analyze(model, x, lower=False, effort=2.0).bounds["autolip+eclipse-fast"].details
    named = lipgraph.analyze(model, x, lower=False, method=["eclipse-fast"]).bounds["autolip+eclipse-fast"]
    lifted = lipgraph.analyze(model, x, lower=False, effort=float("inf")).bounds["autolip+eclipse-fast"]
    assert named.value == lifted.value < res.value


def test_work_estimates_follow_each_method_s_scheme() -> None:
    shapes = [(50, 784), (10, 50)]  # the LipSDP MNIST network: its whole LMI (50 + 50 rows)
    assert chain_sdp.work(shapes) == chain_sdp.WORK_NEWTON * 100 ** 3
    assert combettes_pesquet.work(shapes) < eclipse_fast.work(shapes)
    wide = [(2000, 2000), (2000, 2000), (10, 2000)]  # one-activation windows of 4000 rows: refused, no solve
    assert chain_sdp.work(wide) == 0.0
    budgeted = [(768, 768), (768, 768)]  # 768 + 768 rows > MAX_WINDOW_LMI: the 8-step layer-wise scheme
    assert chain_sdp.work(budgeted) == chain_sdp.BUDGET_NEWTON * 1536 ** 3
    assert chain_sdp.work([(1536, 1536), (384, 1536)]) == 0.0  # 3072 rows > MAX_BUDGET_WINDOW_LMI: refused


def test_affine_materialisations_past_the_budget_are_folded(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 2, 6, 6)
    full = lipgraph.analyze(model, x, lower=False)
    assert "folded_over_budget" not in full.bounds["autolip+affine"].details
    monkeypatch.setattr(affine, "AFFINE_WORK_BUDGET", 0.0)
    cut = lipgraph.analyze(model, x, lower=False)
    aff = cut.bounds["autolip+affine"]
    assert "partial maps were folded, not materialised" in aff.details["folded_over_budget"]
    assert aff.details["materialise_work"] == 0.0
    assert aff.value > full.bounds["autolip+affine"].value  # the exact map's norm is tighter than folding
    assert lipgraph.analyze(model, x, lower=False, method=["affine"]).bounds["autolip+affine"].value == \
        full.bounds["autolip+affine"].value


def test_seqlip_segments_past_the_dense_budget_keep_autolip(monkeypatch) -> None:
    model, x = _two_branches()
    g = lipgraph.trace(model, x)
    works = sorted(seqlip.dense_work(g, seg) for seg in seqlip.find_segments(g))
    assert works[0] > 0
    monkeypatch.setattr(seqlip, "DENSE_WORK", works[0])  # the cheapest segment only
    rep = lipgraph.analyze(model, x, lower=False)
    skipped = [s for s in rep.segments if s["method"].startswith("skipped: its dense work")]
    assert len(skipped) == len(works) - 1 and skipped[0]["seqlip"] == skipped[0]["autolip"]
    lifted = lipgraph.analyze(model, x, lower=False, effort=float("inf"))
    assert not any(s["method"].startswith("skipped") for s in lifted.segments)
    assert lifted.bounds["autolip+seqlip"].value <= rep.bounds["autolip+seqlip"].value


@pytest.mark.parametrize("effort", [0, -1.0, float("nan"), "2", True])
def test_effort_must_be_a_positive_number(effort) -> None:
    model, x = _two_branches()
    with pytest.raises(LipgraphError, match="effort must be a positive number"):
        lipgraph.analyze(model, x, lower=False, effort=effort)


def _counted_net() -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], list[int], torch.Tensor]:
    """A small tanh network, the same function counting its calls (``calls[0]``), and an input point."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    calls = [0]

    def f(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return net(x)

    return net, f, calls, torch.randn(1, 6)


def test_the_minimal_search_makes_only_its_power_step_passes() -> None:
    """With no secant and no further ascent step, the last point's ascent gradient moves a point that nothing
    evaluates: the minimal search calls the model exactly as often as its one power step does (on vit_b_16 at
    224 the skipped gradient was 4.4 of 11.1 s, one loaded thread). The value is the power step's."""
    from lipgraph.bounds.lower import jacobian_norm, lower_bound

    net, f, calls, x = _counted_net()
    torch.manual_seed(1)
    lb = lower_bound(f, [x], **MINIMAL_SEARCH)
    searched, calls[0] = calls[0], 0
    torch.manual_seed(1)
    sigma, _ = jacobian_norm(lambda z: f(z.reshape(1, 6)).reshape(-1), x.reshape(-1), MINIMAL_SEARCH["power_iters"])
    assert searched == calls[0]
    assert lb.value == pytest.approx(sigma, rel=1e-6)


def test_the_minimal_search_with_a_float64_model_skips_its_float32_measurement() -> None:
    """One point, one power step, and a float64 model to evaluate the witness: the float32 ||J v|| after the
    step is not taken (2 model calls: the jvp and the vjp); the value is the float64 ||J v|| of the same v."""
    from torch.func import jvp

    from lipgraph.bounds.lower import jacobian_norm, lower_bound

    net, f, calls, x = _counted_net()
    net64 = copy.deepcopy(net).double()
    torch.manual_seed(1)
    lb = lower_bound(f, [x], f64=net64, **MINIMAL_SEARCH)
    assert calls[0] == 2
    torch.manual_seed(1)
    _, v = jacobian_norm(lambda z: net(z.reshape(1, 6)).reshape(-1), x.reshape(-1), MINIMAL_SEARCH["power_iters"])
    v64 = v.double() / v.double().norm()
    _, jv = jvp(lambda z: net64(z.reshape(1, 6)).reshape(-1), (x.double().reshape(-1),), (v64,))
    assert lb.value == pytest.approx(float(jv.norm()), rel=1e-12)
