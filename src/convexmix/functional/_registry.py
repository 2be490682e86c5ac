"""The registry of simplex maps: name -> (map, right inverse), for the parametrizations,
layers, optimizers, jobs and CLI (private). Modules saved with ``torch.save``/pickle name
:class:`MapSpec` and the inverses by this module's path: it stays here.

Every map has a right inverse ``inv`` with ``map(inv(p)) == p`` for ``p`` on the simplex:

* softmax: ``T * log(p)``, zeros smoothed to ``SOFTMAX_ZERO_EPS`` (softmax has no exact 0);
* sparsemax: the identity; entmax15: ``2 * sqrt(p)`` (both exact, zeros included);
* stick_breaking: its exact inverse, after the same smoothing of zeros as the softmax.

A temperature ``T`` divides the input of every map: ``map(x / T)``, inverse ``T * inv(p)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from convexmix.errors import UnknownMapError
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


def _sparsemax_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return p.clamp_min(0)


def _entmax15_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return entmax_inverse(p, 1.5, total=total)


def _softmax_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    return softmax_inverse(p, dim, total=total)


def _stick_inverse(p: Tensor, dim: int, total: float) -> Tensor:
    q = p.clamp_min(SOFTMAX_ZERO_EPS * total)  # zeros would give infinite free values
    return stick_breaking_inverse(q * (total / q.sum(dim, keepdim=True)), dim, total=total)


MAPS: dict[str, MapSpec] = {
    "softmax": MapSpec("softmax", softmax, _softmax_inverse),
    "sparsemax": MapSpec("sparsemax", sparsemax, _sparsemax_inverse),
    "entmax15": MapSpec("entmax15", entmax15, _entmax15_inverse),
    "stick_breaking": MapSpec("stick_breaking", stick_breaking, _stick_inverse, drop=1),
}


def get_map(name: str) -> MapSpec:
    """The :class:`MapSpec` called ``name``, or an error that lists the known names."""
    if isinstance(name, MapSpec):
        return name
    if not isinstance(name, str) or name not in MAPS:
        raise UnknownMapError(f"map must be one of {sorted(MAPS)}; got {name!r}.")
    return MAPS[name]
