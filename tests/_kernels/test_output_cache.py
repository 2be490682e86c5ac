"""The cache of large CPU outputs (``_kernels/alloc.py`` + ``pool.c``) and its public
controls (``cx.cache_info``, ``cx.empty_cache``, ``cx.set_cache_limit``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import convexmix as cx
from convexmix._kernels import alloc, native
from convexmix.errors import ConvexMixError, ConvexMixWarning
from convexmix.functional import convex_combination

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="installed without native kernels: no output cache"
)

N = 1 << 21  # 8 MiB of float32: above alloc.MIN_BYTES, and convex_combination runs fused


@pytest.fixture
def cache() -> Iterator[object]:
    """The loaded library with a fresh, 256 MiB cache; the old limit is put back after."""
    lib = native.library()
    assert lib is not None
    limit = alloc.set_limit(0)  # empties it
    alloc.set_limit(256 << 20)
    yield lib
    alloc.set_limit(0)
    alloc.set_limit(limit)


def test_a_freed_output_is_reused_once_nothing_sees_it(cache: object) -> None:
    x = alloc.empty((N,), torch.float32)
    address = x.data_ptr()
    assert address % (2 << 20) == 0
    x.fill_(7.0)
    view = x[:10]
    del x
    assert alloc.cached_bytes() == 0  # the view keeps the storage alive
    other = alloc.empty((N,), torch.float32)
    assert other.data_ptr() != address
    other.fill_(1.0)
    assert torch.all(view == 7.0)  # not overwritten by the new output
    del view
    assert alloc.cached_bytes() == 8 << 20  # rounded up to 2 MiB pages
    again = alloc.empty((N,), torch.float32)
    assert again.data_ptr() == address
    assert alloc.cached_bytes() == 0


def test_shapes_and_dtypes_of_cached_outputs(cache: object) -> None:
    for shape, dtype in [((N,), torch.float32), ((3, 1000, 700), torch.bfloat16)]:
        t = alloc.empty(shape, dtype)
        assert t.shape == shape
        assert t.dtype == dtype
        assert t.is_contiguous()
        t.fill_(2.0)
        assert float(t.double().sum()) == 2.0 * t.numel()


def test_reuse_takes_a_block_with_at_most_a_quarter_to_spare(cache: object) -> None:
    x = alloc.empty((N,), torch.float32)  # 8 MiB block
    address = x.data_ptr()
    del x
    smaller = alloc.empty((N * 7 // 8,), torch.float32)  # 7 MiB -> 8 MiB fits
    assert smaller.data_ptr() == address
    del smaller
    much_smaller = alloc.empty((N // 2,), torch.float32)  # 4 MiB: would waste half
    assert much_smaller.data_ptr() != address
    assert alloc.cached_bytes() == 8 << 20


def test_the_limit_sends_old_blocks_back(cache: object) -> None:
    cache.cx_pool_set_cap(20 << 20)  # type: ignore[attr-defined]
    outs = [alloc.empty((N,), torch.float32) for _ in range(4)]
    del outs
    assert alloc.cached_bytes() == 16 << 20  # two 8 MiB blocks fit under 20 MiB
    cache.cx_pool_set_cap(0)  # type: ignore[attr-defined]
    assert alloc.cached_bytes() == 0


def test_freed_from_another_thread(cache: object) -> None:
    box = [alloc.empty((N,), torch.float32)]
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert alloc.cached_bytes() == 8 << 20


def test_training_steps_reuse_outputs_and_gradients(cache: object) -> None:
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(3), 0).requires_grad_()
    xs = [torch.randn(N, requires_grad=True) for _ in range(3)]
    opt = torch.optim.SGD([w, *xs], lr=0.0)
    for step in range(3):
        y = convex_combination(w, xs)
        y.square().sum().backward()
        if step:
            assert alloc.cached_bytes() == 0  # output and 3 gradients: last step's blocks
        for k, x in enumerate(xs):
            torch.testing.assert_close(x.grad, 2 * w.detach()[k] * y.detach())
        del y
        opt.zero_grad(set_to_none=True)
        assert alloc.cached_bytes() == 4 * (8 << 20)


def test_cache_off_gives_plain_tensors(monkeypatch: pytest.MonkeyPatch, cache: object) -> None:
    monkeypatch.setenv("CONVEXMIX_OUTPUT_CACHE_MB", "0")
    monkeypatch.setattr(alloc, "_limit", [])
    assert alloc.cache_limit() == 0
    x = alloc.empty((N,), torch.float32)
    x.resize_(2 * N)  # an ordinary, resizable storage
    del x
    assert alloc.cached_bytes() == 0


def test_cached_outputs_cannot_grow(cache: object) -> None:
    x = alloc.empty((N,), torch.float32)
    x.resize_(10)  # shrinking is fine
    with pytest.raises(RuntimeError, match="not resizable"):
        x.resize_(2 * N)


def _rss() -> int:
    """VmRSS of this process in bytes, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc")
def test_empty_cache_returns_the_blocks_to_the_os(cache: object) -> None:
    outs = [alloc.empty((N,), torch.float32) for _ in range(12)]  # 12 x 8 MiB
    for t in outs:
        t.fill_(1.0)  # resident
    del outs, t
    info = cx.cache_info()
    assert info.bytes == info.held == 12 * (8 << 20)
    assert info.limit == 256 << 20
    before = _rss()
    cx.empty_cache()
    after = _rss()
    assert cx.cache_info() == (0, 256 << 20)  # the limit stays
    assert before - after >= 0.9 * 12 * (8 << 20), (before, after)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc")
def test_a_low_limit_keeps_memory_low_over_many_sizes(cache: object) -> None:
    # The case: with the cache capped at 10 MiB, 150 outputs of 4-64 MiB left
    # 111 MiB resident; blocks beyond the limit now leave the process when freed.
    cx.set_cache_limit(10 << 20)
    gen = torch.Generator().manual_seed(0)
    base = _rss()
    for _ in range(150):
        mib = int(torch.randint(4, 65, (1,), generator=gen))
        alloc.empty((mib << 18,), torch.float32).fill_(1.0)
    assert cx.cache_info().bytes <= 10 << 20
    assert _rss() - base <= (10 << 20) + (16 << 20), (_rss() - base) >> 20


def test_set_cache_limit_as_setter_and_context_manager(cache: object) -> None:
    x = alloc.empty((N,), torch.float32)
    del x
    assert cx.cache_info().bytes == 8 << 20
    with cx.set_cache_limit(0) as ctx:
        assert ctx.previous == 256 << 20
        assert cx.cache_info() == (0, 0)  # a lower limit drops blocks at once
        y = alloc.empty((N,), torch.float32)
        y.resize_(2 * N)  # the cache is off: a plain, resizable tensor
        del y
        assert cx.cache_info().bytes == 0
    assert cx.cache_info().limit == 256 << 20
    previous = cx.set_cache_limit(64 << 20).previous
    assert previous == 256 << 20
    assert cx.cache_info().limit == 64 << 20
    cx.set_cache_limit(None)
    assert cx.cache_info().limit == alloc.default_limit()


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_set_cache_limit_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ConvexMixError, match="expects a number of bytes >= 0"):
        cx.set_cache_limit(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["abc", "-5", "nan", "inf"])
def test_a_bad_environment_value_warns_and_uses_the_default(
    monkeypatch: pytest.MonkeyPatch, cache: object, bad: str
) -> None:
    monkeypatch.setenv("CONVEXMIX_OUTPUT_CACHE_MB", bad)
    monkeypatch.setattr(alloc, "_limit", [])
    with pytest.warns(ConvexMixWarning, match=rf"CONVEXMIX_OUTPUT_CACHE_MB='{bad}' is not a size"):
        assert cx.cache_info().limit == alloc.default_limit()


def test_environment_value_in_mib(monkeypatch: pytest.MonkeyPatch, cache: object) -> None:
    monkeypatch.setenv("CONVEXMIX_OUTPUT_CACHE_MB", "12.5")
    monkeypatch.setattr(alloc, "_limit", [])
    assert cx.cache_info().limit == int(12.5 * (1 << 20))


def test_the_default_limit() -> None:
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert alloc.default_limit() == min(memory // 16, 1 << 30)


def _block(limit: int, entered: threading.Event, release: threading.Event) -> None:
    with cx.set_cache_limit(limit):
        entered.set()
        assert release.wait(10)


@pytest.mark.parametrize("first_out", ["first_in", "second_in"])
def test_overlapping_blocks_in_two_threads_restore_the_limit(cache: object, first_out: str) -> None:
    """Two threads' blocks that overlap: whichever ends first, the limit in force is the
    latest block still open, and the limit they found comes back once both end (the
    block that ended last used to put back the other's 0: the cache stayed off)."""
    start = cx.cache_info().limit
    events = [(threading.Event(), threading.Event()) for _ in range(2)]
    threads = [
        threading.Thread(target=_block, args=(limit, *ev))
        for limit, ev in zip((0, 16 << 20), events, strict=True)
    ]
    threads[0].start()
    assert events[0][0].wait(10)
    assert cx.cache_info().limit == 0
    threads[1].start()
    assert events[1][0].wait(10)
    assert cx.cache_info().limit == 16 << 20  # the latest block in force
    order = [0, 1] if first_out == "first_in" else [1, 0]
    events[order[0]][1].set()
    threads[order[0]].join(10)
    still = order[1]
    assert cx.cache_info().limit == (0, 16 << 20)[still]  # the other block is in force
    events[still][1].set()
    threads[still].join(10)
    assert cx.cache_info().limit == start


def test_many_threads_nesting_blocks_leave_the_limit(cache: object) -> None:
    start = cx.cache_info().limit
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        for i in range(50):
            with cx.set_cache_limit((t * 50 + i) % 3 << 20):
                if i % 10 == 0:
                    barrier.wait(10)
                with cx.set_cache_limit(t << 20):
                    pass

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert cx.cache_info().limit == start


def test_a_plain_call_inside_a_block_stays_in_force(cache: object) -> None:
    with cx.set_cache_limit(0):
        with cx.set_cache_limit(1 << 20):
            assert cx.cache_info().limit == 1 << 20
        assert cx.cache_info().limit == 0  # nesting in one thread: the outer block again
        cx.set_cache_limit(32 << 20)  # plain: from now on, past the block's end
        assert cx.cache_info().limit == 32 << 20
    assert cx.cache_info().limit == 32 << 20
    with cx.set_cache_limit(2 << 20):
        pass
    assert cx.cache_info().limit == 32 << 20
