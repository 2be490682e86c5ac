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
    torch.testing.assert_close(w.detach(), torch.tensor([0.7, 0.0, 0.3]), atol=0.02, rtol=0)
    layer = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(layer.weight[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    p = namespace["p"]
    assert p[0, 1] == 0
    assert (p[1] == 0).all()
    torch.testing.assert_close(p[0].sum(), torch.tensor(1.0))  # type: ignore[index]
    assert namespace["fused"].shape == (8, 16)  # type: ignore[attr-defined]
    assert namespace["layer_mix"].shape == (2, 5, 32)  # type: ignore[attr-defined]
