"""Large CPU outputs: reused from a cache, else on transparent huge pages (Linux).

A fresh tensor's memory comes from the kernel one page fault at a time, zeroed, and on
virtual machines each fault is expensive: writing a fresh large tensor costs several
times what writing memory the process already has does, and for a two-input combination
that is most of the time (figures in docs/benchmarks.md).

So :func:`empty` hands out large outputs from the cache of ``pool.c``: when the last
tensor that shares an output's storage dies, torch gives the block back to the cache
(through DLPack's deleter) and the next output of about that size reuses it, as the CUDA
caching allocator does. At most the cache's limit stays cached (``set_limit``, first read
from ``CONVEXMIX_OUTPUT_CACHE_MB``; see ``DEFAULT_LIMIT``; ``0`` turns the cache off), the
least recently freed blocks going back to the OS first; :func:`empty_cache` drops them
all. Without the native library, or with the cache off, :func:`empty` is ``torch.empty``
with ``madvise(MADV_HUGEPAGE)`` on the tensor's 2 MiB aligned interior: 512 times fewer
faults. The advice is only that: where
the kernel has THP off, or anywhere but Linux, that is plain ``torch.empty``.

Tensors from the cache behave like any other, except that their storage cannot grow
(``resize_`` to more elements raises): outputs are returned at their final size.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import warnings

import torch
from torch.utils.dlpack import from_dlpack

from convexmix._kernels import native
from convexmix.errors import ConvexMixWarning

__all__: list[str] = []

#: Tensors at least this large get the cache or the advice (smaller ones gain nothing).
MIN_BYTES = 4 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        _madvise = None

_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule.restype = ctypes.py_object

ENV = "CONVEXMIX_OUTPUT_CACHE_MB"
#: The default limit: 1 GiB, or a sixteenth of the machine's memory where that is less.
#: A training step of the 16M-element float32 case with K = 8 inputs (output and eight
#: gradients, 9 blocks of 62 MiB) runs entirely from the cache under it (docs/guide.md has the
#: measurements).
DEFAULT_LIMIT = 1 << 30

_limit: list[int] = []  # the cache's limit in bytes, once read from the environment
_limit_lock = threading.Lock()


def _after_fork_in_child() -> None:  # another thread may have held the lock at the fork
    global _limit_lock
    _limit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_malloc_trim = None
if sys.platform.startswith("linux"):
    try:
        _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
        _malloc_trim.argtypes = [ctypes.c_size_t]
        _malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - musl and others
        _malloc_trim = None


def default_limit() -> int:
    """``DEFAULT_LIMIT``, or a sixteenth of the machine's memory where that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return DEFAULT_LIMIT
    return min(memory // 16, DEFAULT_LIMIT)


def _from_env() -> int:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return default_limit()
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib >= 0):
        default = default_limit()
        warnings.warn(
            f"{ENV}={text!r} is not a size in MiB (a number >= 0; 0 turns the output cache "
            f"off); using the default, {default >> 20} MiB.",
            ConvexMixWarning,
            stacklevel=4,
        )
        return default
    return int(mib * (1 << 20))


def cache_limit() -> int:
    """The output cache's limit in bytes (0: off)."""
    if not _limit:
        with _limit_lock:
            if not _limit:
                limit = _from_env()
                lib = native.library()
                if lib is not None:
                    lib.cx_pool_set_cap(limit)
                _limit.append(limit)
    return _limit[0]


def set_limit(nbytes: int) -> int:
    """Sets the limit (bytes; 0 turns the cache off and empties it); returns the old one.
    Blocks beyond a lower limit go back to the OS at once."""
    previous = cache_limit()
    with _limit_lock:
        _limit[0] = nbytes
        lib = native.library()
        if lib is not None:
            lib.cx_pool_set_cap(nbytes)
    return previous


def cached_bytes() -> int:
    """Bytes of freed outputs the cache holds now."""
    lib = native.library()
    return int(lib.cx_pool_cached()) if lib is not None else 0


def empty_cache() -> None:
    """Returns every cached block to the OS (the limit stays), then free heap memory
    (``malloc_trim``, glibc)."""
    lib = native.library()
    if lib is not None:
        lib.cx_pool_empty()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _from_cache(nbytes: int) -> torch.Tensor | None:
    lib = native.library()
    if lib is None or cache_limit() == 0:
        return None
    managed = lib.cx_pool_acquire(nbytes)
    if not managed:
        return None
    try:
        return from_dlpack(_capsule(managed, b"dltensor", None))
    except Exception:  # pragma: no cover - torch refused the capsule: give it back
        lib.cx_pool_discard(managed)
        return None


def empty(
    shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, contiguous; large CPU ones from
    the output cache, else on huge pages."""
    if device is not None and device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= MIN_BYTES:
        block = _from_cache(nbytes)
        if block is not None:
            return block.view(dtype).view(shape)
    out = torch.empty(shape, dtype=dtype)
    if _madvise is not None and nbytes >= MIN_BYTES:
        start = out.data_ptr()
        lo = -(-start // _HUGE) * _HUGE
        hi = (start + nbytes) // _HUGE * _HUGE
        if hi > lo:
            _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice: a failure changes nothing
    return out
