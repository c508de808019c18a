"""Test models for the CLI (loaded as ``tests/models/small.py:Name``)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Small(nn.Module):
    """A tiny CNN: conv, relu, max pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class WithCumprod(nn.Module):
    """Contains an op without a rule: the bound is inf, with the node named."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(self.fc(x), dim=-1)


class Untraceable(nn.Module):
    """Data-dependent control flow: neither torch.fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def needs_arguments(width: int) -> nn.Module:
    return nn.Linear(width, width)


def not_a_module() -> int:
    return 3
