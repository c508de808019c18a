"""Rules for Lipschitz ops real models use (issue 16): interpolation, and its ONNX spellings.

Linear rules are checked against the exact float64 Jacobian norm (dense SVD); ONNX mappings against
onnxruntime (the IR computes what onnxruntime computes) and against the dense Jacobian of the IR.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Fn, dense_jacobian, jacobian_norm, one_constant
from onnx import TensorProto, helper, numpy_helper

import lipgraph
from lipgraph import execute, ir

EXACT = 1e-6  # relative: the rules are exact up to the float64 rounding margin


def export(model: nn.Module, x: torch.Tensor, path: Path, **kw) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, verbose=False, **kw)
    return path


def ort_run(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def save(tmp: Path, name: str, nodes, x_shape, inits=(), opset: int = 18) -> Path:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path = tmp / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def f32(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def i64(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.int64), name)


def assert_exact(bound: float, truth: float) -> None:
    assert bound >= truth * (1 - 1e-12)
    assert bound == pytest.approx(truth, rel=EXACT)


def ir_jacobian_norm(g, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(dense_jacobian(lambda z: execute(g, z), x), ord=2))


# --- interpolation: PyTorch spellings -------------------------------------------------------------------

INTERP = [
    ((1, 2, 4, 5), dict(scale_factor=2)),
    ((1, 1, 4, 5), dict(scale_factor=3, mode="nearest")),
    ((1, 1, 6, 5), dict(size=(4, 9), mode="nearest")),
    ((1, 1, 5, 6), dict(scale_factor=1.7, mode="bilinear")),
    ((1, 1, 5, 6), dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True)),
    ((1, 1, 3, 4), dict(scale_factor=3, mode="bilinear", align_corners=True)),
    ((1, 1, 7, 8), dict(scale_factor=0.5, mode="bilinear")),
    ((1, 1, 5, 4), dict(size=(3, 7), mode="bicubic", align_corners=True)),
    ((1, 1, 4, 3), dict(scale_factor=2.5, mode="bicubic")),
    ((1, 2, 9), dict(scale_factor=0.6, mode="linear")),
    ((1, 2, 5), dict(size=8, mode="linear", align_corners=True)),
    ((1, 1, 3, 3, 4), dict(scale_factor=2, mode="trilinear")),
    ((1, 1, 7, 5), dict(size=(3, 4), mode="area")),
    ((1, 1, 6, 5), dict(scale_factor=1.5, mode="nearest-exact")),
]


@pytest.mark.parametrize(("shape", "kw"), INTERP, ids=[str(kw) for _, kw in INTERP])
def test_interpolate_rule_is_the_exact_jacobian_norm(shape, kw) -> None:
    m = Fn(lambda z: F.interpolate(z, **kw))
    x = torch.randn(shape, dtype=torch.float64)
    lc = one_constant(m, x, "resize")
    assert lc.certified
    assert_exact(lc.value, jacobian_norm(m, x))


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=2),
                                dict(kernel_size=2, dilation=2, padding=1, stride=(1, 2))])
def test_unfold_rule_is_the_exact_jacobian_norm(kw) -> None:
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    for m in (Fn(lambda z: F.unfold(z, **kw)), nn.Unfold(**kw)):
        lc = one_constant(m, x, "unfold")
        assert lc.certified
        assert_exact(lc.value, jacobian_norm(m, x))
    g = lipgraph.trace(nn.Unfold(**kw), x)
    assert torch.equal(execute(g, x), F.unfold(x, **kw))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("resize", [{"size": (3, 5)}, {"scale_factor": 0.4}, {"size": (13, 4)},
                                    {"scale_factor": (2.5, 0.3)}])
def test_antialiased_interpolation_against_its_exact_jacobian(mode: str, align_corners: bool,
                                                             resize: dict) -> None:
    """The rule's Kronecker norm against the SVD of the whole (out x in) matrix, taken column by column from the
    op itself in float64 (one one-hot image per call, independent of the rule's 1-D extraction), and the IR
    reproduces the op."""
    fn = lambda z: F.interpolate(z, mode=mode, align_corners=align_corners, antialias=True, **resize)  # noqa: E731
    x = torch.randn(1, 2, 11, 9)
    lc = one_constant(Fn(fn), x, "resize")
    cols = [fn(e.reshape(1, 1, 11, 9)).reshape(-1) for e in torch.eye(99, dtype=torch.float64)]
    exact = float(torch.linalg.matrix_norm(torch.stack(cols, 1), ord=2))
    assert lc.certified
    assert_exact(lc.value, exact)
    torch.testing.assert_close(execute(lipgraph.trace(Fn(fn), x), x), fn(x))


def test_antialiased_interpolation_where_pytorch_is_not_separable_is_inf() -> None:
    """A size-1 axis: PyTorch's CPU antialias kernel then computes another matrix than the 1-D rows and columns
    give (measured), so the check at the node's shape refuses the Kronecker rule."""
    m = Fn(lambda z: F.interpolate(z, size=(5, 1), mode="bilinear", antialias=True))
    lc = one_constant(m, torch.randn(1, 1, 11, 1), "resize")
    assert math.isinf(lc.value) and "Kronecker" in lc.reason


def test_nearest_2x_in_2d_is_exactly_two() -> None:
    lc = one_constant(nn.Upsample(scale_factor=2, mode="nearest"), torch.randn(1, 3, 8, 8), "resize")
    assert lc.value == pytest.approx(2.0, rel=1e-8)
    assert lc.value >= 2.0


@pytest.mark.parametrize("module", [nn.Upsample(scale_factor=2), nn.Upsample(size=(5, 3), mode="bilinear"),
                                    nn.UpsamplingBilinear2d(scale_factor=2), nn.UpsamplingNearest2d(size=(6, 7))])
def test_upsample_modules_through_analyze(module) -> None:
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    r = lipgraph.analyze(module, x, lower=False)
    assert r.certified
    assert_exact(r.upper, jacobian_norm(module, x))


# --- interpolation: ONNX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "kw"), INTERP[:12], ids=[str(kw) for _, kw in INTERP[:12]])
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_exported_interpolate_matches_ort_and_torch_bound(shape, kw, opset, tmp_path: Path) -> None:
    m = Fn(lambda z: F.interpolate(z, **kw))
    x = torch.randn(shape)
    path = export(m, x, tmp_path / "m.onnx", opset_version=opset)
    g = lipgraph.trace(str(path), x)
    assert "opaque" not in ir.summary(g)
    np.testing.assert_allclose(execute(g, x).numpy(), ort_run(path, x)[0], atol=2e-6, rtol=1e-5)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified
    assert_exact(r.upper, ir_jacobian_norm(g, x.double()))  # exact for the exported (float32-scale) map
    assert r.upper == pytest.approx(lipgraph.analyze(m, x, lower=False).upper, rel=1e-5)  # parity


RESIZE_CASES = {
    # name: (x shape, attrs, scales or None, sizes or None, opset)
    "nearest_half_pixel_prefer_ceil": ((1, 1, 4, 5), dict(mode="nearest", nearest_mode="round_prefer_ceil"),
                                       [1, 1, 1.6, 2.2], None, 13),
    "nearest_align_corners_floor": ((1, 1, 4, 5), dict(mode="nearest", coordinate_transformation_mode="align_corners",
                                                       nearest_mode="floor"), None, [1, 1, 7, 3], 13),
    "nearest_asymmetric_ceil": ((1, 2, 5, 4), dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                   nearest_mode="ceil"), [1, 1, 0.6, 1.5], None, 19),
    "linear_half_pixel_down": ((1, 1, 8, 7), dict(mode="linear"), [1, 1, 0.5, 0.7], None, 13),
    "linear_pytorch_half_pixel": ((1, 1, 4, 5), dict(mode="linear",
                                                     coordinate_transformation_mode="pytorch_half_pixel"),
                                  None, [1, 1, 1, 9], 13),
    "linear_half_pixel_symmetric": ((1, 1, 4, 5), dict(mode="linear",
                                                       coordinate_transformation_mode="half_pixel_symmetric"),
                                    [1, 1, 1.5, 2.3], None, 19),
    "linear_axes_opset18": ((1, 1, 4, 5), dict(mode="linear", axes=[3, 2]), None, [8, 3], 18),
    "cubic_default": ((1, 1, 4, 5), dict(mode="cubic"), [1, 1, 2, 1.5], None, 13),
    "cubic_exclude_outside_a": ((1, 1, 5, 4), dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
                                [1, 1, 1.8, 0.75], None, 13),
    "cubic_align_corners": ((1, 1, 4, 4), dict(mode="cubic", coordinate_transformation_mode="align_corners"),
                            None, [1, 1, 6, 9], 11),
    "resize_opset10_nearest": ((1, 1, 3, 4), dict(mode="nearest"), [1, 1, 2, 3], None, 10),
    "resize_opset10_linear": ((1, 1, 3, 4), dict(mode="linear"), [1, 1, 2, 1.5], None, 10),
    "upsample_opset9_nearest": ((1, 2, 3, 4), dict(mode="nearest"), [1, 1, 2, 2], None, 9),
    "upsample_opset9_linear": ((1, 1, 3, 4), dict(mode="linear"), [1, 1, 2.5, 2], None, 9),
}


def _resize_model(tmp: Path, name: str) -> tuple[Path, torch.Tensor]:
    shape, attrs, scales, sizes, opset = RESIZE_CASES[name]
    op = "Upsample" if name.startswith("upsample") else "Resize"
    inits = []
    if op == "Upsample" or opset == 10:
        inputs = ["x", "scales"]
        inits.append(f32("scales", scales))
    else:
        inputs = ["x", "", "scales" if scales else "", "sizes" if sizes else ""]
        if scales:
            inits.append(f32("scales", scales))
        if sizes:
            inits.append(i64("sizes", sizes))
        while inputs[-1] == "":
            inputs.pop()
        if opset < 13:  # roi and scales are required inputs before opset 13 (empty tensors allowed)
            inputs = ["x", "roi", "scales" if scales else "scales_empty", *inputs[3:]]
            inits += [f32("roi", np.zeros(0)), f32("scales_empty", np.zeros(0))]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    return save(tmp, name, [node], list(shape), inits, opset), torch.randn(shape)


@pytest.mark.parametrize("name", list(RESIZE_CASES))
def test_onnx_resize_matches_ort_and_is_exact(name: str, tmp_path: Path) -> None:
    path, x = _resize_model(tmp_path, name)
    g = lipgraph.trace(str(path), x)
    assert ir.summary(g).get("resize") == 1, ir.summary(g)
    ours, theirs = execute(g, x), ort_run(path, x)[0]
    assert tuple(ours.shape) == theirs.shape
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=1e-5)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified
    assert_exact(r.upper, ir_jacobian_norm(g, x.double()))


def test_onnx_resize_unsupported_is_honest_inf(tmp_path: Path) -> None:
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize")
    path = save(tmp_path, "crop", [node], [1, 1, 4, 4], [f32("roi", [0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9]),
                                                          f32("scales", [1, 1, 2, 2])], 13)
    r = lipgraph.analyze(str(path), torch.randn(1, 1, 4, 4), lower=False)
    assert math.isinf(r.upper)


# --- a YOLO-style model: both paths, finite and certified ----------------------------------------------------


class Yolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Sequential(nn.Conv2d(24, 8, 1), nn.SiLU())
        self.head_small = nn.Conv2d(8, 6, 1)
        self.head_large = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        a = self.stem(x)
        b = self.down(a)
        c = self.fuse(torch.cat([self.up(b), a], dim=1))
        return self.head_small(c), self.head_large(b)


def test_yolo_style_model_is_finite_and_certified_on_both_paths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Yolo().eval()
    x = torch.randn(1, 3, 16, 16)
    r_fx = lipgraph.analyze(m, x, lower=False)
    assert r_fx.upper < math.inf and r_fx.certified
    path = export(m, x, tmp_path / "yolo.onnx", opset_version=13)
    r_onnx = lipgraph.analyze(str(path), x, lower=False)
    assert r_onnx.upper < math.inf and r_onnx.certified
    assert r_onnx.upper == pytest.approx(r_fx.upper, rel=1e-3)
    # an upper bound: at least the norm of the Jacobian at x
    xd = x.double()
    md = Yolo().double().eval()
    md.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    truth = jacobian_norm(lambda z: torch.cat([o.reshape(-1) for o in md(z)]), xd)
    assert r_fx.upper >= truth


# --- cumsum --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 200])
def test_triangular_ones_closed_form_matches_svd(n: int) -> None:
    from lipgraph.ops.selections import triangular_ones_norm

    t = torch.tril(torch.ones(n, n, dtype=torch.float64))
    assert triangular_ones_norm(n) == pytest.approx(float(torch.linalg.matrix_norm(t, ord=2)), rel=1e-12)


@pytest.mark.parametrize(("shape", "dim"), [((5,), 0), ((2, 6, 3), 1), ((3, 4), -1), ((1, 9), 1)])
def test_cumsum_rule_is_the_exact_jacobian_norm(shape, dim) -> None:
    m = Fn(lambda z: torch.cumsum(z, dim))
    x = torch.randn(shape, dtype=torch.float64)
    lc = one_constant(m, x, "cumsum")
    assert_exact(lc.value, jacobian_norm(m, x))
    m2 = Fn(lambda z: z.cumsum(dim=dim) * 1.0)
    assert_exact(lipgraph.analyze(m2, x, lower=False).upper, jacobian_norm(m2, x))


@pytest.mark.parametrize(("exclusive", "reverse"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_onnx_cumsum_attrs_match_ort_and_are_exact(exclusive: int, reverse: int, tmp_path: Path) -> None:
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=exclusive, reverse=reverse)
    path = save(tmp_path, "cumsum", [node], [2, 6, 3], [i64("axis", 1)], 14)
    x = torch.randn(2, 6, 3)
    g = lipgraph.trace(str(path), x)
    assert ir.summary(g).get("cumsum") == 1
    np.testing.assert_allclose(execute(g, x).numpy(), ort_run(path, x)[0], atol=1e-5, rtol=1e-5)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified
    assert_exact(r.upper, ir_jacobian_norm(g, x.double()))


def test_exported_cumsum_parity(tmp_path: Path) -> None:
    m = Fn(lambda z: torch.cumsum(z, 1))
    x = torch.randn(2, 8)
    path = export(m, x, tmp_path / "c.onnx", opset_version=13)
    assert lipgraph.analyze(str(path), lower=False).upper == pytest.approx(lipgraph.analyze(m, x, lower=False).upper)


# --- nonlinear selections: never below a sampled Jacobian norm ---------------------------------------------------


def _sampled_sup(f, shape, n: int = 30, scale: float = 3.0) -> float:
    best = 0.0
    for _ in range(n):
        x = torch.randn(shape, dtype=torch.float64) * scale
        best = max(best, jacobian_norm(f, x))
    return best


NONLINEAR = {
    "sin": (lambda z: torch.sin(z), (3, 4), 1.0),
    "cos": (lambda z: z.cos(), (3, 4), 1.0),
    "maximum_two_vars": (lambda z: torch.maximum(z[:, :3], z[:, 3:] * 2.0), (4, 6), None),
    "minimum_const": (lambda z: torch.minimum(z, torch.zeros(5)), (3, 5), 1.0),
    "max_of_broadcast": (lambda z: torch.max(z, z[:, :1]), (3, 4), None),
    "amax_dim": (lambda z: torch.amax(z, dim=1), (3, 5), 1.0),
    "amin_dims": (lambda z: z.amin(dim=(0, 2), keepdim=True), (3, 4, 2), 1.0),
    "max_all": (lambda z: torch.max(z), (3, 4), 1.0),
    "logsumexp": (lambda z: torch.logsumexp(z, dim=-1), (3, 5), 1.0),
    "where_const": (lambda z: torch.where(torch.arange(12).reshape(3, 4) % 3 == 0, z, -z[:, :1]), (3, 4), None),
}


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_rules_bound_every_sampled_jacobian(name: str) -> None:
    f, shape, expected = NONLINEAR[name]
    m = Fn(f)
    x = torch.randn(shape, dtype=torch.float64)
    r = lipgraph.analyze(m, x, lower=False)
    assert r.certified and math.isfinite(r.upper)
    sup = _sampled_sup(m, shape)
    assert r.upper >= sup * (1 - 1e-9)
    if expected is not None:
        assert r.upper == pytest.approx(expected, rel=1e-6)


def test_maximum_is_one_lipschitz_jointly_by_secants() -> None:
    """The l2 combine of two partials 1: sampled secants of (a, b) -> max(a, b) never exceed sqrt(1+1)."""
    m = Fn(lambda z: torch.maximum(z[:, 0], z[:, 1]))
    r = lipgraph.analyze(m, torch.randn(6, 2), lower=False)
    assert r.upper == pytest.approx(math.sqrt(2), rel=1e-6)  # z[:,0] and z[:,1] each have L = 1
    for _ in range(200):
        a, b = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        assert float((m(a) - m(b)).norm()) <= float((a - b).norm()) * (1 + 1e-12)


def test_max_with_dim_values_are_one_lipschitz_and_its_indices_inf() -> None:
    values = lipgraph.analyze(Fn(lambda z: torch.max(z, dim=1).values), torch.randn(3, 4), lower=False)
    assert values.certified and values.upper == pytest.approx(1.0, rel=1e-9)
    indices = lipgraph.analyze(Fn(lambda z: torch.max(z, dim=1).indices.float()), torch.randn(3, 4), lower=False)
    assert math.isinf(indices.upper)


def test_where_with_data_dependent_condition_is_honest_inf() -> None:
    m = Fn(lambda z: torch.where(z > 0, z, 2 * z))
    assert math.isinf(lipgraph.analyze(m, torch.randn(3, 4), lower=False).upper)


ONNX_NONLINEAR = {
    "Sin": ([helper.make_node("Sin", ["x"], ["y"])], [], 13, 1.0),
    "Cos": ([helper.make_node("Cos", ["x"], ["y"])], [], 13, 1.0),
    "ReduceMax_opset13": ([helper.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=0)], [], 13, 1.0),
    "ReduceMin_opset18": ([helper.make_node("ReduceMin", ["x", "ax"], ["y"])], [i64("ax", [0, 2])], 18, 1.0),
    "ReduceLogSumExp": ([helper.make_node("ReduceLogSumExp", ["x"], ["y"], axes=[2])], [], 13, 1.0),
    "Max_var_const": ([helper.make_node("Max", ["x", "c"], ["y"])], [f32("c", np.zeros((4, 1)))], 13, 1.0),
    "Min_two_vars": ([helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Min", ["x", "n"], ["y"])], [], 13,
                     math.sqrt(2)),
    "Where_const": ([helper.make_node("Where", ["c", "x", "z"], ["y"])],
                    [numpy_helper.from_array(np.arange(24).reshape(2, 4, 3) % 2 == 0, "c"),
                     f32("z", np.ones((2, 4, 3)))], 13, 1.0),
}


@pytest.mark.parametrize("name", list(ONNX_NONLINEAR))
def test_onnx_selection_mappings_match_ort(name: str, tmp_path: Path) -> None:
    nodes, inits, opset, expected = ONNX_NONLINEAR[name]
    path = save(tmp_path, name, nodes, [2, 4, 3], inits, opset)
    x = torch.randn(2, 4, 3)
    g = lipgraph.trace(str(path), x)
    assert "opaque" not in ir.summary(g), ir.summary(g)
    np.testing.assert_allclose(execute(g, x).numpy(), ort_run(path, x)[0], atol=1e-5, rtol=1e-5)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified
    assert r.upper == pytest.approx(expected, rel=1e-6)
    assert r.upper >= ir_jacobian_norm(g, x.double()) * (1 - 1e-9)


@pytest.mark.parametrize("name", ["sin", "maximum_two_vars", "amax_dim", "logsumexp", "where_const"])
def test_exported_selections_parity(name: str, tmp_path: Path) -> None:
    f, shape, _ = NONLINEAR[name]
    m = Fn(f)
    x = torch.randn(shape)
    path = export(m, x, tmp_path / "s.onnx", opset_version=13)
    r_onnx = lipgraph.analyze(str(path), lower=False)
    assert math.isfinite(r_onnx.upper)
    assert r_onnx.upper == pytest.approx(lipgraph.analyze(m, x, lower=False).upper, rel=1e-6)


class ShapeBranch(nn.Module):
    """Python control flow on shapes: torch.fx fails, so the graph comes from torch.export (aten ops)."""

    def forward(self, x):
        if x.shape[-1] > 2:
            x = x * 0.5
        y = F.interpolate(x, scale_factor=2) + F.interpolate(x, scale_factor=2.0, mode="bilinear")
        y = y + torch.sin(F.interpolate(x, size=(6, 8), mode="bicubic", align_corners=True))
        return torch.cumsum(torch.maximum(y, y.amax(dim=1, keepdim=True)), 2)


def test_torch_export_path_maps_the_new_aten_ops() -> None:
    x = torch.randn(1, 2, 3, 4)
    g = lipgraph.trace(ShapeBranch(), x)
    assert g.graph["frontend"] == "torch.export"
    assert "opaque" not in ir.summary(g), ir.summary(g)
    assert ir.summary(g)["resize"] == 3
    r = lipgraph.analyze(ShapeBranch(), x, lower=False)
    assert r.certified and math.isfinite(r.upper)
    assert r.upper >= jacobian_norm(ShapeBranch(), x.double())


# --- RMSNorm and InstanceNorm ----------------------------------------------------------------------------------


def test_rms_norm_bound_is_attained_near_zero_and_never_exceeded() -> None:
    torch.manual_seed(0)
    m = nn.RMSNorm(6, eps=1e-3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, dtype=torch.float64)
    r = lipgraph.analyze(m, x, lower=False)
    expected = float(m.weight.abs().max()) / math.sqrt(1e-3)
    assert r.certified and r.upper == pytest.approx(expected, rel=1e-9)
    assert _sampled_sup(m, (2, 6), scale=1.0) <= r.upper
    near_zero = jacobian_norm(m, torch.randn(2, 6, dtype=torch.float64) * 1e-6)
    assert near_zero == pytest.approx(expected, rel=1e-3)  # attained as x -> 0: exact


def test_rms_norm_default_eps_is_sound_for_float64() -> None:
    m = Fn(lambda z: F.rms_norm(z, (4,)))
    r = lipgraph.analyze(m, torch.randn(3, 4, dtype=torch.float64), lower=False)
    assert r.upper >= jacobian_norm(m, torch.randn(3, 4, dtype=torch.float64) * 1e-9)


def test_instance_norm_module_and_function_are_mapped() -> None:
    x = torch.randn(1, 3, 4, 4)
    for m in (nn.InstanceNorm2d(3, affine=True, eps=1e-3), nn.Sequential(nn.InstanceNorm2d(3, eps=1e-3)),
              Fn(lambda z: F.instance_norm(z, eps=1e-3))):
        g = lipgraph.trace(m, x)
        assert ir.summary(g).get("instance_norm") == 1, ir.summary(g)
        r = lipgraph.analyze(m, x, lower=False)
        assert r.certified and r.upper == pytest.approx(1 / math.sqrt(1e-3), rel=1e-9)
        assert r.upper >= _sampled_sup(as_double_module(m), (1, 3, 4, 4), scale=1.0)
    tracked = nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True)).eval()
    assert math.isinf(lipgraph.analyze(tracked, x, lower=False).upper)


def as_double_module(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).double().eval()


# --- resize as an affine member: a conv -> upsample -> conv region is bounded as one operator -------------------


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resize_inside_an_affine_region_gives_the_exact_norm(mode: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(3, 2, 3))
    x = torch.randn(1, 2, 5, 5)
    truth = jacobian_norm(as_double_module(m), x.double())
    r_fx = lipgraph.analyze(m, x, lower=False)
    assert r_fx.certified and r_fx.upper >= truth * (1 - 1e-9)
    assert r_fx.upper == pytest.approx(truth, rel=1e-5)  # the region is folded into one operator
    path = export(m, x, tmp_path / "r.onnx", opset_version=13)
    r_onnx = lipgraph.analyze(str(path), lower=False)
    assert r_onnx.upper == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize(("largest", "opset"), [(1, 13), (0, 11), (1, 9)])
def test_onnx_topk_values_are_one_lipschitz(largest: int, opset: int, tmp_path: Path) -> None:
    if opset < 10:
        node = helper.make_node("TopK", ["x"], ["y", "i"], k=2, axis=1)
        inits = []
    else:
        node = helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1, largest=largest)
        inits = [i64("k", [2])]
    graph = helper.make_graph([node], "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), str(path))
    x = torch.randn(2, 4, 3)
    g = lipgraph.trace(str(path), x)
    assert ir.summary(g).get("topk") == 1, ir.summary(g)
    np.testing.assert_allclose(execute(g, x).numpy(), ort_run(path, x)[0], atol=1e-6)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified and r.upper == pytest.approx(1.0)
    f = lambda z: execute(g, z)  # noqa: E731
    assert _sampled_sup(f, (2, 4, 3)) <= 1.0 + 1e-9
    for _ in range(100):  # secants too: sorting is 1-Lipschitz, not only its Jacobians
        a, b = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
        assert float((f(a) - f(b)).norm()) <= float((a - b).norm()) * (1 + 1e-12)


def test_onnx_topk_with_used_indices_is_inf(tmp_path: Path) -> None:
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1), helper.make_node("Cast", ["i"], ["y"], to=1)]
    path = save(tmp_path, "topk_idx", nodes, [2, 4, 3], [i64("k", [2])], 13)
    assert "topk" not in ir.summary(lipgraph.trace(str(path), torch.randn(2, 4, 3)))
    assert math.isinf(lipgraph.analyze(str(path), torch.randn(2, 4, 3), lower=False).upper)


# --- Lp pooling ------------------------------------------------------------------------------------------------

LP = [(1, 3, 2), (2, 3, 2), (2, 2, 2), (4, 3, 1), (1, 2, 1)]


@pytest.mark.parametrize(("p", "k", "s"), LP)
def test_lp_pool_bound_is_never_exceeded_and_attained(p: float, k: int, s: int) -> None:
    m = nn.LPPool2d(p, k, s)
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    lc = one_constant(m, x, "lp_pool")
    assert lc.certified and math.isfinite(lc.value)
    assert _sampled_sup(m, (1, 2, 7, 6), scale=1.0) <= lc.value * (1 + 1e-9)
    if p == 1:  # all window sums positive: the Jacobian is the membership matrix, whose norm the rule is
        assert_exact(lc.value, jacobian_norm(m, torch.rand(1, 2, 7, 6, dtype=torch.float64) + 1))
    else:  # a one-hot difference at the most covered input attains sqrt(max count)
        best = 0.0
        for i in range(7):
            for j in range(6):
                e = torch.zeros(1, 2, 7, 6, dtype=torch.float64)
                e[0, 0, i, j] = 1.0
                best = max(best, float((m(e) - m(torch.zeros_like(e))).norm()))
        assert lc.value == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("p", [3, 2.5])
def test_lp_pool_with_odd_or_fractional_p_is_honest_inf(p: float) -> None:
    lc = one_constant(nn.LPPool2d(p, 2), torch.rand(1, 1, 4, 4) + 0.1, "lp_pool")  # positive: no NaN
    assert math.isinf(lc.value) and "norm_type" in lc.reason


@pytest.mark.parametrize(("p", "k", "s", "pads"), [(2, 3, 2, [0, 0, 0, 0]), (1, 2, 1, [1, 0, 1, 0]),
                                                   (3, 2, 2, [0, 0, 0, 0])])
def test_onnx_lp_pool_matches_ort_and_bounds_jacobians(p, k, s, pads, tmp_path: Path) -> None:
    node = helper.make_node("LpPool", ["x"], ["y"], p=p, kernel_shape=[k, k], strides=[s, s], pads=pads)
    path = save(tmp_path, "lp", [node], [1, 2, 7, 6], [], 13)
    x = torch.randn(1, 2, 7, 6)
    g = lipgraph.trace(str(path), x)
    assert ir.summary(g).get("lp_pool") == 1, ir.summary(g)
    np.testing.assert_allclose(execute(g, x).numpy(), ort_run(path, x)[0], atol=1e-5, rtol=1e-5)
    r = lipgraph.analyze(str(path), x, lower=False)
    assert r.certified and math.isfinite(r.upper)
    assert _sampled_sup(lambda z: execute(g, z), (1, 2, 7, 6), scale=1.0) <= r.upper * (1 + 1e-9)


# --- order statistics: sort / topk / max(dim) / kthvalue / median(dim) / cummax values --------------------

ORDER_CASES = {
    "sort": (lambda x: torch.sort(x, dim=-1).values, 1.0),
    "sort_descending_dim0": (lambda x: x.sort(0, descending=True)[0], 1.0),
    "topk": (lambda x: torch.topk(x, 3, dim=1).values, 1.0),
    "max_dim": (lambda x: torch.max(x, dim=-1).values, 1.0),
    "min_dim_keepdim": (lambda x: x.min(1, keepdim=True)[0], 1.0),
    "kthvalue": (lambda x: torch.kthvalue(x, 2, dim=-1).values, 1.0),
    "median_dim": (lambda x: x.median(dim=1).values, 1.0),
    "msort": (lambda x: torch.msort(x.T), 1.0),
    "msort_method": (lambda x: x.T.msort(), 1.0),
    "cummax": (lambda x: torch.cummax(x, dim=-1).values, math.sqrt(7)),
    "cummin": (lambda x: torch.cummin(x, 1)[0], math.sqrt(7)),
}


@pytest.mark.parametrize("name", sorted(ORDER_CASES))
def test_order_statistics_values_against_secants_and_their_attained_constant(name: str) -> None:
    """The values of each order statistic: the IR reproduces them, the rule's constant is at or above every
    sampled secant ratio (float64, rows of 7 entries), and a secant reaches it (the rule is exact)."""
    fn, constant = ORDER_CASES[name]
    model, x = Fn(fn), torch.randn(3, 7)
    g = lipgraph.trace(model, x)
    torch.testing.assert_close(execute(g, x), fn(x))
    lc = one_constant(model, x, "topk" if name.startswith("msort") else "order_pair")
    assert lc.certified and lc.value == pytest.approx(constant, rel=1e-12)
    f64 = lambda z: fn(z.double())  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, 7, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.randn(4000, 3, 7, generator=gen, dtype=torch.float64)
    ratios = [float((f64(p) - f64(q)).norm() / (p - q).norm()) for p, q in zip(a, b, strict=True)]
    assert max(ratios) <= constant * (1 + 1e-12)
    # attained: at a point without ties the Jacobian selects entries (norm 1); cummax/cummin at a row
    # (0, -1, ..., -1) (resp. (0, 1, ..., 1)) copy the first entry into all seven values (norm sqrt(7))
    point = torch.randn(1, 7, generator=gen, dtype=torch.float64)
    if name in ("cummax", "cummin"):
        point = torch.full((1, 7), -1.0 if name == "cummax" else 1.0, dtype=torch.float64)
        point[0, 0] = 0.0
    assert jacobian_norm(f64, point) == pytest.approx(constant, rel=1e-12)


def test_order_statistics_indices_are_not_lipschitz() -> None:
    """The integer indices jump: reading them (by index or by name), or returning the whole pair, is inf."""
    for fn in (lambda x: torch.sort(x, dim=-1)[1].float(), lambda x: x.max(dim=1).indices.float(),
               lambda x: torch.topk(x, 2).indices.float() + torch.topk(x, 2).values):
        rep = lipgraph.analyze(Fn(fn), torch.randn(2, 5), lower=False)
        assert math.isinf(rep.upper) and not rep.certified
    whole = lipgraph.analyze(Fn(lambda x: torch.sort(x, dim=-1)), torch.randn(2, 5), lower=False)
    assert math.isinf(whole.upper)
    assert any("indices" in (n.reason or "") for n in whole.nodes)
