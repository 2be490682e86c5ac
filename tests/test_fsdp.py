"""LearnedMerge under FSDP2 (``fully_shard``; 2 processes, gloo, CPU) matches one process.

The mixing weights (``free``, ``log_scale``) are sharded across the ranks; each rank
gets half of every batch. FSDP2 all-gathers the weights before the forward and
reduce-scatters the mean gradient after the backward, which for a mean loss over equal
halves is the full-batch gradient. So the full weights after training must equal those
of one process on the full batch, on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import convexmix as cx

from .distributed import run_ranks

STEPS = 4

fsdp = pytest.importorskip("torch.distributed.fsdp")


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def train(rank: int, world: int, shard: bool) -> dict[str, torch.Tensor]:
    """Task arithmetic with a learned scale, per module; rank r sees its share of a batch."""
    torch.manual_seed(0)
    merge = cx.merge.LearnedMerge(
        [make_net(s) for s in range(3)],
        granularity="per_module",
        base=make_net(10),
        scale="learn_per_group",
    )
    if shard:
        fsdp.fully_shard(merge)
        assert type(merge.free).__name__ == "DTensor"  # really sharded
    opt = torch.optim.SGD(merge.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(123)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for _ in range(STEPS):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(merge(x[share]), y[share]).backward()
        opt.step()
    out = {}
    for name, p in merge.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
    return train(rank, world, shard=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not hasattr(fsdp, "fully_shard"), reason="needs FSDP2 (torch >= 2.6)")
def test_fsdp2_two_processes_match_single_process(tmp_path: Path) -> None:
    ranks = run_ranks(sharded, tmp_path)
    single = train(0, 1, shard=False)
    assert set(single) == {"free", "log_scale"}
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6)
    assert (single["free"] - single["free"][:, :1]).abs().max() > 1e-3  # it trained
    assert single["log_scale"].abs().max() > 1e-3
