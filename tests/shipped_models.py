"""Trained models that pip packages ship, for the tests and ``bench/bench_shipped_models.py``: where the file is
and the real inputs it is analysed on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from sklearn.datasets import load_digits

#: The wheel and the file inside it (``scripts/setup.sh`` pins the version).
PACKAGE = "rapidocr_onnxruntime"
CLS_MODEL = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
#: Input shape of the classifier (``cls_image_shape`` in the package's config.yaml).
CLS_SHAPE = (1, 3, 48, 192)
#: One grey level of an 8-bit image in the model's input units (``/ 255``, then ``/ 0.5``).
GREY_LEVEL = 2.0 / 255.0


def shipped_model_path(package: str = PACKAGE, relative: str = CLS_MODEL) -> Path:
    """The file inside the installed package, found without importing it (its ``__init__`` needs OpenCV)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: run scripts/setup.sh (it installs the wheel, no deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def text_line(first: int = 0, rotate: bool = False) -> torch.Tensor:
    """Digits ``first .. first + 3`` of sklearn's digits as one 48 x 192 line, dark ink (0) on white (255),
    bilinear 8 -> 48 upsampling, scaled to the classifier's [-1, 1]; ``rotate``: turned by 180 degrees."""
    images = load_digits().images[first:first + 4]  # (4, 8, 8), 0..16
    ink = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0
    big = torch.nn.functional.interpolate(ink, size=(48, 48), mode="bilinear", align_corners=False)
    line = torch.cat(list(big[:, 0]), dim=1).clamp(0, 1)  # (48, 192)
    pixels = 255.0 * (1.0 - line)
    x = ((pixels / 255.0 - 0.5) / 0.5).expand(3, 48, 192)[None].contiguous()
    return torch.flip(x, dims=(-2, -1)) if rotate else x


