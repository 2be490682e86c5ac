"""``SimplexWeights``: n learnable weights on the simplex (private module; ``cx.nn`` and
``cx`` export it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from convexmix._validation import check_int
from convexmix.errors import ShapeError
from convexmix.nn._init import Init, initial_free, initial_weights
from convexmix.parametrize import Simplex, check_capacity

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SimplexWeights"]


class SimplexWeights(nn.Module):
    r"""``n`` learnable weights on the simplex: ``forward()`` returns them, shape ``(n,)``;
    so does the property ``weights`` (the name every layer reads its weights by).

    The free parameter ``free`` (``n`` values, ``n - 1`` for stick-breaking) is mapped by
    ``map``; ``init`` is given as probabilities, never as logits.

    Learning rate (docs/convergence.md): with Adam, softmax reached the optimum at 0.01 to
    1, sparsemax and entmax15 only at 3e-3 to 0.03 (faster can zero a weight for good).

    Args:
        n: the number of weights, >= 1.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, ``"stick_breaking"``, or a
            sampling map, ``"gumbel"`` (a one-hot sample per call in training, the most
            probable entry in ``eval()``) or ``"gumbel_soft"`` (a relaxed sample; the
            probabilities in ``eval()``), whose ``temperature`` is the sampler's tau.
        init: ``"uniform"`` (exactly ``total / n``), ``"random"`` (uniform on the
            simplex, from torch's global generator) or ``n`` probabilities summing to ``total``.
        temperature: divides the free values before the map, > 0.
        total: the sum of the weights, > 0.
        upper: a cap on every weight (``map="softmax"``: the constrained softmax;
            ``"sparsemax"``: the capped projection); ``n * upper >= total``.

    Example:
        >>> import torch, convexmix as cx
        >>> w = cx.SimplexWeights(3, init=[0.5, 0.3, 0.2])
        >>> w()
        tensor([0.5000, 0.3000, 0.2000], grad_fn=<...>)
        >>> w.weights  # the same, as a property (as on every layer)
        tensor([0.5000, 0.3000, 0.2000], grad_fn=<...>)
        >>> w(mask=torch.tensor([True, False, True]))  # renormalised over the present ones
        tensor([0.7143, 0.0000, 0.2857], grad_fn=<...>)
        >>> cx.SimplexWeights(4, map="sparsemax")
        SimplexWeights(n=4, map='sparsemax', total=1.0)
        >>> cx.SimplexWeights(4, init=[0.1, 0.2, 0.3, 0.4], upper=0.3)()  # projected start
        tensor([0.1500, 0.2500, 0.3000, 0.3000], grad_fn=<...>)
    """

    def __init__(
        self,
        n: int,
        *,
        map: str = "softmax",
        init: Init = "uniform",
        temperature: float = 1.0,
        total: float = 1.0,
        upper: float | None = None,
    ) -> None:
        super().__init__()
        self.n = check_int(n, "n")
        # A plain attribute, not a child module: it holds no tensors, and the repr of this
        # layer already says everything about it.
        self.simplex: Simplex
        object.__setattr__(
            self,
            "simplex",
            Simplex(map, dim=-1, total=total, temperature=temperature, upper=upper),
        )
        check_capacity(n, self.simplex.total, self.simplex.upper)
        p = initial_weights(n, init, self.simplex.total)
        if p is None:  # every map sends zeros to exactly uniform weights
            free = torch.zeros(self.simplex.free_shape((n,)))
        else:
            free = initial_free(self.simplex, p)
        self.free = nn.Parameter(free)

    def train(self, mode: bool = True) -> Self:
        """Training or evaluation mode, for this layer and its map (a sampling map draws
        in training and is deterministic in evaluation)."""
        super().train(mode)
        self.simplex.train(mode)  # a plain attribute, so nn.Module.train misses it
        return self

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
        out: Tensor = self.simplex.forward(free, mask=mask)
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
        if self.simplex.upper is not None:
            s += f", upper={self.simplex.upper}"
        return s
