"""Benchmark: trace time, analysis time and the bound for every torchvision classifier.

    python bench/bench_zoo.py                         # all models, 1x3x64x64 (224 where required)
    python bench/bench_zoo.py --size 224 --models resnet18,vgg11
    python bench/bench_zoo.py --device cuda           # when torch.cuda.is_available()
    python bench/bench_zoo.py --models shufflenet_v2_x0_5 --effort 4   # four times the refinements' budgets
    python bench/bench_zoo.py --cheap-norms --method autolip --power-iterations 2   # as tests/test_zoo.py

Each row is printed as soon as the model is done and the table is written to
``bench/results/zoo.txt`` (``--out``), headed by the settings, so partial runs
keep their results. Analysis is ``analyze(model, x)`` with every default (certified norms,
``method="auto"``, the attained lower bound) unless told otherwise; ``--repeat`` analyses each
model again and checks the bounds are identical.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lipgraph
from lipgraph import norms
from lipgraph.ops import Settings

MODELS = [
    "alexnet", "vgg11", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "inception_v3", "squeezenet1_0", "shufflenet_v2_x0_5", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t",
]
#: Models that need a given input side (224: fixed positional embeddings / window partitions).
MIN_SIDE = {"inception_v3": 80, "vit_b_16": 224, "swin_t": 224, "maxvit_t": 224}


def build(name: str, keep_zero_head: bool = False) -> torch.nn.Module:
    import torchvision.models as tvm  # noqa: PLC0415

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = getattr(tvm, name)(weights=None, **kwargs).eval()
    if name == "vit_b_16" and not keep_zero_head:  # torchvision zero-initialises the head: L would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def use_cheap_norms() -> None:
    """Replace conv norms and dense norms of matrices wider than 512 by 20-step power-method estimates."""
    dense = norms.dense_norm

    def conv_norm(fwd: Callable[..., Any], in_shape: Any, ctx: Settings, weight: Any = None, attrs: Any = None,
                  **kwargs: Any) -> norms.NormResult:
        if weight is None or attrs is None or "output_padding" in attrs:
            return norms.linear_op_estimate(fwd, in_shape, ctx)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[attrs["ndim"]]
        a = attrs
        return norms.linear_op_estimate(
            lambda v: conv(v, weight.to(v), None, a["stride"], a["padding"], a["dilation"], a["groups"]), in_shape, ctx)

    def dense_norm(w: torch.Tensor, device: Any = None) -> norms.NormResult:
        if min(w.shape[-2:]) <= 512:
            return dense(w, device)
        ctx = Settings(power_iterations=20)
        return norms.linear_op_estimate(lambda v: v @ w.detach().to(v).T, (w.shape[-1],), ctx)

    norms.conv_norm = conv_norm
    norms.dense_norm = dense_norm


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def stages(r: Any, top: int = 3) -> str:
    """The ``top`` slowest stages of the analysis, ``name seconds`` (where the time went)."""
    items = sorted(((v, k) for k, v in r.seconds.items() if k != "total"), reverse=True)[:top]
    return ", ".join(f"{k} {v:.1f}" for v, k in items)


def values(r: Any) -> tuple[Any, ...]:
    """Every number a report certifies or attains (not its timings), for the ``--repeat`` check."""
    return (r.lower, {k: b.value for k, b in r.bounds.items()}, [(n.name, n.bound, n.local) for n in r.nodes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    p.add_argument("--size", type=int, default=64, help="input side (raised to the model's minimum)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--power-iterations", type=int, default=100)
    p.add_argument("--effort", type=float, default=1.0, help="analyze(effort=...): scale the refinements' budgets")
    p.add_argument("--method", default="auto", choices=["auto", "autolip", "seqlip"])
    p.add_argument("--no-lower", action="store_true", help="skip the attained lower bound (lower=False)")
    p.add_argument("--repeat", action="store_true", help="analyse twice; the 'same' column says if bounds match")
    p.add_argument("--cheap-norms", action="store_true", help="power-method conv norms (uncertified, fast)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo.txt"))
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--keep-going", action="store_true",
                   help="a model that raises gets an 'error' row (traceback on stderr); the others still run")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_zoo: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cheap_norms:
        use_cheap_norms()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = (
        f"# lipgraph {lipgraph.__version__}, torch {torch.__version__}, {platform.machine()} "
        f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads), device {args.device}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}\n"
        f"# analyze(model, x, method={args.method!r}, lower={not args.no_lower}, "
        f"power_iterations={args.power_iterations}, effort={args.effort}, "
        f"device={args.device!r}); "
        f"norms: {'power-method estimates (--cheap-norms)' if args.cheap_norms else 'default (certified)'}; "
        f"input 1x3xSxS, S = max({args.size}, model minimum); weights=None, seed 0 (vit_b_16: random head)\n"
    )
    head = (f"{'model':<20} {'input':>5} {'nodes':>6} {'trace s':>8} {'analyze s':>10} {'upper':>11} "
            f"{'certified':>9} {'lower':>10} {'inf nodes':>9} {'same':>5}  upper_method")
    lines = [head, "-" * len(head)]
    mode = "a" if args.append else "w"
    with out.open(mode) as f:
        f.write(settings + head + "\n" + lines[1] + "\n")
    print(settings + head + "\n" + lines[1], flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        side = max(args.size, MIN_SIDE.get(name, 0))
        try:
            row = _row(name, side, args)
        except Exception as e:  # noqa: BLE001 - with --keep-going, one model's failure is a row of the table
            if not args.keep_going:
                raise
            traceback.print_exc()
            row = f"{name:<20} {side:>5} error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(row, flush=True)
        with out.open("a") as f:
            f.write(row + "\n")
    return 0


def _row(name: str, side: int, args: argparse.Namespace) -> str:
    """Analyse one model as ``args`` say; the table row."""
    model = build(name).to(args.device)
    x = torch.randn(1, 3, side, side).to(args.device)  # the same input on every device
    t0 = time.perf_counter()
    g = lipgraph.trace(model, x)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = {"method": args.method, "lower": not args.no_lower, "power_iterations": args.power_iterations,
          "device": args.device, "effort": args.effort}
    r = lipgraph.analyze(model, x, **kw)
    t_analyze = time.perf_counter() - t0
    same = "-"
    if args.repeat:
        again = lipgraph.analyze(model, x, **kw)
        same = "yes" if (values(again) == values(r)) else "NO"
    best = r.best[0] if r.best else "-"
    row = (f"{name:<20} {side:>5} {g.number_of_nodes():>6} {t_trace:>8.2f} {t_analyze:>10.1f} "
           f"{fmt(r.upper):>11} {str(r.certified):>9} {fmt(r.lower) if r.lower is not None else '-':>10} "
           f"{len(r.not_lipschitz):>9} {same:>5}  {best}  [{stages(r)}]")
    return row


if __name__ == "__main__":
    sys.exit(main())
