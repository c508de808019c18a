"""torchvision's Swin functions written out in primitive ops while tracing, with the example's shapes.

torchvision declares ``shifted_window_attention`` and ``_patch_merging_pad`` ``torch.fx.wrap`` leaves:
their Python branches read the input's shape (padding to whole windows, no shift when a window covers the
map), which symbolic tracing cannot evaluate, so a plain trace keeps each call as one opaque node (``inf``
on every domain). Their shapes are those of the example input, though: :func:`record_shapes` runs the model
once with each wrapped function replaced by a recorder of its input's shape, and the tracer then writes
call ``k`` of a function out for the ``k``-th shape recorded (same model, same input, same call order):

* ``shifted_window_attention`` (Swin V1: no ``logit_scale``; dropout off): zero padding to whole windows,
  the cyclic shift (``roll``), the window partition (``reshape``/``permute``), the ``qkv`` projection,
  ``q k^T`` scaled, the relative position bias (a constant of the weights), the shifted windows' mask
  (a constant of the shapes: ``-100`` between tokens of different regions), ``softmax``, ``P v``, the
  output projection, and the reverse partition, shift and crop;
* ``_patch_merging_pad``: zero padding to even sizes and the four strided slices concatenated.

A call whose arguments these do not reproduce (Swin V2's cosine attention, dropout in effect, a negative
shift, a shape not recorded) stays one opaque node. A trace with calls written out is kept only if it computes
the model's output on the example and on a seeded random probe of the same shapes, with every recorded shape
used (``fx._written_out_faithfully``); otherwise the model is traced again with each such call one node. The
IR is then checked against the model's own output as always.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

#: The module that defines the functions written out here (looked up only when the model is loaded).
SWIN_MODULE = "torchvision.models.swin_transformer"
#: ``-100``: the logit torchvision adds between tokens of different regions of a shifted window.
MASKED_LOGIT = -100.0


#: What the recording keeps of a call's input: its shape, dtype and device.
Example = tuple[tuple[int, ...], torch.dtype, torch.device]
#: One recording at a time: patching a module's globals from two threads at once could leave a recorder in place.
_RECORDING = threading.Lock()


def _swin() -> Any:
    return sys.modules.get(SWIN_MODULE)


def written_functions() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The wrapped functions of a loaded torchvision with their writers (empty when it is not loaded)."""
    mod = _swin()
    if mod is None:
        return {}
    return {getattr(mod, name): fn for name, fn in _WRITERS.items() if callable(getattr(mod, name, None))}


def uses_written_functions(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is defined where the written-out functions are."""
    return _swin() is not None and any(type(m).__module__ == SWIN_MODULE for m in model.modules())


@contextmanager
def _recording(shapes: dict[Callable[..., Any], list[Example]]) -> Iterator[None]:
    mod = _swin()
    originals = {name: getattr(mod, name) for name in _WRITERS}

    def recorder(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            shapes.setdefault(fn, []).append((tuple(x.shape), x.dtype, x.device))
            return fn(x, *args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(mod, name, recorder(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(mod, name, fn)


def record_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[Callable[..., Any], list[Example]]:
    """The input shape, dtype and device of every call of a written-out function, in call order, from one run of
    ``model`` on ``inputs`` (without gradients, on clones). Empty when the model uses none or does not run."""
    shapes: dict[Callable[..., Any], list[Example]] = {}
    if not uses_written_functions(model):
        return shapes
    try:
        with _RECORDING, torch.no_grad(), _recording(shapes):
            model(*(x.clone() for x in inputs))
    except Exception:  # noqa: BLE001 - the trace and its check report a model that does not run
        return {}
    return shapes


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def region_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of shifted-window attention, ``[windows, tokens, tokens]``: after the cyclic shift
    each axis holds up to three regions (``[0, n - window)``, ``[n - window, n - shift)``, ``[n - shift, n)``);
    two tokens of one window from different regions get ``MASKED_LOGIT``, others 0."""
    def labels(n: int, w: int, s: int) -> torch.Tensor:
        i = torch.arange(n)
        return (i >= n - w).long() + (i >= n - s).long()

    (ph, pw), (wh, ww), (sh, sw) = padded, window, shift
    region = labels(ph, wh, sh)[:, None] * 3 + labels(pw, ww, sw)[None, :]
    region = region.reshape(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = region[:, :, None] != region[:, None, :]
    return torch.where(differ, MASKED_LOGIT, 0.0).to(dtype)


def window_attention(fn: Callable[..., Any], example: Example, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any | None:
    """``shifted_window_attention`` for an input of ``shape`` ``(B, H, W, C)``, in primitive ops (see the
    module docstring); None when the call is not one this reproduces."""
    shape, dtype, device = example
    a = _bind(fn, args, kwargs)
    if a is None or a["logit_scale"] is not None or len(shape) != 4:
        return None
    if a["training"] and (a["attention_dropout"] > 0 or a["dropout"] > 0):
        return None
    if any(int(v) < 0 for v in a["shift_size"]):
        return None  # torchvision shifts only when the sum is positive, and its mask's slices assume shifts >= 0
    b, h, w, c = shape
    (wh, ww), heads = (int(v) for v in a["window_size"]), int(a["num_heads"])
    ph, pw = h + (-h) % wh, w + (-w) % ww
    sh = 0 if wh >= ph else int(a["shift_size"][0])
    sw = 0 if ww >= pw else int(a["shift_size"][1])
    x = a["input"]
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, tokens = ph // wh, pw // ww, wh * ww
    windows = b * nh * nw
    x = x.reshape(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(windows, tokens, c)
    qkv = F.linear(x, a["qkv_weight"], a["qkv_bias"])
    qkv = qkv.reshape(windows, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1)) + a["relative_position_bias"]
    if sh or sw:
        mask = region_mask((ph, pw), (wh, ww), (sh, sw), dtype).to(device)
        logits = (logits.reshape(b, nh * nw, heads, tokens, tokens) + mask[None, :, None]).reshape(
            windows, heads, tokens, tokens)
    x = F.softmax(logits, dim=-1).matmul(v).transpose(1, 2).reshape(windows, tokens, c)
    x = F.linear(x, a["proj_weight"], a["proj_bias"])
    x = x.reshape(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x if (ph, pw) == (h, w) else x[:, :h, :w, :]


def patch_merging_pad(fn: Callable[..., Any], example: Example, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any | None:
    """``_patch_merging_pad`` for an input of ``shape`` ``(..., H, W, C)``: zero padding to even ``H`` and
    ``W``, then the entries at (even, even), (odd, even), (even, odd), (odd, odd) positions concatenated
    along channels."""
    shape = example[0]
    if len(args) != 1 or kwargs or len(shape) < 3:
        return None
    x = args[0]
    h, w = shape[-3], shape[-2]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


#: The torchvision functions written out (names in :data:`SWIN_MODULE`) and their writers.
_WRITERS: dict[str, Callable[..., Any]] = {"shifted_window_attention": window_attention,
                                           "_patch_merging_pad": patch_merging_pad}

__all__ = ["patch_merging_pad", "record_shapes", "region_mask", "window_attention", "written_functions"]
