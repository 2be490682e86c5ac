"""The one gate for optional packages: a missing extra is an ImportError (and a
ConvexMixError) whose message names the pip install to run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib

import convexmix as cx
from convexmix._optional import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]


def test_require_imports_and_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("math").sqrt(9.0) == 3.0
    for name in ("matplotlib", "matplotlib.figure"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(
        cx.MissingExtraError, match=r'plotting needs matplotlib: pip install "convexmix\[plot\]"'
    ) as err:
        require("matplotlib.figure", purpose="plotting")
    assert isinstance(err.value, ImportError)
    assert isinstance(err.value, cx.ConvexMixError)
    assert err.value.name == "matplotlib"


def test_every_extra_named_exists_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRAS.values()) <= set(extras)
    for module, extra in EXTRAS.items():
        dist = {"sklearn": "scikit-learn", "yaml": "pyyaml"}.get(module, module)
        listed = " ".join(extras[extra])
        assert dist in listed or extra == "demo", (module, extra, listed)


def test_no_gate_of_its_own_outside_the_helper() -> None:
    """Modules import optional packages through require(), not a try/except of their own
    that raises (an optional speed-up that falls back silently may catch ImportError)."""
    offenders = []
    for path in (ROOT / "src" / "convexmix").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(
            r"except (?:ImportError|ModuleNotFoundError)[^\n]*\n((?:[ \t]+[^\n]*\n){1,3})", text
        ):
            if "raise" in m.group(1) and path.name != "_optional.py":
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()[:80]}")
    assert not offenders, "\n".join(offenders)


def test_plot_without_matplotlib_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from convexmix import plot

    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r'pip install "convexmix\[plot\]"'):
        plot.plot_ensemble_weights({"fit": [0.5, 0.5]}, ["a", "b"], "out.png")
