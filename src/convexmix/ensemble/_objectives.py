"""What the ensemble solver needs of an objective, and the pieces its objectives share (private).

Each objective gives the value, the gradient and the Hessian the Newton solver needs; the
data objectives (:mod:`._log_loss`, :mod:`._mse`, :mod:`._callable_loss`) also give the
loss without regularisation, their restriction to some rows (cross-validation), and the
values of one greedy step (Caruana's selection). :class:`Regularized` adds the pull
towards equal weights to any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

__all__ = [
    "LOG_LOSS_EPS",
    "CountsGreedy",
    "DataObjective",
    "Greedy",
    "Loss",
    "LossFn",
    "Objective",
    "Reduce",
    "Regularized",
    "Wrapping",
    "local",
    "matvec",
    "matvec_t",
    "rounding_gap",
    "within",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Loss = Literal["log_loss", "mse"] | LossFn
#: The log-loss floors each model's probability of the true class at this value, so a
#: model that gives the true class probability 0 costs ``-log(1e-15) = 34.5``, not inf.
LOG_LOSS_EPS = 1e-15
#: Sums over samples go through this: the identity in one process, an all-reduce of
#: the per-rank sums when the rows are sharded over torch.distributed.
Reduce = Callable[[Tensor], Tensor]
#: Columns of the (K, N) matrices per block: a block of K rows in float64 stays in cache.
BLOCK = 8192
#: A blend ``w @ q`` with at most K / SPARSE_BLEND non-zero weights adds up their rows.
SPARSE_BLEND = 4
#: An approximate Hessian (``approx=True``) on m models sums over every step-th row with
#: ``step`` such that about HESSIAN_WORK * N multiply-adds remain, and at least
#: HESSIAN_MIN_ROWS_PER_MODEL * m rows.
HESSIAN_WORK = 16 * 16
HESSIAN_MIN_ROWS_PER_MODEL = 64
#: The approximate Hessian samples runs of this many consecutive rows (whole cache lines).
SAMPLE_RUN = 64


def hessian_step(m: int, n: int) -> int:
    """The stride (in runs of SAMPLE_RUN rows) of an approximate Hessian on m models and
    n rows (1: every row)."""
    step = max(1, (m * m) // HESSIAN_WORK)
    return max(1, min(step, n // (HESSIAN_MIN_ROWS_PER_MODEL * m)))


def local(x: Tensor) -> Tensor:
    """The sum over this process's rows is the sum over all rows."""
    return x


class Objective(Protocol):
    """What the Newton solver needs: the value, the gradient and the Hessian."""

    K: int

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        """f(w) and a function that returns the gradient at the same w."""
        ...

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        """The Hessian at w restricted to rows and columns ``idx``; ``approx``: an
        estimate is enough (a Newton step far from the optimum)."""
        ...


class Greedy(Protocol):
    """The state of Caruana's selection: the models picked so far."""

    def values(self) -> Tensor:
        """(K,) the loss after adding model k to the picks; +inf for a model that
        provably cannot have the lowest one."""
        ...

    def add(self, k: int) -> None:
        """Add model k to the picks."""
        ...


class DataObjective(Objective, Protocol):
    """A loss on N samples: also its exact value, its rows, and Caruana's greedy step."""

    @property
    def n_samples(self) -> int:
        """N, the number of samples."""
        ...

    @property
    def scale(self) -> float:
        """The loss's scale: ``tol`` is relative to it (1 for the log-loss, whose values
        do not depend on units; for mse the loss of the best model alone)."""
        ...

    def loss(self, w: Tensor) -> float:
        """The loss at w, as accurate as the data allow (the value reported to users)."""
        ...

    def greedy(self) -> Greedy:
        """A fresh state for Caruana's selection."""
        ...

    def subset(self, rows: Tensor) -> DataObjective:
        """The same objective on the samples ``rows`` (for cross-validation)."""
        ...

    def with_weights(self, s: Tensor) -> DataObjective:
        """The same objective with normalised sample weights ``s`` (N,)."""
        ...

    def sample(self) -> DataObjective | None:
        """The same objective on a fixed subsample of the rows, whose optimum is a cheap
        start for the fit on all of them; None where that does not pay."""
        ...


def _columns(n: int, block: int = BLOCK) -> range:
    return range(0, n, block)


def matvec_t(w: Tensor, q: Tensor) -> Tensor:
    """``w @ q`` in float64 for a float64 (K,) ``w`` and a (K, N) ``q`` of any float dtype."""
    if q.dtype == torch.float64:
        return w @ q
    n = q.shape[1]
    out = torch.empty(n, dtype=torch.float64)
    for a in _columns(n):
        b = min(a + BLOCK, n)
        torch.mv(q[:, a:b].T.double(), w, out=out[a:b])
    return out


def matvec(q: Tensor, v: Tensor) -> Tensor:
    """``q @ v`` in float64 for a (K, N) ``q`` of any float dtype and a float64 (N,) ``v``."""
    if q.dtype == torch.float64:
        return q @ v
    out = torch.zeros(q.shape[0], dtype=torch.float64)
    for a in _columns(q.shape[1]):
        b = min(a + BLOCK, q.shape[1])
        out.addmv_(q[:, a:b].double(), v[a:b])
    return out


class CountsGreedy:
    """Caruana's step from the pick counts, for objectives cheap to evaluate at any w."""

    def __init__(self, K: int, f: Callable[[Tensor], Tensor]) -> None:
        """``f`` maps the (K, K) candidate weights (one per row) to their (K,) losses."""
        self.f, self.counts, self.m = f, torch.zeros(K, dtype=torch.float64), 0
        self.eye = torch.eye(K, dtype=torch.float64)

    def values(self) -> Tensor:
        return self.f((self.counts[None, :] + self.eye) / (self.m + 1))

    def add(self, k: int) -> None:
        self.counts[k] += 1
        self.m += 1


def rounding_gap(obj: Objective, w: Tensor, g: Tensor, allowed: Tensor | None = None) -> float:
    """How far rounding alone can put the Frank-Wolfe gap at ``w`` (gradient ``g``) from
    its true value, from the objective's optional ``gradient_rounding(w)`` (a bound on
    each entry's error), 0 where it has none (a sum of terms of one sign, as the
    log-loss's gradient, rounds far below any tolerance).

    The gap ``w.g - min g`` (or its capped form, over the ``allowed`` models) carries the
    errors of the support's entries, weighted by ``w``, and that of whichever entry is
    the least: any whose interval reaches the least upper end. A fit stops at ``tol``
    plus this: below it the gap is noise, and no step can tell better weights from worse.
    """
    bound = getattr(obj, "gradient_rounding", None)
    err = None if bound is None else bound(w)
    if err is None:
        return 0.0
    lo, hi = g - err, g + err
    if allowed is not None:
        lo = lo.masked_fill(~allowed, math.inf)
        hi = hi.masked_fill(~allowed, math.inf)
    near = lo <= hi.min()
    return float(w @ err) + float(err[near].max())


def within(
    obj: Objective, gap: float, tol: float, w: Tensor, g: Tensor, allowed: Tensor | None = None
) -> bool:
    """Whether a fit at ``w`` (gradient ``g``, Frank-Wolfe gap ``gap``) has converged:
    ``gap <= tol``, or ``tol`` plus :func:`rounding_gap` (computed only when ``tol``
    alone is not met and the objective's ``rounding_bound()``, an upper bound on it that
    costs nothing, does not rule it out: a well-conditioned fit never computes it)."""
    if gap <= tol:
        return True
    bound = getattr(obj, "rounding_bound", None)  # a cheap bound on rounding_gap
    most = None if bound is None else bound()
    if most is None or gap > tol + most:
        return False
    return gap <= tol + rounding_gap(obj, w, g, allowed)


class Wrapping:
    """An objective around ``self.base`` that passes on its rounding bounds (see
    :func:`rounding_gap` and :func:`within`)."""

    base: Objective

    def gradient_rounding(self, w: Tensor) -> Tensor | None:
        bound = getattr(self.base, "gradient_rounding", None)
        return None if bound is None else bound(w)

    def rounding_bound(self) -> float | None:
        bound = getattr(self.base, "rounding_bound", None)
        return None if bound is None else bound()


class Regularized(Wrapping):
    """objective + lam * ||w - 1/K||^2: a pull towards equal weights."""

    def __init__(self, base: Objective, lam: float) -> None:
        self.base, self.lam, self.K = base, lam, base.K

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        f, grad = self.base.value(w)
        d = w - 1.0 / self.K
        return f + self.lam * float(d @ d), lambda: grad() + 2 * self.lam * d

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        h = self.base.hessian(w, idx, approx)
        return h + 2 * self.lam * torch.eye(idx.numel(), dtype=h.dtype)
