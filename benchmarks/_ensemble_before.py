# The ensemble module as it was before issue 17 (commit 93cfb56): the reference of
# bench_ensemble.py's cv-guard timing. Not part of the library.
# ruff: noqa
# mypy: ignore-errors
"""Convex blend weights for K models' stored predictions: the exact optimum, and Caruana.

:func:`fit_weights` solves

    min_w  L(sum_k w_k P_k, y) + lam * ||w - 1/K||^2    subject to  w >= 0,  sum_k w_k = 1

exactly: a Newton method whose steps solve the quadratic model on the simplex with a
finite active-set method, with a backtracking line search on the exact objective. It
stops when the Frank-Wolfe gap ``w.g - min_k g_k``, an upper bound on the distance to the
optimal loss, is below ``tol``; models the optimum does not use get weights of exactly 0.
Log-loss only needs each model's probability of the true class, so the (K, N, C) input
is read once and the iterations work on a (K, N) matrix.

:func:`ensemble_selection` is Caruana et al.'s greedy forward selection with replacement
(ICML 2004), the baseline of auto-sklearn and AutoGluon: weights are multiples of 1/size.

>>> import torch, convexmix as cx
>>> y = torch.tensor([0, 1, 1, 0])
>>> good = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
>>> bad = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]])
>>> fit = cx.ensemble.fit_weights(torch.stack([good, bad]), y)
>>> fit.weights
tensor([1., 0.], dtype=torch.float64)
>>> round(fit.loss, 4)
0.3284
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError
from convexmix.functional._registry import get_map

__all__ = ["Comparison", "EnsembleResult", "compare", "ensemble_selection", "fit_weights"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Loss = Literal["log_loss", "mse"] | LossFn
#: The log-loss floors each model's probability of the true class at this value, so a
#: model that gives the true class probability 0 costs ``-log(1e-15) = 34.5``, not inf.
LOG_LOSS_EPS = 1e-15
#: Rows of class probabilities must sum to 1 within this tolerance.
PROB_ATOL = 1e-3


@dataclass
class EnsembleResult:
    """The outcome of :func:`fit_weights` or :func:`ensemble_selection`.

    Attributes:
        weights: (K,) float64 weights, >= 0, summing to 1.
        loss: the loss of the blend (without the regularisation term).
        history: the objective after each iteration (fit) or each added model (Caruana).
        n_iter: Newton iterations (fit) or models in the selected ensemble (Caruana).
        gap: Frank-Wolfe gap at ``weights``: an upper bound on ``objective - optimum``.
        converged: whether ``gap <= tol`` was reached (always True for Caruana).
        free: pre-weights for ``map``, so that ``map(free) == weights`` (softmax cannot
            make exact zeros: they become ``log(1e-12)``-sized values). Use them to
            initialise a :class:`~convexmix.SimplexWeights` or a parametrized layer.
        map: the name of that map.
        regularization: the ``lam`` that was used (chosen by cross-validation for "cv").
        method: "newton" or "caruana".
    """

    weights: Tensor
    loss: float
    history: list[float] = field(repr=False)
    n_iter: int
    gap: float
    converged: bool
    free: Tensor = field(repr=False)
    map: str = "softmax"
    regularization: float = 0.0
    method: str = "newton"

    def predict(self, predictions: Any) -> Tensor:
        """The blend ``sum_k weights[k] * predictions[k]`` of (K, N) or (K, N, C) predictions."""
        p = _as_predictions(predictions)
        if p.shape[0] != self.weights.numel():
            raise ShapeError(
                f"predictions must hold {self.weights.numel()} models along dim 0; "
                f"got shape {tuple(p.shape)}."
            )
        blend: Tensor = torch.tensordot(self.weights.to(p.dtype), p, dims=1)
        return blend


# --------------------------------------------------------------------------- inputs


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    np = sys.modules.get("numpy")  # a numpy array means numpy is already imported
    if np is not None and isinstance(x, np.ndarray):
        if x.dtype == object or not (
            np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)
        ):
            raise ConvexMixError(f"{name} must be numeric; got an array of dtype {x.dtype}.")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(v, Tensor) or hasattr(v, "__array__") for v in x):
            parts = [_as_tensor(v, name) for v in x]
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


def _as_predictions(predictions: Any) -> Tensor:
    p = _as_tensor(predictions, "predictions")
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


def _check_finite_min(p: Tensor, name: str) -> float:
    """min(p) in one pass; raises when any value is NaN or infinite."""
    lo, hi = torch.aminmax(p)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ConvexMixError(f"{name} must be finite; got NaN or infinite values.")
    return float(lo.item())


def _class_targets(t: Tensor, n_classes: int, n: int) -> Tensor:
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ShapeError(
            f"targets must be (N,) class labels with N={n} like the predictions; "
            f"got shape {tuple(t.shape)}."
        )
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ConvexMixError("targets must be integer class labels; got non-integer values.")
    elif t.dtype == torch.bool:
        t = t.long()
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ConvexMixError(
            f"targets must be class labels in [0, {n_classes - 1}]; "
            f"got values in [{int(t.min())}, {int(t.max())}]."
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


def _true_class_probabilities(p: Tensor, t: Tensor, validate: bool) -> Tensor:
    """(K, N) probabilities of the true class from (K, N, C) class probabilities.

    Reads the predictions once from memory: each model's rows go by in chunks of about
    1 MB, and the checks and the gather run on a chunk while it is in cache.
    """
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
    q = torch.empty(K, N, dtype=p.dtype)
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
                _probability_error(k, lo, sums)
    return q


def _sample_weights(sample_weight: Any, n: int) -> Tensor:
    if sample_weight is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    s = _as_tensor(sample_weight, "sample_weight").double()
    if s.dim() != 1 or s.shape[0] != n:
        raise ShapeError(
            f"sample_weight must be (N,) with N={n} like the predictions; "
            f"got shape {tuple(s.shape)}."
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ConvexMixError("sample_weight must be finite and >= 0, with a positive sum.")
    return s / s.sum()


# ----------------------------------------------------------------------- objectives


class _Objective(Protocol):
    K: int

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        """f(w) and a function that returns the gradient at the same w."""
        ...

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        """The Hessian at w restricted to rows and columns ``idx``."""
        ...

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        """f((counts + e_k) / (m + 1)) for every k: one step of Caruana's selection."""
        ...

    def subset(self, rows: Tensor) -> _Objective:
        """The same objective on the samples ``rows`` (for cross-validation)."""
        ...


class _LogLoss:
    """-sum_n s_n log(sum_k w_k q_kn) with q_kn the probability model k gives sample n's class."""

    _BLOCK = 8192

    def __init__(self, q: Tensor, s: Tensor) -> None:
        # q is always a fresh (K, N) tensor made by _objective: floor it in place.
        self.q = q.double().clamp_min_(LOG_LOSS_EPS)
        self.s = s
        self.K = q.shape[0]
        self._last: tuple[Tensor, Tensor] | None = None

    def _blend(self, w: Tensor) -> Tensor:
        if self._last is None or self._last[0] is not w:
            self._last = (w, w @ self.q)
        return self._last[1]

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        u = self._blend(w)
        f = -float(self.s @ torch.log(u))
        return f, lambda: -(self.q @ (self.s / u))

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        # H = Q_idx diag(s / u^2) Q_idx', built in column blocks that stay in cache: a
        # (len(idx), N) scaled copy would cost more in page faults than the product.
        scale = self.s.sqrt() / self._blend(w)
        n, block = self.q.shape[1], self._BLOCK
        h = torch.zeros(idx.numel(), idx.numel(), dtype=torch.float64)
        rows = self.q if idx.numel() == self.K else self.q.index_select(0, idx)
        buf = torch.empty(idx.numel(), min(block, n), dtype=torch.float64)
        for start in range(0, n, block):
            stop = min(start + block, n)
            a = torch.mul(rows[:, start:stop], scale[start:stop], out=buf[:, : stop - start])
            h.addmm_(a, a.T)
        return h

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        u = (self.q + counts @ self.q).div_(m + 1)
        return -(torch.log(u) @ self.s)

    def subset(self, rows: Tensor) -> _LogLoss:
        s = self.s[rows]
        return _LogLoss(self.q[:, rows].clone(), s / s.sum())


class _Quadratic:
    """sum_n s_n ||sum_k w_k p_kn - y_n||^2 = w'Mw - 2r'w + c, kept as (M, r, c)."""

    def __init__(self, p: Tensor, y: Tensor, s: Tensor) -> None:
        # p: (K, N, D), y: (N, D)
        self.p, self.y, self.s = p, y, s
        self.K = p.shape[0]
        a = (p * s.sqrt()[:, None].to(p.dtype)).reshape(self.K, -1).double()
        b = (y * s.sqrt()[:, None].to(y.dtype)).reshape(-1).double()
        self.M = a @ a.T
        self.r = a @ b
        self.c = float(b @ b)

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        mw = self.M @ w
        f = float(w @ mw) - 2 * float(self.r @ w) + self.c
        return max(f, 0.0), lambda: 2 * (mw - self.r)

    def exact_value(self, w: Tensor) -> float:
        """The loss from the data (no cancellation when it is near 0)."""
        resid = torch.tensordot(w.to(self.p.dtype), self.p, dims=1) - self.y
        return float(self.s @ (resid.double() ** 2).sum(-1))

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        W = (counts[None, :] + torch.eye(self.K, dtype=counts.dtype)) / (m + 1)
        return ((W @ self.M) * W).sum(1) - 2 * (W @ self.r) + self.c

    def subset(self, rows: Tensor) -> _Quadratic:
        s = self.s[rows]
        return _Quadratic(self.p[:, rows], self.y[rows], s / s.sum())


class _CallableLoss:
    """A user loss ``fn(blend, targets)``: gradients by autograd, Hessians by torch.func."""

    def __init__(self, fn: LossFn, p: Tensor, t: Tensor, s: Tensor | None) -> None:
        self.fn, self.p, self.t, self.s = fn, p, t, s
        self.K = p.shape[0]

    def _f(self, w: Tensor) -> Tensor:
        out = self.fn(torch.tensordot(w.to(self.p.dtype), self.p, dims=1), self.t)
        if not isinstance(out, Tensor):
            raise ConvexMixError(
                f"loss must return a torch.Tensor (per-sample or scalar); got {type(out).__name__}."
            )
        if out.dim() == 0:
            if self.s is not None:
                raise ConvexMixError(
                    "with sample_weight, a callable loss must return per-sample losses (N,); "
                    "got a scalar."
                )
            return out.double()
        if out.shape != (self.p.shape[1],):
            raise ShapeError(
                f"loss must return a scalar or per-sample losses of shape ({self.p.shape[1]},); "
                f"got shape {tuple(out.shape)}."
            )
        s = self.s if self.s is not None else torch.full_like(out, 1.0 / out.numel())
        return (out.double() * s.double()).sum()

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._f(w)
            (grad,) = torch.autograd.grad(f, w, allow_unused=True)
        g = torch.zeros_like(w) if grad is None else grad.detach()
        return float(f.detach()), lambda: g

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        try:
            h: Tensor = torch.func.jacrev(torch.func.grad(self._f), chunk_size=8)(w.detach())
        except Exception:  # not torch.func-compatible: forward differences of the gradient
            g0 = self.value(w)[1]()
            h = torch.empty(self.K, self.K, dtype=torch.float64)
            step = 1e-6
            for j in range(self.K):
                e = w.clone()
                e[j] += step
                h[:, j] = (self.value(e)[1]() - g0) / step
            h = (h + h.T) / 2
        return h[idx][:, idx]

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        eye = torch.eye(self.K, dtype=torch.float64)
        return torch.tensor(
            [self.value((counts + eye[k]) / (m + 1))[0] for k in range(self.K)],
            dtype=torch.float64,
        )

    def subset(self, rows: Tensor) -> _CallableLoss:
        s = None if self.s is None else self.s[rows] / self.s[rows].sum()
        return _CallableLoss(self.fn, self.p[:, rows], self.t[rows], s)


class _Regularized:
    """objective + lam * ||w - 1/K||^2: a pull towards equal weights."""

    def __init__(self, base: _Objective, lam: float) -> None:
        self.base, self.lam, self.K = base, lam, base.K

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        f, grad = self.base.value(w)
        d = w - 1.0 / self.K
        return f + self.lam * float(d @ d), lambda: grad() + 2 * self.lam * d

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        h = self.base.hessian(w, idx)
        return h + 2 * self.lam * torch.eye(idx.numel(), dtype=h.dtype)

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:  # pragma: no cover - unused
        return self.base.greedy_values(counts, m)

    def subset(self, rows: Tensor) -> _Regularized:
        return _Regularized(self.base.subset(rows), self.lam)


def _objective(
    predictions: Any, targets: Any, loss: Loss, sample_weight: Any, validate: bool
) -> tuple[_Objective, Tensor]:
    """Check the inputs and build the objective; also returns the predictions tensor."""
    p = _as_predictions(predictions)
    N = p.shape[1]
    t = _as_tensor(targets, "targets")
    if t.dim() == 0 or t.shape[0] != N:
        raise ShapeError(
            f"targets must have N={N} rows like the predictions {tuple(p.shape)}; "
            f"got shape {tuple(t.shape)}."
        )
    s = _sample_weights(sample_weight, N)
    if callable(loss):
        if validate:
            _check_finite_min(p, "predictions")
        tt = t if not t.is_floating_point() else t.to(p.dtype)
        return _CallableLoss(loss, p, tt, None if sample_weight is None else s), p
    if loss == "log_loss":
        if p.dim() == 3:
            t = _class_targets(t, p.shape[2], N)
            return _LogLoss(_true_class_probabilities(p, t, validate), s), p
        t = _class_targets(t, 2, N)  # (K, N): probabilities of class 1
        if validate:
            lo = _check_finite_min(p, "predictions")
            hi = float(p.max())
            if lo < 0 or hi > 1:
                raise InvalidProbabilitiesError(
                    "binary predictions (K, N) must be probabilities of class 1 in [0, 1]; "
                    f"got values in [{lo:.3g}, {hi:.3g}]."
                )
        q = torch.where(t.bool()[None, :], p, 1 - p)
        return _LogLoss(q, s), p
    if loss == "mse":
        if validate:
            _check_finite_min(p, "predictions")
        if p.dim() == 3:  # Brier score on class probabilities
            t = _class_targets(t, p.shape[2], N)
            y = torch.nn.functional.one_hot(t, p.shape[2]).to(p.dtype)
            return _Quadratic(p, y, s), p
        if t.dim() != 1:
            raise ShapeError(
                f"regression targets must be (N,) with N={N}; got shape {tuple(t.shape)}."
            )
        y = t.to(p.dtype)
        if validate and not bool(torch.isfinite(y).all()):
            raise ConvexMixError("targets must be finite; got NaN or infinite values.")
        return _Quadratic(p[..., None], y[:, None], s), p
    raise ConvexMixError(f"loss must be 'log_loss', 'mse' or a callable; got {loss!r}.")


# --------------------------------------------------------------------------- solver


def _initial_support(A: Tensor, c: Tensor, v: Tensor) -> Tensor:
    """The coordinates whose gradient at ``v`` is at most its mean: a first support guess
    (never empty in exact arithmetic: the support's smallest gradient is below the mean)."""
    g = A @ v + c
    return g <= float(v @ g)


def _eqp(A: Tensor, c: Tensor, F: Tensor) -> tuple[Tensor, float]:
    """Minimiser x of 1/2 x'A_FF x + c_F'x with sum(x) = 1, and its multiplier mu."""
    n = F.numel()
    kkt = torch.zeros(n + 1, n + 1, dtype=A.dtype)
    kkt[:n, :n] = A[F][:, F]
    kkt[:n, n] = 1
    kkt[n, :n] = 1
    sol = torch.linalg.solve(kkt, torch.cat([-c[F], torch.ones(1, dtype=A.dtype)]))
    return sol[:n], -float(sol[n])


def _pdas(A: Tensor, c: Tensor, free: Tensor) -> Tensor | None:
    """Primal-dual active-set iterations (Hintermueller, Ito & Kunisch 2002).

    Each iteration re-guesses the whole support from the signs of the solution and of
    the multipliers, so a support of 5 out of 50 takes a few solves instead of 45. It
    stops only at a point that satisfies the KKT conditions (the exact minimiser), and
    returns None when it does not settle (it can cycle), for the primal method to take over.
    """
    K = c.numel()
    for _ in range(25):
        F = free.nonzero().squeeze(1)
        if F.numel() == 0:
            return None
        x, mu = _eqp(A, c, F)
        full = torch.zeros(K, dtype=A.dtype)
        full[F] = x
        lam = A[:, F] @ x + c - mu
        err = 1e-13 * (A[:, F].abs() @ x.abs() + c.abs() + abs(mu))
        new_free = (free & (full > 0)) | (~free & (lam + err < 0))
        if bool((x >= 0).all()) and bool((lam[~free] + err[~free] >= 0).all()):
            return full
        if bool((new_free == free).all()):
            return None
        free = new_free
    return None


def _simplex_qp(A: Tensor, c: Tensor, v: Tensor) -> Tensor:
    """argmin 1/2 v'Av + c'v over the unit simplex, from a feasible ``v``.

    First a few primal-dual active-set iterations; if they do not settle, a primal
    active-set method: each iteration solves the equality-constrained problem on the free
    coordinates, then either steps to it (and frees the coordinate with the most negative
    multiplier) or stops at the first coordinate that would go negative. It ends in
    finitely many steps at the exact minimiser (A positive semidefinite; a relative ridge
    of 1e-12 on the diagonal makes ties between identical models harmless).
    """
    K = c.numel()
    v = v.clone()
    # A relative ridge on each diagonal entry: identical models make A singular.
    A = A + torch.diag(1e-12 * A.diagonal().abs() + 1e-300)
    guess = _pdas(A, c, _initial_support(A, c, v))
    if guess is not None:
        return guess
    free = v > 0
    ones = torch.ones(1, dtype=A.dtype)
    for _ in range(20 * K + 20):
        F = free.nonzero().squeeze(1)
        n = F.numel()
        kkt = torch.zeros(n + 1, n + 1, dtype=A.dtype)
        kkt[:n, :n] = A[F][:, F]
        kkt[:n, n] = 1
        kkt[n, :n] = 1
        sol = torch.linalg.solve(kkt, torch.cat([-c[F], ones]))
        x, mu = sol[:n], -sol[n]
        if bool((x >= 0).all()):
            v.zero_()
            v[F] = x
            if n == K:
                return v
            rest = (~free).nonzero().squeeze(1)
            arf = A[rest][:, F]
            lam = arf @ x + c[rest] - mu
            # the rounding error of each multiplier: ~1e-13 of the terms it sums
            err = 1e-13 * (arf.abs() @ x + c[rest].abs() + abs(mu))
            j = int((lam + err).argmin())
            if float(lam[j] + err[j]) >= 0:
                return v
            free[rest[j]] = True
        else:
            vf = v[F]
            neg = (x < 0).nonzero().squeeze(1)
            ratios = vf[neg] / (vf[neg] - x[neg])
            i = int(ratios.argmin())
            t = float(ratios[i])
            v[F] = vf + t * (x - vf)
            v[F[neg[i]]] = 0.0
            v.clamp_(min=0.0)
            free = v > 0
            free[F[neg[i]]] = False
    return v  # pragma: no cover - the active-set method ends long before this


def _fw_gap(w: Tensor, g: Tensor) -> float:
    return max(float(w @ g - g.min()), 0.0)


def _newton(
    obj: _Objective,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None,
    w0: Tensor | None = None,
) -> tuple[Tensor, list[float], int, float, bool]:
    K = obj.K
    w = torch.full((K,), 1.0 / K, dtype=torch.float64) if w0 is None else w0
    f, grad = obj.value(w)
    g = grad()
    history = [f]
    gap = _fw_gap(w, g)
    it = 0
    while gap > tol and it < max_iter:
        it += 1
        mu = float(w @ g)
        idx = ((w > 0) | (g < mu)).nonzero().squeeze(1)
        H = obj.hessian(w, idx)
        v = _simplex_qp(H, g[idx] - H @ w[idx], w[idx])
        target = torch.zeros_like(w)
        target[idx] = v
        d = target - w
        slope = float((g - mu) @ d)  # sum(d) = 0 up to rounding, which (g @ d) would amplify
        if not slope < 0:
            break  # the model predicts no decrease: rounding level
        t, accepted = 1.0, False
        while t > 1e-10:
            cand = target if t == 1.0 else w + t * d
            f_new, grad_new = obj.value(cand)
            if f_new <= f + 1e-4 * t * slope:
                accepted = True
                break
            if t == 1.0 and f_new <= f + 1e-13 * max(1.0, abs(f)):
                # Near the optimum the decrease is below the rounding of f (a sum of N
                # terms); the gradient still resolves it: keep a full step that
                # shrinks the gap.
                g_new = grad_new()
                if _fw_gap(cand, g_new) < gap:
                    accepted = True
                    break
            t *= 0.5
        if not accepted:
            break
        w, f = cand, f_new
        g = grad_new()
        history.append(f)
        gap = _fw_gap(w, g)
        if callback is not None:
            callback(it, f, gap)
    w = w.clamp_min(0)
    return w / w.sum(), history, it, gap, gap <= tol


#: After convergence, weights below this are tried at exactly 0 (see :func:`_solve`).
PRUNE_BELOW = 1e-9


def _solve(
    obj: _Objective,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None = None,
) -> tuple[Tensor, list[float], int, float, bool]:
    """Newton from equal weights, then the same with the tiny weights set to exactly 0.

    When the optimum is degenerate (a zero loss, or models whose gradient ties with the
    support's), the multipliers of the unused models are at rounding level and the
    solution can keep them at 1e-13 instead of 0. Those weights are dropped and the fit
    resumed; the pruned point is kept when its objective is no worse than rounding.
    """
    w, history, n_iter, gap, converged = _newton(obj, tol, max_iter, callback)
    tiny = (w > 0) & (w < PRUNE_BELOW)
    if not bool(tiny.any()):
        return w, history, n_iter, gap, converged
    pruned = torch.where(tiny, 0.0, w)
    pruned /= pruned.sum()
    w2, history2, n2, gap2, conv2 = _newton(obj, tol, max_iter, None, w0=pruned)
    f, f2 = history[-1], history2[-1]
    if f2 <= f + 1e-12 * max(1.0, abs(f)) and not bool(((w2 > 0) & (w2 < PRUNE_BELOW)).any()):
        return w2, history + history2[1:], n_iter + n2, gap2, conv2
    return w, history, n_iter, gap, converged


def _free(weights: Tensor, map: str) -> Tensor:
    spec = get_map(map)
    return spec.inverse(weights, -1, 1.0)


def _cv_lambda(obj: _Objective, folds: int, tol: float, max_iter: int, seed: int) -> float:
    """The regularisation strength with the lowest cross-validated loss."""
    n = _n_samples(obj)
    if n < 2 * folds:
        raise ConvexMixError(
            f"regularization='cv' needs at least {2 * folds} samples for {folds} folds; got {n}."
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    parts = order.chunk(folds)
    grid = [0.0, *(float(x) for x in torch.logspace(-4, 1, 11, dtype=torch.float64))]
    scores = torch.zeros(len(grid), dtype=torch.float64)
    for i in range(folds):
        held = parts[i]
        kept = torch.cat([parts[j] for j in range(folds) if j != i])
        train, test = obj.subset(kept), obj.subset(held)
        for j, lam in enumerate(grid):
            inner = _Regularized(train, lam) if lam > 0 else train
            w = _solve(inner, tol, max_iter)[0]
            scores[j] += test.value(w)[0] * held.numel() / n
    return grid[int(scores.argmin())]


def _n_samples(obj: _Objective) -> int:
    base = obj.base if isinstance(obj, _Regularized) else obj
    if isinstance(base, _LogLoss):
        return int(base.q.shape[1])
    if isinstance(base, (_Quadratic, _CallableLoss)):
        return int(base.p.shape[1])
    raise AssertionError(type(base))  # pragma: no cover


def _loss_value(obj: _Objective, w: Tensor) -> float:
    if isinstance(obj, _Quadratic):
        return obj.exact_value(w)
    return obj.value(w)[0]


def fit_weights(
    predictions: Any,
    targets: Any,
    *,
    loss: Loss = "log_loss",
    map: str = "softmax",
    sample_weight: Any = None,
    regularization: float | Literal["cv"] = 0.0,
    tol: float = 1e-10,
    max_iter: int = 200,
    validate: bool = True,
    cv_folds: int = 5,
    seed: int = 0,
    callback: Callable[[int, float, float], None] | None = None,
) -> EnsembleResult:
    """The convex blend weights that minimise a loss on stored predictions, exactly.

    Args:
        predictions: (K, N, C) class probabilities of K models for N samples, (K, N)
            probabilities of class 1 (binary log-loss) or (K, N) regression outputs
            (``loss="mse"``). A tensor, a numpy array or a list of K per-model arrays.
        targets: (N,) class labels (log-loss, and mse on probabilities, which is the
            Brier score) or (N,) regression targets.
        loss: "log_loss", "mse", or a callable ``loss(blend, targets)`` on the (N,) or
            (N, C) blend that returns per-sample losses (N,) or their mean; it must be
            convex in the blend for the optimum to be global, and written in torch ops.
        map: the simplex map whose pre-weights ``result.free`` should reproduce the
            weights. The optimum itself does not depend on it.
        sample_weight: optional (N,) non-negative sample weights.
        regularization: ``lam`` of the penalty ``lam * ||w - 1/K||^2`` towards equal
            weights, or "cv" to choose it from ``{0} U logspace(-4, 1, 11)`` by
            ``cv_folds``-fold cross-validation (a guard for small validation sets).
        tol: stop when the Frank-Wolfe gap, an upper bound on the loss gap to the
            optimum, is at most ``tol``.
        max_iter: the most Newton iterations.
        validate: check that probabilities are finite, >= 0 and sum to 1 per row (one
            extra read of the predictions).
        cv_folds: folds for ``regularization="cv"``; ``seed`` shuffles them.
        seed: the seed of the cross-validation split.
        callback: ``callback(iteration, objective, gap)`` after each iteration, for
            progress displays.

    Returns:
        An :class:`EnsembleResult`; ``weights`` is (K,) float64 with exact zeros for the
        models the optimum leaves out.

    Raises:
        ShapeError: shapes that do not match.
        InvalidProbabilitiesError: class probabilities that are negative or whose rows do
            not sum to 1 (within 1e-3).
        ConvexMixError: NaN or infinite values, bad labels or arguments.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> cx.ensemble.fit_weights(p, y, loss="mse").weights
    tensor([0.2500, 0.7500, 0.0000], dtype=torch.float64)
    """
    _check_fit_args(map, tol, max_iter, regularization, cv_folds)
    obj, _ = _objective(predictions, targets, loss, sample_weight, validate)
    return _fit(obj, map, regularization, tol, max_iter, cv_folds, seed, callback)


def _non_negative_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _check_fit_args(
    map: str, tol: float, max_iter: int, regularization: float | str, cv_folds: int
) -> None:
    get_map(map)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
        raise ConvexMixError(f"tol must be a number > 0; got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConvexMixError(f"max_iter must be an int >= 1; got {max_iter!r}.")
    if isinstance(regularization, str):
        if regularization != "cv":
            raise ConvexMixError(
                f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
            )
        if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 2:
            raise ConvexMixError(f"cv_folds must be an int >= 2; got {cv_folds!r}.")
    elif not _non_negative_number(regularization):
        raise ConvexMixError(
            f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
        )


def _fit(
    obj: _Objective,
    map: str,
    regularization: float | str,
    tol: float,
    max_iter: int,
    cv_folds: int,
    seed: int,
    callback: Callable[[int, float, float], None] | None,
) -> EnsembleResult:
    if isinstance(regularization, str):
        lam = _cv_lambda(obj, cv_folds, tol, max_iter, seed)
    else:
        lam = float(regularization)
    solved = _Regularized(obj, lam) if lam > 0 else obj
    w, history, n_iter, gap, converged = _solve(solved, float(tol), max_iter, callback)
    return EnsembleResult(
        weights=w,
        loss=_loss_value(obj, w),
        history=history,
        n_iter=n_iter,
        gap=gap,
        converged=converged,
        free=_free(w, map),
        map=map,
        regularization=lam,
        method="newton",
    )


def ensemble_selection(
    predictions: Any,
    targets: Any,
    *,
    size: int = 50,
    loss: Loss = "log_loss",
    sample_weight: Any = None,
    best_prefix: bool = False,
    map: str = "softmax",
    validate: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> EnsembleResult:
    """Caruana's greedy ensemble selection with replacement (the auto-sklearn baseline).

    Starting from an empty ensemble, add ``size`` times the model (repeats allowed) whose
    addition gives the lowest loss of the running average; ties go to the lower index.
    The weights are the counts divided by the number of picks.

    Args:
        predictions, targets, loss, sample_weight, validate: as in :func:`fit_weights`.
        size: the number of picks; weights are multiples of ``1/size``.
        best_prefix: keep the prefix of the picks with the lowest loss (weights then are
            multiples of ``1/n_iter``), as Caruana et al. do.
        map: as in :func:`fit_weights`.
        callback: ``callback(picks, loss)`` after each pick.

    Returns:
        An :class:`EnsembleResult` with ``history`` the loss after each pick and
        ``gap`` the Frank-Wolfe gap of the selection for the exact problem.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> cx.ensemble.ensemble_selection(p, y, size=4, loss="mse").weights
    tensor([0.2500, 0.7500, 0.0000], dtype=torch.float64)
    """
    get_map(map)
    _check_size(size)
    obj, _ = _objective(predictions, targets, loss, sample_weight, validate)
    return _select(obj, size, best_prefix, map, callback)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConvexMixError(f"size must be an int >= 1; got {size!r}.")


def _select(
    obj: _Objective,
    size: int,
    best_prefix: bool,
    map: str,
    callback: Callable[[int, float], None] | None,
) -> EnsembleResult:
    counts = torch.zeros(obj.K, dtype=torch.float64)
    history: list[float] = []
    snapshots: list[Tensor] = []
    for m in range(size):
        values = obj.greedy_values(counts, m)
        values = torch.where(torch.isnan(values), torch.inf, values)
        k = int(values.argmin())
        counts[k] += 1
        history.append(float(values[k]))
        snapshots.append(counts.clone())
        if callback is not None:
            callback(m + 1, history[-1])
    n = int(torch.tensor(history).argmin()) + 1 if best_prefix else size
    w = snapshots[n - 1] / n
    grad = obj.value(w)[1]
    return EnsembleResult(
        weights=w,
        loss=_loss_value(obj, w),
        history=history,
        n_iter=n,
        gap=_fw_gap(w, grad()),
        converged=True,
        free=_free(w, map),
        map=map,
        regularization=0.0,
        method="caruana",
    )


@dataclass
class Comparison:
    """:func:`fit_weights` beside the usual alternatives, on the same predictions.

    Attributes:
        fit: the exact optimum (:func:`fit_weights`).
        caruana: greedy ensemble selection (:func:`ensemble_selection`).
        equal_loss: the loss of equal weights.
        single_losses: (K,) the loss of each model alone.
        best_single: the index of the best model alone.
    """

    fit: EnsembleResult
    caruana: EnsembleResult
    equal_loss: float
    single_losses: Tensor
    best_single: int

    def losses(self) -> dict[str, float]:
        """Method name -> loss, the exact fit first."""
        return {
            "convexmix": self.fit.loss,
            "caruana": self.caruana.loss,
            "equal_weights": self.equal_loss,
            "best_single": float(self.single_losses[self.best_single]),
        }


def compare(
    predictions: Any,
    targets: Any,
    *,
    loss: Loss = "log_loss",
    map: str = "softmax",
    sample_weight: Any = None,
    regularization: float | Literal["cv"] = 0.0,
    size: int = 50,
    tol: float = 1e-10,
    max_iter: int = 200,
    validate: bool = True,
    fit_callback: Callable[[int, float, float], None] | None = None,
    selection_callback: Callable[[int, float], None] | None = None,
) -> Comparison:
    """Fit the exact weights and score equal weights, each model alone and Caruana.

    The predictions are checked and reduced once for all of them. Arguments are those of
    :func:`fit_weights`, plus ``size`` for :func:`ensemble_selection`.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> c = cx.ensemble.compare(p, y, loss="mse", size=8)
    >>> {k: round(v, 4) for k, v in c.losses().items()}
    {'convexmix': 0.0, 'caruana': 0.0, 'equal_weights': 1.7824, 'best_single': 0.0417}
    """
    _check_fit_args(map, tol, max_iter, regularization, 5)
    _check_size(size)
    obj, _ = _objective(predictions, targets, loss, sample_weight, validate)
    fit = _fit(obj, map, regularization, tol, max_iter, 5, 0, fit_callback)
    caruana = _select(obj, size, False, map, selection_callback)
    K = obj.K
    eye = torch.eye(K, dtype=torch.float64)
    singles = torch.tensor([_loss_value(obj, eye[k]) for k in range(K)], dtype=torch.float64)
    equal = _loss_value(obj, torch.full((K,), 1.0 / K, dtype=torch.float64))
    return Comparison(fit, caruana, equal, singles, int(singles.argmin()))
