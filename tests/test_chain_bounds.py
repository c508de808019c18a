"""Chain bounds as relation producers (issue 14): Combettes-Pesquet and ECLipsE-Fast.

Soundness against brute force (one hidden layer: every ReLU pattern) and sampled Jacobians (deeper
nets), never above AutoLip's product of norms, the published figures of the LipSDP MNIST network and
the peer figures of ``shared/benchmarks/chains``, and the relations produced by ``run``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import shared_file

import lipgraph
from lipgraph.bounds import combettes_pesquet as cp
from lipgraph.bounds import eclipse_fast as ef
from lipgraph.bounds.chain_mats import autolip_chain, certified_norms
from lipgraph.bounds.local import local_constants
from lipgraph.bounds.relations import combine
from lipgraph.core import Settings

D = torch.float64
#: Peer figures of shared/benchmarks/README.md: (Combettes-Pesquet, ECLipsE-Fast), as printed there.
PEERS = {
    "rand_w80_h2": (2.952, 2.775),
    "rand_w80_h20": (9806, 4610),
    "rand_w80_h50": (1.24e10, 1.81e9),
    "rand_w256_h8": (45.87, 34.82),
    "digits_64_200x3_10": (179.4, 160.2),
}
BOUNDS = {"cp": cp.cp_bound, "ef": ef.eclipse_fast_bound}


def _load(name: str) -> list[torch.Tensor]:
    d = np.load(shared_file(name))
    keys = sorted((k for k in d.files if k[0] == "W" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    return [torch.from_numpy(d[k]).to(D) for k in keys]


def _random_mlp(seed: int, hidden: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    widths = [int(torch.randint(2, 9, (1,), generator=gen)) for _ in range(hidden)]
    d_in = max(widths) + int(torch.randint(0, 3, (1,), generator=gen))  # input dim >= width
    d_out = int(torch.randint(1, 6, (1,), generator=gen))
    dims = [d_in, *widths, d_out]
    return [torch.randn(dims[i + 1], dims[i], generator=gen, dtype=D) / math.sqrt(dims[i])
            for i in range(len(dims) - 1)]


def _brute_force(mats: list[torch.Tensor]) -> float:
    """max over every ReLU pattern of ||W_k D_k ... D_1 W_0|| (all hidden units, small nets only)."""
    widths = [m.shape[0] for m in mats[:-1]]
    best = 0.0
    for s in itertools.product([0.0, 1.0], repeat=sum(widths)):
        j, off = mats[0], 0
        for w, n in zip(mats[1:], widths, strict=True):
            j = w @ (torch.tensor(s[off:off + n], dtype=D)[:, None] * j)
            off += n
        best = max(best, float(torch.linalg.matrix_norm(j, ord=2)))
    return best


def _vertex_max(mats: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """max of ||W_2 D_2 W_1 D_1 W_0|| over every vertex of the slope box (two activations): the supremum over
    the box, since the norm is convex in each D_j."""
    best = 0.0
    for s0 in itertools.product(slopes[0], repeat=mats[0].shape[0]):
        for s1 in itertools.product(slopes[1], repeat=mats[1].shape[0]):
            j = mats[2] @ torch.diag(torch.tensor(s1, dtype=D)) @ mats[1] @ torch.diag(
                torch.tensor(s0, dtype=D)) @ mats[0]
            best = max(best, float(torch.linalg.matrix_norm(j, ord=2)))
    return best


def _sampled(mats: list[torch.Tensor], samples: int = 2000) -> float:
    """Largest Jacobian norm at random inputs (a lower bound on the true constant)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, mats[0].shape[1], generator=gen, dtype=D)
    jac = torch.eye(mats[0].shape[1], dtype=D).expand(samples, -1, -1)
    h = x
    for w in mats[:-1]:
        z = h @ w.T
        mask = (z > 0).to(D)
        jac = mask[:, :, None] * (w @ jac)
        h = z.clamp_min(0)
    jac = mats[-1] @ jac
    return float(torch.linalg.matrix_norm(jac, ord=2).max())


@pytest.mark.parametrize("hidden", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_sound_and_below_autolip_on_random_relu_mlps(seed: int, hidden: int) -> None:
    mats = _random_mlp(seed, hidden)
    slopes = [(0.0, 1.0)] * hidden
    exact = _brute_force(mats) if sum(m.shape[0] for m in mats[:-1]) <= 12 else _sampled(mats)
    lower = max(exact, _sampled(mats))
    auto = math.prod(certified_norms(mats))
    for name, fn in BOUNDS.items():
        v = fn(mats, slopes)
        assert math.isfinite(v), name
        assert v >= lower, (name, v, lower)
        assert v <= auto * (1 + 1e-8), (name, v, auto)


def test_one_hidden_layer_brute_force_with_input_dim_at_least_width() -> None:
    for seed in range(10):
        gen = torch.Generator().manual_seed(100 + seed)
        n = int(torch.randint(2, 9, (1,), generator=gen))
        w0 = torch.randn(n, n + 1, generator=gen, dtype=D)
        w1 = torch.randn(3, n, generator=gen, dtype=D)
        exact = _brute_force([w0, w1])
        cp_v = cp.cp_bound([w0, w1], [(0.0, 1.0)])
        # closed form for one hidden layer: (||W1 W0|| + ||W1|| ||W0||) / 2
        closed = (float(torch.linalg.matrix_norm(w1 @ w0, ord=2))
                  + float(torch.linalg.matrix_norm(w1, ord=2) * torch.linalg.matrix_norm(w0, ord=2))) / 2
        assert cp_v == pytest.approx(closed, rel=1e-8)
        assert cp_v >= exact and ef.eclipse_fast_bound([w0, w1], [(0.0, 1.0)]) >= exact


def test_general_slope_intervals() -> None:
    gen = torch.Generator().manual_seed(7)
    mats = [torch.randn(5, 6, generator=gen, dtype=D), torch.randn(4, 5, generator=gen, dtype=D),
            torch.randn(2, 4, generator=gen, dtype=D)]
    for slopes in ([(0.1, 1.0), (0.25, 1.0)], [(-0.5, 1.0), (0.0, 2.0)]):
        best = _vertex_max(mats, slopes)
        auto = autolip_chain(mats, slopes)
        v = cp.cp_bound(mats, slopes)
        assert best <= v <= auto * (1 + 1e-8)
        e = ef.eclipse_fast_chain(mats, slopes)
        if slopes[0][0] >= 0:
            assert e.certified and best <= e.value <= auto * (1 + 1e-8)
        else:
            assert not e.certified and e.value == math.inf  # a < 0: no certified ECLipsE-Fast value


def test_lipsdp_mnist_published_figures() -> None:
    mats = _load("lipsdp_mnist_784_50_10.npz")
    assert [tuple(m.shape) for m in mats] == [(50, 784), (10, 50)]
    v_cp = cp.cp_bound(mats, [(0.0, 1.0)])
    v_ef = ef.eclipse_fast_bound(mats, [(0.0, 1.0)])
    assert v_cp == pytest.approx(27.765, abs=5e-4)
    assert v_ef == pytest.approx(26.809, abs=5e-4)
    assert 24.366 < v_ef < v_cp < 31.504 * (1 + 1e-4)  # above LipSDP-Neuron, below AutoLip


@pytest.mark.parametrize("name", sorted(PEERS))
def test_shared_chain_networks_peer_figures(name: str) -> None:
    mats = _load(f"chains/{name}.npz")
    slopes = [(0.0, 1.0)] * (len(mats) - 1)
    peer_cp, peer_ef = PEERS[name]
    # the README prints 3-4 significant figures (1.24e10 is 1.2431e10)
    assert cp.cp_bound(mats, slopes) == pytest.approx(peer_cp, rel=3e-3)
    assert ef.eclipse_fast_bound(mats, slopes) == pytest.approx(peer_ef, rel=3e-3)


def test_run_gives_one_relation_per_segment_and_combines() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(1, 6)
    g = lipgraph.trace(model, x)
    settings = Settings()
    local = {k: v[0] for k, v in local_constants(g, settings).items()}
    auto = combine(g, local)[g.graph["output"]]
    mats = [model[i].weight.detach().to(D) for i in (0, 2, 4)]
    lower = _sampled(mats)
    for mod, source in ((cp, "combettes-pesquet"), (ef, "eclipse-fast")):
        res = mod.run(g, local, settings)
        assert len(res.relations) == 1 and len(res.records) == 1
        rel = res.relations[0]
        assert rel.source == source and rel.certified
        assert rel.node == res.records[0]["nodes"][-1] and rel.terms[0].entry == res.records[0]["entry"]
        assert len(res.records[0]["nodes"]) == 5  # the whole Linear-ReLU-Linear-ReLU-Linear chain
        assert res.records[0]["value"] == rel.terms[0].factor and res.records[0]["seconds"] >= 0
        cum = combine(g, local, res.relations)
        assert cum[rel.node].certified and cum[rel.node].via == source
        out = cum[g.graph["output"]]
        assert out.certified and lower <= out.value < auto.value


def test_certify_psd_accepts_definite_and_rejects_barely_indefinite() -> None:
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=D))
    eig = torch.linspace(0.0, 1.0, 40, dtype=D)
    for lam0, expect in ((1e-3, True), (-1e-12, False), (0.0, False)):
        e = eig.clone()
        e[0] = lam0
        b = (q * e) @ q.T
        b = (b + b.T) / 2
        assert ef.certify_psd(b, 0.0) is expect, lam0
    assert not ef.certify_psd(torch.eye(3, dtype=D) * 1e-3, 1e-2)  # the forming error dominates
    assert not ef.certify_psd(torch.zeros(2, 2, dtype=D), 1e-20)
    assert not ef.certify_psd(torch.full((2, 2), float("nan"), dtype=D), 0.0)


def test_run_on_sigmoid_and_tanh_chains_is_sound() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2)).to(D)
    x = torch.randn(1, 5, dtype=D)
    g = lipgraph.trace(model, x)
    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    auto = combine(g, local)[g.graph["output"]].value
    gen = torch.Generator().manual_seed(5)
    lower = 0.0
    for _ in range(200):
        z = torch.randn(5, generator=gen, dtype=D) * 3
        j = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], z)
        lower = max(lower, float(torch.linalg.matrix_norm(j, ord=2)))
    for mod in (cp, ef):
        res = mod.run(g, local, Settings())
        assert len(res.relations) == 1 and res.relations[0].certified
        assert res.records[0]["slopes"] == [[0.0, 0.25], [0.0, 1.0]]
        out = combine(g, local, res.relations)[g.graph["output"]]
        assert out.certified and lower <= out.value <= auto * (1 + 1e-8)
