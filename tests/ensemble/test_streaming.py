"""fit_weights on a .npy path or a numpy memmap: read in row chunks, equal to in memory."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from convexmix.ensemble import _dense, fit_weights
from convexmix.errors import ConvexMixError

from .problems import mixed_problem


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed fits read files and memory maps on the torch path: the references too."""
    monkeypatch.setattr(_dense, "DENSE_MAX_VALUES", 0)


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
        torch.testing.assert_close(
            torch.as_tensor(fit.weights), in_memory.weights, rtol=0, atol=1e-12
        )
        assert fit.loss == pytest.approx(in_memory.loss, rel=1e-13)
        # float32 chunks are summed in float64: the same fit as the float64 values
        torch.testing.assert_close(torch.as_tensor(fit.weights), upcast.weights, rtol=0, atol=1e-10)


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
        torch.testing.assert_close(torch.as_tensor(fit.weights), ref.weights, rtol=0, atol=1e-12)
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


@pytest.mark.parametrize("native_read", [True, False])
def test_read_progress_reports_the_pass_over_a_file(
    tmp_path: Path, native_read: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line's "reading" bar: the (K, N, C) read reports each group of models
    (one per thread), the mse pass each chunk of rows, both up to their total; the fit
    and the errors are those of an uninterrupted read."""
    from convexmix._kernels import gather as native
    from convexmix.ensemble._inputs import read_progress

    if not native_read:
        monkeypatch.setattr(native, "true_class", lambda *args: None)
    P, y = mixed_problem(7, 3001, 4, seed=8)
    path = tmp_path / "p.npy"
    np.save(path, P.numpy().astype(np.float32))
    plain = fit_weights(path, y)
    seen: list[tuple[int, int]] = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with read_progress(lambda done, total: seen.append((done, total))):
            fit = fit_weights(path, y)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(
        torch.as_tensor(fit.weights), torch.as_tensor(plain.weights), rtol=0, atol=0
    )
    assert seen == (
        [(2, 7), (4, 7), (6, 7), (7, 7)] if native_read else [(k, 7) for k in range(1, 8)]
    )
    # mse: rows, in chunks, up to N
    seen.clear()
    big = P.repeat(1, 40, 1)  # 120040 rows: several chunks
    yy = y.repeat(40)
    with read_progress(lambda done, total: seen.append((done, total))):
        fit_weights(big, yy, loss="mse")
    assert len(seen) > 1
    assert seen[-1] == (120040, 120040)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    # no report outside the block
    seen.clear()
    fit_weights(path, y)
    assert seen == []
    # a bad value in a later group is still found, and reported as that model
    bad = P.clone()
    bad[5, 17, 1] = float("nan")
    with (
        read_progress(lambda done, total: seen.append((done, total))),
        pytest.raises(ConvexMixError, match="model 5 must be finite"),
    ):
        fit_weights(bad, y)
    assert seen == ([(2, 7), (4, 7)] if native_read else [(k, 7) for k in range(1, 6)])
