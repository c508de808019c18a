"""What limits the Taylor-model bound of the one-block transformer on Ball(x, 0.1) (issue 12's "within 5%").

At the output, the certified bound is ``||A|| + rho ||G||_flat + rho^2 / 2 ||T||_flat + r`` (lipgraph's terms, ``r``
the remainder carried by the chain rule). Against it, an independent measurement: the exact fourth derivatives
``D4`` at the center (nested forward-mode autograd of a hand-written float64 replica of the block, checked
against the model; PyTorch's own layer_norm has wrong higher derivatives) give the size of the term that the
remainder stands for, ``D4[d, d, d] / 6``: its flat-norm bound ``rho^3 / 6 ||D4||_flat`` and the largest
``||D4[d, d, d] / 6||_2`` found by sampling and by projected ascent over the sphere. The same for the first
LayerNorm alone (a function of the input only), against its own remainder ``||P0||``.

    python bench/bench_taylor_orders.py [--out bench/results/taylor_orders.txt]

About 2 minutes on 2 cores (the 32 forward-mode passes over the third derivatives dominate).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.func import jacfwd, jvp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lipgraph  # noqa: E402
from lipgraph.bounds import taylor  # noqa: E402
from lipgraph.domains import Ball  # noqa: E402
from tests.test_domain_tightness import Block, _build, _point  # noqa: E402

_DT = torch.float64
RADIUS = 0.1


def _layer_norm(mod, u: torch.Tensor) -> torch.Tensor:
    z = u - u.mean(-1, keepdim=True)
    q = (z * z).mean(-1, keepdim=True)
    return mod.weight * z * (q + mod.eps) ** -0.5 + mod.bias


def _replica(m: Block):
    """The block as plain float64 tensor code (tokens 4, width 8, 2 heads), so that forward-mode autograd
    differentiates it to any order."""
    att, d, heads = m.attn, 8, 2

    def mha(h: torch.Tensor) -> torch.Tensor:
        qkv = h @ att.in_proj_weight.T + att.in_proj_bias
        q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(4, heads, d // heads).transpose(0, 1) for i in range(3))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        return (a @ v).transpose(0, 1).reshape(4, d) @ att.out_proj.weight.T + att.out_proj.bias

    def gelu(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def block(t: torch.Tensor) -> torch.Tensor:
        u = t.reshape(4, 8)
        u = u + mha(_layer_norm(m.ln1, u))
        u = u + m.mlp[2](gelu(m.mlp[0](_layer_norm(m.ln2, u))))
        return m.head(u.mean(0))

    def ln1(t: torch.Tensor) -> torch.Tensor:
        return _layer_norm(m.ln1, t.reshape(4, 8)).reshape(-1)

    return block, ln1


def _fourth(f, xc: torch.Tensor) -> torch.Tensor:
    """``D4[s, j, k, l, m]``: the derivative along ``x_m`` of forward-mode third derivatives (one pass per ``m``)."""
    third = jacfwd(jacfwd(jacfwd(f)))
    cols = []
    for m in range(xc.numel()):
        e = torch.zeros_like(xc)
        e[m] = 1.0
        cols.append(jvp(third, (xc,), (e,))[1].detach())
    return torch.stack(cols, dim=-1)


def _term_sizes(d4: torch.Tensor, rho: float, seed: int = 0) -> tuple[float, float, float]:
    """``rho^3 / 6 ||D4||_flat`` and the largest ``||D4[d, d, d] / 6||_2`` over 300 sampled ``d`` of norm rho and
    after 300 steps of projected ascent."""
    s, n = d4.shape[0], d4.shape[1]
    flat = min(float(torch.linalg.matrix_norm(d4.reshape(s * n, n ** 3), 2)),
               float(torch.linalg.matrix_norm(d4.movedim(1, 0).reshape(n, s * n ** 3), 2)))

    def size(d: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(torch.einsum("sjklm,k,l,m->sj", d4, d, d, d) / 6, 2)

    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(300):
        d = torch.randn(n, generator=gen, dtype=_DT)
        best = max(best, float(size(d * (rho / d.norm()))))
    d = torch.randn(n, generator=gen, dtype=_DT)
    d = (d * (rho / d.norm())).requires_grad_(True)
    for _ in range(300):
        (grad,) = torch.autograd.grad(size(d), d)
        with torch.no_grad():
            d += 0.05 * rho * grad / (grad.norm() + 1e-300)
            d *= rho / d.norm()
    return flat * rho ** 3 / 6, best, max(best, float(size(d.detach())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, x = _build(Block), _point((1, 4, 8))
    xc = x.reshape(-1).to(_DT)
    block, ln1 = _replica(model)
    with torch.no_grad():
        gap = float((block(xc) - model(x).reshape(-1)).abs().max())
    kept: dict = {}
    carry = taylor.carry_remainders

    def keep(g, built, local, seeds=None):  # the domain pass's last carry: the models and remainders the report used
        carry(g, built, local, seeds)
        kept["last"] = (g, built)

    taylor.carry_remainders = keep
    try:
        t0 = time.perf_counter()
        rep = lipgraph.analyze(model, x, domain=Ball(x, RADIUS, "l2"), lower_budget=8)
        seconds = time.perf_counter() - t0
    finally:
        taylor.carry_remainders = carry
    g, built = kept["last"]
    out = built.tms[g.graph["output"]]
    a, fg, ft, _, _ = out.norm_parts
    t0 = time.perf_counter()
    block_sizes = _term_sizes(_fourth(block, xc), RADIUS)
    ln_sizes = _term_sizes(_fourth(ln1, xc), RADIUS)
    seconds_d4 = time.perf_counter() - t0
    lines = [
        f"one-block transformer of tests/test_domain_tightness.py, Ball(x, {RADIUS}), l2 "
        f"(replica vs model: {gap:.1e}); analyze {seconds:.1f} s, fourth derivatives {seconds_d4:.1f} s",
        "",
        "| at the output | value |",
        "|---|---|",
        f"| report: certified upper | {rep.upper:.5g} |",
        f"| report: attained lower | {rep.lower:.5g} |",
        f"| ||A|| = ||J(c)|| | {a:.5g} |",
        f"| rho ||G||_flat | {RADIUS * fg:.4g} |",
        f"| rho^2/2 ||T||_flat | {0.5 * RADIUS ** 2 * ft:.4g} |",
        f"| carried remainder r (lipgraph) | {out.norm_remainder:.4g} |",
        f"| exact D4 term: rho^3/6 ||D4||_flat | {block_sizes[0]:.3g} |",
        f"| exact D4 term: sampled max ||D4[d,d,d]/6|| | {block_sizes[1]:.3g} |",
        f"| exact D4 term: ascent max ||D4[d,d,d]/6|| | {block_sizes[2]:.3g} |",
        "",
        "| first LayerNorm alone | value |",
        "|---|---|",
        f"| own remainder ||P0|| (lipgraph) | {built.fresh['ln1']:.4g} |",
        f"| exact D4 term: rho^3/6 ||D4||_flat | {ln_sizes[0]:.3g} |",
        f"| exact D4 term: sampled max | {ln_sizes[1]:.3g} |",
        f"| exact D4 term: ascent max | {ln_sizes[2]:.3g} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
