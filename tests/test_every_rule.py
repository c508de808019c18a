"""Every registered rule against a numerical sup of the Jacobian norm, over wide inputs and parameter ranges.

``CASES`` holds, for every op in the one registry (``lipgraph.ops.RULES``), small models that trace to it, with
the parameter values its rule must prove or refuse (negative and large slopes, alphas, betas, small eps, ...).
For each case the certified AutoLip bound of the float64 model (no domain) must dominate its Jacobian
norm at seeded points at scales 1e-3 to 30 (so near-zero variances, saturated and linear regimes are all
seen); a bound of ``inf`` must not be called certified. ``test_every_registered_rule_has_a_case`` fails when a
rule is registered without a case here: a new rule cannot go unchecked.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Fn

import lipgraph
from lipgraph.ops import RULES

#: Registered ops with no function of their own to check: the graph's input, its output and constants.
EXEMPT = {"input", "output", "constant"}
#: Ops on integer inputs, checked by their own test below (no Jacobian in the ids themselves).
SPECIAL = {"embedding": "test_embedding_is_certified_in_the_one_hot_metric"}

_W = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.5, 0.2, -0.7, 1.0], [-0.4, 0.9, 0.1, -2.0]])


def _with_weights(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in m.parameters():
        with torch.no_grad():
            p.uniform_(-1.5, 1.5)
    return m


def _bn() -> nn.Module:
    m = nn.Sequential(nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        m[0].running_mean.copy_(torch.tensor([0.3, -1.0]))
        m[0].running_var.copy_(torch.tensor([0.04, 2.0]))
        m[0].weight.copy_(torch.tensor([1.5, -0.5]))
    return m


def _prelu() -> nn.Module:
    m = nn.PReLU(3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([-1.5, 0.2, 2.5]))
    return m


def _split(x):
    a, b = torch.split(x, 2, dim=-1)
    return a - 3 * b


def _unbind(x):
    a, b = torch.unbind(x, 0)
    return a + 2 * b


_MASK = torch.tensor([[True, False, True, False]])

#: op -> list of (case id, model, input shape)
CASES: dict[str, list[tuple[str, nn.Module, tuple[int, ...]]]] = {
    "abs": [("abs", Fn(torch.abs), (1, 4))],
    "adaptive_avg_pool": [("2x2", nn.AdaptiveAvgPool2d((2, 2)), (1, 2, 5, 5))],
    "adaptive_max_pool": [("2x2", nn.AdaptiveMaxPool2d((2, 2)), (1, 2, 5, 5))],
    "add": [("x+tanh", Fn(lambda x: x + torch.tanh(x)), (1, 4))],
    "amax": [("amax", Fn(lambda x: torch.amax(x, dim=-1)), (2, 4))],
    "attention": [("masked-mha", None, (1, 3, 4))],  # built below: a masked MultiheadAttention stays one node
    "avg_pool": [("2", nn.AvgPool2d(2), (1, 2, 4, 4)), ("3s1pad", nn.AvgPool2d(3, 1, 1), (1, 1, 4, 4))],
    "batch_norm": [("stats", _bn(), (1, 2, 3, 3))],
    "cat": [("x,2x", Fn(lambda x: torch.cat([x, 2 * x], dim=1)), (1, 4))],
    "celu": [(f"a{a}", nn.CELU(a), (1, 4)) for a in (0.5, 2.0)],
    "channel_shuffle": [("g2", nn.ChannelShuffle(2), (1, 4, 2, 2))],
    "conv": [("3x3", nn.Sequential(_with_weights(nn.Conv2d(2, 3, 3, padding=1))), (1, 2, 4, 4))],
    "conv_transpose": [("3x3s2", nn.Sequential(_with_weights(nn.ConvTranspose2d(2, 3, 3, stride=2))),
                        (1, 2, 3, 3))],
    "cos": [("cos", Fn(torch.cos), (1, 4))],
    "cumsum": [("cumsum", Fn(lambda x: torch.cumsum(x, -1)), (1, 4))],
    "discontinuous": [("round", Fn(torch.round), (1, 4)), ("sign", Fn(torch.sign), (1, 4))],
    "div_var": [("x/(2+sig)", Fn(lambda x: x / (2 + torch.sigmoid(x))), (1, 4))],
    "elementwise_max": [("max(x,tanh)", Fn(lambda x: torch.maximum(x, torch.tanh(3 * x))), (1, 4))],
    "elu": [(f"a{a}", nn.ELU(a), (1, 4)) for a in (0.5, 2.0)],
    "expand": [("expand", Fn(lambda x: x.expand(3, -1)), (1, 4))],
    "flip": [("flip", Fn(lambda x: torch.flip(x, [-1])), (1, 4))],
    "gelu": [(a, nn.GELU(approximate=a), (1, 4)) for a in ("none", "tanh")],
    "getitem": [("slice", Fn(lambda x: x[:, 1:3]), (1, 4))],
    "group_norm": [("2of4", nn.GroupNorm(2, 4), (1, 4, 3))],
    "hardsigmoid": [("hardsigmoid", nn.Hardsigmoid(), (1, 4))],
    "hardswish": [("hardswish", nn.Hardswish(), (1, 4))],
    "hardtanh": [("-2,3", nn.Hardtanh(-2.0, 3.0), (1, 4))],
    "identity": [("dropout", nn.Dropout(0.5), (1, 4))],
    "instance_norm": [("in1d", nn.InstanceNorm1d(2), (1, 2, 5))],
    "layer_norm": [("ln", _with_weights(nn.LayerNorm(5)), (1, 5))],
    "leaky_relu": [(f"s{s}", nn.LeakyReLU(s), (1, 4)) for s in (0.01, -2.0, 3.0)],
    "linear": [("4to3", _with_weights(nn.Linear(4, 3)), (1, 4))],
    "log_softmax": [("dim-1", nn.LogSoftmax(-1), (1, 4))],
    "logsumexp": [("dim-1", Fn(lambda x: torch.logsumexp(x, -1)), (2, 4))],
    # PyTorch's LPPool is NaN where a window's sum of x^p is negative: a nonnegative input
    "lp_pool": [(f"p{p}", Fn(lambda x, p=p: F.lp_pool1d(torch.abs(x) + 0.01, p, 2)), (1, 2, 6)) for p in (1, 2, 3)],
    "matmul_const": [("xW", Fn(lambda x: x @ _W.T.to(x.dtype)), (1, 4))],
    "matmul_var": [("xxT", Fn(lambda x: x @ x.transpose(0, 1)), (3, 4))],
    "max_pool": [("2", nn.MaxPool2d(2), (1, 1, 4, 4)), ("3s1 overlapping", nn.MaxPool2d(3, 1), (1, 1, 5, 5))],
    "mean": [("mean", Fn(lambda x: x.mean(-1)), (2, 4))],
    "mish": [("mish", nn.Mish(), (1, 4))],
    "mul_var": [("x*tanh", Fn(lambda x: x * torch.tanh(x)), (1, 4))],
    "opaque": [("exp", Fn(torch.exp), (1, 4))],
    "order_pair": [("max dim", Fn(lambda x: torch.max(x, dim=-1).values), (2, 4)),
                   ("topk", Fn(lambda x: torch.topk(x, 2).values), (1, 4)),
                   ("sort", Fn(lambda x: torch.sort(x, dim=-1).values), (1, 4))],
    "pad": [("zeros", Fn(lambda x: F.pad(x, (1, 2))), (1, 4))],
    "permute": [("021", Fn(lambda x: x.permute(0, 2, 1)), (1, 2, 3))],
    "pixel_shuffle": [("2", nn.PixelShuffle(2), (1, 4, 2, 2))],
    "prelu": [("mixed", _prelu(), (1, 3, 4))],
    "relu": [("relu", nn.ReLU(), (1, 4))],
    "relu6": [("relu6", nn.Sequential(nn.ReLU6()), (1, 4))],  # as the root module, ReLU6 traces to hardtanh
    "repeat": [("2x", Fn(lambda x: x.repeat(2, 1)), (1, 4))],
    "reshape": [("2x-1", Fn(lambda x: x.reshape(2, -1)), (1, 4))],
    "resize": [(m, Fn(lambda x, m=m: F.interpolate(x, scale_factor=2, mode=m)), (1, 1, 3, 3))
               for m in ("nearest", "bilinear")],
    "rms_norm": [("rms", _with_weights(nn.RMSNorm(5, eps=1e-5)), (1, 5))],
    "roll": [("1", Fn(lambda x: torch.roll(x, 1, -1)), (1, 4))],
    "scale": [("-2.5x", Fn(lambda x: -2.5 * x), (1, 4)), ("x/0.3", Fn(lambda x: x / 0.3), (1, 4))],
    "selu": [("selu", nn.SELU(), (1, 4))],
    "sigmoid": [("sigmoid", nn.Sigmoid(), (1, 4))],
    "silu": [("silu", nn.SiLU(), (1, 4))],
    "sin": [("sin", Fn(torch.sin), (1, 4))],
    "softmax": [("dim-1", nn.Softmax(-1), (1, 4)), ("dim0", nn.Softmax(0), (3, 2))],
    "softplus": [(f"b{b}", nn.Softplus(b, threshold=float("inf")), (1, 4)) for b in (0.5, 3.0)]
                + [("default threshold", nn.Softplus(), (1, 4))],
    "split": [("2", Fn(_split), (1, 4))],
    "stack": [("x,2x", Fn(lambda x: torch.stack([x, 2 * x])), (1, 4))],
    "sum": [("sum", Fn(lambda x: x.sum(-1)), (2, 4))],
    "tanh": [("tanh", nn.Tanh(), (1, 4))],
    "topk": [("msort", Fn(torch.msort), (3, 2))],  # torch.topk itself is an order_pair (values, indices)
    "tuple_getitem": [("split", Fn(_split), (1, 4))],
    "unbind": [("0", Fn(_unbind), (2, 4))],
    "unfold": [("F.unfold", Fn(lambda x: F.unfold(x, 2)), (1, 1, 3, 3))],
    "where_const": [("mask", Fn(lambda x: torch.where(_MASK, x, -3 * x)), (1, 4))],
}


class _MaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mask = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])

    def forward(self, x):
        return self.mha(x, x, x, attn_mask=self.mask, need_weights=False)[0]


CASES["attention"] = [("masked-mha", _MaskedAttention().eval(), (1, 3, 4))]

_PARAMS = [(op, cid, m, shape) for op, cases in sorted(CASES.items()) for cid, m, shape in cases]


#: Ops whose float64 backward in PyTorch is not the derivative of its float64 forward: hardsigmoid's multiplies
#: by float32(1/6) = 0.16666667163 (its forward is exact). Their Jacobians are taken by central differences.
_BACKWARD_ARTIFACTS = {"hardsigmoid"}


def _fd_jacobian(f, p: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    cols = [(f(p + h * e) - f(p - h * e)) / (2 * h) for e in torch.eye(p.numel(), dtype=p.dtype)]
    return torch.stack(cols, dim=-1)


def _sampled_sup(model: nn.Module, shape: tuple[int, ...], seed: int = 0, differences: bool = False) -> float:
    """The largest float64 Jacobian norm at seeded points of scales 1e-3 .. 30 and at 0 (autograd, or central
    differences)."""
    m = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    pts = [torch.zeros(shape, dtype=torch.float64)]
    for s in (1e-3, 0.1, 1.0, 3.0, 30.0):
        pts += [s * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(6)]

    def f(t: torch.Tensor) -> torch.Tensor:
        return m(t.reshape(shape)).reshape(-1)

    for p in pts:
        with torch.no_grad() if differences else torch.enable_grad():
            j = _fd_jacobian(f, p.reshape(-1)) if differences else torch.autograd.functional.jacobian(f, p.reshape(-1))
        best = max(best, float(torch.linalg.matrix_norm(j.reshape(-1, p.numel()), 2)))
    return best


def test_every_registered_rule_has_a_case() -> None:
    """Each op of the registry is traced from at least one case here (a rule registered later without a case
    fails this test), and every case's graph holds the op it is listed under."""
    covered: set[str] = set()
    for op, cid, model, shape in _PARAMS:
        g = lipgraph.trace(model, torch.randn(shape))
        ops = {n.op for n in lipgraph.ir.nodes(g)}
        assert op in ops, (op, cid, sorted(ops))
        covered |= ops
    missing = set(RULES) - EXEMPT - set(SPECIAL) - covered
    assert not missing, f"registered rules without a case in CASES: {sorted(missing)}"


@pytest.mark.parametrize("op,cid,model,shape", _PARAMS, ids=[f"{p[0]}-{p[1]}" for p in _PARAMS])
def test_rule_dominates_the_sampled_jacobian(op, cid, model, shape) -> None:
    """The float64 model is analysed, the function the sampled Jacobians are taken of (a float32 model computes
    ``x / 0.3`` with float32(0.3): another function, 4e-8 apart)."""
    m64 = copy.deepcopy(model).double().eval()
    r = lipgraph.analyze(m64, torch.randn(shape, dtype=torch.float64), method="autolip", lower=False)
    truth = _sampled_sup(model, shape, differences=op in _BACKWARD_ARTIFACTS)
    if math.isinf(r.upper):
        assert not r.certified
        return
    assert r.certified, (op, cid)
    slack = 1e-8 if op in _BACKWARD_ARTIFACTS else 1e-9  # central differences err by about 1e-10 here
    assert r.upper >= truth * (1 - slack) - 1e-12, f"UNSOUND {op} ({cid}): {r.upper} < sampled {truth}"


def test_embedding_is_certified_in_the_one_hot_metric() -> None:
    """``nn.Embedding`` (an opaque ``inf`` before) is the linear map of the ids' one-hot encoding: its rule is
    ``||W||_2`` (float64 SVD), the model's certified bound dominates the Jacobian of the same model written on
    one-hot inputs, and a table renormalised in place by every call (``max_norm``) is refused as a forward that
    changes the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    ids = torch.tensor([[1, 2, 7]])
    g = lipgraph.trace(model, ids)
    (node,) = [n for n in lipgraph.ir.nodes(g) if n.op == "embedding"]
    lc = RULES["embedding"].lipschitz(node, lipgraph.core.Settings())
    w = model[0].weight.detach().double()
    assert lc.certified and lc.value == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-8)
    assert lc.value >= float(torch.linalg.matrix_norm(w, 2))
    r = lipgraph.analyze(model, ids, method="autolip", lower=False)
    m64 = copy.deepcopy(model).double()

    def on_one_hot(z):  # (3, 10) one-hot rows -> the model's output
        return m64[1](z @ m64[0].weight).reshape(-1)

    onehot = F.one_hot(ids[0], 10).double()
    j = torch.autograd.functional.jacobian(on_one_hot, onehot).reshape(-1, onehot.numel())
    assert r.certified and r.upper >= float(torch.linalg.matrix_norm(j, 2)) * (1 - 1e-12)
    clipped = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2)).eval()
    with pytest.raises(lipgraph.LipgraphError, match="written in place"):  # the forward rewrites the table
        lipgraph.analyze(clipped, ids, method="autolip", lower=False)
