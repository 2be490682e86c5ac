"""Sum a small tensor over the ranks of a torch.distributed group, in rank order (private).

``all_reduce`` may add in an order that depends on the rank and the algorithm; gathering
every rank's tensor and adding them in rank order on each rank gives bit-identical sums
everywhere, which the domain weights need (every rank must sample with the same weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["gather_sum", "group_rank_world", "is_distributed"]

# Whether this build of torch has torch.distributed at all (fixed for the process; asked
# once, since the weights ask on every step).
_AVAILABLE = dist.is_available()


def group_rank_world(process_group: Any) -> tuple[int, int]:
    """(rank, world size) in ``process_group``; (0, 1) when torch.distributed is not running."""
    if not (_AVAILABLE and dist.is_initialized()):
        if process_group is not None:
            raise ConvexMixError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first."
            )
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def is_distributed(process_group: Any) -> bool:
    """Whether ``process_group`` (None: the default group) has more than one process."""
    return group_rank_world(process_group)[1] > 1


def gather_sum(x: Tensor, process_group: Any) -> Tensor:
    """``sum_r x_r`` over the group's ranks, added in rank order (CPU float64 in and out)."""
    _, world = group_rank_world(process_group)
    if world == 1:
        return x
    device = torch.device("cpu")
    if dist.get_backend(process_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    shape = torch.tensor(list(x.shape), device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=process_group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ShapeError(
            "every rank must track the same domains; the per-domain tensors have shapes "
            f"{[tuple(s.tolist()) for s in shapes]} across the ranks."
        )
    local = x.to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=process_group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to("cpu")
