"""Whole-model bounds: soundness against Jacobians, AutoLip's composition rules, user constants, custom ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import Fn, as_double, jacobian_norm

import lipgraph
from lipgraph import UserConstant, analyze, execute, register_op, trace
from lipgraph.bounds.lower import lower_bound
from lipgraph.bounds.relations import Cumulative, own_rule
from lipgraph.ops import LocalConstant, exact

# --- linear models: the bound is never below the exact norm -----------------------------------------


def test_linear_chain_bound_at_least_jacobian_norm() -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 4)).eval()
        x = torch.randn(1, 6)
        truth = jacobian_norm(as_double(m), x)
        r = analyze(m, x, lower=False)
        assert r.certified
        assert r.upper >= truth * (1 - 1e-9)
        product = math.prod(float(torch.linalg.matrix_norm(layer.weight.double(), 2)) for layer in m)
        assert r.bounds["autolip"].value == pytest.approx(product, rel=1e-6)


class ResidualCNN(nn.Module):
    """conv-bn-conv with a skip connection, average pooling, a linear head: a purely affine model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 4)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn(self.conv1(x))) + x
        y = self.pool(y)
        return self.fc(y.flatten(1)) + self.fc(torch.flip(y, [-1]).flatten(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_linear_model_bound_at_least_jacobian_norm(seed: int) -> None:
    torch.manual_seed(seed)
    m = ResidualCNN().eval()
    x = torch.randn(1, 2, 6, 6)
    truth = jacobian_norm(as_double(m), x)
    r = analyze(m, x, lower=False)
    for name, b in r.bounds.items():
        if b.certified:
            assert b.value >= truth * (1 - 1e-9), f"UNSOUND {name}: {b.value} < {truth}"
    assert r.upper >= truth * (1 - 1e-9)


# --- nonlinear networks: the bound is at least every Jacobian norm found ------------------------------


def _mlp(act: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 3)).eval()


def _cnn(act: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), act, nn.MaxPool2d(3, 2), nn.Conv2d(4, 4, 3), act,
                         nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1)],
                         ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("make,shape", [(_mlp, (1, 5)), (_cnn, (1, 1, 7, 7))], ids=["mlp", "cnn"])
def test_random_network_bound_at_least_sampled_jacobians(act: nn.Module, make, shape) -> None:
    m = make(act, 0)
    x = torch.randn(*shape)
    r = analyze(m, x, lower=True, lower_budget=1.5)  # the lower value: Jacobian ascent
    assert r.lower is not None and r.lower > 0
    md = as_double(m)
    sampled = max(jacobian_norm(md, s * torch.randn(*shape, dtype=torch.float64))
                  for s in (0.1, 1.0, 3.0) for _ in range(5))
    found = max(sampled, r.lower)
    assert r.upper >= found * (1 - 1e-6)
    for name, b in r.bounds.items():
        if b.certified:
            assert b.value >= found * (1 - 1e-6), f"UNSOUND {name}"


def test_lower_bound_is_attained_for_a_linear_map() -> None:
    m = nn.Linear(6, 4).double()
    lb = lower_bound(m, (torch.randn(1, 6, dtype=torch.float64),), restarts=2)
    assert lb.value == pytest.approx(float(torch.linalg.matrix_norm(m.weight, 2)), rel=1e-6)


# --- AutoLip's composition rules --------------------------------------------------------------------


def test_combine_sum_l2_and_zero_times_inf() -> None:
    lc = LocalConstant([2.0, 3.0], True, "t")
    assert own_rule(lc, [Cumulative(1.0, True), Cumulative(2.0, True)]).value == 8.0
    l2 = LocalConstant([1.0, 1.0], True, "t", combine="l2")
    assert own_rule(l2, [Cumulative(3.0, True), Cumulative(4.0, True)]).value == 5.0
    # a constant input (proven bound 0) contributes nothing, even through an inf partial, and cannot uncertify
    mixed = LocalConstant([math.inf, 1.0], True, "t")
    out = own_rule(mixed, [Cumulative(0.0, True), Cumulative(2.0, True)])
    assert out.value == 2.0 and out.certified
    # a bound of 0 that is only assumed does: the node depends on that input
    assumed = own_rule(mixed, [Cumulative(0.0, False), Cumulative(2.0, True)])
    assert assumed.value == 2.0 and not assumed.certified
    assert not own_rule(LocalConstant([1.0], False, "t"), [Cumulative(1.0, True)]).certified


def test_shared_input_adds_up() -> None:
    """f(x) = x + x has constant 2: the two paths from the same input add (not l2)."""
    r = analyze(Fn(lambda t: t + t), torch.randn(3), lower=False)
    assert r.upper == pytest.approx(2.0)
    r = analyze(Fn(lambda t: torch.cat([t, t])), torch.randn(3), lower=False)
    assert r.upper == pytest.approx(math.sqrt(2.0))


# --- user constants, register_op, unknown ops ---------------------------------------------------------


class Cumprod(nn.Module):
    """An op with no rule (cumsum has one since issue 16; a running product is not Lipschitz)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, dim=-1)


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.block = Cumprod()
        with torch.no_grad():
            self.fc.weight.copy_(2 * torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.fc(x))


def test_unknown_op_gives_inf_naming_the_node() -> None:
    r = analyze(WithBlock(), torch.randn(1, 4), lower=False)
    assert math.isinf(r.upper)
    (item,) = r.not_lipschitz
    node = r.node(item["node"])
    assert node.op == "opaque" and item["node"] in item["reason"] and "cumprod" in item["reason"]
    assert "constants=" in item["reason"]


def test_user_constant_makes_a_leaf() -> None:
    x = torch.randn(1, 4)
    r = analyze(WithBlock(), x, constants={"block": 2.0}, lower=False)
    node = next(n for n in r.nodes if n.module_path == "block")
    assert node.op == "opaque" and node.local == 2.0 and node.method == "user-supplied"
    assert not node.certified and "not verified" in node.reason
    assert r.upper == pytest.approx(4.0) and not r.certified
    r = analyze(WithBlock(), x, constants={"block": UserConstant(2.0, certified=True)}, lower=False)
    assert r.certified and r.upper == pytest.approx(4.0)
    # by class name
    r = analyze(WithBlock(), x, constants={"Cumprod": UserConstant(3.0, certified=True)}, lower=False)
    assert r.upper == pytest.approx(6.0)


class DoubleIt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, -1) * 0 + 2 * x


def triple(x: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(x, -1) * 0 + 3 * x


@pytest.fixture
def restored_registry():
    """The registry as it was before the test: rules registered here must not leak into other test files (the
    every-rule test asks each registered rule for a case)."""
    from lipgraph.ops.registry import RULES

    saved = dict(RULES)
    yield
    RULES.clear()
    RULES.update(saved)


def test_register_op_in_one_call(restored_registry: None) -> None:
    register_op("test_double_it", 2.0, module=DoubleIt, doc="x -> 2x")
    register_op("test_triple", lambda node, ctx: exact(3.0, "by hand"), function=triple)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = DoubleIt()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return triple(self.d(x))

    x = torch.randn(2, 5)
    g = trace(M(), x)
    assert [n.op for n in lipgraph.ir.nodes(g)] == ["input", "test_double_it", "test_triple", "output"]
    torch.testing.assert_close(execute(g, x), 6 * x)
    r = analyze(M(), x, lower=False)
    assert r.upper == pytest.approx(6.0) and r.certified
    assert r.node("d").method == "user-rule"


def test_zero_partial_after_inf_is_zero_not_nan() -> None:
    """A zero-weight layer after a non-Lipschitz part: the model is constant, L = 0 (was nan: 0 * inf)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            nn.init.zeros_(self.fc.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * x)

    r = analyze(M(), torch.randn(1, 3), lower=False)
    assert r.upper == 0.0 and not math.isnan(r.bounds["autolip"].value)
    assert own_rule(LocalConstant([0.0], True, "t"), [Cumulative(math.inf, True)]).value == 0.0


class _SquareThenChain(nn.Module):
    """x * x (no global constant) feeding a ReLU chain that SeqLip and the SDPs would otherwise refine."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 6)
        self.chain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.chain(h * h)


def test_refinements_are_skipped_when_a_node_leaves_the_output_unbounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import lipgraph.api as api

    torch.manual_seed(0)
    model, x = _SquareThenChain().eval(), torch.randn(1, 4)
    rep = analyze(model, x, lower=False)
    assert math.isinf(rep.upper) and not rep.certified
    skipped = {k: b for k, b in rep.bounds.items() if k != "autolip"}
    assert skipped and all(b.method.startswith("skipped: node 'mul'") for b in skipped.values()), skipped
    # the claim behind the skip: running every refinement leaves the output unbounded all the same
    monkeypatch.setattr(api, "unbounded_by", lambda g, local, cum: None)
    full = analyze(model, x, lower=False)
    assert math.isinf(full.upper) and "autolip+seqlip" in full.bounds
    assert not full.bounds["autolip+seqlip"].method.startswith("skipped")
    # the same chain without the product is refined as usual
    plain = nn.Sequential(model.head, model.chain)
    assert not analyze(plain, x, lower=False).bounds["autolip+seqlip"].method.startswith("skipped")


def test_l2_combinations_do_not_overflow_past_1e154() -> None:
    """A concatenation of bounds above ~1.3e154 was sqrt(sum of squares): the squares overflowed and a finite
    bound came out inf (regnet_y_400mf's output on a domain). Now: sqrt(2) times the chain's product."""
    layers = []
    for _ in range(6):
        lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(2) * 1e35)
        layers.append(lin)
    chain = nn.Sequential(*layers).double()  # float32 outputs would overflow

    class Cat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = chain(x)
            return torch.cat([h, h], 1)

    rep = lipgraph.analyze(Cat(), torch.randn(1, 2, dtype=torch.float64), method="autolip", lower=False)
    assert math.isfinite(rep.upper) and rep.certified
    assert rep.upper == pytest.approx(math.sqrt(2) * 1e210, rel=1e-6)
