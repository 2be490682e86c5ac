"""Independent NumPy references for the maps (float64, no code shared with convexmix)."""

from __future__ import annotations

import itertools

import numpy as np


def softmax_ref(x: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Softmax of a 1-D array over its finite entries."""
    present = np.isfinite(x)
    out = np.zeros_like(x, dtype=np.float64)
    if present.any():
        z = x[present] - x[present].max()
        e = np.exp(z)
        out[present] = total * e / e.sum()
    return out


def projection_bruteforce(x: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Euclidean projection onto {p >= 0, sum p = total} by trying every support.

    For a support S the KKT point is p_S = x_S - tau with tau = (sum x_S - total)/|S|;
    the projection is the feasible candidate (p_S > 0, x_j <= tau off S) closest to x.
    """
    k = len(x)
    best, best_dist = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            tau = (x[s].sum() - total) / size
            p = np.zeros(k)
            p[s] = x[s] - tau
            if (p[s] < -1e-12).any():
                continue
            dist = ((p - x) ** 2).sum()
            if dist < best_dist:
                best, best_dist = p, dist
    assert best is not None
    return best


def entmax_bisect_ref(
    x: np.ndarray, alpha: float, total: float = 1.0, iters: int = 200
) -> np.ndarray:
    """alpha-entmax p = [(alpha-1) x - tau]_+^(1/(alpha-1)) by bisection on tau (float64).

    Entries equal to -inf are absent.
    """
    present = np.isfinite(x)
    out = np.zeros(len(x))
    if not present.any():
        return out
    z = (alpha - 1.0) * x[present]
    lo, hi = z.max() - total ** (alpha - 1.0) - 1.0, z.max()

    def mass(tau: float) -> float:
        return float((np.clip(z - tau, 0.0, None) ** (1.0 / (alpha - 1.0))).sum())

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mass(mid) >= total:
            lo = mid
        else:
            hi = mid
    p = np.clip(z - lo, 0.0, None) ** (1.0 / (alpha - 1.0))
    out[present] = p * total / p.sum()
    return out


def apply_rows(fn, x: np.ndarray, *args, **kwargs) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Apply a 1-D reference to every row of a 2-D array."""
    return np.stack([fn(row, *args, **kwargs) for row in x])
