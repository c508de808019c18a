"""Chain bounds side by side with the peers, in one run; writes bench/results/chains.txt.

Networks: the shared LipSDP MNIST network and ``shared/benchmarks/chains`` (see its README), random ReLU
MLPs of width 80 with 5 and 10 hidden layers and one of width 1000 with 50 (the shared recipe: weights
N(0, 1/fan_in), seeds 1005, 1010, 1050), an MLP 64-100-100-10 trained here on sklearn's digits, and the
digits CNN of ``bench_trained_domains.py``. For each:

- lipgraph: one ``lipgraph.analyze`` call with ``METHODS`` (trace, per-node constants, AutoLip,
  SeqLip, affine folding, Combettes-Pesquet, ECLipsE-Fast, LipSDP) and the attained lower bound; every
  method's value and seconds are read from ``Report.bounds``, "best" is ``Report.upper``;
- the peers, run here in the same session, each in a child process stopped after ``--peer-timeout``
  seconds: ECLipsE (layer-wise SDPs) and LipSDP-Neuron in their published formulations through
  cvxpy/CVXOPT (:mod:`lipgraph.bounds.sdp_cvxpy`), every answer re-checked in float64 from its multipliers.

Run: ``.venv/bin/python bench/bench_chains.py [--peer-timeout 300] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
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
from lipgraph.bounds import sdp_cvxpy  # noqa: E402
from lipgraph.core import format_number  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_trained_domains import digits_cnn as trained_digits_cnn  # noqa: E402
from bench_trained_domains import fit  # noqa: E402

D = torch.float64
#: Peers are not started on chains with more hidden neurons than this (cvxpy's dense LMI of a width-1000,
#: depth-50 chain is 50,000 rows: tens of GB).
PEER_MAX_NEURONS = 5000
#: lipgraph's methods in the table (the defaults and LipSDP, which is opt-in: ``method=[..., "lipsdp"]``).
METHODS = ["seqlip", "affine", "combettes-pesquet", "eclipse-fast", "lipsdp"]


def find_shared() -> Path:
    for c in (ROOT.parent / "shared" / "benchmarks", ROOT.parent.parent / "shared" / "benchmarks"):
        if c.exists():
            return c
    raise SystemExit("shared/benchmarks not found next to the repository; pass --shared DIR")


def load(path: Path) -> list[torch.Tensor]:
    d = np.load(path)
    keys = sorted((k for k in d.files if k[0] == "W" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    return [torch.from_numpy(d[k]).to(D) for k in keys]


def random_mlp(seed: int, width: int, hidden: int, d_in: int = 80, d_out: int = 10) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    dims = [d_in] + [width] * hidden + [d_out]
    return [torch.from_numpy(rng.normal(0.0, 1.0 / math.sqrt(dims[i]), (dims[i + 1], dims[i]))).to(D)
            for i in range(len(dims) - 1)]


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


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def digits_mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    x, y = digits_data()
    torch.manual_seed(0)
    model = fit(nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                              nn.Linear(100, 10)), x, y, epochs=60).double()
    return model, [m.weight.detach() for m in model if isinstance(m, nn.Linear)]


def digits_cnn() -> tuple[nn.Module, list[torch.Tensor]]:
    x, y = digits_data()
    model = trained_digits_cnn(x[:1400], y[:1400]).double()  # the CNN of bench_trained_domains.py
    # The dense chain the peers get: each linear layer's Jacobian (bias-free) at the traced size.
    mats, shape = [], (1, 1, 8, 8)
    for m in model:
        if isinstance(m, nn.Conv2d | nn.Linear):
            def f(v: torch.Tensor, mod: nn.Module = m, in_shape: tuple = shape) -> torch.Tensor:
                if isinstance(mod, nn.Conv2d):
                    return nn.functional.conv2d(v.reshape(in_shape), mod.weight, None, mod.stride,
                                                mod.padding).flatten()
                return v @ mod.weight.T

            n_in = math.prod(shape)
            jac = torch.func.jacrev(f)(torch.zeros(n_in, dtype=D))
            mats.append(jac.detach())
            if isinstance(m, nn.Conv2d):
                shape = tuple(nn.functional.conv2d(torch.zeros(shape, dtype=D), m.weight, None, m.stride,
                                                   m.padding).shape)
    return model, mats


def _peer_child(fn_name: str, mats: list[torch.Tensor], queue: mp.Queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    fn = getattr(sdp_cvxpy, fn_name)
    try:
        cv = fn(mats, [(0.0, 1.0)] * (len(mats) - 1))
        queue.put((cv.value, cv.certified, cv.seconds, cv.method))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        queue.put((math.inf, False, 0.0, f"{type(exc).__name__}: {exc}"))


def run_peer(fn_name: str, mats: list[torch.Tensor], timeout: float) -> str:
    if sum(w.shape[0] for w in mats[:-1]) > PEER_MAX_NEURONS:
        return "not run (size)"
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can hang the child
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_peer_child, args=(fn_name, mats, q))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return f"> {timeout:g} s"
    if q.empty():
        return f"failed (exit {proc.exitcode})"
    value, certified, _, method = q.get()
    return cell(value, certified, time.perf_counter() - t0) if math.isfinite(value) else f"no value ({method[:40]})"


def cell(value: float | None, certified: bool, seconds: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{format_number(value, 4)}{'' if certified else '*'} / {seconds:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=None)
    ap.add_argument("--peer-timeout", type=float, default=300.0)
    ap.add_argument("--only", nargs="*", default=None, help="run only these networks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chains.txt")
    args = ap.parse_args()
    shared = args.shared or find_shared()
    nets: list[tuple[str, object]] = [("lipsdp_mnist_784_50_10", shared / "lipsdp_mnist_784_50_10.npz")]
    nets += [(p.stem, p) for p in sorted((shared / "chains").glob("*.npz"))]
    nets += [("rand_w80_h5", (1005, 80, 5)), ("rand_w80_h10", (1010, 80, 10)),
             ("digits_64_100x2_10 (trained here)", "mlp"), ("digits_cnn (trained here)", "cnn"),
             ("rand_w1000_h50", (1050, 1000, 50))]
    if args.only:
        nets = [n for n in nets if any(o in n[0] for o in args.only)]
    lines = [f"# chain bounds (value / seconds), {platform.node()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), peer timeout {args.peer_timeout:g} s", ""]
    header = ["network", "shape", "attained", "AutoLip", "SeqLip", "Combettes-Pesquet", "ECLipsE-Fast",
              "lipgraph LipSDP", "lipgraph best (analyze)", "peer ECLipsE (cvxpy)", "peer LipSDP-Neuron (cvxpy)"]
    rows = []
    for name, src in nets:
        if isinstance(src, Path):
            mats = load(src)
            model = sequential(mats)
        elif isinstance(src, tuple):
            mats = random_mlp(*src)
            model = sequential(mats)
        elif src == "mlp":
            model, mats = digits_mlp()
        else:
            model, mats = digits_cnn()
        shape = "-".join(str(m.shape[1]) for m in mats) + f"-{mats[-1].shape[0]}"
        if len(shape) > 24:
            shape = f"{mats[0].shape[1]}-{mats[0].shape[0]}x{len(mats) - 1}-{mats[-1].shape[0]}"
        x = torch.zeros(1, mats[0].shape[1], dtype=D)
        t0 = time.perf_counter()
        rep = lipgraph.analyze(model, x, method=METHODS)
        total = time.perf_counter() - t0
        b = rep.bounds

        def col(key: str, b: dict = b) -> str:
            r = b.get(key)
            return cell(r.value, r.certified, r.seconds) if r is not None else "-"

        row = [name, shape, format_number(rep.lower, 4) if rep.lower is not None else "-", col("autolip"),
               col("autolip+seqlip"), col("autolip+combettes-pesquet"), col("autolip+eclipse-fast"),
               col("autolip+lipsdp"), cell(rep.upper, rep.certified, total)]
        row += [run_peer("eclipse_cvxpy_chain", mats, args.peer_timeout),
                run_peer("lipsdp_cvxpy_chain", mats, args.peer_timeout)]
        rows.append(row)
        print(" | ".join(row), flush=True)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Each lipgraph method's seconds include the per-node constants it starts from; 'best' is one "
              "whole lipgraph.analyze call (trace, every default method, the attained lower bound). Peers: "
              "wall time of the child process (cvxpy modelling, CVXOPT, the float64 re-check); '> T s': "
              "stopped at the timeout; * = not certified."]
    text = "\n".join(lines) + "\n"
    if not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
