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


def capped_projection_ref(
    x: np.ndarray, lower: np.ndarray | float, upper: np.ndarray | float, total: float = 1.0
) -> np.ndarray:
    """Projection of a 1-D ``x`` onto {lower <= p <= upper, sum p = total}: 200
    bisections on the threshold tau of sum(clip(x - tau, lower, upper)) = total."""
    lo_b = np.broadcast_to(np.asarray(lower, dtype=np.float64), x.shape)
    up_b = np.broadcast_to(np.asarray(upper, dtype=np.float64), x.shape)
    lo, hi = x.min() - 1e4, x.max() + 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(x - mid, lo_b, up_b).sum() >= total:
            lo = mid
        else:
            hi = mid
    return np.clip(x - (lo + hi) / 2, lo_b, up_b)


def constrained_softmax_ref(
    x: np.ndarray, upper: np.ndarray | float, total: float = 1.0
) -> np.ndarray:
    """min(upper, c exp(x)) with sum = total: 200 bisections on log c."""
    up = np.broadcast_to(np.asarray(upper, dtype=np.float64), x.shape)
    z = x - x.max()
    lo, hi = -800.0, 800.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(up, np.exp(z + mid)).sum() >= total:
            hi = mid
        else:
            lo = mid
    return np.minimum(up, np.exp(z + (lo + hi) / 2))


def sparse_projection_bruteforce(x: np.ndarray, k: int, total: float = 1.0) -> np.ndarray:
    """Projection onto {p >= 0, sum p = total, ||p||_0 <= k}: the best over all supports."""
    best, best_dist = None, np.inf
    for support in itertools.combinations(range(len(x)), min(k, len(x))):
        s = list(support)
        p = np.zeros(len(x))
        p[s] = projection_bruteforce(x[s], total)
        dist = ((p - x) ** 2).sum()
        if dist < best_dist:
            best, best_dist = p, dist
    assert best is not None
    return best


def l1_ball_ref(x: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Projection onto {||p||_1 <= radius}: soft thresholding, 200 bisections on tau."""
    if np.abs(x).sum() <= radius:
        return x.copy()
    lo, hi = 0.0, np.abs(x).max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(x) - mid, 0).sum() >= radius:
            lo = mid
        else:
            hi = mid
    return np.sign(x) * np.maximum(np.abs(x) - (lo + hi) / 2, 0)
