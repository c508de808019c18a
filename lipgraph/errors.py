"""Errors that the CLI turns into one clear line (no traceback)."""


class LipgraphError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class TraceError(LipgraphError):
    """The model could not be traced into the IR."""


class ModelLoadError(LipgraphError):
    """A model spec or file could not be loaded."""


class InputShapeError(LipgraphError):
    """The example input does not fit the model."""


class InconsistentBoundsError(LipgraphError):
    """An attained value exceeds a certified upper bound: a rule or a user-certified constant is wrong. Raised
    instead of returning a report that contradicts itself (``lower <= upper`` is checked on every analysis)."""
