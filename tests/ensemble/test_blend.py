"""`convexmix blend` and load_weights: the round trip from `ensemble --out`, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import convexmix as cx
from convexmix.cli import main
from convexmix.ensemble import fit_weights, load_weights

from .problems import mixed_problem

pytest.importorskip("rich")


def fitted(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    P, y = mixed_problem(4, 300, 3, seed=9)
    np.save(tmp_path / "val.npy", P.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "w.json"
    code = main(
        [
            "ensemble",
            "--predictions",
            str(tmp_path / "val.npy"),
            "--targets",
            str(tmp_path / "y.npy"),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    assert code == 0
    capsys.readouterr()
    return out, json.loads(out.read_text())


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".parquet"])
def test_blend_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    weights, data = fitted(tmp_path, capsys)
    test, _ = mixed_problem(4, 120, 3, seed=10)
    files = []
    for k in range(4):  # one file per model this time
        files.append(str(tmp_path / f"m{k}.npy"))
        np.save(files[-1], test[k].numpy())
    out = tmp_path / f"blend{suffix}"
    code = main(["blend", "--weights", str(weights), "--predictions", *files, "--out", str(out)])
    assert code == 0
    w = torch.tensor(data["weights"], dtype=torch.float64)
    expected = torch.tensordot(w, test, dims=1).numpy()
    if suffix == ".npy":
        got = np.load(out)
    elif suffix == ".csv":
        got = np.loadtxt(out, delimiter=",", skiprows=1)
        assert out.read_text().splitlines()[0] == "class_0,class_1,class_2"
    else:
        import pyarrow.parquet as pq

        got = np.column_stack([c.to_numpy() for c in pq.read_table(out).columns])
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=1e-15)
    # the Python side reads the same file
    blend = load_weights(weights)
    torch.testing.assert_close(blend.predict(test), torch.from_numpy(expected))
    assert blend.models == data["models"]
    assert blend.weights.sum().item() == pytest.approx(1.0)


def test_wrong_model_count_is_one_line_and_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, _ = fitted(tmp_path, capsys)
    test, _ = mixed_problem(3, 50, 3, seed=11)
    np.save(tmp_path / "three.npy", test.numpy())
    out = tmp_path / "blend.npy"
    code = main(
        ["blend", "--weights", str(weights), "--predictions", str(tmp_path / "three.npy"),
         "--out", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1
    assert "4 models" in err
    assert "3" in err
    assert not out.exists()
    assert not any(p.name.startswith(".blend") for p in tmp_path.iterdir())


def test_wrong_class_count_and_bad_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights, _ = fitted(tmp_path, capsys)
    test, _ = mixed_problem(4, 50, 5, seed=12)
    np.save(tmp_path / "five.npy", test.numpy())
    out = tmp_path / "blend.npy"
    args = ["blend", "--weights", str(weights), "--predictions", str(tmp_path / "five.npy")]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "(K, N, 3)" in err
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"weights": [0.5, 0.6]}')
    assert main(["blend", "--weights", str(bad), *args[3:], "--out", str(out)]) == 2
    assert "sum to 1" in capsys.readouterr().err
    with pytest.raises(cx.ConvexMixError, match="no such file"):
        load_weights(tmp_path / "missing.json")
    bad.write_text("not json")
    with pytest.raises(cx.ConvexMixError, match="not a JSON file"):
        load_weights(bad)


def test_ensemble_bootstrap_prints_intervals_and_writes_draws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    P, y = mixed_problem(4, 300, 3, seed=9)
    np.save(tmp_path / "val.npy", P.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    out, plot = tmp_path / "w.json", tmp_path / "w.png"
    code = main(
        ["ensemble", "--predictions", str(tmp_path / "val.npy"), "--targets",
         str(tmp_path / "y.npy"), "--bootstrap", "30", "--out", str(out), "--plot", str(plot),
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "90% interval" in text
    assert "30 Bayesian-bootstrap draws" in text
    data = json.loads(out.read_text())
    boot = cx.ensemble.bootstrap(P, y, n=30, seed=0)
    np.testing.assert_allclose(data["bootstrap"]["draws"], boot.weights.numpy(), atol=1e-12)
    lo, hi = boot.interval(0.9)
    np.testing.assert_allclose(data["bootstrap"]["lo"], lo.numpy(), atol=1e-12)
    np.testing.assert_allclose(data["bootstrap"]["hi"], hi.numpy(), atol=1e-12)
    np.testing.assert_allclose(data["weights"], fit_weights(P, y).weights.numpy(), atol=1e-12)
    for k in range(4):
        assert f"[{lo[k].item():.4f}, {hi[k].item():.4f}]" in text
    assert plot.stat().st_size > 0
