"""The models that ship inside the onnx wheel (``onnx/backend/test/data``) load and analyze, or fail with
a clear message.

Small models (``pytorch-converted``, ``pytorch-operator``, ``simple``) are checked against the outputs
stored next to them; the ``light`` CNNs (224x224 inputs) against onnxruntime. Three light models load
by default; loading the rest and analyzing every light model (25 s to minutes each on a small machine:
certified norms of many 224x224 convolutions, 4096x25088 dense layers) run with ``LIPGRAPH_SLOW=1``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import lipgraph
from lipgraph import execute, ir
from lipgraph.errors import ModelLoadError

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SLOW = os.environ.get("LIPGRAPH_SLOW") == "1"

SMALL = sorted(p.parent for d in ("pytorch-converted", "pytorch-operator", "simple")
               for p in (DATA / d).glob("*/model.onnx"))
LIGHT = sorted((DATA / "light").glob("*.onnx"))
LIGHT_LOAD = {"light_squeezenet", "light_inception_v1", "light_bvlc_alexnet"}
LIGHT_ANALYZE: set[str] = set()  # analysis at 224x224 takes 25 s to minutes per model

#: Models outside lipgraph's scope: they must fail with a ModelLoadError whose message contains this.
EXPECTED_ERRORS = {
    "test_gradient_of_add": "ai.onnx.preview.training.Gradient",
    "test_gradient_of_add_and_mul": "ai.onnx.preview.training.Gradient",
    "test_sequence_model1": "(SequenceInsert)",
    "test_sequence_model2": "(SequenceErase)",
    "test_sequence_model3": "(SequenceErase)",
    "test_sequence_model6": "(SequenceLength)",
    "test_sequence_model8": "(SequenceLength)",
    **{p.name: "holds strings" for p in SMALL if p.name.startswith("test_strnorm")},
}

#: Ops with no rule (or not Lipschitz at all), so an honest inf is the right answer.
INF_OK = {"Exp", "Max", "Min", "Pow", "Sqrt", "Gather", "Expand", "Shrink", "Sign", "SequenceConstruct",
          "SplitToSequence", "SequenceAt", "ConcatFromSequence"}


def _tensor(p: Path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(str(p)))


@pytest.mark.parametrize("model_dir", SMALL, ids=[f"{p.parent.name}/{p.name}" for p in SMALL])
def test_backend_model(model_dir: Path) -> None:
    path = model_dir / "model.onnx"
    data = model_dir / "test_data_set_0"
    if model_dir.name in EXPECTED_ERRORS:
        arrays = [_tensor(p) for p in sorted(data.glob("input_*.pb"))]
        xs = tuple(torch.from_numpy(a.copy()) for a in arrays) if all(a.dtype != object for a in arrays) else None
        with pytest.raises(ModelLoadError) as info:
            lipgraph.trace(str(path), xs)
        assert EXPECTED_ERRORS[model_dir.name] in str(info.value)
        return
    xs = tuple(torch.from_numpy(_tensor(p).copy()) for p in sorted(data.glob("input_*.pb")))
    expected = [_tensor(p) for p in sorted(data.glob("output_*.pb"))]
    g = lipgraph.trace(str(path), xs)
    out = execute(g, *xs)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(expected)
    for a, b in zip(outs, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-3, atol=1e-5)
    r = lipgraph.analyze(str(path), xs, lower=False, method="autolip", power_iterations=3)
    value = r.bounds["autolip"].value
    assert value >= 0
    if math.isinf(value):  # every inf is explained, naming its node
        assert r.not_lipschitz
        for bad in r.not_lipschitz:
            assert bad["node"] in bad["reason"] or any(op in bad["reason"] for op in INF_OK)


def _light_graph(path: Path):
    g = lipgraph.trace(str(path))
    x = torch.randn(ir.node(g, g.graph["inputs"][0]).out_shape)
    return g, x


@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_model_loads_and_matches_onnxruntime(path: Path) -> None:
    if path.stem not in LIGHT_LOAD and not SLOW:
        pytest.skip("set LIPGRAPH_SLOW=1 for every light model")
    g, x = _light_graph(path)
    ours = execute(g, x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (theirs,) = sess.run(None, {g.graph["inputs"][0]: x.numpy()})
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-3, atol=1e-5)
    opaque = {n.origin for n in ir.nodes(g) if n.op == "opaque"}
    assert opaque <= {"ONNX LRN"}, opaque  # local response normalisation has no rule: an honest inf


@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_model_analyzes(path: Path) -> None:
    if path.stem not in LIGHT_ANALYZE and not SLOW:
        pytest.skip("set LIPGRAPH_SLOW=1 to analyze every light model (minutes)")
    r = lipgraph.analyze(str(path), lower=False, method="autolip", power_iterations=1)
    value = r.bounds["autolip"].value
    lrn = [b for b in r.not_lipschitz if "LRN" in b["reason"]]
    assert value > 0
    assert math.isfinite(value) or (lrn and len(lrn) == len(r.not_lipschitz)), r.not_lipschitz
