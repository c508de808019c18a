"""Randomized soundness at a larger size: ``python bench/bench_soundness.py --models 200 --width 6 --depth 4``.

For each seeded random model of ``tests/random_models.py`` (dense or conv, residual adds, concatenations,
poolings, every activation with a global rule): the certified bound, the largest float64 Jacobian norm or
secant ratio found, and their ratio (must be <= 1). Prints one line per model and the worst ratio; exits 1
if any certified bound is below an attained value.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from random_models import attained, make  # noqa: E402

import lipgraph  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--samples", type=int, default=50)
    args = ap.parse_args()
    worst, bad = 0.0, 0
    for seed in range(args.models):
        model, x = make(seed, width=args.width, depth=args.depth)
        r = lipgraph.analyze(model, x, lower=False)
        seen = attained(model, x, args.samples, seed)
        ratio = seen / r.upper if math.isfinite(r.upper) and r.upper > 0 else 0.0
        worst = max(worst, ratio)
        bad += r.certified and ratio > 1 + 1e-9
        print(f"seed {seed:4d}  certified {r.certified!s:5}  upper {r.upper:.4g}  attained {seen:.4g}  "
              f"ratio {ratio:.4f}", flush=True)
    print(f"worst attained/upper {worst:.4f}; unsound: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
