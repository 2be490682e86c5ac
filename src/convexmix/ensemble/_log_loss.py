"""The log-loss objective on the (K, N) probabilities of the true class (private)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from convexmix._kernels import alloc
from convexmix.ensemble._objectives import (
    BLOCK,
    SAMPLE_RUN,
    SPARSE_BLEND,
    Greedy,
    Reduce,
    hessian_step,
    local,
    matvec,
    matvec_t,
)

__all__ = ["SAMPLE_MIN_ROWS", "SAMPLE_MIN_VALUES", "SAMPLE_STEP", "LogLoss"]

#: A log-loss fit on at least SAMPLE_MIN_ROWS rows and SAMPLE_MIN_VALUES values of ``q``
#: (K * N) starts from the optimum on every SAMPLE_STEP-th run of SAMPLE_RUN rows
#: (:meth:`LogLoss.sample`). Measured (docs/ensemble.md): from 2^16 rows and 2^20 values
#: it saves 1-3 steps on all rows (0.66-0.97x the time, K = 8-50); below, the ~4 extra
#: steps' fixed cost (~0.4 ms each) outweighs them (2^15 rows, K = 50, 2 classes: 1.3-1.4x).
SAMPLE_STEP = 16
SAMPLE_MIN_ROWS = 1 << 16
SAMPLE_MIN_VALUES = 1 << 20


class LogLoss:
    """-sum_n s_n log(sum_k w_k q_kn) with q_kn the probability model k gives sample n's class.

    ``q`` keeps the dtype it was read in (float32 stays float32); sums are in float64.
    ``q`` must already be floored at :data:`LOG_LOSS_EPS`.
    """

    def __init__(self, q: Tensor, s: Tensor, reduce: Reduce = local) -> None:
        self.q, self.s, self.reduce = q, s, reduce
        self.K = q.shape[0]
        self._last: tuple[Tensor, Tensor] | None = None
        self._sqrt_s: Tensor | None = None

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def n_samples(self) -> int:
        return int(self.q.shape[1])

    def _blend(self, w: Tensor) -> Tensor:
        if self._last is None or self._last[0] is not w:
            self._last = (w, self._compute_blend(w))
        return self._last[1]

    def _compute_blend(self, w: Tensor) -> Tensor:
        """``w @ q`` in float64; a sparse ``w`` reads only its models' rows of ``q``."""
        nz = w.nonzero().squeeze(1)
        if nz.numel() * SPARSE_BLEND > self.K:
            return matvec_t(w, self.q)
        u = torch.zeros(self.n_samples, dtype=torch.float64)
        for k, wk in zip(nz.tolist(), w.index_select(0, nz).tolist(), strict=True):
            u.add_(self.q[k], alpha=wk)
        return u

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        u = self._blend(w)
        f = -float(self.reduce(torch.dot(self.s, torch.log(u))))
        return f, lambda: -self.reduce(matvec(self.q, self.s / u))

    def loss(self, w: Tensor) -> float:
        return self.value(w)[0]

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        # H = Q_idx diag(s / u^2) Q_idx', built in column blocks that stay in cache: a
        # (len(idx), N) scaled copy would cost more in page faults than the product.
        if self._sqrt_s is None:
            self._sqrt_s = self.s.sqrt()
        u = self._blend(w)
        n, m = self.q.shape[1], idx.numel()
        step = hessian_step(m, n) if approx and self.reduce is local else 1
        if step > 1:
            # every step-th run of SAMPLE_RUN rows: 1/step of the reads and the products
            runs = n // SAMPLE_RUN
            n_used = runs * SAMPLE_RUN
            q = self.q[:, :n_used].view(self.K, runs, SAMPLE_RUN)[:, ::step]
            scale = (self._sqrt_s[:n_used] / u[:n_used]).view(runs, SAMPLE_RUN)[::step]
            share = float(self.s[:n_used].view(runs, SAMPLE_RUN)[::step].sum())
        else:
            q = self.q[:, :, None]
            scale = (self._sqrt_s / u)[:, None]
        n_runs, run = q.shape[1], q.shape[2]
        per_block = max(1, BLOCK // run)
        # An estimate is summed in float32 (2.5x the multiply-adds per second): its
        # rounding, ~1e-6 of H, is far below what steers a Newton step. No overflow:
        # u >= min q >= LOG_LOSS_EPS, so every entry is at most 1 / LOG_LOSS_EPS^2 = 1e30.
        acc = torch.float32 if approx else torch.float64
        h = torch.zeros(m, m, dtype=acc)
        full = m == self.K
        width = min(per_block, n_runs)
        buf = torch.empty(m, width, run, dtype=acc)
        rows = None if full else torch.empty(m, width, run, dtype=q.dtype)
        # H is symmetric: from 48 rows on, the two diagonal blocks and one off-diagonal
        # block of the halves (3/4 of the multiply-adds of the full product).
        half = m // 2 if m >= 48 else m
        for start in range(0, n_runs, per_block):
            stop = min(start + per_block, n_runs)
            part = q[:, start:stop]
            if rows is not None:
                # the models' rows of this block only, gathered while in cache
                part = torch.index_select(part, 0, idx, out=rows[:, : stop - start])
            a = torch.mul(part, scale[start:stop], out=buf[:, : stop - start]).view(m, -1)
            if half == m:
                h.addmm_(a, a.T)
            else:
                top, bottom = a[:half], a[half:]
                h[:half, :half].addmm_(top, top.T)
                h[half:, :half].addmm_(bottom, top.T)
                h[half:, half:].addmm_(bottom, bottom.T)
        if half != m:
            h[:half, half:] = h[half:, :half].T
        h = h.double()
        if step > 1:
            h /= share  # the sampled rows' share of the sample weight
        return self.reduce(h)

    def greedy(self) -> Greedy:
        return _LogLossGreedy(self)

    def subset(self, rows: Tensor) -> LogLoss:
        s = self.s[rows]
        return LogLoss(self.q.index_select(1, rows), s / s.sum(), self.reduce)

    def with_weights(self, s: Tensor) -> LogLoss:
        return LogLoss(self.q, s, self.reduce)

    def sample(self) -> LogLoss | None:
        """The loss on every SAMPLE_STEP-th run of SAMPLE_RUN rows (a copy of 1/16 of
        ``q``), for fits on at least SAMPLE_MIN_ROWS rows and SAMPLE_MIN_VALUES values;
        None on fewer, and for sharded fits (each rank would sample its own rows, and
        whether a rank samples must not depend on its own row count: the ranks would run
        different collectives)."""
        n = self.n_samples
        if self.reduce is not local or n < SAMPLE_MIN_ROWS or self.K * n < SAMPLE_MIN_VALUES:
            return None
        runs = n // SAMPLE_RUN
        n_used = runs * SAMPLE_RUN
        rows = self.q[:, :n_used].view(self.K, runs, SAMPLE_RUN)[:, ::SAMPLE_STEP]
        s = self.s[:n_used].view(runs, SAMPLE_RUN)[::SAMPLE_STEP].reshape(-1)
        total = float(s.sum())
        if not total > 0:
            return None  # the sample weights leave every sampled row out
        q = alloc.empty((self.K, s.numel()), self.q.dtype)  # no page faults: reused memory
        q.view(rows.shape).copy_(rows)
        return LogLoss(q, s / total)


class _LogLossGreedy:
    """Caruana's step on the log-loss with the running sum ``r`` of the picks' rows.

    The loss after adding model k to m picks is ``-sum s log(r + q_k) + log(m + 1) sum s``.
    Since ``log(r + q) <= log(r) + q / r``, the matrix-vector product ``q @ (s / r)``
    bounds every model's loss from below; only the models whose bound is not above the
    best loss found so far need their N logarithms.
    """

    def __init__(self, obj: LogLoss) -> None:
        self.obj = obj
        self.r = torch.zeros(obj.n_samples, dtype=torch.float64)
        self.m = 0
        self.s_sum = float(obj.reduce(obj.s.sum()))

    def _exact(self, k: int) -> float:
        o = self.obj
        return -float(o.reduce(torch.dot(o.s, torch.log(self.r + o.q[k].double()))))

    def values(self) -> Tensor:
        o = self.obj
        K = o.K
        shift = math.log(self.m + 1) * self.s_sum
        vals = torch.full((K,), math.inf, dtype=torch.float64)
        if self.m == 0:
            for k in range(K):
                vals[k] = self._exact(k) + shift
            return vals
        sr = o.s / self.r
        base = -float(o.reduce(torch.dot(o.s, torch.log(self.r))))
        lower = base - o.reduce(matvec(o.q, sr)) + shift
        best = math.inf
        for k in lower.argsort(stable=True).tolist():
            bound = float(lower[k])
            if bound - 1e-9 * (1.0 + abs(bound)) > best:
                break  # the bounds are sorted: no later model can do better
            vals[k] = self._exact(k) + shift
            best = min(best, float(vals[k]))
        return vals

    def add(self, k: int) -> None:
        self.r += self.obj.q[k]
        self.m += 1
