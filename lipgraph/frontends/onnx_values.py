"""The values the ONNX frontend passes between its builder (:mod:`lipgraph.frontends.onnx`) and its op table
(:mod:`lipgraph.frontends.onnx_ops`), in their own module so that the two do not import each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Value:
    """An ONNX value during translation: ``node`` is the IR node computing it
    (``None`` for a constant); ``value`` is its value on the example input."""

    node: str | None
    value: Any

    @property
    def is_var(self) -> bool:
        return self.node is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return self.value.ndim


class Unsupported(Exception):  # noqa: N818 - internal signal, not an error for users
    """Raised by a mapping that cannot express a node: the node becomes ``opaque``."""
