"""Griffe extension for the docs site: docstrings written for doctest and Sphinx read
well as Markdown.

- Doctest examples (``>>>`` lines and their output, up to a blank line), which Markdown
  would render as nested block quotes, become ``pycon`` code blocks; inside a Google
  ``Examples:`` section griffe already does that, so they are left alone there.
- Sphinx math (``:math:`\\sum_k w_k```) becomes arithmatex's inline ``\\(...\\)``, which
  MathJax typesets on the site.
- Sphinx roles (``:func:`fit_weights```, ``:class:`~convexmix.WeightedSum```), which
  Markdown would print as they are, become optional autorefs links: resolved in the
  docstring's scope (as Python would resolve the name there), a link where the target is
  on the site, plain code where it is not (a private module, say), never a warning.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`(?P<target>[^`]+)`")
#: Sphinx's inline math; the site renders ``\(...\)`` with pymdownx.arithmatex + MathJax.
_MATH = re.compile(r":math:`(?P<tex>[^`]+)`")


_EXAMPLES_SECTION = re.compile(r"^(\s*)Examples:\s*$")


class DoctestAndRoles(griffe.Extension):
    """Fence doctest examples and turn ``:role:`target``` into optional cross-references."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _fence_doctests(obj.docstring.value)
        text = _MATH.sub(lambda m: f"\\({m['tex']}\\)", text)
        obj.docstring.value = _ROLE.sub(lambda m: _link(obj, m["target"]), text)


def _fence_doctests(text: str) -> str:
    out: list[str] = []
    section_indent: int | None = None  # inside a Google "Examples:" section
    fence_indent: str | None = None  # inside a fenced doctest block
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if fence_indent is not None and not stripped:
            out.append(f"{fence_indent}```")
            fence_indent = None
        if section_indent is not None and stripped and len(indent) <= section_indent:
            section_indent = None
        if match := _EXAMPLES_SECTION.match(line):
            section_indent = len(match[1])
        elif fence_indent is None and section_indent is None and stripped.startswith(">>>"):
            fence_indent = indent
            out.append(f"{indent}```pycon")
        out.append(line)
    if fence_indent is not None:
        out.append(f"{fence_indent}```")
    return "\n".join(out)


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
