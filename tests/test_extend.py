"""Teaching lipgraph a new activation and a new bound algorithm, each in one registration, and seeing both
flow through the fx and ONNX frontends, SeqLip, affine folding, the report (JSON) and the rendering."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipgraph
from lipgraph import render
from lipgraph.bounds import METHODS, register_method
from lipgraph.bounds.relations import AlgorithmResult, Relation, Term
from lipgraph.core import ROUNDING_MARGIN
from lipgraph.ops import RULES, register_rule


class SoftsignNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 3)
        self.act = nn.Softsign()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def _softsign_forward(node, x):  # type: ignore[no-untyped-def]
    return F.softsign(x)


@pytest.fixture
def softsign_rule():  # type: ignore[no-untyped-def]
    """ONE registration: softsign'(x) = 1 / (1 + |x|)^2 lies in (0, 1]; spelled nn.Softsign and ONNX Softsign."""
    assert "softsign" not in RULES
    register_rule("softsign", _softsign_forward, slope=(0.0, 1.0), torch_modules=(nn.Softsign,),
                  onnx_ops=("Softsign",))
    yield
    del RULES["softsign"]


def _end_to_end_run(g, local, settings):  # type: ignore[no-untyped-def]
    """A bound algorithm for the test: the exact float64 norm of every linear layer feeding the output's
    linear layer directly, as the relation L(fc3) <= ||W3|| (1 + margin) L(input of fc3). Sound (it is the
    node's own rule, computed again), so it can only tie; it must show up as a relation source."""
    out = g.graph["output"]
    last = lipgraph.ir.node(g, out).inputs[0]
    n = lipgraph.ir.node(g, last)
    w = n.params["weight"].detach().double()
    factor = float(torch.linalg.matrix_norm(w, 2)) * (1 + ROUNDING_MARGIN)
    rel = Relation(last, (Term(n.inputs[0], factor * (1 - 1e-6), False),), "halfway", "test relation")
    return AlgorithmResult([rel], [{"factor": factor}], 0.0)


@pytest.fixture
def test_algorithm():  # type: ignore[no-untyped-def]
    mod = types.ModuleType("lipgraph_test_algorithm")
    mod.run = _end_to_end_run  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    register_method("halfway", mod.__name__, "a test algorithm (estimate)")
    yield
    del METHODS["halfway"]
    del sys.modules[mod.__name__]


def test_new_activation_flows_through_fx_seqlip_affine_and_rendering(softsign_rule, tmp_path: Path) -> None:
    model, x = SoftsignNet().eval(), torch.randn(1, 4)
    r = lipgraph.analyze(model, x, lower=False)
    ops = [n.op for n in r.nodes]
    assert ops.count("softsign") == 2 and "opaque" not in ops
    # every chain algorithm sees the new activation through its slope capability
    for name in ("combettes-pesquet", "eclipse-fast"):
        assert r.bounds[f"autolip+{name}"].certified
        assert r.bounds[f"autolip+{name}"].value < r.bounds["autolip"].value
    # SeqLip sees the two softsign layers as activations of one chain fc1 .. fc3
    (seg,) = r.segments
    assert seg["certified"] and len(seg["slopes"]) == 2
    assert r.bounds["autolip+seqlip"].value < r.bounds["autolip"].value
    assert "autolip+affine" in r.bounds
    assert r.upper <= min(b.value for b in r.bounds.values()) * (1 + 1e-12)
    # sound: never below the largest float64 Jacobian norm at sampled points
    m64 = model.double()
    worst = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(m64, torch.randn(1, 4).double())
                                                .reshape(3, 4), 2)) for _ in range(50))
    assert worst <= r.upper
    d = json.loads(r.to_json())
    assert [n["op"] for n in d["nodes"]].count("softsign") == 2
    dot = render.to_dot(r)
    assert "softsign" in dot


def _softsign_onnx(model: SoftsignNet, path: Path) -> None:
    """The same network written as ONNX Gemm / Softsign nodes (the exporters decompose nn.Softsign)."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    inits, nodes, prev = [], [], "x"
    for i, fc in enumerate((model.fc1, model.fc2, model.fc3)):
        inits += [numpy_helper.from_array(fc.weight.detach().numpy(), f"w{i}"),
                  numpy_helper.from_array(fc.bias.detach().numpy(), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        prev = f"h{i}"
        if i < 2:
            nodes.append(helper.make_node("Softsign", [prev], [f"s{i}"]))
            prev = f"s{i}"
    graph = helper.make_graph(nodes, "softsign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_new_activation_flows_through_onnx(softsign_rule, tmp_path: Path) -> None:
    model, x = SoftsignNet().eval(), torch.randn(1, 4)
    path = tmp_path / "softsign.onnx"
    _softsign_onnx(model, path)
    g = lipgraph.trace(str(path))
    assert torch.allclose(lipgraph.execute(g, x), model(x), atol=1e-6)
    r_onnx = lipgraph.analyze(str(path), lower=False)
    r_torch = lipgraph.analyze(model, x, lower=False)
    assert [n.op for n in r_onnx.nodes].count("softsign") == 2
    assert r_onnx.segments and r_onnx.segments[0]["certified"]
    assert r_onnx.certified and r_onnx.upper == pytest.approx(r_torch.upper, rel=1e-6)


def test_new_algorithm_flows_through_report_and_rendering(softsign_rule, test_algorithm, tmp_path: Path) -> None:
    model, x = SoftsignNet().eval(), torch.randn(1, 4)
    r = lipgraph.analyze(model, x, method=["halfway"], lower=False)
    assert set(r.bounds) == {"autolip", "autolip+halfway"}
    alone = r.bounds["autolip+halfway"]
    # an uncertified relation never replaces a certified value: the algorithm alone changes nothing
    assert alone.value == r.bounds["autolip"].value and alone.certified
    fc3 = r.node("fc3")
    assert fc3.via == "autolip"
    d = json.loads(r.to_json())
    assert d["bounds"]["autolip+halfway"]["method"] == "a test algorithm (estimate)"
    assert "modules" in d and math.isfinite(d["modules"]["fc3"]["value"])
    r2 = lipgraph.analyze(model, x, method=["halfway", "seqlip"], lower=False)
    assert set(r2.bounds) == {"autolip", "autolip+seqlip", "autolip+halfway", "autolip+seqlip+halfway"}
    assert f"({r2.best[0]})" in render.to_dot(r2)


def test_unknown_method_is_one_clear_error() -> None:
    with pytest.raises(lipgraph.LipgraphError, match="unknown method 'nope'"):
        lipgraph.analyze(SoftsignNet(), torch.randn(1, 4), method="nope", lower=False)


def test_an_assumed_zero_constant_does_not_certify_what_depends_on_it() -> None:
    """A user constant of 0 given as an assumption (certified=False) bounds its branch by 0, but the node that adds
    it to the rest is not proven: its bound holds only if the assumption does (here the branch's constant is
    about 5, so the report's value is below the truth), so nothing downstream is labelled certified."""
    import torch.nn as nn  # noqa: PLC0415

    from lipgraph.bounds.local import UserConstant  # noqa: PLC0415

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u, self.h = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.h(torch.relu(x + self.u(x)))

    torch.manual_seed(0)
    r = lipgraph.analyze(M(), torch.randn(1, 6), constants={"u": UserConstant(0.0, False)}, method="autolip",
                         lower=False)
    assert not r.bounds["autolip"].certified
