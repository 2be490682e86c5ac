"""Input coercion and checks for the ensemble job: arrays and files in, tensors out (private)."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import alloc
from convexmix._kernels import gather as native
from convexmix._optional import require
from convexmix.ensemble._objectives import LOG_LOSS_EPS, Reduce, local
from convexmix.errors import (
    ConvexMixError,
    ConvexMixTypeError,
    InvalidProbabilitiesError,
    ShapeError,
)

__all__ = [
    "PROB_ATOL",
    "REGRESSION_HINT",
    "as_predictions",
    "as_tensor",
    "check_finite_min",
    "class_targets",
    "read_progress",
    "reading_progress",
    "sample_weights",
    "true_class_probabilities",
    "wants_numpy",
]

#: Rows of class probabilities must sum to 1 within this tolerance.
PROB_ATOL = 1e-3
#: Finite sample weights whose sum overflows float64 are scaled by this power of two before
#: they are normalised (the weights are relative): N of them, each below 2**1024, then sum
#: to at most N * 2**424. The scaling is exact but for weights below 2**-422, which are
#: then less than 2**-1400 of the largest.
OVERFLOW_RESCALE = 2.0**-600

#: ``progress(done, total)`` after each part of the pass that reads the predictions
#: (:func:`read_progress`); None: one uninterrupted pass.
_READ_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "convexmix_read_progress", default=None
)


def reading_progress() -> Callable[[int, int], None] | None:
    """The progress callback of the enclosing :func:`read_progress` block, or None."""
    return _READ_PROGRESS.get()


@contextmanager
def read_progress(progress: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, the objectives' reads of the predictions call
    ``progress(done, total)`` as they go: the (K, N, C) read of log-loss after each
    group of models (``total`` = K; a group is a model per thread), the Gram pass of mse
    after each chunk of rows (``total`` = N). The command line's progress bar; a read
    from a slow disk or a large memory map is most of a fit's time."""
    token = _READ_PROGRESS.set(progress)
    try:
        yield
    finally:
        _READ_PROGRESS.reset(token)


def _load_npy(path: str | os.PathLike[str], name: str) -> Any:
    """A ``.npy`` file memory-mapped copy-on-write: nothing is read until it is used."""
    np = require("numpy", extra="cli", purpose=f"{name}: reading a .npy file")
    p = Path(path)
    if p.suffix.lower() != ".npy":
        raise ConvexMixError(f"{name}: a path must name a .npy file; got {str(p)!r}.")
    try:
        return np.load(p, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConvexMixError(f"{name}: cannot read {str(p)!r} as a .npy array ({err}).") from None


def as_tensor(x: Any, name: str) -> Tensor:
    """A tensor view of ``x`` where possible: a numpy array or memmap is not copied."""
    if isinstance(x, Tensor):
        if x.is_complex() or x.layout != torch.strided or x.is_meta:
            raise ConvexMixTypeError(
                f"{name} must be a dense tensor of real numbers; got {x.dtype} "
                f"({x.layout}) on {x.device}."
            )
        return x.detach()
    if isinstance(x, (str, os.PathLike)):
        x = _load_npy(x, name)
    np = sys.modules.get("numpy")  # a numpy array means numpy is already imported
    if np is not None and isinstance(x, np.ndarray):
        if (
            x.dtype == object
            or np.issubdtype(x.dtype, np.complexfloating)
            or not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_))
        ):
            raise ConvexMixError(
                f"{name} must be real numbers (a numeric dtype); got an array of dtype {x.dtype}."
            )
        with warnings.catch_warnings():
            # A read-only memmap: the ensemble job never writes to its inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(v, Tensor) or hasattr(v, "__array__") for v in x):
            parts = [as_tensor(v, name) for v in x]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ShapeError(
                    f"{name}: every model's predictions must have the same shape; "
                    f"got {sorted(shapes)}."
                )
            return torch.stack(parts)
        try:
            return torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConvexMixError(f"{name} must be an array of numbers; {err}") from None
    raise ConvexMixError(
        f"{name} must be a torch.Tensor, a numpy array or a list of them; got {type(x).__name__}."
    )


def wants_numpy(x: Any) -> bool:
    """Whether results for the input ``x`` should be numpy arrays: ``x`` is a numpy array
    (a memmap too), the path of a ``.npy`` file, or a list of numpy arrays."""
    if isinstance(x, (str, os.PathLike)):
        return True
    np = sys.modules.get("numpy")
    if np is None:
        return False
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(v, np.ndarray) for v in x)
    return isinstance(x, np.ndarray)


def as_predictions(predictions: Any) -> Tensor:
    p = as_tensor(predictions, "predictions")
    if p.dim() not in (2, 3):
        raise ShapeError(
            "predictions must be (K, N) or (K, N, C) (K models, N samples, C classes); "
            f"got shape {tuple(p.shape)}."
        )
    if p.shape[0] < 1 or p.shape[1] < 1 or (p.dim() == 3 and p.shape[2] < 1):
        raise ShapeError(f"predictions must not be empty; got shape {tuple(p.shape)}.")
    if not p.is_floating_point():
        p = p.double()
    return p


def check_finite_min(p: Tensor, name: str) -> float:
    """min(p) in one pass; raises when any value is NaN or infinite."""
    lo, hi = torch.aminmax(p)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ConvexMixError(f"{name} must be finite; got NaN or infinite values.")
    return float(lo.item())


#: The hint of a label error on targets that look like regression targets.
REGRESSION_HINT = "; they look like regression targets: pass loss='mse'"


def class_targets(t: Tensor, n_classes: int, n: int, hint: bool = False) -> Tensor:
    """(N,) int64 class labels in [0, n_classes); ``hint``: the predictions are (K, N), so
    labels that are not 0/1 are likely regression targets (the error says loss='mse')."""
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ShapeError(
            f"targets must be (N,) class labels with N={n} like the predictions; "
            f"got shape {tuple(t.shape)}."
        )
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ConvexMixError(
                "targets must be integer class labels; got non-integer values"
                + (REGRESSION_HINT if bool(torch.isfinite(t).all()) else "")
                + "."
            )
    elif t.dtype == torch.bool:
        t = t.long()
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ConvexMixError(
            f"targets must be class labels in [0, {n_classes - 1}]; "
            f"got values in [{int(t.min())}, {int(t.max())}]"
            + (REGRESSION_HINT if hint else "")
            + "."
        )
    return t


def _probability_error(k: int, lo: float, sums: Tensor) -> None:
    if math.isnan(lo) or not bool(torch.isfinite(sums).all()):
        raise ConvexMixError(f"predictions of model {k} must be finite; got NaN or inf values.")
    if lo < 0:
        raise InvalidProbabilitiesError(
            f"predictions of model {k} must be probabilities >= 0; got {lo:.3g}."
        )
    worst = int((sums - 1).abs().argmax())
    raise InvalidProbabilitiesError(
        f"predictions of model {k} must be class probabilities whose rows sum to 1 "
        f"(within {PROB_ATOL}); row {worst} sums to {float(sums[worst]):.6g}."
    )


def true_class_probabilities(
    p: Tensor, t: Tensor, validate: bool, floor: float = LOG_LOSS_EPS
) -> Tensor:
    """(K, N) probabilities of the true class, floored at ``floor``, from (K, N, C) class
    probabilities, with (``validate``) the checks that they are >= 0 and that each row sums
    to 1 within :data:`PROB_ATOL` (NaN and inf fail them).

    Reads the predictions once from memory: natively (``_kernels/gather.c``), each row's
    C values once; otherwise each model's rows go by in chunks of about 1 MB, and the
    checks and the gather run on a chunk while it is in cache.
    """
    K, N = p.shape[:2]
    # A fresh 40 MB q costs more in page faults than the gather itself: alloc reuses
    # memory the process already has (or huge pages).
    q = alloc.empty((K, N), p.dtype)
    progress = _READ_PROGRESS.get()
    if progress is None:
        bad = native.true_class(p, t, q, floor, validate, PROB_ATOL)
    else:  # a group of models at a time (one per thread), then a progress report
        group = max(1, torch.get_num_threads())
        bad = -1
        for a in range(0, K, group):
            b = min(a + group, K)
            part = native.true_class(p[a:b], t, q[a:b], floor, validate, PROB_ATOL)
            if part is None or part >= 0:
                bad = part if part is None else a + part
                break
            progress(b, K)
    if bad is None:
        return _true_class_aten(p, t, validate, q, progress=progress).clamp_min_(floor)
    if bad >= 0:  # find and report the offending value
        _true_class_aten(p[bad : bad + 1], t, True, torch.empty((1, N), dtype=p.dtype), bad)
        raise AssertionError(f"model {bad} failed the native check only")  # pragma: no cover
    return q


def _true_class_aten(
    p: Tensor,
    t: Tensor,
    validate: bool,
    q: Tensor,
    first: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The gather and the checks in torch ops, into ``q``; model k is reported as
    ``first + k``; ``progress(k + 1, K)`` after each model."""
    K, N, C = p.shape
    rows = max(256, (1 << 20) // (C * p.element_size()))
    chunks = [
        (
            start,
            min(start + rows, N),
            torch.arange(min(start + rows, N) - start) * C + t[start : start + rows],
        )
        for start in range(0, N, rows)
    ]
    ones = torch.ones(C, dtype=p.dtype)
    sums = torch.empty(N, dtype=p.dtype)
    for k in range(K):
        block = p[k]
        if not block.is_contiguous():
            block = block.contiguous()
        mins = []
        for start, stop, flat in chunks:
            part = block[start:stop]
            if validate:
                mins.append(part.amin())
                torch.mv(part, ones, out=sums[start:stop])
            torch.take(part, flat, out=q[k, start:stop])
        if validate:
            # min >= 0 and row sums of 1 bound every value by 1; NaN and inf show up in
            # the minimum or in the sums.
            lo = float(torch.stack(mins).min())
            s_lo, s_hi = (float(v) for v in torch.aminmax(sums))
            if not (lo >= 0 and s_lo >= 1 - PROB_ATOL and s_hi <= 1 + PROB_ATOL):
                _probability_error(first + k, lo, sums)
        if progress is not None:
            progress(k + 1, K)
    return q


def sample_weights(sample_weight: Any, n: int, reduce: Reduce = local) -> Tensor:
    """(N,) float64 sample weights that sum to 1 over all rows (over every rank's)."""
    if sample_weight is None:
        total = float(reduce(torch.tensor(float(n), dtype=torch.float64)))
        return torch.full((n,), 1.0 / total, dtype=torch.float64)
    s = as_tensor(sample_weight, "sample_weight").double()
    if s.dim() != 1 or s.shape[0] != n:
        raise ShapeError(
            f"sample_weight must be (N,) with N={n} like the predictions; "
            f"got shape {tuple(s.shape)}."
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ConvexMixError("sample_weight must be finite and >= 0, with a positive sum.")
    total = float(reduce(s.sum()))
    if total == math.inf:  # finite weights whose sum overflows: they are only relative
        s = s * OVERFLOW_RESCALE
        total = float(reduce(s.sum()))
    if total <= 0:
        raise ConvexMixError("sample_weight must be finite and >= 0, with a positive sum.")
    return s / total
