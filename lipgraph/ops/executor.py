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


class IRModule(torch.nn.Module):
    """An IR graph as an ``nn.Module`` for evaluation and gradients (margins, attacks), not for tracing.

    The IR's shapes are those of its example input, so a batch is run one row at a time: ``forward(x)`` with
    ``x`` of shape ``(N, ...)`` runs :func:`execute` on each ``x[i:i+1]`` (the example's batch of 1) and
    concatenates the outputs along dim 0. Single-input, single-tensor-output graphs only.
    """

    def __init__(self, g: nx.DiGraph) -> None:
        super().__init__()
        if len(g.graph["inputs"]) != 1:
            raise ValueError(f"IRModule runs single-input graphs; this one takes {len(g.graph['inputs'])}")
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [execute(self.g, x[i:i + 1]) for i in range(x.shape[0])]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError("IRModule needs a graph with a single tensor output")
        return torch.cat(outs, dim=0)
