"""Errors and warnings raised by convexmix.

Every error is a :class:`ConvexMixError`, itself a :class:`ValueError`, so code that
already catches ``ValueError`` keeps working. Messages say what was expected and
what was given.

>>> import convexmix as cx
>>> try:
...     cx.SimplexWeights(3, init=[0.5, 0.6, -0.1])
... except cx.ConvexMixError as err:
...     print(type(err).__name__)
InvalidProbabilitiesError
"""

from __future__ import annotations

__all__ = [
    "ConvexMixError",
    "ConvexMixTypeError",
    "ConvexMixWarning",
    "InvalidProbabilitiesError",
    "MissingExtraError",
    "ShapeError",
    "UnknownMapError",
]


class ConvexMixError(ValueError):
    """Base class of every error raised by convexmix."""


class ConvexMixTypeError(ConvexMixError, TypeError):
    """An argument of the wrong type (a float where an int is expected, a list where a
    tensor is): ``except ConvexMixError``, ``except ValueError`` and ``except TypeError``
    all catch it."""


class ShapeError(ConvexMixError):
    """A tensor has the wrong shape, size or number of dimensions."""


class UnknownMapError(ConvexMixError):
    """A simplex map name that convexmix does not know."""


class InvalidProbabilitiesError(ConvexMixError):
    """Values that should be probabilities are not: negative, or the wrong sum."""


class MissingExtraError(ConvexMixError, ImportError):
    """An optional package is not installed: the message names the
    ``pip install "convexmix[extra]"`` that brings it. Both ``except ImportError`` and
    ``except ConvexMixError`` catch it."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        ConvexMixError.__init__(self, message)
        self.msg = message
        self.name = name
        self.path = None


class ConvexMixWarning(UserWarning):
    """A value was changed to make it valid, e.g. projected onto the simplex."""
