"""Rendering time on ResNet-50 and DenseNet-121, measured apart from the analysis.

``.venv/bin/python bench/bench_render.py [--real] [--out DIR] [models...]``

By default the convolutions get a user-supplied constant (``constants={"Conv2d": 2.0}``) so that the
analysis is quick: the rendering does the same work whatever the values. ``--real`` runs the full
analysis instead (slow on a shared CPU). Each case times the view (collapse and folds), then the whole
``render.render`` (view, DOT text, layout by ``dot``) in wall-clock and CPU seconds (this process and
its ``dot`` child: on a shared machine the wall clock includes waiting for a core). torch is limited to
2 threads; ``dot`` is single-threaded.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings
from pathlib import Path

import torch

import lipgraph
from lipgraph import render as R

CASES: list[tuple[str, dict[str, object]]] = [
    ("png", {}),  # the default: folds on, a coarser depth when the PNG would be unreadable
    ("svg", {}),
    ("png", {"depth": 2}),
    ("svg", {"fold": None}),  # the worst case: every node drawn
    ("dot", {}),
]


def bench(name: str, out: Path, real: bool) -> None:
    """Analyse torchvision's ``name`` on a 1x3x64x64 input, then time each rendering case."""
    import torchvision  # noqa: PLC0415

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    kw: dict[str, object] = {"method": "autolip", "lower": False}
    if not real:
        kw["constants"] = {"Conv2d": 2.0}
    t0 = time.perf_counter()
    report = lipgraph.analyze(model, torch.randn(1, 3, 64, 64), **kw)
    analysis = time.perf_counter() - t0
    print(f"{name}: {len(report.nodes)} IR nodes, analysed in {analysis:.1f}s ({'real' if real else 'fast'})")
    for fmt, opts in CASES:
        tag = "_".join(f"{k}{v}" for k, v in opts.items()) or "default"
        path = out / f"{name}_{tag}.{fmt}"
        t0 = time.perf_counter()
        view = R.build_view(report, opts.get("depth"), opts.get("fold", 4))  # type: ignore[arg-type]
        t_view = time.perf_counter() - t0
        t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = R.render(report, str(path), **opts)  # type: ignore[arg-type]
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0 + _children_cpu() - k0
        size = os.path.getsize(written)
        note = f"  [{caught[0].message}]" if caught else ""
        print(f"  {fmt:<4} {tag:<10} {view.size:4d} boxes {len(view.edges):4d} edges  view {t_view:5.2f}s  "
              f"render {total:6.2f}s wall {cpu:6.2f}s CPU  {size / 1e3:6.0f} kB  {Path(written).name}{note}")


def _children_cpu() -> float:
    """CPU seconds used by finished child processes (the ``dot`` runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["resnet50", "densenet121"])
    p.add_argument("--real", action="store_true", help="full analysis (slow) instead of user conv constants")
    p.add_argument("--out", default="/tmp/lipgraph_bench_render")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"dot: {R.dot_program()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")
    for name in args.models:
        bench(name, out, args.real)


if __name__ == "__main__":
    main()
