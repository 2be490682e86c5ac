"""The seed examples converge to their known weights; the CLI runs and fails cleanly."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import convexmix as cx
from convexmix.cli import main

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "tol"),
    [
        ("seed_learnable_weights", 0.02),
        ("seed_weighted_sum_bias", 1e-3),
        ("seed_varying_inputs", 1e-3),
    ],
)
def test_seed_examples_converge(name: str, tol: float) -> None:
    out = load_example(name).main(verbose=False)
    torch.testing.assert_close(out["learned"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(out["learned"], out["true"], atol=tol, rtol=0)
    if "bias" in out:
        assert abs(out["bias"] - out["true_bias"]) < 1e-3


def test_sparsemax_recovers_exact_zero() -> None:
    out = load_example("seed_learnable_weights").main(map="sparsemax", verbose=False)
    assert out["learned"][3] == 0.0
    torch.testing.assert_close(out["learned"], out["true"], atol=5e-3, rtol=0)


def test_the_wrong_pattern_really_fails() -> None:
    """The 'parameters inside forward' pattern of scenario (c) leaves the optimizer nothing."""

    class Dynamic(torch.nn.Module):
        def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
            self.w = torch.nn.Parameter(torch.zeros(len(inputs)))
            return sum(p * t for p, t in zip(torch.softmax(self.w, 0), inputs, strict=False))

    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam(Dynamic().parameters())


def test_seeds_prints_learned_and_true_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seeds", "--steps", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "map='softmax'" in out
    assert out.count("learned") == 3
    assert out.count("true") >= 3
    sums = [float(s) for s in re.findall(r"sum (\d\.\d+)", out)]
    assert sums == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_cli_errors_are_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "convexmix", "seeds", "--steps", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "convexmix seeds: error: argument --steps: expected an int >= 1; got 0 (see --help)"
    )
    assert "Traceback" not in proc.stderr


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", cx.__version__)


def test_digits_missing_views_smoke(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    example = load_example("digits_missing_views")
    res = example.main(epochs=3, seeds=1, out=str(tmp_path), noise=0.5, verbose=False)
    for fusion in example.FUSIONS:
        acc = res[fusion]
        assert set(acc) == {"all views", "1 missing", "2 missing", "1 view left"}
        assert acc["all views"][0] > 0.6  # ten classes: chance is 0.1
        assert acc["all views"][0] >= acc["1 view left"][0]
    torch.testing.assert_close(torch.tensor(res["_weights"]["mean"]).sum(), torch.tensor(1.0))
    assert (tmp_path / "digits_fusion_weights_noise0.5.png").stat().st_size > 5_000


def test_digits_soup_smoke() -> None:
    pytest.importorskip("sklearn")
    table = load_example("digits_soup").main(models=3, seeds=1, epochs=2, verbose=False)
    assert set(table) == {
        "best single",
        "uniform soup",
        "greedy soup",
        "learned soup (global)",
        "learned soup (per tensor)",
    }
    for acc, loss in table.values():
        assert acc > 0.5  # ten classes: chance is 0.1
        assert 0 < loss < 2.3


def test_digits_adamerging_smoke(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    res = load_example("digits_adamerging").main(
        seeds=1, epochs=2, steps=15, out=str(tmp_path), verbose=False, lr=0.01
    )
    table, run = res["table"], res["runs"][0]
    assert "uniform soup" in table
    assert "AdaMerging layer-wise (learned)" in table
    for acc, entropy in table.values():
        assert 0.0 <= acc <= 1.0
        assert entropy >= 0.0
    history = run["history"]
    assert history[-1] < history[0]  # the label-free objective went down
    # the learned coefficients are s_l w_{l,k}: (layers, tasks), positive
    assert run["coefficients"].shape == (3, 3)
    assert (run["coefficients"] > 0).all()
    assert (tmp_path / "digits_adamerging.png").stat().st_size > 5_000
