"""Every error and warning tpcompile raises, in one place.

tpcompile's promise is "right or loud": when it cannot make a model tensor-parallel
correctly it either keeps the part replicated and says so (``TPWarning``) or stops with one
of these errors, whose message names the construct, the source line and the fix.
"""
from __future__ import annotations


class TPWarning(UserWarning):
    """A part of the model stays replicated or needs an extra collective; the answer is still right."""


class TPShardingError(ValueError):
    """A size cannot be split over the TP group; the message names the parameter and the fix."""


class TPEagerFallbackError(RuntimeError):
    """Code Dynamo ran eagerly did what cannot be made right there: wrote into a parameter in place
    (the write would go to a gathered copy), or reached a parameter other than as a module attribute
    (a memory-free stand-in). Eager code that reads parameters as attributes is right, slower
    (``tpcompile.eager``), with a ``TPWarning``."""


class TPInputMismatchError(RuntimeError):
    """The TP ranks were handed different inputs (e.g. a data loader seeded per rank)."""


class TPCheckpointError(RuntimeError):
    """A checkpoint does not fit the model (names, shapes, files); nothing was loaded."""


class TPParameterError(RuntimeError):
    """A parameter is not what the compiled program was planned for (replaced, or wrapped by a tool
    that turns tensor-parallel DTensors back into plain tensors); the message says what to do."""


class TPDivergenceError(RuntimeError):
    """Parameters every TP rank should hold identically (replicated ones) differ across the group:
    the ranks no longer run one model. The message names the first one and the usual causes."""


__all__ = ["TPWarning", "TPShardingError", "TPEagerFallbackError", "TPInputMismatchError", "TPCheckpointError",
           "TPParameterError", "TPDivergenceError"]
