"""Refusing non-finite values (issue 15): a NaN or inf in a weight, a statistic, an initializer or the
example input makes every bound meaningless (NaN compares false with everything), so both frontends stop
with one :class:`~lipgraph.errors.LipgraphError` naming the tensor."""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import torch

from .. import ir
from ..errors import InputShapeError, LipgraphError

#: Ops whose constant tensors may hold +-inf on purpose: additive masks (-inf before a softmax), clamp bounds.
_INF_ALLOWED = frozenset({"constant", "add", "hardtanh"})


def describe(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return " and ".join(p for p in parts if p) + f" of {t.numel()} entries"


def bad(t: object, *, allow_inf: bool = False) -> bool:
    """Whether ``t`` is a float tensor holding NaN (or inf, unless ``allow_inf``)."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
        return False
    if allow_inf:
        return bool(torch.isnan(t).any())
    return not bool(torch.isfinite(t).all())


def check_inputs(xs: Iterable[torch.Tensor], names: Iterable[str]) -> None:
    for x, name in zip(xs, names, strict=False):
        if bad(x):
            raise InputShapeError(f"the example input {name!r} is not finite ({describe(x)}): give a finite input")


def check_graph(g: nx.DiGraph, error: type[LipgraphError] = LipgraphError) -> None:
    """Every parameter of every IR node is finite (inf allowed only in masks and clamp bounds)."""
    for n in ir.nodes(g):
        for key, t in n.params.items():
            if bad(t, allow_inf=n.op in _INF_ALLOWED):
                raise error(
                    f"tensor {key!r} of node {n.name!r} ({n.origin} at {n.source}) is not finite ({describe(t)}): "
                    "no bound can be computed from a NaN or infinite weight or statistic"
                )
