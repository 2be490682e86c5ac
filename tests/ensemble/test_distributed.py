"""fit_weights(process_group=...) on 2 gloo processes equals one process on all rows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import convexmix as cx
from convexmix.ensemble import fit_weights

from .problems import mixed_problem

N = 3001  # an odd count: the ranks hold 1500 and 1501 rows


def shard(rank: int, world: int) -> slice:
    return slice(rank * N // world, (rank + 1) * N // world)


def fits(rows: slice, **kw: object) -> dict[str, torch.Tensor]:
    P, y = mixed_problem(6, N, 4, seed=3)
    s = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    out = {}
    for name, extra in {
        "log_loss": {},
        "weighted": {"sample_weight": s[rows]},
        "mse": {"loss": "mse"},
        "binary_reg": {"regularization": 0.01},
    }.items():
        preds = P[..., 1] if name == "binary_reg" else P
        targets = (y == 1).long() if name == "binary_reg" else y
        preds = preds.float() if name == "mse" else preds
        fit = fit_weights(preds[:, rows], targets[rows], **extra, **kw)  # type: ignore[arg-type]
        out[name] = fit.weights
        out[name + "_loss"] = torch.tensor(fit.loss, dtype=torch.float64)
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = fits(shard(rank, world))
        # an explicit group gives the same; a callable loss is a clear error
        out["group"] = fit_weights(*_half(rank, world), process_group=dist.group.WORLD).weights
        try:
            fit_weights(*_half(rank, world), loss=lambda b, t: (b - t).square())
        except cx.ConvexMixError as err:
            out["error"] = torch.tensor(list(str(err).encode()))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _half(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    P, y = mixed_problem(6, N, 4, seed=3)
    rows = shard(rank, world)
    return P[:, rows], y[rows]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = fits(slice(0, N))
    for key, ref in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], ref, rtol=0, atol=1e-10)
    assert int((single["log_loss"] > 0).sum()) >= 2  # a real blend, not one model
    torch.testing.assert_close(ranks[0]["group"], single["log_loss"], rtol=0, atol=1e-10)
    message = bytes(ranks[0]["error"].tolist()).decode()
    assert "sharded fit" in message
    assert "callable" in message


def test_process_group_without_init_is_a_clear_error() -> None:
    P, y = mixed_problem(3, 50, 3)
    with pytest.raises(cx.ConvexMixError, match="not initialised"):
        fit_weights(P, y, process_group=object())
