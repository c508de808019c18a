"""The one table of op rules.

Every canonical op kind of the IR has exactly one :class:`OpRule`. A rule knows
how to *run* the op (so the IR is executable) and how to bound it (its partial
Lipschitz constants with respect to each input, in the l2 norm). Adding an op
touches one place: define a rule and decorate it with :func:`register_rule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import INF, Settings, json_float, l2_sum


@dataclass
class LocalConstant:
    """A node's Lipschitz behaviour with respect to its tensor inputs.

    ``partials[i]`` bounds ``sup ||d_i f||_2``, the Lipschitz constant of the op
    in its i-th input with the others fixed. ``combine`` says how partials
    compose with the inputs' own constants in AutoLip:

    * ``"sum"``: ``L = sum_i partials[i] * L_i`` (add, sub, any op: triangle inequality),
    * ``"l2"``:  ``L = sqrt(sum_i (partials[i] * L_i)^2)`` (concatenation / stack:
      the outputs occupy disjoint coordinates).

    ``certified`` is true only when every partial is a proven upper bound (up
    to :data:`ROUNDING_MARGIN`). ``lower`` optionally carries a value known to
    be attained or estimated from below (e.g. power method), for intervals.
    """

    partials: list[float]
    certified: bool
    method: str
    combine: str = "sum"
    reason: str | None = None
    lower: float | None = None

    @property
    def value(self) -> float:
        """The node's own constant as a map of all its inputs jointly."""
        if not self.partials:
            return 0.0
        if self.combine == "l2":
            return l2_sum(self.partials)
        return sum(self.partials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "partials": [json_float(p) for p in self.partials],
            "value": json_float(self.value),
            "certified": self.certified,
            "method": self.method,
            "combine": self.combine,
            "reason": self.reason,
            "lower": json_float(self.lower) if self.lower is not None else None,
        }


def exact(value: float, method: str, n_inputs: int = 1, combine: str = "sum") -> LocalConstant:
    """A constant known in closed form: certified, every partial equal to ``value``."""
    return LocalConstant([float(value)] * n_inputs, True, method, combine, lower=float(value))


def not_lipschitz(reason: str, n_inputs: int = 1) -> LocalConstant:
    """An honest ``inf``: the op has no finite global Lipschitz constant (or no sound rule)."""
    return LocalConstant([INF] * n_inputs, True, "not-lipschitz", reason=reason)


@dataclass(frozen=True)
class OpRule:
    """One op kind: how to run it and how to bound it.

    ``forward(node, *inputs)`` evaluates the op on tensors (``node`` gives attrs
    and params). ``lipschitz(node, ctx)`` returns a :class:`LocalConstant`.
    ``slope`` is, for elementwise activations, the interval containing every
    derivative (used by SeqLip); ``None`` for other ops. ``affine`` marks ops
    that are affine maps of their variable inputs (used to find linear chains
    and affine regions). ``doc`` is the rule's formula, shown in reports. ``torch_functions``,
    ``torch_modules`` and ``onnx_ops`` are spellings of a *unary* op (one tensor in, no attributes) that the fx and ONNX
    frontends map to this kind by reading the registry, so a new elementwise op needs no frontend edit.

    Input-domain capabilities (all optional; see :mod:`lipgraph.bounds.ranges` and
    :mod:`lipgraph.bounds.on_domain`):

    * ``ranges(node, *input_ranges) -> Range`` (a tuple of ranges for tuple-valued ops): an elementwise
      enclosure of the output given enclosures of the inputs (:class:`lipgraph.domains.Range`, float64),
      rounded outward. ``monotone=True`` instead declares the op nondecreasing in every input, so
      ``[forward(lo), forward(hi)]`` is its range (widened for rounding by the pass).
    * ``neuron_slopes(node, input_range) -> (lo, hi)``: for an elementwise activation, tensors of the
      input's shape holding an interval that contains every derivative (Clarke derivative at kinks) on
      the input range; a provably active or dead ReLU gets an exact slope.
    * ``local(node, input_ranges, settings) -> LocalConstant | None``: the op's constant on the input
      ranges (partials bound ``sup ||d_i f||`` over the ranges). ``None`` keeps the global rule.

    An op without ``ranges``/``monotone`` makes every node downstream fall back to its global rule.
    """

    kind: str
    forward: Callable[..., Any]
    lipschitz: Callable[[Any, Settings], LocalConstant]
    slope: tuple[float, float] | None = None
    affine: bool = False
    doc: str = ""
    torch_functions: tuple[Callable[..., Any], ...] = ()
    onnx_ops: tuple[str, ...] = ()
    torch_modules: tuple[type, ...] = ()
    ranges: Callable[..., Any] | None = None
    monotone: bool = False
    local: Callable[..., LocalConstant | None] | None = None
    neuron_slopes: Callable[..., Any] | None = None


RULES: dict[str, OpRule] = {}


def register_rule(
    kind: str,
    forward: Callable[..., Any],
    lipschitz: Callable[[Any, Settings], LocalConstant] | None = None,
    *,
    slope: tuple[float, float] | None = None,
    affine: bool = False,
    doc: str | None = None,
    replace: bool = False,
    torch_functions: tuple[Callable[..., Any], ...] = (),
    onnx_ops: tuple[str, ...] = (),
    torch_modules: tuple[type, ...] = (),
    ranges: Callable[..., Any] | None = None,
    monotone: bool = False,
    local: Callable[..., LocalConstant | None] | None = None,
    neuron_slopes: Callable[..., Any] | None = None,
) -> OpRule:
    """Register the rule for op ``kind``; the single entry point for new ops.

    ``lipschitz`` may be omitted for an elementwise op with a ``slope``
    interval, whose constant is then ``max(|a|, |b|)``.
    """
    if kind in RULES and not replace:
        raise ValueError(f"an op rule for {kind!r} is already registered (pass replace=True)")
    if lipschitz is None:
        if slope is None:
            raise ValueError("a rule needs either a lipschitz function or a slope interval")
        bound = max(abs(slope[0]), abs(slope[1]))

        def lipschitz(node: Any, ctx: Settings, _b: float = bound) -> LocalConstant:
            return exact(_b, "slope-bound")

    rule = OpRule(kind, forward, lipschitz, slope, affine, doc if doc is not None else (lipschitz.__doc__ or ""),
                  tuple(torch_functions), tuple(onnx_ops), tuple(torch_modules), ranges, monotone, local,
                  neuron_slopes)
    RULES[kind] = rule
    return rule


def kind_spelled(*, torch_function: Any = None, onnx_op: str | None = None,
                 torch_module: type | None = None) -> str | None:
    """The op kind whose rule declares this unary spelling (a torch callable seen by fx as a call target,
    an ``nn.Module`` type, or an ONNX op type), if any."""
    for rule in RULES.values():
        if (
            (torch_function is not None and any(torch_function is f for f in rule.torch_functions))
            or (onnx_op is not None and onnx_op in rule.onnx_ops)
            or (torch_module is not None and torch_module in rule.torch_modules)
        ):
            return rule.kind
    return None


def module_spellings() -> tuple[type, ...]:
    """Every ``nn.Module`` type declared by a rule (the fx tracer keeps them as leaves)."""
    return tuple(t for rule in RULES.values() for t in rule.torch_modules)


def torch_spellings() -> tuple[Callable[..., Any], ...]:
    """Every torch callable declared by a rule (the fx tracer keeps them as leaves)."""
    return tuple(f for rule in RULES.values() for f in rule.torch_functions)


def get_rule(kind: str) -> OpRule | None:
    return RULES.get(kind)


def as_tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1 and n > 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(x) for x in v)
    return tuple(int(v) for _ in range(n))

