"""What convexmix holds and runs at run time: the CPU output cache's controls and the
report behind ``convexmix info``.

Large CPU outputs of ``convex_combination`` (and its input gradients) of at least 4 MiB
come from a cache of freed blocks, like the CUDA caching allocator's: reusing a block
saves the page faults of fresh memory, which cost more than the whole memory-bound
combination on virtual machines. :func:`cache_info` says how many bytes the cache holds
and its limit, :func:`empty_cache` returns them to the OS, and :func:`set_cache_limit`
changes the limit (also as a context manager).
"""

from __future__ import annotations

import importlib.util
import threading
import types
import weakref
from typing import Any, NamedTuple

import torch

from convexmix._kernels import alloc, native
from convexmix._validation import is_int
from convexmix._version import __version__
from convexmix.errors import ConvexMixError, ConvexMixTypeError

__all__ = ["CacheInfo", "cache_info", "empty_cache", "info", "set_cache_limit"]


class CacheInfo(NamedTuple):
    """The CPU output cache: ``bytes`` held now (freed outputs kept for reuse) and its
    ``limit`` in bytes (0: the cache is off)."""

    bytes: int
    limit: int

    @property
    def held(self) -> int:
        """The same as ``bytes``."""
        return self.bytes


def cache_info() -> CacheInfo:
    """The bytes the CPU output cache holds and its limit.

    Returns:
        A :class:`CacheInfo` ``(bytes, limit)``; ``bytes`` is 0 without the native
        kernels, which own the cache.

    Example:
        >>> import convexmix as cx
        >>> held, limit = cx.cache_info()
        >>> 0 <= held <= limit or limit == 0
        True
    """
    limit = alloc.cache_limit()
    return CacheInfo(alloc.cached_bytes(), limit)


def empty_cache() -> None:
    """Returns the CPU output cache's blocks to the OS.

    The blocks are unmapped at once, so the process's resident memory drops by
    ``cache_info().bytes``; then free heap memory is returned too (``malloc_trim`` on
    glibc). Outputs still in use are not touched, and the limit stays: later outputs are
    cached again. The CPU counterpart of ``torch.cuda.empty_cache()``.

    Example:
        >>> import convexmix as cx
        >>> cx.empty_cache()
        >>> cx.cache_info().bytes
        0
    """
    alloc.empty_cache()


class _Call:
    """One call of :class:`set_cache_limit` still in force (see there)."""

    __slots__ = ("block", "owner", "value")

    def __init__(self, value: int, owner: set_cache_limit) -> None:
        self.value = value
        self.owner = weakref.ref(owner)
        self.block = False  # entered as a with block: ends with the block


_calls_lock = threading.Lock()
#: The calls in force, oldest first: the last one's limit is the limit.
_calls: list[_Call] = []
#: [the limit when no call is in force, the limit these calls last set]; a limit set
#: past them (``alloc.set_limit``, a changed environment) starts afresh from it.
_floor: list[int] = []


def _compact() -> None:
    """A plain call (gone, never entered as a block) stays in force for good: the calls
    before it can no longer matter, and its limit becomes the floor."""
    current = alloc.cache_limit()
    if not _floor or current != _floor[1]:  # the first call, or a limit set past them
        _floor[:] = [current, current]
        _calls.clear()
        return
    for i in range(len(_calls) - 1, -1, -1):
        call = _calls[i]
        if not call.block and call.owner() is None:
            _floor[0] = call.value
            del _calls[: i + 1]
            return


def _apply(limit: int) -> int:
    """Sets the limit (under ``_calls_lock``); returns the one before."""
    previous = alloc.set_limit(limit)
    _floor[1] = limit
    return previous


class set_cache_limit:  # noqa: N801 - a function to the user, like torch.set_grad_enabled
    """Sets the CPU output cache's limit; as a context manager, only inside the block.

    Cached blocks beyond a lower limit go back to the OS at once. The limit starts as
    ``CONVEXMIX_OUTPUT_CACHE_MB`` (MiB) or the default (1 GiB, or a sixteenth of the
    machine's memory where that is less).

    The limit is process-wide, and threads may nest blocks in any order: the limit in
    force is the one of the latest call still in force, whichever thread made it. A
    plain call stays in force; a ``with`` block's call ends with its block. So when a
    block ends, the limit goes back to the latest call still in force (another thread's
    block that began later, a plain call made during the block) or, with none, to the
    limit before the first of them; two threads' overlapping blocks leave the limit
    they found, whatever order they end in.

    Args:
        limit: bytes (an int >= 0; 0 turns the cache off and empties it), or None for the
            default.

    Raises:
        ConvexMixError: ``limit`` is not a non-negative int or None.

    Example:
        >>> import convexmix as cx
        >>> with cx.set_cache_limit(0):  # no cache inside the block
        ...     cx.cache_info().limit
        0
        >>> previous = cx.set_cache_limit(256 << 20).previous  # from now on
        >>> cx.cache_info().limit
        268435456
        >>> _ = cx.set_cache_limit(previous)
    """

    def __init__(self, limit: int | None) -> None:
        if limit is None:
            limit = alloc.default_limit()
        if not is_int(limit) or limit < 0:
            raise (ConvexMixError if is_int(limit) else ConvexMixTypeError)(
                f"set_cache_limit expects a number of bytes >= 0 (an int) or None, got {limit!r}"
            )
        with _calls_lock:
            _compact()
            self._call = _Call(int(limit), self)
            _calls.append(self._call)
            #: The limit before this call.
            self.previous = _apply(int(limit))

    def __enter__(self) -> set_cache_limit:
        self._call.block = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        with _calls_lock:
            if self._call in _calls:
                _calls.remove(self._call)
                _apply(_calls[-1].value if _calls else _floor[0])


def info() -> dict[str, Any]:
    """What runs here, for bug reports (``convexmix info --json``).

    Returns:
        ``version``, ``torch`` (versions), ``native_cpu`` (the native CPU kernels are
        loaded), ``native_isa`` (their instruction set, or None), ``triton`` (Triton
        imports), ``cuda`` (torch sees a CUDA device), ``output_cache_bytes`` and
        ``output_cache_limit`` (the CPU output cache, bytes).
    """
    held, limit = cache_info()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "native_cpu": native.library() is not None,
        "native_isa": native.isa(),
        "triton": importlib.util.find_spec("triton") is not None,
        "cuda": bool(torch.cuda.is_available()),
        "output_cache_bytes": held,
        "output_cache_limit": limit,
    }
