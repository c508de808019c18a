"""Models whose report numbers are kept as golden values (``tests/golden/bounds.json``).

The values were written by ``python tests/golden_models.py`` with the code *before* the bound algorithms
became relation producers (issue 11); ``tests/test_golden_bounds.py`` checks that every later change keeps
them (or changes them on purpose, with the golden file regenerated in the same commit and the reason in
its message). Every model is seeded and small enough for exact SeqLip inner maxima.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

GOLDEN = Path(__file__).parent / "golden" / "bounds.json"


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.tanh(self.b(h))
        return self.head(h)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 1, 3, padding=1)
        self.bn = nn.BatchNorm2d(1)
        self.c2 = nn.Conv2d(1, 2, 3, stride=2)
        self.fc = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        h = F.max_pool2d(F.elu(self.c2(h)), 1)
        return self.fc(h.flatten(1))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([torch.sigmoid(self.a(x)), F.leaky_relu(self.b(x), 0.1)], dim=-1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))


def _gated() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        from models import GatedNet  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    return GatedNet()


#: name -> (factory, input shape); each factory is called right after torch.manual_seed(0).
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (1, 6)),
    "residual": (_Residual, (1, 8)),
    "convnet": (_ConvNet, (1, 1, 4, 4)),
    "concat": (_Concat, (2, 5)),
    "gated": (_gated, (1, 3, 6, 6)),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    return model, torch.randn(shape)


def numbers(report) -> dict:  # type: ignore[no-untyped-def]
    """The numbers of a report that must not change: each bound, and every node's local and cumulative value."""
    d = report.to_dict()
    return {
        "bounds": {k: [v["value"], v["certified"]] for k, v in d["bounds"].items()},
        "nodes": {n["name"]: [n["local"], n["cumulative"], n["certified"]] for n in d["nodes"]},
    }


def main() -> None:
    import lipgraph  # noqa: PLC0415

    out = {}
    for name in MODELS:
        model, x = build(name)
        out[name] = numbers(lipgraph.analyze(model, x, lower=False))
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
