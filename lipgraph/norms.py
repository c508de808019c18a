"""Operator norms of the linear ops (Linear, Conv, BatchNorm, linear regions).

Every function returns a :class:`NormResult` that says whether ``upper`` is a
proven upper bound (``certified``) or an estimate, and carries a ``lower``
value (a norm actually attained, up to rounding) when one is known.

All norm computations live in this module so that improving them touches one
place. See ``docs/norms.md`` for the mathematics; in short:

* dense matrices: float64 SVD when small; otherwise the float64 Gram matrix
  ``G = W W^T``, a Lanczos estimate ``theta`` of ``lambda_max(G)`` and a
  Cholesky factorisation of ``c I - G`` with ``c = theta (1 + delta)``: its
  success proves ``||W||^2 <= c`` (rounding accounted for, below);
* convolutions: a zero-padded (strided, dilated, grouped) convolution is a
  restriction of a circular one on a torus of size ``N >= n + pad`` (divisible
  by the stride), whose norm is ``max_f ||B(f)||_2`` over the Fourier blocks
  ``B(f)`` of its polyphase form (Sedghi et al. 2019, with strides: each
  block is ``c_out x c_in s^d``). The Gram blocks ``H(f) = B(f) B(f)^H`` come
  straight from the autocorrelation kernel of ``A A^T`` (a circular conv on the
  coarse torus ``N / s``: ``K(m) = sum W_k W_k'^T`` over tap pairs ``s m`` apart),
  so the cubic work is a few real matmuls per layer instead of one complex
  Gram matrix per frequency. The block maxima are certified with a batched
  Lanczos estimate + one batched Cholesky test; blocks that fail it are
  estimated again, then bracketed by bisection.

Rounding. Weights are converted to float64 / complex128 exactly. The
certified values add explicit bounds for (a) the rounding in forming the
blocks, ``||B_hat - B|| <= c1 u ||sum_k |W_k| ||_F``; (b) forming the Gram
matrices, ``||H_hat - B B^H|| <= 4 (m + 2) u ||B||_F^2`` (from the
autocorrelation kernel: ``2 (c_in + P + S + 128) u ||sum_k |W_k| ||_F^2``, see
:func:`autocorrelation`); (c) Cholesky:
success of floating-point Cholesky on ``M = (c - e - a - 4uc) I - H_hat`` with
``a = 8 (n + 2) n u c`` proves ``M + E`` positive definite for
``||E|| <= a`` (Demmel 1989, Rump 2006), hence ``lambda_max(H_hat) < c - e``
(``4uc`` covers rounding the shift and the diagonal, :func:`cholesky_shift`; the
blocks may be built already shifted, since negating the phases is exact);
and (d) LAPACK eigenvalues, accurate to ``p(n) u ||H||``, covered by the
relative ``ROUNDING_MARGIN`` (1e-9, far above ``64 n u`` for any n < 1e5).
``u = 2^-53`` is the float64 unit roundoff.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import scipy.linalg
import torch
import torch.nn.functional as F

from .core import ROUNDING_MARGIN, Settings

U64 = 2.0**-53
#: Relative slack of the Cholesky certificate on lambda_max (0.1% on sigma^2, i.e. <= 0.05% on sigma).
CHOLESKY_DELTA = 1e-3
#: Blocks (largest trace first) on which the power estimate guiding the Cholesky certificate runs.
ESTIMATE_BLOCKS = 16
#: Matrices whose smaller side is at most this size get a direct float64 SVD.
DENSE_SVD_MAX = 512
#: Batches of more than 4 Gram matrices wider than this get one batched Cholesky certificate, not eigenvalues.
BATCHED_GRAM_MIN = 64
#: Most Lanczos steps (float64) estimating one large Gram matrix before its Cholesky test, stopped early once
#: the estimate settles (40 fixed steps left a 1536-wide Gram matrix 6 tests away; 120 fixed steps on a
#: 4096-wide one cost more than the tests they save).
GRAM_LANCZOS_STEPS = 120
#: Power steps from the Fourier warm start used for the attained (lower) value of a convolution.
WARM_ITERATIONS = 2
#: Complex entries per chunk of Fourier blocks (memory bound, ~128 MB in complex128).
CHUNK_ENTRIES = 1 << 23


@dataclass
class NormResult:
    upper: float
    certified: bool
    method: str
    lower: float | None = None
    details: dict = field(default_factory=dict)


# --- certified lambda_max of batches of PSD matrices ----------------------------------------------


@dataclass
class PsdMax:
    """``upper`` bounds ``max_b lambda_max(H_b)`` of the exact Gram matrices; ``estimate`` is the largest
    Ritz value found, ``index`` the block it belongs to and ``vector`` its Ritz vector (single precision, a
    warm start only; None when bisection found the top block); ``tests``: batched Cholesky tests run."""

    upper: float
    estimate: float
    index: int
    tests: int
    blocks: int = 0
    vector: torch.Tensor | None = None


def _rayleigh_power(h: torch.Tensor, iters: int, seed: int = 0) -> torch.Tensor:
    """Batched power iteration on PSD ``h`` (b, n, n) in single precision: Rayleigh quotients (b,).
    An estimate from below of each lambda_max (it only guides the certificate)."""
    low = h.to(torch.complex64 if h.is_complex() else torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(h.shape[0], h.shape[-1], 1, generator=gen)
    if h.is_complex():
        v = v + 1j * torch.randn(h.shape[0], h.shape[-1], 1, generator=gen)
    v = v.to(device=h.device, dtype=low.dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    for _ in range(iters):
        w = low @ v
        nrm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        v = w / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return (v.mH @ (low @ v)).real[:, 0, 0].to(torch.float64)



def _lanczos_batched(h: torch.Tensor, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest Ritz value of each Hermitian ``h_b`` (b, n, n) after ``steps`` Lanczos steps with full
    re-orthogonalisation, batched, in single precision: (b,) float64, and its Ritz vector (b, n), unit
    norm. Estimates; they guide the certificate and warm-start the attained value."""
    h = h.to(torch.complex64 if h.is_complex() else torch.float32)  # an estimate: single precision suffices
    b, n = h.shape[0], h.shape[-1]
    steps = max(1, min(steps, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, n, generator=gen, dtype=torch.float64)
    if h.is_complex():
        q = q + 1j * torch.randn(b, n, generator=gen, dtype=torch.float64)
    q = q.to(device=h.device, dtype=h.dtype)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    qs = torch.zeros(b, steps, n, dtype=h.dtype, device=h.device)
    alpha = torch.zeros(b, steps, dtype=torch.float64, device=h.device)
    beta = torch.zeros(b, steps, dtype=torch.float64, device=h.device)
    def orthogonalise(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x - ((basis.conj() @ x.unsqueeze(-1)).mT @ basis).squeeze(-2)
        return x

    m = steps
    for k in range(steps):
        qs[:, k] = q
        hq = (h @ q.unsqueeze(-1)).squeeze(-1)
        alpha[:, k] = (q.conj() * hq).sum(-1).real
        if k + 1 == steps:
            break
        basis = qs[:, : k + 1]
        w = orthogonalise(hq, basis)
        nb = torch.linalg.vector_norm(w, dim=-1)
        # an (almost) invariant Krylov space: its Ritz values are exact; restart with a fresh direction
        # (beta = 0 decouples it) instead of normalising single-precision noise
        broken = nb <= 1e-4 * torch.linalg.vector_norm(hq, dim=-1).clamp_min(1e-30)
        beta[:, k] = torch.where(broken, torch.zeros_like(nb), nb).to(torch.float64)
        q = w / torch.where(broken, torch.ones_like(nb), nb).unsqueeze(-1)
        if bool(broken.any()):
            fresh = torch.randn(b, n, generator=gen, dtype=torch.float64)
            if h.is_complex():
                fresh = fresh + 1j * torch.randn(b, n, generator=gen, dtype=torch.float64)
            fresh = orthogonalise(fresh.to(device=h.device, dtype=h.dtype), basis)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=-1, keepdim=True).clamp_min(1e-30)
            q = torch.where(broken.unsqueeze(-1), fresh, q)
    t = torch.diag_embed(alpha[:, :m]) + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
    lam, y = torch.linalg.eigh(t)
    vec = (y[:, :, -1].to(qs.dtype).unsqueeze(-1) * qs[:, :m]).sum(1)
    vec = vec / torch.linalg.vector_norm(vec, dim=-1, keepdim=True).clamp_min(1e-30)
    return lam[:, -1], vec

def lanczos_max(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, device: torch.device,
                steps: int = 80, seed: int = 0, tol: float | None = None) -> float:
    """Largest Ritz value of a symmetric PSD operator after ``steps`` Lanczos steps with full
    re-orthogonalisation (float64); with ``tol``, stops once it moved less than ``tol`` (relative) over the
    last 10 steps (a matvec on a 4096-wide Gram matrix streams 134 MB). An estimate from below of
    lambda_max, not a certificate."""
    steps = min(steps, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    q = q / q.norm()
    qs = torch.zeros(steps, n, dtype=torch.float64, device=device)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    k, last = 0, 0.0
    for k in range(steps):
        qs[k] = q
        w = matvec(q)
        a = torch.dot(q, w)
        w = w - qs[: k + 1].T @ (qs[: k + 1] @ w)
        w = w - qs[: k + 1].T @ (qs[: k + 1] @ w)
        alpha[k] = a
        b = w.norm()
        if k + 1 == steps or float(b) <= 1e-12 * max(float(a), 1e-300):
            break
        beta[k] = b
        q = w / b
        if tol is not None and (k + 1) % 10 == 0:
            ritz = float(scipy.linalg.eigvalsh_tridiagonal(alpha[: k + 1].numpy(), beta[:k].numpy()).max())
            if k + 1 > 10 and ritz - last <= tol * ritz:
                break
            last = ritz
    m = k + 1
    # the tridiagonal solver: a dense eigensolver on T was 40x slower here (0.65 s for m = 120 under load)
    return float(scipy.linalg.eigvalsh_tridiagonal(alpha[:m].numpy(), beta[: m - 1].numpy()).max())


def cholesky_shift(c: float, gram_error: float, n: int, complex_: bool) -> float:
    """The diagonal shift ``c - e - a`` whose Cholesky test certifies ``lambda_max(H) <= c``: ``e`` bounds
    ``||h - H||`` (forming the blocks), ``a = 8 (n + 2) n u c`` (doubled for complex) the Cholesky rounding
    (Demmel 1989), plus ``4 u c`` for rounding the shift and the diagonal ``shift - h_ii`` themselves."""
    a = 8.0 * (n + 2) * n * U64 * c * (2.0 if complex_ else 1.0)
    return c - gram_error - a - 4.0 * U64 * c


_SCRATCH = threading.local()  # per thread: two analyses in two threads must not share blocks


def scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A flat float64 buffer of at least ``numel`` entries, reused from call to call (grow-only, one per
    device and thread): the Fourier blocks of every layer are built and factored in it, so the pages are touched once
    per analysis instead of once per layer (a fresh 100 MB buffer costs 2-3x its matmul in page faults).
    :func:`release_scratch` frees it."""
    bufs: dict[torch.device, torch.Tensor] = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(device)
    if buf is None or buf.numel() < numel:
        bufs.pop(device, None)
        buf = torch.empty(numel, dtype=torch.float64, device=device)
        bufs[device] = buf
    return buf


def release_scratch() -> None:
    """Free this thread's buffers of :func:`scratch` (the passes that compute norms call it when they finish)."""
    _SCRATCH.__dict__.pop("bufs", None)


_POOL: ThreadPoolExecutor | None = None
#: Blocks at most this wide are factored on several threads at once (MKL runs one such factorisation on a
#: single core; wider ones use all cores themselves).
THREADED_CHOLESKY_MAX = 512


def factor_chunks(n_blocks: int, block: Callable[[slice], torch.Tensor], device: torch.device) -> torch.Tensor:
    """Cholesky-factor ``n_blocks`` matrices, ``block(sl)`` returning those of slice ``sl`` as a column-major
    batch that may be overwritten; True where positive definite. On CPU the batch goes in cache-sized chunks
    (``block`` builds each chunk right before it is factored, so it is still in cache), spread over
    ``torch.get_num_threads()`` Python threads when the blocks are at most ``THREADED_CHOLESKY_MAX`` wide
    (MKL factors each small block on one core; torch releases the GIL: 1.5x on 2 cores for 64-128 wide)."""
    global _POOL
    if device.type != "cpu":  # accelerators: one batched call (memory is not the constraint there)
        return torch.linalg.cholesky_ex(block(slice(0, n_blocks)))[1] == 0
    first = block(slice(0, 1))
    n = first.shape[-1]
    per = max(1, (1 << 19) // max(n * n * (2 if first.is_complex() else 1), 1))
    starts = list(range(0, n_blocks, per))
    info = torch.empty(n_blocks, dtype=torch.int32)

    def run(start: int) -> None:
        m, ik = block(slice(start, min(n_blocks, start + per))), info[start:start + per]
        torch.linalg.cholesky_ex(m, out=(m, ik))

    workers = min(torch.get_num_threads(), len(starts))
    if workers < 2 or n > THREADED_CHOLESKY_MAX:
        for st in starts:
            run(st)
    else:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="lipgraph-cholesky",
                                       initializer=torch.set_num_threads, initargs=(1,))
        list(_POOL.map(run, starts))
    return info == 0


def cholesky_in_place(m: torch.Tensor) -> torch.Tensor:
    """Factor the batch ``m`` (b, n, n), column-major, in place (:func:`factor_chunks`); True where it is
    positive definite."""
    return factor_chunks(m.shape[0], lambda sl: m[sl], m.device)


def _cholesky_passes(h: torch.Tensor, c: float, gram_error: float) -> torch.Tensor:
    """Per block: True when floating-point Cholesky of ``shift I - h`` (:func:`cholesky_shift`) succeeds,
    which proves ``lambda_max(H) <= c`` for the exact ``H`` with ``||h - H|| <= e``."""
    shift = cholesky_shift(c, gram_error, h.shape[-1], h.is_complex())

    def shifted(sl: slice) -> torch.Tensor:
        m = -h[sl]
        m.diagonal(dim1=-2, dim2=-1).add_(shift)
        return m.mT  # m^T = conj(m): column-major, definite iff m is

    return factor_chunks(h.shape[0], shifted, h.device)


def certify_psd_max(h: torch.Tensor, gram_error: float, estimate: float | None = None,
                    delta: float = CHOLESKY_DELTA, power_iters: int = 12,
                    lanczos_steps: int = 16) -> PsdMax:
    """Certified upper bound on ``max_b lambda_max(H_b)`` for Hermitian PSD ``H_b = B_b B_b^H``, given the
    computed ``h`` (b, n, n) and ``gram_error >= max_b ||h_b - H_b||_2``.

    Estimate ``theta`` (batched Lanczos, or power iteration when ``lanczos_steps`` is 0, on the
    ``ESTIMATE_BLOCKS`` blocks of largest trace; or ``estimate`` when larger); test ``c = theta (1 + delta)``
    on every block with one batched Cholesky (:func:`_cholesky_passes`). If some blocks fail, Lanczos
    estimates them and they are tested once more at their own level. If some still fail, their
    ``lambda_max`` exceeds ``c`` (up to rounding), so the maximum is bracketed: ``c`` grows until the
    failing blocks pass (x1.01, 1.05, 1.25, then doubling), then bisects (testing only those blocks)
    until ``hi / lo <= 1 + delta``.
    Result ``hi``: certified, and within ``delta`` of the true maximum (plus rounding).
    """
    if h.shape[0] == 0:
        return PsdMax(0.0, 0.0, 0, 0, 0)
    # estimate on the blocks of largest trace only (an estimate just saves Cholesky tests)
    tr = h.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    cand = torch.topk(tr, min(h.shape[0], ESTIMATE_BLOCKS)).indices
    # Lanczos converges to within delta in ~20 steps where the power method is still percents low; an
    # estimate within delta of the maximum lets a single Cholesky pass certify every block
    vector = None
    if lanczos_steps > 0:
        lam, vecs = _lanczos_batched(h[cand], lanczos_steps)
        vector = vecs[int(torch.argmax(lam))]
    else:
        lam = _rayleigh_power(h[cand], power_iters)
    best = int(cand[int(torch.argmax(lam))])
    lam = lam.max().reshape(1)
    theta = max(float(lam[0]), estimate or 0.0, 0.0)
    if theta <= 0.0:
        theta = max(float(h.diagonal(dim1=-2, dim2=-1).real.sum(-1).max()), 1e-300)
    hi = theta * (1.0 + delta) + gram_error
    ok = _cholesky_passes(h, hi, gram_error)
    failed = torch.nonzero(~ok).flatten()
    tests = 1
    if failed.numel() and lanczos_steps > 0:
        # the blocks that failed were not among the estimated ones (or the estimate was short): estimate
        # them and test once more at their level before bracketing
        sub = h[failed]
        pick = torch.topk(sub.diagonal(dim1=-2, dim2=-1).real.sum(-1), min(sub.shape[0], 4 * ESTIMATE_BLOCKS)).indices
        lam2, vecs2 = _lanczos_batched(sub[pick], lanczos_steps)
        th2 = float(lam2.max())
        hi2 = th2 * (1.0 + delta) + gram_error
        if hi2 > hi:
            ok = _cholesky_passes(sub, hi2, gram_error)
            tests += 1
            top2 = int(torch.argmax(lam2))
            if bool(ok.all()):
                return PsdMax(hi2, th2, int(failed[pick[top2]]), tests, h.shape[0], vecs2[top2])
            hi = hi2
            failed = failed[~ok]
    if failed.numel():
        lo = hi
        sub = h[failed]
        passed = False
        for grow in (1.01, 1.05, 1.25, *(2.0**k for k in range(1, 1000))):
            hi = lo * grow
            if not math.isfinite(hi):
                break
            ok = _cholesky_passes(sub, hi, gram_error)
            tests += 1
            if bool(ok.all()):
                passed = True
                break
        if not passed:  # no finite certificate (non-finite entries): say so
            return PsdMax(math.inf, theta, best, tests, h.shape[0], vector)
        while hi > lo * (1.0 + delta):
            mid = math.sqrt(lo * hi)
            ok = _cholesky_passes(sub, mid, gram_error)
            tests += 1
            if bool(ok.all()):
                hi = mid
            else:
                lo = mid
                sub = sub[~ok]
                failed = failed[~ok]
        best = int(failed[0])
        theta = lo
        vector = None
    return PsdMax(hi, theta, best, tests, h.shape[0], vector)


# --- dense matrices --------------------------------------------------------------------------------


def _gram_err(w: torch.Tensor, inner: int) -> float:
    """Bound on ||fl(W W^H) - W W^H||_2 <= 4 (m + 2) u ||W||_F^2 (m = inner dimension)."""
    return 4.0 * (inner + 2) * U64 * float((w.abs() ** 2).sum())


def gram_norm(h: torch.Tensor, err: float) -> NormResult:
    """``sqrt(max_b lambda_max(H_b))`` for exact Gram matrices ``H_b`` given their float64 values ``h``
    (b, n, n) with ``||h_b - H_b||_2 <= err``, certified. ``n <= DENSE_SVD_MAX``: LAPACK eigenvalues
    (backward stable, covered by ``ROUNDING_MARGIN``) plus ``err``. Larger: a float64 Lanczos estimate
    (``GRAM_LANCZOS_STEPS``) and the Cholesky certificate of :func:`certify_psd_max`. More than 4 blocks wider than
    ``BATCHED_GRAM_MIN`` (grouped convs, depthwise convs materialised per group): one batched certificate
    (single-precision Lanczos on the blocks of largest trace, one batched Cholesky: ``n^3 / 3`` flops per
    block where an eigensolve costs ~10 ``n^3``). ``lower``: the square root of the largest eigenvalue /
    Rayleigh quotient found, in float64 (a value the Gram matrix attains, up to rounding)."""
    if h.shape[0] > 4 and h.shape[-1] > BATCHED_GRAM_MIN:  # n^3 / 3 per block instead of ~10 n^3
        r = certify_psd_max(h, err, lanczos_steps=40)
        lower = 0.0
        if r.vector is not None:
            v = r.vector.to(h.dtype)
            lower = math.sqrt(max(float((v.conj() @ h[r.index] @ v).real / (v.conj() @ v).real), 0.0))
        return NormResult(math.sqrt(r.upper) * (1 + ROUNDING_MARGIN), True, "gram-lanczos-cholesky", lower)
    if h.shape[-1] <= DENSE_SVD_MAX:
        lam = float(torch.linalg.eigvalsh(h)[:, -1].max().clamp_min(0.0))
        upper = math.sqrt(lam * (1 + ROUNDING_MARGIN) + err) * (1 + ROUNDING_MARGIN)
        return NormResult(upper, True, "gram-eig", math.sqrt(lam))
    best_upper, best_lower = 0.0, 0.0
    for hb in h:
        theta = lanczos_max(lambda v, hb=hb: hb @ v, hb.shape[0], hb.device, steps=GRAM_LANCZOS_STEPS,
                            tol=CHOLESKY_DELTA / 4)
        r = certify_psd_max(hb[None], err, estimate=theta)
        best_upper = max(best_upper, math.sqrt(r.upper) * (1 + ROUNDING_MARGIN))
        best_lower = max(best_lower, math.sqrt(max(theta, 0.0)))
    return NormResult(best_upper, True, "gram-lanczos-cholesky", best_lower)


def dense_norm(w: torch.Tensor, device: torch.device | str | None = None) -> NormResult:
    """||W||_2 of a dense matrix (batched: max over leading dims), certified: the float64 Gram matrix of
    the smaller side, with rounding bound ``4 (m + 2) u ||W||_F^2``, then :func:`gram_norm`."""
    dev = torch.device(device) if device is not None else w.device
    w64 = w.detach().to(device=dev, dtype=torch.float64)
    if w64.ndim == 1:
        w64 = w64[None, :]
    if w64.numel() == 0:
        return NormResult(0.0, True, "svd", 0.0)
    w64 = w64.reshape(-1, w64.shape[-2], w64.shape[-1])
    rows, cols = w64.shape[-2:]
    a = w64 if rows <= cols else w64.mT
    err = _gram_err(a, a.shape[-1]) if w64.shape[0] == 1 else max(_gram_err(x, x.shape[-1]) for x in a)
    return gram_norm(a @ a.mT, err)


# --- power method (estimates from below) -----------------------------------------------------------


def power_method(
    op: Callable[[torch.Tensor], torch.Tensor],
    in_shape: Sequence[int],
    ctx: Settings,
    iterations: int | None = None,
    dtype: torch.dtype = torch.float32,
    x0: torch.Tensor | None = None,
    tol: float | None = None,
    exact_op: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Largest singular value of the linear map ``op`` by the autograd power method.

    Iterates ``x <- A^T A x / ||A^T A x||`` with ``A^T A x = grad_x 0.5||A x||^2``
    (one forward and one backward pass per step), from ``x0`` or a seeded random
    start; stops early when ``tol`` is given and the relative change of
    ``||A x||`` falls below it. Returns the largest ``||A x||`` seen for unit ``x``:
    a value the operator attains, so an *estimate from below*, never a certificate. With
    ``exact_op`` (the same map in float64) the returned value is ``||A x|| / ||x||`` for the final
    ``x`` evaluated in float64, so float32 rounding cannot push it above the true norm.
    """
    iterations = ctx.power_iterations if iterations is None else iterations
    if x0 is None:
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        x = torch.randn(tuple(in_shape), generator=gen, dtype=dtype).to(ctx.device)
    else:
        x = x0.detach().to(device=ctx.device, dtype=dtype).reshape(tuple(in_shape))
    nx = x.norm()
    if nx == 0:
        return 0.0
    x = x / nx
    best, prev = 0.0, 0.0
    for _ in range(iterations):
        x = x.detach().requires_grad_(True)
        y = op(x)
        sigma = float(y.detach().norm())
        best = max(best, sigma)
        (g,) = torch.autograd.grad(0.5 * (y * y).sum(), x)
        gn = g.norm()
        if gn == 0:
            return best
        x = g / gn
        if tol is not None and prev > 0 and abs(sigma - prev) <= tol * sigma:
            break
        prev = sigma
    with torch.no_grad():
        if exact_op is not None:
            x64 = x.detach().to(torch.float64)
            return float(exact_op(x64).norm() / x64.norm())
        best = max(best, float(op(x).norm()))
    return best


def linear_op_estimate(
    op: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], ctx: Settings
) -> NormResult:
    """Power-method estimate of a linear op's norm (not certified)."""
    s = power_method(op, in_shape, ctx)
    return NormResult(s, False, "power-method", s)


# --- convolutions ----------------------------------------------------------------------------------


@dataclass
class ConvGeometry:
    """A convolution ``y[o] = sum_k W_k x[o s + k dil - pad_l]`` per spatial axis, on input size ``n``.

    ``mode`` is ``"zeros"`` (out-of-range entries are 0) or ``"circular"`` (indices mod n).
    """

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_l: tuple[int, ...]
    pad_r: tuple[int, ...]
    groups: int = 1
    mode: str = "zeros"

    @property
    def out(self) -> tuple[int, ...]:
        return tuple(
            (n + pl + pr - d * (k - 1) - 1) // s + 1
            for n, k, s, d, pl, pr in zip(self.spatial, self.kernel, self.stride, self.dilation, self.pad_l,
                                           self.pad_r, strict=True)
        )

    def min_torus(self) -> tuple[int, ...]:
        """Smallest torus on which the zero-padded conv is a restriction of the circular one:
        ``N >= n + max(pad_l, pad_r)`` (no wrapped index lands on the signal), ``N > (out - 1) s``
        (distinct output positions), ``s | N`` (polyphase)."""
        sizes = []
        for n, s, pl, pr, o in zip(self.spatial, self.stride, self.pad_l, self.pad_r, self.out, strict=True):
            m = max(n + max(pl, pr), (o - 1) * s + 1, 1)
            sizes.append(-(-m // s) * s)
        return tuple(sizes)


def _pairs(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(x) for x in v)
    return v * nd if len(v) == 1 else v


def geometry_from_attrs(attrs: dict, weight: torch.Tensor, spatial: Sequence[int]) -> ConvGeometry:
    """ConvGeometry of a ``conv`` IR node (padding may be an int tuple, ``"same"`` or ``"valid"``)."""
    nd = attrs["ndim"]
    kernel = tuple(weight.shape[2:])
    stride, dil = _pairs(attrs["stride"], nd), _pairs(attrs["dilation"], nd)
    pad = attrs["padding"]
    if pad == "valid":
        pl = pr = (0,) * nd
    elif pad == "same":
        total = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
        pl = tuple(t // 2 for t in total)
        pr = tuple(t - t // 2 for t in total)
    else:
        pl = pr = _pairs(pad, nd)
    return ConvGeometry(tuple(spatial), kernel, stride, dil, pl, pr, int(attrs["groups"]),
                        "circular" if attrs.get("padding_mode", "zeros") == "circular" else "zeros")


@dataclass
class CircularNorm:
    """``upper``: certified norm of the circular conv on ``torus``; ``estimate``: the largest block singular value
    found; ``top``: (group, frequency) of that block; ``vector``: its top singular vector estimate on the
    ``side`` it was computed ("out": left, of ``B B^H``; "in": right, of ``B^H B``), or None."""

    upper: float
    estimate: float
    torus: tuple[int, ...]
    top: tuple[int, tuple[int, ...]] | None
    blocks: int
    cholesky_tests: int
    vector: torch.Tensor | None = None
    side: str = "in"


def _phase_tables(geom: ConvGeometry, torus: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """Per axis, T[k, r, f] = [r == (k dil - pad_l) mod s] exp(2 pi i f q_k / M), q_k = floor((k dil - pad_l) / s),
    M = N / s. The last axis keeps f in [0, M // 2] (conjugate symmetry of real kernels)."""
    tables = []
    nd = len(torus)
    for ax in range(nd):
        k_n, s, d, pl = geom.kernel[ax], geom.stride[ax], geom.dilation[ax], geom.pad_l[ax]
        m = torus[ax] // s
        nf = m // 2 + 1 if ax == nd - 1 else m
        t = torch.zeros(k_n, s, nf, dtype=torch.complex128)
        f = torch.arange(nf, dtype=torch.int64)
        for k in range(k_n):
            off = k * d - pl
            r, q = off % s, off // s
            ang = 2 * math.pi * ((f * q) % m).to(torch.float64) / m
            t[k, r] = torch.polar(torch.ones_like(ang), ang)
        tables.append(t.to(device))
    return tables


def fourier_blocks(w: torch.Tensor, geom: ConvGeometry, torus: Sequence[int], device: torch.device,
                   first_axis: slice | None = None) -> torch.Tensor:
    """Polyphase Fourier blocks of the circular strided conv on ``torus``: shape
    (groups, F_1, ..., F_d, c_out/g, c_in/g * prod(s)), complex128. ``first_axis`` restricts axis-0 frequencies."""
    nd = len(torus)
    g = geom.groups
    w64 = w.detach().to(device=device, dtype=torch.float64)
    co, cig = w64.shape[0] // g, w64.shape[1]
    t = w64.reshape(g, co, cig, *w64.shape[2:]).to(torch.complex128)
    tables = _phase_tables(geom, torus, device)
    if first_axis is not None:
        tables[0] = tables[0][:, :, first_axis]
    # contract each kernel axis with its table: (g, co, ci, K1..Kd) -> (g, co, ci, s1, F1, ..., sd, Fd)
    for ax in range(nd):
        t = torch.tensordot(t, tables[ax], dims=([3 + 2 * ax], [0]))  # K_ax axis sits at 3 + 2*ax... see below
        # tensordot appends (s, F) at the end; move them back next to the previous axes
        t = t.movedim((-2, -1), (3 + 2 * ax, 4 + 2 * ax)) if ax < nd - 1 else t
    # now (g, co, ci, s1, F1, ..., sd, Fd); order -> (g, F1..Fd, co, ci, s1..sd)
    s_axes = [3 + 2 * ax for ax in range(nd)]
    f_axes = [4 + 2 * ax for ax in range(nd)]
    t = t.permute(0, *f_axes, 1, 2, *s_axes)
    fs = t.shape[1: 1 + nd]
    return t.reshape(g, *fs, co, cig * math.prod(geom.stride)).contiguous()


def _abs_sum_frob(w: torch.Tensor) -> float:
    """||sum_k |W_k| ||_F (W as c_out x c_in/g x kernel), for the block rounding bound."""
    a = w.detach().to(torch.float64).abs()
    return float(a.reshape(a.shape[0], a.shape[1], -1).sum(-1).norm())


def _tap_offsets(geom: ConvGeometry) -> list[list[int]]:
    """Per axis, the input offset ``k dil - pad_l`` of each kernel tap."""
    return [[k * d - pl for k in range(kn)] for kn, d, pl in zip(geom.kernel, geom.dilation, geom.pad_l, strict=True)]


def _grid_rows(axes: Sequence[Sequence[int]]) -> torch.Tensor:
    """The points of a grid, one row each, row-major (last axis fastest): (prod len, d) int64."""
    grids = torch.meshgrid(*[torch.tensor(list(a), dtype=torch.int64) for a in axes], indexing="ij")
    return torch.stack([t.reshape(-1) for t in grids], dim=1)


@dataclass
class Autocorrelation:
    """The co x co kernel of ``A A^T`` for the circular strided conv ``A = Sub_s C`` on a torus: ``A A^T`` is the
    circular convolution on the coarse torus ``M = N / s`` with taps ``K(m) = sum W_k W_k'^T`` over tap pairs
    whose offsets differ by ``s m`` (mod ``N``). ``kernels``: (groups, shifts, co/g, co/g) float64; ``shifts``:
    (shifts, d) coarse offsets in ``[0, M)``; ``error``: bound on the rounding of any Fourier block built from
    it (see :func:`gram_blocks`)."""

    kernels: torch.Tensor
    shifts: torch.Tensor
    coarse: tuple[int, ...]
    error: float
    #: lag pairs ``{m, -m}`` packed for :func:`gram_blocks_at` (see :func:`_pack_lags`)
    cos_lags: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.int64))
    sin_lags: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.int64))
    packed: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    cos_traces: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def autocorrelation(w: torch.Tensor, geom: ConvGeometry, torus: Sequence[int], device: torch.device) -> Autocorrelation:
    """Kernel of ``A A^T`` (see :class:`Autocorrelation`). Only tap pairs in the same polyphase class
    (``off_k = off_k' mod s`` on every axis) meet, so each class is one float64 matmul ``(T_c co) x ci x (T_c co)``.

    Rounding: every entry of a Fourier block ``H(f) = sum_m K(m) e^{2 pi i <f, m / M>}`` is a sum of at most
    ``ci + P + S`` rounded steps (matmul, ``P`` pair additions, ``S`` shifts) over products bounded by
    ``(|W|_1 |W|_1^T)_ij`` with ``|W|_1 = sum_k |W_k|``; the phases (angle ``2 pi sum_j (f_j m_j mod M_j) / M_j``
    and its cosine / sine) cost at most ``2 pi (d + 2) d u + u < 100 u`` more for ``d <= 3``. So
    ``||H_hat(f) - H(f)||_2 <= ||.||_F <= 2 (ci + P + S + 128) u || |W|_1 ||_F^2`` (real and imaginary parts,
    ``sqrt 2``, and ``gamma_n = n u / (1 - n u)`` covered by the factor 2; the one extra step of pairing
    lags, ``K(m) +- K(-m)`` in :func:`_pack_lags`, fits in the 28 u left over by the phases).
    """
    nd = len(torus)
    g = geom.groups
    w64 = w.detach().to(device=device, dtype=torch.float64)
    co, ci = w64.shape[0] // g, w64.shape[1]
    taps = w64.reshape(g, co, ci, -1).permute(0, 3, 1, 2)  # (g, T, co, ci), taps in row-major kernel order
    off = _grid_rows(_tap_offsets(geom))  # (T, d)
    stride = torch.tensor(geom.stride, dtype=torch.int64)
    tor = torch.tensor(tuple(torus), dtype=torch.int64)
    coarse = tuple(int(n) // s for n, s in zip(torus, geom.stride, strict=True))
    mcoarse = torch.tensor(coarse, dtype=torch.int64)
    phase = torch.remainder(off, stride)
    classes: dict[tuple[int, ...], list[int]] = {}
    for t, p in enumerate(phase.tolist()):
        classes.setdefault(tuple(p), []).append(t)

    def lag(d: torch.Tensor) -> tuple[int, ...]:
        return tuple(int(x) for x in torch.remainder(torch.remainder(d, tor) // stride, mcoarse))

    # W_a W_b^T for b >= a in one phase class only: W_b W_a^T is its transpose and lands on the opposite lag
    plan = [(members, a, [(lag(off[ka] - off[kb]), lag(off[kb] - off[ka])) for kb in members[a:]])
            for members in classes.values() for a, ka in enumerate(members)]
    keys = sorted({k for _, _, pl in plan for pair in pl for k in pair})
    index = {k: i for i, k in enumerate(keys)}
    kernels = torch.zeros(g, len(keys), co, co, dtype=torch.float64, device=device)
    pairs = 0
    for members, a, pl in plan:
        rest = torch.tensor(members[a:], dtype=torch.int64)
        prod = (taps[:, members[a]] @ taps[:, rest].reshape(g, len(rest) * co, ci).mT).reshape(g, co, len(rest), co)
        for j, (kd, kneg) in enumerate(pl):
            kernels[:, index[kd]] += prod[:, :, j]
            pairs += 1
            if j > 0:  # b != a
                kernels[:, index[kneg]] += prod[:, :, j].mT
                pairs += 1
    shifts = torch.tensor(keys, dtype=torch.int64).reshape(len(keys), nd)
    s1 = _abs_sum_frob(w)
    err = 2.0 * (ci + pairs + len(keys) + 128) * U64 * s1 * s1
    return _pack_lags(Autocorrelation(kernels, shifts, coarse, err))


def _pack_lags(ac: Autocorrelation) -> Autocorrelation:
    """Pair each lag ``m`` with ``-m`` (mod ``M``): ``cos_lags`` hold one lag per pair with ``K(m) + K(-m)``
    (``K(m)`` alone when ``m = -m``), ``sin_lags`` one per pair with ``m != -m`` and ``K(m) - K(-m)``. ``packed``:
    (groups, R + R', co * co * 2) float64, the first ``R`` rows in the even (real) slots, the rest in the odd
    (imaginary) slots, so ``phases @ packed`` is the complex blocks' memory. ``cos_traces``: (groups, R)."""
    g, _, co, _ = ac.kernels.shape
    index = {tuple(k): i for i, k in enumerate(ac.shifts.tolist())}
    cos_pairs, sin_pairs = [], []  # (i, j): K(m) at i, K(-m) at j (None: absent, zero)
    for key, i in index.items():
        neg = tuple((-k) % m for k, m in zip(key, ac.coarse, strict=True))
        j = index.get(neg)
        if neg == key:
            cos_pairs.append((key, i, None))
        elif j is None or key < neg:
            cos_pairs.append((key, i, j))
            sin_pairs.append((key, i, j))
    r, r2 = len(cos_pairs), len(sin_pairs)
    packed = torch.zeros(g, r + r2, co * co, 2, dtype=torch.float64, device=ac.kernels.device)
    traces = torch.zeros(g, r, dtype=torch.float64, device=ac.kernels.device)
    for row, (_, i, j) in enumerate(cos_pairs):
        blk = ac.kernels[:, i] if j is None else ac.kernels[:, i] + ac.kernels[:, j]
        packed[:, row, :, 0] = blk.reshape(g, co * co)
        traces[:, row] = blk.diagonal(dim1=-2, dim2=-1).sum(-1)
    for row, (_, i, j) in enumerate(sin_pairs):
        packed[:, r + row, :, 1] = (ac.kernels[:, i] - ac.kernels[:, j] if j is not None
                                    else ac.kernels[:, i]).reshape(g, co * co)
    nd = len(ac.coarse)
    ac.cos_lags = torch.tensor([k for k, _, _ in cos_pairs], dtype=torch.int64).reshape(r, nd)
    ac.sin_lags = torch.tensor([k for k, _, _ in sin_pairs], dtype=torch.int64).reshape(r2, nd)
    ac.packed = packed.reshape(g, r + r2, co * co * 2)
    ac.cos_traces = traces
    return ac


def half_spectrum(coarse: Sequence[int], first_axis: slice | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The frequencies of the Fourier blocks worth testing: all of the coarse torus ``M`` except that the
    last axis keeps ``f in [0, M // 2]`` (``H(-f)`` is the conjugate of ``H(f)`` for real kernels, same
    spectrum); ``first_axis`` restricts axis-0 frequencies. Rows (F, d) int64, row-major, and the grid shape."""
    nd = len(coarse)
    axes = []
    for ax, m in enumerate(coarse):
        f = torch.arange(m // 2 + 1 if ax == nd - 1 else m, dtype=torch.int64)
        axes.append(f[first_axis] if ax == 0 and first_axis is not None else f)
    return _grid_rows(axes), tuple(len(a) for a in axes)


def _lag_phases(ac: Autocorrelation, freqs: torch.Tensor) -> torch.Tensor:
    """``[cos theta | sin theta]`` (F, R + R') for the packed lags of ``ac`` (:func:`_pack_lags`),
    ``theta = 2 pi sum_j (f_j m_j mod M_j) / M_j`` reduced mod 1 before scaling (exact integer phases)."""
    lags = torch.cat([ac.cos_lags, ac.sin_lags])
    frac = torch.zeros(freqs.shape[0], lags.shape[0], dtype=torch.float64)
    for ax, m in enumerate(ac.coarse):
        frac += torch.remainder(freqs[:, ax:ax + 1] * lags[:, ax].reshape(1, -1), m).to(torch.float64) / m
    ang = (2 * math.pi) * torch.remainder(frac, 1.0)
    r = ac.cos_lags.shape[0]
    return torch.cat([torch.cos(ang[:, :r]), torch.sin(ang[:, r:])], dim=1).to(ac.packed.device)


def gram_blocks_at(ac: Autocorrelation, freqs: torch.Tensor, shift: float | None = None,
                   out: torch.Tensor | None = None, groups: slice | None = None) -> torch.Tensor:
    """Fourier blocks ``H(f) = B(f) B(f)^H = sum_m K(m) e^{2 pi i <f, m / M>}`` of ``A A^T`` at the frequency rows
    ``freqs`` (F, d): (groups, F, co/g, co/g) complex128, Hermitian PSD up to rounding; with ``shift``,
    ``shift I - H(f)`` instead (what the Cholesky test factors, built in place).

    Lags pair up, ``K(-m) = K(m)^T``: ``K(m) e^{i theta} + K(-m) e^{-i theta} = (K(m) + K(-m)) cos theta +
    i (K(m) - K(-m)) sin theta``, so the real and the imaginary parts come from half the lags each, and one
    real matmul against the packed kernels (:func:`_pack_lags`, real parts in even and imaginary parts in
    odd slots) writes the complex blocks directly (into ``out``, a flat float64 scratch buffer, when given;
    only the groups in ``groups`` when given)."""
    packed = ac.packed if groups is None else ac.packed[groups]
    g, co = packed.shape[0], ac.kernels.shape[2]
    phases = _lag_phases(ac, freqs)
    if shift is not None:
        phases = -phases
    shape = (g, freqs.shape[0], co * co * 2)
    if out is None:
        raw = phases @ packed
    else:
        raw = out[: math.prod(shape)].view(shape)
        torch.matmul(phases, packed, out=raw)
    h = torch.view_as_complex(raw.view(g, freqs.shape[0], co, co, 2))
    if shift is not None:
        h.diagonal(dim1=-2, dim2=-1).real.add_(shift)
    return h


def gram_blocks(ac: Autocorrelation, first_axis: slice | None = None) -> torch.Tensor:
    """All blocks of :func:`half_spectrum`: (groups, F_1, ..., F_d, co/g, co/g) complex128."""
    freqs, fshape = half_spectrum(ac.coarse, first_axis)
    h = gram_blocks_at(ac, freqs)
    return h.reshape(h.shape[0], *fshape, *h.shape[-2:])


def block_traces(ac: Autocorrelation, freqs: torch.Tensor) -> torch.Tensor:
    """``tr H(f)`` (groups, F), real: ``sum_m tr(K(m) + K(-m)) cos theta`` over the packed cos lags (cheap; it
    picks the blocks to estimate first)."""
    r = ac.cos_lags.shape[0]
    return ac.cos_traces.to(ac.packed.device) @ _lag_phases(ac, freqs)[:, :r].T


def certify_autocorrelation(ac: Autocorrelation, delta: float = CHOLESKY_DELTA,
                            lanczos_steps: int = 16) -> tuple[PsdMax, torch.Tensor]:
    """Certified ``max_f lambda_max(H(f))`` over every block of :func:`half_spectrum`, without keeping the
    blocks: Lanczos on the ``ESTIMATE_BLOCKS`` blocks of largest trace gives ``theta``; then, a chunk of
    frequencies at a time, ``shift I - H(f)`` is built in place (:func:`gram_blocks_at`) and factored
    (:func:`cholesky_shift`: success proves ``lambda_max <= c = theta (1 + delta) + e``). The blocks that
    fail are rebuilt and handed to :func:`certify_psd_max` (estimate, retest, bracket), a chunk at a time.
    Returns the result (``index`` into groups x frequencies) and the frequency rows."""
    freqs, _ = half_spectrum(ac.coarse)
    g, co = ac.kernels.shape[0], ac.kernels.shape[2]
    n_f = freqs.shape[0]
    tr = block_traces(ac, freqs)
    if co == 1:  # 1x1 blocks (depthwise convs): lambda_max is the block itself, its trace
        best = int(torch.argmax(tr.reshape(-1)))
        top = max(float(tr.reshape(-1)[best]), 0.0)
        one = torch.ones(1, dtype=torch.complex128, device=tr.device)
        return PsdMax(top + ac.error + 2 * U64 * top, top, best, 0, g * n_f, one), freqs
    cand = torch.topk(tr.reshape(-1), min(g * n_f, ESTIMATE_BLOCKS)).indices.cpu()
    cg, cf = cand // n_f, cand % n_f
    hc = gram_blocks_at(ac, freqs[cf])[cg, torch.arange(cand.numel())]
    lam, vecs = _lanczos_batched(hc, lanczos_steps)
    top = int(torch.argmax(lam))
    best, theta, vector = int(cand[top]), max(float(lam[top]), 0.0), vecs[top]
    if theta <= 0.0:
        theta = max(float(tr.max()), 1e-300)
    e = ac.error
    c = theta * (1.0 + delta) + e
    shift = cholesky_shift(c, e, co, True)
    step = max(1, min(n_f, CHUNK_ENTRIES // max(g * co * co, 1)))
    buf = scratch(g * step * co * co * 2, hc.device)
    failed = []
    for start in range(0, n_f, step):
        m = gram_blocks_at(ac, freqs[start:start + step], shift=shift, out=buf).reshape(-1, co, co)
        # factor in place: m^T is conj(m), column-major as LAPACK wants it, positive definite iff m is
        bad = torch.nonzero(~cholesky_in_place(m.mT).cpu()).flatten()
        nf_chunk = m.shape[0] // g
        failed.append((bad // nf_chunk) * n_f + start + bad % nf_chunk)  # back to group * F + f
    failed_all = torch.cat(failed)
    upper, tests = c, 1
    for start in range(0, failed_all.numel(), step):
        idx = failed_all[start:start + step]
        fg, ff = idx // n_f, idx % n_f
        h = torch.empty(idx.numel(), co, co, dtype=torch.complex128, device=hc.device)
        for grp in torch.unique(fg).tolist():  # build each failing block for its own group only
            at = torch.nonzero(fg == grp).flatten()
            h[at.to(hc.device)] = gram_blocks_at(ac, freqs[ff[at]], groups=slice(grp, grp + 1))[0]
        r = certify_psd_max(h, e, estimate=theta, delta=delta, lanczos_steps=lanczos_steps)
        tests += r.tests
        upper = max(upper, r.upper)
        if r.estimate > theta:
            best, theta, vector = int(idx[r.index]), r.estimate, r.vector
    return PsdMax(upper, theta, best, tests, g * n_f, vector), freqs


def circular_conv_norm(w: torch.Tensor, geom: ConvGeometry, torus: Sequence[int],
                       device: torch.device | None = None) -> CircularNorm:
    """Certified ``||Sub_s C||`` of the circular strided conv on ``torus`` (each ``N_j`` divisible by ``s_j``):
    ``max_f ||B(f)||_2`` over its polyphase Fourier blocks ``B(f)`` (``c_out/g x c_in/g s^d``). Exact for the
    circular op up to ``CHOLESKY_DELTA``. Three routes, all certified:

    * all taps in one coarse cell (1x1 kernels, patchify): one frequency; ``B`` is the taps side by side,
      entries exact, :func:`dense_norm`;
    * ``c_out/g <= c_in/g s^d`` (the usual case): ``H(f) = B(f) B(f)^H`` straight from the autocorrelation kernel
      of ``A A^T`` (:func:`autocorrelation`; a few real matmuls instead of one complex Gram matrix per
      frequency), certified by :func:`certify_autocorrelation`;
    * otherwise ``B(f)^H B(f)`` from the polyphase blocks (:func:`fourier_blocks`), plus the block-rounding term.
    """
    dev = device if device is not None else w.device
    nd = len(torus)
    g = geom.groups
    co, cols = w.shape[0] // g, w.shape[1] * math.prod(geom.stride)
    offs = _tap_offsets(geom)
    if all(len({o // s for o in ax}) == 1 for ax, s in zip(offs, geom.stride, strict=True)):
        taps = w.detach().to(device=dev, dtype=torch.float64).reshape(g, co, w.shape[1], -1)
        mats = taps.permute(0, 1, 3, 2).reshape(g, co, -1)
        r = dense_norm(mats, dev)
        grp = int(mats.square().sum((-2, -1)).argmax())  # a group to start the attained value from
        tor = tuple(geom.stride)  # M = 1: a single frequency
        return CircularNorm(r.upper, r.lower or 0.0, tor, (grp, (0,) * nd), g, 0)
    tor = tuple(torus)
    m0 = tor[0] // geom.stride[0]
    if nd == 1:
        m0 = m0 // 2 + 1
    rest = math.prod(t // s for t, s in zip(tor[1:], geom.stride[1:], strict=True)) if nd > 1 else 1
    if co <= cols:
        ac = autocorrelation(w, geom, tor, dev)
        r, freqs = certify_autocorrelation(ac)
        grp, f = divmod(r.index, freqs.shape[0])
        sigma_up = math.sqrt(r.upper) * (1 + ROUNDING_MARGIN)
        return CircularNorm(sigma_up, math.sqrt(max(r.estimate, 0.0)), tor, (grp, tuple(freqs[f].tolist())),
                            r.blocks, r.tests, r.vector, "out")
    best_upper, best_est, top, n_blocks, n_tests, vector = 0.0, 0.0, None, 0, 0, None
    step = max(1, CHUNK_ENTRIES // max(g * rest * co * cols, 1))
    e_blk = 4.0 * (sum(geom.kernel) + 8 * nd) * U64 * _abs_sum_frob(w)
    for start in range(0, m0, step):
        sl = slice(start, min(m0, start + step))
        blk = fourier_blocks(w, geom, tor, dev, sl)
        shape_f = blk.shape[1: 1 + nd]
        b = blk.reshape(-1, co, cols).contiguous()
        n_blocks += b.shape[0]
        if cols == 1:
            v = torch.view_as_real(b).square().sum((-3, -2, -1))
            k = int(torch.argmax(v))
            upper = float(v[k]) * (1 + ROUNDING_MARGIN) + 4.0 * (co + 2) * U64 * float(v[k])
            est, vec = float(v[k]), torch.ones(1, dtype=torch.complex128, device=dev)
        else:
            h = b.mH.contiguous() @ b
            err = 4.0 * (co + 2) * U64 * float(torch.view_as_real(b).square().sum((-3, -2, -1)).max())
            r = certify_psd_max(h, err, estimate=best_est if best_est > 0 else None)
            upper, est, k, vec = r.upper, r.estimate, r.index, r.vector
            n_tests += r.tests
        if est >= best_est:
            idx = list(torch.unravel_index(torch.tensor(k), (g, *shape_f)))
            top = (int(idx[0]), tuple(int(i) + (start if a == 0 else 0) for a, i in enumerate(idx[1:])))
            best_est, vector = est, vec
        best_upper = max(best_upper, upper)
    sigma_up = math.sqrt(best_upper) * (1 + ROUNDING_MARGIN) + e_blk
    return CircularNorm(sigma_up, math.sqrt(max(best_est, 0.0)), tor, top, n_blocks, n_tests, vector, "in")


def single_block(w: torch.Tensor, geom: ConvGeometry, torus: Sequence[int], freq: Sequence[int], group: int,
                 device: torch.device) -> torch.Tensor:
    """One polyphase Fourier block ``B(f) = sum_k W_k e^{2 pi i <f, q_k / M>} [phase r_k]`` of one group:
    (c_out/g, c_in/g * prod(s)) complex128, the same block as :func:`fourier_blocks` (real arithmetic,
    without building the others)."""
    g = geom.groups
    co = w.shape[0] // g
    wg = w.detach()[group * co:(group + 1) * co].to(device=device, dtype=torch.float64)
    taps = wg.reshape(co, wg.shape[1], -1)  # (co, ci, T), row-major taps
    off = _grid_rows(_tap_offsets(geom))  # (T, d)
    stride = torch.tensor(geom.stride, dtype=torch.int64)
    coarse = torch.tensor([t // s for t, s in zip(torus, geom.stride, strict=True)], dtype=torch.int64)
    phase, q = torch.remainder(off, stride), torch.div(off, stride, rounding_mode="floor")
    frac = (torch.remainder(torch.tensor(tuple(freq), dtype=torch.int64) * q, coarse).to(torch.float64)
            / coarse.to(torch.float64)).sum(1)
    ang = (2 * math.pi * torch.remainder(frac, 1.0)).to(device)
    col = torch.zeros(off.shape[0], dtype=torch.int64)
    for ax in range(off.shape[1]):
        col = col * geom.stride[ax] + phase[:, ax]
    col = col.to(device)
    n_ph = math.prod(geom.stride)
    re = torch.zeros(co, taps.shape[1], n_ph, dtype=torch.float64, device=device)
    im = torch.zeros_like(re)
    re.index_add_(2, col, taps * torch.cos(ang))
    im.index_add_(2, col, taps * torch.sin(ang))
    return torch.complex(re, im).reshape(co, -1)

def _top_right_vector(b: torch.Tensor, iters: int = 24) -> torch.Tensor:
    """Top right singular vector of one block (a warm start only, so single precision will do): zero
    columns (phases without taps) dropped; eigenvectors of the smaller Gram matrix when it is at most 256
    wide, else ``iters`` power steps on ``B^H B``."""
    mag = torch.view_as_real(b).abs().sum(-1) if b.is_complex() else b.abs()
    keep = torch.nonzero(mag.sum(0) > 0).flatten()
    v = torch.zeros(b.shape[1], dtype=b.dtype, device=b.device)
    if keep.numel() == 0:
        v[0] = 1.0
        return v
    c = b[:, keep]
    if min(c.shape) <= 256:
        if c.shape[1] <= c.shape[0]:
            top = torch.linalg.eigh(c.mH @ c)[1][:, -1]
        else:
            top = c.mH @ torch.linalg.eigh(c @ c.mH)[1][:, -1]
    else:
        c32 = c.to(torch.complex64 if c.is_complex() else torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(0)
        top = torch.randn(c.shape[1], generator=gen).to(device=c.device, dtype=c32.dtype)
        for _ in range(iters):
            top = c32.mH @ (c32 @ top)
            top = top / top.norm().clamp_min(1e-30)
    v[keep] = top.to(b.dtype)
    return v


def _warm_start(w: torch.Tensor, geom: ConvGeometry, cn: CircularNorm, device: torch.device) -> torch.Tensor | None:
    """A real input (1, c_in, *n) built from the top singular vector of the largest Fourier block:
    ``x[m s + r] = Re(v_r exp(2 pi i f m / M))``, periodic, cropped to the signal."""
    if cn.top is None:
        return None
    grp, freq = cn.top
    nd = len(geom.spatial)
    b = single_block(w, geom, cn.torus, freq, grp, device)
    v = None
    if cn.vector is not None:  # the certificate's Ritz vector: left (B B^H) or right (B^H B)
        vec = cn.vector.to(device=device, dtype=torch.complex128)
        v = b.mH @ vec if cn.side == "out" else vec
        if v.shape[0] != b.shape[1] or not bool(v.norm() > 0):
            v = None
    if v is None:
        v = _top_right_vector(b)
    v = (v / v.norm()).reshape(w.shape[1], *geom.stride)  # (c_in/g, s1..sd)
    x = v
    for ax in range(nd):
        m = cn.torus[ax] // geom.stride[ax]
        ph = torch.polar(torch.ones(m, dtype=torch.float64, device=device),
                         2 * math.pi * (freq[ax] * torch.arange(m, device=device) % m).to(torch.float64) / m)
        # x: (c, N_1..N_ax-1, s_ax, ..., s_d); insert the m axis before s_ax, then flatten to m * s + r
        x = x.unsqueeze(1 + ax) * ph.reshape([m if i == 1 + ax else 1 for i in range(x.ndim + 1)])
        shape = list(x.shape)
        x = x.reshape(*shape[: 1 + ax], shape[1 + ax] * shape[2 + ax], *shape[3 + ax:])
    x = x.real
    # the torus pattern, extended periodically where the torus is smaller than the signal (one-frequency
    # blocks live on a torus of one stride cell), then cropped to the signal
    reps = [1] + [-(-n // t) for n, t in zip(geom.spatial, cn.torus, strict=True)]
    x = x.repeat(*reps)
    crop = tuple(slice(0, n) for n in geom.spatial)
    full = torch.zeros(w.shape[1] * geom.groups, *geom.spatial, dtype=torch.float64, device=device)
    full[grp * w.shape[1]:(grp + 1) * w.shape[1]] = x[(slice(None), *crop)]
    return full[None]


def drop_pointwise_axes(geom: ConvGeometry) -> ConvGeometry:
    """The same norm on fewer pixels: along an axis with kernel size 1 (zero padding), output ``o`` reads input
    ``o s - pad_l`` alone, so the conv is a direct sum, over the outputs that read inside the signal, of one and
    the same conv on the other axes (outputs reading the padding are 0). Its norm is that conv's: the axis
    shrinks to size 1. Kept as is when every axis is pointwise (1x1 convs have their own exact route) or an
    axis reads nothing inside. Inception's 1x7 / 7x1 convs on 12x12 maps become 1-D convs on 12 pixels,
    small enough to materialise: exact instead of 3-5% above."""
    axes = []
    for n, k, s, pl, o in zip(geom.spatial, geom.kernel, geom.stride, geom.pad_l, geom.out, strict=True):
        first = -(-pl // s)  # smallest o with o s - pl >= 0
        axes.append(k == 1 and n > 1 and first <= o - 1 and first * s - pl <= n - 1)
    if not any(axes) or all(k == 1 for k in geom.kernel):
        return geom

    def pick(vals: tuple[int, ...], dropped: int) -> tuple[int, ...]:
        return tuple(dropped if d else v for v, d in zip(vals, axes, strict=True))

    return ConvGeometry(pick(geom.spatial, 1), geom.kernel, pick(geom.stride, 1), pick(geom.dilation, 1),
                        pick(geom.pad_l, 0), pick(geom.pad_r, 0), geom.groups, geom.mode)


def _one_cell_attained(geom: ConvGeometry) -> bool:
    """True when every tap lies in one stride cell (1x1 convs, patchify) and, for zero padding, some output
    reads all its taps inside the signal. Outputs then read disjoint cells, so the conv is ``W_flat`` (taps
    side by side) on each cell, with columns dropped at the border: its norm is exactly ``||W_flat||``."""
    for offs, s, n, o in zip(_tap_offsets(geom), geom.stride, geom.spatial, geom.out, strict=True):
        if len({x // s for x in offs}) != 1:
            return False
        if geom.mode == "zeros":
            first = -(min(offs) // s)  # smallest output o with o s + min(offs) >= 0
            if first > o - 1 or first * s + max(offs) > n - 1:
                return False
        elif n % s or (o - 1) * s >= n:  # circular: exact only on the op's own torus (conv_operator_norm)
            return False
    return True


def _pad_copies(n: int, pl: int, pr: int, mode: str) -> int:
    """Max number of copies of one entry made by 1-D ``mode`` padding (reflect / replicate)."""
    code = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n)
    idx = F.pad(code, (pl, pr), mode=mode).round().long().flatten()
    return int(torch.bincount(idx).max())


def conv_operator_norm(w: torch.Tensor, geom: ConvGeometry, device: torch.device | None = None,
                       extra_tori: int = 0) -> tuple[float, CircularNorm, float]:
    """Certified upper bound on the norm of the conv ``geom`` (zero or circular padding) with kernel ``w``.

    zeros: ``||A|| <= ||Sub_s C_N||`` for any valid torus ``N`` (:meth:`ConvGeometry.min_torus`, and
    ``extra_tori`` more, each ``+s`` larger per axis; the minimum is kept). circular: the op is
    ``Sel o Sub_s C_n`` on its own torus ``n``; exact when ``s | n`` and outputs do not wrap, else
    ``||C_n (stride 1)|| * sqrt(max output multiplicity)``. Returns (upper, best CircularNorm, factor).
    """
    dev = device if device is not None else w.device
    if geom.mode == "circular":
        n, s, out = geom.spatial, geom.stride, geom.out
        if all(ni % si == 0 and (oi - 1) * si < ni for ni, si, oi in zip(n, s, out, strict=True)):
            cn = circular_conv_norm(w, geom, n, dev)
            return cn.upper, cn, 1.0
        g1 = ConvGeometry(n, geom.kernel, (1,) * len(n), geom.dilation, geom.pad_l, geom.pad_r, geom.groups,
                          "circular")
        mult = 1
        for ni, si, oi in zip(n, s, out, strict=True):
            mult *= int(torch.bincount(torch.arange(oi) * si % ni).max())
        cn = circular_conv_norm(w, g1, n, dev)
        return cn.upper * math.sqrt(mult), cn, math.sqrt(mult)
    base = geom.min_torus()
    best: CircularNorm | None = None
    for j in range(extra_tori + 1):
        tor = tuple(b + j * s for b, s in zip(base, geom.stride, strict=True))
        cn = circular_conv_norm(w, geom, tor, dev)
        if best is None or cn.upper < best.upper:
            best = cn
        if best.blocks == 1:  # constant blocks: the torus does not matter
            break
    assert best is not None
    return best.upper, best, 1.0


def _extra_tori(geom: ConvGeometry, weight: torch.Tensor) -> int:
    """Also try up to 3 larger tori when that is cheap (small signals: the sampled frequencies differ,
    and the minimum over valid tori is still a certified bound)."""
    m = math.prod(t // s for t, s in zip(geom.min_torus(), geom.stride, strict=True))
    co, cols = weight.shape[0] // geom.groups, weight.shape[1] * math.prod(geom.stride)
    work = geom.groups * m * co * cols * min(co, cols)
    return 3 if work <= 2e7 else (1 if work <= 1e8 else 0)


def _conv64(weight: torch.Tensor, attrs: dict, transposed: bool,
            device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conv (or transposed conv) node without bias, in float64 (for attained values)."""
    w = weight.detach().to(device=device, dtype=torch.float64)
    nd, a = attrs["ndim"], attrs

    def run(x: torch.Tensor) -> torch.Tensor:
        if transposed:
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
            return fn(x, w, None, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"])
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        if a.get("padding_mode", "zeros") != "zeros":
            return fn(F.pad(x, a["pad_reversed"], mode=a["padding_mode"]), w, None, a["stride"], 0, a["dilation"],
                      a["groups"])
        return fn(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])

    return run


#: Convolutions with at most this many inputs per sample (and a matrix of at most 2^24 entries) are
#: materialised exactly and get a dense certified norm.
SMALL_CONV_INPUTS = 4096
#: ... and, for zero padding (per-group Gram matrices), at most this many Gram entries over all groups.
SMALL_CONV_GRAM_ENTRIES = 1 << 25


def _tap_reads(geom: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Which input pixel each tap reads at each output of a zero-padded conv: ``inside`` (O, T) says the read
    is in the signal, ``flat`` (O, T) its row-major pixel index (clamped where it is not)."""
    outs = _grid_rows([range(o) for o in geom.out])  # (O, d)
    toff = _grid_rows(_tap_offsets(geom))  # (T, d)
    pos = outs[:, None, :] * torch.tensor(geom.stride, dtype=torch.int64) + toff[None]  # (O, T, d)
    inside = ((pos >= 0) & (pos < torch.tensor(geom.spatial, dtype=torch.int64))).all(-1)
    flat = torch.zeros(pos.shape[:2], dtype=torch.int64)
    for ax in range(len(geom.spatial)):
        flat = flat * geom.spatial[ax] + pos[..., ax].clamp(0, geom.spatial[ax] - 1)
    return inside, flat


def _tap_selection(geom: ConvGeometry, device: torch.device) -> torch.Tensor:
    """The 0/1 matrices ``S_k`` (T, O, P): ``S_k[o, p] = 1`` where tap ``k`` reads pixel ``p`` at output ``o``."""
    inside, flat = _tap_reads(geom)
    o_idx, k_idx = torch.nonzero(inside, as_tuple=True)
    sel = torch.zeros(inside.shape[1], inside.shape[0], math.prod(geom.spatial), dtype=torch.float64, device=device)
    sel[k_idx.to(device), o_idx.to(device), flat[o_idx, k_idx].to(device)] = 1.0
    return sel


def conv_input_gram(w: torch.Tensor, geom: ConvGeometry, device: torch.device) -> tuple[torch.Tensor, float]:
    """Exact-structure Gram matrix ``A^T A`` of a zero-padded conv on its input (per group):
    (g, c_in/g * P, c_in/g * P), ``P`` input pixels (row-major, channels inner), float64, and a bound on
    its rounding. Block ``(p, q)`` is ``sum W_k^T W_k'`` over output positions ``o`` and taps with
    ``p = o s + off_k``, ``q = o s + off_k'`` both inside the signal; so only the ``T^2`` products
    ``W_k^T W_k'`` are multiplied, never the dense matrix. Rounding: each entry sums at most ``T`` such
    products of inner size ``c_out/g``, so ``||fl(G) - G||_2 <= ||.||_F <= 4 (c_out/g + T + 2) u ||A||_F^2``
    with ``||A||_F^2 <= (outputs) ||W||_F^2``."""
    g = geom.groups
    w64 = w.detach().to(device=device, dtype=torch.float64)
    co, ci = w64.shape[0] // g, w64.shape[1]
    taps = w64.reshape(g, co, ci, -1).permute(0, 3, 1, 2)  # (g, T, co, ci)
    t_n = taps.shape[1]
    inside, flat = _tap_reads(geom)
    used = torch.nonzero(inside.any(0)).flatten()  # taps that ever read the signal
    slot = torch.full((t_n,), -1, dtype=torch.int64)
    slot[used] = torch.arange(used.numel())
    tu = taps[:, used.to(device)]
    prod = torch.einsum("gkoc,glod->gklcd", tu, tu)  # W_k^T W_l over the used taps: (g, U, U, ci, ci)
    o_idx, k_idx = torch.nonzero(inside, as_tuple=True)
    # all (k, l) pairs at the same output: p = flat[o, k], q = flat[o, l]
    per_o = torch.zeros(inside.shape[0], dtype=torch.int64).index_add_(0, o_idx, torch.ones_like(o_idx))
    first = torch.cumsum(per_o, 0) - per_o
    pairs_o, pairs_a, pairs_b = [], [], []
    for cnt in torch.unique(per_o).tolist():
        if cnt == 0:
            continue
        os_ = torch.nonzero(per_o == cnt).flatten()
        a = torch.arange(cnt)
        aa, bb = torch.meshgrid(a, a, indexing="ij")
        pairs_o.append(os_.repeat_interleave(cnt * cnt))
        pairs_a.append((first[os_][:, None] + aa.reshape(1, -1)).reshape(-1))
        pairs_b.append((first[os_][:, None] + bb.reshape(1, -1)).reshape(-1))
    ia, ib = torch.cat(pairs_a), torch.cat(pairs_b)
    ka, kb = k_idx[ia], k_idx[ib]
    p, q = flat[o_idx[ia], ka], flat[o_idx[ib], kb]
    n_pix = math.prod(geom.spatial)
    gram = torch.zeros(n_pix, n_pix, g, ci, ci, dtype=torch.float64, device=device)
    p, q, ka, kb = (x.to(device) for x in (p, q, ka, kb))
    gram.index_put_((p, q), prod[:, slot[ka].to(device), slot[kb].to(device)].movedim(0, 1), accumulate=True)
    gram = gram.permute(2, 0, 3, 1, 4).reshape(g, n_pix * ci, n_pix * ci)
    frob = float(sum(float(taps[:, k].square().sum()) * int(inside[:, k].sum()) for k in range(t_n)))
    err = 4.0 * (co + t_n + 2) * U64 * frob
    return gram, err

#: Materialising costs about ``groups * (inputs per group)^3 / 3`` flops (a Cholesky or eigensolve per
#: group). Above this it is done only on small maps, where the torus bound is loose.
SMALL_CONV_FLOPS = 2e9


def _worth_materialising(groups: int, per_group: int, geom: ConvGeometry) -> bool:
    """Cheap (``SMALL_CONV_FLOPS``), or a small map: every side at most 4 kernel extents, where the zero
    padding boundary is a large part of the map and the torus bound is percents above the norm. (On a
    28x28 map a 3x3 depthwise conv's torus bound is 0.4% above its norm, at a fiftieth of the cost.)"""
    small = all(n <= 4 * ((k - 1) * d + 1) for n, k, d in zip(geom.spatial, geom.kernel, geom.dilation, strict=True))
    return small or groups * per_group**3 / 3 <= SMALL_CONV_FLOPS


def conv_group_matrices(w: torch.Tensor, geom: ConvGeometry, device: torch.device,
                        groups: slice | None = None, sel: torch.Tensor | None = None) -> torch.Tensor:
    """The exact matrices ``A_g`` (g, c_out/g * O, c_in/g * P) of a zero-padded conv, per group (rows: output
    channel major, then output pixel; columns: input channel major, then pixel): ``A_g = sum_k W_gk (x) S_k``
    with ``S_k`` (O x P) selecting the pixel tap ``k`` reads at each output. For one output and pixel at most
    one tap matches, so every entry is one weight or zero: exact. One matmul ``(g co ci, T) @ (T, O P)``
    (``sel``: :func:`_tap_selection`, when the caller already has it)."""
    sl = groups if groups is not None else slice(0, geom.groups)
    co = w.shape[0] // geom.groups
    wg = w.detach().to(device=device, dtype=torch.float64)[sl.start * co: sl.stop * co]
    g, ci = sl.stop - sl.start, w.shape[1]
    sel = _tap_selection(geom, device) if sel is None else sel
    t_n, n_out, n_pix = sel.shape
    a = (wg.reshape(g * co * ci, t_n) @ sel.reshape(t_n, n_out * n_pix)).reshape(g, co, ci, n_out, n_pix)
    return a.permute(0, 1, 3, 2, 4).reshape(g, co * n_out, ci * n_pix)


def _selection_input_gram(w: torch.Tensor, geom: ConvGeometry, device: torch.device) -> tuple[torch.Tensor, float]:
    """``A_g^T A_g`` per group from :func:`conv_group_matrices` (a chunk of groups at a time), with rounding
    bound ``4 (m + 2) u max_g ||A_g||_F^2``, ``m = c_out/g * O``. Cheaper than :func:`conv_input_gram`'s
    scatter of tap products when the groups are thin (depthwise): see :func:`_small_conv_norm`."""
    g = geom.groups
    per = (w.shape[0] // g) * math.prod(geom.out) * w.shape[1] * math.prod(geom.spatial)
    step = max(1, CHUNK_ENTRIES // max(per, 1))
    grams, frob = [], 0.0
    sel = _tap_selection(geom, device)  # shared by every chunk of groups
    for start in range(0, g, step):
        a = conv_group_matrices(w, geom, device, slice(start, min(g, start + step)), sel)
        frob = max(frob, float(a.square().sum((1, 2)).max()))
        grams.append(a.mT @ a)
    m = (w.shape[0] // g) * math.prod(geom.out)
    return torch.cat(grams), 4.0 * (m + 2) * U64 * frob


def _small_conv_norm(weight: torch.Tensor, attrs: dict, transposed: bool, in_shape: Sequence[int],
                     device: torch.device, geom: ConvGeometry | None = None) -> NormResult | None:
    """Exact norm of a small conv. Zero padding (at most ``SMALL_CONV_INPUTS`` inputs per group): its
    Gram matrix ``A^T A`` per group from the tap products (:func:`conv_input_gram`), then :func:`gram_norm`
    (the max over groups; depthwise convs on small maps are exact this way).
    Other paddings and transposed convs: the exact matrix, the float64 conv of each basis vector (every
    output entry is one weight), then :func:`dense_norm`. None when too large."""
    nd = attrs["ndim"]
    per = tuple(in_shape[-(nd + 1):])
    n_in = math.prod(per)
    zero_pad = geom is not None and not transposed and geom.mode == "zeros"
    if zero_pad and attrs.get("padding_mode", "zeros") == "zeros":
        # groups are independent blocks: the limit is per group (depthwise convs: one channel each)
        per_group = weight.shape[1] * math.prod(geom.spatial)
        if (per_group > SMALL_CONV_INPUTS or geom.groups * per_group * per_group > SMALL_CONV_GRAM_ENTRIES
                or not _worth_materialising(geom.groups, per_group, geom)):
            return None
        # thin groups: A_g^T A_g by a dense matmul (2 c_out/g P^2 flops per input) beats scattering the tap
        # products (~400 flops' time per scattered entry, T^2 of them per output) by far
        t_n = math.prod(geom.kernel)
        if (weight.shape[0] // geom.groups) * math.prod(geom.spatial) ** 2 <= 200 * t_n * t_n:
            gram, err = _selection_input_gram(weight, geom, device)
        else:
            gram, err = conv_input_gram(weight, geom, device)
        r = gram_norm(gram, err)
        return NormResult(r.upper, True, "materialised-" + r.method, r.lower, {"gram": tuple(gram.shape)})
    if n_in > SMALL_CONV_INPUTS or (geom is not None and not _worth_materialising(1, n_in, geom)):
        return None
    run = _conv64(weight, attrs, transposed, device)
    n_out = math.prod(run(torch.zeros(1, *per, dtype=torch.float64, device=device)).shape)
    if n_in * n_out > 1 << 24:
        return None
    basis = torch.eye(n_in, dtype=torch.float64, device=device).reshape(n_in, *per)
    mat = run(basis).reshape(n_in, -1)
    r = dense_norm(mat, device)
    return NormResult(r.upper, True, "materialised-" + r.method, r.lower, {"matrix": (n_out, n_in)})


def conv_norm(forward_no_bias: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int],
              ctx: Settings, weight: torch.Tensor | None = None, attrs: dict | None = None,
              out_shape: Sequence[int] | None = None, transposed: bool = False, lower: bool = True) -> NormResult:
    """Norm of a convolution (or transposed convolution) at the traced input size: an interval.

    Small ops (``SMALL_CONV_INPUTS``) are materialised exactly (:func:`_small_conv_norm`). Otherwise
    ``upper``: certified, from the Fourier blocks of a circular conv that the op restricts
    (:func:`conv_operator_norm`); reflect / replicate padding: ``||conv_valid|| * ||P||``, with
    ``||P|| = prod_axes sqrt(max copies)`` the norm of the padding operator. A transposed conv is the
    adjoint of the conv with the same weight on the transposed op's *output* size (same norm).
    ``lower``: the autograd power method on the real op, warm-started from the top Fourier mode
    (``WARM_ITERATIONS`` steps): a value the operator attains (skipped with ``lower=False``).
    """
    if weight is None or attrs is None:
        return linear_op_estimate(forward_no_bias, in_shape, ctx)
    dev = ctx.device
    nd = attrs["ndim"]
    spatial = tuple(out_shape[-nd:]) if transposed and out_shape is not None else tuple(in_shape[-nd:])
    mode = attrs.get("padding_mode", "zeros")
    factor = 1.0
    if mode in ("reflect", "replicate"):
        pr_ = attrs["pad_reversed"]  # (last axis l, r, ..., first axis l, r)
        pads = [(pr_[2 * (nd - 1 - ax)], pr_[2 * (nd - 1 - ax) + 1]) for ax in range(nd)]
        for ax in range(nd):
            factor *= math.sqrt(_pad_copies(spatial[ax], pads[ax][0], pads[ax][1], mode))
        padded = tuple(n + a + b for n, (a, b) in zip(spatial, pads, strict=True))
        geom = geometry_from_attrs({**attrs, "padding": (0,) * nd, "padding_mode": "zeros"}, weight, padded)
    else:
        geom = geometry_from_attrs(attrs if not transposed else {**attrs, "padding_mode": "zeros"}, weight, spatial)
    exact = _small_conv_norm(weight, attrs, transposed, in_shape, dev,
                             drop_pointwise_axes(geom) if not transposed and geom.mode == "zeros" else geom)
    if exact is not None:
        return exact
    upper, cn, f2 = conv_operator_norm(weight, geom, dev, _extra_tori(geom, weight))
    upper *= factor
    method = "fourier-" + ("circular" if geom.mode == "circular" else "torus") + "x".join(map(str, cn.torus))
    if factor != 1.0:
        method += f"*pad{factor:.3g}"
    details = {"torus": cn.torus, "blocks": cn.blocks, "cholesky_tests": cn.cholesky_tests, "circular": cn.upper,
               "estimate": cn.estimate * f2 * factor}
    if not lower:
        return NormResult(upper, True, method, None, details)
    if factor == 1.0 and f2 == 1.0 and _one_cell_attained(geom):
        # the op is W_flat on disjoint cells: the dense norm's own attained value is the op's
        return NormResult(upper, True, method, cn.estimate, details)
    # lower: warm-started power method on the real operator
    x0 = None
    try:
        x0 = _warm_start(weight, geom, cn, dev)
        if x0 is not None and mode in ("reflect", "replicate"):
            crop = tuple(slice(a, a + n) for n, (a, _) in zip(spatial, pads, strict=True))
            x0 = x0[(slice(None), slice(None), *crop)]
        if x0 is not None and transposed:
            a = attrs
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
            x0 = conv(x0, weight.detach().to(device=dev, dtype=torch.float64), None, a["stride"], a["padding"],
                      a["dilation"], a["groups"])
        if x0 is not None:
            full = torch.zeros(tuple(in_shape), dtype=x0.dtype, device=x0.device)
            if len(in_shape) == nd + 2 and tuple(full.shape[1:]) == tuple(x0.shape[1:]):
                full[0] = x0[0]
                x0 = full
            elif len(in_shape) == nd + 1 and tuple(full.shape) == tuple(x0.shape[1:]):
                x0 = x0[0]
            else:
                x0 = None
    except (RuntimeError, ValueError, IndexError):
        x0 = None
    low = power_method(forward_no_bias, in_shape, ctx, iterations=WARM_ITERATIONS if x0 is not None else None,
                       x0=x0.to(torch.float32) if x0 is not None else None,
                       exact_op=_conv64(weight, attrs, transposed, dev))
    return NormResult(upper, True, method, low, details)


# --- diagonal and selection operators --------------------------------------------------------------


def diagonal_norm(scale: torch.Tensor) -> NormResult:
    """||diag(d)|| = max |d_i| (exact)."""
    v = float(scale.detach().abs().max()) if scale.numel() else 0.0
    return NormResult(v, True, "diagonal", v)


def window_norm(matrices: Sequence[torch.Tensor]) -> NormResult:
    """Norm of a Kronecker product of small matrices: the product of their norms (exact by SVD)."""
    total, lower = 1.0, 1.0
    for m in matrices:
        r = dense_norm(m)
        total *= r.upper
        lower *= r.lower if r.lower is not None else r.upper
    return NormResult(total, True, "kronecker-svd", lower)


def sqrt_count(max_count: int) -> NormResult:
    """Norm of a 0/1 selection matrix whose columns hold at most ``max_count`` ones: sqrt(max_count) (exact)."""
    v = math.sqrt(max_count)
    return NormResult(v, True, "selection-count", v)
