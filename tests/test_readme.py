"""Every Python block of the README runs, and its claims hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_quick_start_commands() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") : text.index("## Install")]
    assert re.findall(r"^make \w+", quick, flags=re.M) == ["make demo", "make test"]


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the README saves layer.pt
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    blocks = python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    w = namespace["weights"]()  # type: ignore[operator]
    # the printed comment: the exact weights, the 0 exactly
    torch.testing.assert_close(w.detach(), torch.tensor([0.7, 0.0, 0.3]), atol=5e-5, rtol=0)
    assert w[1] == 0
    layer = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(layer.weight[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    p = namespace["p"]
    assert p[0, 1] == 0
    assert (p[1] == 0).all()
    torch.testing.assert_close(p[0].sum(), torch.tensor(1.0))  # type: ignore[index]
    assert namespace["fused"].shape == (8, 16)  # type: ignore[attr-defined]
    assert namespace["layer_mix"].shape == (2, 5, 32)  # type: ignore[attr-defined]


def test_readme_ensemble_block_and_cli_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    import json
    import shlex

    import numpy as np

    from convexmix.cli import main

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    fit = namespace["fit"]
    assert fit.weights.sum().item() == pytest.approx(1.0)  # type: ignore[attr-defined]
    assert fit.gap <= 1e-10  # type: ignore[attr-defined]
    oof = namespace["oof"]
    for name, p in zip(["lr", "nb", "tree"], oof, strict=True):  # type: ignore[call-overload]
        np.save(tmp_path / f"{name}.npy", p)
    np.save(tmp_path / "y.npy", namespace["y"])
    line = next(
        ln for ln in README.read_text().splitlines() if ln.startswith("convexmix ensemble ")
    )
    assert main([*shlex.split(line)[1:], "--quiet"]) == 0
    out = json.loads((tmp_path / "w.json").read_text())
    np.testing.assert_allclose(out["weights"], np.asarray(fit.weights), atol=1e-12)  # type: ignore[attr-defined]
    assert (tmp_path / "w.png").stat().st_size > 5_000
    assert "Caruana" in capsys.readouterr().out
