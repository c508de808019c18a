"""lipgraph: certified upper bounds on the Lipschitz constant of PyTorch and ONNX models, node by node."""

from . import ops  # noqa: F401 - registers the op rules
from .api import analyze, register_op, trace
from .bounds.local import UserConstant
from .certify import certify
from .errors import InputShapeError, LipgraphError, ModelLoadError, TraceError
from .ir import execute
from .ops import LocalConstant, register_rule
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "InputShapeError",
    "LipgraphError",
    "LocalConstant",
    "ModelLoadError",
    "Report",
    "TraceError",
    "UserConstant",
    "analyze",
    "certify",
    "execute",
    "register_op",
    "register_rule",
    "trace",
]
