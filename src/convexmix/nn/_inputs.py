"""What the layers take as inputs, and how many a call carries (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError

__all__: list[str] = []

Inputs = Sequence[Tensor] | Tensor | Mapping[str, Tensor]


def count_inputs(inputs: object) -> int:
    """How many inputs a call carries (list/tuple length, size of dim 0, or dict size)."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ShapeError(
                "inputs as one tensor must have the n inputs along dim 0; got a 0-d tensor."
            )
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple, Mapping)):
        return len(inputs)
    raise ConvexMixError(
        "inputs must be a list or tuple of tensors, one tensor with the inputs along dim 0, "
        f"or a dict keyed by source name; got {type(inputs).__name__}."
    )
