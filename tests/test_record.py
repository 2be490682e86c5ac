"""WeightRecorder: what it finds, what it stores, and the PNG it draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import convexmix as cx


def test_records_every_layer_once_during_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "fuse": cx.WeightedSum(3, sources=["a", "b", "c"]),
            "mix": cx.ScalarMix(2),  # its inner SimplexWeights is not recorded twice
            "per_channel": cx.WeightedSum(2, channels=4),
            "head": nn.Linear(3, 2, bias=False),
        }
    )
    with pytest.warns(cx.ConvexMixWarning):
        cx.simplex_(model["head"], "weight")
    rec = cx.WeightRecorder(model)
    assert sorted(rec.history) == []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):
        x = torch.randn(3, 8, 4)
        loss = model["fuse"](list(x)).sum() + model["per_channel"](list(x[:2])).square().mean()
        loss = loss + model["mix"](list(x[:2])).mean() + model["head"](torch.randn(4, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(step=10 * step)
    hist = rec.history
    assert sorted(hist) == ["fuse", "head.weight", "mix", "per_channel"]
    assert hist["fuse"].shape == (5, 3)
    assert hist["per_channel"].shape == (5, 2, 4)
    assert hist["head.weight"].shape == (5, 2, 3)
    assert rec.steps == [0, 10, 20, 30, 40]
    torch.testing.assert_close(hist["fuse"][-1], model["fuse"].weights.detach())
    assert not torch.equal(hist["fuse"][0], hist["fuse"][-1])
    assert rec.labels["fuse"] == ["a", "b", "c"]

    png = rec.plot(tmp_path / "sub" / "weights.png", title="trajectories")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_lazy_layers_are_recorded_once_initialised() -> None:
    lazy = cx.LazyWeightedSum()
    rec = cx.WeightRecorder({"lazy": lazy})
    rec.record()
    assert rec.history == {}
    lazy([torch.ones(2), torch.zeros(2)])
    rec.record()
    assert rec.history["lazy"].shape == (1, 2)


def test_recorder_errors(tmp_path: Path) -> None:
    with pytest.raises(cx.ConvexMixError, match="found no convexmix layer"):
        cx.WeightRecorder(nn.Linear(2, 2))
    with pytest.raises(cx.ConvexMixError, match=r"'lin' \(Linear\) has no .weights"):
        cx.WeightRecorder({"lin": nn.Linear(2, 2)})
    rec = cx.WeightRecorder({"w": cx.SimplexWeights(2)})
    with pytest.raises(cx.ConvexMixError, match="nothing recorded yet"):
        rec.plot(tmp_path / "x.png")
