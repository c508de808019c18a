"""The PyTorch frontend: one vocabulary for every spelling, errors with the user's line, torch.export fallback."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Fn

import lipgraph
from lipgraph import TraceError, analyze, execute, ir, trace


def kinds(model: nn.Module, *xs: torch.Tensor) -> list[str]:
    """The IR op kinds in order, after checking that the IR reproduces the model."""
    g = trace(model, xs if len(xs) > 1 else xs[0])
    with torch.no_grad():
        expected = model(*[x.clone() for x in xs])
        got = execute(g, *[x.clone() for x in xs])
    torch.testing.assert_close(got, expected)
    return [n.op for n in ir.nodes(g)]


def same_kinds(models: list[nn.Module], *xs: torch.Tensor) -> list[str]:
    first = kinds(models[0], *xs)
    for m in models[1:]:
        assert kinds(m, *xs) == first, type(m).__name__
    return first


# --- normalisation: every spelling, one op kind ---------------------------------------------


class ReluModule(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class ReluFn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.lin(x))


def test_relu_spellings() -> None:
    torch.manual_seed(1)
    models = [ReluModule(), ReluModule(inplace=True), ReluFn(F.relu), ReluFn(torch.relu), ReluFn(lambda t: t.relu()),
              ReluFn(lambda t: F.relu(t, inplace=True)), ReluFn(lambda t: t.relu_()), ReluFn(torch.relu_)]
    for m in models[1:]:
        m.lin.load_state_dict(models[0].lin.state_dict())
    assert same_kinds(models, torch.randn(3, 4)) == ["input", "linear", "relu", "output"]


class AddSpelling(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        torch.manual_seed(2)
        for p in self.parameters():
            nn.init.normal_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x), self.b(x)
        if self.how == "+":
            return u + v
        if self.how == "+=":
            u += v
            return u
        if self.how == "torch.add":
            return torch.add(u, v)
        return u.add(v)


def test_add_spellings() -> None:
    ops = same_kinds([AddSpelling(h) for h in ("+", "+=", "torch.add", "method")], torch.randn(2, 4))
    assert ops.count("add") == 1


@pytest.mark.parametrize("group,expected", [
    ([lambda t: t.view(2, -1), lambda t: t.reshape(2, 12), lambda t: t.flatten(1), lambda t: torch.flatten(t, 1),
      lambda t: torch.reshape(t, (2, -1)), nn.Flatten()], "reshape"),
    ([lambda t: torch.cat([t, t * 2], 1), lambda t: torch.concat([t, t * 2], dim=1),
      lambda t: torch.concatenate((t, t * 2), 1)], "cat"),
    ([lambda t: torch.stack([t, t * 2], 1), lambda t: torch.stack((t, t * 2), dim=-3)], "stack"),
], ids=["reshape", "cat", "stack"])
def test_shape_spellings(group, expected: str) -> None:
    ops = same_kinds([Fn(f) if not isinstance(f, nn.Module) else nn.Sequential(f) for f in group],
                     torch.randn(2, 3, 4))
    assert expected in ops


def test_split_spellings() -> None:
    def first_two(parts):
        return parts[0] - parts[1]

    group = [lambda t: first_two(t.chunk(2, dim=1)), lambda t: first_two(torch.chunk(t, 2, 1)),
             lambda t: first_two(t.split(3, dim=1)), lambda t: first_two(torch.split(t, [3, 3], dim=1))]
    ops = same_kinds([Fn(f) for f in group], torch.randn(2, 6))
    assert ops == ["input", "split", "tuple_getitem", "tuple_getitem", "add", "output"]
    # unpacking spelling and plain indexing
    assert kinds(Fn(lambda t: (lambda a, b: a - b)(*t.chunk(2, 1))), torch.randn(2, 6)) == ops
    assert same_kinds([Fn(lambda t: t[:, 1:3]), Fn(lambda t: t.narrow(1, 1, 2))], torch.randn(2, 6)) == [
        "input", "getitem", "output"]


def test_ir_reproduces_output_and_bound_with_every_spelling() -> None:
    x = torch.randn(2, 4)
    bounds = {h: analyze(AddSpelling(h), x, lower=False).upper for h in ("+", "+=", "torch.add", "method")}
    assert len(set(bounds.values())) == 1


# --- regressions: values the frontend must not freeze -----------------------------------------------


def test_attention_module_output_is_not_a_constant() -> None:
    """nn.MultiheadAttention returns (out, None): it must not be folded to a constant. Written out in primitive
    ops, its score and value products are inf globally."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.attn(x, x, x, need_weights=False)
            return y

    r = analyze(Block(), torch.randn(1, 5, 8), lower=False)
    assert math.isinf(r.upper)
    assert any("matrix product" in item["reason"] for item in r.not_lipschitz)


def test_inplace_op_on_a_reused_tensor() -> None:
    """relu(x, inplace=True) overwrites x: later reads of x see relu(x)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 1.0
            y = self.act(x)
            return x + y  # = 2 relu(x)

    x = torch.randn(10)
    g = trace(M(), x)
    torch.testing.assert_close(execute(g, x), 2 * torch.relu(x))


def test_item_is_refused_with_the_line() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.sum().item()

    line = inspect.getsourcelines(M.forward)[1] + 1
    with pytest.raises(TraceError, match=rf"test_trace.py:{line}.*x.sum\(\)"):
        trace(M(), torch.randn(3))


# --- untraceable models and the torch.export fallback ------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return x


class ShapeDependent(nn.Module):
    """Python control flow on shapes: torch.fx fails, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.running_mean.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = F.max_pool2d(x, 2)
        return self.body(x)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = F.pad(y, (1, 1, 1, 1), mode="reflect")
        y = F.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)
        a, b = y.chunk(2, dim=1)
        y = torch.cat([F.gelu(a), torch.sigmoid(b[:, :, 1:, :].mean(2, keepdim=True)).expand_as(a)], 1)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        y = self.ln(y.view(-1, 1, 4).transpose(1, 2).reshape(-1, 4)).reshape(y.shape[0], -1)
        return self.fc(torch.cat([y, y[:, :2] - 0.5 * y[:, 2:]], 1)).softmax(-1)


class ShapeDependentFx(ShapeDependent):
    """The same function without the Python branch (traceable by torch.fx)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.max_pool2d(x, 2))


def test_data_dependent_control_flow_names_the_line() -> None:
    line = inspect.getsourcelines(DataDependent.forward)[1] + 1
    with pytest.raises(TraceError) as info:
        trace(DataDependent(), torch.randn(2, 4))
    msg = str(info.value)
    assert f"test_trace.py:{line}" in msg and "if x.sum() > 0" in msg
    assert "torch.where" in msg and "constants=" in msg  # the suggested fixes
    assert "\n" not in msg  # one line for the CLI


def test_shape_dependent_control_flow_uses_torch_export() -> None:
    torch.manual_seed(3)
    m = ShapeDependent().eval()
    ref = ShapeDependentFx().eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 12, 12)
    g = trace(m, x)
    assert g.graph["frontend"] == "torch.export"
    torch.testing.assert_close(execute(g, x), m(x))
    # every aten op maps onto the same vocabulary as the fx spelling: no opaque node, same bound
    g_fx = trace(ref, x)
    assert g_fx.graph["frontend"] == "torch.fx"
    assert "opaque" not in ir.summary(g)
    kinds_export = {k: v for k, v in ir.summary(g).items() if k not in ("identity", "constant")}
    kinds_fx = {k: v for k, v in ir.summary(g_fx).items() if k not in ("identity", "constant")}
    assert kinds_export == kinds_fx
    r, r_fx = analyze(m, x, lower=False), analyze(ref, x, lower=False)
    assert math.isfinite(r.upper)
    assert r.bounds["autolip"].value == pytest.approx(r_fx.bounds["autolip"].value, rel=1e-9)
    # module paths survive torch.export
    assert {"conv", "bn", "fc", "ln"} <= {n.module_path for n in r.nodes}


def test_export_of_data_dependent_model_keeps_constants_leaf_error() -> None:
    """A user constant on the module holding the branch makes it a leaf: fx then succeeds."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.inner(x))

    r = analyze(Outer(), torch.randn(2, 4), constants={"inner": 3.0}, lower=False)
    assert r.graph.graph["frontend"] == "torch.fx"
    node = next(n for n in r.nodes if n.module_path == "inner")
    assert node.local == 3.0 and not node.certified


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(lipgraph.InputShapeError, match="2 example input"):
        trace(nn.Linear(3, 3), (torch.randn(1, 3), torch.randn(1, 3)))
    with pytest.raises(lipgraph.InputShapeError, match="failed at"):
        trace(nn.Sequential(nn.Linear(3, 3)), torch.randn(1, 4))


class _SelfProducts(nn.Module):
    """SiLU and hard-swish spelled as products of a tensor and a function of itself (hand-written MobileNetV3 and
    EfficientNet code), next to a gate of two different tensors and a sigmoid read twice."""

    def __init__(self, gate: bool = False, shared: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.gate, self.shared = gate, shared

    def forward(self, x):
        h = self.a(x)
        h = h * torch.sigmoid(h)
        h = h * F.relu6(h + 3) / 6
        h = self.b(h)
        h = h * F.hardsigmoid(h)
        h = h * F.hardtanh(h + 3, 0.0, 6.0) / 6
        if self.gate:
            h = h * torch.sigmoid(self.b(h))  # two different tensors: a product
        if self.shared:
            s = torch.sigmoid(h)
            h = h * s + s  # the sigmoid is read twice: not folded
        return self.c(h)


def test_products_of_a_tensor_and_a_function_of_it_become_elementwise_rules() -> None:
    """x * sigmoid(x) -> silu, x * relu6(x + 3) / 6, x * hardtanh(x + 3, 0, 6) / 6 and x * hardsigmoid(x) ->
    hardswish: no product left, the IR equals the model on other inputs, and the bound is that of the same model
    written with nn.SiLU / nn.Hardswish (finite, where the products gave inf). A gate of two tensors and a
    sigmoid that something else reads stay as they were."""
    torch.manual_seed(0)
    model = _SelfProducts().eval()
    x = torch.randn(5, 4) * 3
    g = trace(model, x)
    kinds = ir.summary(g)
    assert kinds.get("silu") == 1 and kinds.get("hardswish") == 3 and "mul_var" not in kinds
    for k in range(3):
        z = torch.randn(5, 4, generator=torch.Generator().manual_seed(k)) * 4
        torch.testing.assert_close(execute(g, z), model(z), rtol=1e-6, atol=1e-6)
    ref = nn.Sequential(model.a, nn.SiLU(), nn.Hardswish(), model.b, nn.Hardswish(), nn.Hardswish(), model.c)
    for z in (x, torch.randn(5, 4) * 4):
        torch.testing.assert_close(ref(z), model(z), rtol=1e-6, atol=1e-6)
    got = analyze(model, x, lower=False, method="autolip").upper
    want = analyze(ref, x, lower=False, method="autolip").upper
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-9)
    gated = trace(_SelfProducts(gate=True).eval(), x)
    assert ir.summary(gated).get("mul_var") == 1
    shared = _SelfProducts(shared=True).eval()
    gs = trace(shared, x)
    assert ir.summary(gs).get("mul_var") == 1 and ir.summary(gs).get("sigmoid") == 1
    torch.testing.assert_close(execute(gs, x), shared(x), rtol=1e-6, atol=1e-6)


def test_prelu_with_an_input_dependent_weight_is_not_a_product() -> None:
    """``F.prelu(x, w(x))`` is ``x`` where ``x >= 0`` and ``w x`` below: it was traced as ``x * w`` (the example
    input was negative, so the check agreed), and then fused into silu, certifying 0.55 on [0, 0.1] where the
    slope is 1. No rule: an opaque node and an honest inf."""
    from lipgraph.domains import Box  # noqa: PLC0415

    model = Fn(lambda x: F.prelu(x, torch.sigmoid(x)))
    x = torch.tensor([-1.0])
    g = trace(model, x)
    assert "mul_var" not in ir.summary(g) and "silu" not in ir.summary(g) and ir.summary(g).get("opaque") == 1
    r = analyze(model, x, domain=Box(torch.tensor([0.0]), torch.tensor([0.1])), lower=False)
    assert math.isinf(r.upper)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_self_products_in_half_precision_still_trace(dtype) -> None:
    """The fused op rounds once where a float16 model rounds twice, which its check can see: the fusion then
    stands back (the trace keeps the product), and ``analyze`` (a float64 copy) fuses and bounds it."""
    torch.manual_seed(0)
    model = _SelfProducts().to(dtype).eval()
    x = torch.randn(5, 4).to(dtype) * 3
    g = trace(model, x)
    torch.testing.assert_close(execute(g, x), model(x))
    assert math.isfinite(analyze(model, x, lower=False, method="autolip").upper)


class _WithDefaults(nn.Module):
    """A forward with non-tensor defaults after the input, as transformer blocks write ``mask=None``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 2.0) -> torch.Tensor:
        y = self.fc(x)
        if mask is not None:
            y = y * mask
        return y * scale


def test_forward_defaults_are_taken_as_the_call_takes_them() -> None:
    """``forward(x, mask=None, scale=2.0)`` called with x alone: the trace fixes mask and scale at their defaults
    (it said "takes 3 tensor arguments"); given a mask too, the mask is an input (a product of two inputs: inf)."""
    m = _WithDefaults()
    x = torch.randn(2, 4)
    g = lipgraph.trace(m, x)
    assert len(g.graph["inputs"]) == 1
    torch.testing.assert_close(lipgraph.execute(g, x), m(x))
    r = lipgraph.analyze(m, x, lower=False)
    w = float(torch.linalg.matrix_norm(m.fc.weight.detach().double(), 2))
    assert r.certified and 2 * w <= r.upper <= 2 * w * (1 + 1e-5)
    both = lipgraph.analyze(m, (x, torch.ones(2, 4)), lower=False)
    assert both.upper == float("inf")
