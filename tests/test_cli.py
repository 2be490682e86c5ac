"""`convexmix ensemble` end to end on temporary files, and one-line errors on bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convexmix.cli import main
from convexmix.ensemble import ensemble_selection, fit_weights

K, N, C = 4, 300, 3


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N)
    onehot = np.eye(C)[y]
    logits = np.stack(
        [
            onehot * a + s * rng.standard_normal((N, C))
            for a, s in zip([1.0, 2.0, 0.3, 1.5], [1.0, 1.5, 1.0, 2.0], strict=True)
        ]
    )
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True), y


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_single_npy_file_json_and_plot(
    problem: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    P, y = problem
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "y.npy", y)
    out_json, out_png = tmp_path / "res" / "w.json", tmp_path / "w.png"
    code, out, err = run_cli(
        [
            "ensemble",
            "--predictions",
            str(tmp_path / "p.npy"),
            "--targets",
            str(tmp_path / "y.npy"),
            "--out",
            str(out_json),
            "--plot",
            str(out_png),
            "--size",
            "20",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out_json.read_text())
    ref = fit_weights(P, y)
    np.testing.assert_allclose(data["weights"], np.asarray(ref.weights), atol=1e-12)
    assert sum(data["weights"]) == pytest.approx(1.0)
    np.testing.assert_allclose(
        data["caruana_weights"], np.asarray(ensemble_selection(P, y, size=20).weights)
    )
    assert data["losses"]["convexmix"] == pytest.approx(ref.loss)
    assert set(data["losses"]) == {"convexmix", "caruana", "equal_weights", "best_single"}
    assert data["losses"]["convexmix"] <= min(data["losses"].values())
    assert data["models"] == [f"model {k}" for k in range(K)]
    assert out_png.stat().st_size > 5_000
    for word in ("convexmix", "Caruana", "equal weights", "best single model", "converged"):
        assert word in out
    assert f"{float(ref.weights[1]):.4f}" in out


def test_one_file_per_model_csv_npz_parquet(
    problem: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    P, y = problem
    ref = np.asarray(fit_weights(P, y).weights)
    csvs = []
    for k in range(K):
        path = tmp_path / f"m{k}.csv"
        np.savetxt(path, P[k], delimiter=",", header="a,b,c", comments="", fmt="%.17g")
        csvs.append(str(path))
    np.savetxt(tmp_path / "y.csv", y, fmt="%d", header="label", comments="")
    np.savez(tmp_path / "all.npz", **{f"net{k}": P[k] for k in range(K)})
    runs = [csvs, [str(tmp_path / "all.npz")]]
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pfiles = []
    for k in range(K):
        path = tmp_path / f"m{k}.parquet"
        pq.write_table(pa.table({f"c{c}": P[k, :, c] for c in range(C)}), path)
        pfiles.append(str(path))
    runs.append(pfiles)
    for preds in runs:
        out = tmp_path / "w.json"
        code, _, err = run_cli(
            [
                "ensemble",
                "--predictions",
                *preds,
                "--targets",
                str(tmp_path / "y.csv"),
                "--out",
                str(out),
                "--quiet",
            ],
            capsys,
        )
        assert code == 0, err
        data = json.loads(out.read_text())
        np.testing.assert_allclose(data["weights"], ref, atol=1e-9)
    assert data["models"] == [f"m{k}" for k in range(K)]


def test_mse_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(0)
    P = torch.randn(5, 200, generator=g, dtype=torch.float64)
    true = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    np.save(tmp_path / "p.npy", P.numpy())
    np.save(tmp_path / "y.npy", (true @ P).numpy())
    code, _, err = run_cli(
        [
            "ensemble",
            "--predictions",
            str(tmp_path / "p.npy"),
            "--targets",
            str(tmp_path / "y.npy"),
            "--loss",
            "mse",
            "--out",
            str(tmp_path / "w.json"),
        ],
        capsys,
    )
    assert code == 0, err
    w = json.loads((tmp_path / "w.json").read_text())["weights"]
    np.testing.assert_allclose(w, true.numpy(), atol=1e-12)
    assert w[1] == w[3] == w[4] == 0.0


def bad_cases(tmp: Path, P: np.ndarray, y: np.ndarray) -> dict[str, tuple[list[str], str]]:
    (tmp / "text.npy").write_text("not an array")
    (tmp / "words.csv").write_text("a,b\nx,y\n")
    np.save(tmp / "p.npy", P)
    np.save(tmp / "y.npy", y)
    np.save(tmp / "y_short.npy", y[:-5])
    np.save(tmp / "p4d.npy", P[None])
    bad = P.copy()
    bad[2, 7] /= 2
    np.save(tmp / "sum.npy", bad)
    np.save(tmp / "m0.npy", P[0])
    np.save(tmp / "m1_short.npy", P[1, :-1])
    (tmp / "p.txt").write_text("1,2")
    p, t = str(tmp / "p.npy"), str(tmp / "y.npy")
    return {
        "not an array": ([str(tmp / "text.npy")], "not a .npy array file"),
        "not numbers": ([str(tmp / "words.csv")], "row 1 is not all numbers"),
        "wrong shape": ([str(tmp / "p4d.npy")], r"\(K, N\) or \(K, N, C\)"),
        "mismatched N": ([p, "--targets-override", str(tmp / "y_short.npy")], "N=300"),
        "not summing to 1": ([str(tmp / "sum.npy")], "rows sum to 1"),
        "missing file": ([str(tmp / "missing.npy")], "no such file"),
        "unknown type": ([str(tmp / "p.txt")], "unknown file type"),
        "models differ": ([str(tmp / "m0.npy"), str(tmp / "m1_short.npy")], "same shape"),
        "one model only": ([str(tmp / "m0.npy")], "looks like one model"),
        "_targets": ([t], ""),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not an array",
        "not numbers",
        "wrong shape",
        "mismatched N",
        "not summing to 1",
        "missing file",
        "unknown type",
        "models differ",
        "one model only",
    ],
)
def test_bad_files_give_one_line_and_exit_2(
    case: str,
    problem: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    P, y = problem
    cases = bad_cases(tmp_path, P, y)
    preds, expected = cases[case]
    targets = cases["_targets"][0][0]
    if "--targets-override" in preds:
        targets = preds[-1]
        preds = preds[:1]
    code, _, err = run_cli(["ensemble", "--predictions", *preds, "--targets", targets], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convexmix: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(expected, lines[0]), lines[0]


def test_console_script_errors_without_traceback(tmp_path: Path) -> None:
    np.save(tmp_path / "y.npy", np.zeros(3))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convexmix",
            "ensemble",
            "--predictions",
            str(tmp_path / "nope.npy"),
            "--targets",
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"convexmix: error: {tmp_path / 'nope.npy'}: no such file."
    usage = subprocess.run(
        [sys.executable, "-m", "convexmix", "ensemble", "--predictions", "a.npy"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 2
    assert len(usage.stderr.strip().splitlines()) == 1
    assert "--targets" in usage.stderr


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    code, out, err = run_cli(["demo", "--out-dir", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    for name in ("digits", "breast_cancer"):
        assert name in out
        assert (tmp_path / f"{name}_weights.png").stat().st_size > 5_000
    for method in ("convexmix", "SLSQP", "Caruana", "equal weights", "best single"):
        assert method in out


def test_progress_display_shows_the_read_the_fit_and_caruana(
    problem: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal, one display with a bar for the pass over the predictions, then the
    fit's iterations and Caruana's picks (and the bootstrap's own read and draws)."""
    import convexmix.cli as cli

    console = cli._console

    def terminal(stderr: bool = False) -> object:
        c = console(stderr)
        c.force_terminal = True  # type: ignore[attr-defined]
        return c

    monkeypatch.setattr(cli, "_console", terminal)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    P, y = problem
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "y.npy", y)
    args = ["ensemble", "--predictions", str(tmp_path / "p.npy"), "--targets"]
    code, out, err = run_cli([*args, str(tmp_path / "y.npy"), "--bootstrap", "3"], capsys)
    assert code == 0
    assert "Blend weights" in out
    for bar in ("reading", "fitting", "Caruana", "bootstrap"):
        assert bar in err, bar
    assert err.index("reading") < err.index("fitting") < err.index("Caruana")
