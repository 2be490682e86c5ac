"""MixtureSampler: frequencies follow the weights, changes act at the next draw, resume is
exact, ranks are disjoint, and the DataLoader (workers included) draws in the main process."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from convexmix.data import MixtureSampler, MixtureWeights
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError

stats = pytest.importorskip("scipy.stats")

SIZES = [1000, 37, 5000, 250]


def domains_of(sampler: MixtureSampler, idx: list[int]) -> np.ndarray:
    return sampler.domain_of(torch.tensor(idx)).numpy()


@pytest.mark.parametrize("replacement", [True, False])
def test_domain_frequencies_match_the_weights(replacement: bool) -> None:
    p = np.array([0.45, 0.05, 0.3, 0.2])
    n = 1_000_000
    s = MixtureSampler(SIZES, torch.tensor(p), num_samples=n, seed=7, replacement=replacement)
    idx = list(s)
    assert len(idx) == n == len(s)
    counts = np.bincount(domains_of(s, idx), minlength=4)
    assert stats.chisquare(counts, p * n).pvalue > 0.001
    # within a domain, every example equally likely (the small domain of 37)
    small = np.array(idx)[(np.array(idx) >= 1000) & (np.array(idx) < 1037)] - 1000
    within = np.bincount(small, minlength=37)
    assert stats.chisquare(within).pvalue > 0.001
    assert min(idx) >= 0
    assert max(idx) < sum(SIZES)


def test_frequencies_follow_a_mixture_weights_object() -> None:
    mw = MixtureWeights(["a", "b", "c"], update="eg", lr=1.0, init=[0.2, 0.3, 0.5])
    mw.step({"a": 0.5, "b": 0.0, "c": 0.1})
    n = 1_000_000
    s = MixtureSampler({"c": 300, "a": 100, "b": 200}, mw, num_samples=n, seed=3)
    counts = np.bincount(domains_of(s, list(s)), minlength=3)
    assert stats.chisquare(counts, mw.weights.numpy() * n).pvalue > 0.001
    # the mapping was ordered as the weights' domains: a = [0, 100), b, c
    assert s.sizes == [100, 200, 300]


def test_a_weight_change_takes_effect_at_the_next_draw() -> None:
    mw = MixtureWeights(["a", "b"], update="eg", lr=1.0, smoothing=1e-12)
    mw.step({"a": 100.0})  # ~ all on a
    s = MixtureSampler([50, 50], mw, num_samples=3000, seed=0)
    it = iter(s)
    first = [next(it) for _ in range(1000)]
    mw.step({"b": 1000.0})  # ~ all on b, from the very next index on
    second = [next(it) for _ in range(1000)]
    mw.step({"a": 5000.0})
    third = list(it)
    assert (domains_of(s, first) == 0).all()
    assert (domains_of(s, second) == 1).all()
    assert (domains_of(s, third) == 0).all()
    assert len(third) == 1000


def test_a_change_inside_a_block_redraws_only_the_rest() -> None:
    """Up to the change the stream is the unchanged sampler's; after it, a new one."""
    mw = MixtureWeights(["a", "b"], update="eg", lr=1.0)
    fixed = list(MixtureSampler([100, 100], torch.tensor([0.5, 0.5]), num_samples=5000, seed=1))
    s = MixtureSampler([100, 100], mw, num_samples=5000, seed=1)
    it = iter(s)
    head = [next(it) for _ in range(700)]
    mw.step({"a": 0.3, "b": 0.0})
    tail = list(it)
    assert head == fixed[:700]
    assert tail != fixed[700:]
    frac_a = (domains_of(s, tail) == 0).mean()
    assert frac_a == pytest.approx(mw.weights[0].item(), abs=0.03)


def run_with_changes(
    sampler: MixtureSampler, mw: MixtureWeights, start: int, stop: int, it=None
) -> list[int]:  # type: ignore[no-untyped-def]
    """Draw positions start..stop-1, stepping the weights every 97 draws."""
    it = iter(sampler) if it is None else it
    out = []
    for pos in range(start, stop):
        if pos % 97 == 0 and pos:
            mw.step({"a": (pos % 5) * 0.1, "b": 0.2, "c": (pos % 3) * 0.15})
        out.append(next(it))
    return out


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("cut", [1, 300, 1000, 2500])
def test_resume_from_state_dict_gives_the_identical_stream(replacement: bool, cut: int) -> None:
    def make() -> tuple[MixtureSampler, MixtureWeights]:
        mw = MixtureWeights(["a", "b", "c"], lr=1.0, smoothing=0.05)
        return MixtureSampler(
            [40, 7, 300], mw, num_samples=4000, seed=11, replacement=replacement
        ), mw

    s, mw = make()
    s.set_epoch(2)
    it = iter(s)
    head = run_with_changes(s, mw, 0, cut, it)
    saved_s, saved_w = s.state_dict(), mw.state_dict()
    tail = run_with_changes(s, mw, cut, 4000, it)

    s2, mw2 = make()
    mw2.load_state_dict(saved_w)
    s2.load_state_dict(saved_s)
    tail2 = run_with_changes(s2, mw2, cut, 4000)
    assert tail2 == tail
    # and the whole run from scratch is the same stream too (determinism from the seed)
    s3, mw3 = make()
    s3.set_epoch(2)
    assert run_with_changes(s3, mw3, 0, 4000) == head + tail


def test_resume_at_the_end_of_an_epoch_yields_nothing_then_a_new_epoch() -> None:
    s = MixtureSampler([10, 10], [0.5, 0.5], num_samples=50, seed=0)
    first = list(s)
    state = s.state_dict()
    s2 = MixtureSampler([10, 10], [0.5, 0.5], num_samples=50, seed=0)
    s2.load_state_dict(state)
    assert list(s2) == []
    assert list(s2) == first  # same epoch, from the start
    s2.set_epoch(1)
    assert list(s2) != first


def test_seed_and_epoch_determinism() -> None:
    a = list(MixtureSampler(SIZES, [0.25] * 4, num_samples=2000, seed=5))
    b = list(MixtureSampler(SIZES, [0.25] * 4, num_samples=2000, seed=5))
    c = list(MixtureSampler(SIZES, [0.25] * 4, num_samples=2000, seed=6))
    assert a == b
    assert a != c


def test_without_replacement_each_pass_is_a_permutation() -> None:
    s = MixtureSampler([30, 500], [0.5, 0.5], num_samples=3000, seed=2, replacement=False)
    idx = np.array(list(s))
    small = idx[idx < 30]
    passes = len(small) // 30
    assert passes >= 10
    for k in range(passes):
        assert sorted(small[30 * k : 30 * (k + 1)].tolist()) == list(range(30))
    assert len(set(small[:30].tolist())) == 30
    assert small[:30].tolist() != small[30:60].tolist()  # reshuffled each pass


@pytest.mark.parametrize("replacement", [True, False])
def test_ranks_draw_disjoint_shards(replacement: bool) -> None:
    sizes = [101, 40, 999]
    streams = [
        list(
            MixtureSampler(
                sizes, [0.2, 0.5, 0.3], seed=4, rank=r, world_size=3, replacement=replacement
            )
        )
        for r in range(3)
    ]
    sets = [set(x) for x in streams]
    for a, b in itertools.combinations(sets, 2):
        assert not a & b
    assert all(len(x) == -(-sum(sizes) // 3) for x in streams)
    offsets = np.cumsum([0, *sizes[:-1]])
    for r, x in enumerate(streams):
        idx = np.array(x)
        dom = np.searchsorted(np.cumsum(sizes), idx, side="right")
        assert ((idx - offsets[dom]) % 3 == r).all()


class Tagged(Dataset[tuple[int, int]]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, os.getpid()


def test_with_a_concat_dataset_and_domain_of() -> None:
    parts = [TensorDataset(torch.full((n,), float(d))) for d, n in enumerate([20, 30, 5])]
    data = ConcatDataset(parts)
    s = MixtureSampler(data, [0.3, 0.3, 0.4], num_samples=200, seed=0)
    assert s.sizes == [20, 30, 5]
    idx = list(s)
    assert [int(data[i][0]) for i in idx] == s.domain_of(torch.tensor(idx)).tolist()
    s2 = MixtureSampler(parts, [0.3, 0.3, 0.4], num_samples=200, seed=0)
    assert list(s2) == idx


def test_dataloader_with_workers_samples_in_the_main_process() -> None:
    """Workers get index batches drawn in the main process; a weight change reaches the
    batches drawn after the loader's look-ahead of prefetch_factor * num_workers."""
    mw = MixtureWeights(["a", "b"], update="eg", lr=1.0, smoothing=1e-12)
    mw.step({"a": 100.0})
    workers, prefetch, batch = 2, 2, 8
    s = MixtureSampler([100, 100], mw, num_samples=30 * batch, seed=0)
    loader = DataLoader(
        Tagged(200), batch_size=batch, sampler=s, num_workers=workers, prefetch_factor=prefetch
    )
    doms, pids = [], set()
    for j, (idx, pid) in enumerate(loader):
        doms.append(s.domain_of(idx).tolist())
        pids.update(pid.tolist())
        if j == 5:
            mw.step({"b": 1000.0})
    assert os.getpid() not in pids  # the items were loaded in the workers
    lag = prefetch * workers
    assert all(d == [0] * batch for d in doms[: 6 + lag])  # already drawn before the change
    assert all(d == [1] * batch for d in doms[6 + lag :])  # drawn after it, in this process
    assert len(doms) == 30


def test_errors() -> None:
    with pytest.raises(ConvexMixError, match="at least world_size=4 examples"):
        MixtureSampler([10, 3], [0.5, 0.5], seed=0, rank=0, world_size=4)
    with pytest.raises(ShapeError, match=r"shape \(2,\)"):
        MixtureSampler([10, 3], [0.5, 0.3, 0.2], seed=0)
    with pytest.raises(ConvexMixError, match="finite, >= 0 and not all 0"):
        MixtureSampler([10, 3], [0.5, -0.3], seed=0)
    with pytest.raises(ConvexMixError, match="rank < world_size"):
        MixtureSampler([10, 3], [0.5, 0.5], seed=0, rank=2, world_size=2)
    with pytest.raises(ConvexMixTypeError, match="seed must be an int"):
        MixtureSampler([10, 3], [0.5, 0.5], seed=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConvexMixTypeError, match="int size or a sized dataset"):
        MixtureSampler([10, object()], [0.5, 0.5], seed=0)  # type: ignore[list-item]
    mw = MixtureWeights(["a", "b"], lr=1.0)
    with pytest.raises(ConvexMixError, match="the weights' domains are"):
        MixtureSampler({"a": 3, "c": 4}, mw, seed=0)
    with pytest.raises(ShapeError, match="weights has 2 domains"):
        MixtureSampler([3, 4, 5], mw, seed=0)
    s = MixtureSampler([10, 3], [0.5, 0.5], seed=0)
    with pytest.raises(ConvexMixError, match="the sampler state has seed=0; this sampler has 1"):
        MixtureSampler([10, 3], [0.5, 0.5], seed=1).load_state_dict(s.state_dict())


def test_a_change_does_not_shift_the_random_numbers_of_later_draws() -> None:
    """Draw p owns its uniform numbers: weights changed and changed back leave the draws
    after the change-back equal to those of a run whose weights never changed."""

    def run(detour: bool) -> list[int]:
        mw = MixtureWeights(["a", "b", "c"], update="eg", lr=1.0)
        s = MixtureSampler([100, 200, 300], mw, num_samples=3000, seed=8)
        it = iter(s)
        out = [next(it) for _ in range(500)]
        if detour:
            saved = mw.state_dict()
            mw.step({"a": 3.0, "b": 0.0, "c": 1.0})
            out += [next(it) for _ in range(100)]
            mw.load_state_dict(saved)
        return out + list(it)

    plain, detour = run(False), run(True)
    assert plain[:500] == detour[:500]
    assert plain[500:600] != detour[500:600]
    assert plain[600:] == detour[600:]
