"""SeqLip: exactness of the inner maxima, soundness against brute force and lower bounds."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph.bounds import seqlip as S

D = torch.float64


def brute_force(w1: torch.Tensor, w2: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """max_{s in {lo,hi}^n} ||W2 diag(s) W1|| by listing every pattern."""
    n = w1.shape[0]
    return max(
        float(torch.linalg.matrix_norm(w2 @ torch.diag(torch.tensor(s, dtype=D)) @ w1, ord=2))
        for s in itertools.product([lo, hi], repeat=n)
    )


def seed_formula(w1: torch.Tensor, w2: torch.Tensor) -> float:
    """The published code's 'exact' SeqLip: sqrt(s1 s2) max_s ||S2^(1/2) V2 diag(s) U1 S1^(1/2)||, with
    numpy's ``vh.T`` = V where V^T belongs."""
    u1, s1, _ = torch.linalg.svd(w1)
    _, s2, vh2 = torch.linalg.svd(w2)
    v2 = vh2.T  # the bug: V instead of V^T
    a = torch.diag(s2.sqrt()) @ v2[: s2.numel()]
    b = u1[:, : s1.numel()] @ torch.diag(s1.sqrt())
    inner = brute_force(b, a)
    return inner * float((s1[0] * s2[0]).sqrt())


def mlp(w1: torch.Tensor, w2: torch.Tensor) -> nn.Module:
    m = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0], bias=False), nn.ReLU(),
                      nn.Linear(w2.shape[1], w2.shape[0], bias=False))
    with torch.no_grad():
        m[0].weight.copy_(w1)
        m[2].weight.copy_(w2)
    return m


def test_seed_bug_network_constant_is_exactly_4():
    # W1 invertible: every ReLU pattern is reached, so L = max_s ||W2 diag(s) W1|| = 4 (s = (1, 1)).
    w1 = torch.tensor([[-1.0, 0.0], [-1.0, 2.0]], dtype=D)
    w2 = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=D)
    assert brute_force(w1, w2) == pytest.approx(4.0, abs=1e-12)
    assert seed_formula(w1, w2) < 3.41  # the published formula falls below the true constant
    cb = S.seqlip_chain([w1, w2], [(0.0, 1.0)])
    assert cb.certified and cb.inner[0].exact
    assert 4.0 <= cb.value <= 4.0 * (1 + 1e-8)
    rep = lipgraph.analyze(mlp(w1, w2).float(), torch.randn(1, 2), method="seqlip", lower=False)
    seq = rep.bounds["autolip+seqlip"]
    assert seq.certified and seq.value == pytest.approx(4.0, rel=1e-6)
    assert rep.bounds["autolip"].value > 4.5


@pytest.mark.parametrize("n", [3, 6, 10])
def test_one_hidden_layer_exact_equals_brute_force(n):
    g = torch.Generator().manual_seed(n)
    w1 = torch.randn(n, n + 1, generator=g, dtype=D)  # input dim >= width: every pattern reachable
    w2 = torch.randn(3, n, generator=g, dtype=D)
    truth = brute_force(w1, w2)
    cb = S.seqlip_chain([w1, w2], [(0.0, 1.0)])
    assert cb.inner[0].exact and cb.inner[0].method == "enumeration"
    assert truth <= cb.value <= truth * (1 + 1e-8)
    (a, b), = S.inner_factors([w1, w2])
    bb = S.branch_and_bound(a, b, 0.0, 1.0, leaf_width=2)
    assert bb.exact and truth <= bb.value <= truth * (1 + 1e-8)


def test_greedy_falls_below_the_true_constant():
    g = torch.Generator().manual_seed(243)
    w1 = torch.randn(6, 6, generator=g, dtype=D)
    w2 = torch.randn(2, 6, generator=g, dtype=D)
    truth = brute_force(w1, w2)
    greedy = S.seqlip_lower_chain([w1, w2], [(0.0, 1.0)])
    assert not greedy.certified and "ESTIMATE" in greedy.method
    assert greedy.value < 0.95 * truth  # an estimate, not a bound
    assert S.seqlip_chain([w1, w2], [(0.0, 1.0)]).value >= truth


def test_enumeration_and_branch_and_bound_agree_and_budget_is_honest():
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(18, 2, generator=g, dtype=D), torch.randn(18, 18, generator=g, dtype=D) / 4,
         torch.randn(1, 18, generator=g, dtype=D)]
    (a, b), _ = S.inner_factors(w)
    ex = S.enumerate_max(a, b, 0.0, 1.0)
    bb = S.branch_and_bound(a, b, 0.0, 1.0, max_nodes=10**6)
    assert ex.exact and bb.exact
    assert bb.value == pytest.approx(ex.value, rel=1e-9)
    # A wide layer with a tiny budget: not exact, but a certified value between the best pattern and AutoLip.
    w = [torch.randn(60, 60, generator=g, dtype=D), torch.randn(5, 60, generator=g, dtype=D)]
    (a, b), = S.inner_factors(w)
    r = S.branch_and_bound(a, b, 0.0, 1.0, max_nodes=20)
    assert r.certified and not r.exact and "not exact" in r.method
    assert r.lower <= r.value <= float(torch.linalg.matrix_norm(w[0], 2) * torch.linalg.matrix_norm(w[1], 2))


def test_negative_slopes_use_box_vertices():
    # GELU-like interval [a, b] with a < 0: the norm is convex in the diagonal, so vertices suffice.
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(5, 7, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D)
    lo, hi = -0.13, 1.13
    cb = S.seqlip_chain([w1, w2], [(lo, hi)])
    assert cb.value >= brute_force(w1, w2, lo, hi)
    for _ in range(200):
        d = lo + (hi - lo) * torch.rand(5, generator=g, dtype=D)
        assert float(torch.linalg.matrix_norm(w2 @ torch.diag(d) @ w1, 2)) <= cb.value


def _jacobian_lower(model: nn.Module, shape: tuple[int, ...], points: int = 64) -> float:
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for _ in range(points):
        x = 2 * torch.randn(shape, generator=g, dtype=D)
        j = torch.autograd.functional.jacobian(model, x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(j, 2)))
    return best


ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU}


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("act", list(ACTS))
def test_lower_le_seqlip_le_autolip(depth, act):
    torch.manual_seed(depth * 7 + len(act))
    widths = [4] + [8] * (depth - 1) + [3]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < depth - 1:
            layers.append(ACTS[act]())
    model = nn.Sequential(*layers).double()
    rep = lipgraph.analyze(model.float(), torch.randn(1, 4), method="seqlip", lower=False)
    auto, seq = rep.bounds["autolip"].value, rep.bounds["autolip+seqlip"]
    assert seq.certified
    lower = _jacobian_lower(model.double(), (1, 4))
    assert lower <= seq.value * (1 + 1e-6)
    assert seq.value <= auto * (1 + 1e-9)
    (segment,) = rep.segments
    assert segment["certified"] and len(segment["groups"]) == depth


def test_mlp_bound_matches_chain_and_report_json():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
    rep = lipgraph.analyze(model, torch.randn(1, 2), method="seqlip", lower=False)
    mats = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    cb = S.seqlip_chain(mats, [(0.0, 1.0)] * 2)
    assert rep.bounds["autolip+seqlip"].value == pytest.approx(cb.value, rel=1e-9)
    d = json.loads(json.dumps(rep.to_dict()))
    seg = d["segments"][0]
    assert {"nodes", "autolip", "seqlip", "certified", "method"} <= set(seg)
    assert seg["seqlip"] < seg["autolip"]
    assert rep.upper == pytest.approx(cb.value, rel=1e-9)


def test_conv_segment_dense_and_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 6, 6)
    g = lipgraph.trace(model, x)
    from lipgraph.bounds.local import local_constants
    from lipgraph.ops import Settings

    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    res, segs, _ = S.bound(g, local)
    (seg,) = segs
    assert seg["certified"] and "fallback" not in seg["method"]
    assert res.value <= seg["autolip"] * (1 + 1e-6) or not all(local[n].certified for n in seg["nodes"])
    assert _jacobian_lower(model.double(), (1, 1, 6, 6), 16) <= res.value * (1 + 1e-6)
    _, segs_small, _ = S.bound(g, local, max_nodes=2000, max_dense=50)
    assert "fallback" in segs_small[0]["method"]
    assert segs_small[0]["seqlip"] >= seg["seqlip"] * (1 - 1e-9) or not segs_small[0]["certified"]


def test_greedy_estimate_is_labelled_and_ordered():
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(12, 3, generator=g, dtype=D), torch.randn(12, 12, generator=g, dtype=D),
            torch.randn(2, 12, generator=g, dtype=D)]
    slopes = [(0.0, 1.0)] * 2
    exact = S.seqlip_chain(mats, slopes)
    est = S.seqlip_estimate(mats, slopes)
    top = S.seqlip_estimate(mats, slopes, topk=2)
    assert not est.certified and not top.certified and "top-2" in top.method
    assert est.value <= exact.value
    assert math.isfinite(top.value)


# the swapped ends (1, -1) and (1, 0) name the same vertex sets: the search gave 10.03 < 16.23 and 14.47 < 14.75
# there before it ordered them (found by an independent review)
@pytest.mark.parametrize("slope", [(0.0, 1.0), (0.1, 1.0), (-0.13, 1.13), (0.0, 0.25), (1.0, -1.0), (1.0, 0.0)])
def test_branch_and_bound_matches_enumeration_for_any_interval(slope):
    g = torch.Generator().manual_seed(7)
    for p, q in ((1, 5), (4, 3), (7, 7)):
        a = torch.randn(p, 12, generator=g, dtype=D)
        b = torch.randn(12, q, generator=g, dtype=D)
        ex = S.enumerate_max(a, b, *slope)
        bb = S.branch_and_bound(a, b, *slope, max_nodes=10**6, leaf_width=3)
        root = S.branch_and_bound(a, b, *slope, max_nodes=0, leaf_width=3)  # stops at once: still a bound
        assert bb.exact and bb.value == pytest.approx(ex.value, rel=1e-8)
        assert root.value >= ex.lower


def test_a_failing_segment_keeps_autolip(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("cannot materialise")

    monkeypatch.setattr(S, "group_matrix", boom)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    rep = lipgraph.analyze(model, torch.randn(1, 3), method="seqlip", lower=False)
    (seg,) = rep.segments
    assert not seg["certified"] and "failed" in seg["method"]
    assert rep.bounds["autolip+seqlip"].value == pytest.approx(rep.bounds["autolip"].value)


def test_fallback_counts_each_neighbouring_activation_once():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 50), nn.Sigmoid(), nn.Linear(50, 3),
                          nn.Tanh(), nn.Linear(3, 3))
    g = lipgraph.trace(model, torch.randn(1, 4))
    from lipgraph.bounds.local import local_constants
    from lipgraph.ops import Settings

    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    (seg,) = S.bound(g, local, max_dense=20)[1]
    assert "fallback" in seg["method"] and seg["certified"]
    mats = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    norms = [float(torch.linalg.matrix_norm(w, 2)) for w in mats]
    # the two 50-wide groups are not materialised: every activation touches one, each counted once
    assert seg["seqlip"] == pytest.approx(math.prod(norms) * 1.0 * 0.25 * 1.0, rel=1e-6)
    assert seg["method"].count("too large") == 2


def test_wide_inner_problems_get_only_the_certified_root_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above WIDE_INNER_WORK an inner maximum explores one node: still certified, and never below the full
    search's bound nor the product of the attained pattern values."""
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(20, 20, generator=gen, dtype=torch.float64) for _ in range(3)]
    slopes = [(0.0, 1.0)] * 2
    full = S.seqlip_chain(mats, slopes)
    monkeypatch.setattr(S, "WIDE_INNER_WORK", 10)
    root = S.seqlip_chain(mats, slopes)
    assert root.certified
    assert all(r.nodes <= 1 for r in root.inner if "branch-and-bound" in r.method), [r.nodes for r in root.inner]
    assert any(r.nodes > 1 for r in full.inner if "branch-and-bound" in r.method)
    assert root.value >= full.value * (1 - 1e-12)
    assert root.value >= math.prod(r.lower for r in full.inner)


@pytest.mark.parametrize("slope", [(0.0, 1.0), (0.1, 1.0), (-0.13, 1.13), (1.0, 0.0)])
def test_root_only_search_brackets_the_maximum_with_an_attained_vertex(slope):
    """A search allowed only its root returns the root's bound and the value of the vertex with every slope at
    the end of larger magnitude: the exact maximum lies between them, and the pattern attains the lower one."""
    g = torch.Generator().manual_seed(11)
    for p, q in ((3, 5), (6, 6)):
        a = torch.randn(p, 11, generator=g, dtype=D)
        b = torch.randn(11, q, generator=g, dtype=D)
        ex = S.enumerate_max(a, b, *slope)
        root = S.branch_and_bound(a, b, *slope, max_nodes=1)
        assert root.nodes == 1 and root.certified
        assert root.lower <= ex.value * (1 + 1e-12) and root.value >= ex.value * (1 - 1e-12)
        lo, hi = min(slope), max(slope)
        d = torch.where(root.pattern, torch.tensor(hi, dtype=D), torch.tensor(lo, dtype=D))
        assert float(torch.linalg.matrix_norm(a @ torch.diag(d) @ b, 2)) == pytest.approx(root.lower, rel=1e-12)


@pytest.mark.parametrize("shapes", [((5, 9), (6, 5), (8, 6)), ((7, 4), (3, 7)), ((4, 9), (8, 4)),
                                    ((6, 6), (5, 6), (4, 5), (7, 4))])
def test_end_factors_give_the_svd_pairs_inner_values_on_every_pattern(shapes) -> None:
    """The first and last matrices enter as themselves or a QR triangle: on every pattern, each pair's
    ``||A diag(s) B||`` equals the published SeqLip pair's ``||S~_{i+1} V_{i+1}^T diag(s) U_i S~_i||``, written
    here from full SVDs (so the bound is the same, and so is every inner maximum)."""
    g = torch.Generator().manual_seed(len(shapes) * 7 + shapes[0][1])
    mats = [torch.randn(*sh, generator=g, dtype=D) for sh in shapes]
    svds = [torch.linalg.svd(m, full_matrices=False) for m in mats]
    k = len(mats)
    pairs = S.inner_factors(mats)
    assert len(pairs) == k - 1
    for i, (a, b) in enumerate(pairs):
        u_i, s_i, _ = svds[i]
        _, s_n, vh_n = svds[i + 1]
        b_ref = u_i * (s_i if i == 0 else s_i.sqrt())
        a_ref = (s_n if i + 1 == k - 1 else s_n.sqrt())[:, None] * vh_n
        n = a.shape[1]
        for bits in itertools.product((0.0, 1.0), repeat=n):
            d = torch.tensor(bits, dtype=D)
            got = float(torch.linalg.matrix_norm(a * d @ b, 2))
            want = float(torch.linalg.matrix_norm(a_ref * d @ b_ref, 2))
            assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert pairs[0][1].shape[1] <= min(shapes[0])  # never more columns than the SVD factor
    assert pairs[-1][0].shape[0] <= min(shapes[-1])


def test_wide_matrices_get_a_certified_norm_just_above_the_svd_and_an_attained_one_below() -> None:
    """Above CERTIFIED_NORM_MIN the norms SeqLip needs as upper values come from the Cholesky certificate, not
    eigenvalues: at most NORM_DELTA (on the square) above the float64 SVD's value, never below it, and the
    attained value never above it."""
    g = torch.Generator().manual_seed(21)
    for rows, cols in ((600, 700), (800, 530), (520, 520)):
        x = torch.randn(rows, cols, generator=g, dtype=D) * torch.linspace(0.5, 2.0, cols, dtype=D)
        svd = float(torch.linalg.svdvals(x)[0])
        upper, lower = S._norm_bounds(x)
        assert svd <= upper <= svd * (1 + S.NORM_DELTA), (upper / svd - 1)
        assert svd * (1 - 1e-9) <= lower <= svd * (1 + 1e-12)
    small = torch.randn(30, 40, generator=g, dtype=D)
    assert S._norm_bounds(small) == (S._norm(small), S._norm(small))  # below the line: the eigenvalue value


def test_a_chain_through_the_certified_norms_stays_above_every_attained_pattern(monkeypatch) -> None:
    """The same chain with every norm through the certified route (CERTIFIED_NORM_MIN and DENSE_SVD_MAX lowered
    to 0) bounds every attained pattern (brute force over all 2^8 patterns of its one activation) and moves by at
    most NORM_DELTA from the eigenvalue route's bound."""
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(8, 6, generator=g, dtype=D), torch.randn(5, 8, generator=g, dtype=D)]
    slopes = [(0.0, 1.0)]
    monkeypatch.setattr(S, "WIDE_INNER_WORK", 1)  # the root-only branch: its n0 norm by the certified route too
    before = S.seqlip_chain(mats, slopes)
    monkeypatch.setattr(S, "CERTIFIED_NORM_MIN", 0)
    monkeypatch.setattr(lipgraph.norms, "DENSE_SVD_MAX", 0)  # Lanczos and the Cholesky test at every size
    after = S.seqlip_chain(mats, slopes)
    brute = max(float(torch.linalg.matrix_norm(mats[1] @ torch.diag(torch.tensor(s, dtype=D)) @ mats[0], 2))
                for s in itertools.product((0.0, 1.0), repeat=8))
    assert after.certified and after.value >= brute
    assert before.value >= brute
    assert before.value <= after.value <= before.value * (1 + S.NORM_DELTA)
