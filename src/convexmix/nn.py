"""Ready layers built on the simplex maps (``cx.SimplexWeights``; ``cx.nn`` re-exports them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError
from convexmix.parametrize import Simplex

__all__ = ["SimplexWeights"]

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
            return (e / e.sum() * total).float()
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
    if not bool(p.isfinite().all()):
        raise InvalidProbabilitiesError(f"init must be finite probabilities; got {p.tolist()}.")
    if bool((p < 0).any()):
        raise InvalidProbabilitiesError(
            f"init takes probabilities (>= 0, summing to {total}), not logits; got {p.tolist()}."
        )
    tol = 1e-6 * max(total, 1.0) * max(n, 1) ** 0.5
    if abs(float(p.sum()) - total) > tol:
        raise InvalidProbabilitiesError(
            f"init probabilities must sum to {total}; "
            f"got sum {float(p.sum()):.9g} for {p.tolist()}."
        )
    return p.float()


class SimplexWeights(nn.Module):
    r"""``n`` learnable weights on the simplex: ``forward()`` returns them, shape ``(n,)``.

    The free parameter ``free`` (``n`` values, ``n - 1`` for stick-breaking) is mapped by
    ``map``; ``init`` is given as probabilities, never as logits.

    Args:
        n: the number of weights, >= 1.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or ``"stick_breaking"``.
        init: ``"uniform"`` (exactly ``total / n``), ``"random"`` (uniform on the
            simplex, from torch's global generator) or ``n`` probabilities summing to ``total``.
        temperature: divides the free values before the map, > 0.
        total: the sum of the weights, > 0.

    Example:
        >>> import torch, convexmix as cx
        >>> w = cx.SimplexWeights(3, init=[0.5, 0.3, 0.2])
        >>> w()
        tensor([0.5000, 0.3000, 0.2000], grad_fn=<...>)
        >>> w(mask=torch.tensor([True, False, True]))  # renormalised over the present ones
        tensor([0.7143, 0.0000, 0.2857], grad_fn=<...>)
        >>> cx.SimplexWeights(4, map="sparsemax")
        SimplexWeights(n=4, map='sparsemax', total=1.0)
    """

    def __init__(
        self,
        n: int,
        *,
        map: str = "softmax",
        init: Init = "uniform",
        temperature: float = 1.0,
        total: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConvexMixError(f"n must be an int >= 1; got {n!r}.")
        self.n = n
        # A plain attribute, not a child module: it holds no tensors, and the repr of this
        # layer already says everything about it.
        self.simplex: Simplex
        object.__setattr__(
            self, "simplex", Simplex(map, dim=-1, total=total, temperature=temperature)
        )
        p = initial_weights(n, init, self.simplex.total)
        if p is None:  # every map sends zeros to exactly uniform weights
            free = torch.zeros(self.simplex.free_shape((n,)))
        else:
            free = self.simplex.right_inverse(p)
        self.free = nn.Parameter(free)

    @property
    def map(self) -> str:
        """The name of the map."""
        return self.simplex.map

    @property
    def total(self) -> float:
        """The sum of the weights."""
        return self.simplex.total

    def forward(self, mask: Tensor | None = None) -> Tensor:
        """The ``(n,)`` weights; with a bool ``mask`` (``(n,)`` or ``(B, n)``), renormalised
        over the present entries (the map restricted to them), absent ones exactly 0."""
        free: Tensor = self.free
        if mask is not None:
            if (
                not isinstance(mask, Tensor)
                or mask.dim() not in (1, 2)
                or mask.shape[-1:] != (self.n,)
            ):
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ShapeError(f"mask must have shape (n,) or (B, n) with n={self.n}; got {got}.")
            free = free.expand(*mask.shape[:-1], free.shape[-1])
        out: Tensor = self.simplex(free, mask=mask)
        return out

    @property
    def weights(self) -> Tensor:
        """The current weights (same as ``self()``; keeps the graph)."""
        out: Tensor = self()
        return out

    def extra_repr(self) -> str:
        s = f"n={self.n}, map={self.map!r}, total={self.total}"
        if self.simplex.temperature != 1.0:
            s += f", temperature={self.simplex.temperature}"
        return s
