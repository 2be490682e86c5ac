"""The objectives the ensemble solver minimises over the simplex (private).

Each gives the value, the gradient and the Hessian the Newton solver needs; the data
objectives also give the loss without regularisation, their restriction to some rows
(cross-validation), and the values of one greedy step (Caruana's selection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError

__all__ = [
    "LOG_LOSS_EPS",
    "CallableLoss",
    "DataObjective",
    "LogLoss",
    "Loss",
    "LossFn",
    "Objective",
    "Quadratic",
    "Regularized",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Loss = Literal["log_loss", "mse"] | LossFn
#: The log-loss floors each model's probability of the true class at this value, so a
#: model that gives the true class probability 0 costs ``-log(1e-15) = 34.5``, not inf.
LOG_LOSS_EPS = 1e-15


class Objective(Protocol):
    """What the Newton solver needs: the value, the gradient and the Hessian."""

    K: int

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        """f(w) and a function that returns the gradient at the same w."""
        ...

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        """The Hessian at w restricted to rows and columns ``idx``."""
        ...


class DataObjective(Objective, Protocol):
    """A loss on N samples: also its exact value, its rows, and Caruana's greedy step."""

    @property
    def n_samples(self) -> int:
        """N, the number of samples."""
        ...

    def loss(self, w: Tensor) -> float:
        """The loss at w, as accurate as the data allow (the value reported to users)."""
        ...

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        """f((counts + e_k) / (m + 1)) for every k: one step of Caruana's selection."""
        ...

    def subset(self, rows: Tensor) -> DataObjective:
        """The same objective on the samples ``rows`` (for cross-validation)."""
        ...


class LogLoss:
    """-sum_n s_n log(sum_k w_k q_kn) with q_kn the probability model k gives sample n's class."""

    _BLOCK = 8192

    def __init__(self, q: Tensor, s: Tensor) -> None:
        # q is always a fresh (K, N) tensor made by make_objective: floor it in place.
        self.q = q.double().clamp_min_(LOG_LOSS_EPS)
        self.s = s
        self.K = q.shape[0]
        self._last: tuple[Tensor, Tensor] | None = None

    @property
    def n_samples(self) -> int:
        return int(self.q.shape[1])

    def _blend(self, w: Tensor) -> Tensor:
        if self._last is None or self._last[0] is not w:
            self._last = (w, w @ self.q)
        return self._last[1]

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        u = self._blend(w)
        f = -float(self.s @ torch.log(u))
        return f, lambda: -(self.q @ (self.s / u))

    def loss(self, w: Tensor) -> float:
        return self.value(w)[0]

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

    def subset(self, rows: Tensor) -> LogLoss:
        s = self.s[rows]
        return LogLoss(self.q[:, rows].clone(), s / s.sum())


class Quadratic:
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

    @property
    def n_samples(self) -> int:
        return int(self.p.shape[1])

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        mw = self.M @ w
        f = float(w @ mw) - 2 * float(self.r @ w) + self.c
        return max(f, 0.0), lambda: 2 * (mw - self.r)

    def loss(self, w: Tensor) -> float:
        """The loss from the data (no cancellation when it is near 0)."""
        resid = torch.tensordot(w.to(self.p.dtype), self.p, dims=1) - self.y
        return float(self.s @ (resid.double() ** 2).sum(-1))

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def greedy_values(self, counts: Tensor, m: int) -> Tensor:
        W = (counts[None, :] + torch.eye(self.K, dtype=counts.dtype)) / (m + 1)
        return ((W @ self.M) * W).sum(1) - 2 * (W @ self.r) + self.c

    def subset(self, rows: Tensor) -> Quadratic:
        s = self.s[rows]
        return Quadratic(self.p[:, rows], self.y[rows], s / s.sum())


class CallableLoss:
    """A user loss ``fn(blend, targets)``: gradients by autograd, Hessians by torch.func."""

    def __init__(self, fn: LossFn, p: Tensor, t: Tensor, s: Tensor | None) -> None:
        self.fn, self.p, self.t, self.s = fn, p, t, s
        self.K = p.shape[0]

    @property
    def n_samples(self) -> int:
        return int(self.p.shape[1])

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

    def loss(self, w: Tensor) -> float:
        return self.value(w)[0]

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

    def subset(self, rows: Tensor) -> CallableLoss:
        s = None if self.s is None else self.s[rows] / self.s[rows].sum()
        return CallableLoss(self.fn, self.p[:, rows], self.t[rows], s)


class Regularized:
    """objective + lam * ||w - 1/K||^2: a pull towards equal weights."""

    def __init__(self, base: Objective, lam: float) -> None:
        self.base, self.lam, self.K = base, lam, base.K

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        f, grad = self.base.value(w)
        d = w - 1.0 / self.K
        return f + self.lam * float(d @ d), lambda: grad() + 2 * self.lam * d

    def hessian(self, w: Tensor, idx: Tensor) -> Tensor:
        h = self.base.hessian(w, idx)
        return h + 2 * self.lam * torch.eye(idx.numel(), dtype=h.dtype)
