"""The one interface of the combine back ends: Triton (:mod:`.gpu`), native CPU
(:mod:`.cpu`) and blocked ATen (:mod:`.aten`) (private).

Each back end is a module with

* ``forward(weights, xs, out) -> bool``: writes ``out = sum_k weights[k] xs[k]`` and says
  True, or does nothing and says False where it does not apply;
* ``backward(grad, weights, xs, need_w, need_x) -> Grads | None``: the gradients, or None
  (nothing done) where it does not apply.

``weights`` is ``(K,)`` or ``(K, *S)`` in the accumulation dtype, ``xs`` the K same-shape
inputs, ``need_x`` one flag per input. The ATen back end always applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

__all__: list[str] = []


class Grads(NamedTuple):
    """A back end's backward: the weights' gradient (their shape and dtype; None when
    not asked for) and the gradients of the inputs asked for, in order, only those."""

    weights: Tensor | None
    inputs: list[Tensor]


#: ``forward(weights, xs, out) -> bool``
Forward = Callable[[Tensor, list[Tensor], Tensor], bool]
#: ``backward(grad, weights, xs, need_w, need_x) -> Grads | None``
Backward = Callable[[Tensor, Tensor, list[Tensor], bool, list[bool]], Grads | None]
