"""Input-dependent normalizations (LayerNorm, GroupNorm, InstanceNorm without running stats, RMSNorm).

With ``z = x - mean(x)`` over a normalized group of n entries and
``s = sqrt(|z|^2/n + eps)``, ``f(x) = gamma * z / s + beta`` has Jacobian
``diag(gamma) (I - z z^T/(n s^2)) P / s`` (P removes the mean), whose norm is at
most ``max|gamma| / s <= max|gamma| / sqrt(eps)``, approached as ``z -> 0``.
So the honest global constant is ``max|gamma| / sqrt(eps)``: certified, and
large (about 316 for eps = 1e-5), because a near-constant input is scaled up
by ``1/sqrt(eps)``. Groups are independent, so the bound holds for the whole op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import LocalConstant, Settings, register_rule


def _gamma_max(node) -> float:
    w = node.params.get("weight")
    return float(w.detach().abs().max()) if w is not None and w.numel() else 1.0


def _norm_lipschitz(node, ctx: Settings) -> LocalConstant:
    """L = max|gamma| / sqrt(eps) (certified; see the module docstring)."""
    v = _gamma_max(node) / math.sqrt(node.attrs["eps"])
    return LocalConstant([v], True, "1/sqrt(eps)")


def layer_norm_forward(node, x):
    p = node.params
    return F.layer_norm(x, node.attrs["normalized_shape"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def group_norm_forward(node, x):
    p = node.params
    return F.group_norm(x, node.attrs["num_groups"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def instance_norm_forward(node, x):
    p = node.params
    return F.instance_norm(x, None, None, p.get("weight"), p.get("bias"), True, 0.0, node.attrs["eps"])


def rms_norm_forward(node, x):
    return F.rms_norm(x, node.attrs["normalized_shape"], node.params.get("weight"), node.attrs["eps"])


def rms_norm_lipschitz(node, ctx: Settings) -> LocalConstant:
    """RMSNorm f(x) = gamma x / s, s = sqrt(|x|^2/n + eps): J = diag(gamma) (I - x x^T / (n s^2)) / s, whose
    middle factor has eigenvalues 1 and eps/s^2, so ||J|| <= max|gamma| / s <= max|gamma| / sqrt(eps), approached
    as x -> 0: L = max|gamma| / sqrt(eps) (exact). eps = None means finfo(input dtype).eps in PyTorch; the IR
    does not record the input's dtype, so it takes float64's eps, the smallest (sound for any input dtype,
    exact for float64 inputs or when eps is given; pass eps explicitly for a tight float32 bound)."""
    eps = node.attrs["eps"]
    if eps is None:
        eps = torch.finfo(torch.float64).eps
    v = _gamma_max(node) / math.sqrt(eps)
    return LocalConstant([v], True, "1/sqrt(eps)", lower=v)


register_rule("layer_norm", layer_norm_forward, _norm_lipschitz)
register_rule("rms_norm", rms_norm_forward, rms_norm_lipschitz)
register_rule("group_norm", group_norm_forward, _norm_lipschitz)
register_rule("instance_norm", instance_norm_forward, _norm_lipschitz)


