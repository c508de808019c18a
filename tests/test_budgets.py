"""Work budgets that keep default runs fast and deterministic: the lower-bound search plan scaled to the model's
multiply-adds, and the flop cap of the dense chain methods (skipped with the reason under ``method="auto"``, run
when named)."""

from __future__ import annotations

import torch
import torch.nn as nn

import lipgraph
from lipgraph import ir
from lipgraph.bounds import chain_mats
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
    large = search_plan(SEARCH_WORK / search_passes(SMALLEST_SEARCH) * 2)  # the smallest search is 2x over
    assert large == {"restarts": 1, **{k: v for k, v in SMALLEST_SEARCH.items() if k != "restarts"}}
    # more than MINIMAL_RATIO times over (vit_b_16 at 224): one 3-step power method
    assert search_plan(SEARCH_WORK / search_passes(SMALLEST_SEARCH) * MINIMAL_RATIO * 1.01) == MINIMAL_SEARCH
    assert search_plan(10 ** 12) == MINIMAL_SEARCH and search_passes(MINIMAL_SEARCH) == 8
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
