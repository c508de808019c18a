"""Benchmark: certified bounds on input domains for the torchvision classifiers, next to the global ones.

    python bench/bench_domains.py                          # all models, 1x3x64x64 (224 for the ViTs)
    python bench/bench_domains.py --models resnet18,mobilenet_v3_small --lower-budget 2

For every model one ``analyze`` call (the trace and the global pass shared) bounds the constant globally and on
five domains: the box [0,1], and l_inf and l2 balls of radius 1e-2 and 1e-3 around a seeded random image in
[0,1] (the l_inf balls within [0,1]). Each row gives the global certified bound and, per domain, the certified
bound / the value attained inside the domain (float32 search, on the domains of ``--lower-on``) / the domain
pass's seconds (ranges, domain constants, domain-aware algorithms). Rows are written to
``bench/results/domains.txt`` (``--out``) as soon as each model is done.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import lipgraph
from lipgraph.bounds.lower import lower_bound
from lipgraph.domains import Ball, Box
from lipgraph.report import fmt

sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo import MIN_SIDE, MODELS, build  # noqa: E402

DOMAINS = ["box 0..1", "linf 1e-2", "linf 1e-3", "l2 1e-2", "l2 1e-3"]


def _stage_printer(name: str, t0: float):  # noqa: ANN202 - a progress callback
    """A progress callback printing each stage once, with the seconds since ``t0`` (long runs: swin_t at 224)."""
    seen: set[str] = set()

    def show(stage: str, done: int, total: int) -> None:
        if stage not in seen:
            seen.add(stage)
            print(f"  {name}: {time.perf_counter() - t0:8.1f} s  {stage}", file=sys.stderr, flush=True)

    return show


def domains_around(x: torch.Tensor) -> list:
    return [Box(0, 1), Ball(x, 1e-2, "linf", clip=(0, 1)), Ball(x, 1e-3, "linf", clip=(0, 1)),
            Ball(x, 1e-2, "l2"), Ball(x, 1e-3, "l2")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    p.add_argument("--size", type=int, default=64, help="input side (raised to the model's minimum)")
    p.add_argument("--lower-budget", type=int, default=1, help="restarts of the attained-value search")
    p.add_argument("--lower-on", default="box 0..1",
                   help="comma-separated domains (names as in the header) that get the attained-value search "
                        "('all' for every one; it dominates the time on CNNs: ~1 min per domain for resnet18)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "domains.txt"))
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--progress", action="store_true", help="print each analysis stage with its start time (stderr)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# lipgraph {lipgraph.__version__}, torch {torch.__version__}, {platform.machine()} {os.cpu_count()} "
            f"cores, {datetime.datetime.now():%Y-%m-%d %H:%M}; analyze(model, x, domain=[...], "
            f"lower=False) + lower_bound(restarts={args.lower_budget}) on {args.lower_on}; weights=None seed 0; "
            "x = torch.rand seed 0; "
            "cells: certified upper / attained lower / seconds of the domain pass\n")
    cols = f"{'model':<20} {'side':>4} {'global':>10} " + " ".join(f"{d:>26}" for d in DOMAINS) + "  total s"
    with out.open("a" if args.append else "w") as f:
        f.write(head + cols + "\n")
    print(head + cols, flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        side = max(args.size, MIN_SIDE.get(name, 0))
        model = build(name)
        x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        doms = domains_around(x)
        reps = lipgraph.analyze(model, x, domain=doms, lower=False,
                                progress=_stage_printer(name, t0) if args.progress else None)
        lowers: list[float | None] = []
        for label, d in zip(DOMAINS, doms, strict=True):
            if args.lower_on != "all" and label not in args.lower_on.split(","):
                lowers.append(None)
                continue
            with torch.random.fork_rng():
                try:
                    lb = lower_bound(model, (x,), restarts=args.lower_budget, seed=0, domain=d)
                except NotImplementedError:  # PyTorch's fused CPU attention has no forward-mode AD: run the IR
                    g = reps[0].graph
                    lb = lower_bound(lambda z, _g=g: lipgraph.execute(_g, z), (x,), restarts=args.lower_budget,
                                     seed=0, domain=d)
            lowers.append(lb.value)
        total = time.perf_counter() - t0
        cells = []
        for r, low in zip(reps, lowers, strict=True):
            secs = sum(v for k, v in r.seconds.items() if k.startswith("domain:"))
            tag = "" if r.certified else "!"
            cells.append(f"{tag}{fmt(r.upper)} / {fmt(low)} / {secs:.1f}")
        row = f"{name:<20} {side:>4} {fmt(reps[0].global_upper):>10} " + " ".join(f"{c:>26}" for c in cells) + \
            f"  {total:.0f}"
        print(row, flush=True)
        with out.open("a") as f:
            f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
