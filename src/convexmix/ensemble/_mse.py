"""The mean squared error (and the Brier score) as a quadratic in the weights (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._objectives import CountsGreedy, Greedy, Reduce, local

__all__ = ["Quadratic", "quadratic_scale"]


def quadratic_scale(M: Any, c: float) -> float:
    """The scale of a squared-error loss, for a stopping rule that does not depend on the
    units of the targets: the larger of the weighted mean square of the targets (``c``)
    and of the largest model's predictions (the largest diagonal entry of ``M``, a tensor
    or an array); 1 when both are 0 (then every blend has loss 0)."""
    scale = max(float(c), float(M.diagonal().max()))
    return scale if scale > 0 else 1.0


class Quadratic:
    """sum_n s_n ||sum_k w_k p_kn - y_n||^2 = w'Mw - 2r'w + c, kept as (M, r, c).

    ``p`` (K, N, D) may be memory-mapped: (M, r, c) are sums over row chunks, in float64.
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
        r = torch.zeros(K, dtype=torch.float64)
        c = torch.zeros((), dtype=torch.float64)
        rows = max(1, (1 << 21) // max(1, K * D * 8))
        for a in range(0, N, rows):
            b = min(a + rows, N)
            sq = s[a:b].sqrt()[:, None]
            pa = (p[:, a:b].double() * sq).reshape(K, -1)
            ya = (y[a:b].double() * sq).reshape(-1)
            M.addmm_(pa, pa.T)
            r.addmv_(pa, ya)
            c += ya @ ya
            if progress is not None:
                progress(b, N)
        self.M, self.r, self.c = reduce(M), reduce(r), float(reduce(c))

    @property
    def scale(self) -> float:
        return quadratic_scale(self.M, self.c)

    @property
    def n_samples(self) -> int:
        return int(self.p.shape[1])

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        mw = self.M @ w
        f = float(w @ mw) - 2 * float(self.r @ w) + self.c
        return max(f, 0.0), lambda: 2 * (mw - self.r)

    def loss(self, w: Tensor) -> float:
        """The loss from the data (no cancellation when it is near 0)."""
        N, D = self.p.shape[1], self.p.shape[2]
        rows = max(1, (1 << 21) // max(1, self.K * D * 8))
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            # in float64 whatever the predictions' dtype: the reported loss is exact
            resid = torch.tensordot(w, self.p[:, a:b].double(), dims=1) - self.y[a:b].double()
            total += self.s[a:b] @ (resid**2).sum(-1)
        return float(self.reduce(total))

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def greedy(self) -> Greedy:
        M, r, c = self.M, self.r, self.c
        return CountsGreedy(self.K, lambda W: ((W @ M) * W).sum(1) - 2 * (W @ r) + c)

    def subset(self, rows: Tensor) -> Quadratic:
        s = self.s[rows]
        return Quadratic(self.p[:, rows], self.y[rows], s / s.sum(), self.reduce)

    def with_weights(self, s: Tensor) -> Quadratic:
        return Quadratic(self.p, self.y, s, self.reduce)

    def sample(self) -> None:
        return None  # each Newton step costs O(K^2) already
