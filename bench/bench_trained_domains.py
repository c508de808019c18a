"""Benchmark: trained models, global interval vs the interval on input domains around test points.

    python bench/bench_trained_domains.py [--points 5] [--models mlp,cnn] [--domains linf0.02,linf0.05,l2]

Models: the digits MLP of ``../shared/benchmarks/chains`` (64-200-200-200-10, trained, test accuracy 0.976;
inputs are sklearn's digits scaled to [0,1] by /16, on which it classifies 99.4% of the data set) and a small
CNN trained here on sklearn's bundled digits (seeded, 40 epochs, about 10 s). Domains around seeded test points:
l_inf balls of radius 0.02 and 0.05 within [0,1]^64 and the l2 ball of radius 0.1. Per row: the global
certified bound and attained value, the same on the domain (median over the points), and the median ratios
upper/lower, so the table shows how much tighter an interval gets near real data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import lipgraph
from lipgraph.domains import Ball

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "chains" / "digits_64_200x3_10.npz"


def shared_mlp() -> nn.Module:
    if not SHARED.is_file():
        raise SystemExit(f"bench_trained_domains: {SHARED} is missing (the shared benchmark data)")
    w = np.load(SHARED)
    layers: list[nn.Module] = []
    for k in range(4):
        lin = nn.Linear(w[f"W{k}"].shape[1], w[f"W{k}"].shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w[f"W{k}"]))
            lin.bias.copy_(torch.from_numpy(w[f"b{k}"]))
        layers += [lin, nn.ReLU()] if k < 3 else [lin]
    return nn.Sequential(*layers).eval()


def digits_cnn(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    return fit(net, x, y)


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 40) -> nn.Module:
    """Adam (lr 3e-3), batches of 64 in one seeded order, cross-entropy; returns ``net`` in eval mode."""
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--domains", default="linf0.02,linf0.05,l2", help="comma-separated: linf0.02, linf0.05, l2")
    args = p.parse_args(argv)
    wanted_models, wanted_domains = set(args.models.split(",")), set(args.domains.split(","))
    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs / 16.0, dtype=torch.float32)
    y = torch.tensor(ys)
    train, test = slice(0, 1400), slice(1400, None)
    models = {}
    if "mlp" in wanted_models:
        models["digits MLP 64-200x3-10 (shared)"] = shared_mlp()
    if "cnn" in wanted_models:
        models["digits CNN (trained here)"] = digits_cnn(x[train], y[train])
    gen = torch.Generator().manual_seed(3)
    pick = torch.randperm(len(x) - 1400, generator=gen)[: args.points] + 1400
    print(f"{'model':<34} {'domain':<22} {'global [lower, upper]':>24} {'ratio':>7} "
          f"{'domain [lower, upper]':>24} {'ratio':>7} {'s/point':>8}")
    for name, net in models.items():
        with torch.no_grad():
            acc = float((net(x[test]).argmax(1) == y[test]).float().mean())
        # the global interval: every default algorithm but SeqLip, whose global branch and bound on the
        # 200-wide chain takes minutes (its certified value, 134.6-179 class, is in bench/results/chains.txt)
        glob = lipgraph.analyze(net, x[:1], method=["autolip", "affine", "combettes-pesquet", "eclipse-fast"])
        for key, label, make in [("linf0.02", "linf 0.02 in [0,1]", lambda c: Ball(c, 0.02, "linf", clip=(0, 1))),
                                 ("linf0.05", "linf 0.05 in [0,1]", lambda c: Ball(c, 0.05, "linf", clip=(0, 1))),
                                 ("l2", "l2 0.1", lambda c: Ball(c, 0.1, "l2"))]:
            if key not in wanted_domains:
                continue
            ups, lows, secs = [], [], []
            for i in pick.tolist():
                c = x[i:i + 1]
                t0 = time.perf_counter()
                r = lipgraph.analyze(net, c, domain=make(c), lower_budget=4)
                secs.append(time.perf_counter() - t0)
                ups.append(r.upper)
                lows.append(r.lower or 0.0)
            up, low = statistics.median(ups), statistics.median(lows)
            ratio = statistics.median(u / lo for u, lo in zip(ups, lows, strict=True) if lo > 0)
            print(f"{name + f' (acc {acc:.3f})':<34} {label:<22} [{glob.lower:>9.4g}, {glob.upper:>9.4g}] "
                  f"{glob.upper / glob.lower:>7.3g} [{low:>9.4g}, {up:>9.4g}] {ratio:>7.3g} "
                  f"{statistics.median(secs):>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
