"""Random small token models for the randomized soundness test on input domains (``tests/test_random_domains.py``):
dense layers with every kind of activation, gating ``a(x) * sigmoid(g(x))``, squeeze-excitation over tokens,
LayerNorm, softmax attention (``nn.MultiheadAttention``, and written with ``torch.einsum`` as maxvit does) and
residual adds, each on inputs ``(1, tokens, dim)``,
with seeded random weights; and a seeded random domain (box, l2 ball, l_inf ball within a box) around a point."""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from lipgraph.domains import Ball, Box, Domain

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Mish, nn.Hardswish]
KINDS = ["mlp", "gate", "se", "ln", "attn", "einsum"]


class Block(nn.Module):
    """One random block on ``(1, T, d)`` tokens."""

    def __init__(self, rng: random.Random, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.residual = rng.random() < 0.5 and kind != "ln"
        self.a = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)
        self.act = rng.choice(ACTIVATIONS)()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(rng.choice([0.5, 1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            h = self.g(self.act(self.a(x)))
        elif self.kind == "gate":
            h = self.a(x) * torch.sigmoid(self.g(x))
        elif self.kind == "se":
            h = x * torch.sigmoid(self.g(x.mean(dim=1, keepdim=True)))
        elif self.kind == "ln":
            h = self.norm(x)
        elif self.kind == "einsum":
            scores = torch.einsum("btd,bsd->bts", self.a(x), self.g(x)) * x.shape[-1] ** -0.5
            h = torch.einsum("bts,bsd->btd", torch.softmax(scores, dim=-1), x)
        else:
            h = self.attn(x, x, x, need_weights=False)[0]
        return x + h if self.residual else h


class RandomTokenNet(nn.Module):
    def __init__(self, rng: random.Random, dim: int, kinds: list[str]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(rng, dim, k) for k in kinds])
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def make(seed: int, *, tokens: int = 3, dim: int = 4, depth: int = 2) -> tuple[nn.Module, torch.Tensor, Domain]:
    """A seeded random model, an input point in [0, 1] and a random domain containing it."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kinds = [KINDS[seed % len(KINDS)]] + [rng.choice(KINDS) for _ in range(depth - 1)]
    model = RandomTokenNet(rng, dim, kinds).eval()
    x = torch.rand(1, tokens, dim, generator=torch.Generator().manual_seed(seed))
    which = rng.choice(["box", "l2", "linf"])
    radius = rng.choice([0.02, 0.1, 0.3])
    domain: Domain
    if which == "box":
        domain = Box(torch.clamp(x - radius, min=0), torch.clamp(x + radius, max=1))
    elif which == "l2":
        domain = Ball(x, radius, "l2")
    else:
        domain = Ball(x, radius, "linf", clip=(0, 1))
    return model, x, domain
