"""Where the doctests come from.

``testpaths`` names ``src/convexmix`` for the doctests. With an editable install (``make
test``) that is the package Python imports. After a regular install (``pip install
".[test]" && pytest``) Python imports the installed copy, which has the compiled kernels,
and collecting ``src/`` would import every module a second time under the same name
("import file mismatch"): the doctests are then collected from the installed package,
which is the code the rest of the suite tests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SOURCE = (Path(__file__).parent / "src" / "convexmix").resolve()


def _installed() -> Path | None:
    spec = importlib.util.find_spec("convexmix")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def pytest_configure(config: pytest.Config) -> None:
    installed = _installed()
    if installed is None or installed == _SOURCE:
        return
    config.args = [
        str(installed) if Path(arg).resolve() == _SOURCE else arg for arg in config.args
    ]
