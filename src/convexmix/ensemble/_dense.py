"""The small-problem path of ``fit_weights``: the same Newton method in float64 numpy (private).

At the sizes people start with (a few models, a few thousand rows) a fit is a few dozen
operations on K-vectors and K x K matrices per Newton step, and torch's fixed cost per
operation (a few microseconds), its thread pool (a parallel region whose second thread
is not running on a loaded machine waits for the scheduler: milliseconds per matrix
product) and the native library's start-up were most of the time. This path runs the
same method (:mod:`._solver`: active-set steps on the quadratic model, Armijo
backtracking, the Frank-Wolfe gap as the stopping rule, the pruning of tiny weights) on
numpy arrays, in one thread, with no start-up. :func:`prepare` takes a fit only where it
can check the inputs itself; everything else (errors included) goes the torch way, which
raises the documented errors. The differential test holds both paths to the same optimum.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from convexmix.ensemble._inputs import OVERFLOW_RESCALE, PROB_ATOL
from convexmix.ensemble._mse import EPS, quadratic_scale
from convexmix.ensemble._objectives import LOG_LOSS_EPS
from convexmix.ensemble._solver import CV_TOL, PRUNE_BELOW, stopping_gap
from convexmix.errors import ConvexMixError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Vec = NDArray[np.float64]
else:
    Vec = Any

__all__ = [
    "DENSE_MAX_MODELS",
    "DENSE_MAX_VALUES",
    "DenseProblem",
    "cv_lambda",
    "prepare",
    "solve",
]

#: The dense path takes fits of at most this many models ...
DENSE_MAX_MODELS = 128
#: ... and at most this many values of the (K, N) matrix it works on (K * N; the read of
#: (K, N, C) class probabilities is C times that). Above, the passes over the rows are
#: most of the time, and torch's threads and native kernels make them faster.
DENSE_MAX_VALUES = 1 << 18

#: torch dtypes that numpy shares (bfloat16 and the complex types go the torch way).
_NUMPY_DTYPES = frozenset(
    {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32}
    | {torch.int64, torch.uint8, torch.bool}
)

Solution = tuple[Vec, list[float], int, float, bool]


def _numpy() -> Any:
    """numpy, or None: the dense path needs it, the library does not."""
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
            return None
    return np


def _array(x: Any, np: Any) -> Any:
    """``x`` as a numpy array without a copy (a CPU tensor or an in-memory array), or None
    for anything the torch path should read (files, memory maps, lists, GPU tensors)."""
    if isinstance(x, Tensor):
        if x.device.type != "cpu" or x.layout != torch.strided or x.dtype not in _NUMPY_DTYPES:
            return None
        return x.detach().numpy()
    if type(x) is np.ndarray:  # not a memmap: those stream
        return x
    return None


@dataclass
class DenseProblem:
    """A checked small problem: the log-loss on ``q`` (K, N) or the quadratic ``w'Mw`` in
    the errors (as :class:`~convexmix.ensemble._mse.Quadratic`); ``s`` the (N,) normalised
    sample weights."""

    K: int
    kind: str  # "log_loss" or "mse"
    s: Vec
    q: Vec | None = None
    M: Vec | None = None
    e: Any = None  # (K, N, D): the errors p - y, for the exact mse
    scale: float = 1.0
    lam: float = 0.0
    sqrt_s: Vec | None = None
    rounding_bound: float = 0.0  # the mse's 4 K eps max |M| (see Quadratic.rounding_bound)
    # the last (w, w @ q) of value(), for hessian() at the same weights (not copied by
    # replace(): init=False)
    _blend: Any = field(default=None, init=False, repr=False, compare=False)

    def weighted(self, s: Vec) -> DenseProblem | None:
        """The same problem with the normalised sample weights ``s``; None when the mse's
        sums overflow float64 (the torch path reports it)."""
        if self.kind == "log_loss":
            return replace(self, s=s, sqrt_s=None)
        np = _np()
        e = self.e.reshape(self.K, -1)
        with np.errstate(over="ignore", invalid="ignore"):
            if s[0] == s.min() == s.max():
                # equal weights: the Gram matrix times one number, with no weighted copy
                # of the errors (in a new process each fresh MB costs ~0.4 ms here)
                M = (e @ e.T) * s[0]
            else:
                ea = (self.e * np.sqrt(s)[:, None]).reshape(self.K, -1)  # see Quadratic
                M = ea @ ea.T
        if not bool(np.isfinite(M).all()):
            return None
        bound = 4 * self.K * EPS * float(np.abs(M).max())
        return replace(self, s=s, M=M, scale=quadratic_scale(M), rounding_bound=bound)

    def with_sample_weight(self, sample_weight: Any) -> DenseProblem | None:
        """The problem that :func:`prepare` gives for the same inputs with
        ``sample_weight`` (the same arithmetic: bit for bit the same fit)."""
        s = _sample_weights(sample_weight, self.s.size, _np())
        return None if s is None else self.weighted(s)

    def subset(self, rows: Any) -> DenseProblem:
        """The same problem on the samples ``rows`` (cross-validation), as the torch
        objectives' ``subset``: the sample weights renormalised over them."""
        s = self.s[rows]
        s = s / s.sum()
        if self.kind == "log_loss":
            assert self.q is not None
            return replace(self, q=self.q[:, rows], s=s, sqrt_s=None)
        sub = replace(self, e=self.e[:, rows]).weighted(s)
        assert sub is not None  # the rows' sums are at most the whole's
        return sub

    def value(self, w: Vec) -> tuple[float, Vec]:
        """The objective (with the pull towards equal weights) and its gradient."""
        if self.kind == "log_loss":
            assert self.q is not None
            u = w @ self.q
            self._blend = (w, u)  # the Hessian at the step taken reuses it
            f = -float(self.s @ _np().log(u))
            g = -(self.q @ (self.s / u))
        else:
            assert self.M is not None
            mw = self.M @ w
            f = max(float(w @ mw), 0.0)
            g = 2 * mw
        if self.lam > 0:
            d = w - 1.0 / self.K
            f += self.lam * float(d @ d)
            g = g + 2 * self.lam * d
        return f, g

    def hessian(self, w: Vec, idx: Any) -> Vec:
        np = _np()
        if self.kind == "log_loss":
            assert self.q is not None
            if self.sqrt_s is None:
                self.sqrt_s = np.sqrt(self.s)
            last = self._blend
            u = last[1] if last is not None and last[0] is w else w @ self.q
            q = self.q if idx.size == self.K else self.q[idx]  # (idx is sorted)
            a = q * (self.sqrt_s / u)
            h = a @ a.T
        else:
            assert self.M is not None
            h = 2 * self.M[np.ix_(idx, idx)]
        if self.lam > 0:
            h = h + 2 * self.lam * np.eye(idx.size)
        return h  # type: ignore[no-any-return]

    def within(self, gap: float, tol: float, w: Vec, g: Vec) -> bool:
        """:func:`convexmix.ensemble._objectives.within`, with the bounds of
        :class:`convexmix.ensemble._mse.Quadratic` (the log-loss has no rounding term)."""
        if gap <= tol:
            return True
        if self.kind == "log_loss" or gap > tol + self.rounding_bound:
            return False
        err = (2 * self.K * EPS) * (_np().abs(self.M) @ w)
        near = g - err <= (g + err).min()
        return gap <= tol + float(w @ err) + float(err[near].max())

    def loss(self, w: Vec) -> float:
        """The data loss at w, without the pull (mse from the data: no cancellation)."""
        if self.kind == "log_loss":
            assert self.q is not None
            return -float(self.s @ _np().log(w @ self.q))
        np = _np()
        resid = np.tensordot(w, self.e, axes=1)  # the blend of the residuals, (N, D)
        # one einsum, no temporary (numpy's sum over a short last axis is slow, and a
        # fresh (N,) array costs page faults in a new process)
        return float(np.einsum("n,nd,nd->", self.s, resid, resid))


def _np() -> Any:
    return sys.modules["numpy"]


def _sample_weights(sample_weight: Any, n: int, np: Any) -> Vec | None:
    """(N,) float64 sample weights that sum to 1, or None where the torch path must check."""
    if sample_weight is None:
        return np.full(n, 1.0 / n)  # type: ignore[no-any-return]
    sw = _array(sample_weight, np)
    if sw is None or sw.ndim != 1 or sw.shape[0] != n or sw.dtype.kind not in "fiub":
        return None
    sw = sw.astype(np.float64)
    if not bool(np.isfinite(sw).all()):
        return None
    with np.errstate(over="ignore"):
        total = float(sw.sum())
    if total == math.inf:  # as the torch path: an exact rescaling of relative weights
        sw = sw * OVERFLOW_RESCALE
        total = float(sw.sum())
    if not (math.isfinite(total) and total > 0) or not bool((sw >= 0).all()):
        return None
    return sw / total  # type: ignore[no-any-return]


def _labels(t: Any, n_classes: int, np: Any) -> Any:
    """(N,) int64 labels in [0, n_classes), or None (the torch path reports the error)."""
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        return None
    if t.dtype.kind == "f":
        if not bool(np.isfinite(t).all()):
            return None
        labels = t.astype(np.int64)
        if not bool((labels == t).all()):
            return None
    elif t.dtype.kind in "iub":
        labels = t.astype(np.int64, copy=False)
    else:
        return None
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        return None
    return labels


def prepare(
    predictions: Any,
    targets: Any,
    loss: Any,
    sample_weight: Any,
    validate: bool,
) -> DenseProblem | None:
    """The checked small problem, or None where the torch path must take the fit: a size
    above :data:`DENSE_MAX_VALUES` or :data:`DENSE_MAX_MODELS`, inputs it does not read
    (files, memory maps, lists, GPU tensors), a callable loss, and any input that fails a
    check (the torch path raises the documented error)."""
    if loss not in ("log_loss", "mse"):
        return None
    np = _numpy()
    if np is None:
        return None
    P = _array(predictions, np)
    t = _array(targets, np)
    if P is None or t is None or P.ndim not in (2, 3) or P.dtype.kind != "f":
        return None
    K, N = P.shape[0], P.shape[1]
    if K < 1 or N < 1 or K > DENSE_MAX_MODELS or K * N > DENSE_MAX_VALUES:
        return None
    if P.ndim == 3 and P.shape[2] < 1:
        return None
    if t.ndim == 0 or t.shape[0] != N:
        return None
    s = _sample_weights(sample_weight, N, np)
    if s is None:
        return None
    if loss == "log_loss":
        if P.ndim == 3:
            labels = _labels(t, P.shape[2], np)
            if labels is None:
                return None
            if validate:
                lo = P.min()
                # The row sums as a matrix-vector product: numpy's reduction over a short
                # last axis costs 6x more (K = 20, N = 10^4, 10 classes: 3.9 ms against
                # 0.6 ms, more than the fit). NaN and inf fail both bounds.
                ones = np.ones(P.shape[2], dtype=P.dtype if P.dtype.itemsize >= 4 else None)
                sums = P @ ones
                if not (lo >= 0 and sums.min() >= 1 - PROB_ATOL and sums.max() <= 1 + PROB_ATOL):
                    return None
            C = P.shape[2]
            if P.flags.c_contiguous:  # one flat gather: 0.6x the time of the 3-d index
                q = P.reshape(K, N * C)[:, np.arange(N) * C + labels].astype(np.float64)
            else:
                q = P[:, np.arange(N), labels].astype(np.float64)
        else:
            labels = _labels(t, 2, np)
            if labels is None:
                return None
            if validate and not (P.min() >= 0 and P.max() <= 1):
                return None
            q = np.where(labels.astype(bool), P, 1 - P).astype(np.float64)
        np.maximum(q, LOG_LOSS_EPS, out=q)
        return DenseProblem(K, "log_loss", s, q=q)
    if validate and not bool(np.isfinite(P).all()):
        return None
    if P.ndim == 3:  # the Brier score on class probabilities
        labels = _labels(t, P.shape[2], np)
        if labels is None:
            return None
        e = P.astype(np.float64)  # a copy: the errors are formed in place
        e[:, np.arange(N), labels] -= 1.0  # minus the one-hot targets
    else:
        if t.ndim != 1 or t.dtype.kind not in "fiub":
            return None
        y = np.asarray(t, dtype=np.float64)  # (no copy of float64 targets)
        if not bool(np.isfinite(y).all()):
            return None
        e = np.subtract(P[..., None], y[:, None], dtype=np.float64)  # one pass
    # One (K, N, D) array of errors, formed once: fresh temporaries cost page faults
    # in a new process (K = 2, N = 10^5: 7 ms for four of them, against 2 ms for SLSQP).
    return DenseProblem(K, "mse", s, e=e).weighted(s)


def _eqp(kkt: Vec, rhs: Vec, F: Any) -> tuple[Vec, float]:
    np = _np()
    rows = np.append(F, rhs.size - 1)
    a, b = kkt[np.ix_(rows, rows)], rhs[rows]
    try:
        sol = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # singular to working precision: see _solver.solve_kkt
        sol = np.linalg.lstsq(a, b, rcond=None)[0]
    return sol[:-1], -float(sol[-1])


def simplex_qp(A: Vec, c: Vec, v: Vec) -> Vec:
    """argmin 1/2 x'Ax + c'x over the unit simplex, from a feasible ``v``: the same
    primal-dual active-set iterations with the primal method as the fallback as
    :func:`convexmix.ensemble._solver.simplex_qp`, in numpy."""
    np = _np()
    K = c.size
    v = v.copy()
    kkt = np.ones((K + 1, K + 1))
    kkt[:K, :K] = A
    kkt[K, K] = 0.0
    rhs = np.append(-c, 1.0)
    A_abs, c_abs = np.abs(A), np.abs(c)
    g0 = c + A @ v
    free = (g0 - float(v @ g0)) <= A.diagonal() * v
    for _ in range(25):  # primal-dual active set
        F = free.nonzero()[0]
        if F.size == 0:
            break
        x, mu = _eqp(kkt, rhs, F)
        full = np.zeros(K)
        full[F] = x
        lam = c + A[:, F] @ x - mu
        err = (c_abs + A_abs[:, F] @ np.abs(x) + abs(mu)) * 1e-13
        slack = lam + err
        if bool((x >= 0).all()) and bool(((slack >= 0) | free).all()):
            return full  # type: ignore[no-any-return]
        new_free = (free & (full > 0)) | (~free & (slack < 0))
        if bool((new_free == free).all()):
            break
        free = new_free
    free = v > 0
    for _ in range(20 * K + 20):  # primal active set
        F = free.nonzero()[0]
        x, mu = _eqp(kkt, rhs, F)
        if bool((x >= 0).all()):
            v[:] = 0.0
            v[F] = x
            if F.size == K:
                return v
            rest = (~free).nonzero()[0]
            arf = A[np.ix_(rest, F)]
            lam = arf @ x + c[rest] - mu
            err = 1e-13 * (np.abs(arf) @ x + np.abs(c[rest]) + abs(mu))
            j = int((lam + err).argmin())
            if float(lam[j] + err[j]) >= 0:
                return v
            free[rest[j]] = True
        else:
            vf = v[F]
            neg = (x < 0).nonzero()[0]
            ratios = vf[neg] / (vf[neg] - x[neg])
            i = int(ratios.argmin())
            t = float(ratios[i])
            v[F] = vf + t * (x - vf)
            v[F[neg[i]]] = 0.0
            np.maximum(v, 0.0, out=v)
            free = v > 0
            free[F[neg[i]]] = False
    return v  # pragma: no cover - the active-set method ends long before this


def _gap(w: Vec, g: Vec) -> float:
    """:func:`fw_gap` in numpy: ``w @ (g - min g)``, every term >= 0."""
    return max(float(w @ (g - g.min())), 0.0)


def _newton(
    obj: DenseProblem,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None,
    w0: Vec | None = None,
) -> Solution:
    """:func:`convexmix.ensemble._solver._newton` (with its exact Hessians) in numpy."""
    np = _np()
    K = obj.K
    w = np.full(K, 1.0 / K) if w0 is None else w0
    f, g = obj.value(w)
    if not (math.isfinite(f) and bool(np.isfinite(g).all())):
        raise ConvexMixError(  # pragma: no cover - prepare() checked the inputs
            f"the loss is not finite at the starting weights (loss {f})."
        )
    history = [f]
    gap = _gap(w, g)
    it = 0
    while it < max_iter and not obj.within(gap, tol, w, g):
        it += 1
        mu = float(w @ g)
        idx = ((w > 0) | (g < mu)).nonzero()[0]
        H = obj.hessian(w, idx)
        H = H + np.diag(1e-12 * np.abs(H.diagonal()) + 1e-300)  # see _solver.ridge
        w_idx = w[idx]
        v = simplex_qp(H, g[idx] - H @ w_idx, w_idx)
        target = np.zeros(K)
        target[idx] = v
        d = target - w
        slope = float((g - mu) @ d)
        t = 1.0
        step = None
        if not slope < 0:  # rounding: the full step if it lowers the gap (_solver.line_search)
            f_new, g_new = obj.value(target)
            if f_new <= f + 1e-13 * max(1.0, abs(f)) and _gap(target, g_new) < gap:
                step = target, f_new, g_new
            t = 0.0
        while t > 1e-10:  # Armijo backtracking, as _solver.line_search
            cand = target if t == 1.0 else w + t * d
            f_new, g_new = obj.value(cand)
            if f_new <= f + 1e-4 * t * slope or (
                t == 1.0 and f_new <= f + 1e-13 * max(1.0, abs(f)) and _gap(cand, g_new) < gap
            ):
                step = cand, f_new, g_new
                break
            t *= 0.5
        if step is None:
            break
        w, f, g = step
        history.append(f)
        gap = _gap(w, g)
        if callback is not None:
            callback(it, f, gap)
    w = np.maximum(w, 0.0)
    return w / w.sum(), history, it, gap, obj.within(gap, tol, w, g)


def cv_lambda(
    problem: DenseProblem, folds: int, tol: float, max_iter: int, seed: int
) -> tuple[float, Vec]:
    """:func:`convexmix.ensemble._solver.cv_lambda` on the dense path: the same folds
    (torch's permutation of the same seed), grid and warm starts along the lambda path;
    the fits start from the previous fold's optima and use exact Hessians."""
    import torch

    np = _np()
    n = problem.s.size
    if n < 2 * folds:
        raise ConvexMixError(
            f"regularization='cv' needs at least {2 * folds} samples for {folds} folds; got {n}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    shuffled = problem.subset(order)
    bounds = [0]
    for part in torch.arange(n).chunk(folds):
        bounds.append(bounds[-1] + part.numel())
    grid = [0.0, *(float(x) for x in torch.logspace(-4, 1, 11, dtype=torch.float64))]
    scores = np.zeros(len(grid))
    optima = np.zeros((len(grid), problem.K))
    before: list[Vec] = []
    for i in range(folds):
        a, b = bounds[i], bounds[i + 1]
        kept = np.concatenate([np.arange(0, a), np.arange(b, n)])
        train, test = shuffled.subset(kept), shuffled.subset(np.arange(a, b))
        w: Vec | None = None
        prev: Vec | None = None
        here: list[Vec] = []
        for j in reversed(range(len(grid))):
            start: Vec | None
            if before:
                start = before[len(here)]
                if w is not None:  # this fold's shift from the previous fold
                    start = np.maximum(start + (w - before[len(here) - 1]), 0.0)
                    start /= start.sum()
            else:
                start = w
                if w is not None and prev is not None and grid[j] > 0:
                    start = np.maximum(2 * w - prev, 0.0)  # a secant step along the path
                    start /= start.sum()
            prev = w
            stop = stopping_gap(max(tol, CV_TOL), problem.scale, grid[j])
            w = solve(replace(train, lam=grid[j]), stop, max_iter, None, start)[0]
            here.append(w)
            scores[j] += test.value(w)[0] * (b - a) / n
            optima[j] += w
        before = here
    best = int(scores.argmin())
    return grid[best], optima[best] / optima[best].sum()


def solve(
    obj: DenseProblem,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None = None,
    w0: Vec | None = None,
) -> Solution:
    """Newton from equal weights (or ``w0``), then again with the weights below ``PRUNE_BELOW`` set
    to 0, as :func:`convexmix.ensemble._solver.solve`."""
    np = _np()
    w, history, n_iter, gap, converged = _newton(obj, tol, max_iter, callback, w0)
    tiny = (w > 0) & (w < PRUNE_BELOW)
    if not bool(tiny.any()):
        return w, history, n_iter, gap, converged
    pruned = np.where(tiny, 0.0, w)
    pruned /= pruned.sum()
    w2, history2, n2, gap2, conv2 = _newton(obj, tol, max_iter, None, pruned)
    f, f2 = history[-1], history2[-1]
    if f2 <= f + 1e-12 * max(1.0, abs(f)) and not bool(((w2 > 0) & (w2 < PRUNE_BELOW)).any()):
        return w2, history + history2[1:], n_iter + n2, gap2, conv2
    return w, history, n_iter, gap, converged
