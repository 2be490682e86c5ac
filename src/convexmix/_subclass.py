"""Picklable per-instance subclasses of ``nn.Module`` classes (private).

``simplex_`` and ``LearnedMerge`` turn some attributes of a module into properties by
switching the instance to a subclass made on the fly, ``<Kind><Base>``. Such a class
cannot be pickled by reference, so every instance pickles as a call that rebuilds it
from ``(kind, base class, property names)`` and then sets the instance's state.

Each kind registers the function that builds its class namespace; both kinds are
registered when ``convexmix`` is imported, which unpickling does first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__: list[str] = []

Namespace = Callable[[tuple[str, ...]], dict[str, Any]]
_KINDS: dict[str, Namespace] = {}
_CLASSES: dict[tuple[str, type[nn.Module], tuple[str, ...]], type[nn.Module]] = {}


def register_kind(kind: str, namespace: Namespace) -> None:
    """Declare a kind: ``namespace(names)`` gives the class body (properties and methods)."""
    _KINDS[kind] = namespace


def base_class(module: nn.Module) -> type[nn.Module]:
    """The class the instance had before it was switched to a made-up subclass."""
    base: type[nn.Module] = getattr(type(module), "_cx_base", type(module))
    return base


def subclass(kind: str, base: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """The subclass of ``base`` of this kind with these property names (made once)."""
    key = (kind, base, names)
    if key not in _CLASSES:
        namespace = _KINDS[kind](names)
        namespace.update(
            __reduce_ex__=_reduce_ex,
            _cx_kind=kind,
            _cx_base=base,
            _cx_names=names,
            __module__=__name__,
            __doc__=base.__doc__,
        )
        _CLASSES[key] = type(f"{kind}{base.__name__}", (base,), namespace)
    return _CLASSES[key]


def _reduce_ex(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    cls: Any = type(self)
    state = self.__getstate__()  # type: ignore[no-untyped-call]
    return (_rebuild, (cls._cx_kind, cls._cx_base, cls._cx_names), state)


def _rebuild(kind: str, base: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    """Unpickling: an empty instance of the subclass; pickle then sets its state."""
    module: nn.Module = base.__new__(subclass(kind, base, names))
    return module
