"""Certified ``lambda_max`` of batches of Hermitian PSD matrices: Lanczos / power estimates (they only guide
the certificate) and the floating-point Cholesky test of ``shift I - H`` whose success proves
``lambda_max(H) <= c``, with its rounding terms (:func:`cholesky_shift`; the full accounting is in the
package docstring, :mod:`lipgraph.norms`). Also :class:`NormResult`, the result every norm returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import scipy.linalg
import torch

from .. import norms as _pkg
from ..core import run_seed

# Names that tests and benchmarks patch on the package (``lipgraph.norms.X``) are read from it at call
# time, so that one patch reaches every caller: see ``lipgraph/norms/__init__.py``.

U64 = 2.0**-53
#: Relative slack of the Cholesky certificate on lambda_max (0.1% on sigma^2, i.e. <= 0.05% on sigma).
CHOLESKY_DELTA = 1e-3
#: Blocks (largest trace first) on which the power estimate guiding the Cholesky certificate runs.
ESTIMATE_BLOCKS = 16


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
    gen = torch.Generator(device="cpu").manual_seed(run_seed(seed))
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
    gen = torch.Generator(device="cpu").manual_seed(run_seed(seed))
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
    gen = torch.Generator(device="cpu").manual_seed(run_seed(seed))
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
    cand = torch.topk(tr, min(h.shape[0], _pkg.ESTIMATE_BLOCKS)).indices
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
        pick = torch.topk(sub.diagonal(dim1=-2, dim2=-1).real.sum(-1),
                          min(sub.shape[0], 4 * _pkg.ESTIMATE_BLOCKS)).indices
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

