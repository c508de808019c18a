"""Local SeqLip: per-neuron slope boxes on an input domain (inner_max_box), against brute force and attained
Jacobian norms on the shared LipSDP MNIST network."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn as nn
from conftest import as_double, jacobian_norm, lipsdp_mnist_net

import lipgraph
from lipgraph.bounds import seqlip as S
from lipgraph.bounds.chains import product_interval, product_interval_tensors
from lipgraph.bounds.local import local_constants
from lipgraph.bounds.on_domain import domain_constants
from lipgraph.bounds.ranges import propagate
from lipgraph.domains import Ball
from lipgraph.ops import Settings

D = torch.float64
#: The global certified SeqLip value of the MNIST network (exact inner maximum, rounding margin).
GLOBAL_MNIST = 24.366


def brute_box(a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """max over every vertex of prod_j [lo_j, hi_j] of ||A diag(d) B|| (independent of lipgraph)."""
    verts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=lo.numel())), dtype=D)
    d = lo + (hi - lo) * verts
    mats = torch.einsum("pj,kj,jq->kpq", a, d, b)
    return float(torch.linalg.matrix_norm(mats, ord=2).max())


def random_box(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals with some fixed (a point, possibly 0 or 1), some negative, some plain [0, 1]."""
    lo = torch.randn(n, generator=gen, dtype=D)
    hi = lo + torch.rand(n, generator=gen, dtype=D) * 2
    kind = torch.randint(0, 4, (n,), generator=gen)
    hi = torch.where(kind == 0, lo, hi)  # fixed, arbitrary value
    lo, hi = torch.where(kind == 1, 0.0, lo), torch.where(kind == 1, 1.0, hi)  # ReLU unstable
    fixed01 = (torch.rand(n, generator=gen) < 0.5).to(D)
    lo, hi = torch.where(kind == 2, fixed01, lo), torch.where(kind == 2, fixed01, hi)  # ReLU stable
    return lo, hi


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (3, 1), (4, 3), (6, 6)])
def test_inner_max_box_equals_brute_force(shape):
    gen = torch.Generator().manual_seed(11)
    p, q = shape
    for trial in range(6):
        n = 3 + 2 * trial
        a = torch.randn(p, n, generator=gen, dtype=D)
        b = torch.randn(n, q, generator=gen, dtype=D)
        lo, hi = random_box(n, gen)
        r = S.inner_max_box(a, b, lo, hi)
        exact = brute_box(a, b, lo, hi)
        assert r.certified and r.exact and "local" in r.method
        assert r.lower == pytest.approx(exact, rel=1e-11, abs=1e-14)  # the maximum itself
        assert exact <= r.value <= exact * (1 + 2e-9) + 1e-300  # certified: inflated by the rounding margin
        d = torch.where(r.pattern, hi, lo)  # the reported pattern attains the value
        assert float(torch.linalg.matrix_norm(a @ torch.diag(d) @ b, ord=2)) == pytest.approx(r.lower, rel=1e-9)


def test_inner_max_box_branch_and_bound_and_no_unstable_neuron():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 16, generator=gen, dtype=D), torch.randn(16, 4, generator=gen, dtype=D)
    lo = torch.randn(16, generator=gen, dtype=D)
    hi = lo + torch.rand(16, generator=gen, dtype=D)
    hi[:2] = lo[:2]  # 14 unstable > ENUM_MAX_WIDTH: branch and bound with a base
    r = S.inner_max_box(a, b, lo, hi, max_nodes=10**6)
    assert "branch-and-bound" in r.method and r.exact
    assert r.lower == pytest.approx(brute_box(a, b, lo, hi), rel=1e-11)
    stopped = S.inner_max_box(a, b, lo, hi, max_nodes=1)  # stopped early: still an upper bound
    assert stopped.certified and stopped.value >= brute_box(a, b, lo, hi)
    fixed = S.inner_max_box(a, b, lo, lo)
    assert fixed.exact and fixed.value == pytest.approx(float(torch.linalg.matrix_norm(a @ torch.diag(lo) @ b, 2)))
    with pytest.raises(ValueError):
        S.inner_max_box(a, b, hi, lo - 1)


def test_base_shifts_enumeration_and_branch_and_bound_alike():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 12, generator=gen, dtype=D), torch.randn(12, 3, generator=gen, dtype=D)
    base = torch.randn(4, 3, generator=gen, dtype=D)
    ex = S.enumerate_max(a, b, -0.3, 1.2, base=base)
    bb = S.branch_and_bound(a, b, -0.3, 1.2, max_nodes=10**6, leaf_width=3, base=base)
    assert bb.exact and bb.lower == pytest.approx(ex.lower, rel=1e-11)
    verts = torch.tensor(list(itertools.product([-0.3, 1.2], repeat=12)), dtype=D)
    brute = float(torch.linalg.matrix_norm(base + torch.einsum("pj,kj,jq->kpq", a, verts, b), ord=2).max())
    assert ex.lower == pytest.approx(brute, rel=1e-11) and ex.value >= brute


def test_elementwise_product_interval():
    gen = torch.Generator().manual_seed(2)
    ivs = []
    for _ in range(3):
        lo = torch.randn(20, generator=gen, dtype=D)
        ivs.append((lo, lo + torch.rand(20, generator=gen, dtype=D)))
    lo, hi = product_interval_tensors(ivs)
    for j in range(20):
        a, b = product_interval([(float(x[j]), float(y[j])) for x, y in ivs])
        assert lo[j] <= a and hi[j] >= b and a - lo[j] <= 1e-15 * abs(a) + 1e-300
    relu = (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    lo, hi = product_interval_tensors([relu, relu])
    assert lo.tolist() == [0.0, 1.0, 0.0] and hi.tolist() == [0.0, 1.0, 1.0]  # exact: stable stays stable


def test_missing_neuron_slopes_keep_the_scalar_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    g = lipgraph.trace(model, torch.randn(1, 3))
    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    seg = S.find_segments(g)[0]
    first = seg.activations[0][0]
    slopes = {first: (torch.ones(1, 6, dtype=D), torch.ones(1, 6, dtype=D))}  # the first ReLU all active
    glob = S.segment_bound(g, seg, local)
    loc = S.segment_bound(g, seg, local, settings=Settings(neuron_slopes=slopes))
    assert loc["local"] and not glob["local"] and "1 of 2 activation runs" in loc["method"]
    w = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    ones = (torch.ones(6, dtype=D), torch.ones(6, dtype=D))
    expect = S.seqlip_chain(w, [ones, (0.0, 1.0)]).value  # the per-neuron box on the first ReLU only
    assert loc["seqlip"] == pytest.approx(min(expect, loc["autolip"]), rel=1e-9)
    assert loc["seqlip"] <= glob["seqlip"] * (1 + 1e-12)
    # D_1 = I is one vertex of [0, 1]^6: the attained value there is at most the local bound
    for z in (torch.randn(64, 3, dtype=D) @ w[0].T) @ w[1].T:
        jac = w[2] @ ((z > 0).to(D)[:, None] * w[1]) @ w[0]
        assert float(torch.linalg.matrix_norm(jac, 2)) <= loc["seqlip"] * (1 + 1e-9)


# --- the shared MNIST network -----------------------------------------------------------------------


def _pre_activation_box(w1: torch.Tensor, x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range of W1 x' over {|x' - x|_inf <= r} within [0, 1]^784 (independent of lipgraph)."""
    lo, hi = (x - r).clamp(0, 1), (x + r).clamp(0, 1)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    return w1 @ mid - w1.abs() @ rad, w1 @ mid + w1.abs() @ rad


def _jac_norm(w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w2 @ ((z > 0).to(D)[:, None] * w1), ord=2))


def _realise(w1: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, want: dict[int, bool],
             iters: int = 60) -> torch.Tensor:
    """A point of the box [lo, hi] that tries to give neuron j the sign want[j] (no LP): the box's maximiser
    of sum_j lambda_j sigma_j w1_j . x, coordinatewise, with the weights of violated neurons doubled."""
    idx = torch.tensor(list(want), dtype=torch.long)
    sig = torch.tensor([1.0 if want[j] else -1.0 for j in want], dtype=D)
    lam = torch.ones(len(want), dtype=D)
    x = (lo + hi) / 2
    for _ in range(iters):
        dirn = (lam * sig) @ w1[idx]
        x = torch.where(dirn > 0, hi, lo)
        bad = sig * (w1[idx] @ x) <= 0
        if not bool(bad.any()):
            break
        lam = torch.where(bad, lam * 2, lam)
    return x


def _best_attained(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, r: float, unstable: list[int],
                   top_patterns: list[dict[int, bool]], gen: torch.Generator) -> float:
    lo, hi = (x - r).clamp(0, 1), (x + r).clamp(0, 1)
    best = _jac_norm(w1, w2, w1 @ x)
    pts = lo + (hi - lo) * torch.rand(500, x.numel(), generator=gen, dtype=D)  # interior samples
    signs = torch.rand(500, x.numel(), generator=gen) < 0.5  # random vertices
    pts = torch.cat([pts, torch.where(signs, hi, lo)])
    for j in unstable:  # each unstable neuron pushed to either side
        pts = torch.cat([pts, torch.stack([torch.where(w1[j] > 0, hi, lo), torch.where(w1[j] > 0, lo, hi)])])
    for want in top_patterns:  # the best patterns of the brute force, realised coordinatewise when possible
        pts = torch.cat([pts, _realise(w1, lo, hi, want)[None]])
    for z in pts @ w1.T:
        best = max(best, _jac_norm(w1, w2, z))
    return best


def _local_seqlip(g, glob, x: torch.Tensor, r: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    dom = Ball(x, r, "linf", clip=(0, 1))
    dc = domain_constants(g, glob, propagate(g, dom, x))
    res = S.run(g, dc.local, Settings(neuron_slopes=dc.slopes))
    (rec,) = res.records
    assert rec["certified"] and rec["local"] and "local" in rec["method"]
    assert all(rel.label.startswith("local segment") for rel in res.relations)
    return rec, time.perf_counter() - t0


@pytest.fixture(scope="module")
def mnist():
    net = lipsdp_mnist_net()
    g = lipgraph.trace(net, torch.rand(1, 784))
    glob = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    return g, glob, net[0].weight.detach().double(), net[2].weight.detach().double()


def test_local_seqlip_on_mnist_balls(mnist):
    g, glob, w1, w2 = mnist
    gen = torch.Generator().manual_seed(2024)
    r = 0.02
    rows = []
    for i in range(10):
        x = torch.rand(1, 784, generator=gen, dtype=D)
        rec, seconds = _local_seqlip(g, glob, x, r)
        zlo, zhi = _pre_activation_box(w1, x[0], r)
        unstable = [j for j in range(w1.shape[0]) if zlo[j] < 0 < zhi[j]]
        assert len(unstable) <= 16
        active = (zlo > 0).to(D)
        patterns = []
        for bits in itertools.product([False, True], repeat=len(unstable)):
            d = active.clone()
            d[unstable] = torch.tensor(bits, dtype=D) if unstable else d[unstable]
            patterns.append((float(torch.linalg.matrix_norm(w2 @ (d[:, None] * w1), ord=2)), bits))
        patterns.sort(key=lambda t: -t[0])
        brute = patterns[0][0]  # max over all patterns of the unstable neurons: an upper bound
        top = [dict(zip(unstable, bits, strict=True)) for _, bits in patterns[:16]]
        attained = _best_attained(w1, w2, x[0], r, unstable, top, gen)
        rows.append((i, rec["seqlip"], brute, attained, rec["seqlip"] / attained, len(unstable), seconds))
        assert rec["seqlip"] == pytest.approx(brute, rel=1e-7)  # exact inner enumeration = brute force
        assert rec["seqlip"] >= brute and rec["seqlip"] >= attained
        assert rec["seqlip"] <= 1.15 * attained
    print("\npoint  local-SeqLip  brute-force  attained  ratio  unstable  seconds")
    for i, v, bf, at, ratio, nu, sec in rows:
        print(f"{i:5d}  {v:11.6f}  {bf:11.6f}  {at:8.6f}  {ratio:.4f}  {nu:8d}  {sec:.4f}")


def test_local_seqlip_radius_01_below_the_global_value(mnist):
    g, glob, w1, w2 = mnist
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        x = torch.rand(1, 784, generator=gen, dtype=D)
        rec, seconds = _local_seqlip(g, glob, x, 0.1)
        lo, hi = (x[0] - 0.1).clamp(0, 1), (x[0] + 0.1).clamp(0, 1)
        pts = lo + (hi - lo) * torch.rand(200, 784, generator=gen, dtype=D)
        attained = max(_jac_norm(w1, w2, z) for z in pts @ w1.T)
        print(f"\nradius 0.1: local SeqLip {rec['seqlip']:.6f}, sampled {attained:.6f}, {seconds:.3f} s, "
              f"{rec['method']}")
        assert attained <= rec["seqlip"] < GLOBAL_MNIST


@pytest.mark.parametrize("kind", ["conv-flatten", "unflatten"])
def test_neuron_order_matches_the_group_matrices(kind):
    """Every neuron fixed at its slope at x (the activation pattern of x): local SeqLip is then the exact
    norm ||J(x)||, which only holds when neuron j of the slope tensor is column j of the next group matrix
    (a flatten or reshape between them must keep the row-major order)."""
    torch.manual_seed(1)
    if kind == "conv-flatten":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).eval()
        x = torch.randn(1, 2, 6, 6, dtype=D)
    else:
        model = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (3, 4)), nn.ReLU(), nn.Flatten(),
                              nn.Linear(12, 3)).eval()
        x = torch.randn(1, 5, dtype=D)
    g = lipgraph.trace(model, x.float())
    glob = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    _, values = lipgraph.execute(g, x.float(), keep=True)
    slopes = {}
    for n in lipgraph.ir.nodes(g):
        if n.op == "relu":
            d = (values[n.inputs[0]] > 0).to(D)
            slopes[n.name] = (d, d)
    assert slopes
    rec = S.segment_bound(g, S.find_segments(g)[0], glob, settings=Settings(neuron_slopes=slopes))
    assert rec["local"] and "exact norm" in rec["inner"][0]["method"]
    exact = jacobian_norm(as_double(model), x)
    assert rec["seqlip"] == pytest.approx(exact, rel=1e-6)
    shuffled = {k: (v[0].flip(-1), v[1].flip(-1)) for k, v in slopes.items()}  # a wrong order is detected
    wrong = S.segment_bound(g, S.find_segments(g)[0], glob, settings=Settings(neuron_slopes=shuffled))
    assert wrong["seqlip"] != pytest.approx(exact, rel=1e-6)
