"""lipgraph: certified upper bounds on the Lipschitz constant of PyTorch and ONNX models, node by node.

The package imports lazily: ``import lipgraph`` loads no torch, onnx or networkx (so the
command line answers bad input at once); each public name below is imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_LAZY = {
    "InconsistentBoundsError": "errors",
    "InputShapeError": "errors",
    "LipgraphError": "errors",
    "ModelLoadError": "errors",
    "TraceError": "errors",
    "LocalConstant": "ops",
    "register_rule": "ops",
    "Report": "report",
    "UserConstant": "bounds.local",
    "analyze": "api",
    "register_op": "api",
    "trace": "api",
    "certify": "certify",
    "execute": "ops",
}

__all__ = [
    "InconsistentBoundsError",
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from .api import analyze, register_op, trace
    from .bounds.local import UserConstant
    from .certify import certify
    from .errors import InconsistentBoundsError, InputShapeError, LipgraphError, ModelLoadError, TraceError
    from .ops import LocalConstant, execute, register_rule
    from .report import Report


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``lipgraph.ir``) on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    where = _LAZY.get(name)
    if where is None:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = module
        return module
    if where != "errors":
        importlib.import_module(".ops", __name__)  # registers the op rules, as the eager import did
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``lipgraph.certify`` the function when the submodule of that name is imported.

    Importing ``lipgraph.certify`` (e.g. ``from lipgraph.certify import PairDiff``) sets the
    package attribute to the submodule; the eager ``from .certify import certify`` used to win.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
