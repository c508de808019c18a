"""Input domains and value ranges: the sets a local analysis bounds the constant on.

A *domain* is a convex set of inputs: :class:`Box` (``lo <= x <= hi`` elementwise),
:class:`Ball` (``||x - center|| <= radius`` in the l2 or l_inf norm), optionally intersected with a
box (``Ball(..., clip=(0, 1))``). Convexity is what makes a bound on ``sup_{x in D} ||J(x)||`` a
Lipschitz constant on ``D``: the segment between two points of ``D`` stays in ``D`` (mean value
theorem, Clarke's generalised Jacobian at the kinks of piecewise-smooth maps).

A :class:`Range` is an elementwise enclosure ``lo <= v <= hi`` of a node's value over the domain
(float64, rounded outward by the rule that made it). This module is part of the core layer: it
imports nothing from lipgraph but :mod:`lipgraph.core`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .core import ROUNDING_MARGIN

_DT = torch.float64


@dataclass(frozen=True)
class Range:
    """``lo <= value <= hi`` elementwise (float64 tensors of the value's shape)."""

    lo: torch.Tensor
    hi: torch.Tensor

    @staticmethod
    def point(x: torch.Tensor) -> Range:
        x = x.detach().to(_DT)
        return Range(x, x)

    @property
    def mid(self) -> torch.Tensor:
        return 0.5 * (self.lo + self.hi)

    @property
    def rad(self) -> torch.Tensor:
        return 0.5 * (self.hi - self.lo)

    @property
    def abs_max(self) -> torch.Tensor:
        """``max |v|`` elementwise over the range."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def abs_min(self) -> torch.Tensor:
        """``min |v|`` elementwise over the range (0 where it contains 0)."""
        return torch.where((self.lo <= 0) & (self.hi >= 0), torch.zeros_like(self.lo),
                           torch.minimum(self.lo.abs(), self.hi.abs()))

    def widened(self, magnitude: torch.Tensor | float | None = None, margin: float = ROUNDING_MARGIN) -> Range:
        """Rounded outward by ``margin * magnitude`` (default: the larger endpoint's size), plus the
        smallest normal float64 so that a zero-width range of a rounded value still widens."""
        mag = self.abs_max if magnitude is None else magnitude
        eps = margin * mag + 2.2250738585072014e-308
        return Range(self.lo - eps, self.hi + eps)

    def contains(self, x: torch.Tensor, tol: float = 0.0) -> bool:
        x = x.detach().to(_DT)
        return bool(((x >= self.lo - tol) & (x <= self.hi + tol)).all())

    def summary(self) -> dict[str, float]:
        """The smallest lower end and the largest upper end (for reports)."""
        return {"lo": float(self.lo.min()) if self.lo.numel() else 0.0,
                "hi": float(self.hi.max()) if self.hi.numel() else 0.0}


def _as_tensor(v: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    t = v.detach().to(_DT) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=_DT)
    if like is not None:
        t = torch.broadcast_to(t, like.shape).clone()
    return t


class Domain:
    """A convex set of inputs (the base contract).

    ``enclosure(x)``: the tightest elementwise box ``[lo, hi]`` containing the domain, for an input
    shaped like ``x``. ``linear_range(a, c)``: for each row ``a_i`` of ``a`` (rows act on the flattened
    input), bounds of ``a_i . x`` over the domain (exact for boxes and balls; for an intersection the
    tighter of the two). ``project(x)``: a point of the domain (the search for attained values stays
    inside). ``sample(n, like, generator)``: ``n`` points of the domain. ``to_dict()``/``describe()``:
    what reports print.
    """

    def enclosure(self, x: torch.Tensor) -> Range:
        raise NotImplementedError

    def linear_range(self, a: torch.Tensor, x: torch.Tensor) -> Range:
        box = self.enclosure(x)
        c, r = box.mid.reshape(-1), box.rad.reshape(-1)
        return _linear_on_box(a, c, r)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """A point of the domain to start searches from."""
        return self.enclosure(x).mid

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _linear_on_box(a: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> Range:
    """``a x`` over the box ``|x - c| <= r``: ``a c -+ |a| r``, rounded outward by ``|a|(|c| + r)``."""
    a = a.to(_DT)
    mid = a @ c
    rad = a.abs() @ r
    err = ROUNDING_MARGIN * (a.abs() @ (c.abs() + r))
    return Range(mid - rad - err, mid + rad + err)


def _short(t: torch.Tensor) -> str:
    if t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return f"{float(t.reshape(-1)[0]):g}"
    return f"tensor{tuple(t.shape)} in [{float(t.min()):g}, {float(t.max()):g}]"


class Box(Domain):
    """``lo <= x <= hi`` elementwise; ``lo``/``hi`` scalars or tensors broadcastable to the input."""

    def __init__(self, lo: Any, hi: Any) -> None:
        self.lo = _as_tensor(lo)
        self.hi = _as_tensor(hi)
        if not (torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all()):
            raise ValueError("a Box needs finite bounds")
        if bool((self.lo > self.hi).any()):
            raise ValueError("a Box needs lo <= hi everywhere")

    def enclosure(self, x: torch.Tensor) -> Range:
        return Range(torch.broadcast_to(self.lo, x.shape).clone(), torch.broadcast_to(self.hi, x.shape).clone())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo.to(x.dtype).to(x.device), self.hi.to(x.dtype).to(x.device))

    def sample(self, n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        e = self.enclosure(like)
        u = torch.rand((n, *like.shape), generator=generator, dtype=_DT)
        return e.lo + u * (e.hi - e.lo)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "box", "lo": _short(self.lo), "hi": _short(self.hi)}

    def describe(self) -> str:
        return f"box [{_short(self.lo)}, {_short(self.hi)}]"


class Ball(Domain):
    """``||x - center|| <= radius`` in ``norm`` (``"l2"`` or ``"linf"``), intersected with the box
    ``clip = (lo, hi)`` when given (the center must lie in that box)."""

    def __init__(self, center: torch.Tensor, radius: float, norm: str = "l2",
                 clip: tuple[Any, Any] | Box | None = None) -> None:
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', not {norm!r}")
        radius = float(radius)
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius must be finite and >= 0, not {radius}")
        self.center_point = _as_tensor(center)
        if not bool(torch.isfinite(self.center_point).all()):
            raise ValueError("the ball's center has non-finite entries")
        self.radius = radius
        self.norm = norm
        self.clip = clip if isinstance(clip, Box) or clip is None else Box(*clip)
        if self.clip is not None and not bool(
                ((self.center_point >= self.clip.lo) & (self.center_point <= self.clip.hi)).all()):
            raise ValueError("the ball's center lies outside its clip box")

    @staticmethod
    def batch(centers: torch.Tensor, radius: float, norm: str = "l2",
              clip: tuple[Any, Any] | Box | None = None) -> list[Ball]:
        """One ball per row of ``centers`` (shape ``(B, ...)``), e.g. around a batch of test points; each
        center gets a leading batch dimension of 1 (``centers[i:i+1]``) to match a model's example input."""
        return [Ball(centers[i:i + 1], radius, norm, clip) for i in range(centers.shape[0])]

    def _c(self, x: torch.Tensor) -> torch.Tensor:
        if self.center_point.numel() != x.numel():
            raise ValueError(f"the ball's center has {self.center_point.numel()} entries, the input {x.numel()}")
        return self.center_point.reshape(x.shape)

    def enclosure(self, x: torch.Tensor) -> Range:
        c = self._c(x)
        r = torch.full_like(c, self.radius)
        box = Range(c - r, c + r)
        if self.clip is not None:
            clip = self.clip.enclosure(x)
            box = Range(torch.maximum(box.lo, clip.lo), torch.minimum(box.hi, clip.hi))
        return box

    def linear_range(self, a: torch.Tensor, x: torch.Tensor) -> Range:
        box = self.enclosure(x)
        out = _linear_on_box(a, box.mid.reshape(-1), box.rad.reshape(-1))
        if self.norm == "l2":
            c = self._c(x).reshape(-1)
            a64 = a.to(_DT)
            mid = a64 @ c
            rad = self.radius * torch.linalg.vector_norm(a64, dim=1) * (1 + ROUNDING_MARGIN)
            err = ROUNDING_MARGIN * (a64.abs() @ c.abs())
            out = Range(torch.maximum(out.lo, mid - rad - err), torch.minimum(out.hi, mid + rad + err))
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        c = self._c(x).to(x.dtype).to(x.device)
        d = x - c
        if self.norm == "linf":
            d = d.clamp(-self.radius, self.radius)
        else:
            n = float(d.norm())
            if n > self.radius:
                d = d * (self.radius / n) * (1 - 1e-12)
        y = c + d
        # clamping toward a box that contains the center only shrinks |y - c|: the result is in both sets
        return self.clip.project(y) if self.clip is not None else y

    def center(self, x: torch.Tensor) -> torch.Tensor:
        return self._c(x).clone()

    def sample(self, n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self._c(like)
        if self.norm == "linf":
            d = (2 * torch.rand((n, *like.shape), generator=generator, dtype=_DT) - 1) * self.radius
        else:
            d = torch.randn((n, *like.shape), generator=generator, dtype=_DT)
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(-1, *([1] * like.dim()))
            u = torch.rand(n, generator=generator, dtype=_DT) ** (1.0 / max(like.numel(), 1))
            d = d * (self.radius * u).reshape(-1, *([1] * like.dim()))
        y = c + d
        if self.clip is not None:
            e = self.clip.enclosure(like)
            y = torch.maximum(torch.minimum(y, e.hi), e.lo)
        return y

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "ball", "norm": self.norm, "radius": self.radius,
                               "center": _short(self.center_point)}
        if self.clip is not None:
            out["clip"] = self.clip.to_dict()
        return out

    def describe(self) -> str:
        s = f"{self.norm} ball of radius {self.radius:g} around {_short(self.center_point)}"
        if self.clip is not None:
            s += f", within {self.clip.describe()}"
        return s


def parse_box(text: str) -> Box:
    """``"box:0,1"`` or ``"0,1"`` -> ``Box(0, 1)`` (the CLI's ``--domain``)."""
    body = text.split(":", 1)[1] if text.startswith("box:") else text
    parts = body.split(",")
    if len(parts) != 2:
        raise ValueError(f"a box is written box:LO,HI (e.g. box:0,1), not {text!r}")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"a box is written box:LO,HI with two numbers, not {text!r}") from None
    return Box(lo, hi)


__all__ = ["Ball", "Box", "Domain", "Range", "parse_box"]
