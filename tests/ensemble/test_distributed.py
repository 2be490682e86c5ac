"""fit_weights(process_group=...) on 2 gloo processes equals one process on all rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import convexmix as cx
from convexmix.ensemble import fit_weights

from ..distributed import run_ranks
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


def sharded_fits(rank: int, world: int) -> dict[str, torch.Tensor]:
    out = fits(shard(rank, world))
    # an explicit group gives the same; a callable loss is a clear error
    out["group"] = fit_weights(*_half(rank, world), process_group=dist.group.WORLD).weights
    try:
        fit_weights(*_half(rank, world), loss=lambda b, t: (b - t).square())
    except cx.ConvexMixError as err:
        out["error"] = torch.tensor(list(str(err).encode()))
    return out


def _half(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    P, y = mixed_problem(6, N, 4, seed=3)
    rows = shard(rank, world)
    return P[:, rows], y[rows]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    ranks = run_ranks(sharded_fits, tmp_path)
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
