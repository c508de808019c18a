"""Each op rule against an independent ground truth.

Linear ops: the exact spectral norm of the dense Jacobian (autograd + SVD).
Nonlinear ops: a numerical sup of the Jacobian norm (grids, sampling, and the
inputs where the sup is attained). A rule below the truth is unsound.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Fn, as_double, dense_jacobian, jacobian_norm, node_constants, one_constant

import lipgraph
from lipgraph.ops import slope_interval

REL = 1e-6  # exact rules: equal to the dense SVD up to float64 rounding


def assert_exact(lc, truth: float) -> None:
    assert lc.certified
    assert lc.value >= truth * (1 - 1e-12) - 1e-12, f"UNSOUND: {lc.value} < {truth}"
    assert lc.value == pytest.approx(truth, rel=REL, abs=1e-12)


# --- affine layers -------------------------------------------------------------------------


def test_linear_equals_jacobian_norm() -> None:
    m = nn.Linear(7, 5)
    x = torch.randn(3, 7)
    lc = one_constant(m, x, "linear")
    assert_exact(lc, jacobian_norm(as_double(m), x[:1]))


# A Conv2d traced as the *root* module is traced through its forward: F.pad(mode) + a conv without
# padding, two nodes. Wrapping it in Sequential keeps it one conv node (as in real models), so the
# node's constant can be compared with the whole layer's Jacobian; test_padded_conv_as_root_is_sound
# covers the two-node form at the model level.


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2},
        {"groups": 2, "padding": 1},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular"},
        {"stride": 2, "padding": 1, "padding_mode": "replicate"},
    ],
)
def test_conv_bound_is_sound(kw: dict) -> None:
    m = nn.Sequential(nn.Conv2d(2, 4, 3, **kw))
    x = torch.randn(1, 2, 7, 6)
    truth = jacobian_norm(as_double(m), x)
    lc = one_constant(m, x, "conv")
    if lc.certified:
        assert lc.value >= truth * (1 - 1e-9), f"UNSOUND conv bound {lc.value} < {truth}"
    assert lc.lower is None or lc.lower <= truth * (1 + 1e-5)
    assert lc.value <= 2.5 * truth  # useful: not wildly loose


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padded_conv_as_root_is_sound(mode: str) -> None:
    """Traced as the root, the layer is F.pad + conv: the model's certified bound is >= its exact norm."""
    m = nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode)
    x = torch.randn(1, 2, 7, 6)
    truth = jacobian_norm(as_double(m), x)
    report = lipgraph.analyze(m, x, method="autolip", lower=False)
    assert [n.op for n in report.nodes] == ["input", "pad", "conv", "output"]
    assert report.certified and report.upper >= truth * (1 - 1e-9)


def test_circular_conv_equals_jacobian_norm() -> None:
    """A circular stride-1 convolution is diagonalised by the DFT: the Fourier bound is (nearly) exact."""
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", bias=False))
    x = torch.randn(1, 3, 8, 8)
    truth = jacobian_norm(as_double(m), x)
    lc = one_constant(m, x, "conv")
    assert lc.value >= truth * (1 - 1e-9)
    assert lc.value == pytest.approx(truth, rel=2e-2)


def test_conv1d_and_transpose_sound() -> None:
    for m, x in ((nn.Conv1d(2, 3, 3, stride=2), torch.randn(1, 2, 11)),
                 (nn.ConvTranspose2d(2, 2, 3, stride=2), torch.randn(1, 2, 4, 4))):
        truth = jacobian_norm(as_double(m), x)
        op = "conv" if isinstance(m, nn.Conv1d) else "conv_transpose"
        lc = one_constant(m, x, op)
        if lc.certified:
            assert lc.value >= truth * (1 - 1e-9)
        assert lc.value >= truth * 0.9


def test_batch_norm_equals_jacobian_norm() -> None:
    m = nn.BatchNorm2d(4)
    m.running_mean.normal_()
    m.running_var.uniform_(0.1, 3.0)
    m.weight.data.normal_()
    m.eval()
    x = torch.randn(1, 4, 3, 3)
    assert_exact(one_constant(m, x, "batch_norm"), jacobian_norm(as_double(m), x))


# --- average pooling: linear, against the dense Jacobian --------------------------------------

AVG_CASES = [
    (nn.AvgPool2d(3, stride=2), (9, 8)),
    (nn.AvgPool2d(3, stride=1), (6, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1), (7, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (7, 6)),
    (nn.AvgPool2d(3, stride=2, ceil_mode=True), (8, 8)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (8, 9)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True), (8, 9)),
    (nn.AvgPool2d(2, stride=1, divisor_override=3), (5, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1, divisor_override=2), (7, 8)),
    (nn.AvgPool2d((2, 3), stride=(1, 2)), (5, 9)),
    (nn.AvgPool1d(4, stride=3, padding=2, ceil_mode=True), (10,)),
    (nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False), (9,)),
    (nn.AvgPool3d(2, stride=1, padding=1), (3, 4, 3)),
]


@pytest.mark.parametrize("pool,spatial", AVG_CASES, ids=lambda v: str(v))
def test_avg_pool_equals_jacobian_norm(pool: nn.Module, spatial: tuple[int, ...]) -> None:
    x = torch.randn(1, 2, *spatial)
    assert_exact(one_constant(pool, x, "avg_pool"), jacobian_norm(pool, x))


@pytest.mark.parametrize(
    "pool,spatial",
    [(nn.AdaptiveAvgPool2d((3, 4)), (7, 5)), (nn.AdaptiveAvgPool2d(1), (5, 6)), (nn.AdaptiveAvgPool1d(3), (8,)),
     (nn.AdaptiveAvgPool2d((None, 2)), (3, 7)), (nn.AdaptiveAvgPool3d((2, 1, 3)), (3, 2, 5))],
    ids=lambda v: str(v),
)
def test_adaptive_avg_pool_equals_jacobian_norm(pool: nn.Module, spatial: tuple[int, ...]) -> None:
    x = torch.randn(1, 2, *spatial)
    assert_exact(one_constant(pool, x, "adaptive_avg_pool"), jacobian_norm(pool, x))


def test_functional_avg_pool_matches_module() -> None:
    x = torch.randn(1, 1, 8, 9)
    f = Fn(lambda t: F.avg_pool2d(t, 3, 2, 1, True, False))
    assert_exact(one_constant(f, x, "avg_pool"), jacobian_norm(f, x))


# --- max pooling: piecewise linear, sup attained where one input wins every window ----------------


def _max_pool_sup(pool: nn.Module, spatial: tuple[int, ...]) -> float:
    """max over input positions p of ||J(x_p)||, x_p = small noise with a spike at p (the exact sup)."""
    n = math.prod(spatial)
    best = 0.0
    for p in range(n):
        x = 1e-3 * torch.rand(n, dtype=torch.float64)
        x[p] = 10.0
        best = max(best, jacobian_norm(pool, x.reshape(1, 1, *spatial)))
    # random points never exceed it (soundness from the other side)
    for _ in range(20):
        assert jacobian_norm(pool, torch.randn(1, 1, *spatial, dtype=torch.float64)) <= best + 1e-9
    return best


@pytest.mark.parametrize(
    "pool,spatial,expected",
    [
        (nn.MaxPool2d(3, stride=2), (9, 9), 2.0),
        (nn.MaxPool2d(2), (6, 6), 1.0),
        (nn.MaxPool2d(3, stride=1, padding=1), (5, 5), 3.0),
        (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (8, 8), 2.0),
        (nn.MaxPool2d(3, stride=1, dilation=2), (7, 7), None),
        (nn.MaxPool1d(5, stride=2, padding=2), (11,), None),
        (nn.MaxPool3d(3, stride=2, padding=1), (5, 5, 3), None),
        (nn.AdaptiveMaxPool2d((3, 2)), (7, 5), None),
        (nn.AdaptiveMaxPool1d(4), (6,), None),
    ],
    ids=lambda v: str(v),
)
def test_max_pool_equals_numerical_sup(pool: nn.Module, spatial: tuple[int, ...], expected: float | None) -> None:
    x = torch.randn(1, 1, *spatial)
    op = "adaptive_max_pool" if "Adaptive" in type(pool).__name__ else "max_pool"
    lc = one_constant(pool, x, op)
    sup = _max_pool_sup(pool, spatial)
    assert_exact(lc, sup)
    if expected is not None:
        assert lc.value == pytest.approx(expected)


# --- elementwise activations: against the numerical sup of |s'(t)| ------------------------------

_GRID = torch.linspace(-30, 30, 600_001, dtype=torch.float64)  # step 1e-4


def _derivative_range(fn) -> tuple[float, float]:
    t = _GRID.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(fn(t).sum(), t)
    return float(d.min()), float(d.max())


ACTIVATIONS = [
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"), (Fn(F.relu6), "relu6"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.Tanh(), "tanh"), (nn.SELU(), "selu"), (nn.SiLU(), "silu"), (nn.Mish(), "mish"),
    (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"), (Fn(torch.abs), "abs"),
    (nn.LeakyReLU(0.2), "leaky_relu"), (nn.LeakyReLU(-1.5), "leaky_relu"), (nn.ELU(2.0), "elu"),
    (nn.ELU(0.5), "elu"), (nn.CELU(0.5), "celu"), (nn.Softplus(beta=2.0, threshold=math.inf), "softplus"),
    (nn.Hardtanh(-2.0, 3.0), "hardtanh"), (nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu"),
    (Fn(lambda t: torch.clamp(t, min=-1.0)), "hardtanh"),
]


@pytest.mark.parametrize("act,op", ACTIVATIONS, ids=lambda v: str(v))
def test_activation_matches_derivative_sup(act: nn.Module, op: str) -> None:
    model = nn.Sequential(act)  # the module spelling (a root module would be traced through)
    lc = one_constant(model, torch.randn(2, 3), op)
    lo, hi = _derivative_range(lambda t: act(t.clone()))
    sup = max(abs(lo), abs(hi))
    assert lc.certified
    # 1e-7 relative: PyTorch's float64 backward of some ops uses float32 constants (hardsigmoid: 1/6 in float32)
    assert lc.value >= sup * (1 - 1e-7), f"UNSOUND {op}: {lc.value} < {sup}"
    assert lc.value <= sup + 1e-4  # tight (grid step 1e-4, outward rounding 1e-6)
    from lipgraph import trace  # the slope interval (used by SeqLip) must contain every derivative

    (node,) = [n for n in trace(model, torch.randn(2, 3)).nodes.values() if n["ir"].op == op]
    a, b = slope_interval(node["ir"])
    assert a <= lo + 1e-12 and hi <= b * (1 + 1e-7) + 1e-12


def test_prelu_per_channel() -> None:
    m = nn.PReLU(3)
    m.weight.data = torch.tensor([0.1, -2.5, 0.7])
    x = torch.randn(1, 3, 4)
    lc = one_constant(m, x, "prelu")
    assert lc.value == pytest.approx(2.5)
    z = torch.tensor([[[-1.0] * 4, [-1.0] * 4, [1.0] * 4]])
    assert jacobian_norm(as_double(m), z) == pytest.approx(2.5)


# --- softmax, log_softmax, normalisations -----------------------------------------------------------


def _sampled_sup(f, shape: tuple[int, ...], scales: tuple[float, ...], n: int = 30) -> float:
    best = 0.0
    for s in scales:
        for _ in range(n):
            best = max(best, jacobian_norm(f, s * torch.randn(*shape, dtype=torch.float64)))
    return best


def test_softmax_half() -> None:
    f = nn.Softmax(dim=-1)
    lc = one_constant(f, torch.randn(2, 5), "softmax")
    assert lc.value == 0.5 and lc.certified
    assert jacobian_norm(f, torch.zeros(1, 2, dtype=torch.float64)) == pytest.approx(0.5)  # attained
    assert _sampled_sup(f, (1, 6), (0.1, 1.0, 3.0, 10.0)) <= 0.5 + 1e-12


def test_log_softmax_sound() -> None:
    f = nn.LogSoftmax(dim=1)
    lc = one_constant(f, torch.randn(2, 5), "log_softmax")
    sup = _sampled_sup(f, (1, 5), (0.1, 1.0, 10.0, 100.0))
    assert lc.value >= sup
    assert lc.lower is not None and lc.lower <= lc.value


@pytest.mark.parametrize(
    "norm,shape",
    [
        (nn.LayerNorm(6), (2, 6)),
        (nn.LayerNorm((3, 4), eps=1e-3), (1, 3, 4)),
        (nn.GroupNorm(2, 4), (1, 4, 3)),
        (nn.GroupNorm(1, 3, eps=1e-2), (1, 3, 2, 2)),
    ],
    ids=lambda v: str(v),
)
def test_normalization_bound_above_sup_near_zero(norm: nn.Module, shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        norm.weight.normal_()
    op = "layer_norm" if isinstance(norm, nn.LayerNorm) else "group_norm"
    lc = one_constant(norm, torch.randn(*shape), op)
    f = as_double(norm)
    sup = _sampled_sup(f, shape, (1e-6, 1e-3, 1e-2, 1e-1, 1.0), n=10)
    assert lc.certified and lc.value >= sup
    assert sup >= 0.3 * lc.value  # the 1/sqrt(eps) blow-up near 0 is real: the bound is not vacuous


# --- structural selections: against the dense Jacobian ------------------------------------------------


STRUCTURAL = [
    (Fn(lambda t: F.pad(t, (2, 1, 1, 2), mode="reflect")), (1, 2, 4, 5), "pad"),
    (Fn(lambda t: F.pad(t, (3, 0, 2, 2), mode="replicate")), (1, 1, 4, 3), "pad"),
    (Fn(lambda t: F.pad(t, (2, 2, 1, 0), mode="circular")), (1, 2, 3, 4), "pad"),
    (Fn(lambda t: F.pad(t, (3, 3), mode="reflect")), (1, 2, 4), "pad"),
    (Fn(lambda t: F.pad(t, (1, -1, 2, 0), value=3.0)), (1, 1, 4, 4), "pad"),
    (Fn(lambda t: t.expand(2, 3, 4)), (1, 3, 1), "expand"),
    (Fn(lambda t: t.expand(5, -1)), (1, 4), "expand"),
    (Fn(lambda t: t.repeat(2, 3)), (2, 3), "repeat"),
    (Fn(lambda t: t.repeat(1, 2, 1, 1)), (1, 2, 2, 2), "repeat"),
    (Fn(lambda t: t[:, [0, 0, 2, 0, 1]]), (2, 3), "getitem"),
    (Fn(lambda t: t[[1, 1], :, [0, 0]]), (2, 3, 2), "getitem"),
    (Fn(lambda t: t[:, 1:, ::2]), (2, 3, 5), "getitem"),
    (Fn(lambda t: t[..., None, 0]), (2, 3), "getitem"),
    (Fn(lambda t: t.mean(dim=(1, 2))), (2, 3, 4), "mean"),
    (Fn(lambda t: t.sum(-1, keepdim=True)), (2, 5), "sum"),
    (Fn(lambda t: torch.mean(t)), (3, 4), "mean"),
]


@pytest.mark.parametrize("f,shape,op", STRUCTURAL, ids=lambda v: str(v))
def test_structural_equals_jacobian_norm(f: nn.Module, shape: tuple[int, ...], op: str) -> None:
    x = torch.randn(*shape)
    assert_exact(one_constant(f, x, op), jacobian_norm(f, x))


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.mean(dim=(2, 3), keepdim=True)  # (1, 3, 1, 1), broadcast over 4x5
        return 2 * x - small + 1.0


def test_add_with_broadcasting_partials() -> None:
    x = torch.randn(1, 3, 4, 5)
    (lc,) = [c for c in node_constants(_Broadcast(), x, "add") if len(c.partials) == 2]
    assert lc.partials == pytest.approx([1.0, math.sqrt(20)])  # (2x) - small: 2x is a separate scale node
    # each partial equals the norm of the map from that input alone
    j = dense_jacobian(lambda s: s.expand(1, 3, 4, 5) * -1.0, torch.randn(1, 3, 1, 1))
    assert float(torch.linalg.matrix_norm(j, ord=2)) == pytest.approx(math.sqrt(20))


def test_cat_stack_combine_l2() -> None:
    f = Fn(lambda t: torch.cat([t, 2 * t], dim=1))
    lc = one_constant(f, torch.randn(2, 3), "cat")
    assert lc.combine == "l2" and lc.partials == [1.0, 1.0]
    from lipgraph import analyze

    x = torch.randn(2, 3)
    assert analyze(f, x, lower=False).upper == pytest.approx(jacobian_norm(f, x[:1]), rel=1e-6)
    g = Fn(lambda t: torch.stack([t, -t, t], dim=0))
    assert analyze(g, x, lower=False).upper == pytest.approx(jacobian_norm(g, x), rel=1e-6)
