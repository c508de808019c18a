"""Linear-chain segment detection on the IR."""

from __future__ import annotations

import torch
import torch.nn as nn

import lipgraph
from lipgraph import ir
from lipgraph.bounds import chains


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block(4)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.stem(x)))
        return self.head(self.pool(y))


def _check_single_entry_exit(g, seg: chains.Segment) -> None:
    for prev, cur in zip(seg.nodes, seg.nodes[1:], strict=False):
        assert ir.node(g, cur).inputs == [prev]
        assert g.out_degree(prev) == 1
    assert ir.node(g, seg.nodes[0]).inputs == [seg.entry]
    assert not chains.is_activation(ir.node(g, seg.nodes[0]))
    assert not chains.is_activation(ir.node(g, seg.nodes[-1]))


def test_resnet18_segments():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    g = lipgraph.trace(model, torch.randn(1, 3, 32, 32))
    segs = chains.find_segments(g)
    for s in segs:
        _check_single_entry_exit(g, s)
        assert all(ir.node(g, n).op != "add" for n in s.nodes)
    by_last = {s.last: s for s in segs}
    # every residual branch conv-bn-relu-conv-bn is one segment whose entry is the block input
    for layer in range(1, 5):
        for blk in range(2):
            p = f"layer{layer}_{blk}_"
            s = by_last[p + "bn2"]
            assert s.groups == [[p + "conv1", p + "bn1"], [p + "conv2", p + "bn2"]]
            assert s.activations == [[p + "relu"]] and s.slopes == [(0.0, 1.0)]
    for layer in (2, 3, 4):
        p = f"layer{layer}_0_downsample_"
        assert by_last[p + "1"].groups == [[p + "0", p + "1"]]
    assert by_last["fc"].groups == [["avgpool", "flatten", "fc"]]
    assert by_last["bn1"].groups == [["conv1", "bn1"]]  # the stem's relu feeds max pooling: trimmed
    assert len(segs) == 8 + 3 + 2


def test_shared_interior_node_splits_the_chain():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))  # read twice: not an interior node
            return torch.cat([self.b(h), self.c(torch.sigmoid(torch.tanh(h)))], dim=1)

    g = lipgraph.trace(Fork(), torch.randn(1, 4))
    segs = chains.find_segments(g, min_nodes=1)
    lasts = {s.last: s for s in segs}
    assert set(lasts) == {"a", "b", "c"}
    for s in segs:
        _check_single_entry_exit(g, s)
        assert len(s.groups) == 1


def test_activation_runs_combine_intervals():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Sigmoid(), nn.Linear(5, 2), nn.LeakyReLU(0.2),
                          nn.Linear(2, 2), nn.ReLU())
    g = lipgraph.trace(model, torch.randn(1, 3))
    (seg,) = chains.find_segments(g)
    assert seg.slopes == [(0.0, 0.25), (0.2, 1.0)]
    assert len(seg.groups) == 3 and seg.entry in g.graph["inputs"]
    assert ir.node(g, seg.last).op == "linear"  # the trailing ReLU stays outside
    assert chains.product_interval([(-0.1, 1.1), (0.0, 0.25)]) == (-0.025, 0.275)


def test_tiny_resnet_segments_and_bound():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
    x = torch.randn(1, 1, 4, 4)
    g = lipgraph.trace(model, x)
    segs = chains.find_segments(g)
    groups = [s.groups for s in segs]
    assert [["block_conv1", "block_bn1"], ["block_conv2", "block_bn2"]] in groups
    assert [["pool", "head_0", "head_1"], ["head_3"]] in groups
    m = chains.group_matrix(g, ["pool", "head_0", "head_1"])
    xx = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = model.head[1].double()(model.pool(xx).flatten(1)) - model.head[1].bias.double()
    assert torch.allclose(m @ xx.reshape(-1), ref.reshape(-1), atol=1e-12)
    model.float()
    rep = lipgraph.analyze(model, x, method="seqlip", lower=False)
    seq, auto = rep.bounds["autolip+seqlip"], rep.bounds["autolip"]
    model.double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        z = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
        j = torch.autograd.functional.jacobian(model, z).reshape(-1, 16)
        assert float(torch.linalg.matrix_norm(j, 2)) <= seq.value * (1 + 1e-6)
    assert seq.value <= auto.value * (1 + 1e-9)
    assert len(rep.segments) == len(segs)


def test_float_cast_inside_a_chain_keeps_seqlip() -> None:
    """A ``.to(torch.float32)`` between layers is evaluated in float64 like every other member (one float64
    conversion for every pass): SeqLip still certifies the chain instead of falling back to AutoLip."""

    class CastNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x).to(torch.float32)))

    rep = lipgraph.analyze(CastNet(), torch.randn(1, 5), lower=False)
    (seg,) = rep.segments
    assert seg["certified"] and "failed" not in seg["method"]
    assert rep.bounds["autolip+seqlip"].value < rep.bounds["autolip"].value
