"""Sharded fits: sums over rows all-reduced over a torch.distributed group (private)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._objectives import Reduce, local
from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["reducer"]


def reducer(process_group: Any, shape: tuple[int, ...]) -> Reduce:
    """The sum over every rank's rows: an all-reduce over ``process_group``.

    ``None`` means the default group when torch.distributed is initialised, and one
    process otherwise. Every rank must hold predictions of the same (K, [C]) trailing
    shape; a mismatch raises on every rank (never a hang in a later collective).
    """
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return local
    elif not (dist.is_available() and dist.is_initialized()):
        raise ConvexMixError(
            "process_group was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first."
        )
    if dist.get_world_size(process_group) == 1:
        return local

    def reduce(x: Tensor) -> Tensor:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=process_group)
        return y

    # K and C must agree across ranks (N may differ): compare the max and the min.
    dims = torch.tensor([shape[0], shape[2] if len(shape) == 3 else 0, len(shape)])
    hi, lo = dims.clone(), -dims
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=process_group)
    if not (torch.equal(hi, dims) and torch.equal(-lo, dims)):
        raise ShapeError(
            "every rank must pass predictions with the same models and classes "
            f"(K, C); this rank has shape {shape}, others differ."
        )
    return reduce
