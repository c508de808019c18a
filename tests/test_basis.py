"""Basis responses from weights (``norms.conv_matrix``, ``bounds.basis``): the matrices SeqLip and affine folding
materialise must be the ones the float64 basis evaluation gives, entry for entry."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipgraph
from lipgraph import ir, norms
from lipgraph.api import local_constants
from lipgraph.bounds import affine, chains
from lipgraph.ops import Settings

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_matrix_is_the_basis_response(nd: int) -> None:
    """Every stride, dilation, padding spelling and group count: the matrix equals the float64 conv of each
    basis vector exactly (each entry is one weight or zero)."""
    gen = torch.Generator().manual_seed(nd)
    cases = 0
    for (ci, co, g), k, s, d, pad, n in itertools.product([(4, 6, 1), (4, 6, 2), (6, 6, 6)], [1, 3], [1, 2], [1, 2],
                                                          [0, 1, "same", "valid"], [5, 6]):
        if pad == "same" and s != 1:
            continue
        w = torch.randn(co, ci // g, *([k] * nd), generator=gen)
        attrs = {"ndim": nd, "stride": (s,) * nd, "padding": pad if isinstance(pad, str) else (pad,) * nd,
                 "dilation": (d,) * nd, "groups": g, "padding_mode": "zeros"}
        shape = (1, ci, *([n] * nd))
        m = norms.conv_matrix(w, attrs, shape, torch.device("cpu"))
        n_in = math.prod(shape)
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape[1:])
        ref = CONV[nd](basis, w.double(), None, attrs["stride"], attrs["padding"], attrs["dilation"], g)
        assert torch.equal(m, ref.reshape(n_in, -1).T), (ci, co, g, k, s, d, pad, n)
        cases += 1
    assert cases == 168


def test_conv_matrix_refuses_other_paddings_and_large_maps() -> None:
    w = torch.randn(4, 4, 3, 3)
    attrs = {"ndim": 2, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
             "padding_mode": "circular"}
    assert norms.conv_matrix(w, attrs, (1, 4, 6, 6), torch.device("cpu")) is None
    attrs["padding_mode"] = "zeros"
    assert norms.conv_matrix(w, attrs, (1, 4, 6, 6), torch.device("cpu"), max_entries=100) is None


class _Net(nn.Module):
    """conv -> BN -> ReLU -> grouped conv -> residual add -> ReLU -> linear chain (every materialised kind)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h) + self.c3(h))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def test_group_matrices_and_region_jacobians_match_the_basis_evaluation(monkeypatch) -> None:
    """SeqLip's group matrices and affine folding's partial norms are the same with and without the weight
    route (the weight route is exact, the basis route rounds at 1e-16)."""
    model = _Net().eval()
    g = lipgraph.trace(model, torch.randn(1, 3, 8, 8))
    groups = [grp for seg in chains.find_segments(g) for grp in seg.groups]
    assert groups
    direct = [chains.group_matrix(g, grp) for grp in groups]
    ctx = Settings()
    local = {k: v[0] for k, v in local_constants(g, ctx, None, None).items()}
    seen: list[tuple[str, str, float | None]] = []
    real = affine._materialize

    def spy(g_, members, entry, exit_, ctx_):
        v = real(g_, members, entry, exit_, ctx_)
        seen.append((entry, exit_, v))
        return v

    monkeypatch.setattr(affine, "_materialize", spy)
    used: list[bool] = []
    real_first = affine._from_first_layers
    monkeypatch.setattr(affine, "_from_first_layers", lambda *a: used.append(real_first(*a) is not None) or
                        real_first(*a))
    affine.fold(g, local, ctx)
    assert sum(used) >= 2, used  # the weight route ran (conv- and linear-led regions)
    assert sum(chains.linear_part_columns(ir.node(g, grp[0]), tuple(ir.node(g, grp[0]).in_shapes[0])) is not None
               for grp in groups) >= 2  # the conv-led and the linear-led groups
    fast = list(seen)
    seen.clear()
    monkeypatch.setattr(chains, "linear_part_columns", lambda *a, **k: None)
    monkeypatch.setattr(affine, "linear_part_columns", lambda *a, **k: None)
    slow = [chains.group_matrix(g, grp) for grp in groups]
    affine.fold(g, local, ctx)
    for a, b in zip(direct, slow, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-14 * float(b.abs().max()))
    assert len(fast) == len(seen) > 0
    for (e1, v1, a), (e2, v2, b) in zip(fast, seen, strict=True):
        assert (e1, v1) == (e2, v2)
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-13)
