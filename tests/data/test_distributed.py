"""Two gloo processes: bit-identical weights from different per-rank losses, the count-
weighted pooled update of one process, disjoint sampler indices, and a NaN on one rank
raised on both with the weights unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from convexmix.data import MixtureSampler, MixtureWeights
from convexmix.errors import ConvexMixError

from ..distributed import run_ranks

DOMAINS = ["a", "b", "c"]
STEPS = 12


def rank_losses(rank: int, step: int) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Each rank sees different losses, domains and counts (rank 1 misses 'c' on odd steps)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    vals = (torch.rand(3, generator=g, dtype=torch.float64) * 3).tolist()
    refs = (torch.rand(3, generator=g, dtype=torch.float64)).tolist()
    names = DOMAINS if (rank == 0 or step % 2 == 0) else DOMAINS[:2]
    counts = {n: 1 + (3 * rank + i + step) % 5 for i, n in enumerate(names)}
    return (
        {n: vals[i] for i, n in enumerate(names)},
        {n: refs[i] for i, n in enumerate(names)},
        counts,
    )


def train(rank: int, world: int) -> dict[str, torch.Tensor]:
    mw = MixtureWeights(DOMAINS, update="doremi", lr=1.0, smoothing=0.01)
    sampler = MixtureSampler([300, 50, 1000], mw, num_samples=STEPS * 32, seed=9)
    it = iter(sampler)
    drawn = []
    for step in range(STEPS):
        drawn += [next(it) for _ in range(32)]
        loss, ref, counts = rank_losses(rank, step)
        mw.step(loss, ref, counts=counts)
    before = mw.weights
    bad, _, _ = rank_losses(rank, STEPS)
    if rank == 1:
        bad["b"] = float("nan")
    raised = ""
    try:
        mw.step(bad)
    except ConvexMixError as err:
        raised = str(err)
    return {
        "weights": mw.weights,
        "average": mw.average,
        "indices": torch.tensor(drawn),
        "unchanged": torch.tensor(torch.equal(before, mw.weights)),
        "raised": torch.tensor([ord(ch) for ch in raised], dtype=torch.int64),
        "rank": torch.tensor([sampler.rank, sampler.world_size]),
    }


def pooled_single_process() -> MixtureWeights:
    """The same updates in one process, from the count-weighted means over the ranks."""
    mw = MixtureWeights(DOMAINS, update="doremi", lr=1.0, smoothing=0.01)
    for step in range(STEPS):
        per_rank = [rank_losses(r, step) for r in range(2)]
        loss, ref = {}, {}
        for n in DOMAINS:
            seen = [(lo[n], re[n], c[n]) for lo, re, c in per_rank if n in lo]
            total = sum(c for _, _, c in seen)
            loss[n] = sum(v * c for v, _, c in seen) / total
            ref[n] = sum(v * c for _, v, c in seen) / total
        mw.step(loss, ref)
    return mw


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_identical_weights_disjoint_indices(tmp_path: Path) -> None:
    r0, r1 = run_ranks(train, tmp_path)
    assert r0["rank"].tolist() == [0, 2]
    assert r1["rank"].tolist() == [1, 2]
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["average"], r1["average"])
    single = pooled_single_process()
    torch.testing.assert_close(r0["weights"], single.weights, rtol=0, atol=1e-13)
    torch.testing.assert_close(r0["average"], single.average, rtol=0, atol=1e-13)
    assert (single.weights - 1 / 3).abs().max() > 1e-2  # it moved
    assert not set(r0["indices"].tolist()) & set(r1["indices"].tolist())
    for r in (r0, r1):
        assert bool(r["unchanged"])
        msg = "".join(chr(c) for c in r["raised"].tolist())
        assert "domains ['b'] have a NaN" in msg
    assert "on this rank: {'b': nan}" in "".join(chr(c) for c in r1["raised"].tolist())
