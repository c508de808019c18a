"""Dense weight matrices and slope intervals of a linear-chain segment, for the chain bounds.

:func:`segment_mats` turns a :class:`~lipgraph.bounds.chains.Segment` ``G_0 s_0 G_1 ... G_k`` into the
float64 matrices ``W_0 .. W_k`` (the linear parts of the affine groups, :func:`chains.group_matrix`) and
one derivative interval ``[a_j, b_j]`` per activation run (the global interval of the activation, a
run's product interval). The Jacobian of the chain is ``W_k D_k ... D_1 W_0`` with ``D_j`` diagonal in
``[a_j, b_j]``, and every difference quotient of the chain lies in that set (slope restriction), so a
bound on ``sup ||W_k D_k ... D_1 W_0||`` over the box, or a bound derived from the incremental quadratic
constraints of slope restriction, bounds the chain's Lipschitz constant.

Rounding of the materialisation: ``group_matrix`` is exact up to ``O(u ||G||)``; the chain bounds add
``ROUNDING_MARGIN * prod ||W_j|| max|s_j'|`` for it, as SeqLip does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch

from .. import ir
from ..core import ROUNDING_MARGIN, Settings, serve_cheapest
from ..norms import dense_norm
from .chains import MAX_DENSE, Segment, find_segments, group_matrix, neuron_interval
from .relations import AlgorithmResult, Relation, Term


@dataclass
class ChainMats:
    """``mats[j]``: dense float64 ``(out, in)`` matrix of group ``j``; ``slopes[j]``: the interval of the
    activation between ``mats[j]`` and ``mats[j + 1]``."""

    mats: list[torch.Tensor]
    slopes: list[tuple[float, float]]


@dataclass
class ChainValue:
    """A bound on one chain: ``value`` is proven when ``certified``; ``method`` says how it was obtained."""

    value: float
    certified: bool
    method: str
    seconds: float = 0.0


def segment_mats(g: nx.DiGraph, seg: Segment, max_dense: int = MAX_DENSE) -> ChainMats | None:
    """The chain's matrices and slope intervals, or None when a group has more than ``max_dense``
    input or output entries (too large to materialise)."""
    mats = []
    for grp in seg.groups:
        m = group_matrix(g, grp, max_dense)
        if m is None:
            return None
        mats.append(m.to(torch.float64))
    return ChainMats(mats, [(float(a), float(b)) for a, b in seg.slopes])


def certified_norms(mats: list[torch.Tensor]) -> list[float]:
    """Certified ``||W_j||_2`` of each matrix (:func:`lipgraph.norms.dense_norm`)."""
    out = []
    for m in mats:
        r = dense_norm(m)
        out.append(r.upper if r.certified else math.inf)
    return out


def autolip_chain(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """Certified AutoLip product ``prod ||W_j|| prod max(|a_j|, |b_j|)`` of a chain (float64 products
    inflated by ``(1 + ROUNDING_MARGIN)``)."""
    v = math.prod(certified_norms(mats)) * math.prod(max(abs(a), abs(b)) for a, b in slopes)
    return v * (1 + ROUNDING_MARGIN)


def drop_dead_neurons(mats: list[torch.Tensor], boxes: list[tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """The chain without the neurons whose derivative interval is ``{0}`` (dead on the domain: their output is
    constant, so their row of ``W_j`` and column of ``W_{j+1}`` go, exactly); None when a whole activation is
    dead (the chain is then constant: its constant is 0). ``boxes``: per-neuron ``(lo, hi)``, one per activation."""
    mats, boxes = list(mats), list(boxes)
    for j, (lo, hi) in enumerate(boxes):
        alive = (lo != 0) | (hi != 0)
        if not bool(alive.all()):
            if not bool(alive.any()):
                return None
            mats[j], mats[j + 1] = mats[j][alive], mats[j + 1][:, alive]
            boxes[j] = (lo[alive], hi[alive])
    return mats, boxes


def neuron_boxes(mats: list[torch.Tensor], slopes: Sequence[tuple[Any, Any]]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each activation's interval as per-neuron float64 tensors ``(lo, hi)`` (scalars broadcast)."""
    return [(torch.as_tensor(a, dtype=torch.float64).reshape(-1).expand(w.shape[0]),
             torch.as_tensor(b, dtype=torch.float64).reshape(-1).expand(w.shape[0]))
            for w, (a, b) in zip(mats[:-1], slopes, strict=True)]


def check(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> None:
    if len(slopes) != len(mats) - 1:
        raise ValueError("need one slope interval per activation (len(mats) - 1)")
    for a, b in slopes:
        if not (math.isfinite(a) and math.isfinite(b) and a <= b):
            raise ValueError(f"bad slope interval [{a}, {b}]")
    for x, y in zip(mats[:-1], mats[1:], strict=True):
        if x.shape[0] != y.shape[1]:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} then {tuple(y.shape)}")


#: Default cost cap of one chain segment for the dense chain methods that run on it (ECLipsE-Fast,
#: Combettes-Pesquet, LipSDP), in flops as :func:`chain_flops` counts them. Measured on one loaded core at
#: 64x64: AlexNet's classifier 9216-4096-4096-1000 counts 1.0e12 (ECLipsE-Fast 110 s, Combettes-Pesquet 36 s,
#: LipSDP 16 s for no gain) and its materialised conv3-conv5 chain 1728-3456-2304-2304 1.75e11 (ECLipsE-Fast
#: 82 s); the MNIST and digits chains count under 1e9. ``analyze`` with methods named explicitly lifts the cap
#: (``Settings.extra["chain_flops"] = inf``), as ``bench/bench_chains.py`` does for its 80-1000x50-10 chain
#: (1.5e11).
CHAIN_FLOPS = 3e10

#: Work budget of one dense chain method over all the segments of one analysis (``method="auto"``), in the
#: units of the method's ``work`` estimate (:func:`chain_flops` scaled to the method's measured cost: about
#: 1e10 units per second on this 2-core machine). Segments are served cheapest first until the next one would
#: pass the budget; the others are recorded as skipped, with the reason. Counted from shapes, never from
#: seconds, so every run makes the same choices. Measured (idle, 2 cores) on shufflenet_v2_x0_5 at 64x64, whose
#: 14 affordable one-activation segments cost LipSDP 25 s, ECLipsE-Fast 12 s, Combettes-Pesquet 5 s: at 3e9 the
#: three spend about 1.2 s together (Combettes-Pesquet covers the 384- and 768-wide segments) and the model's
#: bound, with SeqLip's and folding's budgets, is 145.2 in 11.8 s, against 76.5 in 67 s with none.
#: ``analyze(effort=k)`` scales it; methods named explicitly lift it (``Settings.extra["chain_work"] = inf``),
#: like ``CHAIN_FLOPS``.
CHAIN_WORK_BUDGET = 3e9


def chain_flops(shapes: Sequence[tuple[int, int]]) -> float:
    """``sum (n_in^3 + n_in^2 n_out + n_out^3)`` over the chain's matrix shapes ``(n_out, n_in)``: the order of
    the Cholesky factorisations, triangular solves and eigenvalue problems the dense chain methods run per step."""
    return float(sum(n_in ** 3 + n_in ** 2 * n_out + n_out ** 3 for n_out, n_in in shapes))


def segment_shapes(g: nx.DiGraph, seg: Segment) -> list[tuple[int, int]]:
    """The ``(out, in)`` shape of each group's matrix, from the IR's shapes (activations are elementwise, so a
    group reads what the previous one wrote)."""
    n_in = ir.numel(ir.node(g, seg.entry).out_shape)
    shapes = []
    for grp in seg.groups:
        n_out = ir.numel(ir.node(g, grp[-1]).out_shape)
        shapes.append((n_out, n_in))
        n_in = n_out
    return shapes


def run_segments(g: nx.DiGraph, source: str, bound: Callable[[list[torch.Tensor], list[Any]], ChainValue],
                 max_dense: int = MAX_DENSE, settings: Settings | None = None,
                 work: Callable[[list[tuple[int, int]]], float] = chain_flops) -> AlgorithmResult:
    """One relation ``L(seg.last) <= bound(chain) * L(seg.entry)`` per segment (the relation contract of
    :mod:`lipgraph.bounds.relations`); segments too large to materialise or whose bound fails are
    recorded and give no relation. With ``settings.neuron_slopes`` (a domain pass; pass ``settings`` only
    to a ``bound`` that takes per-neuron intervals), an activation run that has them enters ``bound`` as
    the tensors ``(lo, hi)`` of :func:`~lipgraph.bounds.chains.neuron_interval` instead of its global
    interval: the relation then holds on the domain only (its label says ``local segment``).

    ``work(shapes)`` estimates the method's cost on a segment; the segments share ``CHAIN_WORK_BUDGET``
    (``settings.extra["chain_work"]``), cheapest first."""
    t0 = time.perf_counter()
    res = AlgorithmResult()
    extra = settings.extra if settings is not None else {}
    cap = extra.get("chain_flops", CHAIN_FLOPS)
    budget = extra.get("chain_work", CHAIN_WORK_BUDGET)
    segments = find_segments(g)
    shapes = [segment_shapes(g, seg) for seg in segments]
    flops = [chain_flops(sh) for sh in shapes]  # from the shapes: nothing is materialised past the cap
    costs = [work(sh) if seg.activations and f <= cap else 0.0
             for seg, sh, f in zip(segments, shapes, flops, strict=True)]
    served, spent = serve_cheapest(costs, budget)  # cheapest first, then graph order
    res.details.update(work=spent, budget=budget)  # the reproducibility record: what was spent of what
    for i, seg in enumerate(segments):
        label = f"segment {seg.nodes[0]}..{seg.last}"
        rec: dict[str, Any] = {"nodes": list(seg.nodes), "entry": seg.entry, "label": label,
                               "slopes": [[float(a), float(b)] for a, b in seg.slopes]}
        t1 = time.perf_counter()
        if not seg.activations:  # one affine map: these methods would return its norm, as affine folding does
            rec.update(value=None, certified=False, method="skipped: no activation (one affine map, bounded by "
                       "affine folding and the per-node constants)", seconds=0.0)
            res.records.append(rec)
            continue
        cost = flops[i]
        if cost > cap:
            rec.update(value=None, certified=False,
                       method=f"skipped: about {cost:.2g} flops exceed the default budget {cap:.2g} "
                              "(name the method to run it anyway)", seconds=time.perf_counter() - t1)
            res.records.append(rec)
            res.details.setdefault("skipped", []).append(f"{label}: {rec['method']}")
            continue
        if i not in served:
            rec.update(value=None, certified=False,
                       method=f"skipped: its work {costs[i]:.2g} would pass the analysis's budget {budget:.2g} for "
                              "this method, spent on cheaper segments (raise effort, or name the method to run it "
                              "anyway)",
                       seconds=time.perf_counter() - t1)
            res.records.append(rec)
            res.details.setdefault("skipped", []).append(f"{label}: {rec['method']}")
            continue
        cm = segment_mats(g, seg, max_dense)
        if cm is None:
            rec.update(value=None, certified=False, method=f"a group exceeds {max_dense} entries: skipped",
                       seconds=time.perf_counter() - t1)
            res.records.append(rec)
            continue
        slopes: list[Any] = list(cm.slopes)
        if settings is not None and settings.neuron_slopes:
            boxes = [neuron_interval(g, names, settings) for names in seg.activations]
            slopes = [s if box is None else box for s, box in zip(slopes, boxes, strict=True)]
            if any(box is not None for box in boxes):
                label = "local " + label
                rec.update(label=label, local=True)
        try:
            cv = bound(cm.mats, slopes)
        except Exception as exc:  # noqa: BLE001 - a chain the bound cannot handle gives no relation
            rec.update(value=None, certified=False, method=f"failed ({type(exc).__name__}: {exc})",
                       seconds=time.perf_counter() - t1)
            res.records.append(rec)
            continue
        rec.update(value=cv.value, certified=cv.certified, method=cv.method, seconds=time.perf_counter() - t1)
        res.records.append(rec)
        if math.isfinite(cv.value):
            res.relations.append(Relation(seg.last, (Term(seg.entry, cv.value, cv.certified),), source, label))
    res.seconds = time.perf_counter() - t0
    return res


__all__ = ["CHAIN_FLOPS", "CHAIN_WORK_BUDGET", "ChainMats", "ChainValue", "autolip_chain", "certified_norms",
           "chain_flops", "check", "drop_dead_neurons", "neuron_boxes", "run_segments", "segment_mats",
           "segment_shapes"]
