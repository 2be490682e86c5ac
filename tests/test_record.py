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


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"fuse": cx.WeightedSum(3, sources=["a", "b", "c"]), "chan": cx.WeightedSum(2, channels=4)}
    )


def _step(model: nn.ModuleDict) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(3, 8, 4)
    loss = model["fuse"](list(x)).sum() + model["chan"](list(x[:2])).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_callback_gets_every_record_of_every_layer() -> None:
    model = _model()
    seen: list[tuple[int, str, torch.Tensor]] = []
    lazy = cx.LazyWeightedSum()
    rec = cx.WeightRecorder(
        {"fuse": model["fuse"], "chan": model["chan"], "lazy": lazy},
        callback=lambda step, name, w: seen.append((step, name, w.clone())),
    )
    for step in (3, 5, 9):
        _step(model)
        rec.record(step)
    # the lazy layer is not initialised: nothing for it, no error
    assert [(s, n) for s, n, _ in seen] == [(s, n) for s in (3, 5, 9) for n in ("fuse", "chan")]
    hist = rec.history
    for i, (_, name, w) in enumerate(seen):
        assert w.dtype == torch.float32
        assert w.device.type == "cpu"
        assert not w.requires_grad
        torch.testing.assert_close(w, hist[name][i // 2], rtol=0, atol=0)
    torch.testing.assert_close(seen[-2][2], model["fuse"].weights.detach())


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.histograms: list[tuple[str, torch.Tensor, int]] = []
        self.flushed = 0
        self.closed = 0

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def add_histogram(self, tag: str, values: torch.Tensor, global_step: int) -> None:
        self.histograms.append((tag, values.clone(), global_step))

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed += 1


def test_tensorboard_writer_gets_one_scalar_per_input() -> None:
    model = _model()
    writer = _FakeWriter()
    with cx.WeightRecorder(model, tensorboard=writer) as rec:
        for step in range(2):
            _step(model)
            rec.record(10 * step)
    hist = rec.history
    fuse = [(t, v, s) for t, v, s in writer.scalars if t.startswith("fuse/")]
    assert [(t, s) for t, _, s in fuse] == [(f"fuse/{n}", s) for s in (0, 10) for n in "abc"]
    torch.testing.assert_close(
        torch.tensor([v for _, v, _ in fuse]), hist["fuse"].flatten(), rtol=0, atol=1e-7
    )
    # per-channel (2, 4) weights: the mean over channels per input, and a histogram of them
    chan = [(t, v) for t, v, s in writer.scalars if t.startswith("chan/") and s == 10]
    assert [t for t, _ in chan] == ["chan/w0", "chan/w1"]
    torch.testing.assert_close(
        torch.tensor([v for _, v in chan]), hist["chan"][-1].mean(-1), rtol=0, atol=1e-7
    )
    assert [(t, s) for t, _, s in writer.histograms] == [
        (f"chan/w{k}/values", s) for s in (0, 10) for k in (0, 1)
    ]
    torch.testing.assert_close(writer.histograms[-1][1], hist["chan"][-1][1])
    # a writer the user passed in is flushed on exit, not closed
    assert (writer.flushed, writer.closed) == (1, 0)


def test_tensorboard_event_files_hold_the_weights(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    rec = cx.WeightRecorder(model, tensorboard=tmp_path / "runs")
    for step in range(3):
        _step(model)
        rec.record(step)
    rec.close()
    rec.close()  # a second close is a no-op
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert {"fuse/a", "fuse/b", "fuse/c", "chan/w0", "chan/w1"} <= set(events.Tags()["scalars"])
    b = events.Scalars("fuse/b")
    assert [e.step for e in b] == [0, 1, 2]
    torch.testing.assert_close(
        torch.tensor([e.value for e in b]), rec.history["fuse"][:, 1], rtol=0, atol=1e-7
    )
    assert "chan/w1/values" in events.Tags()["histograms"]


def test_recorder_sink_errors() -> None:
    layers = {"w": cx.SimplexWeights(2)}
    with pytest.raises(cx.ConvexMixError, match=r"callback must be callable.*got int"):
        cx.WeightRecorder(layers, callback=3)  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match="SummaryWriter or a log directory; got dict"):
        cx.WeightRecorder(layers, tensorboard={})  # type: ignore[arg-type]
