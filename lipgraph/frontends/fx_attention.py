"""Dot-product attention written out in primitive ops while tracing.

``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` are one call each in PyTorch, but as
one IR node they can only be bounded by ``inf``. Written out -- projections (``linear``), heads
(``unflatten``/``transpose``), scores ``q @ k^T`` (``matmul_var``), the ``1/sqrt(d)`` scale, ``softmax``,
``P @ v`` (``matmul_var``), heads merged back and the output projection (``linear``) -- the global
analysis still says ``inf`` (the products), but on an input domain the ranges and local rules of those
primitives give a finite constant.

The tracer calls :func:`mha_forward` / :func:`sdpa_forward` on its proxies instead of recording the call,
only for configurations they reproduce exactly (no masks, no dropout in effect, no extra key/value
biases, no zero attention); every other call stays one node (``attention`` / opaque, bounded by inf).
``torch.einsum`` of two tensors in the form of a batched matrix product (maxvit's attention: each index
in both operands and the output a batch index, at most one index summed, at most one free index per operand)
is written out the same way: permutes, a ``matmul`` and a permute back (:func:`einsum_forward`); other
equations stay one opaque node.

The frontend checks the IR against the model's own output.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)


def _bind_mha(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        bound = _MHA_SIG.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def mha_decomposable(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A MultiheadAttention call :func:`mha_forward` reproduces: eval mode (or dropout 0), no masks, not
    causal, no ``bias_k``/``bias_v``, no ``add_zero_attn``, ``need_weights``/``average_attn_weights``
    plain booleans."""
    if not isinstance(m, nn.MultiheadAttention):
        return False
    if (m.training and m.dropout > 0) or m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return False
    a = _bind_mha(m, args, kwargs)
    if a is None:
        return False
    if a["key_padding_mask"] is not None or a["attn_mask"] is not None or a["is_causal"] is not False:
        return False
    return isinstance(a["need_weights"], bool) and isinstance(a["average_attn_weights"], bool)


def _projections(m: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight[:e], m.in_proj_weight[e:2 * e], m.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias[:e], m.in_proj_bias[e:2 * e], m.in_proj_bias[2 * e:]
    else:
        bq = bk = bv = None
    return wq, wk, wv, bq, bk, bv


def _heads(x: Any, h: int, d: int) -> Any:
    """[..., N, h*d] -> [..., h, N, d]."""
    return x.unflatten(-1, (h, d)).transpose(-3, -2)


def attend(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, Any]:
    """softmax(q k^T * scale) v over the last two dims; returns (output, attention weights)."""
    p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
    return torch.matmul(p, v), p


def mha_forward(m: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """MultiheadAttention's forward (for calls where :func:`mha_decomposable` holds) in primitive ops.

    Batched inputs are [B, N, E] (``batch_first``) or [N, B, E]; unbatched ones [N, E]. ``transpose(0, -2)``
    maps [N, B, E] to [B, N, E] and leaves [N, E] alone, so one code path serves all layouts. Returns
    ``(out, weights)`` like the module: weights averaged over heads, per head, or None."""
    a = _bind_mha(m, args, kwargs)
    assert a is not None
    q, k, v = a["query"], a["key"], a["value"]
    if not m.batch_first:
        q, k, v = (t.transpose(0, -2) for t in (q, k, v))
    h, d = m.num_heads, m.head_dim
    wq, wk, wv, bq, bk, bv = _projections(m)
    qh = _heads(F.linear(q, wq, bq), h, d)
    kh = _heads(F.linear(k, wk, bk), h, d)
    vh = _heads(F.linear(v, wv, bv), h, d)
    o, p = attend(qh, kh, vh, 1.0 / math.sqrt(d))
    out = F.linear(o.transpose(-3, -2).flatten(-2), m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = out.transpose(0, -2)
    if not a["need_weights"]:
        return out, None
    return out, (p.mean(dim=-3) if a["average_attn_weights"] else p)


_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_SDPA_ORDER = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _bind_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    if len(args) > len(_SDPA_ORDER):
        return None
    a = dict(_SDPA_DEFAULTS)
    positional = dict(zip(_SDPA_ORDER, args, strict=False))
    a.update(positional)
    for k_, v_ in kwargs.items():
        if k_ in positional or (k_ not in _SDPA_DEFAULTS and k_ not in _SDPA_ORDER):
            return None
        a[k_] = v_
    return a if all(k_ in a for k_ in ("query", "key", "value")) else None


def sdpa_decomposable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """F.scaled_dot_product_attention without a mask, dropout, causality or grouped heads."""
    a = _bind_sdpa(args, kwargs)
    if a is None:
        return False
    return (a["attn_mask"] is None and a["dropout_p"] in (0, 0.0) and a["is_causal"] is False
            and a["enable_gqa"] is False and (a["scale"] is None or isinstance(a["scale"], (int, float))))


def sdpa_forward(*args: Any, **kwargs: Any) -> Any:
    """softmax(q k^T * scale) v with PyTorch's default ``scale = 1/sqrt(q.size(-1))``."""
    a = _bind_sdpa(args, kwargs)
    assert a is not None
    q = a["query"]
    scale = a["scale"] if a["scale"] is not None else q.size(-1) ** -0.5
    return attend(q, a["key"], a["value"], scale)[0]


@dataclass(frozen=True)
class EinsumPlan:
    """``out = einsum(a, b)`` as ``permute(a) @ permute(b)``: ``a`` brought to ``batch + left + summed``,
    ``b`` to ``batch + summed + right`` (a missing ``left``, ``summed`` or ``right`` index is a size-1 axis
    added and removed again), the product's ``batch + left + right`` permuted to the output's order."""

    a_order: tuple[int, ...]
    b_order: tuple[int, ...]
    left: bool
    summed: bool
    right: bool
    out_order: tuple[int, ...]


def einsum_plan(equation: Any) -> EinsumPlan | None:
    """The plan of a two-operand equation with an explicit ``->`` that is a batched matrix product, or None
    (an ellipsis, a repeated index in one term, an index summed in one operand only, more than one summed or
    free index per operand)."""
    if not isinstance(equation, str) or "..." in equation:
        return None
    eq = "".join(equation.split())
    if eq.count("->") != 1:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) or not t.isalpha() for t in (a, b)) or len(set(out)) != len(out):
        return None
    if not set(out) <= set(a) | set(b) or not set(a) ^ set(b) <= set(out):
        return None
    batch = [i for i in out if i in a and i in b]
    summed = [i for i in a if i in b and i not in out]
    left = [i for i in a if i not in b]
    right = [i for i in b if i not in a]
    if len(summed) > 1 or len(left) > 1 or len(right) > 1:
        return None
    product = batch + left + right
    return EinsumPlan(tuple(a.index(i) for i in batch + left + summed),
                      tuple(b.index(i) for i in batch + summed + right),
                      bool(left), bool(summed), bool(right), tuple(product.index(i) for i in out))


def _permuted(x: Any, order: tuple[int, ...]) -> Any:
    return x if order == tuple(range(len(order))) else x.permute(*order)


def einsum_operands(args: tuple[Any, ...]) -> tuple[Any, Any, Any] | None:
    """``(equation, a, b)`` of ``torch.einsum(eq, a, b)`` or ``torch.einsum(eq, [a, b])``, else None."""
    if len(args) == 2 and isinstance(args[1], (list, tuple)) and len(args[1]) == 2:
        return args[0], args[1][0], args[1][1]
    if len(args) == 3:
        return args
    return None


def einsum_forward(plan: EinsumPlan, a: Any, b: Any) -> Any:
    """``einsum`` by its :class:`EinsumPlan`: two permutes, a ``matmul`` and a permute back."""
    x, y = _permuted(a, plan.a_order), _permuted(b, plan.b_order)
    if not plan.left:
        x = x.unsqueeze(-2 if plan.summed else -1)
    if not plan.summed:
        x = x.unsqueeze(-1)
        y = y.unsqueeze(-2 if plan.right else -1)
    if not plan.right:
        y = y.unsqueeze(-1)
    z = torch.matmul(x, y)
    if not plan.right:
        z = z.squeeze(-1)
    if not plan.left:
        z = z.squeeze(-2 if plan.right else -1)
    return _permuted(z, plan.out_order)


__all__ = ["attend", "einsum_forward", "einsum_operands", "einsum_plan", "mha_decomposable", "mha_forward",
           "sdpa_decomposable", "sdpa_forward", "EinsumPlan"]
