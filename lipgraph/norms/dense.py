"""Dense operator norms by the float64 Gram matrix of the smaller side: LAPACK eigenvalues when it is small,
else a Lanczos estimate and the Cholesky certificate of :mod:`lipgraph.norms.psd`. (No SVD is computed.)"""

from __future__ import annotations

import math

import torch

from .. import norms as _pkg
from ..core import ROUNDING_MARGIN
from .psd import CHOLESKY_DELTA, U64, NormResult, certify_psd_max, lanczos_max

# Names that tests and benchmarks patch on the package (``lipgraph.norms.X``) are read from it at call
# time, so that one patch reaches every caller: see ``lipgraph/norms/__init__.py``.

#: Gram matrices at most this wide (the smaller side of a dense matrix) get LAPACK eigenvalues (``eigvalsh``,
#: backward stable); wider ones a Lanczos estimate and the Cholesky certificate (for 4096 x 9216 a float64 SVD
#: took ~150 s, docs/norms.md). The name is historical: no SVD is computed at any size.
DENSE_SVD_MAX = 512
#: Batches of more than ``BATCHED_GRAM_MIN_BLOCKS`` Gram matrices wider than this get one batched Cholesky
#: certificate, not eigenvalues (``n^3 / 3`` flops per block where an eigensolve costs ~``10 n^3``).
BATCHED_GRAM_MIN = 64
#: Most Lanczos steps (float64) estimating one large Gram matrix before its Cholesky test, stopped early once
#: the estimate settles (40 fixed steps left a 1536-wide Gram matrix 6 tests away; 120 fixed steps on a
#: 4096-wide one cost more than the tests they save).
GRAM_LANCZOS_STEPS = 120
#: See ``BATCHED_GRAM_MIN`` (grouped and depthwise convs materialised per group come in such batches).
BATCHED_GRAM_MIN_BLOCKS = 4


#: Gram matrices ``A A^T`` of CPU float64 matrices with at least this many multiply-adds (``n^2 m``) are formed
#: by BLAS ``dsyrk``, which computes one triangle: half the flops of a matrix product. VGG-11's 4096 x 25088
#: classifier at 2 threads (machine shared with two test processes): ``a @ a.mT`` 17.2 s, ``dsyrk`` 7.8 s. Below
#: this the product is fast anyway.
SYRK_MIN_WORK = 2**27


def gram_rows(a: torch.Tensor) -> torch.Tensor:
    """``A A^T`` of a real matrix (or a batch of them). Large CPU float64 ones by BLAS ``dsyrk`` (one triangle,
    mirrored), the others by a product; both are floating-point sums of the same products, so the rounding bound
    of :func:`_gram_err` holds for either (it does not depend on the order of summation)."""
    n, m = a.shape[-2], a.shape[-1]
    if (a.device.type != "cpu" or a.dtype != torch.float64 or n * n * m < SYRK_MIN_WORK or n < 2):
        return a @ a.mT
    if a.ndim > 2:
        return torch.stack([gram_rows(x) for x in a.reshape(-1, n, m)]).reshape(*a.shape[:-1], n)
    from scipy.linalg.blas import dsyrk  # noqa: PLC0415 - scipy is a dependency; import it only when used

    a = a.detach()
    if a.is_contiguous():  # its transpose is Fortran-ordered: C = (A^T)^T (A^T), no copy
        c = dsyrk(1.0, a.numpy().T, trans=1)
    elif a.mT.is_contiguous():  # Fortran-ordered itself: C = A A^T
        c = dsyrk(1.0, a.numpy(), trans=0)
    else:
        c = dsyrk(1.0, a.contiguous().numpy().T, trans=1)
    up = torch.from_numpy(c).triu()
    return up + up.triu(1).mT


def _gram_err(w: torch.Tensor, inner: int) -> float:
    """Bound on ||fl(W W^H) - W W^H||_2 <= 4 (m + 2) u ||W||_F^2 (m = inner dimension)."""
    return 4.0 * (inner + 2) * U64 * float(torch.linalg.vector_norm(w)) ** 2  # one pass, no temporaries


def gram_norm(h: torch.Tensor, err: float, delta: float = CHOLESKY_DELTA) -> NormResult:
    """``sqrt(max_b lambda_max(H_b))`` for exact Gram matrices ``H_b`` given their float64 values ``h``
    (b, n, n) with ``||h_b - H_b||_2 <= err``, certified. ``n <= DENSE_SVD_MAX``: LAPACK eigenvalues
    (backward stable, covered by ``ROUNDING_MARGIN``) plus ``err``. Larger: a float64 Lanczos estimate
    (``GRAM_LANCZOS_STEPS``, stopped once it moves less than ``delta / 4``) and the Cholesky certificate of
    :func:`certify_psd_max`, at most ``delta`` (relative, on ``lambda_max``) above the estimate when the first
    test passes. More than 4 blocks wider than
    ``BATCHED_GRAM_MIN`` (grouped convs, depthwise convs materialised per group): one batched certificate
    (single-precision Lanczos on the blocks of largest trace, one batched Cholesky: ``n^3 / 3`` flops per
    block where an eigensolve costs ~10 ``n^3``). ``lower``: the square root of the largest eigenvalue /
    Rayleigh quotient found, in float64 (a value the Gram matrix attains, up to rounding)."""
    if h.shape[0] > BATCHED_GRAM_MIN_BLOCKS and h.shape[-1] > BATCHED_GRAM_MIN:  # n^3 / 3 per block instead of ~10 n^3
        r = certify_psd_max(h, err, lanczos_steps=40, delta=delta)
        lower = 0.0
        if r.vector is not None:
            v = r.vector.to(h.dtype)
            lower = math.sqrt(max(float((v.conj() @ h[r.index] @ v).real / (v.conj() @ v).real), 0.0))
        return NormResult(math.sqrt(r.upper) * (1 + ROUNDING_MARGIN), True, "gram-lanczos-cholesky", lower)
    if h.shape[-1] <= _pkg.DENSE_SVD_MAX:
        lam = float(torch.linalg.eigvalsh(h)[:, -1].max().clamp_min(0.0))
        upper = math.sqrt(lam * (1 + ROUNDING_MARGIN) + err) * (1 + ROUNDING_MARGIN)
        return NormResult(upper, True, "gram-eig", math.sqrt(lam))
    best_upper, best_lower = 0.0, 0.0
    for hb in h:
        theta = lanczos_max(lambda v, hb=hb: hb @ v, hb.shape[0], hb.device, steps=GRAM_LANCZOS_STEPS,
                            tol=delta / 4)
        r = certify_psd_max(hb[None], err, estimate=theta, delta=delta)
        best_upper = max(best_upper, math.sqrt(r.upper) * (1 + ROUNDING_MARGIN))
        best_lower = max(best_lower, math.sqrt(max(theta, 0.0)))
    return NormResult(best_upper, True, "gram-lanczos-cholesky", best_lower)


def dense_norm(w: torch.Tensor, device: torch.device | str | None = None,
               delta: float = CHOLESKY_DELTA) -> NormResult:
    """||W||_2 of a dense matrix (batched: max over leading dims), certified: the float64 Gram matrix of
    the smaller side, with rounding bound ``4 (m + 2) u ||W||_F^2``, then :func:`gram_norm` (``delta``: its
    certificate's distance above the estimate)."""
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
    return gram_norm(gram_rows(a), err, delta)

