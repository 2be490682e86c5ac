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


#: What rank 1 does differently in each failure case (rank 0 is always well-formed).
FAILURES = ["empty", "nan", "labels", "regularization", "models", "sample_weight", "tol"]


def failing_fits(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each case: rank 1 breaks one thing; every rank must raise the same error, at once."""
    import time

    out = {}
    for case in FAILURES:
        P, y = _half(rank, world)
        kw: dict[str, object] = {}
        if rank == 1:
            if case == "empty":
                P, y = P[:, :0], y[:0]
            elif case == "nan":
                P = P.clone()
                P[2, 5, 1] = float("nan")
            elif case == "labels":
                y = y + 4
            elif case == "regularization":
                kw["regularization"] = 0.1
            elif case == "models":
                P = P[:5]
            elif case == "sample_weight":
                kw["sample_weight"] = torch.ones(P.shape[1], dtype=torch.float64)
            elif case == "tol":
                kw["tol"] = -1.0
        start = time.perf_counter()
        try:
            fit_weights(P, y, **kw)  # type: ignore[arg-type]
            message = "no error"
        except cx.ConvexMixError as err:
            message = f"{type(err).__name__}: {err}"
        out[case] = torch.tensor(list(message.encode()))
        out[case + "_seconds"] = torch.tensor(time.perf_counter() - start)
    # after every failure the group still works: a good fit on both ranks
    out["after"] = fit_weights(*_half(rank, world)).weights
    return out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_failure_on_one_rank_raises_the_same_error_on_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(failing_fits, tmp_path)
    expected = {
        "empty": "must not be empty",
        "nan": "finite",
        "labels": r"class labels in [0, 3]",
        "regularization": "different settings",
        "models": "different settings",
        "sample_weight": "different settings",
        "tol": "tol must be a number > 0",
    }
    for case, fragment in expected.items():
        messages = [bytes(r[case].tolist()).decode() for r in ranks]
        assert messages[0] == messages[1], case  # the same error on every rank
        assert messages[0].startswith("ShardedFitError: sharded fit"), messages[0]
        assert isinstance(messages[0], str)
        assert fragment in messages[0], (case, messages[0])
        if fragment != "different settings":
            assert "rank 1 of 2" in messages[0]
        for r in ranks:
            assert float(r[case + "_seconds"]) < 60  # promptly, not at the gloo timeout
    single = fit_weights(*_half(0, 1))
    torch.testing.assert_close(ranks[0]["after"], single.weights, rtol=0, atol=1e-10)
