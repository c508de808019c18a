"""The shared MNIST network (784-50-10, LipSDP's weights) with every default on one device: bound, lower, stages.

    python bench/bench_devices_mnist.py --device cuda --out bench/results/devices/mnist_cuda.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lipgraph


def weights() -> dict[str, np.ndarray]:
    """``W1`` (50x784) and ``W2`` (10x50) from ``$LIPGRAPH_SHARED`` (default ``../shared/benchmarks``)."""
    root = Path(os.environ.get("LIPGRAPH_SHARED", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    path = root / "lipsdp_mnist_784_50_10.npz"
    if not path.exists():
        sys.exit(f"bench_devices_mnist: {path} is missing (set LIPGRAPH_SHARED to the shared benchmarks folder)")
    return dict(np.load(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    w = weights()
    model = torch.nn.Sequential(torch.nn.Linear(784, 50, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(50, 10, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w["W1"]))
        model[2].weight.copy_(torch.from_numpy(w["W2"]))
    model = model.to(args.device)
    x = torch.zeros(1, 784, dtype=torch.float64).to(args.device)
    t0 = time.perf_counter()
    r = lipgraph.analyze(model, x, device=args.device)
    secs = time.perf_counter() - t0
    stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.seconds.items(), key=lambda kv: -kv[1]) if k != "total")
    row = (f"mnist_784_50_10 device {args.device}: upper {r.upper!r} ({r.best[0] if r.best else '-'}), "
           f"lower {r.lower!r}, {secs:.1f} s [{stages}]")
    print(row, flush=True)
    if args.out:
        Path(args.out).write_text(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
