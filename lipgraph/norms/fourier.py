"""Certified norms of circular (strided, dilated, grouped) convolutions and, by restriction, zero-padded
ones: polyphase Fourier blocks, the autocorrelation kernel of ``A A^T`` and its Gram blocks, the batched
torus certificate (:func:`certify_autocorrelation`), the warm start of the attained value from the top
Fourier mode, and the reused scratch buffers the blocks are built and factored in."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import norms as _pkg
from ..core import ROUNDING_MARGIN, run_seed
from .conv_geometry import ConvGeometry, _grid_rows, _tap_offsets
from .psd import CHOLESKY_DELTA, U64, PsdMax, _lanczos_batched, certify_psd_max, cholesky_in_place, cholesky_shift

# Names that tests and benchmarks patch on the package (``lipgraph.norms.X``) are read from it at call
# time, so that one patch reaches every caller: see ``lipgraph/norms/__init__.py``.

#: Complex entries per chunk of Fourier blocks (memory bound, ~128 MB in complex128).
CHUNK_ENTRIES = 1 << 23


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
    cand = torch.topk(tr.reshape(-1), min(g * n_f, _pkg.ESTIMATE_BLOCKS)).indices.cpu()
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
        r = _pkg.dense_norm(mats, dev)
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
        gen = torch.Generator(device="cpu").manual_seed(run_seed(0))
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


#: Work (``groups * M * c_out/g * cols * min(c_out/g, cols)``, ``M`` the coarse torus) up to which
#: :func:`_extra_tori` tries 3 larger tori, then 1; above the second, the minimal torus only. (No measurement
#: behind the two values is recorded.)
EXTRA_TORI_WORK = (2e7, 1e8)


def _extra_tori(geom: ConvGeometry, weight: torch.Tensor) -> int:
    """Also try up to 3 larger tori when that is cheap (small signals: the sampled frequencies differ,
    and the minimum over valid tori is still a certified bound)."""
    m = math.prod(t // s for t, s in zip(geom.min_torus(), geom.stride, strict=True))
    co, cols = weight.shape[0] // geom.groups, weight.shape[1] * math.prod(geom.stride)
    work = geom.groups * m * co * cols * min(co, cols)
    return 3 if work <= EXTRA_TORI_WORK[0] else (1 if work <= EXTRA_TORI_WORK[1] else 0)

