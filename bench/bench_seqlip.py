"""SeqLip benchmarks; writes bench/results/seqlip.txt.

1. Time of the exact inner maximum ``max_{s in {0,1}^n} ||W2 diag(s) W1||`` against the width n
   (square random layers), for plain enumeration and for branch and bound, up to the largest width
   each finishes (exactly) within ``--limit`` seconds.
2. AutoLip / SeqLip on the paper's setups: the trained 2-20-...-1 MLPs, the rank-one "ideal
   scenario", and a small CNN on the digits.

Run: ``.venv/bin/python bench/bench_seqlip.py [--limit 60]`` (a few minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from lipgraph.bounds import seqlip  # noqa: E402

D = torch.float64


#: Work budgets from ``--limit`` seconds (the solvers count work, not time): rough rates on the 2-core
#: dev machine (1750 B&B nodes/s measured on the MNIST 784-50-10 inner problem, loaded).
NODES_PER_S = 1750
MASKS_PER_S = 2_000_000


def width_timing(limit: float, out: list[str]) -> None:
    out.append("## exact inner maximum vs width (W1, W2 random n x n, ReLU {0,1}^n)")
    out.append(f"{'n':>4} {'method':<18} {'seconds':>9} {'exact':>6} {'value':>12}")
    g = torch.Generator().manual_seed(0)
    alive = {"enumeration": True, "branch-and-bound": True}
    n = 8
    while any(alive.values()) and n <= 64:
        w1 = torch.randn(n, n, generator=g, dtype=D)
        w2 = torch.randn(n, n, generator=g, dtype=D)
        (a, b), = seqlip.inner_factors([w1, w2])
        for name in alive:
            if not alive[name]:
                continue
            t0 = time.perf_counter()
            if name == "enumeration":
                r = seqlip.enumerate_max(a, b, 0.0, 1.0, max_masks=int(limit * MASKS_PER_S))
            else:
                r = seqlip.branch_and_bound(a, b, 0.0, 1.0, max_nodes=int(limit * NODES_PER_S))
            dt = time.perf_counter() - t0
            out.append(f"{n:>4} {name:<18} {dt:>9.2f} {str(r.exact):>6} {r.value:>12.6g}")
            print(out[-1], flush=True)
            if not r.exact or dt > limit:
                alive[name] = False
        n += 4 if n < 16 else 2


def ratios(out: list[str]) -> None:
    import seqlip_cnn
    import seqlip_mlp
    import torch.nn as nn

    out.append("\n## AutoLip / SeqLip on the paper's setups (certified SeqLip)")
    out.append("paper (as quoted in issue #4): MLPs 1.5x-7.8x, MNIST CNNs 2x-5.4x, AlexNet 6.6x (greedy estimates)")
    torch.manual_seed(0)
    x = 4 * torch.rand(2000, 2) - 2
    y = seqlip_mlp.target(x)
    for k in seqlip_mlp.LAYERS:
        model = seqlip_mlp.make_mlp(k)
        seqlip_mlp.train(model, x, y)
        mats = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
        t0 = time.perf_counter()
        cb = seqlip.seqlip_chain(mats, [(0.0, 1.0)] * (k - 1), max_nodes=10**6)
        out.append(f"MLP 2-20x{k - 1}-1 trained: AutoLip {cb.autolip:.4g}  SeqLip {cb.value:.4g}  "
                   f"ratio {cb.autolip / cb.value:.2f}  exact={all(r.exact for r in cb.inner)}  "
                   f"{time.perf_counter() - t0:.1f}s")
        print(out[-1], flush=True)
    g = torch.Generator().manual_seed(0)
    import seqlip_ideal

    for k in (2, 4, 6, 8, 10):
        vals = [seqlip_ideal.ratio(k, 100, 0.0, g)[0] for _ in range(10)]
        out.append(f"ideal rank-one n=100, K={k}: AutoLip/SeqLip {len(vals) / sum(vals):.3g}  "
                   f"(pi^(K-1) = {math.pi ** (k - 1):.3g})")
        print(out[-1], flush=True)
    xtr, ytr, xte, _ = seqlip_cnn.digits()
    model = seqlip_cnn.cnn(2)
    seqlip_cnn.train(model, xtr, ytr, epochs=10)
    row = seqlip_cnn.evaluate("digits CNN 2conv+fc", model, xte[:1], 5.0, 4096, False, None)
    out.append(f"digits CNN 2conv+fc: AutoLip {row['autolip']:.4g}  AutoLip+SeqLip {row['seqlip']:.4g}  "
               f"ratio {row['autolip'] / row['seqlip']:.2f}  (certified, B&B 5s per inner maximum)")


def plot_widths(results: Path, png: Path) -> None:
    """docs/seqlip_bench_width.png from the width table of ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float], list[bool]]] = {}
    for line in results.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            xs, ys, ok = series.setdefault(parts[1], ([], [], []))
            xs.append(int(parts[0]))
            ys.append(max(float(parts[2]), 1e-3))
            ok.append(parts[3] == "True")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys, ok) in series.items():
        line = ax.semilogy(xs, ys, "o-", label=name)[0]
        miss = [(x, y) for x, y, k in zip(xs, ys, ok, strict=True) if not k]
        ax.semilogy([m[0] for m in miss], [m[1] for m in miss], "x", color=line.get_color(), markersize=12)
    ax.axhline(60, color="gray", ls=":", label="60 s (x: not finished)")
    ax.set_xlabel("width n (W1, W2 random n x n)")
    ax.set_ylabel("seconds to the exact inner maximum")
    ax.set_title("Exact SeqLip inner maximum vs width (1 thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=60.0, help="seconds allowed per exact solve")
    ap.add_argument("--skip-ratios", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw docs/seqlip_bench_width.png from the results")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "seqlip.txt"
    png = ROOT / "docs" / "seqlip_bench_width.png"
    if args.plot_only:
        plot_widths(path, png)
        return
    torch.set_num_threads(1)
    out = [f"# bench_seqlip  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, "
           f"1 torch thread, shared 2-core machine (load varies)"]
    width_timing(args.limit, out)
    if not args.skip_ratios:
        ratios(out)
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    plot_widths(path, png)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
