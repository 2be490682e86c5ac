"""The ground of the native CPU kernels: load the library, bind its functions, run a call
over threads. Every kernel family sits in a module above this one and imports it
(nothing here imports them): :mod:`.cpu` (``combine.c``, ``convex_combination``'s
kernels), :mod:`.alloc` (``pool.c``, the cache of large outputs), :mod:`.capped`
(``capped.c``), :mod:`.rows` (``rows.c``), :mod:`.gather` (``gather.c``) and
:mod:`.checks` (``checks.c``).

All are compiled at install time by ``setup.py``, once per instruction set, into
``libconvexmix-<isa>.so`` next to this file; nothing is compiled, and nothing written, at
run time. :func:`library` loads the baseline build, asks it which builds this CPU (and its
OS) can run, and loads the widest of those; ``CONVEXMIX_ISA`` (``baseline``, ``widest``
or a build's name) overrides the choice for tests and bug hunts, but never loads a build
the CPU cannot run. Where the libraries are missing (no compiler at install), older than
their sources, or turned off with ``CONVEXMIX_NATIVE=0``, :func:`library` returns None
and the caller runs its ATen code (slower, same results up to rounding), with one
warning unless they were turned off.

The library is resolved when this module is imported (under a millisecond), so that a
first native call inside ``torch.compile`` only reads it: once loaded, :func:`library` is
a lock-free dictionary read that Dynamo traces (a lock would make it raise
``Unsupported``).

Calls release the GIL, so :func:`run` spreads one call's ranges (from :func:`split`, the
one range splitter) over the calling thread and a shared pool, created under a lock and
again in a forked child.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convexmix.errors import ConvexMixWarning

__all__: list[str] = []

HERE = Path(__file__).parent
SOURCES = [
    HERE / "combine.c",
    HERE / "pool.c",
    HERE / "capped.c",
    HERE / "gather.c",
    HERE / "checks.c",
    HERE / "rows.c",
]
#: The builds setup.py makes on this platform, baseline first (the same names as there).
ISAS: list[str] = (
    ["x86-64", "avx2", "avx512"]
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    else ["aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "generic"]
)
#: The kernels' name suffix per dtype.
SUFFIX = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}

Kernel = Callable[..., Any]

_lock = threading.Lock()
_state: dict[str, object] = {}
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child has the pool object but none of its threads, and a lock another thread
    # may have held at the fork: start both afresh.
    global _pool, _pool_lock, _lock
    _pool = None
    _pool_lock = threading.Lock()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lib_path(isa: str) -> Path:
    """Where setup.py puts the build for ``isa``."""
    return HERE / f"libconvexmix-{isa}.so"


def _source_hash() -> str | None:
    """The hash setup.py gives the sources (None where they are not installed)."""
    digest = hashlib.sha256()
    try:
        for path in SOURCES:
            digest.update(path.read_bytes())
            digest.update(b"\0")
    except OSError:
        return None
    return digest.hexdigest()[:16]


def _requested() -> str:
    """``CONVEXMIX_ISA``: "widest" (the default), "baseline" or a build's name."""
    value = os.environ.get("CONVEXMIX_ISA", "").strip().lower()
    if not value or value in ("widest", "baseline", *ISAS):
        return value or "widest"
    warnings.warn(
        f"CONVEXMIX_ISA={value!r} is not one of 'widest', 'baseline' or "
        f"{', '.join(map(repr, ISAS))}; using the widest build this CPU supports.",
        ConvexMixWarning,
        stacklevel=5,
    )
    return "widest"


def _native_setting() -> bool:
    value = os.environ.get("CONVEXMIX_NATIVE", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on", ""):
        warnings.warn(
            f"CONVEXMIX_NATIVE={value!r} is not 0 or 1; the native kernels stay on.",
            ConvexMixWarning,
            stacklevel=5,
        )
    return True


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, its ISA) or (None, why not)."""
    if sys.platform == "win32":
        return None, "the native kernels are not built on Windows"
    base_path = lib_path(ISAS[0])
    if not base_path.exists():
        return None, (
            "convexmix was installed without its native CPU kernels (no working C compiler "
            "at install time)"
        )
    try:
        base = ctypes.CDLL(str(base_path))
    except OSError as err:
        return None, f"the native CPU kernels did not load ({err})"
    base.cx_source_hash.restype = ctypes.c_char_p
    base.cx_isa_supported.argtypes = [ctypes.c_char_p]
    base.cx_isa_supported.restype = ctypes.c_int
    expected = _source_hash()
    if expected is not None and base.cx_source_hash().decode() != expected:
        return None, (
            "convexmix's native CPU kernels are older than their sources (rebuild them: "
            "pip install -e . or reinstall)"
        )
    supported = [isa for isa in ISAS if base.cx_isa_supported(isa.encode())]
    requested = _requested()
    if requested == "baseline":
        choice = ISAS[0]
    elif requested == "widest":
        choice = supported[-1]
    elif requested in supported:
        choice = requested
    else:
        warnings.warn(
            f"CONVEXMIX_ISA={requested!r}: this CPU cannot run that build; using "
            f"{supported[-1]!r}, the widest it supports.",
            ConvexMixWarning,
            stacklevel=5,
        )
        choice = supported[-1]
    # the widest supported build that is installed (an old compiler may have skipped one)
    for isa in reversed(supported[: supported.index(choice) + 1]):
        if isa == ISAS[0]:
            return _bind(base), isa
        try:
            return _bind(ctypes.CDLL(str(lib_path(isa)))), isa
        except OSError:
            continue
    return _bind(base), ISAS[0]  # pragma: no cover - the loop ends at the baseline


_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
#: (name, argument types, return type) of every function; ``{t}`` stands for each suffix
#: the family is built for (a build may lack f16: a compiler without _Float16).
_SIGNATURES: list[tuple[str, tuple[str, ...], list[Any], Any]] = [
    ("cx_fwd_{t}", ("f64", "f32", "bf16", "f16"), [_P, _P, _I64, _P, _I64, _I64, _I32], None),
    (
        "cx_bwd_{t}",
        ("f64", "f32", "bf16", "f16"),
        [_P, _P, _P, _I64, _P, _P, _I64, _I64, _I32],
        _I32,
    ),
    ("cx_pool_acquire", ("",), [_I64], _P),
    ("cx_pool_set_cap", ("",), [_I64], None),
    ("cx_pool_discard", ("",), [_P], None),
    ("cx_pool_cached", ("",), [], _I64),
    ("cx_pool_empty", ("",), [], None),
    ("cx_isa", ("",), [], ctypes.c_char_p),
    (
        "cx_capped_{t}",
        ("f32", "f64"),
        [_P, _P, _I64, _P, _I64, _I64, _P, _I64, _I64, _F64, _I64, _I64],
        _I32,
    ),
    (
        "cx_true_class_{t}",
        ("f32", "f64"),
        [_P, _P, _I64, _I64, _P, _I64, _I64, _F64, _I32, _F64],
        _I64,
    ),
    ("cx_first_nan_{t}", ("f32", "f64"), [_P, _I64, _I64, _I64], _I32),
    ("cx_rows_fwd_{t}", ("f32", "f64"), [_P, _P, _I64, _I64, _F64, _I32, _I64, _I64], _I32),
    ("cx_rows_bwd_{t}", ("f32", "f64"), [_P, _P, _P, _I64, _I64, _I32, _I64, _I64], None),
]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, suffixes, argtypes, restype in _SIGNATURES:
        for suffix in suffixes:
            fn = getattr(lib, name.format(t=suffix), None)
            if fn is not None:
                fn.argtypes, fn.restype = argtypes, restype
    return lib


def kernel(name: str) -> Kernel | None:
    """The bound function ``name`` (e.g. ``cx_fwd_f32``), or None without the library or
    where this build lacks it."""
    lib = library()
    return getattr(lib, name, None) if lib is not None else None


_UNSET = object()


def library() -> ctypes.CDLL | None:
    """The loaded kernels; None where there are none. Loaded once, under a lock (at this
    module's import); after that a lock-free read that ``torch.compile`` can trace."""
    lib = _state.get("lib", _UNSET)
    if lib is _UNSET:
        lib = _resolve()
    return lib  # type: ignore[return-value]


def _resolve() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            lib: ctypes.CDLL | None = None
            isa: str | None = None
            if _native_setting():
                lib, why = _load()
                if lib is None:
                    warnings.warn(
                        f"{why}; convex_combination and the sparse maps run slower "
                        "ATen code. Set CONVEXMIX_NATIVE=0 to silence this.",
                        ConvexMixWarning,
                        stacklevel=5,
                    )
                else:
                    isa = why
            _state["isa"] = isa
            _state["lib"] = lib
        return _state["lib"]  # type: ignore[return-value]


def isa() -> str | None:
    """The instruction set of the loaded kernels ("x86-64", "avx2", "avx512", "aarch64"),
    or None without them."""
    return None if library() is None else _state.get("isa")  # type: ignore[return-value]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and weights') dtype of the kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``parts`` consecutive ranges of equal length (the
    last shorter), each starting at a multiple of ``align``; ``[(0, 0)]`` for ``n = 0``.
    The one splitter of every family: elements, rows or models."""
    if n <= 0:
        return [(0, 0)]
    step = -(-n // max(1, min(parts, n)))
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


def threads(work: int, minimum: int) -> int:
    """``torch.get_num_threads()`` where ``work >= minimum``, else 1."""
    return torch.get_num_threads() if work >= minimum else 1


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads (made under a lock)."""
    global _pool
    pool = _pool
    if pool is not None and pool._max_workers >= workers:
        return pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            old = _pool
            size = max(workers, torch.get_num_threads() - 1)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="convexmix")
            if old is not None:  # its queued work still runs; its threads then end
                old.shutdown(wait=False)
        return _pool


def run(fn: Kernel, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Runs ``fn(*args)`` for each args: all but the first on the pool, the first here."""
    if len(calls) == 1:
        return [fn(*calls[0])]
    pool = _executor(len(calls) - 1)
    futures = [pool.submit(fn, *args) for args in calls[1:]]
    first = fn(*calls[0])
    return [first, *(f.result() for f in futures)]


def pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of the tensors' data pointers (NULL for None)."""
    addresses = [t.data_ptr() if t is not None else None for t in tensors]
    return (ctypes.c_void_p * len(tensors))(*addresses)


library()  # resolved at import: see the module's docstring
