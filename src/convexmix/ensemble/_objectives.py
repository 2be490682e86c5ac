"""The objectives the ensemble solver minimises over the simplex (private).

Each gives the value, the gradient and the Hessian the Newton solver needs; the data
objectives also give the loss without regularisation, their restriction to some rows
(cross-validation), and the values of one greedy step (Caruana's selection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from convexmix._kernels import alloc
from convexmix.errors import ConvexMixError, ShapeError

__all__ = [
    "LOG_LOSS_EPS",
    "CallableLoss",
    "DataObjective",
    "Greedy",
    "LogLoss",
    "Loss",
    "LossFn",
    "Objective",
    "Quadratic",
    "Reduce",
    "Regularized",
    "local",
    "matvec",
    "matvec_t",
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
#: A log-loss fit on at least SAMPLE_MIN_ROWS rows and SAMPLE_MIN_VALUES values of ``q``
#: (K * N) starts from the optimum on every SAMPLE_STEP-th run of SAMPLE_RUN rows
#: (:meth:`LogLoss.sample`). On fewer values the ~4 extra steps' fixed cost (~0.4 ms
#: each) outweighs the steps on all rows they save (docs/ensemble.md).
SAMPLE_STEP = 16
SAMPLE_MIN_ROWS = 1 << 15
SAMPLE_MIN_VALUES = 1 << 21


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


class _CountsGreedy:
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
        wp = w.to(self.p.dtype)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            resid = torch.tensordot(wp, self.p[:, a:b], dims=1) - self.y[a:b]
            total += self.s[a:b] @ (resid.double() ** 2).sum(-1)
        return float(self.reduce(total))

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        return 2 * self.M[idx][:, idx]

    def greedy(self) -> Greedy:
        M, r, c = self.M, self.r, self.c
        return _CountsGreedy(self.K, lambda W: ((W @ M) * W).sum(1) - 2 * (W @ r) + c)

    def subset(self, rows: Tensor) -> Quadratic:
        s = self.s[rows]
        return Quadratic(self.p[:, rows], self.y[rows], s / s.sum(), self.reduce)

    def with_weights(self, s: Tensor) -> Quadratic:
        return Quadratic(self.p, self.y, s, self.reduce)

    def sample(self) -> None:
        return None  # each Newton step costs O(K^2) already


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

        return _CountsGreedy(self.K, losses)

    def with_weights(self, s: Tensor) -> CallableLoss:
        return CallableLoss(self.fn, self.p, self.t, s)

    def sample(self) -> None:
        return None

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

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        h = self.base.hessian(w, idx, approx)
        return h + 2 * self.lam * torch.eye(idx.numel(), dtype=h.dtype)
