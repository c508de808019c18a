"""Affine-region folding: certified, never below the exact norm, and exact-ish on purely linear models."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import lipgraph
from lipgraph.bounds import affine
from lipgraph.bounds.local import local_constants
from lipgraph.ops import Settings


def model_norm(m: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact ||J|| of a linear model (float64 Jacobian, SVD)."""
    m = m.double()
    n = math.prod(shape[1:])
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
        mat = m(basis).reshape(n, -1) - m(torch.zeros(1, *shape[1:], dtype=torch.float64)).reshape(1, -1)
    m.float()
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]))


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.weight.data = 0.2 + 1.8 * torch.rand(c, generator=g)
    bn.running_var = 0.1 + 3.9 * torch.rand(c, generator=g)
    return bn


class LinearNet(nn.Module):
    """conv -> BN -> strided conv -> avg pool -> flatten -> linear, plus a residual add of two affine branches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = _bn(6, 0)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.c1(x))
        h = h + 0.5 * self.c1(x)
        return self.fc(self.pool(self.c2(h)).flatten(1))


def _analyze(m: nn.Module, shape):
    return lipgraph.analyze(m, torch.randn(*shape), lower=False)


def test_linear_model_folds_to_its_exact_norm():
    m = LinearNet()
    ex = model_norm(m, (1, 3, 8, 8))
    r = _analyze(m, (1, 3, 8, 8))
    folded = r.bounds["autolip+affine"]
    assert folded.certified
    assert ex <= folded.value <= ex * 1.01, (folded.value, ex)
    assert folded.value < r.bounds["autolip"].value


def test_path_folding_without_materialisation(monkeypatch):
    """With materialisation off, conv -> BN folds into one conv: certified, tighter than the product."""
    monkeypatch.setattr(affine, "MATERIALIZE_MAX", 0)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, 1), nn.Conv2d(8, 8, 1), _bn(8, 2)).eval()
    ex = model_norm(m, (1, 3, 10, 10))
    g = lipgraph.trace(m, torch.randn(1, 3, 10, 10))
    ctx = Settings()
    local = {k: v[0] for k, v in local_constants(g, ctx).items()}
    res = affine.fold(g, local, ctx)
    out = g.graph["output"]
    assert len(res.regions) == 1
    value = res.cumulative[out].value
    plain = lipgraph.bounds.autolip.autolip(g, local)[out].value
    assert res.cumulative[out].certified
    assert ex <= value < plain
    assert value <= ex * 1.35  # torus bound of the folded 3x3 conv on a 10x10 signal
    assert any(p.method.startswith("folded") for p in res.partials)


class Block(nn.Module):
    """A ReLU residual block whose add joins two affine branches from different entries."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = _bn(4, 3)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = _bn(4, 4)
        self.down = nn.Conv2d(4, 4, 1)
        self.bn_d = _bn(4, 5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_a(self.a(x)))
        return torch.relu(self.bn_b(self.b(h)) + self.bn_d(self.down(x)))


def test_two_entry_region_is_sound_and_tighter():
    m = Block()
    shape = (1, 4, 6, 6)
    r = _analyze(m, shape)
    folded = r.bounds["autolip+affine"].value
    assert folded <= r.bounds["autolip"].value
    # any attained Jacobian norm must stay below the certified bound
    torch.manual_seed(3)
    worst = 0.0
    m.double()
    for _ in range(8):
        x = torch.randn(shape, dtype=torch.float64)
        jac = torch.func.jacfwd(lambda z: m(z).flatten())(x).reshape(-1, x.numel())
        worst = max(worst, float(torch.linalg.matrix_norm(jac, ord=2)))
    m.float()
    assert worst <= folded


def test_regions_and_entries():
    m = Block()
    g = lipgraph.trace(m, torch.randn(1, 4, 6, 6))
    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    regions = affine.find_regions(g, local)
    sizes = sorted(len(r.entries) for r in regions)
    assert sizes == [1, 2]  # conv-BN (one entry); conv-BN + downsample conv-BN + add (two entries)


def test_same_entry_sum_is_folded_exactly():
    """x -> conv(x) + 0.5 x: the norm of the sum, not ||conv|| + 0.5."""

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x) - 0.5 * x

    m = Res().eval()
    ex = model_norm(m, (1, 3, 7, 7))
    r = _analyze(m, (1, 3, 7, 7))
    v = r.bounds["autolip+affine"].value
    assert ex <= v <= ex * 1.01


def test_seqlip_and_affine_compound_and_stay_sound():
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> linear -> ReLU -> linear: the affine folds (BN into conv) and
    SeqLip's chain bound enter one AutoLip pass. The result is certified, no worse than either alone, and never
    below the largest Jacobian norm found by sampling (a value the model attains)."""
    torch.manual_seed(12)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn(4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), _bn(4, 2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    shape = (1, 2, 5, 5)
    r = lipgraph.analyze(m, torch.randn(shape), method=["seqlip", "affine"], lower=False)
    both = r.bounds["autolip+seqlip+affine"]
    assert both.certified
    assert both.value <= min(r.bounds["autolip+seqlip"].value, r.bounds["autolip+affine"].value) * (1 + 1e-12)
    worst = 0.0
    for _ in range(200):
        x = torch.randn(shape, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(m.double(), x).reshape(3, -1)
        worst = max(worst, float(torch.linalg.matrix_norm(jac, ord=2)))
    m.float()
    assert worst <= both.value
    assert r.best[1].value <= both.value


def test_regions_come_in_graph_order_whatever_the_hash_seed() -> None:
    """Regions (and so the affine records in a report) are listed in graph order of their first node, the same
    in processes with different string hash seeds (connected components come out of sets)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, torchvision, lipgraph\n"
        "from lipgraph.bounds import affine\n"
        "from lipgraph.ops import LocalConstant\n"
        "g = lipgraph.trace(torchvision.models.vgg11(weights=None).eval(), torch.randn(1, 3, 32, 32))\n"
        "local = {n: LocalConstant([1.0], True, 'test') for n in g.nodes}  # every node foldable\n"
        "order = {n: i for i, n in enumerate(g.graph['order'])}\n"
        "regs = affine.find_regions(g, local)\n"
        "assert len(regs) > 5\n"
        "assert [order[r.nodes[0]] for r in regs] == sorted(order[r.nodes[0]] for r in regs)\n"
        "print([r.nodes[0] for r in regs])\n"
    )
    outs = []
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]
