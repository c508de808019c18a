"""Command line: ``lipgraph analyze MODEL --input-shape 1,3,224,224 [--json out.json] [--png out.png]``.

``lipgraph certify MODEL --data file.npz [--radius 0.1 0.2] [--json out.json] [--plot out.png]``
prints certified robustness radii (see :mod:`lipgraph.certify`).

MODEL is ``path/file.py:Name``, ``package.module:Name`` (a class or a
zero-argument factory, e.g. ``torchvision.models:resnet18``) or an ``.onnx``
file. Errors in the input are reported in one line with exit code 2.

Loading ``file.py:Name`` runs that file's code (as ``python file.py`` would); its folder is on
``sys.path`` only while the file is imported, so a module beside it (say a ``graphviz.py``)
cannot shadow a package that lipgraph imports later.

Output paths (``--json``, ``--png``, ``--svg``, ``--dot``, ``--plot``) are checked before any
analysis: the folder must exist and be writable and the suffix must match the format. A file
name that starts with ``-`` is written with ``--json=-out.json`` or ``--json ./-out.json``
(``--json -`` alone means stdout).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .bounds import METHODS
from .errors import InputShapeError, LipgraphError, ModelLoadError


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1,3,224,224"`` -> [(1,3,224,224)]; several inputs separated by ``;``."""
    shapes = []
    for part in text.split(";"):
        part = part.strip().strip("()[]")
        try:
            dims = tuple(int(d) for d in part.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise InputShapeError(f"bad --input-shape {text!r}: expected integers like 1,3,224,224") from None
        if not dims or any(d <= 0 for d in dims):
            raise InputShapeError(f"bad --input-shape {text!r}: every dimension must be a positive integer")
        shapes.append(dims)
    return shapes


def parse_methods(text: str) -> str | list[str]:
    """``auto`` or a comma-separated list of bound algorithm names (checked against the METHODS table)."""
    if text == "auto":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: use 'auto' or a list of {', '.join(METHODS)}")
    return names


def load_model(spec: str, seed: int = 0) -> Any:
    """Load ``file.py:Name`` / ``package.module:Name`` (class or zero-argument factory) or an ONNX path.
    torch's random generator is seeded with ``seed`` just before the model is built, so a model that draws its
    weights (``torchvision.models:resnet18`` without weights) is the same model, and gets the same numbers, in
    every run."""
    if spec.endswith(".onnx"):
        if not os.path.exists(spec):
            raise ModelLoadError(f"no such file: {spec}")
        return spec
    if ":" not in spec:
        raise ModelLoadError(
            f"bad model spec {spec!r}: use path/file.py:Name, package.module:Name (e.g. torchvision.models:resnet18) "
            "or a .onnx file"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.exists():
            raise ModelLoadError(f"no such file: {where}")
        mod_name = f"_lipgraph_user_{path.stem}"
        s = importlib.util.spec_from_file_location(mod_name, path)
        if s is None or s.loader is None:
            raise ModelLoadError(f"cannot import {where}")
        module = importlib.util.module_from_spec(s)
        folder = str(path.parent.resolve())
        saved_path = list(sys.path)
        before = set(sys.modules)
        sys.path.insert(0, folder)  # the file may import its neighbours, as under ``python file.py``
        try:
            sys.modules[mod_name] = module
            s.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file failed; say so in one line
            raise ModelLoadError(f"importing {where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path[:] = saved_path
            _forget_modules_from(folder, before)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {where!r}: {exc}") from exc
    obj = getattr(module, name, None)
    if obj is None:
        raise ModelLoadError(f"{where} has no attribute {name!r}")
    torch_mod = sys.modules.get("torch")  # imported by the model's module if it builds a torch model
    if torch_mod is not None:
        torch_mod.manual_seed(seed)
    try:
        model = obj()
    except TypeError as exc:
        raise ModelLoadError(f"{spec} must be a class or factory callable without arguments: {exc}") from exc
    import torch.nn as nn  # noqa: PLC0415

    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _forget_modules_from(folder: str, before: set[str]) -> None:
    """Drop modules first imported from ``folder`` by the user's file from ``sys.modules``.

    Their objects stay alive through the user's module; only the names go, so a later
    ``import graphviz`` (say) finds the installed package, not a file next to the model.
    """
    root = os.path.join(folder, "")
    for name in set(sys.modules) - before:
        if name.startswith("_lipgraph_user_"):
            continue
        origin = getattr(sys.modules.get(name), "__file__", None) or ""
        if os.path.abspath(origin).startswith(root):
            del sys.modules[name]


#: output option -> the suffixes it can write
OUTPUT_SUFFIXES = {"json_path": (".json",), "png": (".png",), "svg": (".svg",), "dot": (".dot", ".gv"),
                   "plot": (".png", ".svg", ".pdf")}
OUTPUT_FLAGS = {"json_path": "--json"}


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path has a supported suffix and an existing, writable folder (before any work)."""
    for dest, suffixes in OUTPUT_SUFFIXES.items():
        path = getattr(args, dest, None)
        flag = OUTPUT_FLAGS.get(dest, f"--{dest}")
        if not path or (dest == "json_path" and path == "-"):
            continue
        if os.path.splitext(path)[1].lower() not in suffixes:
            raise LipgraphError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LipgraphError(f"{flag} {path}: folder {folder} does not exist")
        if os.path.isdir(path):
            raise LipgraphError(f"{flag} {path}: is a folder, not a file")
        if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise LipgraphError(f"{flag} {path}: not writable")


def load_constants(path: str) -> dict[str, Any]:
    """``--constants file.json``: a JSON object of key -> number or key -> {"value": v, "certified": bool}."""
    import json  # noqa: PLC0415

    from .bounds.local import UserConstant  # noqa: PLC0415

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise LipgraphError(f"--constants {path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise LipgraphError(f"--constants {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LipgraphError(f"--constants {path}: expected a JSON object of name -> number")
    out: dict[str, Any] = {}
    for key, v in data.items():
        if isinstance(v, dict):
            extra = set(v) - {"value", "certified"}
            if "value" not in v or extra or not isinstance(v.get("certified", False), bool):
                raise LipgraphError(f"--constants {path}: entry {key!r} must be a number or "
                                    '{"value": v, "certified": true/false}')
            out[key] = UserConstant(v["value"], v.get("certified", False))
        else:
            out[key] = v
    return out


INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _input_dtype(name: str) -> Any:
    import torch  # noqa: PLC0415

    return getattr(torch, name)


class _Progress:
    """A tqdm bar per stage on stderr (trace, constants, each bound algorithm, SeqLip's segments, the domain
    pass, the lower-bound search's restarts), only on a terminal or when forced; quiet otherwise. tqdm is imported
    on the first call, so the CLI's error paths stay fast."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None
        #: The stage whose bar last ran to its end: a later "done" of it (a stage whose algorithm counted its own
        #: parts, then says 1 of 1) opens no second bar.
        self.finished: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage == self.finished and stage != self.stage and done >= total:
            return
        if stage != self.stage:
            self.close()
            from tqdm import tqdm  # noqa: PLC0415 - lazy: only a run with progress shown pays for it

            unit = " nodes" if stage == "constants" else ""
            self.stage = stage
            self.bar = tqdm(total=max(total, 1), desc=stage, unit=unit.strip() or "step", file=sys.stderr,
                            leave=False, dynamic_ncols=True, mininterval=0.2)
        if self.bar is not None:
            self.bar.total = max(total, 1)
            self.bar.n = min(done, self.bar.total)
            self.bar.refresh()
            if done >= total:
                self.close()
                self.finished = stage

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipgraph", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="bound the Lipschitz constant of a model")
    a.add_argument("model", help="path/file.py:Name, package.module:Name, or model.onnx")
    a.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (several inputs: ';'-separated)")
    a.add_argument("--input-dtype", default="float32", choices=INPUT_DTYPES,
                   help="dtype of the example input (float: standard normal; integer/bool, e.g. token ids: zeros)")
    a.add_argument("--method", default="auto", type=parse_methods,
                   help="'auto' (every default bound algorithm) or a comma-separated list of: "
                        + ", ".join(METHODS))
    a.add_argument("--device", default=None, help="cpu (default) or cuda")
    a.add_argument("--json", dest="json_path", help="write the report as JSON to this file ('-' for stdout)")
    a.add_argument("--png", help="render the annotated graph as PNG")
    a.add_argument("--svg", help="render the annotated graph as SVG")
    a.add_argument("--dot", help="write the annotated graph as DOT")
    a.add_argument("--constants", metavar="FILE.json",
                   help='user constants: a JSON object of module path / class / node name -> number '
                        '(an unverified assumption) or {"value": v, "certified": true}')
    a.add_argument("--depth", type=int, default=None,
                   help="collapse modules deeper than this in the rendering (each shows its own constant)")
    a.add_argument("--no-lower", action="store_true", help="skip the empirical lower bound (Jacobian / secant ascent)")
    a.add_argument("--lower-budget", type=int, default=None,
                   help="restarts of the lower-bound search (work, not seconds; default: up to 8, scaled to "
                        "the model's size)")
    a.add_argument("--power-iterations", type=int, default=100, help="power-method steps for estimates")
    a.add_argument("--effort", type=float, default=1.0,
                   help="scale the work budgets of SeqLip, affine folding and the SDP-class chain bounds under "
                        "--method auto (work counted from shapes, not seconds; default 1, 'inf' lifts them)")
    a.add_argument("--rows", type=int, default=60, help="node rows to print (0: none, -1: all)")
    a.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice: the model's construction (random initial weights), example "
                        "input, power-method starts, lower-bound search")
    a.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    a.add_argument("--domain", metavar="box:LO,HI",
                   help="bound the constant on the input box LO <= x <= HI (e.g. box:0,1 for images in [0,1])")
    a.add_argument("--ball", type=float, metavar="RADIUS",
                   help="bound the constant on the ball of this radius around the example input (or --center)")
    a.add_argument("--norm", default="l2", choices=["l2", "linf"], help="norm of the --ball (default l2)")
    a.add_argument("--clip", metavar="LO,HI", help="intersect the --ball with the box LO <= x <= HI")
    a.add_argument("--center", metavar="FILE", help="center of the --ball: a .npy file or a .pt tensor")
    a.add_argument("--domain-only", action="store_true",
                   help="with --domain/--ball, run the domain-aware algorithms on the domain only (faster; the "
                        "domain bound may then exceed the global one)")
    c = sub.add_parser("certify", help="certified robustness radii from global Lipschitz bounds")
    c.add_argument("model", help="path/file.py:Name, package.module:Name (a PyTorch classifier) or model.onnx")
    c.add_argument("--data", required=True, help=".npz with arrays x and y, or .pt holding a dict with x and y")
    c.add_argument("--radius", type=float, nargs="+", default=[], help="radii for certified accuracy")
    c.add_argument("--norm", default="l2", choices=["l2", "linf"])
    c.add_argument("--attack", action="store_true", help="also run the PGD attack (upper estimate of each radius)")
    c.add_argument("--seed", type=int, default=0, help="seed of the PGD attack and the bounds' random starts")
    c.add_argument("--local", action="store_true",
                   help="also search local radii (constants and ranges on balls around each input; ~3 s an input "
                        "on a 784-50-10 network)")
    c.add_argument("--local-steps", type=int, default=8, help="checks per kind of local radius and input")
    c.add_argument("--clip", metavar="LO,HI",
                   help="the data box: local balls are clipped to it (those radii then hold inside it only)")
    c.add_argument("--json", dest="json_path", help="write the certificate as JSON to this file")
    c.add_argument("--plot", help="plot certified accuracy vs radius (PNG/SVG by suffix)")
    return p


def _load_data(path: str) -> tuple[Any, Any]:
    """``x`` (float tensor) and ``y`` (long tensor) from an .npz or a .pt dict."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if not os.path.exists(path):
        raise InputShapeError(f"no such data file: {path}")
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
        elif path.endswith(".pt"):
            data = torch.load(path, weights_only=True)
        else:
            raise InputShapeError(f"--data {path}: expected a .npz or .pt file")
    except InputShapeError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable file: one line
        raise InputShapeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise InputShapeError(f"{path} must hold arrays named x and y")
    x = torch.as_tensor(np.asarray(data["x"]) if not isinstance(data["x"], torch.Tensor) else data["x"]).float()
    y = torch.as_tensor(np.asarray(data["y"]) if not isinstance(data["y"], torch.Tensor) else data["y"]).long()
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputShapeError(f"{path}: x must be (N, ...) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def _certify(args: argparse.Namespace) -> int:
    check_outputs(args)
    import lipgraph  # noqa: PLC0415

    model = load_model(args.model, args.seed)  # an .onnx path stays a path: certify loads its IR on one shape
    x, y = _load_data(args.data)
    box = None
    if args.clip:
        try:
            lo, hi = (float(v) for v in args.clip.split(","))
        except ValueError:
            raise InputShapeError(f"--clip {args.clip!r}: expected LO,HI (two numbers)") from None
        from .domains import Box  # noqa: PLC0415

        box = Box(lo, hi)
    cert = lipgraph.certify(model, x, y, radius=args.radius, norm=args.norm, attack=args.attack,
                            seed=args.seed, local=args.local, local_steps=args.local_steps, domain=box)
    print(cert.table())
    if args.json_path:
        Path(args.json_path).write_text(cert.to_json())
        print(f"wrote {args.json_path}")
    if args.plot:
        print(f"wrote {cert.plot(args.plot)}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    check_outputs(args)  # before the (possibly long) analysis
    if not args.effort > 0:  # NaN too; the library says the same, after the model is loaded
        raise LipgraphError(f"--effort must be a positive number (1 is the default, inf lifts every budget), "
                            f"not {args.effort!r}")
    constants = load_constants(args.constants) if args.constants else None
    model = load_model(args.model, args.seed)  # errors in the spec come back before torch is imported

    import torch  # noqa: PLC0415

    import lipgraph  # noqa: PLC0415

    example: Any = None
    if args.input_shape:
        torch.manual_seed(args.seed)
        shapes = parse_shapes(args.input_shape)
        dtype = _input_dtype(args.input_dtype)
        if dtype.is_floating_point:
            example = [torch.randn(s, dtype=dtype) for s in shapes]
        else:  # zeros are valid token ids / indices; integer inputs get no lower-bound search
            example = [torch.zeros(s, dtype=dtype) for s in shapes]
        example = example[0] if len(example) == 1 else tuple(example)
    elif not isinstance(model, str):
        raise InputShapeError("--input-shape is required for a PyTorch model (e.g. --input-shape 1,3,224,224)")
    domain, example = _domain(args, example)
    progress = _Progress(args.progress or sys.stderr.isatty())
    t0 = time.perf_counter()
    report = lipgraph.analyze(
        model, example, method=args.method, device=args.device, constants=constants, lower=not args.no_lower,
        lower_budget=args.lower_budget, power_iterations=args.power_iterations, progress=progress,
        seed=args.seed, domain=domain, domain_only=args.domain_only, effort=args.effort,
    )
    elapsed = time.perf_counter() - t0
    if args.json_path == "-":
        print(report.to_json())
    else:
        if args.rows != 0:
            print(report.table(None if args.rows < 0 else args.rows))
            print()
        print(report.summary())
        print(f"analysed in {elapsed:.1f}s")
        if args.json_path:
            Path(args.json_path).write_text(report.to_json())
            print(f"wrote {args.json_path}")
    for path in (args.dot, args.svg, args.png):  # DOT first: it needs no Graphviz install
        if path:
            from .render import render  # noqa: PLC0415 - the command line imports torch only when it works
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                out = render(report, path, depth=args.depth)
            for note in notes:
                print(f"lipgraph: note: {note.message}", file=sys.stderr)
            print(f"wrote {out}", file=sys.stderr if args.json_path == "-" else sys.stdout)
    return 0


def _domain(args: argparse.Namespace, example: Any) -> tuple[Any, Any]:
    """The input domain of ``--domain`` / ``--ball`` (None without them) and the example input to use: a point
    of the domain (drawn uniformly in the box, seeded, or the ``--center``)."""
    if args.domain is None and args.ball is None:
        for flag in ("clip", "center"):
            if getattr(args, flag):
                raise LipgraphError(f"--{flag} needs --ball")
        if args.domain_only:
            raise LipgraphError("--domain-only needs --domain box:LO,HI or --ball RADIUS")
        return None, example
    if args.domain is not None and args.ball is not None:
        raise LipgraphError("give either --domain box:LO,HI or --ball RADIUS, not both")
    import torch  # noqa: PLC0415

    from .domains import Ball, parse_box  # noqa: PLC0415

    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise LipgraphError("an input domain needs one floating-point input (--input-shape with a single shape)")
    gen = torch.Generator().manual_seed(args.seed)
    try:
        if args.domain is not None:
            box = parse_box(args.domain)
            e = box.enclosure(example.double())
            return box, (e.lo + torch.rand(example.shape, generator=gen, dtype=torch.float64) * (e.hi - e.lo)).to(
                example.dtype)
        clip = parse_box(args.clip) if args.clip else None
        if args.center:
            center = _load_tensor(args.center).to(example.dtype)
            if center.numel() != example.numel():
                raise LipgraphError(f"--center {args.center} has {center.numel()} entries; the input has "
                                    f"{example.numel()} (shape {tuple(example.shape)})")
            example = center.reshape(example.shape)
        elif clip is not None:
            e = clip.enclosure(example.double())
            example = (e.lo + torch.rand(example.shape, generator=gen, dtype=torch.float64) * (e.hi - e.lo)).to(
                example.dtype)
        return Ball(example, args.ball, args.norm, clip), example
    except ValueError as exc:
        raise LipgraphError(f"input domain: {exc}") from None


def _load_tensor(path: str) -> Any:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if not Path(path).is_file():
        raise LipgraphError(f"--center {path}: no such file")
    try:
        if path.endswith(".npy"):
            return torch.from_numpy(np.load(path, allow_pickle=False))
        t = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a malformed file is one clear line
        raise LipgraphError(f"--center {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(t, torch.Tensor):
        raise LipgraphError(f"--center {path}: holds a {type(t).__name__}, not a tensor")
    if not bool(torch.isfinite(t).all()):
        raise LipgraphError(f"--center {path}: has non-finite entries")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "certify":
            return _certify(args)
    except LipgraphError as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"lipgraph: error: {lines[0]}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        print("lipgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a bare traceback from the CLI
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"lipgraph: internal error: {type(exc).__name__}: {first} (please report this with the model)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
