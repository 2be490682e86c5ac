"""The native CPU code: load and call ``combine.c`` (``convex_combination``'s kernels),
``pool.c`` (the cache of large outputs, used by :mod:`.alloc`), ``capped.c`` (the capped
projection), ``gather.c`` (the ensemble's true-class gather), ``checks.c`` (softmax's
NaN check) and ``rows.c`` (sparsemax and 1.5-entmax, row by row).

All are compiled at install time by ``setup.py``, once per instruction set, into
``libconvexmix-<isa>.so`` next to this file; nothing is compiled, and nothing written, at
run time. :func:`library` loads the baseline build, asks it which builds this CPU (and its
OS) can run, and loads the widest of those; ``CONVEXMIX_ISA`` (``baseline``, ``widest``
or a build's name) overrides the choice for tests and bug hunts, but never loads a build
the CPU cannot run. Where the libraries are missing (no compiler at install), older than
their sources, or turned off with ``CONVEXMIX_NATIVE=0``, :func:`library` returns None
and the caller runs its ATen loop (slower, same results up to rounding), with one
warning unless they were turned off.

Calls release the GIL, so one range is split over ``torch.get_num_threads()`` threads:
the calling thread and a shared pool, created under a lock and again in a forked child.
Outputs of at least ``NT_BYTES`` are written with non-temporal stores.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
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

from convexmix._kernels.backend import Grads
from convexmix._validation import PLAIN, plain
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
#: Outputs at least this large bypass the cache (non-temporal stores): they would not stay
#: there anyway, and skipping the read-for-ownership saves a pass. The threshold sits
#: below ScalarMix's 12 MiB outputs (K = 25), which streaming stores made faster
#: (docs/benchmarks.md).
NT_BYTES = 8 << 20
#: Below this many elements moved ((K + 1) * N) one thread does the whole call.
PARALLEL_MIN = 1 << 20
#: Below this many elements the capped projection runs on one thread.
CAPPED_PARALLEL_MIN = 1 << 16
_ALIGN = 64  # elements per thread boundary: keeps every range 64-byte aligned

_SUFFIX = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}

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


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        if not hasattr(lib, f"cx_fwd_{suffix}"):  # f16 needs a compiler with _Float16
            continue
        fwd = getattr(lib, f"cx_fwd_{suffix}")
        fwd.argtypes, fwd.restype = [p, p, i64, p, i64, i64, i32], None
        bwd = getattr(lib, f"cx_bwd_{suffix}")
        bwd.argtypes, bwd.restype = [p, p, p, i64, p, p, i64, i64, i32], i32
    lib.cx_pool_acquire.argtypes, lib.cx_pool_acquire.restype = [i64], p
    lib.cx_pool_set_cap.argtypes, lib.cx_pool_set_cap.restype = [i64], None
    lib.cx_pool_discard.argtypes, lib.cx_pool_discard.restype = [p], None
    lib.cx_pool_cached.argtypes, lib.cx_pool_cached.restype = [], i64
    lib.cx_pool_empty.argtypes, lib.cx_pool_empty.restype = [], None
    lib.cx_isa.argtypes, lib.cx_isa.restype = [], ctypes.c_char_p
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"cx_capped_{suffix}")
        fn.argtypes = [p, p, i64, p, i64, i64, p, i64, i64, ctypes.c_double, i64, i64]
        fn.restype = i32
        fn = getattr(lib, f"cx_true_class_{suffix}")
        fn.argtypes = [p, p, i64, i64, p, i64, i64, ctypes.c_double, i32, ctypes.c_double]
        fn.restype = i64
        fn = getattr(lib, f"cx_first_nan_{suffix}")
        fn.argtypes, fn.restype = [p, i64, i64, i64], i32
    rows: dict[torch.dtype, tuple[Kernel, Kernel]] = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        fwd = getattr(lib, f"cx_rows_fwd_{suffix}")
        fwd.argtypes, fwd.restype = [p, p, i64, i64, ctypes.c_double, i32, i64, i64], i32
        bwd = getattr(lib, f"cx_rows_bwd_{suffix}")
        bwd.argtypes, bwd.restype = [p, p, p, i64, i64, i32, i64, i64], None
        rows[dtype] = (fwd, bwd)
    lib._cx_rows = rows  # type: ignore[attr-defined]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels (loaded on the first call); None where there are none."""
    if "lib" not in _state:
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
                            stacklevel=4,
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


Kernel = Callable[..., Any]


def _kernel(kind: str, dtype: torch.dtype, weights: Tensor, tensors: list[Tensor]) -> Kernel | None:
    """The C function for these tensors, or None when the native path does not apply."""
    suffix = _SUFFIX.get(dtype)
    if suffix is None or weights.dim() != 1 or weights.dtype != acc_dtype(dtype):
        return None
    if not plain([weights, *tensors]):
        return None
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    lib = library()
    return getattr(lib, f"cx_{kind}_{suffix}", None) if lib is not None else None


def _ranges(n: int, k: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads() if (k + 1) * n >= PARALLEL_MIN else 1
    step = -(-n // max(threads, 1))
    step = -(-step // _ALIGN) * _ALIGN
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


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


def _run(fn: Kernel, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Runs ``fn(*args)`` for each args: all but the first on the pool, the first here."""
    if len(calls) == 1:
        return [fn(*calls[0])]
    pool = _executor(len(calls) - 1)
    futures = [pool.submit(fn, *args) for args in calls[1:]]
    first = fn(*calls[0])
    return [first, *(f.result() for f in futures)]


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    addresses = [t.data_ptr() if t is not None else None for t in tensors]
    return (ctypes.c_void_p * len(tensors))(*addresses)


def _nt(outs: list[Tensor]) -> int:
    big = bool(outs) and outs[0].numel() * outs[0].element_size() >= NT_BYTES
    return int(big and all(t.data_ptr() % 64 == 0 for t in outs))


def forward(weights: Tensor, xs: list[Tensor], out: Tensor) -> bool:
    """``out = sum_k weights[k] xs[k]`` natively; False (nothing done) if it does not apply."""
    fn = _kernel("fwd", out.dtype, weights, [*xs, out])
    if fn is None:
        return False
    w = weights.contiguous()
    ptrs, n, k = _pointers(list(xs)), out.numel(), len(xs)
    nt = _nt([out])
    _run(fn, [(ptrs, w.data_ptr(), k, out.data_ptr(), a, b, nt) for a, b in _ranges(n, k)])
    return True


def _row_ranges(rows: int, k: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads() if rows > 1 and rows * k >= CAPPED_PARALLEL_MIN else 1
    step = -(-rows // max(threads, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


class InfeasibleError(Exception):
    """A row's bounds cannot meet the total (the caller raises its own error)."""


def capped_applies(x: Tensor) -> bool:
    """Whether :func:`capped` runs for ``x`` (CPU float32/64, kernels loaded)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (library() is not None)
    )


def capped(x: Tensor, lower: Tensor, upper: Tensor, total: float) -> Tensor | None:
    """The capped-simplex projection of each row of the contiguous 2-D CPU ``x``
    (float32/64) onto ``{lower <= p <= upper, sum p = total}`` (absent entries, -inf, are
    0), with ``lower``/``upper`` of x's dtype, shaped (1|R, 1|K); None (nothing done)
    where the native path does not apply or the row holds values it leaves to the caller
    (NaN, +inf, a bound of -inf). Raises :class:`InfeasibleError` where a row's bounds cannot
    meet ``total``."""
    suffix = _SUFFIX.get(x.dtype)
    if suffix not in ("f32", "f64") or x.dim() != 2 or not x.is_contiguous():
        return None
    if not plain([x, lower, upper]):
        return None
    lib = library()
    if lib is None:
        return None
    rows, k = x.shape
    out = torch.empty_like(x)

    def strides(b: Tensor) -> tuple[int, int]:
        return (b.stride(0) if b.shape[0] > 1 else 0), (b.stride(1) if b.shape[1] > 1 else 0)

    (lrs, lcs), (urs, ucs) = strides(lower), strides(upper)
    fn = getattr(lib, f"cx_capped_{suffix}")
    args = (x.data_ptr(), out.data_ptr(), k, lower.data_ptr(), lrs, lcs)
    args2 = (upper.data_ptr(), urs, ucs, float(total))
    rcs = _run(fn, [(*args, *args2, a, b) for a, b in _row_ranges(rows, k)])
    if any(rc == 2 for rc in rcs):
        raise MemoryError("convexmix: out of memory for the capped projection's scratch")
    if any(rc == 3 for rc in rcs):
        raise InfeasibleError
    return None if any(rcs) else out


def first_nan(dtype: torch.dtype) -> Kernel | None:
    """``cx_first_nan_<t>(ptr, outer, block, inner)`` (``checks.c``) for contiguous CPU
    values of ``dtype`` (float32/64): whether the first entry of any slice is NaN. None
    where it does not apply (another dtype, no native kernels)."""
    suffix = _SUFFIX.get(dtype)
    lib = library() if suffix in ("f32", "f64") else None
    return getattr(lib, f"cx_first_nan_{suffix}") if lib is not None else None


#: Below this many elements read (K * N * C) one thread reads every model.
GATHER_PARALLEL_MIN = 1 << 22


def true_class(
    p: Tensor, t: Tensor, q: Tensor, floor: float, check: bool, atol: float
) -> int | None:
    """``q[k, i] = max(p[k, i, t[i]], floor)`` for the contiguous (K, N, C) CPU ``p``
    (float32/64), the int64 (N,) ``t`` and the (K, N) ``q`` of p's dtype, in one read of p;
    with ``check``, also whether every value is >= 0 and every row sums to 1 within
    ``atol``. Returns -1 (done, all checks hold), the first model that fails a check, or
    None (nothing done) where the native path does not apply."""
    suffix = _SUFFIX.get(p.dtype)
    if (
        suffix not in ("f32", "f64")
        or p.dim() != 3
        or p.device.type != "cpu"
        or not p.is_contiguous()
        or not q.is_contiguous()
        or q.dtype != p.dtype
        or t.dtype != torch.int64
        or not t.is_contiguous()
        or not plain([p, t, q])
    ):
        return None
    lib = library()
    if lib is None:
        return None
    K, n, c = p.shape
    threads = torch.get_num_threads() if p.numel() >= GATHER_PARALLEL_MIN else 1
    step = -(-K // max(1, min(threads, K)))
    fn = getattr(lib, f"cx_true_class_{suffix}")
    args = (p.data_ptr(), t.data_ptr(), n, c, q.data_ptr())
    rest = (float(floor), int(check), float(atol))
    rcs = _run(fn, [(*args, a, min(a + step, K), *rest) for a in range(0, K, step)])
    bad = [rc for rc in rcs if rc >= 0]
    return min(bad) if bad else -1


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, need_x: list[bool]
) -> Grads | None:
    """The gradients natively (:class:`~convexmix._kernels.backend.Grads`; the input
    gradients from the output cache), or None, having done nothing, when the native path
    does not apply."""
    # the input gradients are fresh contiguous tensors of the inputs' dtype: checking the
    # inputs checks them
    fn = _kernel("bwd", grad.dtype, weights, [grad, *xs])
    if fn is None:
        return None
    from convexmix._kernels import alloc  # alloc loads this module's library

    grads = [alloc.empty(x.shape, x.dtype) if n else None for x, n in zip(xs, need_x, strict=True)]
    outs = [g for g in grads if g is not None]
    w = weights.contiguous()
    n, k = grad.numel(), len(xs)
    ranges = _ranges(n, k)
    dots = torch.zeros(len(ranges), k, dtype=torch.float64) if need_w else None
    ptrs = _pointers(list(xs))
    gptrs = _pointers(grads) if outs else None
    nt = _nt(outs)
    calls = [
        (
            grad.data_ptr(),
            ptrs,
            w.data_ptr(),
            k,
            dots[r].data_ptr() if dots is not None else None,
            gptrs,
            a,
            b,
            nt,
        )
        for r, (a, b) in enumerate(ranges)
    ]
    if any(_run(fn, calls)):
        raise MemoryError("convexmix: out of memory for the backward's partial sums")
    return Grads(dots.sum(0).to(weights.dtype) if dots is not None else None, outs)


# ------------------------------------------------------------------- maps, row by row

#: Below this many elements one thread does a whole map call (``rows.c``): the forward
#: costs ~10 ns a row plus ~1-2 ns an element, the backward ~1 ns an element, against
#: ~30 us to hand a range to the pool.
ROWS_PARALLEL_MIN = 1 << 15
ROWS_BWD_PARALLEL_MIN = 1 << 17
#: Rows of the maps' native kernels: sparsemax (0) and 1.5-entmax (1).
SPARSEMAX, ENTMAX15 = 0, 1
#: False turns the maps' native path off (tests force the ATen path with it).
rows_enabled = True


def _rows_kernels(x: Tensor) -> tuple[Kernel, Kernel] | None:
    """The (forward, backward) row kernels for ``x``, or None where they do not apply:
    a plain contiguous CPU float32/float64 tensor, the kernels loaded and enabled."""
    lib: Any = library()
    if lib is None or not rows_enabled or x.__class__ not in PLAIN:
        return None
    if not x.is_cpu or not x.is_contiguous():
        return None
    return lib._cx_rows.get(x.dtype)  # type: ignore[no-any-return]


def rows_apply(x: Tensor) -> bool:
    """Whether :func:`rows_forward` runs for ``x``."""
    return _rows_kernels(x) is not None


def _row_split(rows: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads() if rows > 1 else 1
    step = -(-rows // max(min(threads, rows), 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _row_layout(shape: torch.Size, dim: int, n: int) -> tuple[int, int, int]:
    """(K, inner, rows) of a contiguous tensor of ``shape`` and ``n > 0`` elements with its
    slices along ``dim``: slice r starts at ``(r // inner) * K * inner + r % inner``."""
    if dim < 0:
        dim += len(shape)
    k = shape[dim]
    return k, math.prod(shape[dim + 1 :]), n // k


def rows_forward(x: Tensor, dim: int, total: float, kind: int) -> Tensor | None:
    """Sparsemax (``kind`` 0) or 1.5-entmax (1) of ``x`` along ``dim`` (non-negative)
    natively, summing to ``total``; None (nothing done) where the kernel does not apply."""
    kernels = _rows_kernels(x)
    if kernels is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    n = x.numel()
    if n == 0:
        return out
    k, inner, rows = _row_layout(x.shape, dim, n)
    fn, xp, op = kernels[0], x.data_ptr(), out.data_ptr()
    if n < ROWS_PARALLEL_MIN:
        rc = fn(xp, op, k, inner, total, kind, 0, rows)
    else:
        rc = max(_run(fn, [(xp, op, k, inner, total, kind, a, b) for a, b in _row_split(rows)]))
    if rc:
        raise MemoryError("convexmix: out of memory for the map's scratch")
    return out


def rows_backward(y: Tensor, grad: Tensor, dim: int, kind: int) -> Tensor | None:
    """The vector-Jacobian product of sparsemax (``kind`` 0) or 1.5-entmax (1) from its
    output ``y`` natively; None (nothing done) where the kernel does not apply."""
    kernels = _rows_kernels(y)
    if kernels is None or grad.dtype != y.dtype or grad.shape != y.shape:
        return None
    if grad.__class__ not in PLAIN or not grad.is_cpu:
        return None
    grad = grad.contiguous()  # an expanded gradient: one copy beats the ATen path
    out = torch.empty(y.shape, dtype=y.dtype)
    n = y.numel()
    if n == 0:
        return out
    k, inner, rows = _row_layout(y.shape, dim, n)
    fn, yp, gp, op = kernels[1], y.data_ptr(), grad.data_ptr(), out.data_ptr()
    if n < ROWS_BWD_PARALLEL_MIN:
        fn(yp, gp, op, k, inner, kind, 0, rows)
    else:
        _run(fn, [(yp, gp, op, k, inner, kind, a, b) for a, b in _row_split(rows)])
    return out
