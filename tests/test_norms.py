"""Certified operator norms against exact ground truth (dense matrices from the Jacobian, float64 SVD).

Every certified value must be >= the exact norm (a value below it is a bug) and close to it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipgraph import norms
from lipgraph.ops.registry import Settings

CTX = Settings()


def exact_norm(op, shape: tuple[int, ...]) -> float:
    """||A||_2 of a linear op from its dense float64 matrix (the op of each basis vector)."""
    n = math.prod(shape[1:])
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    mat = op(basis).reshape(n, -1)
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]))


def _attrs(m: nn.Module) -> dict:
    a = {"ndim": m.weight.ndim - 2, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
         "groups": m.groups}
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        a["output_padding"] = m.output_padding
    else:
        a["padding_mode"] = m.padding_mode
        if m.padding_mode != "zeros":
            a["pad_reversed"] = tuple(m._reversed_padding_repeated_twice)
    return a


def _op64(m: nn.Module):
    m = m.double()
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return norms._conv64(m.weight, _attrs(m), transposed, torch.device("cpu")), transposed


def _materialised_exact(m: nn.Module, shape: tuple[int, ...], method: str = "materialised",
                        batch: int = 1) -> tuple[norms.NormResult, float]:
    """conv_norm of ``m`` on inputs ``(batch, *shape)`` took the ``method`` route and its certified value lies in
    ``[exact, exact (1 + 1e-8)]`` (exact: the dense float64 matrix's norm). Returns the result and the norm."""
    op, _ = _op64(m)
    ex = exact_norm(op, (1, *shape))
    r = norms.conv_norm(lambda x: op(x.double()).float(), (batch, *shape), CTX, m.weight, _attrs(m))
    assert r.method.startswith(method) and ex <= r.upper <= ex * (1 + 1e-8)
    return r, ex


# --- dense -----------------------------------------------------------------------------------------


def test_dense_small_svd_is_certified_and_tight():
    torch.manual_seed(0)
    w = torch.randn(37, 53)
    ex = float(torch.linalg.matrix_norm(w.double(), ord=2))
    r = norms.dense_norm(w)
    assert r.certified and ex <= r.upper <= ex * (1 + 1e-8)


def test_dense_large_gram_cholesky_path(monkeypatch):
    monkeypatch.setattr(norms, "DENSE_SVD_MAX", 32)
    torch.manual_seed(1)
    for shape in [(300, 420), (420, 300), (64, 1000)]:
        w = torch.randn(*shape) / 20
        ex = float(torch.linalg.matrix_norm(w.double(), ord=2))
        r = norms.dense_norm(w)
        assert r.method == "gram-lanczos-cholesky"
        assert r.certified and ex <= r.upper <= ex * 1.001, (shape, ex, r.upper)
        assert r.lower is not None and r.lower <= ex * (1 + 1e-9)


def test_dense_large_low_rank_and_batched(monkeypatch):
    monkeypatch.setattr(norms, "DENSE_SVD_MAX", 8)
    torch.manual_seed(2)
    w = torch.randn(3, 40, 5) @ torch.randn(3, 5, 60)  # rank 5: flat top of the spectrum irrelevant
    ex = float(torch.linalg.matrix_norm(w.double(), ord=2).max())
    r = norms.dense_norm(w)
    assert ex <= r.upper <= ex * 1.001


def test_certify_psd_max_brackets_the_maximum():
    torch.manual_seed(3)
    b = torch.randn(50, 12, 20, dtype=torch.complex128)
    h = b @ b.mH
    true = float(torch.linalg.eigvalsh(h)[:, -1].max())
    r = norms.certify_psd_max(h.clone(), 0.0)
    assert true <= r.upper <= true * (1 + 2 * norms.CHOLESKY_DELTA)
    # a bad (too low) estimate only costs Cholesky tests, never soundness
    r2 = norms.certify_psd_max(h.clone(), 0.0, power_iters=0, lanczos_steps=0)  # a random Rayleigh quotient
    assert true <= r2.upper <= true * (1 + 2 * norms.CHOLESKY_DELTA)


# --- convolutions: the Fourier (torus) path, against the exact matrix ------------------------------

# Fixed weights: the looseness checks below must not depend on the global RNG state at collection.
with torch.random.fork_rng():
    torch.manual_seed(0)
    CONVS = [
        (nn.Conv2d(3, 4, 3, padding=1), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, stride=2), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, stride=2), (1, 3, 9, 7)),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), (1, 4, 8, 8)),
        (nn.Conv2d(3, 5, 5, padding=2, stride=3), (1, 3, 10, 11)),
        (nn.Conv2d(3, 4, 1, stride=2), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, (3, 2), padding="same"), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding="valid"), (1, 3, 8, 8)),
        (nn.Conv2d(4, 8, 3, padding=1, groups=4), (1, 4, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, stride=2, padding_mode="circular"), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, stride=2, padding_mode="circular"), (1, 3, 7, 7)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (1, 3, 8, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (1, 3, 8, 8)),
        (nn.Conv1d(3, 4, 3, padding=1, stride=2), (1, 3, 16)),
        (nn.Conv1d(2, 3, 4, padding=3, dilation=2, stride=3), (1, 2, 17)),
        (nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)), (1, 2, 4, 6, 6)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 5, 5)),
        (nn.ConvTranspose1d(3, 4, 4, stride=2, padding=1), (1, 3, 9)),
        (nn.ConvTranspose2d(4, 6, 3, stride=1, padding=1, groups=2), (1, 4, 6, 6)),
    ]


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_conv_fourier_bound_is_certified(i, monkeypatch):
    """The torus / polyphase bound (materialisation switched off) is never below the exact norm, and
    the interval [power-method value, certified] contains it."""
    monkeypatch.setattr(norms, "SMALL_CONV_INPUTS", 0)
    torch.manual_seed(i)
    m, shape = CONVS[i]
    op, transposed = _op64(m)
    ex = exact_norm(op, shape)
    out = op(torch.zeros(shape, dtype=torch.float64)).shape
    r = norms.conv_norm(lambda x: op(x.double()).float(), shape, CTX, m.weight, _attrs(m), out_shape=out,
                        transposed=transposed)
    assert r.certified and r.method.startswith("fourier")
    assert r.upper >= ex, (r.upper, ex)
    assert r.lower is not None and r.lower <= ex * (1 + 1e-9)
    assert r.upper <= ex * (2.5 if m.padding_mode in ("reflect", "replicate") else 1.35)


def test_conv_circular_is_exact():
    torch.manual_seed(5)
    m = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular").double()
    op, _ = _op64(m)
    ex = exact_norm(op, (1, 4, 8, 8))
    geom = norms.geometry_from_attrs(_attrs(m), m.weight, (8, 8))
    up, _, _ = norms.conv_operator_norm(m.weight, geom)
    assert ex <= up <= ex * (1 + norms.CHOLESKY_DELTA)


@pytest.mark.parametrize("cin,cout,k,stride,n,tol", [(4, 4, 3, 1, 20, 1.01), (4, 8, 3, 2, 20, 1.01),
                                                     (3, 8, 7, 2, 22, 1.05)])
def test_conv_fourier_within_one_percent_on_cnn_shapes(cin, cout, k, stride, n, tol):
    """Zero-padded 'same' convolutions as in torchvision CNNs (padding k // 2): the torus bound is within
    1% of the exact norm for 3x3 kernels once the signal is not tiny (a 7x7 stem on a 22x22 signal: 5%;
    the boundary effect shrinks with n, see docs/norms.md for 224x224)."""
    torch.manual_seed(cin + n)
    m = nn.Conv2d(cin, cout, k, padding=k // 2, stride=stride).double()
    op, _ = _op64(m)
    ex = exact_norm(op, (1, cin, n, n))
    geom = norms.geometry_from_attrs(_attrs(m), m.weight, (n, n))
    up, _, _ = norms.conv_operator_norm(m.weight, geom, extra_tori=norms._extra_tori(geom, m.weight))
    assert ex <= up <= ex * tol, (up / ex)


def test_conv_identity_kernel_rounding():
    """A delta kernel has norm exactly 1: the certified value must not fall below it."""
    w = torch.zeros(5, 5, 3, 3)
    for c in range(5):
        w[c, c, 1, 1] = 1.0
    geom = norms.ConvGeometry((16, 16), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1))
    up, _, _ = norms.conv_operator_norm(w, geom)
    assert 1.0 <= up <= 1.0 + norms.CHOLESKY_DELTA


def test_small_conv_is_materialised_exactly():
    torch.manual_seed(6)
    _materialised_exact(nn.Conv2d(3, 5, 3, padding=1, stride=2), (3, 9, 9), batch=2)


def test_warm_started_lower_is_close(monkeypatch):
    monkeypatch.setattr(norms, "SMALL_CONV_INPUTS", 0)
    torch.manual_seed(7)
    m = nn.Conv2d(4, 4, 3, padding=1)
    op, _ = _op64(m)
    ex = exact_norm(op, (1, 4, 12, 12))
    r = norms.conv_norm(lambda x: F.conv2d(x, m.weight.float(), None, 1, 1), (1, 4, 12, 12), CTX, m.weight,
                        _attrs(m))
    assert r.lower is not None and 0.97 * ex <= r.lower <= ex * (1 + 1e-9) <= r.upper


def test_power_method_is_below_the_norm():
    torch.manual_seed(8)
    w = torch.randn(6, 9)
    ex = float(torch.linalg.matrix_norm(w.double(), ord=2))
    v = norms.power_method(lambda x: x @ w.T, (1, 9), CTX, iterations=200, tol=1e-9,
                           exact_op=lambda x: x @ w.double().T)
    assert 0.99 * ex <= v <= ex * (1 + 1e-12)


# --- autocorrelation route (H(f) = B(f) B(f)^H without forming B(f)) ----------------------------------

GEOMS = [  # (weight shape, spatial, stride, dilation, pad_l, pad_r, groups)
    ((6, 4, 3, 3), (7, 7), (1, 1), (1, 1), (1, 1), (1, 1), 1),
    ((6, 4, 3, 3), (9, 8), (2, 2), (1, 1), (1, 1), (1, 1), 1),
    ((8, 2, 5, 3), (11, 9), (3, 2), (2, 1), (4, 1), (3, 2), 2),
    ((4, 4, 3), (10,), (1,), (3,), (3,), (3,), 1),
    ((6, 1, 4), (13,), (2,), (1,), (2,), (1,), 3),
    ((4, 3, 3, 3, 3), (4, 5, 6), (1, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    ((5, 3, 5, 5), (2, 3), (1, 1), (1, 1), (2, 2), (2, 2), 1),  # torus smaller than the kernel: pairs alias
    ((3, 3, 2, 2), (8, 8), (2, 2), (1, 1), (0, 0), (0, 0), 1),  # patchify: one coarse cell
    ((12, 2, 3, 3), (6, 6), (1, 1), (1, 1), (1, 1), (1, 1), 1),  # c_out > c_in s^d: the B^H B route
    ((9, 1, 3), (8,), (1,), (1,), (1,), (1,), 3),  # ... with one column per block
]


@pytest.mark.parametrize("i", range(len(GEOMS)))
def test_gram_blocks_match_polyphase_blocks(i):
    """H(f) from the autocorrelation kernel equals B(f) B(f)^H from the polyphase blocks, on every frequency,
    within the stated rounding bound."""
    shape, spatial, stride, dil, pl, pr, groups = GEOMS[i]
    torch.manual_seed(100 + i)
    w = torch.randn(shape)
    geom = norms.ConvGeometry(spatial, tuple(shape[2:]), stride, dil, pl, pr, groups)
    torus = geom.min_torus()
    ac = norms.autocorrelation(w, geom, torus, torch.device("cpu"))
    h = norms.gram_blocks(ac)
    b = norms.fourier_blocks(w, geom, torus, torch.device("cpu"))
    ref = b @ b.mH
    assert h.shape == ref.shape
    diff = float(torch.linalg.matrix_norm((h - ref).reshape(-1, *h.shape[-2:]), ord=2).max())
    assert diff <= ac.error, (diff, ac.error)
    assert ac.error <= 1e-10 * float(torch.linalg.matrix_norm(ref.reshape(-1, *h.shape[-2:]), ord=2).max())


@pytest.mark.parametrize("i", range(len(GEOMS)))
def test_circular_norm_routes_agree_with_block_svd(i):
    """Every route of circular_conv_norm (one coarse cell, autocorrelation, B^H B) lands in
    [exact circular norm, exact * (1 + delta)]; the exact value is the largest singular value over all blocks."""
    shape, spatial, stride, dil, pl, pr, groups = GEOMS[i]
    torch.manual_seed(200 + i)
    w = torch.randn(shape)
    geom = norms.ConvGeometry(spatial, tuple(shape[2:]), stride, dil, pl, pr, groups)
    torus = geom.min_torus()
    b = norms.fourier_blocks(w, geom, torus, torch.device("cpu"))
    ex = float(torch.linalg.matrix_norm(b.reshape(-1, *b.shape[-2:]), ord=2).max())
    cn = norms.circular_conv_norm(w, geom, torus)
    assert ex <= cn.upper <= ex * (1 + norms.CHOLESKY_DELTA), (cn.upper / ex)
    assert cn.estimate <= ex * (1 + 1e-6)  # a single-precision Ritz value: an estimate


@pytest.mark.parametrize("i", range(len(GEOMS)))
def test_single_block_matches_fourier_blocks(i):
    shape, spatial, stride, dil, pl, pr, groups = GEOMS[i]
    torch.manual_seed(300 + i)
    w = torch.randn(shape)
    geom = norms.ConvGeometry(spatial, tuple(shape[2:]), stride, dil, pl, pr, groups)
    torus = geom.min_torus()
    b = norms.fourier_blocks(w, geom, torus, torch.device("cpu"))
    freq = tuple(min(1, b.shape[1 + a] - 1) for a in range(len(spatial)))
    for grp in range(groups):
        one = norms.single_block(w, geom, torus, freq, grp, torch.device("cpu"))
        assert torch.allclose(one, b[(grp, *freq)], atol=1e-12)


def test_strided_pointwise_conv_interval_is_exact(monkeypatch):
    """A 1x1 stride-2 conv (ResNet downsample) is W on every kept pixel: norm ||W||, and the warm start (one
    stride cell, repeated over the signal) attains it."""
    monkeypatch.setattr(norms, "SMALL_CONV_INPUTS", 0)
    torch.manual_seed(9)
    m = nn.Conv2d(12, 20, 1, stride=2)
    ex = float(torch.linalg.matrix_norm(m.weight.detach().double()[:, :, 0, 0], ord=2))
    r = norms.conv_norm(lambda x: F.conv2d(x, m.weight, None, 2), (1, 12, 10, 10), CTX, m.weight, _attrs(m))
    assert ex <= r.upper <= ex * (1 + 1e-8)
    assert r.lower is not None and ex * (1 - 1e-6) <= r.lower <= ex * (1 + 1e-9)


def test_certify_psd_max_finds_a_top_block_outside_the_estimated_ones(monkeypatch):
    """The block with the largest eigenvalue has the smallest trace, so the estimate never sees it: the
    Cholesky test must catch it and the result still brackets the true maximum within delta."""
    monkeypatch.setattr(norms, "ESTIMATE_BLOCKS", 2)
    torch.manual_seed(10)
    n, blocks = 12, 9
    h = torch.zeros(blocks, n, n, dtype=torch.float64)
    for k in range(blocks - 1):
        h[k] = torch.eye(n, dtype=torch.float64) * (1.0 + 0.01 * k)  # trace ~12, lambda ~1
    v = torch.randn(n, 1, dtype=torch.float64)
    h[-1] = 3.0 * (v @ v.T) / float(v.T @ v)  # trace 3, lambda 3
    r = norms.certify_psd_max(h, 0.0)
    assert 3.0 <= r.upper <= 3.0 * (1 + norms.CHOLESKY_DELTA) * (1 + 1e-6)
    assert r.index == blocks - 1


@pytest.mark.parametrize("i", range(len(GEOMS)))
def test_conv_input_gram_is_the_exact_gram(i):
    """A^T A from the tap products equals the Gram matrix of the materialised zero-padded conv (per group),
    within the stated rounding bound."""
    shape, spatial, stride, dil, pl, pr, groups = GEOMS[i]
    torch.manual_seed(400 + i)
    w = torch.randn(shape, dtype=torch.float64)
    geom = norms.ConvGeometry(spatial, tuple(shape[2:]), stride, dil, pl, pr, groups)
    gram, err = norms.conv_input_gram(w, geom, torch.device("cpu"))
    nd = len(spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    ci = shape[1]
    n_in = ci * math.prod(spatial)
    for grp in range(groups):
        wg = w[grp * (shape[0] // groups):(grp + 1) * (shape[0] // groups)]
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *spatial, ci).movedim(-1, 1)  # channels inner
        padded = F.pad(basis, [p for a in reversed(range(nd)) for p in (pl[a], pr[a])])
        mat = conv(padded, wg, None, stride, 0, dil).reshape(n_in, -1)
        ref = mat @ mat.T
        diff = float(torch.linalg.matrix_norm(gram[grp] - ref, ord=2))
        assert diff <= err, (diff, err)
    assert err <= 1e-10 * float(torch.linalg.matrix_norm(gram, ord=2).max())


def test_small_zero_padded_conv_uses_the_tap_gram():
    torch.manual_seed(11)
    r, ex = _materialised_exact(nn.Conv2d(6, 8, 3, padding=1, stride=2), (6, 7, 7), "materialised-gram")
    assert r.lower is not None and ex * (1 - 1e-6) <= r.lower <= ex * (1 + 1e-9)


def test_depthwise_conv_on_a_small_map_is_exact_per_group():
    """Depthwise 7x7 on a 7x7 map (ConvNeXt's last stage): the torus bound is far off there; the per-group
    Gram matrices make it exact."""
    torch.manual_seed(13)
    _materialised_exact(nn.Conv2d(6, 6, 7, padding=3, groups=6), (6, 7, 7), "materialised-gram")


# --- the certificate without stored blocks (certify_autocorrelation) ---------------------------------


def _autocorr_case(i: int, seed: int) -> tuple[torch.Tensor, norms.ConvGeometry, norms.Autocorrelation]:
    shape, spatial, stride, dil, pl, pr, groups = GEOMS[i]
    torch.manual_seed(seed)
    w = torch.randn(shape)
    geom = norms.ConvGeometry(spatial, tuple(shape[2:]), stride, dil, pl, pr, groups)
    return w, geom, norms.autocorrelation(w, geom, geom.min_torus(), torch.device("cpu"))


@pytest.mark.parametrize("i", range(7))
def test_shifted_blocks_are_shift_minus_gram(i):
    """gram_blocks_at(shift=c) builds c I - H(f) (what is factored), into a scratch buffer when given."""
    _, _, ac = _autocorr_case(i, 400 + i)
    freqs, _ = norms.half_spectrum(ac.coarse)
    h = norms.gram_blocks_at(ac, freqs)
    buf = torch.full((h.numel() * 2 + 7,), float("nan"), dtype=torch.float64)
    m = norms.gram_blocks_at(ac, freqs, shift=3.5, out=buf)
    eye = torch.eye(h.shape[-1], dtype=torch.complex128)
    assert torch.allclose(m, 3.5 * eye - h, atol=1e-12, rtol=0)
    assert m.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("estimate_blocks", [1, 16])
@pytest.mark.parametrize("i", [0, 1, 2, 3, 5])
def test_certify_autocorrelation_brackets_the_top_block(i, estimate_blocks, monkeypatch):
    """Upper bound in [max lambda, max lambda (1 + delta)] over every block, also when the estimate sees one
    block only (the other blocks fail the first test and take the retest path); the Ritz vector returned is
    a near top eigenvector of the block it names."""
    monkeypatch.setattr(norms, "ESTIMATE_BLOCKS", estimate_blocks)
    _, _, ac = _autocorr_case(i, 500 + i)
    h = norms.gram_blocks(ac)
    h = h.reshape(-1, *h.shape[-2:])  # groups x frequencies, the order of r.index
    lam = torch.linalg.eigvalsh(h)[:, -1]
    true = float(lam.max())
    r, freqs = norms.certify_autocorrelation(ac)
    assert r.blocks == h.shape[0] == ac.packed.shape[0] * freqs.shape[0]
    assert true <= r.upper <= true * (1 + norms.CHOLESKY_DELTA) * (1 + 1e-6) + 2 * ac.error  # estimate: fp32
    assert r.estimate <= true * (1 + 1e-5)
    assert float(lam[r.index]) >= r.estimate * (1 - 1e-5)
    if r.vector is not None:
        v = r.vector.to(torch.complex128)
        rq = float((v.conj() @ h[r.index] @ v).real) / float(v.norm() ** 2)
        assert rq >= 0.98 * float(lam[r.index])


def test_threaded_cholesky_agrees_with_one_call(monkeypatch):
    """cholesky_in_place factors cache-sized chunks on threads: same verdicts as one LAPACK call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.manual_seed(11)
    a = torch.randn(40, 128, 160, dtype=torch.complex128)  # 16 blocks per cache-sized chunk: 3 chunks
    h = a @ a.mH
    lam = torch.linalg.eigvalsh(h)[:, -1]
    c = float(lam.median())
    m = c * torch.eye(128, dtype=torch.complex128) - h
    ok = norms.cholesky_in_place(m.clone().mT)
    expect = torch.linalg.cholesky_ex(m)[1] == 0
    assert bool((ok == expect).all()) and 0 < int(ok.sum()) < 40
    assert bool((ok == (lam < c)).all())


@pytest.mark.parametrize("kernel, stride, pad, n, exact", [
    (1, 1, 0, 5, True),   # pointwise
    (1, 2, 0, 7, True),   # strided pointwise (downsample)
    (4, 4, 0, 16, True),  # patchify
    (4, 4, 0, 3, False),  # patchify on a map smaller than one patch: no output reads every tap
    (1, 1, 1, 4, True),   # 1x1 with padding: border outputs read zeros, interior ones read the tap
    (3, 1, 1, 8, False),  # 3x3: taps span cells
    (2, 2, 1, 6, False),  # 2x2 stride 2 shifted by the padding: taps straddle two cells
])
def test_one_cell_attained(kernel, stride, pad, n, exact):
    geom = norms.ConvGeometry((n, n), (kernel, kernel), (stride, stride), (1, 1), (pad, pad), (pad, pad))
    assert norms._one_cell_attained(geom) == exact


@pytest.mark.parametrize("kernel, stride, pad", [(1, 1, 0), (1, 2, 0), (4, 4, 0), (1, 1, 1)])
def test_one_cell_convs_report_the_exact_interval(kernel, stride, pad, monkeypatch):
    """1x1 and patchify convs: [lower, upper] brackets ||W_flat|| within rounding, without a power method."""
    monkeypatch.setattr(norms, "SMALL_CONV_INPUTS", 0)
    monkeypatch.setattr(norms, "power_method", lambda *a, **k: pytest.fail("power method not needed"))
    torch.manual_seed(12)
    m = nn.Conv2d(6, 10, kernel, stride=stride, padding=pad)
    ex = float(torch.linalg.matrix_norm(m.weight.detach().double().reshape(10, -1), ord=2))
    r = norms.conv_norm(lambda x: m._conv_forward(x, m.weight, None), (1, 6, 16, 16), CTX, m.weight, _attrs(m))
    assert r.lower is not None and ex * (1 - 1e-9) <= r.lower <= ex * (1 + 1e-9) and ex <= r.upper <= ex * 1.001


def test_many_gram_blocks_take_one_batched_certificate():
    """Many blocks (depthwise convs per group) get one batched Lanczos + Cholesky certificate instead of
    eigenvalues: brackets the largest block norm, lower is a float64 Rayleigh quotient below it."""
    torch.manual_seed(13)
    a = torch.randn(12, norms.BATCHED_GRAM_MIN + 8, 60, dtype=torch.float64)
    h = a @ a.mT
    true = math.sqrt(float(torch.linalg.eigvalsh(h)[:, -1].max()))
    r = norms.gram_norm(h, 0.0)
    assert r.method == "gram-lanczos-cholesky"
    assert true <= r.upper <= true * (1 + norms.CHOLESKY_DELTA)
    assert r.lower is not None and 0.99 * true <= r.lower <= true * (1 + 1e-12)


@pytest.mark.parametrize("n, materialised", [(8, True), (12, True), (28, False)])
def test_depthwise_materialised_only_where_cheap_or_small(n, materialised):
    """Per-group materialisation costs a Cholesky per group: kept for small maps (the torus bound is loose
    there), skipped for a 48-channel depthwise 3x3 on 28x28 (0.4% looser, ~50x cheaper)."""
    torch.manual_seed(14)
    m = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
    r = norms.conv_norm(lambda x: m(x), (1, 48, n, n), CTX, m.weight, _attrs(m))
    assert r.method.startswith("materialised") == materialised


@pytest.mark.parametrize("kernel, stride, pad, n", [((1, 5), 1, (0, 2), (6, 9)), ((5, 1), (2, 1), (2, 1), (7, 5)),
                                                    ((1, 3), 2, 1, (7, 7))])
def test_pointwise_axes_dropped_keep_the_exact_norm(kernel, stride, pad, n, monkeypatch):
    """A 1xk conv is a direct sum over the kernel-1 axis: materialised on one row it gives the exact norm of
    the whole op (Inception's 1x7 / 7x1 convs)."""
    torch.manual_seed(15)
    m = nn.Conv2d(4, 5, kernel, stride=stride, padding=pad, bias=False)
    small = norms.drop_pointwise_axes(norms.geometry_from_attrs(_attrs(m), m.weight, n))
    assert math.prod(small.spatial) < math.prod(n)
    monkeypatch.setattr(norms, "SMALL_CONV_INPUTS", 4 * max(small.spatial))  # only the reduced op fits
    _materialised_exact(m, (4, *n))


def test_block_traces_are_groups_by_frequencies():
    """block_traces is (groups, F) like gram_blocks_at; the depthwise shortcut names the top block."""
    _, _, ac = _autocorr_case(2, 600)  # 2 groups
    freqs, _ = norms.half_spectrum(ac.coarse)
    h = norms.gram_blocks_at(ac, freqs)
    tr = norms.block_traces(ac, freqs)
    assert tr.shape == h.shape[:2]
    assert torch.allclose(tr, h.diagonal(dim1=-2, dim2=-1).real.sum(-1), atol=1e-9)
    torch.manual_seed(601)
    w = torch.randn(5, 1, 3, 3)  # depthwise: 1x1 blocks
    geom = norms.ConvGeometry((6, 7), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 5)
    acd = norms.autocorrelation(w, geom, geom.min_torus(), torch.device("cpu"))
    r, fr = norms.certify_autocorrelation(acd)
    lam = norms.gram_blocks_at(acd, fr).real.reshape(-1)
    assert int(torch.argmax(lam)) == r.index and float(lam.max()) <= r.upper <= float(lam.max()) * (1 + 1e-12)


def test_one_cell_circular_needs_the_ops_own_torus():
    """A circular one-cell conv is exact only when the stride divides the size (else the bound is the stride-1
    conv's, and its estimate is not attained)."""
    ok = norms.ConvGeometry((6,), (2,), (2,), (1,), (0,), (0,), 1, "circular")
    bad = norms.ConvGeometry((5,), (2,), (2,), (1,), (0,), (0,), 1, "circular")
    assert norms._one_cell_attained(ok) and not norms._one_cell_attained(bad)


def test_one_cell_conv_takes_the_exact_single_block_route() -> None:
    """A 1x1 conv (and a patchify conv, stride = kernel) on a map small enough to materialise is ||W_flat||
    exactly: the one-cell route certifies that block directly, tighter than materialising its Gram (whose
    Lanczos-Cholesky certificate sits above the norm) and in milliseconds."""
    gen = torch.Generator().manual_seed(3)
    for ci, co, k, n in [(256, 512, 1, 4), (64, 96, 2, 8)]:
        w = torch.randn(co, ci, k, k, generator=gen) / ci ** 0.5
        attrs = {"ndim": 2, "stride": (k, k), "padding": (0, 0), "dilation": (1, 1), "groups": 1,
                 "padding_mode": "zeros"}
        fwd = lambda x, w=w, k=k: F.conv2d(x, w, None, k)  # noqa: E731
        r = norms.conv_norm(fwd, (1, ci, n, n), Settings(), w, attrs, out_shape=(1, co, n // k, n // k))
        exact = float(torch.linalg.matrix_norm(w.reshape(co, -1).double(), 2))
        assert r.certified and r.method.startswith("fourier")
        assert exact <= r.upper <= exact * (1 + 1e-8)


def test_conv_reading_only_padding_is_zero() -> None:
    """A 1x1 conv with stride 3 and padding 1 on a 2x6 map reads only padding at every output: the operator is
    zero (materialising its Gram crashed on an empty list of tap pairs; found by an independent review)."""
    w = torch.randn(2, 1, 1, 1)
    attrs = {"ndim": 2, "stride": (3, 3), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "padding_mode": "zeros"}
    r = norms.conv_norm(lambda z: F.conv2d(z, w, None, 3, 1), (1, 1, 2, 6), Settings(), w, attrs,
                        out_shape=(1, 2, 2, 3), lower=False)
    assert r.certified and r.upper == 0.0


@pytest.mark.parametrize("layout", ["rows", "transposed", "strided", "batched"])
def test_gram_rows_by_syrk_is_the_product(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The one-triangle BLAS Gram (``dsyrk``, mirrored) equals ``A A^T`` to rounding on every memory layout it
    takes (C-ordered, a transpose, a strided view, a batch) and is exactly symmetric."""
    from lipgraph.norms import dense

    monkeypatch.setattr(dense, "SYRK_MIN_WORK", 0)  # every size takes the BLAS route
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 37, 91, generator=gen, dtype=torch.float64)
    a = {"rows": base[0], "transposed": base[0].mT, "strided": base[0][:, ::3], "batched": base}[layout]
    g = dense.gram_rows(a)
    want = a @ a.mT
    assert g.shape == want.shape
    assert torch.equal(g, g.mT)
    assert float((g - want).abs().max()) <= 1e-12 * float(want.abs().max())


@pytest.mark.parametrize("side, selection", [(2, True), (5, False)])
def test_wide_conv_on_a_tiny_map_takes_the_cheaper_gram(monkeypatch: pytest.MonkeyPatch, side: int,
                                                        selection: bool) -> None:
    """With the thin-group rule off, a 3x3 conv on a 2x2 map (``P^2 O / 2 = 32 <= T^2 = 81``) forms its Gram from
    the conv matrix and one on 5x5 by tap products; both certify the exact norm."""
    from lipgraph.norms import materialise

    monkeypatch.setattr(materialise, "SELECTION_GRAM_RATIO", 0)
    calls: list[str] = []
    real_sel, real_tap = materialise._selection_input_gram, materialise.conv_input_gram
    monkeypatch.setattr(materialise, "_selection_input_gram", lambda *a: calls.append("sel") or real_sel(*a))
    monkeypatch.setattr(materialise, "conv_input_gram", lambda *a: calls.append("tap") or real_tap(*a))
    torch.manual_seed(17)
    _materialised_exact(nn.Conv2d(12, 10, 3, padding=1), (12, side, side), "materialised-gram")
    assert calls == (["sel"] if selection else ["tap"])
