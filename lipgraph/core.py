"""The leaf of lipgraph: what a number is, how it is written, and the settings of an analysis.

Nothing here imports anything from lipgraph; every other layer may import this module
(core <- ir <- ops/norms <- bounds <- analyze <- report <- render/cli).
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

INF = math.inf

#: Relative margin added to constants computed numerically in float64 (Gram eigenvalues,
#: Cholesky certificates) to cover floating-point rounding. Float64 LAPACK eigenvalues are
#: accurate to ~1e-15 relative; 1e-9 is ample.
ROUNDING_MARGIN = 1e-9


#: Significant digits a report keeps (:func:`round_outward`). Float64 BLAS/LAPACK results change in their last
#: bits with the thread count (the shared MNIST network: 24.299217445789672 with one thread, ...683 with two);
#: rounding every reported bound outward to 12 digits makes the report the same on any machine, and moves a
#: value by at most 1e-11 relative, far inside ``ROUNDING_MARGIN``.
REPORT_DIGITS = 12


def round_outward(x: float | None, up: bool, digits: int = REPORT_DIGITS) -> float | None:
    """``x`` rounded to ``digits`` significant digits towards ``+inf`` (``up``, for upper bounds) or ``-inf``
    (for attained values and lower ends), so an upper bound stays an upper bound and an attained value stays
    below what was attained. Exact: the decimal rounding is done on ``x``'s exact value, and the nearest
    float to a decimal at or above ``x`` is at or above ``x`` (``x`` itself is a float), and likewise below.
    Two values that differ in their last bits give the same result unless a 12-digit boundary falls
    between them (about one value in 1e4). ``None``, zeros and non-finite values are returned as they are."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    d = decimal.Decimal(x)
    exp = d.adjusted() - digits + 1
    step = decimal.Decimal(1).scaleb(exp)
    if float(d.quantize(step, rounding=decimal.ROUND_HALF_EVEN)) == x:
        return x  # already the float of a 12-digit decimal (so rounding again changes nothing)
    return float(d.quantize(step, rounding=decimal.ROUND_CEILING if up else decimal.ROUND_FLOOR))


class Status(StrEnum):
    """How a number was obtained, and so what it proves.

    ``EXACT``: the true value in closed form (up to rounding, accounted for).
    ``CERTIFIED``: a proven upper bound, floating-point rounding accounted for.
    ``ESTIMATE``: a numerical estimate (power method, greedy search): no proof either way.
    ``ATTAINED``: a value the model attains (a Jacobian norm or secant ratio): a lower bound.
    ``ASSUMED``: supplied by the user and not verified.
    ``NOT_LIPSCHITZ``: the op has no finite constant (a jump, an unbounded slope): ``inf``.
    ``NO_RULE``: lipgraph has no sound rule for the op (or for its parameters): ``inf``.
    """

    EXACT = "exact"
    CERTIFIED = "certified"
    ESTIMATE = "estimate"
    ATTAINED = "attained"
    ASSUMED = "assumed"
    NOT_LIPSCHITZ = "not-lipschitz"
    NO_RULE = "no-rule"

    @property
    def proven(self) -> bool:
        """True when an upper bound with this status is a proof (``inf`` is trivially one)."""
        return self in (Status.EXACT, Status.CERTIFIED, Status.NOT_LIPSCHITZ, Status.NO_RULE)


def l2_sum(values: Any) -> float:
    """``sqrt(sum_i v_i^2)`` without overflow: ``math.hypot`` scales, where squaring a bound above ~1.3e154
    overflowed to inf (regnet_y_400mf's head on a domain is 4.1e166, and its output node, the l2 combination
    of one such term, came out inf)."""
    return math.hypot(*values)


def serve_cheapest(costs: list[float], budget: float) -> tuple[set[int], float]:
    """The items a work budget serves, cheapest first (ties in the given order), each while the total stays
    within ``budget``: ``(their indices, the work they spend)``. A function of the costs only, so every run
    makes the same choices; the refinements' budgets (SeqLip, affine folding, the chain methods) use it."""
    served, spent = set(), 0.0
    for i in sorted(range(len(costs)), key=lambda i: (costs[i], i)):
        if spent + costs[i] <= budget:
            served.add(i)
            spent += costs[i]
    return served, spent


def strict_json(obj: Any) -> Any:
    """``obj`` with every float, at any depth of dicts, lists and tuples, made strict JSON by :func:`json_float`
    (the free-form ``details`` and ``segments`` of a report hold budgets and AutoLip values that may be ``inf``)."""
    if isinstance(obj, float):
        return json_float(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_float(x: float | None) -> float | str | None:
    """A float for strict JSON: non-finite values become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if x is None:
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return float(x)


def format_number(x: float | None, digits: int = 3, *, unicode_inf: bool = False, missing: str = "?") -> str:
    """The one float formatter: ``digits`` significant digits, scientific outside [1e-3, 1e4).

    ``2.59``, ``1.02e4``, ``inf`` (``∞`` with ``unicode_inf``); ``None`` and NaN print as ``missing``.
    Stable across machines (no locale, no platform repr).
    """
    if x is None or math.isnan(x):
        return missing
    if math.isinf(x):
        if unicode_inf:
            return "∞" if x > 0 else "-∞"
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        s = f"{x:.{digits}g}"
        if "e" not in s:
            return s
    mant, exp = f"{x:.{max(digits - 1, 0)}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


@dataclass
class Settings:
    """What a rule or a bound algorithm may use: the device, the norm effort, the seed and the work budgets.

    Budgets count work (iterations, explored nodes), never seconds, so the same model and settings
    give the same numbers on any machine at any load.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    power_iterations: int = 100
    seed: int = 0
    #: Per-neuron derivative intervals ``name -> (lo, hi)`` of the activations on an input domain (set by the
    #: domain analysis; ``None`` for a global analysis). SeqLip then maximises only over unstable neurons.
    neuron_slopes: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: The seed of the running analysis (:func:`seeded`; ``analyze`` and ``certify`` set it from their ``seed``).
_RUN_SEED = [0]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block, :func:`run_seed` adds ``seed``: every random start without a seed of its own (Lanczos
    and Rayleigh starts of certified norms, the trace's random probe, the interpolation structure check, an
    ONNX file's default example input) follows the analysis's ``seed``; seed 0 draws what it always drew.
    A plain variable, not a context variable: the norm code's worker threads read it too."""
    previous = _RUN_SEED[0]
    _RUN_SEED[0] = int(seed)
    try:
        yield
    finally:
        _RUN_SEED[0] = previous


def seeds_from_argument(fn: Any) -> Any:
    """Run ``fn`` within :func:`seeded` of its keyword argument ``seed`` (0 if not given)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with seeded(int(kwargs.get("seed", 0))):
            return fn(*args, **kwargs)

    return wrapper


def run_seed(base: int = 0) -> int:
    """``base`` plus the running analysis's seed (:func:`seeded`; 0 outside one)."""
    return int(base) + _RUN_SEED[0]


__all__ = ["INF", "ROUNDING_MARGIN", "Settings", "Status", "format_number", "json_float", "run_seed", "seeded",
           "seeds_from_argument", "serve_cheapest", "strict_json"]


def training_modes(model: Any) -> list[tuple[Any, bool]]:
    """Every submodule of an ``nn.Module`` with its training flag (empty for anything else), for
    :func:`restore_training_modes`: a model whose submodules are in mixed modes is given each one back."""
    return [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []


def restore_training_modes(modes: list[tuple[Any, bool]]) -> None:
    for m, flag in modes:
        m.training = flag
