"""A user's loss function as the objective: autograd gradients, torch.func Hessians (private)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from convexmix.ensemble._objectives import CountsGreedy, Greedy, LossFn
from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["CallableLoss"]


class CallableLoss:
    """A user loss ``fn(blend, targets)``: gradients by autograd, Hessians by torch.func."""

    def __init__(self, fn: LossFn, p: Tensor, t: Tensor, s: Tensor | None) -> None:
        self.fn, self.p, self.t, self.s = fn, p, t, s
        self.K = p.shape[0]

    @property
    def scale(self) -> float:
        return 1.0

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

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
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

    def greedy(self) -> Greedy:
        def losses(W: Tensor) -> Tensor:
            return torch.tensor([self.value(w)[0] for w in W], dtype=torch.float64)

        return CountsGreedy(self.K, losses)

    def with_weights(self, s: Tensor) -> CallableLoss:
        return CallableLoss(self.fn, self.p, self.t, s)

    def sample(self) -> None:
        return None

    def subset(self, rows: Tensor) -> CallableLoss:
        s = None if self.s is None else self.s[rows] / self.s[rows].sum()
        return CallableLoss(self.fn, self.p[:, rows], self.t[rows], s)
