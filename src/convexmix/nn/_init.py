"""Starting weights of the layers: ``init`` as probabilities, never logits (private)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convexmix._validation import check_probabilities
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.parametrize import Simplex

__all__: list[str] = []

Init = str | Sequence[float] | Tensor


def initial_weights(n: int, init: Init, total: float) -> Tensor | None:
    """Validated starting probabilities for ``n`` weights, or None for exact uniform.

    ``init`` is ``"uniform"``, ``"random"`` (uniform on the simplex: Dirichlet(1, ..., 1)),
    or probabilities of length ``n`` summing to ``total``; never logits.
    """
    if isinstance(init, str):
        if init == "uniform":
            return None
        if init == "random":
            e = torch.empty(n, dtype=torch.float64).exponential_()
            return (e / e.sum() * total).to(torch.get_default_dtype())
        raise ConvexMixError(
            f"init must be 'uniform', 'random' or a sequence of {n} probabilities; got {init!r}."
        )
    try:
        p = torch.as_tensor(init, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConvexMixError(
            f"init must be 'uniform', 'random' or a sequence of {n} probabilities; "
            f"got {type(init).__name__}."
        ) from err
    if p.shape != (n,):
        raise ShapeError(f"init must hold {n} probabilities; got shape {tuple(p.shape)}.")
    dtype = init.dtype if isinstance(init, Tensor) and init.is_floating_point() else None
    return check_probabilities(p, total, "init", dtype).to(torch.get_default_dtype())


def initial_free(simplex: Simplex, p: Tensor) -> Tensor:
    """Free values for the starting weights ``p`` (validated probabilities), through the
    layer's :class:`~convexmix.parametrize.Simplex`: under a cap, ``p`` starts at its
    projection onto the capped simplex, without a warning (the layers document it)."""
    return simplex.right_inverse(p, warn=False)
