"""Chain bounds side by side on the shared benchmark networks; writes bench/results/chains.txt.

For the LipSDP MNIST network and every network of ``shared/benchmarks/chains``: AutoLip and lipgraph's
SeqLip (``lipgraph.analyze(method="seqlip")`` on an ``nn.Sequential`` built from the weights, float64,
seconds include tracing and the per-node constants), and the certified Combettes-Pesquet and
ECLipsE-Fast bounds on the dense matrices (value / seconds; ``*`` marks an uncertified value).

Run: ``.venv/bin/python bench/bench_chains.py [--shared DIR]`` (about a minute on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipgraph  # noqa: E402
from lipgraph.bounds import combettes_pesquet, eclipse_fast  # noqa: E402
from lipgraph.core import format_number  # noqa: E402

D = torch.float64


def find_shared() -> Path:
    for c in (ROOT.parent / "shared" / "benchmarks", ROOT.parent.parent / "shared" / "benchmarks"):
        if c.exists():
            return c
    raise SystemExit("shared/benchmarks not found next to the repository; pass --shared DIR")


def load(path: Path) -> list[torch.Tensor]:
    d = np.load(path)
    keys = sorted((k for k in d.files if k[0] == "W" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    return [torch.from_numpy(d[k]).to(D) for k in keys]


def sequential(mats: list[torch.Tensor]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, w in enumerate(mats):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(D)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers.append(lin)
        if i < len(mats) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def cell(value: float, certified: bool, seconds: float) -> str:
    return f"{format_number(value, 4)}{'' if certified else '*'} / {seconds:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chains.txt")
    args = ap.parse_args()
    shared = args.shared or find_shared()
    nets = [("lipsdp_mnist_784_50_10", shared / "lipsdp_mnist_784_50_10.npz")]
    nets += [(p.stem, p) for p in sorted((shared / "chains").glob("*.npz"))]
    lines = [f"# chain bounds (value / seconds), {platform.node()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)", ""]
    header = ["network", "shape", "AutoLip", "SeqLip (analyze)", "Combettes-Pesquet", "ECLipsE-Fast"]
    rows = []
    for name, path in nets:
        mats = load(path)
        slopes = [(0.0, 1.0)] * (len(mats) - 1)
        shape = "-".join(str(m.shape[1]) for m in mats) + f"-{mats[-1].shape[0]}"
        if len(shape) > 24:
            shape = f"{mats[0].shape[1]}-{mats[0].shape[0]}x{len(mats) - 1}-{mats[-1].shape[0]}"
        model = sequential(mats)
        t0 = time.perf_counter()
        rep = lipgraph.analyze(model, torch.zeros(1, mats[0].shape[1], dtype=D), method="seqlip", lower=False)
        t_an = time.perf_counter() - t0
        auto, seq = rep.bounds["autolip"], rep.bounds.get("autolip+seqlip")
        row = [name, shape, cell(auto.value, auto.certified, auto.seconds),
               cell(seq.value, seq.certified, t_an) if seq is not None else "-"]
        for fn in (combettes_pesquet.cp_chain, eclipse_fast.eclipse_fast_chain):
            cv = fn(mats, slopes)
            row.append(cell(cv.value, cv.certified, cv.seconds))
        rows.append(row)
        print(" | ".join(row), flush=True)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "SeqLip seconds: the whole lipgraph.analyze call (trace, per-node constants, AutoLip, SeqLip "
              "under its 10 s budget); AutoLip seconds: its per-node constants; * = not certified."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
