"""The data-mixing example runs end to end (``--quick``) and its mixtures are valid."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "data_mixing.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("data_mixing", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_main_short_run() -> None:
    out = load().main(seeds=1, steps=30, verbose=False)
    rows = out["rows"]
    assert list(rows) == ["uniform", "proportional", "doremi", "eg online"]
    for row in rows.values():
        assert sum(row["weights"]) == pytest.approx(1.0, abs=1e-9)
        assert row["worst"] >= row["average"] > 0
        assert len(row["per_domain"]) == 4
    assert len(out["histories"]["doremi proxy"]) == 30
    assert out["histories"]["doremi average"][-1] == rows["doremi"]["weights"]
    assert rows["doremi"]["weights"] != rows["uniform"]["weights"]  # the weights moved


def test_example_quick_cli(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "w.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("1 seeds x 60 steps")
    assert [ln.split()[0] for ln in lines[2:6]] == ["uniform", "proportional", "doremi", "eg"]
    assert lines[6] == "worst excess MSE per seed:"
    assert png.stat().st_size > 5_000
