"""Draw the example pictures of docs/rendering.md: an MLP, a ResNet-18 and a model with an ``inf`` node.

Run ``.venv/bin/python examples/render_gallery.py [outdir [name.png ...]]`` (default ``docs/``, all three);
needs Graphviz's ``dot``. The ResNet-18 is analysed with AutoLip only and no lower bound, to stay quick.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import lipgraph
from lipgraph.render import render


class GatedMLP(nn.Module):
    """An MLP with a multiplicative gate: the product of two input-dependent tensors is not Lipschitz."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.value = nn.Linear(32, 32)
        self.gate = nn.Sequential(nn.Linear(32, 32), nn.Sigmoid())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.head(self.value(h) * self.gate(h))


def mlp() -> nn.Module:
    """A 4-layer ReLU MLP for 28x28 inputs."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def main(outdir: str = "docs", *names: str) -> None:
    """Analyse the three models (or those ``names``) and write their PNGs into ``outdir``."""
    import torchvision  # noqa: PLC0415 - a test dependency, only for this example

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fast = {"method": "autolip", "lower": False}  # keep the ResNet's analysis short
    jobs = [
        ("mlp.png", mlp, (1, 1, 28, 28), {"lower_budget": 5.0}, {}),
        ("inf_model.png", GatedMLP, (1, 16), {"lower_budget": 5.0}, {}),
        ("resnet18.png", lambda: torchvision.models.resnet18(num_classes=10).eval(), (1, 3, 32, 32), fast,
         {"depth": 2}),
    ]
    only = set(names)
    for name, make, shape, akw, rkw in jobs:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model = make()
        t0 = time.perf_counter()
        report = lipgraph.analyze(model, torch.randn(shape), **akw)
        t1 = time.perf_counter()
        path = render(report, str(out / name), **rkw)
        print(f"{path}: analysed in {t1 - t0:.1f}s, rendered in {time.perf_counter() - t1:.2f}s")


if __name__ == "__main__":
    main(*sys.argv[1:])
