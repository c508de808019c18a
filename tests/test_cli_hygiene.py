"""CLI hygiene (issue 15): outputs checked before the analysis, user constants validated, the model's
folder not left on sys.path, and a lazy ``import lipgraph`` (no torch until needed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import lipgraph
import lipgraph.api
import lipgraph.cli
from lipgraph import LipgraphError, UserConstant
from lipgraph.cli import load_model, main

ROOT = Path(__file__).parent.parent
MODELS = Path(__file__).parent / "models"
SMALL = f"{MODELS / 'small.py'}:Small"
FAST = ["--no-lower", "--rows", "0"]


def _env() -> dict[str, str]:
    """Subprocesses run this checkout's lipgraph."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lipgraph: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


# --- 1. output paths are checked before any work ---------------------------------------------------

@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded or traced although an output path is bad")

    monkeypatch.setattr(lipgraph.api, "trace", boom)
    monkeypatch.setattr(lipgraph.cli, "load_model", boom)


@pytest.mark.parametrize("flag,name,needle", [
    ("--json", "nofolder/r.json", "does not exist"),
    ("--png", "nofolder/g.png", "does not exist"),
    ("--svg", "nofolder/g.svg", "does not exist"),
    ("--dot", "nofolder/g.dot", "does not exist"),
    ("--json", "r.txt", ".json"),
    ("--png", "g.jpg", ".png"),
    ("--svg", "g.png", ".svg"),
    ("--dot", "g.txt", ".dot"),
    ("--png", "g", ".png"),
])
def test_bad_output_fails_fast(flag: str, name: str, needle: str, tmp_path: Path, no_work: None,
                               capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", flag, str(tmp_path / name), *FAST])
    assert time.perf_counter() - t0 < 2.0
    _one_line_error(rc, capsys.readouterr().err, flag, needle)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_fails_fast(tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--json", str(ro / "r.json"), *FAST])
    finally:
        ro.chmod(0o700)
    _one_line_error(rc, capsys.readouterr().err, "--json", "not writable")


def test_output_is_a_folder(tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.json").mkdir()
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--json", str(tmp_path / "d.json"), *FAST])
    _one_line_error(rc, capsys.readouterr().err, "is a folder")


def test_certify_outputs_checked_first(tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["certify", SMALL, "--data", str(tmp_path / "d.npz"), "--plot", str(tmp_path / "p.gif")])
    _one_line_error(rc, capsys.readouterr().err, "--plot")


def test_file_names_starting_with_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--method", "autolip", "--json=-r.json",
               "--dot", "./-g.dot", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "-r.json").read_text())["upper"] > 0
    assert (tmp_path / "-g.dot").read_text().startswith("digraph")
    capsys.readouterr()
    # '-' alone still means stdout
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--method", "autolip", "--json", "-", *FAST])
    assert rc == 0 and json.loads(capsys.readouterr().out)["upper"] > 0


# --- 2. user constants are validated ----------------------------------------------------------------

def _small() -> tuple[torch.nn.Module, torch.Tensor]:
    return load_model(SMALL), torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("constants,needle", [
    ({"fc": math.nan}, "finite"),
    ({"fc": math.inf}, "finite"),
    ({"fc": -1.0}, ">= 0"),
    ({"fc": "2"}, "number"),
    ({"fc": None}, "number"),
    ({"fc": True}, "number"),
    ({"fc": UserConstant(-2.0, certified=True)}, ">= 0"),
    ({"fc": UserConstant(math.nan)}, "finite"),
    ({"fc": 1.0, "no_such_layer": 1.0}, "matches no node"),
])
def test_bad_constants_raise_one_error_naming_the_key(constants: dict[str, Any], needle: str) -> None:
    model, x = _small()
    with pytest.raises(LipgraphError) as info:
        lipgraph.analyze(model, x, constants=constants, method="autolip", lower=False)
    msg = str(info.value)
    key = "no_such_layer" if "no_such_layer" in constants else "fc"
    assert repr(key) in msg and needle in msg, msg
    assert "\n" not in msg


def test_good_constants_by_path_and_class() -> None:
    model, x = _small()
    r = lipgraph.analyze(model, x, constants={"fc": UserConstant(3.0, certified=True), "Conv2d": 2},
                         method="autolip", lower=False)
    got = {n.module_path: n for n in r.nodes if n.method == "user-supplied"}
    assert got["fc"].local == 3.0 and got["fc"].certified
    assert got["conv"].local == 2.0 and not got["conv"].certified


def test_cli_constants_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps({"fc": {"value": 3.0, "certified": True}, "conv": 2.5}))
    out = tmp_path / "r.json"
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--method", "autolip", "--constants", str(cfile),
               "--json", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    nodes = {n["module_path"]: n for n in json.loads(out.read_text())["nodes"] if n["method"] == "user-supplied"}
    assert nodes["fc"]["local"] == 3.0 and nodes["fc"]["certified"]
    assert nodes["conv"]["local"] == 2.5 and not nodes["conv"]["certified"]


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "JSON object"),
    ("{bad", "not valid JSON"),
    ('{"fc": {"value": 1, "certified": "yes"}}', "'fc'"),
    ('{"fc": -3}', "'fc'"),
    ('{"nowhere": 1}', "'nowhere'"),
])
def test_cli_bad_constants_file(content: str, needle: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    cfile = tmp_path / "c.json"
    cfile.write_text(content)
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--method", "autolip", "--constants", str(cfile),
               *FAST])
    _one_line_error(rc, capsys.readouterr().err, needle)


def test_cli_missing_constants_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--constants", str(tmp_path / "none.json"), *FAST])
    _one_line_error(rc, capsys.readouterr().err, "--constants", "cannot read")


# --- 3. the model's folder does not stay on sys.path ------------------------------------------------

MODEL_SRC = """
import torch.nn as nn
import lg_helper_{tag}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, lg_helper_{tag}.WIDTH)

    def forward(self, x):
        return self.fc(x)
"""


def test_sys_path_unchanged_and_neighbours_forgotten(tmp_path: Path) -> None:
    tag = tmp_path.name.replace("-", "_")
    (tmp_path / "net.py").write_text(MODEL_SRC.format(tag=tag))
    (tmp_path / f"lg_helper_{tag}.py").write_text("WIDTH = 4\n")
    before = list(sys.path)
    model = load_model(f"{tmp_path / 'net.py'}:Net")  # the file may import its neighbours while it loads
    assert model.fc.out_features == 4
    assert sys.path == before
    assert f"lg_helper_{tag}" not in sys.modules


def test_decoy_beside_model_is_not_imported_later(tmp_path: Path) -> None:
    """A graphviz.py next to the model must not shadow the package that rendering imports."""
    (tmp_path / "net.py").write_text("import torch.nn as nn\nclass Net(nn.Linear):\n"
                                     "    def __init__(self):\n        super().__init__(3, 2)\n")
    (tmp_path / "graphviz.py").write_text("raise RuntimeError('decoy graphviz imported')\n")
    code = (
        "import sys\n"
        "from lipgraph.cli import load_model\n"
        f"before = list(sys.path)\nload_model({str(tmp_path / 'net.py')!r} + ':Net')\n"
        "assert sys.path == before, 'sys.path changed'\n"
        "sys.modules.pop('graphviz', None)\n"
        "try:\n    import graphviz\nexcept ModuleNotFoundError:\n    pass\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- 4. lazy import: no torch for import lipgraph or a bad model spec ----------------------------------

def test_import_lipgraph_does_not_import_torch() -> None:
    code = ("import sys, lipgraph\n"
            "heavy = [m for m in ('torch', 'onnx', 'networkx', 'numpy') if m in sys.modules]\n"
            "print(lipgraph.__file__); print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/",
                          timeout=300)
    assert done.returncode == 0, done.stderr
    file, heavy = done.stdout.splitlines()
    assert Path(file).resolve().is_relative_to(ROOT.resolve())
    assert heavy == "[]"


def test_bad_spec_error_path_does_not_import_torch(tmp_path: Path) -> None:
    code = ("import sys\nfrom lipgraph.cli import main\n"
            f"rc = main(['analyze', {str(tmp_path / 'missing.py')!r} + ':X', '--input-shape', '1,3'])\n"
            "print(rc, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/",
                          timeout=300)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "no such file" in done.stderr


def test_lazy_names_resolve() -> None:
    for name in lipgraph.__all__:
        assert getattr(lipgraph, name) is not None
    assert "analyze" in dir(lipgraph)
    assert lipgraph.ir.nodes is not None  # submodules too
    with pytest.raises(AttributeError):
        lipgraph.no_such_thing  # noqa: B018


def test_certify_stays_the_function_after_importing_its_submodule() -> None:
    code = ("from lipgraph.certify import PairDiff\nimport lipgraph\n"
            "print(callable(lipgraph.certify) and lipgraph.certify.__name__ == 'certify')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/",
                          timeout=300)
    assert done.stdout.strip() == "True", done.stdout + done.stderr


# --- 5. --seed reaches every random choice -----------------------------------------------------------

def test_seed_reaches_settings_and_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _small()
    seen: list[int] = []
    real = lipgraph.api.local_constants

    def spy(g: Any, ctx: Any, *a: Any) -> Any:
        seen.append(ctx.seed)
        return real(g, ctx, *a)

    monkeypatch.setattr(lipgraph.api, "local_constants", spy)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [lipgraph.analyze(model, x, method="autolip", seed=s, lower_budget=2).lower for s in (7, 7)]
    assert seen == [7, 7]
    assert runs[0] == runs[1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone


def test_cli_seed_reaches_analyze(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    got: dict[str, Any] = {}

    def fake(model: Any, example: Any, **kw: Any) -> Any:
        got.update(kw, example=example)
        raise LipgraphError("stop here")

    monkeypatch.setattr(lipgraph, "analyze", fake)
    for seed in (3, 3, 4):
        assert main(["analyze", SMALL, "--input-shape", "1,3,8,8", "--seed", str(seed), *FAST]) == 2
        got[seed] = (got["seed"], got["example"].clone())
    assert got[3][0] == 3 and got[4][0] == 4
    assert torch.equal(got[3][1], got[3][1]) and not torch.equal(got[3][1], got[4][1])


def test_cli_builds_a_randomly_initialised_model_the_same_in_every_run(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A factory that draws its weights (``torchvision.models:resnet18`` without weights) gets the same weights,
    and so the same bound, in every run for one ``--seed``: the global generator is seeded before it is built
    (two runs in one process start from different generator states)."""
    src = tmp_path / "rand.py"
    src.write_text("import torch.nn as nn\nNet = lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))\n")
    uppers = []
    for seed in (0, 0, 1):
        out = tmp_path / f"r{len(uppers)}.json"
        assert main(["analyze", f"{src}:Net", "--input-shape", "1,4", "--seed", str(seed), "--json", str(out),
                     *FAST]) == 0
        uppers.append(json.loads(out.read_text())["upper"])
    capsys.readouterr()
    assert uppers[0] == uppers[1] != uppers[2]
    w = [load_model(f"{src}:Net", seed)[0].weight for seed in (5, 5)]
    assert torch.equal(w[0], w[1])


# --- --input-dtype for models with integer inputs -----------------------------------------------------

EMB_SRC = """
import torch.nn as nn

class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, i):
        return self.fc(self.e(i))
"""


def test_integer_input_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "emb.py").write_text(EMB_SRC)
    spec = f"{tmp_path / 'emb.py'}:Emb"
    cfile = tmp_path / "c.json"
    cfile.write_text('{"e": 1.5}')
    out = tmp_path / "r.json"
    rc = main(["analyze", spec, "--input-shape", "1,3", "--input-dtype", "int64", "--method", "autolip",
               "--constants", str(cfile), "--json", str(out), "--rows", "0", "--lower-budget", "5"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["lower"] is None and math.isfinite(d["upper"])  # no lower-bound search over token ids
    with pytest.raises(SystemExit):
        main(["analyze", spec, "--input-shape", "1,3", "--input-dtype", "complex7"])
