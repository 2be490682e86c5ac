"""From checked inputs to the objective the solver minimises (private)."""

from __future__ import annotations

from typing import Any

import torch

from convexmix._kernels import alloc
from convexmix.ensemble._callable_loss import CallableLoss
from convexmix.ensemble._inputs import (
    as_predictions,
    as_tensor,
    check_finite_min,
    class_targets,
    reading_progress,
    sample_weights,
    true_class_probabilities,
)
from convexmix.ensemble._log_loss import LogLoss
from convexmix.ensemble._mse import Quadratic
from convexmix.ensemble._objectives import LOG_LOSS_EPS, DataObjective, Loss, Reduce, local
from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError

__all__ = ["make_objective"]


def make_objective(
    predictions: Any,
    targets: Any,
    loss: Loss,
    sample_weight: Any,
    validate: bool,
    reduce: Reduce = local,
) -> DataObjective:
    """Check the inputs and build the objective.

    ``predictions`` may be memory-mapped: they are read in row chunks, in their own dtype,
    and never copied whole. ``reduce`` sums over the rows of every rank (sharded fits).
    """
    p = as_predictions(predictions)
    N = p.shape[1]
    t = as_tensor(targets, "targets")
    if t.dim() == 0 or t.shape[0] != N:
        raise ShapeError(
            f"targets must have N={N} rows like the predictions {tuple(p.shape)}; "
            f"got shape {tuple(t.shape)}."
        )
    s = sample_weights(sample_weight, N, reduce)
    if callable(loss):
        if validate:
            check_finite_min(p, "predictions")
        tt = t if not t.is_floating_point() else t.to(p.dtype)
        return CallableLoss(loss, p, tt, None if sample_weight is None else s)
    if loss == "log_loss":
        if p.dim() == 3:
            t = class_targets(t, p.shape[2], N)
            q = true_class_probabilities(p, t, validate)
            return LogLoss(q, s, reduce)
        t = class_targets(t, 2, N, hint=True)  # (K, N): probabilities of class 1
        if validate:
            lo = check_finite_min(p, "predictions")
            hi = float(p.max())
            if lo < 0 or hi > 1:
                raise InvalidProbabilitiesError(
                    "binary predictions (K, N) must be probabilities of class 1 in [0, 1]; "
                    f"got values in [{lo:.3g}, {hi:.3g}]."
                )
        q = alloc.empty(tuple(p.shape), p.dtype)
        positive = t.bool()
        rows = max(256, (1 << 20) // (p.shape[0] * p.element_size()))
        for a in range(0, N, rows):
            b = min(a + rows, N)
            part = p[:, a:b]
            torch.where(positive[None, a:b], part, 1 - part, out=q[:, a:b])
        return LogLoss(q.clamp_min_(LOG_LOSS_EPS), s, reduce)
    if loss == "mse":
        if validate:
            check_finite_min(p, "predictions")
        if p.dim() == 3:  # Brier score on class probabilities
            t = class_targets(t, p.shape[2], N)
            y = torch.nn.functional.one_hot(t, p.shape[2]).to(p.dtype)
            return Quadratic(p, y, s, reduce, reading_progress())
        if t.dim() != 1:
            raise ShapeError(
                f"regression targets must be (N,) with N={N}; got shape {tuple(t.shape)}."
            )
        y = t.to(torch.float64)  # targets keep their digits (float32 has 7 of them)
        if validate and not bool(torch.isfinite(y).all()):
            raise ConvexMixError("targets must be finite; got NaN or infinite values.")
        return Quadratic(p[..., None], y[:, None], s, reduce, reading_progress())
    raise ConvexMixError(f"loss must be 'log_loss', 'mse' or a callable; got {loss!r}.")
