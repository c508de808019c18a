"""Certified radii of ONNX files (lipgraph.certify on a path, ``lipgraph certify model.onnx``).

The ground truths are independent of the IR: the PyTorch model the file was exported from (its radii, computed
by the module path), float64 Jacobians of its logit differences, and a PGD attack on the PyTorch model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph.certify import pair_difference_graph
from lipgraph.cli import main
from lipgraph.ops import execute
from tests.conftest import jacobian_norm
from tests.test_certify import _train
from tests.test_onnx import export


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):  # type: ignore[no-untyped-def]
    model, x, y = _train()
    path = export(model, x[:1], tmp_path_factory.mktemp("certify_onnx") / "digits.onnx")
    return model, path, x[:12], y[:12]


def test_onnx_radii_equal_the_pytorch_models(digits_onnx) -> None:  # type: ignore[no-untyped-def]
    """Every radius of every kind, the pair constants and the whole-network bound agree with the module path (the
    two are different code: a PairDiff module traced by torch.fx, and the IR edited by pair_difference_graph)."""
    model, path, x, y = digits_onnx
    kw = {"radius": [0.1, 0.3], "local": True, "local_steps": 4}
    a = lipgraph.certify(model, x, y, **kw)
    b = lipgraph.certify(path, x, y, **kw)
    assert b.certified and b.clean_accuracy == a.clean_accuracy
    assert b.whole_upper == pytest.approx(a.whole_upper, rel=1e-9)
    assert a.pairs.keys() == b.pairs.keys()
    for k in a.pairs:
        assert b.pairs[k].value == pytest.approx(a.pairs[k].value, rel=1e-9)
    for ca, cb in zip(a.inputs, b.inputs, strict=True):
        assert (ca.prediction, ca.correct) == (cb.prediction, cb.correct)
        assert cb.margin == pytest.approx(ca.margin, rel=1e-6, abs=1e-9)
        assert cb.radii.keys() == ca.radii.keys()
        for kind in ca.radii:
            assert cb.radii[kind] == pytest.approx(ca.radii[kind], rel=1e-6, abs=1e-12), kind
    assert b.certified_accuracy(0.1) > 0.3  # not vacuous
    assert json.loads(b.to_json())["schema"] == "lipgraph.certificate/1"


def test_onnx_radii_survive_the_attack_on_the_pytorch_model(digits_onnx) -> None:  # type: ignore[no-untyped-def]
    model, path, x, y = digits_onnx
    cert = lipgraph.certify(path, x, y, attack=True, attack_steps=20)
    correct = [c for c in cert.inputs if c.correct]
    assert correct
    for c in correct:
        # the attack ran on the IR; a concrete adversarial point there is one of the PyTorch model too
        assert c.attack_radius is not None and c.attack_radius >= c.radius
        theirs = lipgraph.certify(model, x[c.index:c.index + 1], y[c.index:c.index + 1], attack=True,
                                  attack_steps=20).inputs[0].attack_radius
        assert theirs is not None and theirs >= c.radius


class _ScaledHead(nn.Module):
    """Logits that do not end in a linear node (a scale after the last layer): the pair graph appends e_y - e_j."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x)) * 3.0 - 1.0


def test_pair_graph_without_a_linear_head_bounds_float64_jacobians(tmp_path) -> None:
    torch.manual_seed(1)
    model = _ScaledHead().eval()
    x = torch.randn(4, 1, 6, 6)
    path = export(model, x[:1], tmp_path / "scaled.onnx")
    g64 = lipgraph.trace(str(path), x[:1]).copy()
    from lipgraph import ir  # noqa: PLC0415

    g64 = ir.to_float64(g64)
    h, folded = pair_difference_graph(g64, 1, 3)
    assert not folded
    m64 = model.double()
    with torch.no_grad():
        for xi in x.double():
            z = m64(xi[None])
            assert float(execute(h, xi[None])) == pytest.approx(float(z[0, 1] - z[0, 3]), rel=1e-12, abs=1e-12)
    cert = lipgraph.certify(str(path), x, torch.tensor([1, 3, 0, 2]))
    gen = torch.Generator().manual_seed(0)
    for (yy, j), pc in cert.pairs.items():
        assert pc.certified and math.isfinite(pc.value)
        worst = max(jacobian_norm(lambda v, a=yy, b=j: (m64(v)[:, a] - m64(v)[:, b]),
                                  torch.randn(1, 1, 6, 6, generator=gen, dtype=torch.float64)) for _ in range(20))
        assert worst <= pc.value * (1 + 1e-9)


def test_pair_graph_folds_a_linear_head(digits_onnx) -> None:  # type: ignore[no-untyped-def]
    _, path, x, _ = digits_onnx
    from lipgraph import ir  # noqa: PLC0415

    g = ir.to_float64(lipgraph.trace(str(path), x[:1]))
    h, folded = pair_difference_graph(g, 2, 7)
    assert folded and h.number_of_nodes() == g.number_of_nodes()
    z = execute(g, x[:1].double())
    assert float(execute(h, x[:1].double())) == pytest.approx(float(z[0, 2] - z[0, 7]), rel=1e-12)


def test_cli_certify_onnx(digits_onnx, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, path, x, y = digits_onnx
    np.savez(tmp_path / "d.npz", x=x[:6].numpy(), y=y[:6].numpy())
    js = tmp_path / "c.json"
    assert main(["certify", str(path), "--data", str(tmp_path / "d.npz"), "--radius", "0.1", "--local",
                 "--local-steps", "3", "--clip", "0,1", "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    assert d["local"] and d["domain"] and len(d["inputs"]) == 6
    capsys.readouterr()
    assert main(["certify", str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.onnx" in err[0]


def test_onnx_with_two_outputs_is_one_clear_error(tmp_path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.fc(x)
            return z, z * 2

    path = export(Two(), torch.randn(1, 4), tmp_path / "two.onnx")
    with pytest.raises(lipgraph.LipgraphError, match="one output"):
        lipgraph.certify(str(path), torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(lipgraph.LipgraphError, match="nn.Module or the path"):
        lipgraph.certify(42, torch.randn(3, 4), torch.tensor([0, 1, 2]))  # type: ignore[arg-type]
