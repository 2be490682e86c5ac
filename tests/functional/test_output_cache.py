"""The cache of large CPU outputs (``_kernels/alloc.py`` + ``pool.c``)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest
import torch

from convexmix._kernels import alloc, native
from convexmix.functional import convex_combination

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler: no output cache")

N = 2_000_000  # 8 MiB of float32, above alloc.MIN_BYTES


@pytest.fixture
def cache() -> Iterator[object]:
    """The loaded library with a fresh, 256 MiB cache; the old limit is put back after."""
    lib = native.library()
    assert lib is not None
    limit = alloc.cache_limit()
    lib.cx_pool_set_cap(0)  # empties it
    lib.cx_pool_set_cap(256 << 20)
    yield lib
    lib.cx_pool_set_cap(0)
    lib.cx_pool_set_cap(limit)


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
    monkeypatch.setattr(alloc, "_cap", [])
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
