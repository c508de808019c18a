"""ONNX frontend: parity with the PyTorch path and onnxruntime, op mappings, clear errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import lipgraph
from lipgraph import cli, execute, ir
from lipgraph.errors import InputShapeError, ModelLoadError
from lipgraph.render import render

REL = 1e-4
PI = 30  # power iterations where convolutions appear (same seed and operator on both paths)


# --- helpers ---------------------------------------------------------------------------------------


def export(model: nn.Module, x: torch.Tensor, path: Path, *, dynamo: bool = False, **kw) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, verbose=False, **kw)
    return path


def ort_run(path: Path, *xs: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
    return sess.run(None, feeds)


def assert_matches_ort(path: Path, *xs: torch.Tensor, atol: float = 1e-5) -> nx.DiGraph:
    g = lipgraph.trace(path, xs[0] if len(xs) == 1 else xs)
    ours = execute(g, *xs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = ort_run(path, *xs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert tuple(a.shape) == b.shape
        np.testing.assert_allclose(a.detach().numpy(), b, atol=atol, rtol=1e-5)
    return g


def bound(model, x, **kw) -> float:
    r = lipgraph.analyze(model, x, lower=False, method="autolip", **kw)
    return r.bounds["autolip"].value


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """The PyTorch model with every Conv followed by BatchNorm fused, as the exporters do."""
    from torch.fx.experimental.optimization import fuse  # noqa: PLC0415

    return fuse(model.eval())


def save(tmp: Path, name: str, nodes, inputs, outputs, inits=(), opset: int = 18, domains=()) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    ops = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    m = helper.make_model(graph, opset_imports=ops, ir_version=8 if opset < 21 else 10)
    path = tmp / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def iinit(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.int64), name)


# --- PyTorch test models ------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv/BN/ReLU, a residual add, concat, max and average pooling, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.branch_a = nn.Conv2d(4, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(4, 2, 1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Linear(6 * 2 * 2, 5)
        with torch.no_grad():
            self.stem[1].running_var.uniform_(0.5, 2.0)
            self.stem[1].running_mean.uniform_(-1, 1)
            self.stem[1].weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.branch_a(x)
        x = torch.cat([x, self.branch_b(x)], dim=1)
        x = self.avg(self.pool(x))
        return self.head(torch.flatten(x, 1))


class GapNet(nn.Module):
    """Strided conv, global average pooling, BatchNorm1d on features, a two-branch sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.3, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.flatten(self.gap(F.relu(self.conv(x))), 1))
        return self.fc1(h) - 0.5 * torch.tanh(self.fc2(h))


def activations_mlp() -> nn.Module:
    acts = [nn.LeakyReLU(0.2), nn.ELU(0.5), nn.SELU(), nn.CELU(0.7), nn.GELU(), nn.Sigmoid(), nn.Hardsigmoid(),
            nn.Hardswish(), nn.Softplus(threshold=math.inf), nn.Mish(),  # a finite threshold jumps: inf
            nn.ReLU6(), nn.Tanh(), nn.PReLU(16)]
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    for a in acts:
        layers += [a, nn.Linear(16, 16)]
    layers += [nn.Linear(16, 4), nn.Softmax(dim=-1)]
    m = nn.Sequential(*layers)
    with torch.no_grad():
        m[-3].weight.uniform_(0.1, 2.0)  # PReLU slopes, some above 1
    return m


class Misc(nn.Module):
    """LayerNorm, a Linear on 3-D input, constant arithmetic, transpose, split, cat, slicing,
    padding, mean, a constant matmul and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.register_buffer("w", torch.randn(8, 6))

    def forward(self, x: torch.Tensor):
        y = self.fc(self.ln(x))
        y = (y * 0.5 - 1.0) / 2.0
        y = y.transpose(1, 2)
        a, b = torch.split(y, [3, 5], dim=1)
        z = torch.cat([b, a], dim=1)[:, 1:7]
        z = F.pad(z, (1, 2))
        z = z.mean(dim=1)
        z = z @ self.w
        return torch.softmax(z, dim=-1), z


MODELS = {
    "cnn": (SmallCNN, (1, 3, 8, 8)),
    "gap": (GapNet, (2, 3, 9, 9)),
    "acts": (activations_mlp, (3, 8)),
    "misc": (Misc, (1, 5, 8)),
}


# --- parity with the PyTorch path and onnxruntime ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchscript_export_parity(name: str, tmp_path: Path) -> None:
    """Same bound from the PyTorch model (with Conv+BN fused, as the exporter does) and its export;
    the ONNX IR computes what onnxruntime computes."""
    factory, shape = MODELS[name]
    model = factory().eval()
    x = torch.randn(shape)
    path = export(model, x, tmp_path / f"{name}.onnx")
    assert_matches_ort(path, x)
    assert_matches_ort(path, torch.randn(shape))  # another input, same specialised graph
    ref = bound(fuse_conv_bn(model), x, power_iterations=PI)
    got = bound(str(path), x, power_iterations=PI)
    assert math.isfinite(ref)
    assert rel(ref, got) < REL, (ref, got)


@pytest.mark.parametrize("opset", [13, 17])
def test_older_opsets_decomposed_gelu_and_layernorm(opset: int, tmp_path: Path) -> None:
    """Before opset 20 (17) the exporter spells GELU (LayerNorm) with Erf/Tanh, Pow, Sqrt and products;
    the patterns map back to the gelu / layer_norm rules, so no inf and the same bound."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4), nn.Linear(4, 3),
                          nn.GELU(approximate="tanh")).eval()
    x = torch.randn(2, 4)
    path = export(model, x, tmp_path / f"g{opset}.onnx", opset_version=opset)
    g = assert_matches_ort(path, x)
    kinds = ir.summary(g)
    assert kinds["gelu"] == 2 and kinds["layer_norm"] == 1 and "opaque" not in kinds and "mul_var" not in kinds
    assert rel(bound(model, x), bound(str(path), x)) < REL


class SpelledHardswish(nn.Module):
    """Hard-swish spelled out as PaddlePaddle's exporter writes it (``x * clip(x + 3, 0, 6) / 6``, PP-OCR's
    MobileNetV3) and as ``x * hardsigmoid(x)`` (ONNX HardSigmoid with alpha 1/6), then a gate that multiplies
    two different tensors."""

    def __init__(self, gate: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.gate = gate

    def forward(self, x):
        h = self.a(x)
        h = h * torch.clamp(h + 3, 0, 6) / 6
        h = self.b(h)
        h = h * F.hardsigmoid(h)
        if self.gate:
            h = h * torch.sigmoid(self.b(h))
        return self.c(h)


def test_spelled_out_hardswish_is_one_elementwise_rule(tmp_path: Path) -> None:
    """Both spellings become one ``hardswish`` node each (slope in [-1/2, 3/2]): no product of two variables,
    the same bound as the PyTorch model's own ``nn.Hardswish``; a gate of two different tensors stays a
    product (``inf``)."""
    model = SpelledHardswish().eval()
    x = torch.randn(3, 4) * 3
    path = export(model, x, tmp_path / "hsw.onnx", opset_version=13)
    g = assert_matches_ort(path, x)
    kinds = ir.summary(g)
    assert kinds["hardswish"] == 2 and "mul_var" not in kinds and "opaque" not in kinds
    reference = nn.Sequential(model.a, nn.Hardswish(), model.b, nn.Hardswish(), model.c).eval()
    assert rel(bound(reference, x), bound(str(path), x)) < REL
    assert math.isfinite(bound(str(path), x))
    gated = SpelledHardswish(gate=True).eval()
    path2 = export(gated, x, tmp_path / "gated.onnx", opset_version=13)
    kinds2 = ir.summary(assert_matches_ort(path2, x))
    assert kinds2["hardswish"] == 2 and kinds2["mul_var"] == 1
    assert math.isinf(bound(str(path2), x))


def _hardswish_like(tmp: Path, name: str, shift: float, scale_op: str = "Div", scale: float = 6.0,
                    shift_shape: tuple[int, ...] = (), x_shape: tuple[int, ...] = (1, 1)) -> Path:
    """``x * clip(x + shift, 0, 6) / 6``, or ``x * clip(x / scale + 1/2, 0, 1)`` when ``scale_op`` is
    ``"DivClip1"``."""
    if scale_op == "DivClip1":
        nodes = [helper.make_node("Div", ["x", "k"], ["d"]), helper.make_node("Add", ["d", "half"], ["a"]),
                 helper.make_node("Clip", ["a", "lo", "one"], ["r"]), helper.make_node("Mul", ["x", "r"], ["y"])]
        inits = [init("k", scale), init("half", 0.5), init("lo", 0.0), init("one", 1.0)]
    else:
        nodes = [helper.make_node("Add", ["x", "k"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["r"]),
                 helper.make_node("Mul", ["x", "r"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
        inits = [init("k", np.full(shift_shape, shift)), init("lo", 0.0), init("hi", 6.0), init("six", 6.0)]
    return save(tmp, name, nodes, [vi("x", list(x_shape))], [vi("y", None)], inits, opset=13)


def test_hardswish_is_fused_only_when_it_is_the_same_function(tmp_path: Path) -> None:
    """A near-3 shift (kinks 3e-5 away: a box between them would get hard-swish's flat slope 0, where the file's
    function has slope -1/2) stays a product; a division by 0 in the written-out hard-sigmoid is not a load
    error; a broadcasting (1, 1) shift keeps the product's (1, 1) shape; a division by 6 exactly fuses."""
    x = torch.tensor([[-3.00001]])
    near = _hardswish_like(tmp_path, "near", float(np.float32(3.0 + 2.9e-5)))
    assert "mul_var" in ir.summary(assert_matches_ort(near, x))
    zero = _hardswish_like(tmp_path, "zero", 0.0, "DivClip1", 0.0)
    assert "hardswish" not in ir.summary(lipgraph.trace(zero, x))
    wide = _hardswish_like(tmp_path, "wide", 3.0, shift_shape=(1, 1), x_shape=(4,))
    g = assert_matches_ort(wide, torch.tensor([2.5, -1.0, 4.0, -3.5]))  # (4,) * (1, 1) -> (1, 4)
    assert "hardswish" not in ir.summary(g)
    exact = _hardswish_like(tmp_path, "exact", 0.0, "DivClip1", 6.0)
    assert ir.summary(assert_matches_ort(exact, x)).get("hardswish") == 1


@pytest.mark.parametrize("m", [0.9, float(np.float32(2 ** -0.5) * np.float32(1 + 1e-5)), float(np.float32(2 ** -0.5))])
def test_erf_gelu_with_the_files_own_constant_is_the_same_function(m: float, tmp_path: Path) -> None:
    """``0.5 x (1 + erf(m x))`` for an ``m`` that is not 1/sqrt 2 (float32's, one 1e-5 away, or 0.9): the IR is
    that function (float64 IR against float64 math with the file's float32 ``m``, 1e-12), not GELU, and its
    bound is GELU's, since ``x Phi(s x)`` has the same constant for every ``s > 0``."""
    nodes = [helper.make_node("Mul", ["x", "m"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["p"]),
             helper.make_node("Mul", ["p", "half"], ["y"])]
    path = save(tmp_path, "gelu_m", nodes, [vi("x", [1, 5])], [vi("y", None)],
                [init("m", m), init("one", 1.0), init("half", 0.5)], opset=13)
    x = torch.linspace(-4, 4, 5).reshape(1, 5)
    g = assert_matches_ort(path, x)
    assert "mul_var" not in ir.summary(g) and ir.summary(g).get("gelu") == 1
    z = torch.linspace(-6, 6, 5, dtype=torch.float64).reshape(1, 5)
    m32 = float(np.float32(m))
    want = 0.5 * z * (1 + torch.erf(m32 * z))
    torch.testing.assert_close(execute(ir.to_float64(g), z), want, rtol=1e-12, atol=1e-12)
    assert bound(str(path), x) == pytest.approx(bound(nn.GELU(), x), rel=1e-6)


def test_unfused_export_keeps_batchnorm_and_the_same_bound(tmp_path: Path) -> None:
    """Without constant folding the exporter keeps BatchNormalization: the ONNX IR then has the very
    nodes of the PyTorch IR, and node-wise constants agree."""
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    path = export(model, x, tmp_path / "cnn.onnx", do_constant_folding=False)
    g = assert_matches_ort(path, x)
    assert ir.summary(g)["batch_norm"] == 1
    r_pt = lipgraph.analyze(model, x, lower=False, method="autolip", power_iterations=PI)
    r_ox = lipgraph.analyze(str(path), x, lower=False, method="autolip", power_iterations=PI)
    assert rel(r_pt.bounds["autolip"].value, r_ox.bounds["autolip"].value) < REL
    for op in ("conv", "batch_norm", "linear", "max_pool", "avg_pool"):
        a = sorted(n.local for n in r_pt.nodes if n.op == op)
        b = sorted(n.local for n in r_ox.nodes if n.op == op)
        assert len(a) == len(b) and all(rel(u, v) < REL for u, v in zip(a, b, strict=True)), op
    # the fused bound can only be smaller: ||BN o conv|| <= ||BN|| ||conv||
    fused = bound(fuse_conv_bn(model), x, power_iterations=PI)
    assert fused <= r_pt.bounds["autolip"].value * (1 + 1e-6)


@pytest.mark.parametrize("name", ["cnn", "misc", "acts", "gap"])
def test_dynamo_export_parity(name: str, tmp_path: Path) -> None:
    factory, shape = MODELS[name]
    model = factory().eval()
    x = torch.randn(shape)
    path = export(model, x, tmp_path / f"{name}.onnx", dynamo=True)
    g = assert_matches_ort(path, x)
    ref = bound(fuse_conv_bn(model), x, power_iterations=PI)
    got = bound(str(path), x, power_iterations=PI)
    assert rel(ref, got) < REL, (ref, got)
    # module hierarchy from the exporter's metadata, as in the PyTorch IR
    paths = {n.module_path for n in ir.nodes(g) if n.op in ("conv", "linear", "layer_norm")}
    expected = {"cnn": {"stem.0", "stem.1", "branch_a", "branch_b", "head"}, "misc": {"ln", "fc", ""},
                "acts": {str(i) for i in range(0, 27, 2)} | {"27"}, "gap": {"conv", "fc1", "fc2"}}[name]
    assert paths <= expected and len(paths) >= 3, paths


def test_module_paths_from_torchscript_names(tmp_path: Path) -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    g_pt = lipgraph.trace(model, x)
    g_ox = lipgraph.trace(export(model, x, tmp_path / "cnn.onnx", do_constant_folding=False), x)
    for op in ("conv", "batch_norm", "linear", "max_pool", "avg_pool"):
        pt = sorted(n.module_path for n in ir.nodes(g_pt) if n.op == op)
        ox = sorted(n.module_path for n in ir.nodes(g_ox) if n.op == op)
        assert pt == ox, (op, pt, ox)
    r = lipgraph.analyze(str(tmp_path / "cnn.onnx"), x, lower=False, method="autolip", power_iterations=5)
    assert r.frontend == "onnx"


def test_report_render_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    path = export(model, x, tmp_path / "cnn.onnx")
    r = lipgraph.analyze(str(path), lower=False, method="autolip", power_iterations=5)  # static: no input needed
    assert r.input_shapes == [(1, 3, 8, 8)]
    dot = render(r, str(tmp_path / "g.dot"))
    assert "stem" in Path(dot).read_text()
    out = tmp_path / "r.json"
    rc = cli.main(["analyze", str(path), "--no-lower", "--method", "autolip", "--power-iterations", "5", "--json",
                   str(out), "--rows", "0"])
    assert rc == 0 and '"frontend": "onnx"' in out.read_text()
    rc = cli.main(["analyze", str(path), "--input-shape", "1,3,9,9", "--no-lower"])
    assert rc == 2
    assert "example input has shape (1, 3, 9, 9)" in capsys.readouterr().err


def test_dynamic_dimensions_take_the_given_shape(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(5, 4)
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(InputShapeError, match="dynamic dimensions"):
        lipgraph.trace(str(path))
    g = assert_matches_ort(path, torch.randn(7, 4))
    assert ir.node(g, "x").out_shape == (7, 4)
    g2 = lipgraph.trace(str(path), [(2, 4)])  # a shape instead of a tensor
    assert ir.node(g2, "x").out_shape == (2, 4)
    assert rel(bound(model, x), bound(str(path), x)) < 1e-9


# --- individual op mappings (hand-built graphs, checked against onnxruntime) --------------------------

rng = np.random.default_rng(0)
W34 = rng.standard_normal((3, 4)).astype(np.float32)
CONV_W = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)


def _svd(a: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64), 2))


def _case(name: str, tmp: Path):
    """(path, input, expected bound or None) for one hand-built graph."""
    Y = vi("y", None)  # noqa: N806
    if name == "gemm_alpha_beta_transB":
        n = helper.make_node("Gemm", ["x", "W", "C"], ["y"], alpha=2.0, beta=0.5, transB=1)
        p = save(tmp, name, [n], [vi("x", [2, 4])], [Y], [init("W", W34), init("C", [1.0, 2.0, 3.0])])
        return p, torch.randn(2, 4), 2 * _svd(W34)
    if name == "gemm_transA_full_C":
        n = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transA=1)
        p = save(tmp, name, [n], [vi("x", [3, 2])], [Y], [init("W", W34), init("C", np.ones((2, 4)))])
        return p, torch.randn(3, 2), _svd(W34)
    if name == "matmul_const_left":
        n = helper.make_node("MatMul", ["W", "x"], ["y"])
        p = save(tmp, name, [n], [vi("x", [4, 5])], [Y], [init("W", W34)])
        return p, torch.randn(4, 5), _svd(W34)
    if name == "hardsigmoid_onnx_default":
        n = helper.make_node("HardSigmoid", ["x"], ["y"])
        return save(tmp, name, [n], [vi("x", [2, 5])], [Y]), torch.randn(2, 5) * 4, 0.2
    if name == "clip_opset9":
        n = helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.7)
        return save(tmp, name, [n], [vi("x", [2, 5])], [Y], opset=9), torch.randn(2, 5), 1.0
    if name == "clip_opset13":
        n = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
        p = save(tmp, name, [n], [vi("x", [2, 5])], [Y], [init("lo", -0.5), init("hi", 0.7)], opset=13)
        return p, torch.randn(2, 5), 1.0
    if name == "selu_custom":
        n = helper.make_node("Selu", ["x"], ["y"], alpha=2.0, gamma=1.5)
        return save(tmp, name, [n], [vi("x", [2, 5])], [Y]), torch.randn(2, 5), 3.0
    if name == "prelu_per_channel":
        n = helper.make_node("PRelu", ["x", "s"], ["y"])
        p = save(tmp, name, [n], [vi("x", [1, 3, 4, 4])], [Y], [init("s", np.array([0.1, 1.5, -2.0])[:, None, None])])
        return p, torch.randn(1, 3, 4, 4), 2.0
    if name == "conv_asymmetric_pads":
        n = helper.make_node("Conv", ["x", "W"], ["y"], pads=[0, 1, 1, 0], strides=[2, 1])
        p = save(tmp, name, [n], [vi("x", [1, 3, 7, 6])], [Y], [init("W", CONV_W)])
        return p, torch.randn(1, 3, 7, 6), None
    if name == "conv_same_upper":
        n = helper.make_node("Conv", ["x", "W", "B"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
        p = save(tmp, name, [n], [vi("x", [1, 3, 6, 6])], [Y], [init("W", CONV_W), init("B", [0.5, -1])])
        return p, torch.randn(1, 3, 6, 6), None
    if name == "conv_transpose_output_shape":
        n = helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2], output_shape=[10, 9])
        p = save(tmp, name, [n], [vi("x", [1, 2, 5, 5])], [Y], [init("W", CONV_W)])
        return p, torch.randn(1, 2, 5, 5), None
    if name == "maxpool_same_upper":
        n = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
        return save(tmp, name, [n], [vi("x", [1, 2, 6, 6])], [Y]), torch.randn(1, 2, 6, 6), 2.0
    if name == "avgpool_asym_exclude_pad":
        n = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 0, 1, 1])
        return save(tmp, name, [n], [vi("x", [1, 2, 4, 4])], [Y]), torch.randn(1, 2, 4, 4), None
    if name == "avgpool_ceil_include_pad":
        n = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                             ceil_mode=1, count_include_pad=1)
        return save(tmp, name, [n], [vi("x", [1, 2, 5, 5])], [Y]), torch.randn(1, 2, 5, 5), None
    if name == "global_pools":
        n1 = helper.make_node("GlobalAveragePool", ["x"], ["a"])
        n2 = helper.make_node("GlobalMaxPool", ["x"], ["b"])
        n3 = helper.make_node("Concat", ["a", "b"], ["y"], axis=1)
        return save(tmp, name, [n1, n2, n3], [vi("x", [1, 2, 4, 4])], [Y]), torch.randn(1, 2, 4, 4), None
    if name == "pad_reflect_axes_opset18":
        n = helper.make_node("Pad", ["x", "p", "", "ax"], ["y"], mode="reflect")
        p = save(tmp, name, [n], [vi("x", [1, 2, 4, 5])], [Y], [iinit("p", [1, 2, 2, 0]), iinit("ax", [2, 3])])
        return p, torch.randn(1, 2, 4, 5), None
    if name == "pad_constant_opset9":
        n = helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 3, 0], value=1.5)
        return save(tmp, name, [n], [vi("x", [1, 2, 4, 5])], [Y], opset=9), torch.randn(1, 2, 4, 5), 1.0
    if name == "split_slice_opset11":
        n1 = helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[1, 3])
        n2 = helper.make_node("Slice", ["b", "st", "en", "ax", "sp"], ["c"])
        n3 = helper.make_node("Sub", ["a", "c"], ["y"])
        inits = [iinit("st", [-3]), iinit("en", [100]), iinit("ax", [1]), iinit("sp", [2])]
        p = save(tmp, name, [n1, n2, n3], [vi("x", [2, 4, 6])], [Y], inits, opset=11)
        return p, torch.randn(2, 4, 6), None
    if name == "split_num_outputs_opset18":
        n = helper.make_node("Split", ["x"], ["a", "b", "c"], axis=-1, num_outputs=3)
        p = save(tmp, name, [n], [vi("x", [2, 7])], [vi("a", None), vi("b", None), vi("c", None)])
        return p, torch.randn(2, 7), math.sqrt(3)  # three outputs, AutoLip's l2 combination
    if name == "squeeze_unsqueeze_opset11":
        n1 = helper.make_node("Unsqueeze", ["x"], ["a"], axes=[0, 3])
        n2 = helper.make_node("Squeeze", ["a"], ["y"], axes=[0])
        return save(tmp, name, [n1, n2], [vi("x", [2, 3])], [Y], opset=11), torch.randn(2, 3), 1.0
    if name == "squeeze_unsqueeze_opset13":
        n1 = helper.make_node("Unsqueeze", ["x", "ax"], ["a"])
        n2 = helper.make_node("Squeeze", ["a"], ["y"])
        p = save(tmp, name, [n1, n2], [vi("x", [2, 3])], [Y], [iinit("ax", [0, 3])], opset=13)
        return p, torch.randn(2, 3), 1.0
    if name == "reducemean_opset13":
        n = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)
        return save(tmp, name, [n], [vi("x", [2, 3, 4])], [Y], opset=13), torch.randn(2, 3, 4), 1 / math.sqrt(12)
    if name == "reducemean_opset18":
        n = helper.make_node("ReduceMean", ["x", "ax"], ["y"])
        p = save(tmp, name, [n], [vi("x", [2, 3, 4])], [Y], [iinit("ax", [-1])])
        return p, torch.randn(2, 3, 4), 0.5
    if name == "softmax_opset11_axis1":
        n = helper.make_node("Softmax", ["x"], ["y"], axis=1)
        return save(tmp, name, [n], [vi("x", [2, 3, 4])], [Y], opset=11), torch.randn(2, 3, 4), 0.5
    if name == "sum_sub_const_div":
        n1 = helper.make_node("Sum", ["x", "x", "c"], ["a"])
        n2 = helper.make_node("Sub", ["c", "a"], ["b"])
        n3 = helper.make_node("Div", ["b", "d"], ["y"])
        p = save(tmp, name, [n1, n2, n3], [vi("x", [2, 3])], [Y], [init("c", [1, 2, 3]), init("d", [2, 4, -8])])
        return p, torch.randn(2, 3), 2 * 0.5
    if name == "gather_expand_tile_flatten":
        n1 = helper.make_node("Gather", ["x", "i"], ["a"], axis=1)
        n2 = helper.make_node("Expand", ["a", "s"], ["b"])
        n3 = helper.make_node("Tile", ["b", "r"], ["c"])
        n4 = helper.make_node("Flatten", ["c"], ["y"], axis=2)
        inits = [iinit("i", [2, 0]), iinit("s", [2, 2, 3]), iinit("r", [1, 2, 1])]
        p = save(tmp, name, [n1, n2, n3, n4], [vi("x", [1, 3, 3])], [Y], inits)
        return p, torch.randn(1, 3, 3), 2.0
    if name == "layernorm_axis":
        n = helper.make_node("LayerNormalization", ["x", "g", "bb"], ["y"], axis=-2, epsilon=1e-3)
        p = save(tmp, name, [n], [vi("x", [2, 3, 4])], [Y], [init("g", rng.uniform(0.5, 2, (3, 4))),
                                                               init("bb", np.zeros((3, 4)))])
        return p, torch.randn(2, 3, 4), None
    if name == "rmsnorm_opset23":
        n = helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-3)
        p = save(tmp, name, [n], [vi("x", [2, 3, 4])], [Y], [init("g", rng.uniform(0.5, 2, (4,)))], opset=23)
        return p, torch.randn(2, 3, 4), None
    if name == "shape_arithmetic_reshape":
        n1 = helper.make_node("Shape", ["x"], ["s"])
        n2 = helper.make_node("Gather", ["s", "zero"], ["b"], axis=0)
        n3 = helper.make_node("Unsqueeze", ["b", "zax"], ["b1"])
        n4 = helper.make_node("Concat", ["b1", "m1"], ["shp"], axis=0)
        n5 = helper.make_node("Reshape", ["x", "shp"], ["y"])
        inits = [iinit("zero", 0), iinit("zax", [0]), iinit("m1", [-1])]
        p = save(tmp, name, [n1, n2, n3, n4, n5], [vi("x", ["n", 3, 4])], [Y], inits)
        return p, torch.randn(2, 3, 4), 1.0
    if name == "dropout_identity_cast":
        n1 = helper.make_node("Dropout", ["x", "r"], ["a"])
        n2 = helper.make_node("Identity", ["a"], ["b"])
        n3 = helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)
        return save(tmp, name, [n1, n2, n3], [vi("x", [2, 3])], [Y], [init("r", 0.3)], opset=13), torch.randn(2, 3), 1.0
    raise KeyError(name)


CASES = [
    "gemm_alpha_beta_transB", "gemm_transA_full_C", "matmul_const_left", "hardsigmoid_onnx_default", "clip_opset9",
    "clip_opset13", "selu_custom", "prelu_per_channel", "conv_asymmetric_pads", "conv_same_upper",
    "conv_transpose_output_shape", "maxpool_same_upper", "avgpool_asym_exclude_pad", "avgpool_ceil_include_pad",
    "global_pools", "pad_reflect_axes_opset18", "pad_constant_opset9", "split_slice_opset11",
    "split_num_outputs_opset18", "squeeze_unsqueeze_opset11", "squeeze_unsqueeze_opset13", "reducemean_opset13",
    "reducemean_opset18", "softmax_opset11_axis1", "sum_sub_const_div", "gather_expand_tile_flatten",
    "layernorm_axis", "rmsnorm_opset23", "shape_arithmetic_reshape", "dropout_identity_cast",
]


@pytest.mark.parametrize("name", CASES)
def test_op_mapping_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    path, x, expected = _case(name, tmp_path)
    g = assert_matches_ort(path, x)
    assert "opaque" not in ir.summary(g), ir.summary(g)
    r = lipgraph.analyze(str(path), x, lower=False, method="autolip", power_iterations=PI)
    value = r.bounds["autolip"].value
    assert math.isfinite(value)
    if expected is not None:
        assert value == pytest.approx(expected, rel=1e-6)
    else:  # an upper bound: at least the norm of one Jacobian (the IR is piecewise linear here)
        f = lambda z: execute(g, z)  # noqa: E731
        try:  # forward mode: cheap here (few inputs), and conv_transpose backward can be very slow on CPU
            jx = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), x, vectorize=True,
                                                    strategy="forward-mode")
        except (RuntimeError, NotImplementedError):  # ops without forward-mode AD (adaptive max pooling)
            jx = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), x, vectorize=True)
        assert value >= float(torch.linalg.matrix_norm(jx.reshape(-1, x.numel()), ord=2)) * (1 - 2e-2)


# --- honest inf and clear errors ------------------------------------------------------------------------


def test_op_without_rule_is_inf_naming_node_and_op(tmp_path: Path) -> None:
    n1 = helper.make_node("Relu", ["x"], ["a"], name="first")
    n2 = helper.make_node("Erf", ["a"], ["y"], name="my_erf")
    path = save(tmp_path, "erf", [n1, n2], [vi("x", [2, 3])], [vi("y", None)])
    x = torch.randn(2, 3)
    assert_matches_ort(path, x)  # still executable (ONNX reference evaluator)
    r = lipgraph.analyze(str(path), x, lower=False, method="autolip")
    assert math.isinf(r.upper)
    (bad,) = r.not_lipschitz
    assert bad["node"] == "my_erf" and "Erf" in bad["reason"]
    # a user constant for the node (by its ONNX name) replaces the inf, as an unverified assumption
    r = lipgraph.analyze(str(path), x, lower=False, method="autolip", constants={"my_erf": 1.2})
    assert r.upper == pytest.approx(1.2) and not r.certified
    # Erf runs in torch, so the IR stays differentiable for the lower-bound search
    r = lipgraph.analyze(str(path), x, lower=True, lower_budget=1.0, method="autolip")
    assert r.lower is not None and 0 < r.lower <= 2 / math.sqrt(math.pi) * 1.001


def test_reference_evaluator_op_gets_a_secant_lower_bound(tmp_path: Path) -> None:
    """An op only the ONNX reference evaluator runs cannot be differentiated: the default run completes with a
    derivative-free secant search through the IR (soft thresholding, Shrink with bias = lambd, has constant 1:
    the secants reach it from below, globally and on a ball), and the op itself stays inf, named."""
    n = helper.make_node("Shrink", ["x"], ["y"], name="shrinker", lambd=0.5, bias=0.5)
    path = save(tmp_path, "shrink", [n], [vi("x", [2, 3])], [vi("y", None)])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert_matches_ort(path, x)
    from lipgraph.domains import Ball  # noqa: PLC0415

    for domain in (None, Ball(x, 0.3)):
        r = lipgraph.analyze(str(path), x, method="autolip", domain=domain)
        assert r.upper == math.inf and r.lower is not None
        assert 0.99 <= r.lower <= 1.0 + 1e-9
    g = lipgraph.trace(str(path))
    with pytest.raises(lipgraph.LipgraphError, match=r"'shrinker' \(Shrink\).*reference evaluator"):
        lipgraph.execute(g, x.clone().requires_grad_(True))


def test_non_default_domain_is_a_clear_error(tmp_path: Path) -> None:
    n = helper.make_node("Frobnicate", ["x"], ["y"], name="weird", domain="com.example")
    path = save(tmp_path, "custom", [n], [vi("x", [2, 3])], [vi("y", None)], domains=["com.example"])
    with pytest.raises(ModelLoadError, match=r"'weird' \(com\.example\.Frobnicate\)"):
        lipgraph.trace(str(path))


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        lipgraph.trace(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(ModelLoadError, match="garbage.onnx"):
        lipgraph.trace(str(bad))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        lipgraph.trace(str(empty))
    # a node reading a value nobody produces
    n = helper.make_node("Relu", ["ghost"], ["y"])
    g = helper.make_graph([n], "broken", [vi("x", [2])], [vi("y", None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(tmp_path / "broken.onnx"))
    with pytest.raises(ModelLoadError, match="ghost"):
        lipgraph.trace(str(tmp_path / "broken.onnx"))
    # a node missing a required attribute
    n = helper.make_node("MaxPool", ["x"], ["y"], name="pool_without_kernel")
    path = save(tmp_path, "nokernel", [n], [vi("x", [1, 1, 4, 4])], [vi("y", None)])
    with pytest.raises(ModelLoadError, match=r"'pool_without_kernel' \(MaxPool\).*kernel_shape"):
        lipgraph.trace(str(path))
    rc = cli.main(["analyze", str(bad), "--no-lower"])
    assert rc == 2


def test_external_data(tmp_path: Path) -> None:
    w = rng.standard_normal((64, 32)).astype(np.float32)
    n = helper.make_node("MatMul", ["x", "W"], ["y"])
    g = helper.make_graph([n], "ext", [vi("x", [1, 64])], [vi("y", None)], [init("W", w)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    x = torch.randn(1, 64)
    assert_matches_ort(path, x)
    assert bound(str(path), x) == pytest.approx(_svd(w), rel=1e-6)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"'W'.*ext\.bin.*missing"):
        lipgraph.trace(str(path))


def _pointing_to(path: Path, location: str, length: int | None = None) -> None:
    """Rewrite the external-data entry of every tensor of ``path`` to ``location`` (and ``length``)."""
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
            if e.key == "length" and length is not None:
                e.value = str(length)
    onnx.save(m, str(path))


def test_external_data_is_confined_to_the_model_folder(tmp_path: Path) -> None:
    w = rng.standard_normal((8, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "ext", [vi("x", [1, 8])],
                          [vi("y", None)], [init("W", w)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    outside = tmp_path / "secret.bin"
    outside.write_bytes((folder / "ext.bin").read_bytes())
    for location in ("../secret.bin", str(outside)):  # a relative escape and an absolute path
        _pointing_to(path, location)
        with pytest.raises(ModelLoadError, match="outside the model's folder"):
            lipgraph.trace(str(path))
    _pointing_to(path, "ext.bin", length=10 ** 6)  # more bytes than the file holds
    with pytest.raises(ModelLoadError, match="which has 128 bytes"):
        lipgraph.trace(str(path))


def test_wrong_inputs(tmp_path: Path) -> None:
    n = helper.make_node("Relu", ["x"], ["y"])
    path = save(tmp_path, "relu", [n], [vi("x", [2, 3])], [vi("y", None)])
    with pytest.raises(InputShapeError, match=r"'x'.*\(2, 3\).*\(3, 2\)"):
        lipgraph.trace(str(path), torch.randn(3, 2))
    with pytest.raises(InputShapeError, match="takes 1 input"):
        lipgraph.trace(str(path), (torch.randn(2, 3), torch.randn(2, 3)))
    # a shape that fits the declared dims but not the graph's constants
    n = helper.make_node("Reshape", ["x", "s"], ["y"])
    path = save(tmp_path, "reshape", [n], [vi("x", ["n", 3])], [vi("y", None)], [iinit("s", [2, 3])])
    with pytest.raises(InputShapeError, match="Reshape"):
        lipgraph.trace(str(path), torch.randn(4, 3))


def test_newer_opset_than_onnx_knows(tmp_path: Path) -> None:
    n = helper.make_node("Relu", ["x"], ["y"])
    g = helper.make_graph([n], "future", [vi("x", [2])], [vi("y", None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version() + 5)])
    path = tmp_path / "future.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelLoadError, match="newer than the installed onnx"):
        lipgraph.trace(str(path))


def test_selu_with_float32_attributes_keeps_the_files_constants(tmp_path: Path) -> None:
    """An exported SELU writes alpha and gamma as float32 (1.6732632, 1.0507010), whose product gamma * alpha,
    the function's constant (its slope just left of 0), lies 3e-9 above the float64 SELU's: the IR keeps the
    file's constants (elu, then a scale) and the bound is at least that product."""
    a32, g32 = float(np.float32(1.6732632423543772)), float(np.float32(1.0507009873554805))
    node = helper.make_node("Selu", ["x"], ["y"], alpha=a32, gamma=g32)
    path = save(tmp_path, "selu32", [node], [vi("x", [1, 4])], [vi("y", None)], opset=13)
    x = torch.tensor([[-1.0, -1e-3, 0.5, 2.0]])
    g = assert_matches_ort(path, x)
    assert "selu" not in ir.summary(g) and ir.summary(g).get("elu") == 1
    assert bound(str(path), x) >= g32 * a32
    default = save(tmp_path, "selu", [helper.make_node("Selu", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", None)],
                   opset=13)
    assert ir.summary(lipgraph.trace(default, x)).get("selu") == 1  # absent attributes: SELU's own constants


def test_shapes_as_example_input_give_a_full_seeded_report(tmp_path: Path) -> None:
    """``analyze("m.onnx", (2, 3))``: a shape in place of a tensor (it crashed the lower-bound search with an
    AttributeError); the input is drawn with the run's seed, so two runs agree, and a string is refused clearly."""
    torch.manual_seed(0)
    path = export(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(2, 3), tmp_path / "m.onnx")
    runs = [lipgraph.analyze(str(path), shape, lower_budget=2) for shape in ((2, 3), [2, 3], torch.Size([2, 3]))]
    assert all(r.lower is not None and 0 < r.lower <= r.upper for r in runs)
    assert len({(r.upper, r.lower) for r in runs}) == 1
    torch.manual_seed(123)  # the caller's global random state does not enter
    again = lipgraph.analyze(str(path), (2, 3), lower_budget=2)
    assert (again.upper, again.lower) == (runs[0].upper, runs[0].lower)
    with pytest.raises(InputShapeError, match="not the string"):
        lipgraph.analyze(str(path), "2,3")
