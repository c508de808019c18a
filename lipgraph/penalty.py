"""A differentiable Lipschitz *penalty* for training: an ESTIMATE, not a certificate.

``penalty(model, example_input)`` is the product over the linear layers
(``nn.Linear``, ``nn.Conv1d/2d/3d``) of power-iteration estimates
``sigma_i = <u_i, A_i v_i>`` of their spectral norms, with ``u_i, v_i`` unit
vectors carried across calls (as in ``torch.nn.utils.spectral_norm``) in a dict
keyed by the weight parameter. Its gradient with respect to each weight is the
usual ``u v^T``-type gradient. Each ``sigma_i`` is *at most* the true norm
``||A_i||`` (a Rayleigh-type quotient of unit vectors), so the product is not
an upper bound on anything: use :func:`lipgraph.analyze` / :func:`lipgraph.certify`
after training for a certified bound.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Default store of the power-iteration vectors: parameter -> (u, v).
STATE: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}


def _operator(m: nn.Module):  # type: ignore[no-untyped-def]
    if isinstance(m, nn.Linear):
        return lambda v, w: F.linear(v, w)
    return lambda v, w: m._conv_forward(v, w, None)  # type: ignore[operator]


def _input_shapes(model: nn.Module, example_input: Any) -> dict[nn.Module, tuple[int, ...]]:
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:  # returns None: the output is left alone
        shapes.setdefault(mod, tuple(inp[0].shape[1:]))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LINEAR_TYPES)]
    try:
        with torch.no_grad():
            model(example_input[:1] if isinstance(example_input, torch.Tensor) else example_input)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def penalty(
    model: nn.Module,
    example_input: Any,
    *,
    iterations: int = 1,
    state: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] | None = None,
    shapes: dict[nn.Module, tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """Product of power-iteration spectral-norm estimates of the linear layers (differentiable in the weights).

    ``iterations`` power steps (under ``no_grad``) update the carried vectors before the estimate;
    ``iterations=0`` reuses them (the penalty is then a smooth function of the weights). ``state``
    defaults to the module-level :data:`STATE`. An ESTIMATE: each factor is <= the true norm.
    """
    store = STATE if state is None else state
    shapes = shapes if shapes is not None else _input_shapes(model, example_input)
    total = None
    for m in model.modules():
        if not isinstance(m, LINEAR_TYPES) or m not in shapes:
            continue
        w = m.weight
        op = _operator(m)
        if w not in store:
            g = torch.Generator().manual_seed(0)
            v0 = torch.randn((1, *shapes[m]), generator=g, dtype=w.dtype).to(w.device)
            with torch.no_grad():
                u0 = op(v0, w)
            store[w] = (u0 / u0.norm(), v0 / v0.norm())
        u, v = store[w]
        wd = w.detach()
        for _ in range(iterations):
            vv = v.clone().requires_grad_(True)
            with torch.enable_grad():
                (atu,) = torch.autograd.grad(op(vv, wd), vv, grad_outputs=u)  # A^T u
            v = atu / atu.norm().clamp_min(1e-12)
            with torch.no_grad():
                au = op(v, wd)
            u = au / au.norm().clamp_min(1e-12)
        store[w] = (u.detach(), v.detach())
        sigma = (u.detach() * op(v.detach(), w)).sum()
        total = sigma if total is None else total * sigma
    if total is None:
        return torch.ones(())
    return total
