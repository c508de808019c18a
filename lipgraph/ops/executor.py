"""Run an IR graph through the op table's forwards (the IR holds op names; the table holds what they do)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

from .registry import RULES


def execute(g: nx.DiGraph, *inputs: torch.Tensor, keep: bool = False) -> Any:
    """Run the IR on ``inputs``; returns the model output (same structure).

    With ``keep=True`` returns ``(output, values)`` where ``values`` maps every
    node name to its value (used by the lower-bound search and by tests).
    """
    names = g.graph["inputs"]
    if len(inputs) != len(names):
        raise ValueError(f"the model takes {len(names)} input(s), got {len(inputs)}")
    values: dict[str, Any] = dict(zip(names, inputs, strict=True))
    users_left = {n: g.out_degree(n) for n in g.nodes}
    result = None
    for name in g.graph["order"]:
        ir = g.nodes[name]["ir"]
        if ir.op == "input":
            continue
        rule = RULES.get(ir.op)
        if rule is None:
            raise KeyError(f"no rule to execute op {ir.op!r} of node {name!r}")
        args = [values[i] for i in ir.inputs]
        out = rule.forward(ir, *args)
        if ir.op == "output":
            result = out
        values[name] = out
        if not keep:
            for src in set(ir.inputs):
                users_left[src] -= 1
                if users_left[src] == 0 and src not in names:
                    values.pop(src, None)
    return (result, values) if keep else result
