"""Op rules: one rule per canonical op kind, all registered in :data:`RULES`."""

from . import activations, linear, normalization, pooling, resampling, selections, structural  # noqa: F401 - registration
from .activations import slope_interval
from .executor import IRModule, execute
from .registry import (
    INF,
    RULES,
    LocalConstant,
    OpRule,
    Settings,
    exact,
    get_rule,
    not_lipschitz,
    register_rule,
)

__all__ = [
    "INF",
    "IRModule",
    "RULES",
    "Settings",
    "LocalConstant",
    "OpRule",
    "exact",
    "execute",
    "get_rule",
    "not_lipschitz",
    "register_rule",
    "slope_interval",
]
