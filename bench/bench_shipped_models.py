"""Benchmark: a trained model that a pip package ships, globally and on input domains around real inputs.

    python bench/bench_shipped_models.py [--domains all|small]

The model: PP-OCR's text-direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, a MobileNetV3-style
CNN with hard-swish, squeeze-excitation gates and a softmax over {0, 180} degrees; trained weights), as the
``rapidocr-onnxruntime`` wheel ships it (``scripts/setup.sh`` installs the wheel without its dependencies; only
the ONNX file is read, nothing of the package runs). Its input is a 3 x 48 x 192 text line scaled to [-1, 1]
(``(pixel / 255 - 0.5) / 0.5``, the package's own preprocessing).

The inputs (:func:`text_line`): lines of four handwritten digits from sklearn's bundled digits (8x8, 0..16),
each upsampled to 48x48, dark ink on white, upright and rotated by 180 degrees. The classifier reads them as a
text line should be read (the script prints its probabilities). Per input and domain: the certified bound, the
attained value and their ratio, and the seconds, next to the global interval (``inf``: its gates multiply two
input-dependent tensors).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lipgraph
from lipgraph.domains import Ball, Box

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from shipped_models import GREY_LEVEL, PACKAGE, shipped_model_path, text_line  # noqa: E402


def probabilities(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0][0]


def domains(center: torch.Tensor, which: str) -> list[tuple[str, object]]:
    """l_inf balls of one and four grey levels and an l2 ball of 0.1, all within the input range [-1, 1];
    ``all`` adds the whole input box."""
    out: list[tuple[str, object]] = [
        ("linf 1 grey level", Ball(center, GREY_LEVEL, "linf", clip=(-1.0, 1.0))),
        ("linf 4 grey levels", Ball(center, 4 * GREY_LEVEL, "linf", clip=(-1.0, 1.0))),
        ("l2 0.1", Ball(center, 0.1, "l2", clip=(-1.0, 1.0))),
    ]
    if which == "all":
        out.append(("box [-1, 1]", Box(-1.0, 1.0)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", choices=["all", "small"], default="all")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = shipped_model_path()
    print(f"# {path.name} from {PACKAGE}; lipgraph {lipgraph.__version__}, torch {torch.__version__}, "
          f"{args.threads} threads")
    t0 = time.perf_counter()
    glob = lipgraph.analyze(str(path), text_line())
    print(f"global: [{glob.lower:.4g}, {glob.upper:.4g}] {time.perf_counter() - t0:.1f} s; "
          f"not bounded at: {[d['node'] for d in glob.not_lipschitz][:3]}")
    print(f"{'input':<26} {'p(0), p(180)':>16} {'domain':<20} {'[attained, certified]':>26} {'ratio':>8} "
          f"{'s':>6}")
    for label, x in (("digits 0-3 upright", text_line(0)), ("digits 0-3 rotated 180", text_line(0, True)),
                     ("digits 32-35 upright", text_line(32))):
        prob = probabilities(path, x)
        for dlabel, dom in domains(x, args.domains):
            t0 = time.perf_counter()
            r = lipgraph.analyze(str(path), x, domain=dom)
            sec = time.perf_counter() - t0
            low = r.lower or 0.0
            ratio = r.upper / low if low > 0 else float("inf")
            print(f"{label:<26} {prob[0]:>7.4f} {prob[1]:>7.4f}  {dlabel:<20} [{low:>10.4g}, {r.upper:>11.4g}] "
                  f"{ratio:>8.3g} {sec:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
