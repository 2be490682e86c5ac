"""The one gate for optional packages: :func:`require` imports a module that an extra
provides, or raises :class:`~convexmix.errors.MissingExtraError` (an ``ImportError``
and a ``ConvexMixError``) whose message names the ``pip install`` command to run.

>>> from convexmix._optional import require
>>> require("math").sqrt(4.0)
2.0
>>> try:
...     require("not_a_real_module", extra="cli", purpose="this example")
... except ImportError as err:
...     print(err)
this example needs not_a_real_module: pip install "convexmix[cli]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

from convexmix.errors import MissingExtraError

__all__: list[str] = []

#: The extra that brings each optional top-level package (pyproject.toml's extras).
EXTRAS: dict[str, str] = {
    "numpy": "cli",
    "rich": "cli",
    "matplotlib": "plot",
    "scipy": "demo",
    "sklearn": "sklearn",
    "safetensors": "merge",
    "yaml": "merge",
    "pyarrow": "parquet",
    "tensorboard": "tensorboard",
}


def require(module: str, *, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed), or raise ``MissingExtraError``.

    Args:
        module: the module to import, e.g. ``"matplotlib.figure"``.
        extra: the convexmix extra that installs it; by default looked up in
            :data:`EXTRAS` from the module's top-level package.
        purpose: what needs it, for the message (e.g. ``"plotting"``).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the module (or a package it imports) is not installed.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = EXTRAS.get(top, top) if extra is None else extra
        what = purpose or "this feature"
        raise MissingExtraError(
            f'{what} needs {top}: pip install "convexmix[{name}]"', name=top
        ) from err
