"""Sharded fits: sums over rows all-reduced over a torch.distributed group (private).

A sharded fit must never leave a rank waiting in a collective that another rank will not
join. Every check that can fail on one rank (an empty shard, a NaN, bad labels, settings
that differ from the other ranks') runs before the collective that depends on it: until
the objective is built, each all-reduce is preceded by a small all-reduce of a status
(failed or not, and a hash of the settings), and a rank whose checks failed joins that
status with its failure instead of the collective. Every rank then raises the same
:class:`ShardedFitError`, naming the first failing rank and its message.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from convexmix.ensemble._objectives import Reduce, local
from convexmix.errors import ConvexMixError

__all__ = ["Sharded", "ShardedFitError", "reducer"]


class ShardedFitError(ConvexMixError):
    """A sharded fit failed on some rank: every rank raises this same error."""


def _settings_hash(settings: tuple[object, ...]) -> int:
    """A 62-bit hash of the settings' repr (the same on every rank, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(settings).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class Sharded:
    """The sum over every rank's rows (an all-reduce over ``group``), with the status
    agreement described in the module docstring until :meth:`agree` has passed."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.settings: tuple[object, ...] = ()
        self.agreed = False

    def _status(self, error: ConvexMixError | None) -> None:
        """All ranks exchange (failed, first failing rank, settings hash); raises the
        agreed ShardedFitError on every rank when any failed or the settings differ."""
        h = _settings_hash(self.settings)
        failed = error is not None
        status = torch.tensor(
            [int(failed), -(self.rank if failed else self.world), h, -h], dtype=torch.int64
        )
        self.dist.all_reduce(status, op=self.dist.ReduceOp.MAX, group=self.group)
        if int(status[0]):
            first = -int(status[1])
            message = [str(error) if self.rank == first else None]
            src = self.dist.get_global_rank(self.group, first) if self.group is not None else first
            self.dist.broadcast_object_list(message, src=src, group=self.group)
            raise ShardedFitError(f"sharded fit: rank {first} of {self.world}: {message[0]}")
        if int(status[2]) != -int(status[3]):
            raise ShardedFitError(
                "sharded fit: the ranks passed different settings (loss, map, "
                "regularization, tol, max_iter, validate, sample weights or not) or "
                "predictions of different models and classes (K, C)."
            )

    def fail(self, error: ConvexMixError) -> None:
        """This rank's checks failed: join the status with the failure and raise (on every
        rank). A ShardedFitError is already agreed: raised as it is."""
        if isinstance(error, ShardedFitError) or self.agreed:
            raise error
        self._status(error)
        raise AssertionError("unreachable: the status raises")  # pragma: no cover

    def agree(self) -> None:
        """Every rank built its objective: the last status, then plain all-reduces."""
        if not self.agreed:
            self._status(None)
            self.agreed = True

    def __call__(self, x: Tensor) -> Tensor:
        if not self.agreed:
            self._status(None)
        y = x.detach().clone()
        self.dist.all_reduce(y, op=self.dist.ReduceOp.SUM, group=self.group)
        return y


def reducer(process_group: Any) -> Reduce | Sharded:
    """``local`` for a fit in one process; otherwise a :class:`Sharded` sum over
    ``process_group`` (no collective runs here).

    ``None`` means the default group when torch.distributed is initialised, and one
    process otherwise.
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
    return Sharded(process_group)
