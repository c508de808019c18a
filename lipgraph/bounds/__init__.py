"""Bound algorithms over the IR.

Each algorithm is one module with ``run(graph, local, settings) -> AlgorithmResult`` (the contract in
:mod:`lipgraph.bounds.relations`); :data:`METHODS` names them. :func:`lipgraph.bounds.relations.combine`
joins the relations of any set of them into every node's cumulative bound.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A bound algorithm: the module that implements ``run`` and what it does, in one line."""

    name: str
    module: str
    doc: str
    default: bool = True
    #: The algorithm reads the input domain (``Settings.neuron_slopes``, ``Settings.extra["ranges"]``): with a
    #: domain it runs again on the domain's constants. Others' relations hold everywhere, so on the domain too.
    uses_domain: bool = False
    #: The module's function that runs the algorithm.
    function: str = "run"
    #: With a domain, the algorithm reads the domain pass's constants and ranges (so it reruns when they move);
    #: False for one that reads only the graph and the domain (it runs once per domain).
    reads_constants: bool = True

    def runner(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.function)


#: The bound algorithms, in the order they run. ``default`` ones run when ``analyze(method="auto")``.
METHODS: dict[str, Method] = {}


def register_method(name: str, module: str, doc: str, *, default: bool = True, replace: bool = False,
                    uses_domain: bool = False, function: str = "run", reads_constants: bool = True) -> Method:
    """Add a bound algorithm: ``module`` (importable path) defines ``function(graph, local, settings)``
    (``run`` unless named)."""
    if name in METHODS and not replace:
        raise ValueError(f"a bound algorithm named {name!r} is already registered (pass replace=True)")
    METHODS[name] = m = Method(name, module, doc, default, uses_domain, function, reads_constants)
    return m


register_method("autolip", "lipgraph.bounds.autolip", "AutoLip: product/sum of per-node constants over the DAG")
register_method("seqlip", "lipgraph.bounds.seqlip",
                "SeqLip on single-entry single-exit linear chains (exact / branch-and-bound inner maxima)",
                uses_domain=True)
register_method("affine", "lipgraph.bounds.affine",
                "maximal affine regions folded into single operators (sum_e ||J_e|| L(e) at exits)")
register_method("combettes-pesquet", "lipgraph.bounds.combettes_pesquet",
                "Combettes-Pesquet bound on linear-chain segments (exact O(depth^2) programme, certified; neurons "
                "dead on a domain dropped)", uses_domain=True)
register_method("eclipse-fast", "lipgraph.bounds.eclipse_fast",
                "ECLipsE-Fast on linear-chain segments (closed form, every PSD step proven by Cholesky; per-neuron "
                "slope intervals on a domain)", uses_domain=True)
register_method("lipsdp", "lipgraph.bounds.chain_sdp",
                "LipSDP-Neuron on linear-chain segments (structured interior point, overlapping windows on deep "
                "chains; multipliers re-checked in float64; per-neuron slope intervals on a domain)",
                uses_domain=True)
register_method("lipsdp-cvxpy", "lipgraph.bounds.sdp_cvxpy",
                "LipSDP-Neuron in its published form through cvxpy/CVXOPT, re-checked (needs lipgraph[sdp])",
                default=False, function="run_lipsdp")
register_method("eclipse-cvxpy", "lipgraph.bounds.sdp_cvxpy",
                "ECLipsE's layer-wise SDPs through cvxpy/CVXOPT, re-checked (needs lipgraph[sdp])",
                default=False, function="run_eclipse")
register_method("jacobian-interval", "lipgraph.bounds.jacobian_interval",
                "interval Jacobian on an input domain: ||Jc|| + ||Jr|| of an enclosure of every node's Jacobian "
                "(needs a domain; nothing in a global analysis)", uses_domain=True)
register_method("taylor", "lipgraph.bounds.taylor",
                "second-order Taylor models of every node's Jacobian on the l2 ball around the domain's center: "
                "||J(c)|| + rho ||d2v(c)|| + rho^2/2 ||d3v(c)|| + remainder, the remainder carried by the chain "
                "rule with the domain's constants and seeded tangents (inputs of at most 44 entries; needs a "
                "domain)", uses_domain=True)

__all__ = ["METHODS", "Method", "register_method"]
