"""Training under DistributedDataParallel (2 processes, gloo, CPU) matches one process.

Each rank gets half of every batch; DDP averages the gradients, which for a mean loss over
equal halves is the full-batch gradient. So both ranks must hold identical weights after
every step, equal to those of one process training on the full batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import convexmix as cx

from .distributed import run_ranks

STEPS = 5


def make_nets() -> list[nn.Module]:
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)))
    return nets


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    sources = torch.randn(STEPS, 3, 8, 4, generator=g)  # (step, source, batch, features)
    x = torch.randn(STEPS, 8, 4, generator=g)
    y = torch.randint(0, 2, (STEPS, 8), generator=g)
    return sources, x, y


def train(rank: int, world: int, ddp: bool) -> dict[str, torch.Tensor]:
    """Train a WeightedSum and a LearnedMerge; rank r of `world` sees its share of a batch."""
    torch.manual_seed(0)
    fuse = cx.WeightedSum(3, channels=4)
    merge = cx.merge.LearnedMerge(make_nets(), granularity="per_tensor")
    models: list[nn.Module] = [fuse, merge]
    if ddp:
        models = [DistributedDataParallel(m) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    sources, x, y = data()
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for step in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        fused = models[0](list(sources[step, :, share]))
        loss_a = (fused - sources[step, 0, share] * 0.5).square().mean()
        loss_b = nn.functional.cross_entropy(models[1](x[step, share]), y[step, share])
        (loss_a + loss_b).backward()
        for opt in opts:
            opt.step()
    return {"fuse": fuse.weights.detach().clone(), "merge": merge.weights.detach().clone()}


def wrapped(rank: int, world: int) -> dict[str, torch.Tensor]:
    return train(rank, world, ddp=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    ranks = run_ranks(wrapped, tmp_path)
    single = train(0, 1, ddp=False)
    for key in ("fuse", "merge"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6)
        assert (single[key] - 1 / 3).abs().max() > 1e-3  # it trained: not the uniform start
