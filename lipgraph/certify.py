"""Certified robustness radii from global Lipschitz bounds (issue 13, first part).

For a classifier ``f`` and an input ``x`` predicted as class ``y`` with margins
``m_j(x) = f_y(x) - f_j(x) > 0``: if ``L_{y,j}`` bounds the l2 Lipschitz
constant of ``x -> f_y(x) - f_j(x)`` *globally*, then no perturbation ``d``
with ``||d||_2 < min_j m_j(x) / L_{y,j}`` can change the prediction. Each
``L_{y,j}`` comes from :func:`lipgraph.analyze` on :class:`PairDiff` (the
difference of two logits: with a final linear layer, a linear head whose norm
is ``||w_y - w_j||``, usually well below ``sqrt(2) ||W||``). The Tsuzuku et al.
baseline ``margin / (sqrt(2) L)`` with the whole-network bound ``L`` is reported
next to it.

Soundness: only certified constants give certified radii; a radius from an
uncertified constant is reported with ``certified: false`` (an estimate) and
never counts in certified accuracy. The margins and the pairwise constants are computed on a
float64 copy of the model: the certificate is a statement about the real-valued
function with the model's weights (float32 inference rounding is not modelled).
Each pair's constant is the smaller certified one of the ``PairDiff`` analysis
and ``sqrt(2)`` times the whole-network bound (both bound ``Lip(f_y - f_j)``).

Local radii (``local=True``, issue 13 items 1(b) and 1(c)). Three kinds of radius per input, each sound
on its own, the largest one is the input's radius (``InputCertificate.method`` says which):

* ``"global"``: ``min_j m_j / L_{y,j}`` with the global pair constants (above).
* ``"local-lipschitz"``: the largest radius ``r`` *verified* by ``m_j > r_2 L_{y,j}(B(x, r))`` for every
  ``j != y``, where ``L_{y,j}(B)`` is the certified l2 constant of ``f_y - f_j`` on the ball (from
  :func:`lipgraph.analyze` with ``domain=Ball(x, r, norm, clip)``, min with the global pair constant, which
  holds on every set). Proof: the ball is convex and contains ``x``, so for ``x'`` in it,
  ``f_y(x') - f_j(x') >= m_j - L(B) ||x' - x||_2 >= m_j - L(B) r_2 > 0``. For ``norm="l2"``, ``r_2 = r``.
  For ``norm="linf"`` the constant is taken on the l_inf ball itself (a smaller set than the l2 ball of
  radius ``sqrt(n) r`` that contains it, so a smaller constant) and ``r_2 = sqrt(n) r`` since
  ``||d||_2 <= sqrt(n) ||d||_inf``; the constant stays an l2 one (lipgraph bounds l2 constants only).
* ``"margin-range"``: the largest radius verified by range propagation
  (:func:`lipgraph.bounds.ranges.propagate` on the ``PairDiff`` graph): the lower end of the enclosure of
  ``f_y - f_j`` over the ball is ``> 0`` for every ``j != y``.
* ``"lipschitz-or-range"``: per pair, either check (each proves ``f_y - f_j > 0`` on the ball, and the
  prediction is kept when every pair has a proof): searched upward from the larger of the two above.

The searches: a fixed number of steps (``local_steps`` checks per kind and input: work, not seconds).
Robustness on ``B(x, r)`` implies it on every smaller ball (a subset), so the radius kept is the largest
one where the check *succeeded*, never an interpolated value; bisection assumes that the checks are
monotone in ``r`` only to be efficient (``L(B(x, r))`` is nondecreasing in ``r``; a non-monotone bound only
makes the search miss radii). The local-Lipschitz search starts from the global radius (valid: the local
constant is at most the global one) with ``min_j m_j / L_{y,j}(B(x, r_lo))`` as its upper end; the range
search doubles from the global radius until a check fails, then bisects. Both compare with a relative
safety of :data:`SAFETY` against the float64 rounding of margins and products. With ``domain=Box(lo, hi)``
every ball is intersected with the box: the local radii then certify perturbations that stay in the box
only (``Certificate.domain`` says so); the global radius holds for every perturbation.

:func:`attack_radius` is the empirical check: a deterministic PGD attack on the
margin, bisected on the radius; it returns the norm of a concrete
misclassified point, an upper estimate of the true robustness radius, so each
certificate has its gap (attack radius - certified radius >= 0).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.nn as nn

from . import ir
from .core import restore_training_modes, seeds_from_argument, training_modes
from .domains import Ball, Box, Range
from .errors import InputShapeError, LipgraphError
from .ops import execute
from .report import fmt, jf

SCHEMA = "lipgraph.certificate/1"
SQRT2 = math.sqrt(2.0)
#: Relative safety of the local checks: ``m (1 - SAFETY) > r L (1 + SAFETY)`` covers the float64 rounding
#: of the margin (a difference of two float64 logits), of ``sqrt(n)`` and of the product.
SAFETY = 1e-9
KINDS = ("global", "local-lipschitz", "margin-range", "lipschitz-or-range")
#: Slope-optimisation steps of the margin's linear bounds per check (the search runs dozens of checks per input;
#: each step is one backward pass with gradients).
MARGIN_ALPHA_STEPS = 20
#: Branches of the margin's branch and bound over unstable ReLUs (:func:`~lipgraph.bounds.linear_bounds.prove_above`)
#: when its linear bound alone does not prove a pair (1: none).
MARGIN_BRANCHES = 32


class PairDiff(nn.Module):
    """``x -> model(x)[..., y] - model(x)[..., j]`` (shape ``(..., 1)``), kept a clean linear head.

    When ``model`` is an ``nn.Sequential`` ending in ``nn.Linear`` the two rows are folded into
    one ``Linear(in, 1)`` with weight ``w_y - w_j`` (the same function), so AutoLip sees
    ``||w_y - w_j||``; otherwise, with ``n_classes`` given, the logits go through one more
    ``Linear(n_classes, 1)`` of weight ``e_y - e_j`` (the graph stays a chain when the model is one, for the
    backward linear bounds; affine folding sees the product), and without it the two logits are sliced and
    subtracted (plain AutoLip would see ``2 ||W||``).
    """

    def __init__(self, model: nn.Module, y: int, j: int, n_classes: int | None = None) -> None:
        super().__init__()
        self.y, self.j = int(y), int(j)
        self.diff: nn.Linear | None = None
        last = model[-1] if isinstance(model, nn.Sequential) and len(model) else None
        self.folded = isinstance(last, nn.Linear)
        if self.folded:
            assert isinstance(last, nn.Linear)
            self.body = model[:-1]
            head = nn.Linear(last.in_features, 1, bias=last.bias is not None)
            head = head.to(device=last.weight.device, dtype=last.weight.dtype)
            with torch.no_grad():
                head.weight.copy_(last.weight[self.y] - last.weight[self.j])
                if last.bias is not None:
                    head.bias.copy_(last.bias[self.y:self.y + 1] - last.bias[self.j:self.j + 1])
            self.head = head
        else:
            self.model = model
            if n_classes is not None:
                ref = next(iter(model.parameters()), None)
                self.diff = nn.Linear(int(n_classes), 1, bias=False)
                if ref is not None:
                    self.diff = self.diff.to(dtype=ref.dtype, device=ref.device)
                with torch.no_grad():
                    self.diff.weight.zero_()
                    self.diff.weight[0, self.y], self.diff.weight[0, self.j] = 1.0, -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.head(self.body(x))
        z = self.model(x)
        if self.diff is not None:
            return self.diff(z)
        return z[..., self.y:self.y + 1] - z[..., self.j:self.j + 1]


@dataclass
class PairConstant:
    value: float  # the bound used: min(pair analysis, sqrt(2) * whole-network bound) among certified ones
    certified: bool
    pair_value: float  # lipgraph.analyze on PairDiff alone
    pair_certified: bool
    method: str


@dataclass
class InputCertificate:
    index: int
    label: int
    prediction: int
    correct: bool
    margin: float  # f_label - max_{j != label} f_j (negative when misclassified)
    radius: float  # pairwise global-bound radius in the certificate's norm (0 if misclassified)
    radius_certified: bool
    binding_class: int | None  # the j attaining min_j m_j / L_{y,j}
    tsuzuku_radius: float  # margin / (sqrt(2) L_whole), same norm
    attack_radius: float | None = None  # norm of a concrete adversarial point found by PGD (upper estimate)
    method: str = "global"  # the kind of the best radius (``radius``), one of KINDS
    radii: dict[str, float] = field(default_factory=dict)  # every kind's radius (local kinds when computed)
    seconds: float = 0.0  # time of the local searches for this input

    @property
    def gap(self) -> float | None:
        return None if self.attack_radius is None else self.attack_radius - self.radius

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "label": self.label, "prediction": self.prediction, "correct": self.correct,
            "margin": jf(self.margin), "radius": jf(self.radius), "radius_certified": self.radius_certified,
            "method": self.method, "radii": {k: jf(v) for k, v in self.radii.items()},
            "binding_class": self.binding_class, "tsuzuku_radius": jf(self.tsuzuku_radius),
            "attack_radius": jf(self.attack_radius), "gap": jf(self.gap), "seconds": self.seconds,
        }


@dataclass
class Certificate:
    norm: str
    input_dim: int
    whole_upper: float
    whole_certified: bool
    whole_method: str
    pairs: dict[tuple[int, int], PairConstant]
    inputs: list[InputCertificate]
    radii: list[float] = field(default_factory=list)
    local: bool = False  # the local kinds were searched
    domain: str | None = None  # the box the local balls are clipped to (local radii hold inside it only)

    @property
    def certified(self) -> bool:
        """Every radius reported as certified rests on certified constants only (always true by
        construction); False when some correctly classified input only has an estimated radius."""
        return all(c.radius_certified for c in self.inputs if c.correct)

    @property
    def clean_accuracy(self) -> float:
        return sum(c.correct for c in self.inputs) / max(len(self.inputs), 1)

    def certified_accuracy(self, radius: float, *, baseline: bool = False, kind: str | None = None) -> float:
        """Fraction of inputs correctly classified with a certified radius >= ``radius`` (the best radius;
        ``kind``: that kind's radius only; ``baseline``: the Tsuzuku radius instead)."""
        n = 0
        for c in self.inputs:
            if not c.correct:
                continue
            if baseline:
                ok = self.whole_certified and c.tsuzuku_radius >= radius
            elif kind is not None:
                ok = c.radii.get(kind, 0.0) >= radius and (kind != "global" or c.radius_certified)
            else:
                ok = c.radius_certified and c.radius >= radius
            n += ok
        return n / max(len(self.inputs), 1)

    def kind_counts(self) -> dict[str, int]:
        """How many correct inputs got their best radius from each kind."""
        out = dict.fromkeys(KINDS, 0)
        for c in self.inputs:
            if c.correct:
                out[c.method] = out.get(c.method, 0) + 1
        return out

    def attack_accuracy(self, radius: float) -> float | None:
        """Fraction correct and not broken by the attack at ``radius`` (an upper estimate of robust accuracy)."""
        if any(c.correct and c.attack_radius is None for c in self.inputs):
            return None
        return sum(c.correct and c.attack_radius > radius for c in self.inputs) / max(len(self.inputs), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "norm": self.norm,
            "input_dim": self.input_dim,
            "clean_accuracy": self.clean_accuracy,
            "certified": self.certified,
            "whole_network": {"upper": jf(self.whole_upper), "certified": self.whole_certified,
                              "method": self.whole_method},
            "pairs": [{"y": y, "j": j, "value": jf(p.value), "certified": p.certified,
                       "pair_value": jf(p.pair_value), "pair_certified": p.pair_certified, "method": p.method}
                      for (y, j), p in sorted(self.pairs.items())],
            "local": self.local,
            "domain": self.domain,
            "best_radius_from": self.kind_counts(),
            "certified_accuracy": [
                {"radius": r, "pairwise": self.certified_accuracy(r),
                 "tsuzuku": self.certified_accuracy(r, baseline=True), "attack_upper": self.attack_accuracy(r),
                 **({k: self.certified_accuracy(r, kind=k) for k in KINDS} if self.local else {})}
                for r in self.radii
            ],
            "inputs": [c.to_dict() for c in self.inputs],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        lines = [
            f"norm {self.norm}, {len(self.inputs)} inputs, clean accuracy {self.clean_accuracy:.3f}",
            f"whole-network bound {fmt(self.whole_upper)} ({'certified' if self.whole_certified else 'ESTIMATE'}, "
            f"{self.whole_method}); {len(self.pairs)} class pairs analysed",
        ]
        if not self.certified:
            lines.append("WARNING: some radii rest on uncertified constants: they are estimates, not certificates")
        if self.local:
            counts = ", ".join(f"{k} {v}" for k, v in self.kind_counts().items())
            lines.append(f"local radii searched; best radius from: {counts}")
            for k in KINDS:
                vals = sorted(c.radii.get(k, 0.0) for c in self.inputs if c.correct)
                if vals:
                    lines.append(f"  {k:>15}: median radius {fmt(vals[len(vals) // 2])}, max {fmt(vals[-1])}")
        if self.domain:
            lines.append(f"local radii certify perturbations inside {self.domain} only (the global radius: all)")
        head = f"{'radius':>10} {'pairwise':>10} {'tsuzuku':>10} {'attack<=':>10}"
        lines += [head, "-" * len(head)]
        for r in self.radii:
            a = self.attack_accuracy(r)
            lines.append(f"{fmt(r):>10} {self.certified_accuracy(r):>10.3f} "
                         f"{self.certified_accuracy(r, baseline=True):>10.3f} {'-' if a is None else f'{a:.3f}':>10}")
        gaps = [c.gap for c in self.inputs if c.correct and c.gap is not None]
        cr = [c.radius for c in self.inputs if c.correct]
        if cr:
            lines.append(f"median certified radius (correct inputs) {fmt(sorted(cr)[len(cr) // 2])}")
        if gaps:
            ar = sorted(c.attack_radius for c in self.inputs if c.correct and c.attack_radius is not None)
            med_gap = sorted(gaps)[len(gaps) // 2]
            lines.append(f"median attack radius {fmt(ar[len(ar) // 2])}, median gap {fmt(med_gap)}")
        lines.append("(pairwise/tsuzuku: certified accuracy (pairwise: the best radius of each input); "
                     "attack<=: accuracy under PGD, an upper estimate)")
        return "\n".join(lines)

    def plot(self, path: str, radii: Sequence[float] | None = None) -> str:
        """Certified accuracy vs radius (pairwise, Tsuzuku, attack upper estimate); PNG/SVG/PDF by suffix."""
        import matplotlib  # noqa: PLC0415 - optional dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        top = max([c.radius for c in self.inputs] + [c.attack_radius or 0.0 for c in self.inputs] + [1e-6])
        rs = list(radii) if radii is not None else [top * i / 200 for i in range(201)]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rs, [self.certified_accuracy(r) for r in rs],
                label="certified (best radius)" if self.local else "certified (pairwise bounds)")
        if self.local:
            for k, style in zip(KINDS, ("-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1))), strict=True):
                ax.plot(rs, [self.certified_accuracy(r, kind=k) for r in rs], linestyle=style, alpha=0.7,
                        label=f"certified ({k})")
        ax.plot(rs, [self.certified_accuracy(r, baseline=True) for r in rs], "--", label="certified (Tsuzuku)")
        if all(a is not None for a in (self.attack_accuracy(0.0),)):
            ax.plot(rs, [self.attack_accuracy(r) for r in rs], ":", label="PGD attack (upper estimate)")
        ax.set_xlabel(f"{self.norm} radius")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _margin(logits: torch.Tensor, y: int) -> torch.Tensor:
    other = logits.clone()
    other[..., y] = -math.inf
    return logits[..., y] - other.max(dim=-1).values


def _analyze(model: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[float, bool, str]:
    import lipgraph  # noqa: PLC0415

    rep = lipgraph.analyze(model, x, **kwargs)
    best = rep.best
    return rep.upper, rep.certified, best[0] if best else "?"


@contextlib.contextmanager
def kept_modes(model: Any) -> Iterator[None]:
    """Give every submodule its training flag back afterwards (the work inside puts the model in eval mode;
    the user's model is left as it was). Anything but an ``nn.Module`` has no modes to keep."""
    modes = training_modes(model)
    try:
        yield
    finally:
        restore_training_modes(modes)


def pair_difference_graph(g: nx.DiGraph, y: int, j: int) -> tuple[nx.DiGraph, bool]:
    """The IR of ``x -> f_y(x) - f_j(x)`` (shape ``(1, 1)``) from the IR ``g`` of a classifier with ``(1, C)``
    logits: :class:`PairDiff` on the graph. ``g``'s nodes are kept as they are; when the logits come from a
    ``linear`` node that only the output reads, that node's rows ``y`` and ``j`` are subtracted (the same
    function: AutoLip then sees ``||w_y - w_j||``), otherwise one ``linear`` node of weight ``e_y - e_j`` is
    appended (``sqrt(2)``; affine folding of ``method="auto"`` sees the product). Returns the graph and
    whether the head was folded. The new weights have the dtype of the logits' node parameters (float64
    for a float64 IR)."""
    out = ir.node(g, g.graph["output"])
    if len(out.inputs) != 1:
        raise InputShapeError(f"certify needs a model with one output (N, classes), this one has {len(out.inputs)}")
    src = ir.node(g, out.inputs[0])
    shape = tuple(src.out_shape) if isinstance(src.out_shape, (tuple, list)) else ()
    if len(shape) != 2 or shape[0] != 1 or not all(isinstance(d, int) for d in shape):
        raise InputShapeError(f"the model must map one input to (1, classes) logits, got {src.out_shape}")
    n_cls = shape[1]
    weight = src.params.get("weight")
    folded = (src.op == "linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2
              and weight.shape[0] == n_cls and g.out_degree(src.name) == 1)
    h = ir.new_graph(f"{g.graph['name']}[f{y}-f{j}]", g.graph["frontend"])
    for n in ir.nodes(g):
        if n.op == "output":
            continue
        if folded and n.name == src.name:
            assert weight is not None
            params = {"weight": (weight[y] - weight[j]).unsqueeze(0)}
            if "bias" in n.params:
                b = n.params["bias"]
                params["bias"] = (b[y] - b[j]).reshape(1)
            n = dataclasses.replace(n, params=params, out_shape=(1, 1))
        ir.add_node(h, n)
    last = src.name
    if not folded:
        floats = [t for t in src.params.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.float64
        e = torch.zeros(1, n_cls, dtype=dtype)
        e[0, y], e[0, j] = 1.0, -1.0
        name = f"{src.name}_logit_difference"
        while name in g:
            name += "_"
        ir.add_node(h, ir.IRNode(name, "linear", [src.name], {}, {"weight": e}, "certify",
                                 f"f{y} - f{j}", [shape], (1, 1)))
        last = name
    ir.add_node(h, dataclasses.replace(out, inputs=[last], in_shapes=[(1, 1)], out_shape=(1, 1)))
    return h, folded


@dataclass
class _Classifier:
    """What certify needs of a model, for a PyTorch module and an IR graph (an ONNX file) alike.

    ``whole``: what :func:`lipgraph.analyze` bounds for the whole network; ``m64``: a float64 ``nn.Module``
    computing the logits (margins); ``pair(y, j)``: the float64 model of ``f_y - f_j`` and whether its head
    folded; ``attackable``: the model the PGD attack differentiates (the user's precision)."""

    whole: Any
    m64: nn.Module
    pair: Callable[[int, int], tuple[Any, bool]]
    attackable: nn.Module


def _classifier(model: Any, example: torch.Tensor) -> _Classifier:
    """A :class:`_Classifier` for an ``nn.Module``, an ``.onnx`` path or an IR graph (traced on ``example``)."""
    if isinstance(model, nn.Module):
        m64 = copy.deepcopy(model).double().eval()

        with torch.no_grad():
            out = m64(example.detach().double())
        n_cls = int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() >= 1 else None

        def module_pair(y: int, j: int) -> tuple[Any, bool]:
            pd = PairDiff(m64, y, j, n_cls).eval()
            return pd, pd.folded

        return _Classifier(model, m64, module_pair, model)
    if isinstance(model, (str, os.PathLike, nx.DiGraph)):
        from .api import trace  # noqa: PLC0415
        from .ops import IRModule  # noqa: PLC0415

        g = trace(model if isinstance(model, nx.DiGraph) else os.fspath(model), example)
        if len(g.graph["inputs"]) != 1:
            raise InputShapeError(f"certify needs a single-input model; {g.graph['name']} takes "
                                  f"{len(g.graph['inputs'])}")
        outputs = ir.node(g, g.graph["output"]).inputs
        if len(outputs) != 1:
            raise InputShapeError(f"certify needs a model with one output (N, classes logits); "
                                  f"{g.graph['name']} has {len(outputs)}")
        g64 = ir.to_float64(g)
        return _Classifier(g, IRModule(g64).eval(), lambda y, j: pair_difference_graph(g64, y, j),
                           IRModule(g).eval())
    raise LipgraphError(f"certify needs a PyTorch nn.Module or the path of an .onnx file, not {type(model).__name__}")


@seeds_from_argument
def certify(
    model: nn.Module | str | os.PathLike[str],
    inputs: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    radius: Sequence[float] | float | None = None,
    norm: str = "l2",
    pair_method: str | None = None,
    attack: bool = False,
    attack_steps: int = 20,
    attack_bisections: int = 12,
    seed: int = 0,
    local: bool = False,
    local_steps: int = 8,
    local_method: str | Sequence[str] = "auto",
    domain: Box | None = None,
    **analyze_kwargs: Any,
) -> Certificate:
    """Certified radii of ``inputs`` (batch on dim 0) under ``model`` from global Lipschitz bounds.

    ``model``: an ``nn.Module``, or the path of an ``.onnx`` file (its IR, loaded with the shape of one input,
    computes the logits one input at a time, and the class pairs are built on the IR).

    ``norm``: ``"l2"`` or ``"linf"`` (the l2 radius divided by ``sqrt(n)``: sound since
    ``||d||_2 <= sqrt(n) ||d||_inf``). ``radius``: radii at which to report certified accuracy.
    ``pair_method``: the ``analyze`` method for the class pairs (default ``"autolip"`` when the
    head folds into one linear row, else ``"auto"``). ``attack``: also run :func:`attack_radius`
    on every correctly classified input. ``local``: also search the local-Lipschitz and margin-range
    radii (module docstring) with ``local_steps`` checks each per input, the pair constants on the balls
    from ``analyze(..., method=local_method)``; ``domain``: a :class:`Box` the balls are clipped to (the
    local radii then hold for perturbations inside it). Other keyword arguments go to
    :func:`lipgraph.analyze` (``lower`` defaults to False here).
    """
    with kept_modes(model):
        if norm not in ("l2", "linf"):
            raise LipgraphError(f"unknown norm {norm!r}: use 'l2' or 'linf'")
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            raise InputShapeError("inputs must be a tensor with a batch dimension, e.g. shape (N, 64)")
        if domain is not None and not isinstance(domain, Box):
            raise LipgraphError(f"certify's domain must be a lipgraph.domains.Box (the data box), "
                                f"not {type(domain).__name__}")
        labels_t = torch.as_tensor(labels).reshape(-1).long()
        if labels_t.numel() != inputs.shape[0]:
            raise InputShapeError(f"{inputs.shape[0]} inputs but {labels_t.numel()} labels")
        if radius is None:
            radii: list[float] = []
        else:
            radii = [float(radius)] if isinstance(radius, (int, float)) else [float(r) for r in radius]
        kwargs = {"lower": False, "seed": seed, **analyze_kwargs}  # one seed for the attack and the bounds
        if isinstance(model, nn.Module):
            model = model.eval()
        n_in = int(inputs[0].numel())
        scale = 1.0 if norm == "l2" else 1.0 / math.sqrt(n_in)
        example = inputs[:1].detach()
        target = _classifier(model, example)

        # margins in float64 (an exact-arithmetic statement about f needs the rounding of the margin small)
        m64 = target.m64
        with torch.no_grad():
            logits = m64(inputs.detach().double())
        if logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            raise InputShapeError("the model must map (N, ...) inputs to (N, classes) logits, got "
                                  f"{tuple(logits.shape)}")
        n_cls = logits.shape[1]
        if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= n_cls):
            raise InputShapeError(f"labels must lie in [0, {n_cls})")

        whole, whole_cert, whole_method = _analyze(target.whole, example, kwargs)
        pairs: dict[tuple[int, int], PairConstant] = {}

        def pair(y: int, j: int) -> PairConstant:
            key = (min(y, j), max(y, j))  # Lip(f_y - f_j) = Lip(f_j - f_y)
            if key not in pairs:
                # built from the float64 copy: w_y - w_j exactly as the real-valued function has it
                pd, folded = target.pair(*key)
                with torch.no_grad():  # the wrapper must compute the same function
                    ref = m64(example.double())
                    got = pd(example.double()) if isinstance(pd, nn.Module) else execute(pd, example.double())
                    want = ref[..., key[0]] - ref[..., key[1]]
                    if not torch.allclose(got.reshape(-1), want.reshape(-1), rtol=1e-9, atol=1e-9):
                        raise LipgraphError(f"the difference of logits {key} does not reproduce the model's")
                meth = pair_method or ("autolip" if folded else "auto")
                pv, pc, pm = _analyze(pd, example.double(), {**kwargs, "method": meth})
                cands = [(pv, pc, pm)]
                if math.isfinite(whole):
                    cands.append((SQRT2 * whole, whole_cert, f"sqrt(2) x whole ({whole_method})"))
                cert = [c for c in cands if c[1]]
                v, c, m = min(cert) if cert else min(cands)
                pairs[key] = PairConstant(v, c, pv, pc, m)
            return pairs[key]

        certs = []
        for i in range(inputs.shape[0]):
            lab = int(labels_t[i])
            pred = int(logits[i].argmax())
            correct = pred == lab
            marg = float(_margin(logits[i], lab))
            r, rc, binding, tz = 0.0, True, None, 0.0
            if correct and marg > 0:
                best = math.inf
                rc = True
                for j in range(n_cls):
                    if j == lab:
                        continue
                    pc = pair(lab, j)
                    rj = float(logits[i, lab] - logits[i, j]) / pc.value if pc.value > 0 else math.inf
                    if rj < best:
                        best, binding = rj, j
                    rc = rc and pc.certified
                r = best * scale
                tz = (marg / (SQRT2 * whole) if whole > 0 else math.inf) * scale
            elif correct:
                correct = False  # a tie is not a correct prediction
            c = InputCertificate(i, lab, pred, correct, marg, r, rc, binding, tz, radii={"global": r})
            if local and correct:
                t0 = time.perf_counter()
                x64 = inputs[i:i + 1].detach().double()
                if domain is not None and not bool(((x64 >= domain.lo) & (x64 <= domain.hi)).all()):
                    raise LipgraphError(f"input {i} lies outside the certify domain {domain.describe()}")
                search = _LocalSearch(lambda j, _y=lab: target.pair(_y, j)[0], x64, lab, logits[i], norm,
                                      domain, local_method, kwargs,
                                      {j: pair(lab, j) for j in range(n_cls) if j != lab})
                r0 = r if rc else 0.0  # an estimated global radius is no verified start
                c.radii["local-lipschitz"] = search.lipschitz_radius(r0, local_steps)
                c.radii["margin-range"] = search.range_radius(r0, local_steps)
                c.radii["lipschitz-or-range"] = search.grow(
                    search.either_ok, max(c.radii["local-lipschitz"], c.radii["margin-range"]), local_steps,
                    known=True)
                c.seconds = time.perf_counter() - t0
                best_kind = max(KINDS, key=lambda k: (c.radii[k] if k != "global" or rc else 0.0))
                if best_kind != "global" and c.radii[best_kind] > (r if rc else 0.0):
                    c.method, c.radius, c.radius_certified = best_kind, c.radii[best_kind], True
            certs.append(c)

        result = Certificate(norm, n_in, whole, whole_cert, whole_method, pairs, certs, radii, local,
                             None if domain is None else domain.describe())
        if attack:
            for c in certs:
                if c.correct:
                    hi = max(4 * c.radius, 4 * c.tsuzuku_radius, 1e-3)
                    box = None if domain is None or c.method == "global" else (
                        float(domain.lo.min()), float(domain.hi.max()))  # a scalar box: the attack stays in it
                    c.attack_radius = attack_radius(target.attackable, inputs[c.index], c.label, norm=norm,
                                                    steps=attack_steps, bisections=attack_bisections,
                                                    seed=seed + c.index, start=hi, clip=box)
        return result


class _LocalSearch:
    """The local radii of one input ``x`` (float64, batch 1) with label ``y``: the checks of the module docstring
    and the two fixed-step searches. ``pairs[j]``: the global constant of ``f_y - f_j``."""

    def __init__(self, pair_of: Callable[[int], Any], x: torch.Tensor, y: int, logits: torch.Tensor, norm: str,
                 clip: Box | None, method: str | Sequence[str], kwargs: dict[str, Any],
                 pairs: dict[int, PairConstant]) -> None:
        self.pair_of, self.x, self.y, self.norm, self.clip = pair_of, x, y, norm, clip
        self.method, self.kwargs = method, {k: v for k, v in kwargs.items() if k not in ("method", "domain")}
        self.margins = {j: float(logits[y] - logits[j]) for j in pairs}
        self.pairs = pairs
        self.to_l2 = 1.0 if norm == "l2" else math.sqrt(x.numel())  # ||d||_2 <= sqrt(n) ||d||_inf
        self.modules: dict[int, Any] = {}
        self.graphs: dict[int, Any] = {}
        self.verified: dict[int, float] = {}  # per pair: the largest radius its local-Lipschitz check passed
        self.local_l: dict[int, float] = {}  # per pair: the constant on the last ball checked

    def _module(self, j: int) -> Any:
        if j not in self.modules:
            self.modules[j] = self.pair_of(j)  # f_y - f_j itself (not |.|-symmetrised)
        return self.modules[j]

    def _graph(self, j: int) -> Any:
        """The IR of ``f_y - f_j``, traced (and checked against the module) once for every check of this input."""
        from .api import trace  # noqa: PLC0415

        if j not in self.graphs:
            self.graphs[j] = trace(self._module(j), self.x)
        return self.graphs[j]

    def ball(self, r: float) -> Ball:
        return Ball(self.x, r, self.norm, clip=self.clip)

    def _global_ok(self, j: int, r: float) -> bool:
        p = self.pairs[j]
        return p.certified and self.margins[j] * (1 - SAFETY) > r * self.to_l2 * p.value * (1 + SAFETY)

    def _order(self) -> list[int]:
        """Pairs, most binding (smallest global radius) first: a failing check fails early."""
        return sorted(self.pairs, key=lambda j: self.margins[j] / self.pairs[j].value if self.pairs[j].value > 0
                      else math.inf)

    def lipschitz_ok(self, r: float) -> bool:
        """``m_j > r_2 L_{y,j}(B(x, r))`` for every ``j`` (certified constants only)."""
        return all(self._lipschitz_pair_ok(j, r) for j in self._order())

    def _constant(self, j: int, r: float) -> float | None:
        """The certified constant of ``f_y - f_j`` on ``B(x, r)`` (min with the global pair constant), or None."""
        import lipgraph  # noqa: PLC0415

        rep = lipgraph.analyze(self._graph(j), self.x, domain=self.ball(r), **{
            **self.kwargs, "method": self.method, "lower": False, "domain_only": True})  # min with the global below
        if not rep.certified or not math.isfinite(rep.upper):
            return None
        lj = min(rep.upper, self.pairs[j].value) if self.pairs[j].certified else rep.upper
        self.local_l[j] = lj
        return lj

    def _first_cap(self, r0: float) -> float:
        """``min_j m_j / (r_2-scale L_j(B(x, r0)))``: past it no check passes when the constants are monotone.
        Pairs whose global-constant radius is already above the running minimum cannot lower it: skipped."""
        cap = math.inf
        for j in self._order():
            p = self.pairs[j]
            if p.value > 0 and self.margins[j] / (self.to_l2 * p.value) >= cap:
                continue
            lj = self._constant(j, r0)
            if lj is None:
                return r0
            if lj > 0:
                cap = min(cap, self.margins[j] / (self.to_l2 * lj))
        return cap

    def lipschitz_radius(self, r0: float, steps: int) -> float:
        """The largest radius verified by :meth:`lipschitz_ok` in ``steps`` checks, bisecting up from the verified
        ``r0`` (the global radius, or 0) with the upper end :meth:`_first_cap`, lowered after each passed check
        by the constants on the larger ball. The result is ``r0`` or a radius whose check passed."""
        if steps <= 0:
            return r0
        lo, hi = r0, self._first_cap(r0)
        for _ in range(steps):
            if not hi > lo * (1 + 1e-6) or not math.isfinite(hi):
                break
            mid = 0.5 * (lo + hi)
            if self.lipschitz_ok(mid):
                lo, hi = mid, min(hi, self._cap())
            else:
                hi = mid
        return lo

    def _cap(self) -> float:
        """``min_j m_j / (r_2-scale L_j)`` with each pair's constant on the last ball it was checked on (its global
        constant when never checked)."""
        caps = [self.margins[j] / (self.to_l2 * self.local_l.get(j, p.value)) for j, p in self.pairs.items()
                if self.local_l.get(j, p.value) > 0]
        return min(caps) if caps else math.inf

    def _range_pair_ok(self, j: int, r: float) -> bool:
        from .bounds.linear_bounds import prove_above  # noqa: PLC0415
        from .bounds.ranges import propagate  # noqa: PLC0415

        g = self._graph(j)
        ball = self.ball(r)
        res = propagate(g, ball, self.x)
        rng = res.ranges.get(g.graph["output"])
        if isinstance(rng, Range) and bool(torch.isfinite(rng.lo).all()) and float(rng.lo.min()) > 0:
            return True
        if not isinstance(rng, Range):
            return False
        # the linear bound first, then branches over unstable ReLUs (None, not proved, unless a chain)
        return bool(prove_above(g, ball, self.x, 0.0, branches=MARGIN_BRANCHES, alpha_steps=MARGIN_ALPHA_STEPS,
                                ranges=res))

    def range_ok(self, r: float) -> bool:
        """The lower end of the range of ``f_y - f_j`` over ``B(x, r)`` is ``> 0`` for every ``j``."""
        return all(self._range_pair_ok(j, r) for j in self._order())

    def _lipschitz_pair_ok(self, j: int, r: float) -> bool:
        if self.verified.get(j, -1.0) >= r or self._global_ok(j, r):
            return True
        lj = self._constant(j, r)
        if lj is None or not self.margins[j] * (1 - SAFETY) > r * self.to_l2 * lj * (1 + SAFETY):
            return False
        self.verified[j] = r
        return True

    def either_ok(self, r: float) -> bool:
        """Every pair is proved on ``B(x, r)`` by its range or by its local constant (the cheap range first)."""
        return all(self._range_pair_ok(j, r) or self._lipschitz_pair_ok(j, r) for j in self._order())

    def range_radius(self, r0: float, steps: int) -> float:
        """The largest radius verified by :meth:`range_ok` in ``steps`` checks (:meth:`grow` from ``r0``, from
        the Lipschitz search's upper end when ``r0 = 0``); 0 when no check passes."""
        return self.grow(self.range_ok, r0 if r0 > 0 else self._cap(), steps)

    @staticmethod
    def grow(ok: Any, start: float, steps: int, known: bool = False) -> float:
        """The largest radius where ``ok`` passed in ``steps`` checks: doubling from ``start`` until a check fails,
        then bisecting between the last pass and the first failure. ``known``: ``start`` is already verified
        (returned when nothing larger passes); otherwise 0 when no check passes."""
        lo, hi = (start if known else 0.0), math.inf
        guess = 2 * start if known else start
        if not (math.isfinite(guess) and guess > 0):
            return lo
        for _ in range(steps):
            mid = guess if not math.isfinite(hi) else 0.5 * (lo + hi)
            if ok(mid):
                lo, guess = mid, 2 * mid
            else:
                hi = mid
        return lo


def _pgd(model: nn.Module, x: torch.Tensor, y: int, eps: float, norm: str, steps: int, gen: torch.Generator,
         clip: tuple[float, float] | None = None):
    """Minimise the margin in the ``norm`` ball of radius ``eps`` (within the box ``clip``); return the best
    point's perturbation."""

    def proj(d: torch.Tensor) -> torch.Tensor:
        d = _project(d, eps, norm)  # clamping toward a box holding x keeps the point in the ball
        return d if clip is None else (x + d).clamp(clip[0], clip[1]) - x

    delta = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    delta = proj(delta * eps * 0.5 / max(float(_norm(delta, norm)), 1e-12))
    alpha = 2.5 * eps / steps
    best, best_m = None, math.inf
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model((x + delta).unsqueeze(0))[0]
        m = _margin(logits, y)
        mv = float(m.detach())
        if mv < best_m:
            best_m, best = mv, delta.detach().clone()
        if mv < 0:
            break
        (g,) = torch.autograd.grad(m, delta)
        with torch.no_grad():
            if norm == "l2":
                step = g / max(float(g.norm()), 1e-12)
            else:
                step = g.sign()
            delta = proj(delta.detach() - alpha * step)
    with torch.no_grad():
        m = float(_margin(model((x + delta).unsqueeze(0))[0], y))
    if m < best_m:
        best_m, best = m, delta.detach()
    return best, best_m


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.norm() if norm == "l2" else d.abs().max()


def _project(d: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "l2":
        n = float(d.norm())
        return d * (eps / n) if n > eps else d
    return d.clamp(-eps, eps)


def attack_radius(
    model: nn.Module,
    x: torch.Tensor,
    label: int,
    *,
    norm: str = "l2",
    steps: int = 20,
    bisections: int = 12,
    seed: int = 0,
    start: float = 0.1,
    max_radius: float = 1e4,
    clip: tuple[float, float] | None = None,
) -> float:
    """The smallest radius at which a fixed-budget PGD attack on the margin flips the prediction.

    Deterministic (``seed``; every PGD run has exactly ``steps`` gradient steps at most). The radius
    is doubled from ``start`` until the attack succeeds, then bisected ``bisections`` times. The
    value returned is the ``norm`` of a concrete perturbation that changes the prediction (checked
    by re-evaluating the model), so it is an upper estimate of the true robustness radius;
    ``inf`` when nothing is found up to ``max_radius``. ``clip``: the attack stays in the box
    ``clip[0] <= x <= clip[1]`` (to compare with radii certified on balls clipped to it).
    """
    with kept_modes(model):
        if norm not in ("l2", "linf"):
            raise LipgraphError(f"unknown norm {norm!r}: use 'l2' or 'linf'")
        model = model.eval()
        x = x.detach()
        gen = torch.Generator().manual_seed(seed)

        def broken(eps: float) -> float | None:
            d, m = _pgd(model, x, label, eps, norm, steps, gen, clip)
            if d is None or m >= 0:
                return None
            with torch.no_grad():  # the point itself must be misclassified
                logits = model((x + d).unsqueeze(0))[0]
            if int(logits.argmax()) == label and float(_margin(logits, label)) >= 0:
                return None
            return float(_norm(d, norm))

        hi_eps, found = start, None
        while hi_eps <= max_radius:
            found = broken(hi_eps)
            if found is not None:
                break
            hi_eps *= 2
        if found is None:
            return math.inf
        lo, hi = 0.0, min(hi_eps, found)
        for _ in range(bisections):
            mid = 0.5 * (lo + hi)
            f = broken(mid)
            if f is None:
                lo = mid
            else:
                hi, found = min(mid, f), min(found, f)
        return found
