"""The native CPU code of ``convex_combination``: build, load and call ``combine.c`` (the
kernels) and ``pool.c`` (the cache of large outputs, used by :mod:`.alloc`).

Both are compiled on first use with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``; ``-O3 -march=native``) into a per-user cache
(``$CONVEXMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/convexmix``, else
``~/.cache/convexmix``), keyed by the source, the compiler, the flags and the CPU, and
loaded with ctypes. Without a compiler, or with ``CONVEXMIX_NATIVE=0``, :func:`library`
returns None and the caller runs its ATen loop (slower, same results up to rounding).

Calls release the GIL, so one range is split over ``torch.get_num_threads()`` threads.
Outputs of at least ``NT_BYTES`` are written with non-temporal stores.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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

SOURCES = [Path(__file__).with_name("combine.c"), Path(__file__).with_name("pool.c")]
#: Outputs at least this large bypass the cache (non-temporal stores): they would not stay
#: there anyway, and skipping the read-for-ownership saves a pass. At 12 MiB (the
#: ScalarMix case, K = 25) this measured 0.84-0.90 of the bound against 0.93-0.98.
NT_BYTES = 8 << 20
#: Below this many elements moved ((K + 1) * N) one thread does the whole call.
PARALLEL_MIN = 1 << 20
_ALIGN = 64  # elements per thread boundary: keeps every range 64-byte aligned

_SUFFIX = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
_FLAGS = [
    ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread"],
    ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread"],
]

_lock = threading.Lock()
_state: dict[str, object] = {}
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _cache_dir() -> Path:
    env = os.environ.get("CONVEXMIX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "convexmix"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, *map(str, SOURCES)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            return False
        os.replace(tmp, target)  # atomic: concurrent builders never see half a library
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL | None:
    if os.environ.get("CONVEXMIX_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    found = [shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c]
    compilers = [c for c in found if c]
    if not compilers:
        return None
    cc = compilers[0]
    source = b"\0".join(path.read_bytes() for path in SOURCES)
    for flags in _FLAGS:
        key = hashlib.sha256(
            b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_id().encode()])
        ).hexdigest()[:16]
        target = _cache_dir() / f"combine-{key}.so"
        try:
            if target.exists() or _compile(cc, flags, target):
                return _bind(ctypes.CDLL(str(target)))
        except OSError:
            continue
    return None


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
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call; None where they cannot be."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib = _build()
                if lib is None and os.environ.get("CONVEXMIX_NATIVE", "1") != "0":
                    warnings.warn(
                        "convexmix could not build its native CPU kernels (no working C "
                        "compiler); convex_combination runs a slower ATen loop. Set "
                        "CONVEXMIX_NATIVE=0 to silence this.",
                        ConvexMixWarning,
                        stacklevel=4,
                    )
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and weights') dtype of the kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


Kernel = Callable[..., Any]


def _kernel(kind: str, dtype: torch.dtype, weights: Tensor, tensors: list[Tensor]) -> Kernel | None:
    """The C function for these tensors, or None when the native path does not apply."""
    suffix = _SUFFIX.get(dtype)
    if suffix is None or weights.dim() != 1 or weights.dtype != acc_dtype(dtype):
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


def _run(fn: Kernel, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Runs ``fn(*args)`` for each args: all but the first on the pool, the first here."""
    global _pool
    if len(calls) == 1:
        return [fn(*calls[0])]
    if _pool is None or _pool._max_workers < len(calls) - 1:
        _pool = ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="convexmix")
    futures = [_pool.submit(fn, *args) for args in calls[1:]]
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


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, grads: list[Tensor | None]
) -> tuple[bool, Tensor | None]:
    """Fills ``grads[k] = weights[k] grad`` (where not None) and returns (True, ``grad_w``)
    (float64; None when not ``need_w``), or (False, None), having done nothing, when the
    native path does not apply."""
    outs = [g for g in grads if g is not None]
    fn = _kernel("bwd", grad.dtype, weights, [grad, *xs, *outs])
    if fn is None:
        return False, None
    w = weights.contiguous()
    n, k = grad.numel(), len(xs)
    ranges = _ranges(n, k)
    dots = torch.zeros(len(ranges), k, dtype=torch.float64) if need_w else None
    ptrs = _pointers(list(xs))
    gptrs = _pointers(list(grads)) if outs else None
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
    return True, (dots.sum(0) if dots is not None else None)
