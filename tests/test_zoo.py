"""Every torchvision classifier: traces, the IR reproduces the output, and gets an honest report.

This test checks the frontend, the rule table's coverage and the report, not
the norm routines (those are tested against dense Jacobians in
``test_rules.py``). To keep the whole zoo within a few minutes on 2 CPU cores,
operator norms of convolutions and of large dense layers are replaced here by
a few power-method steps (uncertified estimates, the ``cheap_norms`` fixture
of ``conftest.py``), and ``method="autolip"`` is used (SeqLip and the
affine-region pass take minutes per model at these sizes and have their own
tests); everything else runs as in production. Pure CNNs must get a finite
bound; models that are not globally Lipschitz (SE blocks multiply two
input-dependent tensors, attention) get ``inf`` with the offending nodes named.
"""

from __future__ import annotations

import math

import pytest
import torch

from lipgraph import analyze, execute, ir

tvm = pytest.importorskip("torchvision.models")

#: name -> (input side, expected: "finite" or the reason words of the inf nodes)
ZOO: dict[str, tuple[int, str | tuple[str, ...]]] = {
    "alexnet": (64, "finite"),
    "vgg11": (64, "finite"),
    "resnet18": (64, "finite"),
    "resnet50": (64, "finite"),
    "resnext50_32x4d": (64, "finite"),
    "wide_resnet50_2": (64, "finite"),
    "densenet121": (64, "finite"),
    "googlenet": (64, "finite"),
    "inception_v3": (80, "finite"),
    "squeezenet1_0": (64, "finite"),
    "shufflenet_v2_x0_5": (64, "finite"),
    "mobilenet_v2": (64, "finite"),
    "mnasnet0_5": (64, "finite"),
    "mobilenet_v3_small": (64, ("elementwise product",)),  # squeeze-excitation
    "efficientnet_b0": (64, ("elementwise product",)),
    "regnet_y_400mf": (64, ("elementwise product",)),
    "convnext_tiny": (64, "finite"),  # layer norm: finite but huge (1/sqrt(eps) each)
    "vit_b_16": (224, ("attention",)),
    "swin_t": (224, ("matrix product",)),  # shifted-window attention, written out (frontends.fx_windows)
    "maxvit_t": (224, ("elementwise product", "matrix product")),  # SE blocks; attention's einsums written out
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = getattr(tvm, name)(weights=None, **kwargs).eval()
    if name == "vit_b_16":  # torchvision zero-initialises the head: the model would be constant (L = 0)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_model(name: str, cheap_norms: None) -> None:
    side, expected = ZOO[name]
    model = _build(name)
    x = torch.randn(1, 3, side, side)
    r = analyze(model, x, method="autolip", lower=False, power_iterations=2)
    g = r.graph  # the IR analyze traced (trace() is the same call)
    with torch.no_grad():
        torch.testing.assert_close(execute(g, x), model(x), rtol=1e-4, atol=1e-4)
    assert r.graph.graph["frontend"] == "torch.fx"
    assert len(r.nodes) == g.number_of_nodes() and r.to_json()
    assert "opaque" not in ir.summary(g)  # every op of the zoo has a rule (the attention ones written out)
    infs = r.not_lipschitz
    if expected == "finite":
        assert math.isfinite(r.upper) and r.upper > 0, [i["reason"] for i in infs]
        assert not infs
    else:
        assert math.isinf(r.upper)
        assert infs and all(i["reason"] for i in infs)
        reasons = " ".join(i["reason"] for i in infs)
        for word in expected:
            assert word in reasons, reasons[:500]
        # every inf node is named in its reason (so the user can find it)
        assert all(i["node"] in i["reason"] for i in infs)
    if name == "convnext_tiny":  # layer norm: finite, certified-style 1/sqrt(eps) per node
        assert any(n.op == "layer_norm" and n.local >= 300 for n in r.nodes)
