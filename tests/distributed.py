"""Run a function on 2 gloo processes (CPU) and collect what each rank returns."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RankFn = Callable[[int, int], dict[str, torch.Tensor]]


def _worker(rank: int, world: int, fn: RankFn, out_dir: str) -> None:
    init = f"file://{os.path.join(out_dir, 'init')}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # DDP- and FSDP-wrapped modules sit in reference cycles that hold the process
        # group. Left to the interpreter's shutdown, the group is destroyed after
        # Python is gone and its gloo threads abort the process (SIGABRT, "terminate
        # called without an active exception"), about one run in 20 here. Collect
        # them while Python is alive.
        gc.collect()
        dist.destroy_process_group()


def run_ranks(fn: RankFn, tmp_path: Path, world: int = 2) -> list[dict[str, torch.Tensor]]:
    """``fn(rank, world)`` on ``world`` processes; fn must be a module-level function."""
    mp.spawn(_worker, args=(world, fn, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
