"""The mean squared error (and the Brier score) as a quadratic in the weights (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._objectives import CountsGreedy, Greedy, Reduce, local

__all__ = ["Quadratic", "quadratic_scale"]


def quadratic_scale(M: Any) -> float:
    """The scale of a squared-error loss, for a stopping rule that does not depend on the
    units (or the offset) of the targets: the largest single model's loss, the largest
    diagonal entry of the residuals' Gram matrix ``M`` (a tensor or an array), which
    bounds the loss of every blend; 1 when it is 0 (then every blend has loss 0)."""
    scale = float(M.diagonal().max())
    return scale if scale > 0 else 1.0


class Quadratic:
    """sum_n s_n ||sum_k w_k p_kn - y_n||^2 = w'Mw on the simplex, kept as M.

    The weights sum to one, so the blend's residual is the blend of the models' residuals
    ``d_kn = p_kn - y_n`` and ``M = sum_n s_n d_n d_n'`` (K, K) is their Gram matrix. Built
    from the residuals, not as ``w'(PP')w - 2 w'Py + y'y``, it keeps its precision when the
    targets sit far from 0 (a level of 1e6 with errors of 1 would cancel 12 digits there).
    ``p`` (K, N, D) may be memory-mapped: M is a sum over row chunks, in float64.
    """

    def __init__(
        self,
        p: Tensor,
        y: Tensor,
        s: Tensor,
        reduce: Reduce = local,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """``progress(done, N)`` after each chunk of rows of the pass over ``p``."""
        self.p, self.y, self.s, self.reduce = p, y, s, reduce
        K, N, D = p.shape
        self.K = K
        M = torch.zeros(K, K, dtype=torch.float64)
        rows = max(1, (1 << 21) // max(1, K * D * 8))
        for a in range(0, N, rows):
            b = min(a + rows, N)
            sq = s[a:b].sqrt()[:, None]
            # float64 residuals, each exact to one rounding whatever the targets' level
            da = ((p[:, a:b].double() - y[a:b].double()) * sq).reshape(K, -1)
            M.addmm_(da, da.T)
            if progress is not None:
                progress(b, N)
        self.M = reduce(M)

    @property
    def scale(self) -> float:
        return quadratic_scale(self.M)

    @property
    def n_samples(self) -> int:
        return int(self.p.shape[1])

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        mw = self.M @ w
        return max(float(w @ mw), 0.0), lambda: 2 * mw

    def loss(self, w: Tensor) -> float:
        """The loss from the data (no cancellation when it is near 0)."""
        N, D = self.p.shape[1], self.p.shape[2]
        rows = max(1, (1 << 21) // max(1, self.K * D * 8))
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            # in float64 whatever the predictions' dtype: the reported loss is exact
            resid = torch.tensordot(w, self.p[:, a:b].double() - self.y[a:b].double(), dims=1)
            total += self.s[a:b] @ (resid**2).sum(-1)
        return float(self.reduce(total))

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def greedy(self) -> Greedy:
        M = self.M  # each row of W sums to one: the residuals' Gram matrix applies
        return CountsGreedy(self.K, lambda W: ((W @ M) * W).sum(1))

    def subset(self, rows: Tensor) -> Quadratic:
        s = self.s[rows]
        return Quadratic(self.p[:, rows], self.y[rows], s / s.sum(), self.reduce)

    def with_weights(self, s: Tensor) -> Quadratic:
        return Quadratic(self.p, self.y, s, self.reduce)

    def sample(self) -> None:
        return None  # each Newton step costs O(K^2) already
