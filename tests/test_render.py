"""Rendering: golden DOT files, module collapse and folds (sound constants), PNG/SVG with `dot`, errors."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph import render as R
from lipgraph.cli import main as cli_main
from lipgraph.report import BoundResult

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("LIPGRAPH_UPDATE_GOLDEN") == "1"
HAS_DOT = R.dot_program() is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz 'dot' is not installed")


# --------------------------------------------------------------------------- small models with stable constants


def _orth(n: int, scale: float, seed: int) -> torch.Tensor:
    """A scaled orthogonal matrix: its spectral norm is exactly ``scale`` under any sound method."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (scale * q).float()


def _linear(n: int, scale: float, seed: int) -> nn.Linear:
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(_orth(n, scale, seed))
        lin.bias.fill_(0.1)
    return lin


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(_linear(8, 2.0, 1), nn.ReLU(), _linear(8, 0.5, 2), nn.Tanh(), _linear(8, 3.0, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """y = relu(x + fc(x)): its own constant is 1 + ||W||."""

    def __init__(self, scale: float, seed: int) -> None:
        super().__init__()
        self.fc = _linear(8, scale, seed)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.fc(x))


class ResMLP(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.stem = _linear(8, 1.5, 10)
        self.blocks = nn.Sequential(*[Block(0.5, 20 + i) for i in range(blocks)])
        self.head = _linear(8, 0.25, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Gated(nn.Module):
    """A product of two input-dependent tensors: an ``inf`` node."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _linear(8, 2.0, 40)
        self.b = nn.Sequential(_linear(8, 1.0, 41), nn.Sigmoid())
        self.head = _linear(8, 1.0, 42)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) * self.b(x))


class TwoInputs(nn.Module):
    """A module with two entries: ``mix(u, v) = A u + B v``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _linear(8, 2.0, 50)
        self.b = _linear(8, 3.0, 51)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.a(u) + self.b(v)


class TwoEntries(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = _linear(8, 4.0, 60)
        self.mix = TwoInputs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.left(x), x)


def _analyze(model: nn.Module, shape: tuple[int, ...] = (1, 8)) -> lipgraph.Report:
    torch.manual_seed(0)
    return lipgraph.analyze(model.eval(), torch.randn(shape), method="autolip", lower=False, power_iterations=20)


@pytest.fixture(scope="module")
def mlp_report() -> lipgraph.Report:
    return _analyze(TinyMLP())


@pytest.fixture(scope="module")
def res_report() -> lipgraph.Report:
    return _analyze(ResMLP())


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"golden file {path} was missing and has been written; re-run")
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} differs from the golden file (LIPGRAPH_UPDATE_GOLDEN=1 to accept a deliberate change)"
    )


# --------------------------------------------------------------------------- formatting


def test_numbers_have_three_significant_digits() -> None:
    assert R.num(2.584962) == "2.58"
    assert R.num(2.0000000004) == "2"
    assert R.num(12345.6) == "1.23e4"
    assert R.num(0.000123) == "1.23e-4"
    assert R.num(math.inf) == "∞"
    assert R.num(0.0) == "0"


def test_colour_scale_is_monotone_and_inf_stands_out() -> None:
    def red(c: str) -> int:
        return int(c[1:3], 16)

    def blue(c: str) -> int:
        return int(c[5:7], 16)

    assert R.color(1.0) == "#f7f7f7"
    assert blue(R.color(0.01)) > red(R.color(0.01))  # contracting: blue
    assert red(R.color(100.0)) > blue(R.color(100.0))  # expanding: red
    assert R.color(1e9) == R.color(100.0)  # clipped
    assert R.color(math.inf) == R.INF_FILL


# --------------------------------------------------------------------------- golden DOT files


def test_golden_mlp(mlp_report: lipgraph.Report) -> None:
    _golden("mlp.dot", R.to_dot(mlp_report, timings=False))


def test_golden_resmlp_full_and_collapsed(res_report: lipgraph.Report) -> None:
    _golden("resmlp.dot", R.to_dot(res_report, timings=False))
    _golden("resmlp_depth1.dot", R.to_dot(res_report, depth=1, timings=False))


def test_golden_inf_model() -> None:
    _golden("gated_inf.dot", R.to_dot(_analyze(Gated()), timings=False))


def test_golden_segments(mlp_report: lipgraph.Report) -> None:
    r = _with_segment(mlp_report)
    _golden("mlp_segment.dot", R.to_dot(r, timings=False))


def _with_segment(report: lipgraph.Report) -> lipgraph.Report:
    import copy  # noqa: PLC0415

    r = copy.copy(report)
    lin = [n.name for n in report.nodes if n.op in ("linear", "relu", "tanh")]
    r.segments = [{"nodes": lin, "autolip": 3.0, "seqlip": 1.5, "certified": True, "method": "seqlip-test"}]
    return r


def test_dot_is_deterministic_across_analyses() -> None:
    a = R.to_dot(_analyze(ResMLP()), timings=False)
    b = R.to_dot(_analyze(ResMLP()), timings=False)
    assert a == b
    assert "analysed in" not in a


# --------------------------------------------------------------------------- content


def test_nodes_show_op_path_shape_constant_and_cumulative(mlp_report: lipgraph.Report) -> None:
    dot = R.to_dot(mlp_report)
    assert "<b>linear</b>" in dot and "1×8" in dot
    assert "L ≤ <b>2</b>" in dot and "L ≤ <b>0.5</b>" in dot and "L ≤ <b>3</b>" in dot
    assert "cumul. ≤ 3" in dot  # 2 * 1 * 0.5 * 1 * 3
    assert "analysed in" in dot and "AutoLip ≤ <b>3</b>" in dot and "best certified" in dot
    assert "local constant L (log scale)" in dot  # legend


def test_estimates_are_marked() -> None:
    torch.manual_seed(0)
    r = lipgraph.analyze(TinyMLP(), torch.randn(1, 8), method="autolip", lower=False, constants={"net.2": 0.7})
    box = next(b for b in R.build_view(r).boxes if b.path == "net.2")
    assert not box.certified and not box.cum_certified
    label = R._box_attrs(box)
    assert "L ≈ <b>0.7</b>" in label["label"] and "dashed" in label["style"]
    assert "≤" in R._box_attrs(R.build_view(r).boxes[1])["label"]  # net.0: certified


def test_inf_node_stands_out() -> None:
    r = _analyze(Gated())
    dot = R.to_dot(r)
    assert "NOT LIPSCHITZ" in dot and R.INF_FILL in dot and R.INF_BORDER in dot
    assert "not Lipschitz" in dot  # title
    view = R.build_view(r)
    inf = [b for b in view.boxes if math.isinf(b.local)]
    assert len(inf) == 1 and inf[0].reason


def test_collapsed_module_constant_is_its_own_autolip(res_report: lipgraph.Report) -> None:
    view = R.build_view(res_report, depth=2)
    blocks = {b.title: b for b in view.boxes if b.kind == "module"}
    assert set(blocks) == {"blocks.0", "blocks.1"}
    for b in blocks.values():
        assert b.local == pytest.approx(1.5, rel=1e-6)  # 1 + ||W|| = 1 + 0.5
        assert b.certified
    # depth 1 collapses the whole stack: (1.5)^2, not a ratio of cumulative bounds
    top = {b.title: b for b in R.build_view(res_report, depth=1).boxes if b.kind == "module"}
    assert top["blocks"].local == pytest.approx(2.25, rel=1e-6)
    assert "blocks" in R.to_dot(res_report, depth=1)


def test_module_with_two_entries_is_sound() -> None:
    model = TwoEntries()
    r = _analyze(model)
    mix = next(b for b in R.build_view(r, depth=1).boxes if b.title == "mix")
    assert mix.local == pytest.approx(2.0 + 3.0, rel=1e-6)  # ||A|| + ||B||, both entries at 1
    # empirical check: the joint map (u, v) -> A u + B v never stretches more than the shown constant
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(50):
            u, v, du, dv = (torch.randn(1, 8, generator=g) for _ in range(4))
            d = model.mix(u + du, v + dv) - model.mix(u, v)
            assert d.norm() <= mix.local * torch.cat([du, dv]).norm() + 1e-5
    # and the ratio of cumulative bounds (out / max in) would not be the module's constant
    assert mix.cumulative == pytest.approx(r.upper, rel=1e-6)


def test_repeated_blocks_are_folded() -> None:
    r = _analyze(ResMLP(blocks=6))
    view = R.build_view(r)
    folds = [b for b in view.boxes if b.kind == "fold"]
    assert len(folds) == 1
    f = folds[0]
    assert f.title == "blocks.1 … blocks.4" and "4 × Block" in f.note
    assert f.local == pytest.approx(1.5**4, rel=1e-6)
    assert len(view.boxes) < len(R.build_view(r, fold=None).boxes)
    assert "folded" in R.to_dot(r)


def test_segment_cluster_and_hidden_segments(mlp_report: lipgraph.Report) -> None:
    r = _with_segment(mlp_report)
    dot = R.to_dot(r)
    assert "cluster_seg_0" in dot and "SeqLip ≤ 1.5" in dot and "∏ L = 3" in dot and "-50%" in dot
    r.bounds = {**r.bounds, "autolip+seqlip": BoundResult(1.5, True, "test", 0.0)}
    out = next(b for b in R.build_view(r).boxes if b.kind == "output")
    assert out.best == "≤ 1.5 (autolip+seqlip)" and out.cumulative == pytest.approx(3.0, rel=1e-6)
    assert "best certified: <b>1.5</b> (autolip+seqlip)" in R.to_dot(r)
    r2 = _with_segment(_analyze(ResMLP()))
    view = R.build_view(r2, depth=2)
    assert view.segments_hidden == 1 and any("segment" in n for n in view.notes)


def test_modules_as_nested_clusters(res_report: lipgraph.Report) -> None:
    dot = R.to_dot(res_report)
    assert "cluster_m_blocks" in dot and "cluster_m_blocks_0" in dot
    assert "Block" in dot  # class name in the cluster label
    flat = R.to_dot(res_report, modules=False)
    assert "cluster_m_" not in flat


def test_no_graph_is_an_error(mlp_report: lipgraph.Report) -> None:
    import copy  # noqa: PLC0415

    r = copy.copy(mlp_report)
    r.graph = None
    with pytest.raises(R.RenderError, match="no graph"):
        R.to_dot(r)


def test_bad_format_and_depth(mlp_report: lipgraph.Report, tmp_path: Path) -> None:
    with pytest.raises(R.RenderError, match="png, .svg"):
        R.render(mlp_report, str(tmp_path / "x.jpeg"))
    with pytest.raises(R.RenderError, match="depth"):
        R.render(mlp_report, str(tmp_path / "x.dot"), depth=0)


# --------------------------------------------------------------------------- files, with and without `dot`


def test_dot_output_works_without_graphviz(mlp_report: lipgraph.Report, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "dot_program", lambda: None)
    out = R.render(mlp_report, str(tmp_path / "m.dot"))
    assert Path(out).read_text(encoding="utf-8").startswith("digraph")
    for ext in ("png", "svg"):
        with pytest.raises(R.RenderError, match="apt-get install graphviz"):
            R.render(mlp_report, str(tmp_path / f"m.{ext}"))


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@needs_dot
def test_png_svg_pdf(res_report: lipgraph.Report, tmp_path: Path) -> None:
    png = R.render(res_report, str(tmp_path / "r.png"))
    w, h = _png_size(png)
    assert 300 < w < 4000 and 300 < h < 10000
    svg = R.render(res_report, str(tmp_path / "r.svg"), depth=1)
    assert "<svg" in Path(svg).read_text(encoding="utf-8")
    pdf = R.render(res_report, str(tmp_path / "r.pdf"))
    assert Path(pdf).read_bytes()[:4] == b"%PDF"


@needs_dot
def test_large_png_goes_coarser_or_to_svg(tmp_path: Path) -> None:
    r = _analyze(ResMLP(blocks=3))
    full = R.build_view(r).size
    with pytest.warns(UserWarning, match="depth"):
        out = R.render(r, str(tmp_path / "big.png"), max_png_boxes=full - 1)
    assert out.endswith(".png") and _png_size(out)[1] > 0
    with pytest.warns(UserWarning, match="svg"):
        out = R.render(r, str(tmp_path / "big2.png"), depth=3, max_png_boxes=3)
    assert out.endswith(".svg") and Path(out).exists()


@needs_dot
def test_dot_timeout_is_reported(mlp_report: lipgraph.Report, tmp_path: Path) -> None:
    with pytest.raises(R.RenderError, match="did not finish"):
        R.run_dot(R.to_dot(mlp_report), "png", str(tmp_path / "t.png"), timeout=1e-6)
    assert not list(tmp_path.iterdir())


@needs_dot
def test_resnet18_renders_with_depth(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    # user constants for the convolutions keep the analysis short: only the rendering is tested here
    r = lipgraph.analyze(m, torch.randn(1, 3, 32, 32), method="autolip", lower=False, constants={"Conv2d": 2.0})
    view = R.build_view(r, depth=2)
    titles = {b.title for b in view.boxes if b.kind == "module"}
    assert {"layer1.0", "layer4.1"} <= titles
    assert view.size < 25
    out = R.render(r, str(tmp_path / "r18.png"), depth=2)
    assert _png_size(out)[0] > 300
    assert R.render(r, str(tmp_path / "r18_full.svg")).endswith(".svg")


def test_onnx_model_renders_with_its_modules(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model, x = ResMLP().eval(), torch.randn(1, 8)
    path = tmp_path / "resmlp.onnx"
    try:
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    except Exception as exc:  # noqa: BLE001 - no exporter in this torch build
        pytest.skip(f"ONNX export unavailable: {exc}")
    r = lipgraph.analyze(str(path), x, method="autolip", lower=False)
    blocks = [b for b in R.build_view(r, depth=2).boxes if b.kind == "module"]
    assert [b.title for b in blocks] == ["blocks.0", "blocks.1"]
    assert all(b.local == pytest.approx(1.5, rel=1e-6) for b in blocks)
    assert "cluster_m_blocks" in R.to_dot(r)


def test_cli_flags(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    dot, png = tmp_path / "o.dot", tmp_path / "o.png"
    args = ["analyze", f"{src}:M", "--input-shape", "1,4", "--no-lower", "--rows", "0", "--method", "autolip",
            "--dot", str(dot), "--depth", "1"]
    if HAS_DOT:
        args += ["--png", str(png)]
    assert cli_main(args) == 0
    assert "body" in dot.read_text(encoding="utf-8")
    if HAS_DOT:
        assert _png_size(str(png))[0] > 100


def test_cli_without_graphviz_writes_dot_then_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(R, "dot_program", lambda: None)
    src = tmp_path / "m.py"
    src.write_text("import torch.nn as nn\ndef M():\n    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())\n")
    dot, png = tmp_path / "o.dot", tmp_path / "o.png"
    code = cli_main(["analyze", f"{src}:M", "--input-shape", "1,4", "--no-lower", "--rows", "0",
                     "--method", "autolip", "--png", str(png), "--dot", str(dot)])
    assert code == 2 and dot.exists() and not png.exists()
    assert "apt-get install graphviz" in capsys.readouterr().err


class DenseLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.fc(torch.cat(feats, 1)))


class DenseBlock(nn.Module):
    """Each layer reads all earlier features (torchvision's DenseNet layout): not a chain."""

    def __init__(self, layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(4 * (i + 1)) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class Twice(nn.Module):
    """The same submodule called twice with another module in between."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(_linear(8, 2.0, 70), nn.Tanh())
        self.mid = _linear(8, 0.5, 71)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.mid(self.shared(x)))


def _acyclic(view: R.View) -> bool:
    import networkx as nx  # noqa: PLC0415

    g = nx.DiGraph(view.edges)
    g.add_nodes_from(b.key for b in view.boxes)
    return nx.is_directed_acyclic_graph(g)


def test_dense_block_folds_and_every_view_is_acyclic() -> None:
    torch.manual_seed(0)
    r = lipgraph.analyze(DenseBlock(), torch.randn(1, 4), method="autolip", lower=False)
    for depth in (None, 1, 2, 3):
        for fold in (None, 4):
            view = R.build_view(r, depth, fold)
            assert _acyclic(view), (depth, fold)
            assert set(view.box_of) >= {n.name for n in r.nodes if n.op != "constant"}
    folds = [b for b in R.build_view(r).boxes if b.kind == "fold"]
    assert [b.title for b in folds] == ["layers.1 … layers.4"]
    assert math.isfinite(folds[0].local) and folds[0].certified


def test_module_called_twice_gives_two_boxes() -> None:
    r = _analyze(Twice())
    view = R.build_view(r, depth=1)
    assert _acyclic(view)
    calls = sorted(b.title for b in view.boxes if b.kind == "module")
    assert calls == ["shared (call 1)", "shared (call 2)"]
    assert all(b.local == pytest.approx(2.0, rel=1e-6) for b in view.boxes if b.kind == "module")


class Sum(nn.Module):
    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u + v


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _linear(8, 2.0, 80)
        self.c = Sum()


class Interleaved(nn.Module):
    """``m.a`` feeds ``m.c`` directly and through ``other``: collapsing ``m`` would make a cycle."""

    def __init__(self) -> None:
        super().__init__()
        self.m = Pair()
        self.other = _linear(8, 0.5, 82)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.m.a(x)
        return self.m.c(y, self.other(y))


def test_non_convex_module_stays_expanded() -> None:
    r = _analyze(Interleaved())
    view = R.build_view(r, depth=1)
    assert _acyclic(view)
    assert not [b for b in view.boxes if b.kind == "module"]
    assert {b.path for b in view.boxes if b.kind == "node"} == {"m.a", "other", "m.c"}
