"""Griffe extension for the docs site: Sphinx roles in docstrings become links.

The docstrings cross-reference with Sphinx roles (``:func:`fit_weights```,
``:class:`~convexmix.WeightedSum```), which Markdown would print as they are. Each role
becomes an optional autorefs link: resolved in the docstring's scope (as Python would
resolve the name there), a link where the target is on the site, plain code where it is
not (a private module, say), never a warning.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`(?P<target>[^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring into an optional cross-reference."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = _ROLE.sub(lambda m: _link(obj, m["target"]), obj.docstring.value)


def _link(obj: griffe.Object, target: str) -> str:
    short = target.startswith("~")
    name = target.lstrip("~").strip()
    title = name.rsplit(".", 1)[-1] if short else name.lstrip(".")
    identifier = _resolve(obj, name)
    title_html = f"<code>{html.escape(title)}</code>"
    if identifier is None:
        return title_html
    return f'<autoref identifier="{html.escape(identifier)}" optional>{title_html}</autoref>'


def _resolve(obj: griffe.Object, name: str) -> str | None:
    if name.startswith("."):  # relative to the object's package
        return None
    scopes = [obj] if obj.is_module or obj.is_class else []
    scopes += _parents(obj)
    head, _, rest = name.partition(".")
    for scope in scopes:
        try:
            resolved = scope.resolve(head)
        except griffe.NameResolutionError:
            continue
        return f"{resolved}.{rest}" if rest else resolved
    if "." in name:
        return name  # already a full path, such as convexmix.functional.softmax
    return None


def _parents(obj: griffe.Object) -> list[griffe.Object]:
    out: list[griffe.Object] = []
    parent = obj.parent
    while parent is not None:
        out.append(parent)
        parent = parent.parent
    return out
