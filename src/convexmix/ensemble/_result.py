"""The result of a fit (its weights and diagnostics) and of reading a saved blend (private)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._files import read_weights_file
from convexmix.ensemble._inputs import as_predictions, wants_numpy
from convexmix.errors import ShapeError
from convexmix.functional._registry import get_map
from convexmix.functional._softmax import SOFTMAX_ZERO_EPS

#: A (K,) float64 vector: a numpy array for numpy inputs, a tensor for torch inputs (typed
#: as Any: numpy is not a dependency of the library, and callers index either alike).
Weights = Any

__all__ = ["EnsembleResult", "Weights", "as_output", "free_weights", "load_weights"]


@dataclass
class EnsembleResult:
    """The outcome of :func:`fit_weights` or :func:`ensemble_selection`.

    ``weights`` and ``free`` are numpy arrays when the predictions were numpy (an array, a
    memmap, a ``.npy`` path or a list of arrays) and torch tensors otherwise.

    Attributes:
        weights: (K,) float64 weights, >= 0, summing to 1.
        loss: the loss of the blend (without the regularisation term).
        history: the objective after each iteration (fit) or each added model (Caruana).
        n_iter: Newton iterations (fit) or models in the selected ensemble (Caruana).
        gap: Frank-Wolfe gap at ``weights``: an upper bound on ``objective - optimum``.
        converged: whether ``gap <= tol`` was reached (always True for Caruana); with
            ``loss="mse"``, ``tol`` plus the gap's float64 rounding where that is larger
            (a model far off the targets, whose errors' Gram matrix spans more digits
            than ``tol`` leaves).
        free: pre-weights for ``map``, so that ``map(free) == weights`` (softmax cannot
            make exact zeros: they become ``log(1e-12)``-sized values). Use them to
            initialise a :class:`~convexmix.SimplexWeights` or a parametrized layer.
        map: the name of that map.
        regularization: the ``lam`` that was used (chosen by cross-validation for "cv").
        method: "newton", "caruana", or with ``max_models``: "branch-and-bound" (proven
            best support) or "forward-swap" (the heuristic for large K).
        models: the models' names, when known (:func:`load_weights` reads them).
    """

    weights: Weights
    loss: float
    history: list[float] = field(repr=False)
    n_iter: int
    gap: float
    converged: bool
    free: Weights = field(repr=False)
    map: str = "softmax"
    regularization: float = 0.0
    method: str = "newton"
    models: list[str] | None = None

    def predict(self, predictions: Any) -> Any:
        """The blend ``sum_k weights[k] * predictions[k]`` of (K, N) or (K, N, C) predictions.

        Args:
            predictions: (K, N) or (K, N, C), as for :func:`fit_weights` (a memmap or a
                ``.npy`` path too); typically the models' predictions on new data.

        Returns:
            (N,) or (N, C) in the predictions' dtype: a numpy array for numpy predictions
            (an array, a memmap, a ``.npy`` path or a list of arrays), a tensor otherwise.

        >>> import numpy as np, torch, convexmix as cx
        >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
        >>> fit = cx.ensemble.fit_weights(p, 0.25 * p[0] + 0.75 * p[1], loss="mse")
        >>> fit.predict(torch.tensor([[4.0], [0.0], [9.0]]))
        tensor([1.])
        >>> fit.predict(np.array([[4.0], [0.0], [9.0]]))
        array([1.])
        """
        p = as_predictions(predictions)
        w = torch.as_tensor(self.weights)
        if p.shape[0] != w.numel():
            raise ShapeError(
                f"predictions must hold {w.numel()} models along dim 0; got shape {tuple(p.shape)}."
            )
        blend: Tensor = torch.tensordot(w.to(p.dtype), p, dims=1)
        return blend.numpy() if wants_numpy(predictions) else blend


def as_output(result: EnsembleResult, numpy: bool) -> EnsembleResult:
    """``result`` with ``weights`` and ``free`` as numpy arrays (``numpy``) or tensors."""
    if numpy == isinstance(result.weights, Tensor):
        convert = _to_numpy if numpy else torch.as_tensor
        return replace(result, weights=convert(result.weights), free=convert(result.free))
    return result


def _to_numpy(x: Any) -> Any:
    return x.numpy() if isinstance(x, Tensor) else sys.modules["numpy"].asarray(x)


def free_weights(weights: Weights, map: str) -> Weights:
    """Pre-weights that ``map`` takes to ``weights``, of the same type as ``weights``."""
    spec = get_map(map)
    if isinstance(weights, Tensor):
        return spec.inverse(weights, -1, 1.0)
    if map == "softmax":
        # softmax_inverse in numpy: a fit on numpy inputs runs no torch operation, whose
        # first in a process costs about 1 ms (more than a small fit)
        np = sys.modules["numpy"]
        return np.log(np.maximum(weights, SOFTMAX_ZERO_EPS))
    return spec.inverse(torch.from_numpy(weights), -1, 1.0).numpy()


def load_weights(path: str | os.PathLike[str]) -> EnsembleResult:
    """The blend that ``convexmix ensemble --out W.json`` wrote, ready to ``predict``.

    Args:
        path: the JSON file.

    Returns:
        An :class:`EnsembleResult` with the weights, the loss, the models' names and the
        fit's diagnostics (``history`` is empty).

    Raises:
        ConvexMixError: a file that is missing, not JSON, or whose weights are not K
            numbers >= 0 that sum to 1 or break the ``max_weight``/``max_models`` that
            the file records.

    >>> import json, tempfile, pathlib, torch, convexmix as cx
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.json"
    >>> _ = path.write_text(json.dumps({"weights": [0.25, 0.75], "models": ["a", "b"]}))
    >>> blend = cx.ensemble.load_weights(path)
    >>> blend.weights, blend.models
    (tensor([0.2500, 0.7500], dtype=torch.float64), ['a', 'b'])
    >>> blend.predict(torch.tensor([[0.0, 4.0], [4.0, 0.0]]))
    tensor([3., 1.])
    """
    data = read_weights_file(path)
    w = data.weights
    return EnsembleResult(
        weights=w,
        loss=data.loss,
        history=[],
        n_iter=data.n_iter,
        gap=data.gap,
        converged=data.converged,
        free=free_weights(w, data.map),
        map=data.map,
        regularization=data.regularization,
        method=data.method,
        models=data.models,
    )
