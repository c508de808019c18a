"""Random small models for the randomized soundness test (``tests/test_random_soundness.py``) and its larger
run (``bench/bench_soundness.py``): dense and conv layers, residual adds, concatenations, poolings and every
activation with a global rule, with seeded random weights (some layers scaled up or down so that
constants span orders of magnitude)."""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.Mish, nn.Hardswish, nn.LeakyReLU,
               nn.Hardtanh, nn.SELU, nn.CELU, nn.ReLU6, lambda: nn.Softplus(threshold=float("inf"))]


class Block(nn.Module):
    """One random piece: dense or conv, maybe with a residual or a concatenated branch."""

    def __init__(self, rng: random.Random, width: int, conv: bool) -> None:
        super().__init__()
        self.kind = rng.choice(["plain", "residual", "concat"])
        self.conv = conv
        make = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        self.a = make(width, width)
        self.act = rng.choice(ACTIVATIONS)()
        self.b = make(width, width) if self.kind != "plain" else None
        self.merge = make(2 * width, width) if self.kind == "concat" else None
        scale = rng.choice([0.3, 1.0, 3.0])
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        if self.kind == "residual":
            return x + self.b(h)
        if self.kind == "concat":
            return self.merge(torch.cat([h, torch.tanh(self.b(x))], dim=1))
        return h


class RandomNet(nn.Module):
    def __init__(self, seed: int, width: int = 4, depth: int = 3, conv: bool = False) -> None:
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.conv = conv
        self.blocks = nn.Sequential(*[Block(rng, width, conv) for _ in range(depth)])
        self.pool = rng.choice(["avg", "max", "none"]) if conv else "none"
        self.head = nn.Linear(width * (4 if conv and self.pool == "none" else 1 if conv else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        if self.conv:
            if self.pool == "avg":
                h = F.adaptive_avg_pool2d(h, 1)
            elif self.pool == "max":
                h = F.adaptive_max_pool2d(h, 1)
            else:
                h = F.avg_pool2d(h, 2)
            h = h.flatten(1)
        return self.head(h)


def make(seed: int, *, width: int = 4, depth: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """A seeded random model and an input: dense for even seeds, conv (4x4 maps) for odd ones."""
    conv = seed % 2 == 1
    model = RandomNet(seed, width, depth, conv).eval()
    x = torch.randn((1, width, 4, 4) if conv else (1, width), generator=torch.Generator().manual_seed(seed))
    return model, x


def attained(model: nn.Module, x: torch.Tensor, samples: int, seed: int) -> float:
    """The largest float64 Jacobian norm and secant ratio found at random points around ``x`` (a value the
    model attains: any certified upper bound must be at least this)."""
    m = __import__("copy").deepcopy(model).double().eval()
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for i in range(samples):
        z = (x.double() + torch.randn(x.shape, generator=g, dtype=torch.float64) * (3.0 if i % 2 else 0.5))
        jac = torch.autograd.functional.jacobian(lambda t: m(t).reshape(-1), z).reshape(-1, z.numel())
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
        d = torch.randn(z.shape, generator=g, dtype=torch.float64) * 1e-3
        with torch.no_grad():
            best = max(best, float((m(z + d) - m(z)).norm() / d.norm()))
    return best
