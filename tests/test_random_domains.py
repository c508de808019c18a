"""Randomized soundness on input domains: seeded random token models (gating, squeeze-excitation, LayerNorm,
softmax attention, GELU/SiLU/ReLU/... MLPs, residuals) on seeded random domains. The ground truth is
independent of lipgraph: float64 Jacobian norms (``torch.func.jacrev``) at points sampled in the domain, secant
ratios between such points, and the values every node takes there (which must lie in its range). 10 models x
1000 points = 10^4 sampled points (secants; dense Jacobians at 200 of them per model), plus the projected ascent
of the lower-bound search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from random_domain_models import KINDS, make

import lipgraph
from lipgraph.bounds.ranges import propagate
from lipgraph.domains import Range

SAMPLES = 1000  # points per model for the secants (12 models: 1.2 x 10^4 points)
JACOBIANS = 200  # of them, points where the dense Jacobian is taken


def _jacobian_norms(m64: torch.nn.Module, pts: torch.Tensor) -> torch.Tensor:
    """||J(p)||_2 at each point, reverse mode point by point (PyTorch's attention has no forward-mode AD)."""
    out = []
    for p in pts:
        jac = torch.autograd.functional.jacobian(lambda z: m64(z).reshape(-1), p)
        out.append(torch.linalg.matrix_norm(jac.reshape(-1, p.numel()), ord=2))
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(12))
def test_domain_bound_and_ranges_hold_at_sampled_points(seed: int) -> None:
    model, x, domain = make(seed)
    rep = lipgraph.analyze(model, x, domain=domain, lower_budget=2)
    assert not math.isnan(rep.upper)
    for b in rep.bounds.values():
        assert not math.isnan(b.value)
    m64 = copy.deepcopy(model).double().eval()
    pts = domain.sample(SAMPLES, x.double(), torch.Generator().manual_seed(100 + seed))
    norms = _jacobian_norms(m64, pts[:JACOBIANS])
    with torch.no_grad():
        ys = m64(pts.reshape(SAMPLES, *x.shape[1:])).reshape(SAMPLES, -1)
    half = SAMPLES // 2
    secants = (ys[:half] - ys[half:]).norm(dim=1) / (pts[:half] - pts[half:]).flatten(1).norm(dim=1).clamp_min(1e-300)
    seen = max(float(norms.max()), float(secants.max()), rep.lower or 0.0)
    if rep.certified:
        assert seen <= rep.upper * (1 + 1e-9), (seed, seen, rep.upper, rep.upper_method if hasattr(rep, "upper_method")
                                                else rep.best)
    assert rep.upper <= rep.global_upper * (1 + 1e-12)
    # ranges: every node's value at every sampled point (and the center) lies in its range
    g64 = lipgraph.trace(m64, x.double())
    rr = propagate(g64, domain, x.double())
    for p in [domain.center(x.double()), *pts[:200]]:
        _, values = lipgraph.execute(g64, p.reshape(x.shape), keep=True)
        for name, r in rr.ranges.items():
            if isinstance(r, Range) and isinstance(values.get(name), torch.Tensor):
                assert r.contains(values[name], tol=1e-12), (seed, name)


def test_every_block_kind_gets_a_finite_domain_bound() -> None:
    """Gating, squeeze-excitation, LayerNorm and attention are inf or huge globally and finite on a ball."""
    for seed in range(len(KINDS)):  # seed % len(KINDS) selects the first block's kind: every kind appears
        model, x, domain = make(seed)
        rep = lipgraph.analyze(model, x, domain=domain, lower=False)
        assert rep.certified and math.isfinite(rep.upper), (seed, rep.domain, rep.not_lipschitz[:1])
