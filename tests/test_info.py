"""``convexmix info [--json]`` (and ``python -m convexmix info``): what runs here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import convexmix as cx
from convexmix._kernels import native
from convexmix.cli import main

KEYS = {
    "version",
    "torch",
    "native_cpu",
    "native_isa",
    "triton",
    "cuda",
    "output_cache_bytes",
    "output_cache_limit",
}


def test_json_has_exactly_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == KEYS
    assert report["version"] == cx.__version__
    assert report["torch"] == torch.__version__
    assert report["native_cpu"] is (native.library() is not None)
    assert report["native_isa"] == native.isa()
    assert (report["native_isa"] is None) is (not report["native_cpu"])
    assert isinstance(report["triton"], bool)
    assert report["cuda"] is torch.cuda.is_available()
    held, limit = cx.cache_info()
    assert report["output_cache_bytes"] == held
    assert report["output_cache_limit"] == limit
    assert isinstance(report["output_cache_bytes"], int)
    assert isinstance(report["output_cache_limit"], int)


def test_the_report_follows_the_cache_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with cx.set_cache_limit(123 << 20):
        assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_cache_limit"] == 123 << 20


def test_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"convexmix           {cx.__version__}" in out
    assert torch.__version__ in out
    isa = native.isa()
    assert (f"yes ({isa})" if isa else "no (ATen fallback") in out
    assert "CPU output cache" in out


def test_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "convexmix", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == KEYS
