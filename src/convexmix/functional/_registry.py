"""The registry of simplex maps: name -> (map, right inverse), for the parametrizations,
layers, optimizers, jobs and CLI (private). Modules saved with ``torch.save``/pickle name
:class:`MapSpec` and the inverses by this module's path: it stays here.

Every map has a right inverse ``inv`` with ``map(inv(p)) == p`` for ``p`` on the simplex:

* softmax: ``T * log(p)``, zeros smoothed to ``SOFTMAX_ZERO_EPS`` (softmax has no exact 0);
* sparsemax: the identity; entmax15: ``2 * sqrt(p)`` (both exact, zeros included);
* stick_breaking: its exact inverse, after the same smoothing of zeros as the softmax.
* gumbel, gumbel_soft: the softmax's, ``log(p)``: the samples follow ``p``.

A temperature ``T`` divides the input of every map: ``map(x / T)``, inverse ``T * inv(p)``;
except for the sampling maps (``stochastic``), where it is the Gumbel-softmax's ``tau``
and the free values are the logits of the categorical the samples follow:

* ``"gumbel"``: in training, a straight-through hard sample (one-hot forward, the relaxed
  gradient backward); in evaluation, the one-hot of the most probable entry;
* ``"gumbel_soft"``: in training, a relaxed sample; in evaluation, the probabilities
  ``softmax(x)`` that the samples follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from convexmix.errors import UnknownMapError
from convexmix.functional._gumbel import gumbel_softmax
from convexmix.functional._softmax import SOFTMAX_ZERO_EPS, softmax, softmax_inverse
from convexmix.functional._sparse import entmax15, entmax_inverse, sparsemax
from convexmix.functional._stick import stick_breaking, stick_breaking_inverse

__all__: list[str] = []

MapFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MapSpec:
    """A named map: ``forward(x, dim, mask=, total=)``, its right inverse, and its free size."""

    name: str
    forward: MapFn
    inverse: Callable[[Tensor, int, float], Tensor]
    #: number of free values for K weights is ``K - drop`` (stick-breaking drops one).
    drop: int = 0
    #: a sampling map: ``forward(x, dim, mask=, total=, tau=, training=)``, where the
    #: temperature is ``tau`` (it does not divide ``x``) and ``training`` picks a sample
    #: (True) or the deterministic evaluation output (False).
    stochastic: bool = False


def _sparsemax_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return p.clamp_min(0)


def _entmax15_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return entmax_inverse(p, 1.5, total=total)


def _softmax_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return softmax_inverse(p, dim, total=total)


def _stick_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    q = p.clamp_min(SOFTMAX_ZERO_EPS * total)  # zeros would give infinite free values
    return stick_breaking_inverse(q * (total / q.sum(dim, keepdim=True)), dim, total=total)


def _gumbel_hard(
    x: Tensor,
    dim: int,
    *,
    mask: Tensor | None = None,
    total: float = 1.0,
    tau: float = 1.0,
    training: bool = True,
) -> Tensor:
    if training:
        p = gumbel_softmax(x, tau, hard=True, dim=dim, mask=mask)
    else:  # the most probable entry: the hard sample without noise
        p = softmax(x, dim, mask=mask)
        pick = torch.zeros_like(p).scatter(dim, p.argmax(dim, keepdim=True), 1.0)
        p = torch.where(p.sum(dim, keepdim=True) > 0, pick, p)  # zeros and NaN slices stay
    return p if total == 1.0 else p * total


def _gumbel_soft(
    x: Tensor,
    dim: int,
    *,
    mask: Tensor | None = None,
    total: float = 1.0,
    tau: float = 1.0,
    training: bool = True,
) -> Tensor:
    if training:
        p = gumbel_softmax(x, tau, dim=dim, mask=mask)
        return p if total == 1.0 else p * total
    return softmax(x, dim, mask=mask, total=total)


MAPS: dict[str, MapSpec] = {
    "softmax": MapSpec("softmax", softmax, _softmax_inverse),
    "sparsemax": MapSpec("sparsemax", sparsemax, _sparsemax_inverse),
    "entmax15": MapSpec("entmax15", entmax15, _entmax15_inverse),
    "stick_breaking": MapSpec("stick_breaking", stick_breaking, _stick_inverse, drop=1),
    "gumbel": MapSpec("gumbel", _gumbel_hard, _softmax_inverse, stochastic=True),
    "gumbel_soft": MapSpec("gumbel_soft", _gumbel_soft, _softmax_inverse, stochastic=True),
}


def get_map(name: str | MapSpec, *, stochastic: bool = False) -> MapSpec:
    """The :class:`MapSpec` called ``name``, or an error that lists the known names.

    The sampling maps (``"gumbel"``, ``"gumbel_soft"``) are found only with
    ``stochastic=True``: the layers and the parametrization take them, where ``train()``
    and ``eval()`` choose between a sample and the deterministic output; a job (an
    ensemble fit, a merge) needs a deterministic map."""
    spec: MapSpec
    if isinstance(name, MapSpec):
        spec = name
    elif not isinstance(name, str) or name not in MAPS:
        known = sorted(n for n, m in MAPS.items() if stochastic or not m.stochastic)
        raise UnknownMapError(f"map must be one of {known}; got {name!r}.")
    else:
        spec = MAPS[name]
    return spec if stochastic else check_deterministic(spec)


def check_deterministic(spec: MapSpec) -> MapSpec:
    """``spec``, or an error if it is a sampling map (a job needs a deterministic one)."""
    if spec.stochastic:
        raise UnknownMapError(
            f"map={spec.name!r} draws samples; only SimplexWeights, WeightedSum and Simplex "
            f"take it. Deterministic maps: {sorted(DETERMINISTIC)}."
        )
    return spec


#: The maps whose output is a function of the input (every map but the sampling ones).
DETERMINISTIC: list[str] = [name for name, spec in MAPS.items() if not spec.stochastic]
