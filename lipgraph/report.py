"""The analysis report: per-node constants, the bounds of each method, JSON.

JSON schema ``lipgraph.report/1`` (``Report.to_dict()``)::

    {
      "schema": "lipgraph.report/1",
      "model": str, "frontend": "torch.fx" | "onnx", "input_shapes": [[int]], "device": str,
      "upper": float | "inf",          # best upper bound on the l2 Lipschitz constant
      "certified": bool,               # "upper" is finite and every constant behind it is a proven bound
      "upper_method": str,             # which entry of "bounds" gave "upper"
      "lower": float | null,           # an attained value (empirical lower bound), if computed
      "bounds": {name: {"value", "certified", "method", "seconds", "details"}},
      "nodes": [{"name", "op", "source", "origin", "module_path", "in_shapes", "out_shape",
                 "local": float|"inf", "local_lower": float|null, "partials": [...],
                 "combine": "sum"|"l2", "certified": bool, "method": str, "reason": str|null,
                 "cumulative": float|"inf", "cumulative_certified": bool,   # AutoLip alone
                 "bound": float|"inf", "bound_certified": bool,             # every algorithm combined
                 "via": str}],                                              # which relation gave "bound"
      "segments": [{"nodes": [str], "autolip": float, "seqlip": float, "certified": bool, "method": str}],
      "modules": {module_path: {"value": float|"inf", "certified": bool, "nodes": int}},  # sub-DAG constants
      "not_lipschitz": [{"node": str, "reason": str}],
      "seconds": {"trace": float, "local": float, "autolip": float, ...},
      "domain": null | {"kind": "box"|"ball", ..., "description": str},  # the input domain, if any
      "global_upper": float | "inf"    # the best certified bound over all inputs
    }

With a domain, "upper" is the bound on the domain (the "domain:*" entries of "bounds"), "lower" is attained
inside it, and every node also has "domain_local", "domain_bound", "domain_certified", "domain_via",
"range" ([lo, hi]), "unstable" (share of an activation's neurons whose slope is not fixed) and
"domain_note".

Non-finite floats are written as the strings "inf" / "nan" so the file is
strict JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .core import format_number, json_float, round_outward, strict_json

SCHEMA = "lipgraph.report/1"
_UNDEFINED = "the computation gave an undefined value; reported as an uncertified inf"


jf = json_float


@dataclass
class BoundResult:
    """One method's bound on the whole model."""

    value: float
    certified: bool
    method: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = jf(self.value)
        return d


@dataclass
class NodeReport:
    name: str
    op: str
    source: str
    origin: str
    module_path: str
    in_shapes: list[Any]
    out_shape: Any
    local: float
    local_lower: float | None
    partials: list[float]
    combine: str
    certified: bool
    method: str
    reason: str | None
    cumulative: float
    cumulative_certified: bool
    bound: float = math.inf
    bound_certified: bool = False
    via: str = "autolip"
    seconds: float = 0.0
    # on an input domain (None for a global analysis): the node's constant and cumulative bound there, the
    # relation that won, the range of its value (smallest lower end, largest upper end), the share of
    # unstable neurons of an activation, and why the global rule stands where it does
    domain_local: float | None = None
    domain_bound: float | None = None
    domain_certified: bool = False
    domain_via: str | None = None
    range: list[float] | None = None
    unstable: float | None = None
    domain_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domain_local"] = jf(self.domain_local)
        d["domain_bound"] = jf(self.domain_bound)
        d["range"] = [jf(v) for v in self.range] if self.range is not None else None
        d["local"] = jf(self.local)
        d["local_lower"] = jf(self.local_lower)
        d["partials"] = [jf(p) for p in self.partials]
        d["cumulative"] = jf(self.cumulative)
        d["bound"] = jf(self.bound)
        d["in_shapes"] = [list(s) if isinstance(s, tuple) else s for s in self.in_shapes]
        return d


@dataclass
class Report:
    model: str
    frontend: str
    input_shapes: list[tuple[int, ...]]
    device: str
    bounds: dict[str, BoundResult]
    nodes: list[NodeReport]
    segments: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    lower: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    graph: Any = None  # the IR (networkx.DiGraph); not serialised
    #: the input domain (``Domain.to_dict()`` plus ``description``) for a domain analysis, else None (global)
    domain: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """No report holds a NaN: a NaN bound (0 * inf, a NaN weight that slipped through) becomes an
        uncertified inf, a NaN lower bound is dropped."""
        for b in self.bounds.values():
            if math.isnan(b.value):
                b.value, b.certified = math.inf, False
                b.details = {**b.details, "undefined": _UNDEFINED}
        for n in self.nodes:
            if any(math.isnan(v) for v in (n.local, n.cumulative, *n.partials)):
                n.certified = n.cumulative_certified = False
                n.reason = n.reason or _UNDEFINED
            n.partials = [math.inf if math.isnan(p) else p for p in n.partials]
            n.local = math.inf if math.isnan(n.local) else n.local
            n.cumulative = math.inf if math.isnan(n.cumulative) else n.cumulative
            if n.local_lower is not None and math.isnan(n.local_lower):
                n.local_lower = None
            for key in ("domain_local", "domain_bound"):
                if getattr(n, key) is not None and math.isnan(getattr(n, key)):
                    setattr(n, key, math.inf)
                    n.domain_certified = False
                    n.domain_note = n.domain_note or _UNDEFINED
            if n.range is not None:
                n.range = [-math.inf if math.isnan(n.range[0]) else n.range[0],
                           math.inf if math.isnan(n.range[1]) else n.range[1]]
        if self.lower is not None and math.isnan(self.lower):
            self.lower = None
        self._round_outward()

    def _round_outward(self) -> None:
        """Every reported number to ``REPORT_DIGITS`` significant digits, bounds up and attained values and
        range lower ends down (:func:`~lipgraph.core.round_outward`): each stays what it claims, and float64
        results that differ between thread counts in their last bits give the same report."""
        def up(x: float | None) -> float | None:
            return round_outward(x, True)

        for b in self.bounds.values():
            b.value = up(b.value)
        for n in self.nodes:
            n.local, n.cumulative, n.bound = up(n.local), up(n.cumulative), up(n.bound)
            n.partials = [up(v) for v in n.partials]
            n.domain_local, n.domain_bound = up(n.domain_local), up(n.domain_bound)
            n.local_lower = round_outward(n.local_lower, False)
            if n.range is not None:
                n.range = [round_outward(n.range[0], False), up(n.range[1])]
        for m in self.modules.values():
            m["value"] = up(m["value"])
        for seg in self.segments:
            for key in ("autolip", "seqlip"):
                if isinstance(seg.get(key), float):
                    seg[key] = up(seg[key])
        self.lower = round_outward(self.lower, False)

    @property
    def best(self) -> tuple[str, BoundResult] | None:
        """The tightest certified bound if any is finite, else the tightest of all."""
        if not self.bounds:
            return None
        items = sorted(self.bounds.items(), key=lambda kv: (not kv[1].certified, kv[1].value))
        cert = [kv for kv in items if kv[1].certified and math.isfinite(kv[1].value)]
        if cert:
            return cert[0]
        return min(self.bounds.items(), key=lambda kv: (kv[1].value, not kv[1].certified))

    @property
    def global_upper(self) -> float:
        """The best certified bound over all inputs (the domain's bounds left out)."""
        cert = [b.value for k, b in self.bounds.items() if not k.startswith("domain:") and b.certified]
        return min(cert) if cert else math.inf

    @property
    def upper(self) -> float:
        b = self.best
        return b[1].value if b else math.inf

    @property
    def certified(self) -> bool:
        """A proven *finite* bound: an infinite upper bound is "not bounded", never "certified"."""
        b = self.best
        return bool(b and b[1].certified and math.isfinite(b[1].value))

    @property
    def not_lipschitz(self) -> list[dict[str, str]]:
        return [{"node": n.name, "reason": n.reason or ""} for n in self.nodes if math.isinf(n.local)]

    def subgraph_constant(self, members: Iterable[str]) -> tuple[float, bool]:
        """The constant of the sub-DAG ``members`` (external inputs at 1, constants at 0, exits combined in l2)
        from the per-node constants of this report, by the one combinator; a module's is stored in
        :attr:`modules` already."""
        from .bounds.relations import subgraph_constant  # noqa: PLC0415
        from .ops import LocalConstant  # noqa: PLC0415

        g = self.graph
        mset = set(members)
        local = {}
        for r in self.nodes:
            if r.name in mset:
                ins = g.nodes[r.name]["ir"].inputs
                partials = list(r.partials) if len(r.partials) == len(ins) else [r.local] * len(ins)
                local[r.name] = LocalConstant(partials, r.certified, r.method, r.combine)
        c = subgraph_constant(g, local, mset)
        return c.value, c.certified

    def node(self, name: str) -> NodeReport:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        b = self.best
        return {
            "schema": SCHEMA,
            "model": self.model,
            "frontend": self.frontend,
            "input_shapes": [list(s) for s in self.input_shapes],
            "device": self.device,
            "upper": jf(self.upper),
            "certified": self.certified,
            "upper_method": b[0] if b else None,
            "lower": jf(self.lower),
            "bounds": {k: v.to_dict() for k, v in self.bounds.items()},
            "nodes": [n.to_dict() for n in self.nodes],
            "segments": self.segments,
            "modules": {k: {**v, "value": jf(v["value"])} for k, v in self.modules.items()},
            "not_lipschitz": self.not_lipschitz,
            "seconds": self.seconds,
            "domain": self.domain,
            "global_upper": jf(self.global_upper),
        }

    def to_json(self, indent: int | None = 2) -> str:
        # strict JSON: no Infinity / NaN tokens anywhere, free-form details included
        return json.dumps(strict_json(self.to_dict()), indent=indent, default=str, allow_nan=False)

    def summary(self) -> str:
        """Totals as a few readable lines."""
        lines = [f"model {self.model} ({self.frontend}), input {', '.join(map(str, self.input_shapes))}"]
        if self.domain is not None:
            lines.append(f"on the input domain: {self.domain['description']}")
        for name, b in self.bounds.items():
            tag = "not bounded" if math.isinf(b.value) else "certified" if b.certified else "estimate"
            lines.append(f"  {name:<16} {fmt(b.value):>12}  {tag:<9}  ({b.method}, {b.seconds:.2f}s)")
        if self.lower is not None:
            lines.append(f"  {'lower':<16} {fmt(self.lower):>12}  attained  (Jacobian / secant ascent)")
        lo = fmt(self.lower) if self.lower is not None else "?"
        tag = "not bounded" if math.isinf(self.upper) else "certified" if self.certified else "NOT certified"
        where = " on the domain" if self.domain is not None else ""
        lines.append(f"Lipschitz constant{where} in [{lo}, {fmt(self.upper)}]  ({tag})")
        for item in self.not_lipschitz[:10]:
            lines.append(f"  inf at {item['node']}: {item['reason']}")
        return "\n".join(lines)

    def table(self, max_rows: int | None = None) -> str:
        """A per-node table: op, source, output shape, local constant, cumulative bound."""
        head = f"{'node':<28} {'op':<18} {'source':<28} {'out shape':<20} {'local':>11} {'cumul.':>11}  how"
        rows = [head, "-" * len(head)]
        shown = self.nodes if max_rows is None else self.nodes[:max_rows]
        for n in shown:
            mark = "" if n.certified else "~"
            rows.append(
                f"{n.name[:28]:<28} {n.op[:18]:<18} {n.source[:28]:<28} {str(_shape(n.out_shape))[:20]:<20} "
                f"{mark + fmt(n.local):>11} {fmt(n.cumulative):>11}  {n.method}"
            )
        if max_rows is not None and len(self.nodes) > max_rows:
            rows.append(f"... {len(self.nodes) - max_rows} more nodes")
        rows.append("(~ marks an estimate, not a certified bound)")
        return "\n".join(rows)


def _shape(s: Any) -> Any:
    return tuple(s) if isinstance(s, (list, tuple)) and all(isinstance(x, int) for x in s) else s


def fmt(x: float | None) -> str:
    """A number in a report's text: :func:`~lipgraph.core.format_number` with four digits, ``-`` for none."""
    return format_number(x, 4, missing="-")
