"""Basis responses from weights (``norms.conv_matrix``, ``bounds.basis``): the matrices SeqLip and affine folding
materialise must be the ones the float64 basis evaluation gives, entry for entry."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipgraph
from lipgraph import ir, norms
from lipgraph.api import local_constants
from lipgraph.bounds import affine, chains
from lipgraph.ops import Settings


def _traced(model: nn.Module, side: int) -> tuple[Any, Settings, dict]:
    """The model's IR on a ``1 x 3 x side x side`` input, default settings and its nodes' local constants."""
    g = lipgraph.trace(model, torch.randn(1, 3, side, side))
    ctx = Settings()
    return g, ctx, {k: v[0] for k, v in local_constants(g, ctx, None, None).items()}


def _uses(monkeypatch: pytest.MonkeyPatch, name: str, hit: Callable[[Any, tuple], bool]) -> list[bool]:
    """Spy on ``affine.<name>``: one entry per call, whether ``hit(result, args)`` (the route took effect)."""
    real = getattr(affine, name)
    seen: list[bool] = []

    def spy(*args: Any) -> Any:
        out = real(*args)
        seen.append(hit(out, args))
        return out

    monkeypatch.setattr(affine, name, spy)
    return seen

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_matrix_is_the_basis_response(nd: int) -> None:
    """Every stride, dilation, padding spelling and group count: the matrix equals the float64 conv of each
    basis vector exactly (each entry is one weight or zero)."""
    gen = torch.Generator().manual_seed(nd)
    cases = 0
    for (ci, co, g), k, s, d, pad, n in itertools.product([(4, 6, 1), (4, 6, 2), (6, 6, 6)], [1, 3], [1, 2], [1, 2],
                                                          [0, 1, "same", "valid"], [5, 6]):
        if pad == "same" and s != 1:
            continue
        w = torch.randn(co, ci // g, *([k] * nd), generator=gen)
        attrs = {"ndim": nd, "stride": (s,) * nd, "padding": pad if isinstance(pad, str) else (pad,) * nd,
                 "dilation": (d,) * nd, "groups": g, "padding_mode": "zeros"}
        shape = (1, ci, *([n] * nd))
        m = norms.conv_matrix(w, attrs, shape, torch.device("cpu"))
        n_in = math.prod(shape)
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape[1:])
        ref = CONV[nd](basis, w.double(), None, attrs["stride"], attrs["padding"], attrs["dilation"], g)
        assert torch.equal(m, ref.reshape(n_in, -1).T), (ci, co, g, k, s, d, pad, n)
        cases += 1
    assert cases == 168


def test_conv_matrix_refuses_other_paddings_and_large_maps() -> None:
    w = torch.randn(4, 4, 3, 3)
    attrs = {"ndim": 2, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
             "padding_mode": "circular"}
    assert norms.conv_matrix(w, attrs, (1, 4, 6, 6), torch.device("cpu")) is None
    attrs["padding_mode"] = "zeros"
    assert norms.conv_matrix(w, attrs, (1, 4, 6, 6), torch.device("cpu"), max_entries=100) is None


class _Net(nn.Module):
    """conv -> BN -> ReLU -> grouped conv -> residual add -> ReLU -> linear chain (every materialised kind)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h) + self.c3(h))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def test_group_matrices_and_region_jacobians_match_the_basis_evaluation(monkeypatch) -> None:
    """SeqLip's group matrices and affine folding's partial norms are the same with and without the weight
    route (the weight route is exact, the basis route rounds at 1e-16)."""
    model = _Net().eval()
    g = lipgraph.trace(model, torch.randn(1, 3, 8, 8))
    groups = [grp for seg in chains.find_segments(g) for grp in seg.groups]
    assert groups
    direct = [chains.group_matrix(g, grp) for grp in groups]
    ctx = Settings()
    local = {k: v[0] for k, v in local_constants(g, ctx, None, None).items()}
    seen: list[tuple[str, str, float | None]] = []
    real = affine._materialize

    def spy(g_, members, entry, exit_, ctx_):
        v = real(g_, members, entry, exit_, ctx_)
        seen.append((entry, exit_, v))
        return v

    monkeypatch.setattr(affine, "_materialize", spy)
    used: list[bool] = []
    real_first = affine._from_first_layers
    monkeypatch.setattr(affine, "_from_first_layers", lambda *a: used.append(real_first(*a) is not None) or
                        real_first(*a))
    affine.fold(g, local, ctx)
    assert sum(used) >= 2, used  # the weight route ran (conv- and linear-led regions)
    assert sum(chains.linear_part_columns(ir.node(g, grp[0]), tuple(ir.node(g, grp[0]).in_shapes[0])) is not None
               for grp in groups) >= 2  # the conv-led and the linear-led groups
    fast = list(seen)
    seen.clear()
    monkeypatch.setattr(chains, "linear_part_columns", lambda *a, **k: None)
    monkeypatch.setattr(affine, "linear_part_columns", lambda *a, **k: None)
    slow = [chains.group_matrix(g, grp) for grp in groups]
    affine.fold(g, local, ctx)
    for a, b in zip(direct, slow, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-14 * float(b.abs().max()))
    assert len(fast) == len(seen) > 0
    for (e1, v1, a), (e2, v2, b) in zip(fast, seen, strict=True):
        assert (e1, v1) == (e2, v2)
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-13)


class _Inception(nn.Module):
    """Two branches concatenated and read by a 1x1 conv (pixelwise) and by a 3x3 conv (cut to each branch's
    channels), each followed by BatchNorm: the regions of an inception module's input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.p = nn.Conv2d(9, 6, 1)
        self.q = nn.Conv2d(9, 6, 3, padding=1)
        self.bp, self.bq = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        with torch.no_grad():
            for bn in (self.bp, self.bq):
                bn.running_var.uniform_(0.3, 3.0)
                bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return torch.relu(self.bp(self.p(h)) * 0.5) + torch.relu(self.bq(self.q(h)))


@pytest.mark.parametrize("side", [1, 5])
def test_region_partials_through_a_concatenation_equal_the_exact_jacobian_norm(side: int) -> None:
    """Each branch's partial map into the next convs, ground truth: the float64 autograd Jacobian of the module's
    own layers with the other branch at zero, its exact spectral norm."""
    model = _Inception().eval()
    g, ctx, local = _traced(model, side)
    res = affine.fold(g, local, ctx)
    m64 = _Inception().eval().double()
    relu_nodes = [n for n in ir.nodes(g) if n.op == "relu" and "cat" in [s for s in g.successors(n.name)]]
    assert len(relu_nodes) == 2
    hows = set()
    for i, rn in enumerate(relu_nodes):
        width = (4, 5)[i]
        for conv, bn, scale in ((m64.p, m64.bp, 0.5), (m64.q, m64.bq, 1.0)):
            def part(z, conv=conv, bn=bn, scale=scale, i=i, width=width):
                other = torch.zeros(1, 9 - width, side, side, dtype=torch.float64)
                h = torch.cat([z, other] if i == 0 else [other, z], 1)
                return (bn(conv(h)) - bn(conv(torch.zeros_like(h)))) * scale

            jac = torch.autograd.functional.jacobian(part, torch.zeros(1, width, side, side, dtype=torch.float64))
            truth = float(torch.linalg.matrix_norm(jac.reshape(6 * side * side, width * side * side), 2))
            mine = [p for p in res.partials if p.entry == rn.name and p.norm == pytest.approx(truth, rel=1e-6)]
            assert mine, (rn.name, truth, [(p.exit, p.norm, p.method) for p in res.partials if p.entry == rn.name])
            assert all(p.norm >= truth * (1 - 1e-12) for p in mine)
            hows.update(p.method for p in mine)
    assert "pixelwise-jacobian" in hows


class _VGGTail(nn.Module):
    """VGG's classifier input: a max pool, an adaptive average pool that upsamples 3x3 to 7x7 (bins of one and
    two pixels), a constant channel scale, flatten and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 49, 10)
        self.register_buffer("s", torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc((F.adaptive_avg_pool2d(h, 7) * self.s).flatten(1))


def test_partial_into_a_last_linear_layer_is_the_exact_jacobian_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The partial from the max pool to the linear layer's output, by the pull-back of the linear layer's rows
    (``W P``), equals the exact norm of the float64 autograd Jacobian, and the basis route through every member."""
    model = _VGGTail().eval()
    g, ctx, local = _traced(model, 6)
    used = _uses(monkeypatch, "_through_last_linear", lambda out, args: out is not None)
    fast = affine.fold(g, local, ctx)
    assert any(used)
    m64 = _VGGTail().eval().double()

    def part(h: torch.Tensor) -> torch.Tensor:
        return m64.fc((F.adaptive_avg_pool2d(h, 7) * m64.s).flatten(1))

    jac = torch.autograd.functional.jacobian(part, torch.zeros(1, 4, 3, 3, dtype=torch.float64)).reshape(10, 36)
    truth = float(torch.linalg.matrix_norm(jac, 2))
    pool = next(n for n in ir.nodes(g) if n.op == "max_pool")
    mine = [p for p in fast.partials if p.entry == pool.name]
    # the partial adds EVAL_MARGIN (1e-7) of its AutoLip product for the float64 evaluation
    assert len(mine) == 1 and truth <= mine[0].norm <= truth + 1.01e-7 * mine[0].autolip
    monkeypatch.setattr(affine, "_through_last_linear", lambda *a: None)
    slow = [p for p in affine.fold(g, local, ctx).partials if p.entry == pool.name]
    assert slow[0].norm == pytest.approx(mine[0].norm, rel=1e-13)


class _DenseBlock(nn.Module):
    """Two densenet layers and the BatchNorm after the block, with a channel scale: each layer's 3x3 conv reaches
    the later BatchNorms through the concatenations (the other layers' outputs held at zero)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(4), nn.BatchNorm2d(7), nn.BatchNorm2d(10)
        self.conv_a, self.conv_b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(7, 3, 3, padding=1)
        self.register_buffer("s", torch.rand(1, 10, 1, 1) + 0.5)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b, self.bn_c):
                bn.running_var.uniform_(0.3, 3.0)
                bn.running_mean.normal_()
                bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0 = self.conv0(x)
        h1 = self.conv_a(torch.relu(self.bn_a(f0)))
        h2 = self.conv_b(torch.relu(self.bn_b(torch.cat([f0, h1], 1))))
        return torch.relu(self.bn_c(torch.cat([f0, h1, h2], 1)) * self.s)


def test_partial_through_a_concatenation_into_per_channel_maps_is_the_exact_jacobian_norm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The partial from the first layer's ReLU to the block's scaled BatchNorm, with the concatenation read as
    its one live input and the BatchNorm and scale cut to its channels, equals the exact norm of the float64
    autograd Jacobian of the layers as written (the other inputs of the cat at zero), and the full evaluation."""
    model = _DenseBlock().eval()
    g, ctx, local = _traced(model, 5)
    narrowed = _uses(monkeypatch, "_narrowed_at_cat", lambda out, args: out is not args[0])
    fast = affine.fold(g, local, ctx)
    assert any(narrowed)
    m64 = _DenseBlock().eval().double()

    def part(z: torch.Tensor) -> torch.Tensor:
        def at(u: torch.Tensor) -> torch.Tensor:
            zeros = torch.zeros(1, 4, 5, 5, dtype=torch.float64)
            return m64.bn_c(torch.cat([zeros, m64.conv_a(u), torch.zeros(1, 3, 5, 5, dtype=torch.float64)], 1))
        return (at(z) - at(torch.zeros_like(z))) * m64.s

    jac = torch.autograd.functional.jacobian(part, torch.zeros(1, 4, 5, 5, dtype=torch.float64)).reshape(250, 100)
    truth = float(torch.linalg.matrix_norm(jac, 2))
    relu_a = next(n for n in ir.nodes(g) if n.op == "relu" and "conv_a" in list(g.successors(n.name)))
    mine = [p for p in fast.partials if p.entry == relu_a.name and p.norm <= truth + 1.01e-7 * p.autolip]
    assert len(mine) == 1 and mine[0].norm >= truth and mine[0].method == "materialised-jacobian"
    monkeypatch.setattr(affine, "_narrowed_at_cat", lambda nodes, e, v: nodes)
    monkeypatch.setattr(affine, "_live_members", lambda nodes, e, v: nodes)
    slow = affine.fold(g, local, ctx)
    assert [p.norm for p in slow.partials] == pytest.approx([p.norm for p in fast.partials], rel=1e-12)


class _Bottleneck(nn.Module):
    """A ReLU read by a grouped 1x1 conv and an ungrouped one, each with BatchNorm, added: a pixelwise part
    whose first members are 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b = nn.Conv2d(6, 4, 1, groups=2), nn.Conv2d(6, 4, 1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b):
                bn.running_var.uniform_(0.3, 3.0)
                bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv0(x))
        return torch.relu(self.bn_a(self.a(h)) + 0.7 * self.bn_b(self.b(h)))


def test_pixelwise_partial_led_by_1x1_convs_is_the_exact_jacobian_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pixel map of two 1x1 convs (one grouped), their BatchNorms and the scaled add, read from the convs'
    weights, equals the exact norm of the float64 autograd Jacobian of the part on the whole map."""
    model = _Bottleneck().eval()
    g, ctx, local = _traced(model, 4)
    used = _uses(monkeypatch, "_pixel_responses_from_weights", lambda out, args: out is not None)
    fast = affine.fold(g, local, ctx)
    assert any(used)
    m64 = _Bottleneck().eval().double()

    def part(h: torch.Tensor) -> torch.Tensor:
        def at(u: torch.Tensor) -> torch.Tensor:
            return m64.bn_a(m64.a(u)) + 0.7 * m64.bn_b(m64.b(u))
        return at(h) - at(torch.zeros_like(h))

    jac = torch.autograd.functional.jacobian(part, torch.zeros(1, 6, 4, 4, dtype=torch.float64)).reshape(64, 96)
    truth = float(torch.linalg.matrix_norm(jac, 2))
    mine = [p for p in fast.partials if p.method == "pixelwise-jacobian"]
    assert len(mine) == 1 and truth <= mine[0].norm <= truth + 1.01e-7 * mine[0].autolip
    monkeypatch.setattr(affine, "_pixel_responses_from_weights", lambda *a: None)
    slow = [p for p in affine.fold(g, local, ctx).partials if p.method == "pixelwise-jacobian"]
    assert slow[0].norm == pytest.approx(mine[0].norm, rel=1e-13)
