"""Shared helpers for the SeqLip examples (lower bounds, tables, paths)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.func import jacrev, vmap

DOCS = Path(__file__).resolve().parent.parent / "docs"


def jacobian_lower_bound(model: nn.Module, points: torch.Tensor, ascent_steps: int = 20, lr: float = 0.05) -> float:
    """max_x ||J_f(x)||_2 over ``points`` and a short gradient ascent from them: an attained value
    (a LOWER bound on the Lipschitz constant). ``points``: a batch ``(N, *input_shape)``."""
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(x[None]).reshape(-1)

    def norms(xs: torch.Tensor) -> torch.Tensor:
        j = vmap(jacrev(f))(xs).reshape(xs.shape[0], -1, xs[0].numel())
        return torch.linalg.matrix_norm(j, ord=2)

    x = points.double().clone()
    best = float(norms(x).max())
    for _ in range(ascent_steps):
        x = x.detach().requires_grad_(True)
        val = norms(x).sum()
        (grad,) = torch.autograd.grad(val, x)
        x = x + lr * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (x.ndim - 1))
        best = max(best, float(norms(x.detach()).max()))
    return best


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
