"""The mean squared error (and the Brier score) as a quadratic in the weights (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._objectives import CountsGreedy, Greedy, Reduce, local

__all__ = ["EPS", "Quadratic", "quadratic_scale"]


def quadratic_scale(M: Any) -> float:
    """The scale of the squared-error loss ``w'Mw`` (``M`` the errors' Gram matrix, a tensor
    or an array), to which ``tol`` is relative: the loss of the best model alone, the least
    diagonal entry of ``M`` (the optimum is at most that), so that the stopping rule
    depends neither on the units of the targets, nor on their offset, nor on a model far
    off; the largest when that is 0, and 1 when every entry is 0 (every blend then has
    loss 0)."""
    diagonal = [float(M[k, k]) for k in range(M.shape[0])]
    for scale in (min(diagonal), max(diagonal)):
        if scale > 0:
            return scale
    return 1.0


#: float64's machine epsilon.
EPS = float(torch.finfo(torch.float64).eps)


class Quadratic:
    """sum_n s_n ||sum_k w_k p_kn - y_n||^2 = w'Mw on the simplex, kept as M.

    Weights that sum to 1 blend the errors: ``sum_k w_k p_kn - y_n = sum_k w_k e_kn`` with
    ``e_kn = p_kn - y_n``, so ``M`` is the errors' weighted Gram matrix. Unlike the
    expansion ``w'P'Pw - 2 y'Pw + y'y`` it has no cancellation: targets around 1e6 with
    errors of 0.1 keep their 15 digits.

    ``p`` (K, N, D) may be memory-mapped: ``M`` is a sum over row chunks, in float64.
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
        # one buffer for every chunk, weighted in place (two temporaries a chunk cost a
        # new process 7 ms in page faults at K = 8, N = 10^5)
        buf = torch.empty(K, min(rows, N), D, dtype=torch.float64)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            ea = self._errors(a, b, buf).mul_(s[a:b].sqrt()[:, None]).view(K, -1)
            M.addmm_(ea, ea.T)
            if progress is not None:
                progress(b, N)
        self.M = reduce(M)
        self._abs_m: Tensor | None = None
        self._bound: float | None = None

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
        buf = torch.empty(self.K, min(rows, N), D, dtype=torch.float64)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            # in float64 whatever the predictions' dtype, the blend of the residuals (the
            # weights sum to one): exact to the data's rounding whatever the targets' level
            resid = torch.tensordot(w, self._errors(a, b, buf), dims=1)
            total += self.s[a:b] @ (resid**2).sum(-1)
        return float(self.reduce(total))

    def _errors(self, a: int, b: int, buf: Tensor) -> Tensor:
        """``p - y`` on rows ``a:b`` in float64 whatever the inputs' dtype, in ``buf``
        (one buffer for every chunk of a pass: fresh memory costs page faults)."""
        return buf[:, : b - a].copy_(self.p[:, a:b]).sub_(self.y[a:b])

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def gradient_rounding(self, w: Tensor) -> Tensor:
        """A bound on the rounding of each entry of the gradient ``g = 2 M w``: ``2 K eps
        sum_j |M_kj| w_j``. It matters where a model sits far off the targets: entries
        of ``M`` 1e10 and more apart cancel in ``M w`` (see
        :func:`~convexmix.ensemble._objectives.rounding_gap`)."""
        return (2 * self.K * EPS) * (self._abs() @ w)

    def rounding_bound(self) -> float:
        """An upper bound on the gap's rounding at any weights: ``4 K eps max |M|``."""
        if self._bound is None:
            self._bound = 4 * self.K * EPS * float(self._abs().max())
        return self._bound

    def _abs(self) -> Tensor:
        if self._abs_m is None:
            self._abs_m = self.M.abs()
        return self._abs_m

    def greedy(self) -> Greedy:
        M = self.M  # the candidates' rows sum to 1: w'Mw is their loss
        return CountsGreedy(self.K, lambda W: ((W @ M) * W).sum(1))

    def subset(self, rows: Tensor) -> Quadratic:
        s = self.s[rows]
        return Quadratic(self.p[:, rows], self.y[rows], s / s.sum(), self.reduce)

    def with_weights(self, s: Tensor) -> Quadratic:
        return Quadratic(self.p, self.y, s, self.reduce)

    def sample(self) -> None:
        return None  # each Newton step costs O(K^2) already
