"""cx.merge.merge_checkpoints: the formula in float64, layouts, dtypes, shards, errors
before writing, atomic output, the command line."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import convexmix as cx
from convexmix.merge import _files

from .checkpoints import make_state, read_model, write_model

EPS32 = torch.finfo(torch.float32).eps


def models(tmp_path: Path, k: int = 3, layouts: tuple[str, ...] = ("sharded",)) -> list[Path]:
    return [
        write_model(tmp_path / f"m{i}", make_state(i), layouts[i % len(layouts)]) for i in range(k)
    ]


def layer_t(name: str, layers: int = 3) -> float:
    """t of the toy state's tensors: i / (layers - 1) in the stack, 0 elsewhere."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2]) / (layers - 1)
    return 0.0


def check_close(out: Tensor, ref: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
    """``out`` is ``ref`` (float64) rounded once to ``dtype``, after float32 arithmetic:
    within a few float32 ulps of ``scale = sum |c_i x_i|``, plus half an ulp of ``dtype``."""
    assert out.dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0
    bound = 4 * EPS32 * scale + half_ulp * ref.abs() + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_linear_matches_the_formula(tmp_path: Path, normalize: bool, dtype: str | None) -> None:
    paths = models(tmp_path, layouts=("sharded", "single", "file"))
    grad = [0.5, 2.0, 1.0]  # models[1]'s weight over the layers
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(paths[0]), "parameters": {"weight": 1.5}},
            {"model": str(paths[1]), "parameters": {"weight": grad}},
            {
                "model": str(paths[2]),
                "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 0.25}]},
            },
        ],
        "parameters": {"normalize": normalize},
    }
    if dtype is not None:
        config["dtype"] = dtype
    out = cx.merge.merge_checkpoints(config, tmp_path / "out", shard_size=900)
    merged = read_model(out)
    inputs = [read_model(p) for p in paths]
    assert merged.keys() == inputs[0].keys()
    for name, x0 in inputs[0].items():
        if not x0.is_floating_point():
            assert torch.equal(merged[name], x0)  # integer tensors: the first model's
            continue
        t = layer_t(name)
        w = np.array([1.5, np.interp(t * 2, [0, 1, 2], grad), 3.0 if "mlp" in name else 0.25])
        c = w / w.sum() if normalize else w
        xs = [inp[name].double() for inp in inputs]
        ref = sum(ci * x for ci, x in zip(c, xs, strict=True))
        scale = sum(abs(ci) * x.abs() for ci, x in zip(c, xs, strict=True))
        want = x0.dtype if dtype is None else getattr(torch, dtype)
        check_close(merged[name], ref, scale, want)
    # the first model's other files come along; config.json says the dtype
    assert (out / "tokenizer.json").read_text() == '{"vocab": {}}'
    saved = json.loads((out / "config.json").read_text())
    assert saved["torch_dtype"] == (dtype or "x")


@pytest.mark.parametrize("base_listed", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_the_formula(
    tmp_path: Path, base_listed: bool, normalize: bool
) -> None:
    paths = models(tmp_path, k=4, layouts=("sharded", "single"))
    base, others = paths[0], paths[1:]
    entries = [
        {"model": str(p), "parameters": {"weight": w}}
        for p, w in zip(others, [0.7, -0.2, [0.1, 0.9]], strict=True)
    ]
    if base_listed:
        entries.insert(0, {"model": str(base)})  # mergekit skips the base's own entry
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": entries,
        "parameters": {"lambda": [1.3, 0.6], "normalize": normalize},
        "out_dtype": "bfloat16",
    }
    out = cx.merge.merge_checkpoints(config, tmp_path / "out")
    merged = read_model(out)
    b = read_model(base)
    xs = [read_model(p) for p in others]
    for name, x in b.items():
        if not x.is_floating_point():
            continue
        t = layer_t(name)
        w = np.array([0.7, -0.2, np.interp(t, [0, 1], [0.1, 0.9])])
        lam = float(np.interp(t, [0, 1], [1.3, 0.6]))
        if normalize:
            lam /= w.sum()
        tau = sum(wi * (m[name].double() - x.double()) for wi, m in zip(w, xs, strict=True))
        ref = x.double() + lam * tau
        scale = (1 + abs(lam) * abs(w).sum()) * max(
            [x.double().abs()] + [m[name].double().abs() for m in xs], key=lambda a: float(a.max())
        ).max()
        check_close(merged[name], ref, scale.expand_as(ref), torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_output_layout(tmp_path: Path) -> None:
    paths = models(tmp_path, k=2)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
    }
    out = cx.merge.merge_checkpoints(config, tmp_path / "out", shard_size=500)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    sizes = {}
    for f in files:
        part = read_model(out / f)
        sizes[f] = sum(t.numel() * t.element_size() for t in part.values())
        assert sizes[f] <= 500 or len(part) == 1  # a larger tensor sits alone
        assert all(index["weight_map"][name] == f for name in part)
    assert index["metadata"]["total_size"] == sum(sizes.values())
    one = cx.merge.merge_checkpoints(config, tmp_path / "one")
    assert sorted(os.listdir(one)) == ["config.json", "model.safetensors", "tokenizer.json"]
    a, b = read_model(out), read_model(one)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_tied_tensors_and_zero_weights(tmp_path: Path) -> None:
    """A state whose two names share storage (a tied model) is written under both names;
    merging such checkpoints keeps the two equal. A model with weight 0 is not read."""
    st = pytest.importorskip("safetensors.torch")
    paths = []
    for k in range(3):
        emb = torch.randn(11, 4)
        state = {"emb.weight": emb, "head.weight": emb, "bias": torch.randn(3)}
        folder = tmp_path / f"tied{k}"
        folder.mkdir()
        _files.save_state_dict(state, folder, 10**9)  # safetensors' save_file refuses
        paths.append(folder)
        loaded = st.load_file(str(folder / "model.safetensors"))
        assert torch.equal(loaded["head.weight"], emb)
    config = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": [
            {"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(paths, [0.5, 0.5, 0.0], strict=True)
        ],
    }
    merged = read_model(cx.merge.merge_checkpoints(config, tmp_path / "out"))
    assert torch.equal(merged["emb.weight"], merged["head.weight"])
    ins = [read_model(p) for p in paths]
    torch.testing.assert_close(merged["bias"], 0.5 * ins[0]["bias"] + 0.5 * ins[1]["bias"])


def test_mismatches_are_errors_before_anything_is_written(tmp_path: Path) -> None:
    good = write_model(tmp_path / "good", make_state(0), "sharded")
    other = make_state(1)
    cases = {
        "shape": (
            {**other, "lm_head.weight": torch.randn(36, 8)},
            r"tensor 'lm_head\.weight' has shape \(36, 8\)",
        ),
        "dtype": (
            {**other, "model.norm.weight": torch.randn(8)},
            r"model-\d+-of-\d+\.safetensors: tensor 'model\.norm\.weight' has dtype torch\.float32",
        ),
        "missing": (
            {k: v for k, v in other.items() if k != "scalar"},
            r"models\[1\].*lacks tensor 'scalar'",
        ),
        "extra": (
            {**other, "extra.weight": torch.zeros(2)},
            r"has tensor 'extra\.weight', which models\[0\]",
        ),
    }
    for label, (state, match) in cases.items():
        bad = write_model(tmp_path / label, state, "sharded")
        config = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (good, bad)],
        }
        with pytest.raises(cx.ShapeError, match=match):
            cx.merge.merge_checkpoints(config, tmp_path / "out")
        assert (
            sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []
        )
    # dtype: set, floating dtypes may differ (converted, float32 arithmetic)
    bad = write_model(tmp_path / "dtype2", cases["dtype"][0], "single")
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (good, bad)],
    }
    merged = read_model(cx.merge.merge_checkpoints(config, tmp_path / "out"))
    ref = (
        make_state(0)["model.norm.weight"].double()
        + cases["dtype"][0]["model.norm.weight"].double()
    ) / 2
    torch.testing.assert_close(merged["model.norm.weight"].double(), ref, rtol=1e-6, atol=1e-6)


def test_missing_and_broken_checkpoints(tmp_path: Path) -> None:
    good = write_model(tmp_path / "good", make_state(0), "sharded")

    def config(path: Path | str) -> dict[str, object]:
        return {
            "merge_method": "linear",
            "models": [
                {"model": str(good), "parameters": {"weight": 1.0}},
                {"model": str(path), "parameters": {"weight": 1.0}},
            ],
        }

    with pytest.raises(cx.ConvexMixError, match=r"models\[1\]: '.*nope' is neither"):
        cx.merge.merge_checkpoints(config(tmp_path / "nope"), tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        cx.ConvexMixError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"
    ):
        cx.merge.merge_checkpoints(config(empty), tmp_path / "out")
    broken = write_model(tmp_path / "broken", make_state(1), "sharded")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["scalar"] = "model-00001-of-00099.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        cx.ConvexMixError, match=r"names model-00001-of-00099\.safetensors, which does not exist"
    ):
        cx.merge.merge_checkpoints(config(broken), tmp_path / "out")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(
        cx.ConvexMixError, match=r"garbage\.safetensors is not a readable safetensors"
    ):
        cx.merge.merge_checkpoints(config(garbage), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interruption in the middle of writing leaves nothing under out, and no temporary
    folder beside it; an existing non-empty out is refused unless force."""
    paths = models(tmp_path, k=2)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
    }
    original = _files.raw_bytes
    calls = [0]

    def interrupted(t: Tensor) -> memoryview:
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return original(t)

    monkeypatch.setattr(_files, "raw_bytes", interrupted)
    out = tmp_path / "sub" / "out"
    with pytest.raises(KeyboardInterrupt):
        cx.merge.merge_checkpoints(config, out, shard_size=300)
    assert calls[0] == 6
    assert not out.exists()
    assert list((tmp_path / "sub").iterdir()) == []
    monkeypatch.undo()
    # an empty folder is fine; a non-empty one needs force and is then replaced whole
    out.mkdir()
    cx.merge.merge_checkpoints(config, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(cx.ConvexMixError, match=r"exists and is not empty.*force"):
        cx.merge.merge_checkpoints(config, out)
    assert (out / "stale.txt").exists()
    cx.merge.merge_checkpoints(config, out, force=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(cx.ConvexMixError, match="exists and is not a folder"):
        cx.merge.merge_checkpoints(config, tmp_path / "file", force=True)


def test_a_failed_write_is_an_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output is written by a second thread: a write that fails there (a full disk)
    is raised by the merge as a ConvexMixError naming the output, every tensor queued
    after it is dropped, and nothing is left under out or beside it."""
    import errno
    import io

    paths = models(tmp_path, k=2)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
        "dtype": "float32",
    }
    writes = [0]

    class Full(io.FileIO):
        def write(self, data: object) -> int:
            writes[0] += 1
            if writes[0] == 5:  # the header's two writes, then a few tensors
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)  # type: ignore[arg-type]

    monkeypatch.setattr(_files, "open", lambda path, mode: Full(path, mode), raising=False)
    out = tmp_path / "sub" / "out"
    with pytest.raises(cx.ConvexMixError, match=r"cannot write .*out: No space left on device"):
        cx.merge.merge_checkpoints(config, out, shard_size=300)
    assert writes[0] == 5  # the first failure stops the writing
    assert not out.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_sink_writes_in_order_and_releases_every_buffer(tmp_path: Path) -> None:
    """Sink: bytes land in the order queued, each done callback runs once, and an error
    of the writing thread is raised in the caller (by write or close), with the
    callbacks of the dropped writes still run (no staging buffer is lost)."""
    import io

    done: list[int] = []
    with open(tmp_path / "a.bin", "wb") as f:
        sink = _files.Sink(f, depth=2)
        for i in range(20):
            chunk = torch.full((1000 + i,), i, dtype=torch.uint8)
            sink.write(chunk, done=functools.partial(done.append, i))
        sink.close()
    data = (tmp_path / "a.bin").read_bytes()
    assert data == b"".join(bytes([i]) * (1000 + i) for i in range(20))
    assert done == list(range(20))

    class Broken(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError("broken pipe")

    done.clear()
    sink = _files.Sink(Broken(), depth=2)

    def write_all() -> None:
        for i in range(50):
            sink.write(torch.zeros(10, dtype=torch.uint8), done=functools.partial(done.append, i))
        sink.close()

    with pytest.raises(OSError, match="broken pipe"):
        write_all()
    sink.close(check=False)
    # each callback once, none lost; their order is not kept here: the writing thread
    # runs the dropped writes' callbacks while the caller runs the refused one's
    assert sorted(done) == list(range(len(done)))
    assert len(done) >= 1
    # every queued write's callback ran, and the one refused when the error came
    assert sink.nbytes in (10 * len(done), 10 * (len(done) - 1))


def test_command_line(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    paths = models(tmp_path, k=2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(
            f"  - model: {p}\n    parameters:\n      weight: {w}\n"
            for p, w in zip(paths, [1, 3], strict=True)
        )
        + "dtype: bfloat16\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "convexmix", "merge", str(cfg), "--out", str(tmp_path / "out")]
    proc = subprocess.run([*run, "--shard-size", "1KB"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "merged into" in proc.stdout
    merged = read_model(tmp_path / "out")
    a, b = read_model(paths[0]), read_model(paths[1])
    ref = (a["lm_head.weight"].double() + 3 * b["lm_head.weight"].double()) / 4
    assert merged["lm_head.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        merged["lm_head.weight"].double(), ref.bfloat16().double(), rtol=2**-8, atol=1e-6
    )
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = subprocess.run(run, capture_output=True, text=True, env=env)
    assert again.returncode == 2
    assert again.stderr.startswith("convexmix: error:")
    assert "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    cfg.write_text(cfg.read_text() + "tokenizer_source: union\n")
    bad = subprocess.run([*run, "--force"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "unsupported key 'tokenizer_source'" in bad.stderr
    size = subprocess.run([*run, "--shard-size", "lots"], capture_output=True, text=True, env=env)
    assert size.returncode == 2
    assert "--shard-size must be a size" in size.stderr


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    paths = models(tmp_path, k=2)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
    }
    cx.merge.merge_checkpoints(config, tmp_path / "out", progress=True)
    assert capsys.readouterr().out == ""
