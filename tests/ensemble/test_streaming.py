"""fit_weights on a .npy path or a numpy memmap: read in row chunks, equal to in memory."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from convexmix.ensemble import fit_weights

from .problems import mixed_problem


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_path_and_memmap_equal_in_memory(tmp_path: Path, dtype: type) -> None:
    # 20011 rows: not a multiple of any chunk size the reader uses
    P, y = mixed_problem(7, 20011, 5, seed=3)
    P_np = P.numpy().astype(dtype)
    path = tmp_path / "p.npy"
    np.save(path, P_np)
    in_memory = fit_weights(torch.from_numpy(P_np.copy()), y)
    upcast = fit_weights(torch.from_numpy(P_np.astype(np.float64)), y)
    assert int((in_memory.weights > 0).sum()) >= 2  # a real blend
    for source in (path, str(path), np.load(path, mmap_mode="r")):
        fit = fit_weights(source, y)
        torch.testing.assert_close(fit.weights, in_memory.weights, rtol=0, atol=1e-12)
        assert fit.loss == pytest.approx(in_memory.loss, rel=1e-13)
        # float32 chunks are summed in float64: the same fit as the float64 values
        torch.testing.assert_close(fit.weights, upcast.weights, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memmap_mse_and_binary_equal_in_memory(tmp_path: Path, dtype: type) -> None:
    P, y = mixed_problem(5, 3001, 2, seed=4)
    binary = P[..., 1].numpy().astype(dtype)
    np.save(tmp_path / "b.npy", binary)
    mm = np.load(tmp_path / "b.npy", mmap_mode="r")
    for loss in ("log_loss", "mse"):
        ref = fit_weights(torch.from_numpy(binary.copy()), y, loss=loss)
        fit = fit_weights(mm, y, loss=loss)
        assert int((ref.weights > 0).sum()) >= 2
        torch.testing.assert_close(fit.weights, ref.weights, rtol=0, atol=1e-12)
        assert fit.loss == pytest.approx(ref.loss, rel=1e-12)


def test_file_is_not_modified(tmp_path: Path) -> None:
    P, y = mixed_problem(3, 500, 3, seed=5)
    P[0, :10] = 0.0  # zeros are floored at 1e-15 inside the fit, never in the file
    P[0, :10, 0] = 1.0
    path = tmp_path / "p.npy"
    np.save(path, P.numpy())
    before = path.read_bytes()
    fit_weights(path, y)
    assert path.read_bytes() == before


def _anon_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")  # pragma: no cover


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_fitting_a_240_mb_file_keeps_it_out_of_anonymous_memory(tmp_path: Path) -> None:
    K, N, C = 6, 1_000_000, 10  # float32: 240 MB
    path = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(K, N, C))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (N,), generator=g)
    step = 200_000
    for a in range(0, N, step):
        b = min(a + step, N)
        logits = torch.randn(K, b - a, C, generator=g)
        logits[:, torch.arange(b - a), y[a:b]] += torch.linspace(0.5, 2.0, K)[:, None]
        out[:, a:b] = torch.softmax(logits, -1).numpy()
    out.flush()
    del out, logits
    gc.collect()
    size = path.stat().st_size
    assert size >= 240_000_000
    base = _anon_rss()
    peak = base
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _anon_rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fit = fit_weights(path, y)
    finally:
        done.set()
        watcher.join()
    peak = max(peak, _anon_rss())
    assert fit.converged
    assert int((fit.weights > 0).sum()) >= 2
    grown = peak - base
    assert grown < size / 2, (
        f"anonymous RSS grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    )
