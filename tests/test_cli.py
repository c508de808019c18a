"""The command line: model specs, errors as one line with exit code 2, JSON that follows the documented schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lipgraph import report
from lipgraph.cli import main

MODELS = Path(__file__).parent / "models"
SMALL = f"{MODELS / 'small.py'}:Small"
BRANCH = next(i for i, ln in enumerate((MODELS / "small.py").read_text().splitlines(), 1) if "if x.sum() > 0" in ln)
FAST = ["--no-lower", "--rows", "0"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lipgraph: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# --- the documented JSON schema (report.py docstring) ----------------------------------------------

NUM = (int, float)


def _num_or_inf(v: Any) -> bool:
    return isinstance(v, NUM) or v in ("inf", "-inf", "nan")


NODE_KEYS = {"name": str, "op": str, "source": str, "origin": str, "module_path": str, "in_shapes": list,
             "out_shape": (list, type(None)), "local": "num", "local_lower": "num?", "partials": list,
             "combine": str, "certified": bool, "method": str, "reason": (str, type(None)), "cumulative": "num",
             "cumulative_certified": bool}


def _check(value: Any, kind: Any, where: str) -> None:
    if kind == "num":
        assert _num_or_inf(value), where
    elif kind == "num?":
        assert value is None or _num_or_inf(value), where
    else:
        assert isinstance(value, kind), f"{where}: {value!r} is not {kind}"


def validate_report(d: dict[str, Any]) -> None:
    """Check a report against the schema in lipgraph/report.py's docstring."""
    top = [ln for ln in (report.__doc__ or "").splitlines() if re.match(r'^ {6}"', ln)]  # top-level lines
    documented = set()
    for ln in top:
        while True:  # drop nested {...} / [...] so that only top-level keys remain
            shorter = re.sub(r"\{[^{}]*\}|\[[^\[\]]*\]", "", ln)
            if shorter == ln:
                break
            ln = shorter
        documented |= set(re.findall(r'"(\w+)":', ln.split("[", 1)[0].split("{", 1)[0]))
    assert documented >= {"schema", "upper", "nodes", "bounds"}
    assert set(d) == documented, set(d) ^ documented
    assert d["schema"] == report.SCHEMA
    for key, kind in {"model": str, "frontend": str, "input_shapes": list, "device": str, "upper": "num",
                      "certified": bool, "upper_method": (str, type(None)), "lower": "num?", "bounds": dict,
                      "nodes": list, "segments": list, "not_lipschitz": list, "seconds": dict}.items():
        _check(d[key], kind, key)
    assert d["frontend"] in ("torch.fx", "torch.export", "onnx")
    assert all(isinstance(s, list) and all(isinstance(i, int) for i in s) for s in d["input_shapes"])
    for name, b in d["bounds"].items():
        assert {"value", "certified", "method", "seconds", "details"} <= set(b), name
        _check(b["value"], "num", name)
        _check(b["certified"], bool, name)
    assert d["upper_method"] in d["bounds"]
    for n in d["nodes"]:
        assert set(NODE_KEYS) <= set(n), set(NODE_KEYS) - set(n)
        for key, kind in NODE_KEYS.items():
            _check(n[key], kind, f"node {n['name']}.{key}")
        assert n["combine"] in ("sum", "l2")
        assert all(_num_or_inf(p) for p in n["partials"])
    for item in d["not_lipschitz"]:
        assert set(item) == {"node", "reason"}
    for seg in d["segments"]:
        assert isinstance(seg["nodes"], list)
    assert all(isinstance(v, NUM) for v in d["seconds"].values())


# --- successful runs ------------------------------------------------------------------------------


def test_file_spec_writes_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc, stdout, _ = run(capsys, SMALL, "--input-shape", "1,3,8,8", "--json", str(out), "--lower-budget", "1")
    assert rc == 0
    d = json.loads(out.read_text())
    validate_report(d)
    assert d["input_shapes"] == [[1, 3, 8, 8]] and d["frontend"] == "torch.fx"
    assert isinstance(d["upper"], float) and d["lower"] is not None and d["lower"] <= d["upper"]
    assert "Lipschitz constant in" in stdout


def test_effort_reaches_the_analysis(capsys: pytest.CaptureFixture[str]) -> None:
    # effort=inf lifts the work budgets, as naming the methods does: the same bounds as --method with every default
    rc, out_inf, _ = run(capsys, SMALL, "--input-shape", "1,3,8,8", "--effort", "inf", "--json", "-", *FAST)
    assert rc == 0
    rc, out_auto, _ = run(capsys, SMALL, "--input-shape", "1,3,8,8", "--json", "-", *FAST)
    assert rc == 0
    def no_constants(token: str) -> None:
        raise AssertionError(f"{token} in the JSON: not strict JSON")

    # every inf budget is the string "inf" (the report's details are free-form: each float is made strict)
    lifted, default = (json.loads(o, parse_constant=no_constants) for o in (out_inf, out_auto))
    assert lifted["upper"] <= default["upper"]
    for key, budget in [("autolip+eclipse-fast", "budget"), ("autolip+affine", "materialise_budget"),
                        ("autolip+seqlip", "dense_budget")]:  # each report says what it was allowed
        assert isinstance(default["bounds"][key]["details"][budget], float)
        assert lifted["bounds"][key]["details"][budget] == "inf"


def test_json_to_stdout_with_inf(capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = run(capsys, f"{MODELS / 'small.py'}:WithCumprod", "--input-shape", "2,6", "--json", "-", *FAST)
    assert rc == 0
    d = json.loads(stdout)  # strict JSON: inf written as a string
    validate_report(d)
    assert d["upper"] == "inf"
    assert len(d["not_lipschitz"]) == 1 and "cumprod" in d["not_lipschitz"][0]["reason"]


def test_torchvision_spec(capsys: pytest.CaptureFixture[str], cheap_norms: None) -> None:
    rc, stdout, err = run(capsys, "torchvision.models:resnet18", "--input-shape", "1x3x32x32", "--method", "autolip",
                          "--power-iterations", "2", "--json", "-", *FAST)
    assert rc == 0, err
    d = json.loads(stdout)
    validate_report(d)
    assert d["model"] == "ResNet" and isinstance(d["upper"], float)
    assert any(n["module_path"] == "layer4.1.conv2" for n in d["nodes"])


# --- bad input: one line, exit code 2, no traceback -------------------------------------------------


@pytest.mark.parametrize("argv,needles", [
    (["missing/model.py:Net", "--input-shape", "1,3"], ["no such file", "missing/model.py"]),
    (["not_a_spec", "--input-shape", "1,3"], ["bad model spec", "path/file.py:Name"]),
    (["missing.onnx"], ["no such file"]),
    ([f"{MODELS / 'small.py'}:Nope", "--input-shape", "1,3"], ["has no attribute 'Nope'"]),
    ([f"{MODELS / 'small.py'}:needs_arguments", "--input-shape", "1,3"], ["without arguments"]),
    ([f"{MODELS / 'small.py'}:not_a_module", "--input-shape", "1,3"], ["not a torch.nn.Module"]),
    ([f"{MODELS / 'broken.py'}:Net", "--input-shape", "1,3"], ["importing", "broken on purpose"]),
    (["no_such_package_xyz.models:Net", "--input-shape", "1,3"], ["cannot import module"]),
    ([SMALL, "--input-shape", "1,a,8,8"], ["bad --input-shape"]),
    ([SMALL, "--input-shape", "1,0,8"], ["positive integer"]),
    ([SMALL], ["--input-shape is required"]),
    ([SMALL, "--input-shape", "1,5,8,8"], ["failed at node 'conv'", "small.py:20", "3 channels"]),
    ([SMALL, "--input-shape", "1,3,8,8;1,3,8,8"], ["2 example input"]),
    ([f"{MODELS / 'small.py'}:Untraceable", "--input-shape", "2,6"],
     [f"small.py:{BRANCH}", "if x.sum() > 0", "torch.where"]),
    ([SMALL, "--input-shape", "1,3,8,8", "--method", "auto", "--device", "cuda:7"], []),
    ([SMALL, "--input-shape", "1,3,8,8", "--effort", "0"], ["--effort must be a positive number", "not 0.0"]),
    ([SMALL, "--input-shape", "1,3,8,8", "--effort", "nan"], ["--effort must be a positive number", "nan"]),
], ids=["missing-file", "bad-spec", "missing-onnx", "no-attr", "factory-args", "not-module", "import-error",
        "no-package", "bad-shape", "zero-dim", "no-shape", "wrong-shape", "too-many-inputs", "untraceable",
        "bad-device", "zero-effort", "nan-effort"])
def test_bad_input_is_one_line_exit_2(argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    import torch  # noqa: PLC0415

    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("the bad-device case needs a machine without CUDA")
    rc, _, err = run(capsys, *argv, *FAST)
    assert_one_line_error(rc, err, *needles)


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["analyze"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["analyze", SMALL, "--method", "magic"])
    assert info.value.code == 2


def test_python_m_lipgraph_subprocess(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    ok = subprocess.run([sys.executable, "-m", "lipgraph", "analyze", SMALL, "--input-shape", "1,3,8,8", "--json",
                         "-", *FAST], capture_output=True, text=True, cwd=root, timeout=300)
    assert ok.returncode == 0, ok.stderr
    validate_report(json.loads(ok.stdout))
    bad = subprocess.run([sys.executable, "-m", "lipgraph", "analyze", f"{MODELS / 'small.py'}:Untraceable",
                          "--input-shape", "2,6", *FAST], capture_output=True, text=True, cwd=root, timeout=300)
    assert_one_line_error(bad.returncode, bad.stderr, f"small.py:{BRANCH}", "if x.sum() > 0")
