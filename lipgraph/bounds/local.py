"""Pass: compute every node's local constant from the op table (or the user's constants)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import networkx as nx

from .. import ir, norms
from ..errors import LipgraphError
from ..ops import RULES, LocalConstant, Settings


@dataclass(frozen=True)
class UserConstant:
    """A Lipschitz constant supplied by the user for a module or node.

    ``certified=True`` states that the user holds a proof; otherwise the value
    is reported as an unverified assumption and anything built on it is not
    certified.
    """

    value: float
    certified: bool = False


def check_constants(constants: Mapping[str, float | UserConstant] | None) -> None:
    """Each user constant is a finite number >= 0 under a string key (one :class:`LipgraphError` naming the key)."""
    if constants is None:
        return
    if not isinstance(constants, Mapping):
        raise LipgraphError(f"constants must be a mapping of name -> number, not {type(constants).__name__}")
    for key, v in constants.items():
        if not isinstance(key, str) or not key:
            raise LipgraphError(f"constants key {key!r}: must be a module path, class name or node name (a string)")
        value = v.value if isinstance(v, UserConstant) else v
        if isinstance(v, UserConstant) and not isinstance(v.certified, bool):
            raise LipgraphError(f"constants[{key!r}]: certified must be True or False, not {v.certified!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise LipgraphError(f"constants[{key!r}] = {value!r}: a Lipschitz constant must be a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise LipgraphError(f"constants[{key!r}] = {value!r}: a Lipschitz constant must be a number") from None
        if not math.isfinite(f) or f < 0:
            raise LipgraphError(f"constants[{key!r}] = {value!r}: a Lipschitz constant must be finite and >= 0")


def unmatched_constants(g: nx.DiGraph, constants: Mapping[str, float | UserConstant] | None) -> list[str]:
    """The keys of ``constants`` that match no node name, source, module path or class of ``g``."""
    if not constants:
        return []
    seen: set[str] = set()
    for n in ir.nodes(g):
        if n.op in ("input", "output", "constant"):
            continue
        seen.update(k for k in (n.name, n.source, n.attrs.get("module_path", ""), n.origin) if k)
    return [k for k in constants if k not in seen]


def _match(n: ir.IRNode, constants: Mapping[str, float | UserConstant]) -> float | UserConstant | None:
    for key in (n.name, n.source, n.attrs.get("module_path", ""), n.origin):
        if key and key in constants:
            return constants[key]
    return None


def local_constants(
    g: nx.DiGraph,
    ctx: Settings,
    constants: Mapping[str, float | UserConstant] | None = None,
    progress: Callable[[int, int, ir.IRNode], None] | None = None,
) -> dict[str, tuple[LocalConstant, float]]:
    """name -> (LocalConstant, seconds) for every node, in graph order."""
    constants = constants or {}
    out: dict[str, tuple[LocalConstant, float]] = {}
    order = list(ir.nodes(g))
    try:
        _run_rules(order, ctx, constants, progress, out)
    finally:
        norms.release_scratch()
    return out


def _run_rules(order: list[ir.IRNode], ctx: Settings, constants: Mapping[str, float | UserConstant],
               progress: Callable[[int, int, ir.IRNode], None] | None,
               out: dict[str, tuple[LocalConstant, float]]) -> None:
    for i, n in enumerate(order):
        t0 = time.perf_counter()
        user = _match(n, constants) if n.op not in ("input", "output", "constant") else None
        if user is not None:
            uc = user if isinstance(user, UserConstant) else UserConstant(float(user))
            lc = LocalConstant([float(uc.value)] * len(n.inputs), uc.certified, "user-supplied",
                               reason=None if uc.certified else "user-supplied constant, not verified")
        else:
            rule = RULES.get(n.op)
            if rule is None:
                lc = LocalConstant([math.inf] * len(n.inputs), True, "no-rule",
                                   reason=f"no rule for op {n.op!r} at node {n.name!r} ({n.source})")
            else:
                lc = rule.lipschitz(n, ctx)
        out[n.name] = (lc, time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, len(order), n)
