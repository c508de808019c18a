"""Benchmark: the shared LipSDP MNIST network on l_inf balls within [0,1]^784 around seeded points.

    python bench/bench_mnist_domains.py [--radius 0.02] [--points 10]

Per point: the unstable ReLUs on the ball, the certified bound on the ball (``analyze(..., domain=...)``),
the value attained inside the ball (the projected search, 8 restarts), their ratio and the seconds of the
domain pass; the global constant (24.2992, exact) and auto_LiRPA's best l2 figure on such a ball (28.7,
measured for issue 12) beside them. Needs ../shared/benchmarks/lipsdp_mnist_784_50_10.npz.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lipgraph
from lipgraph.domains import Ball

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import lipsdp_mnist_net  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--radius", type=float, default=0.02)
    p.add_argument("--points", type=int, default=10)
    args = p.parse_args(argv)
    net = lipsdp_mnist_net()
    gen = torch.Generator().manual_seed(12)
    print(f"{'point':>5} {'unstable':>8} {'certified':>10} {'attained':>9} {'ratio':>6} {'domain s':>8} "
          f"{'+lower s':>8}")
    xs = [torch.rand(1, 784, generator=gen) for _ in range(args.points)]
    t0 = time.perf_counter()
    # one call: the global pass (every algorithm, as without a domain) is shared by the domains
    reps = lipgraph.analyze(net, xs[0], domain=[Ball(x, args.radius, "linf", clip=(0, 1)) for x in xs])
    total = time.perf_counter() - t0
    glob_s = sum(v for k, v in reps[0].seconds.items() if not k.startswith("domain:") and k != "lower")
    print(f"global pass (shared): {glob_s:.2f} s, bound {reps[0].global_upper:.4f}; all {args.points} domains: "
          f"{total:.2f} s in one call")
    for i, rep in enumerate(reps):
        dom_s = sum(v for k, v in rep.seconds.items() if k.startswith("domain:"))
        relu = next(n for n in rep.nodes if n.op == "relu")
        print(f"{i:>5} {round(relu.unstable * 50):>8} {rep.upper:>10.4f} {rep.lower:>9.4f} "
              f"{rep.upper / rep.lower:>6.3f} {dom_s:>8.3f} {dom_s + rep.seconds.get('lower', 0.0):>8.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
