"""Certified radii from global bounds (lipgraph.certify): soundness against a PGD attack and dense Jacobians."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import lipgraph
from lipgraph.certify import PairDiff, attack_radius, certify
from lipgraph.cli import main
from tests.conftest import as_double, jacobian_norm


def _train(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    return model.eval(), x[1400:], y[1400:]


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return _train()


@pytest.fixture(scope="module")
def cert_l2(digits):  # type: ignore[no-untyped-def]
    model, x, y = digits
    return certify(model, x[:40], y[:40], radius=[0.05, 0.1, 0.2, 0.4], attack=True, attack_steps=20)


def test_trained_and_certified(cert_l2) -> None:  # type: ignore[no-untyped-def]
    assert cert_l2.clean_accuracy > 0.85
    assert cert_l2.certified and cert_l2.whole_certified
    assert cert_l2.certified_accuracy(0.05) > 0.5  # the certificates are not vacuous
    assert cert_l2.certified_accuracy(0.0) == cert_l2.clean_accuracy
    d = json.loads(cert_l2.to_json())
    assert d["schema"] == "lipgraph.certificate/1" and len(d["inputs"]) == 40
    assert [r["radius"] for r in d["certified_accuracy"]] == [0.05, 0.1, 0.2, 0.4]
    assert "pairwise" in cert_l2.table()


def test_attack_never_inside_certified_radius(cert_l2, digits) -> None:  # type: ignore[no-untyped-def]
    model = digits[0]
    correct = [c for c in cert_l2.inputs if c.correct]
    assert correct
    for c in correct:
        assert c.attack_radius is not None and math.isfinite(c.attack_radius), "the attack must find something"
        assert c.attack_radius >= c.radius * (1 - 1e-6), (c.index, c.radius, c.attack_radius)
        assert c.gap is not None and c.gap >= -1e-9
    # the check has teeth: a radius 4x the attack radius of the first input is contradicted by the attack found
    c = correct[0]
    x = digits[1][c.index]
    r = attack_radius(model, x, c.label, steps=20, seed=c.index, start=max(4 * c.radius, 1e-3))
    assert r < 4 * c.attack_radius and r == pytest.approx(c.attack_radius)  # deterministic in the seed
    # and the attack is not vacuous: it is within a small factor of the certificate for most inputs
    assert np.median([c.attack_radius / c.radius for c in correct]) < 5


def test_attack_linf(digits) -> None:  # type: ignore[no-untyped-def]
    model, x, y = digits
    c2 = certify(model, x[:15], y[:15])
    ci = certify(model, x[:15], y[:15], norm="linf", attack=True, attack_steps=20)
    for a, b in zip(c2.inputs, ci.inputs, strict=True):
        assert b.radius == pytest.approx(a.radius / 8.0)  # sqrt(64)
        if b.correct:
            assert b.attack_radius is not None and b.attack_radius >= b.radius * (1 - 1e-6)


def test_pair_constants_above_jacobian(cert_l2, digits) -> None:  # type: ignore[no-untyped-def]
    model, x, _ = digits
    m64 = as_double(model)
    gen = torch.Generator().manual_seed(1)
    points = [x[i] for i in range(5)] + [torch.randn(64, generator=gen) for _ in range(5)]
    assert len(cert_l2.pairs) >= 9
    for (yy, j), pc in cert_l2.pairs.items():
        pd = PairDiff(m64, yy, j)
        assert pd.folded
        for p in points:
            jn = jacobian_norm(pd, p.double().unsqueeze(0))
            assert jn <= pc.value * (1 + 1e-9) and jn <= pc.pair_value * (1 + 1e-9), ((yy, j), jn, pc)
        w1, w2 = m64[0].weight.detach(), m64[2].weight.detach()
        # the folded head sees ||w_y - w_j||, not sqrt(2) ||W||
        assert pc.pair_value <= float(torch.linalg.matrix_norm(w1, 2) * (w2[yy] - w2[j]).norm()) * 1.0001


def test_pairwise_at_least_tsuzuku_with_linear_head(digits) -> None:  # type: ignore[no-untyped-def]
    model, x, y = digits
    cert = certify(model, x[:40], y[:40], method="autolip")  # same method for the pairs and the whole network
    for pc in cert.pairs.values():
        assert pc.pair_value <= math.sqrt(2) * cert.whole_upper * (1 + 1e-9)
    strict = 0
    for c in cert.inputs:
        if c.correct:
            assert c.radius >= c.tsuzuku_radius * (1 - 1e-9)
            strict += c.radius > 1.05 * c.tsuzuku_radius
    assert strict >= 0.5 * sum(c.correct for c in cert.inputs)


def test_generic_pairdiff_matches_model() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 4)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(z)))

    net = Net().eval()
    pd = PairDiff(net, 1, 3)
    assert not pd.folded
    z = torch.randn(3, 6)
    assert torch.allclose(pd(z)[:, 0], net(z)[:, 1] - net(z)[:, 3])
    cert = certify(net, z, net(z).argmax(1))
    assert cert.certified and all(c.radius > 0 for c in cert.inputs)
    for (a, b), pc in cert.pairs.items():
        for i in range(3):
            assert jacobian_norm(PairDiff(as_double(net), a, b), z[i:i + 1].double()) <= pc.value * (1 + 1e-9)


def test_uncertified_constants_give_no_certified_accuracy(digits) -> None:  # type: ignore[no-untyped-def]
    model, x, y = digits
    # a float is an unverified assumption; a certified SeqLip whole-network bound (which ignores it) is used instead
    assert certify(model, x[:10], y[:10], constants={"ReLU": 1.0}).certified
    cert = certify(model, x[:10], y[:10], constants={"ReLU": 1.0}, method="autolip")
    assert not cert.certified
    assert cert.certified_accuracy(0.0) == 0.0
    assert any(c.correct and c.radius > 0 and not c.radius_certified for c in cert.inputs)
    assert "estimates" in cert.table()


def test_misclassified_radius_zero(digits) -> None:  # type: ignore[no-untyped-def]
    model, x, y = digits
    wrong = (model(x[:5]).argmax(1) + 1) % 10
    cert = certify(model, x[:5], wrong)
    assert all(not c.correct and c.radius == 0 for c in cert.inputs)
    with pytest.raises(lipgraph.LipgraphError):
        certify(model, x[:5], y[:4])


def test_cli_certify(digits, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model, x, y = digits
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "net.py").write_text(
        "import torch, torch.nn as nn\n"
        "def Net():\n"
        "    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
        f"    m.load_state_dict(torch.load({str(tmp_path / 'w.pt')!r}, weights_only=True))\n"
        "    return m\n"
    )
    np.savez(tmp_path / "d.npz", x=x[:20].numpy(), y=y[:20].numpy())
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    rc = main(["certify", f"{tmp_path / 'net.py'}:Net", "--data", str(tmp_path / "d.npz"),
               "--radius", "0.1", "0.2", "--json", str(js), "--plot", str(png), "--attack"])
    assert rc == 0
    d = json.loads(js.read_text())
    assert d["certified"] and [r["radius"] for r in d["certified_accuracy"]] == [0.1, 0.2]
    assert png.read_bytes()[:4] == b"\x89PNG"
    torch.save({"x": x[:5], "y": y[:5]}, tmp_path / "d.pt")
    svg = tmp_path / "c.svg"
    assert main(["certify", f"{tmp_path / 'net.py'}:Net", "--data", str(tmp_path / "d.pt"), "--plot", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:500]
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", x=x[:3].numpy())
    assert main(["certify", f"{tmp_path / 'net.py'}:Net", "--data", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x and y" in err[0]
    assert main(["certify", f"{tmp_path / 'net.py'}:Net", "--data", str(tmp_path / "missing.npz")]) == 2


def test_certify_and_the_attack_leave_the_models_modes_as_they_were(tmp_path) -> None:
    """A model in training mode, with one submodule in eval mode, comes back exactly so; a missing ONNX path is
    one clear error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    x = torch.randn(6, 4)
    y = torch.zeros(6, dtype=torch.long)
    lipgraph.certify(model, x, y, attack=True, attack_steps=3, attack_bisections=2)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(lipgraph.LipgraphError, match="model.onnx"):
        lipgraph.certify(str(tmp_path / "model.onnx"), x, y)
