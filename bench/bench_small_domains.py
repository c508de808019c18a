"""Small smooth models on l2 balls: the gated model ``w(a(x) * sigmoid(g(x)))`` and the one-block transformer of
``tests/test_domain_tightness.py`` (issue 12's "within 5%" models), with and without the Taylor models of
:mod:`lipgraph.bounds.taylor`, and with them but without their seeded tangents, in the same run.

For each model and radius: the global bound, the certified bound on the ball without the ``taylor`` algorithm
(every other default algorithm, the mean-value rounds included), with it but no seeds (``TANGENT_SEEDS = 0``)
and with both (the default), the attained value
(``report.lower`` with ``lower_budget=8`` and float64 Jacobian norms at sampled points of the ball: the larger),
the ratios and the seconds of each analysis.

    python bench/bench_small_domains.py [--radii 0.01,0.1,0.3] [--out bench/results/small_domains.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lipgraph  # noqa: E402
from lipgraph.bounds import METHODS, taylor  # noqa: E402
from lipgraph.domains import Ball  # noqa: E402
from tests.test_domain_tightness import Block, Gated, _build, _max_sampled, _point  # noqa: E402


def _analyze(model, x, radius: float, with_taylor: bool, seeds: bool = True):
    saved = None if with_taylor else METHODS.pop("taylor")
    kept = taylor.TANGENT_SEEDS
    taylor.TANGENT_SEEDS = kept if seeds else 0
    try:
        t0 = time.perf_counter()
        rep = lipgraph.analyze(model, x, domain=Ball(x, radius, "l2"), lower_budget=8)
        return rep, time.perf_counter() - t0
    finally:
        taylor.TANGENT_SEEDS = kept
        if saved is not None:
            METHODS["taylor"] = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--radii", default="0.01,0.1,0.3")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = ["| model | radius | global | without Taylor (s) | Taylor, no seeds (s) | with Taylor and seeds (s) "
             "| attained | ratio without Taylor | ratio no seeds | ratio now |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cls, shape in (("gated", Gated, (1, 8)), ("one-block transformer", Block, (1, 4, 8))):
        model, x = _build(cls), _point(shape)
        glob = lipgraph.analyze(model, x, lower=False).upper
        for radius in (float(r) for r in args.radii.split(",")):
            before, s_before = _analyze(model, x, radius, with_taylor=False)
            plain, s_plain = _analyze(model, x, radius, with_taylor=True, seeds=False)
            now, s_now = _analyze(model, x, radius, with_taylor=True)
            attained = max(before.lower, plain.lower, now.lower, _max_sampled(model, x, radius, 150))
            row = (f"| {name} | {radius:g} | {glob:.5g} | {before.upper:.5g} ({s_before:.1f}) | {plain.upper:.5g} "
                   f"({s_plain:.1f}) | {now.upper:.5g} ({s_now:.1f}) | {attained:.5g} | {before.upper / attained:.3f} "
                   f"| {plain.upper / attained:.3f} | {now.upper / attained:.3f} |")
            print(row, flush=True)
            lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
