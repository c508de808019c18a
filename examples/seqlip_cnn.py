"""Paper experiment (c): small MNIST-style CNNs trained on sklearn's bundled 8x8 digits, and AlexNet.

For each model: AutoLip, AutoLip+SeqLip (certified; inner maxima by branch and bound within a time
budget: certified bounds, exact only where the search finishes), the greedy SeqLip estimate (NOT a
bound), and an attained lower bound. AlexNet uses random weights (no downloads here) at a 64x64
input, where its conv3-conv5 chain and its classifier are small enough to materialise.

Run: ``.venv/bin/python examples/seqlip_cnn.py`` (the digits CNNs, a few minutes on a loaded 2-core
machine) and ``... --alexnet`` (AlexNet only; minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seqlip_common import DOCS, jacobian_lower_bound, markdown_table  # noqa: E402

import lipgraph  # noqa: E402
from lipgraph.bounds import seqlip  # noqa: E402
from lipgraph.bounds.local import local_constants  # noqa: E402
from lipgraph.ops import Settings  # noqa: E402


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def cnn(depth: int) -> nn.Sequential:
    """depth = number of conv layers (2 or 3), then one linear layer."""
    layers: list[nn.Module] = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()]
    if depth >= 3:
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)]
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def evaluate(name: str, model: nn.Module, example: torch.Tensor, max_nodes: int, max_dense: int,
             estimate: bool, lower_points: torch.Tensor | None) -> dict[str, object]:
    model.eval()
    g = lipgraph.trace(model, example)
    local = {k: v[0] for k, v in local_constants(g, Settings()).items()}
    from lipgraph.bounds import autolip

    auto = autolip.autolip(g, local)[g.graph["output"]]
    t0 = time.perf_counter()
    res, segs, _ = seqlip.bound(g, local, max_nodes=max_nodes, max_dense=max_dense, total_nodes=10**12,
                                estimate=estimate)
    secs = time.perf_counter() - t0
    greedy = None
    if estimate and segs:
        # the same AutoLip pass with each segment's greedy ESTIMATE in place of its members (not a bound)
        greedy = auto.value
        for s in segs:
            if "greedy_estimate" in s and s["autolip"] > 0:
                greedy *= s["greedy_estimate"] / s["autolip"]
    lower = jacobian_lower_bound(model, lower_points, ascent_steps=10) if lower_points is not None else None
    row = {"model": name, "autolip": auto.value, "autolip_certified": auto.certified, "seqlip": res.value,
           "seqlip_certified": res.certified, "greedy": greedy, "lower": lower, "seconds": secs,
           "segments": [{k: v for k, v in s.items() if k in ("nodes", "autolip", "seqlip", "method")} for s in segs]}
    print(json.dumps({k: v for k, v in row.items() if k != "segments"}), flush=True)
    for s in segs:
        print("   segment", s["nodes"][0], "..", s["nodes"][-1], f"AutoLip {s['autolip']:.4g} SeqLip {s['seqlip']:.4g}",
              "|", s["method"], flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alexnet", action="store_true", help="AlexNet only (random weights, 64x64 input; minutes)")
    ap.add_argument("--max-nodes", type=int, default=80000, help="branch-and-bound nodes per inner maximisation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    rows = []
    for depth in () if args.alexnet else (2, 3):
        model = cnn(depth)
        train(model, xtr, ytr)
        acc = float((model(xte).argmax(1) == yte).float().mean())
        print(f"CNN-{depth}conv test accuracy {acc:.3f}")
        row = evaluate(f"digits CNN, {depth} conv + 1 fc (acc {acc:.2f})", model, xte[:1], args.max_nodes, 4096,
                       True, xte[:64])
        rows.append(row)
    if args.alexnet:
        import torchvision

        torch.set_num_threads(2)
        model = torchvision.models.alexnet(weights=None)
        rows.append(evaluate("AlexNet (random init, 64x64 input)", model, torch.randn(1, 3, 64, 64), 5.0, 4096,
                             False, None))
    table = markdown_table(
        ["model", "AutoLip", "AutoLip+SeqLip (certified)", "AutoLip / SeqLip", "greedy SeqLip (estimate)",
         "lower bound", "SeqLip time (s)"],
        [[r["model"], r["autolip"], r["seqlip"], r["autolip"] / r["seqlip"],
          r["greedy"] if r["greedy"] is not None else "-", r["lower"] if r["lower"] is not None else "-",
          r["seconds"]] for r in rows],
    )
    print(table)
    DOCS.mkdir(exist_ok=True)
    out = DOCS / ("seqlip_cnn_table.md" if not args.alexnet else "seqlip_cnn_alexnet_table.md")
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
