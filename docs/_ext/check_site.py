"""Fails when the built site shows Sphinx/reST markup as text: a role such as
``:math:`x``` or ``:func:`f``` that no extension turned into math or a link.

Run by ``make docs`` after the build: ``python docs/_ext/check_site.py site``.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

#: A role name between colons right before its target (Markdown turned the backticks into a
#: <code> tag, which the text no longer shows).
_RAW_ROLE = re.compile(
    r":(?:py:)?(?:math|func|class|meth|attr|mod|data|exc|obj|ref|doc):(?=[`\w\\{~])"
)
_TAG = re.compile(r"<[^>]+>")
_SKIP = re.compile(r"<(script|style|pre)\b.*?</\1>", re.S)  # code listings show source as it is


def raw_roles(site: Path) -> list[str]:
    """``file: excerpt`` for each raw role in the text of the site's pages."""
    found: list[str] = []
    for page in sorted(site.rglob("*.html")):
        text = html.unescape(_TAG.sub("", _SKIP.sub("", page.read_text(encoding="utf-8"))))
        for match in _RAW_ROLE.finditer(text):
            excerpt = text[max(0, match.start() - 30) : match.end() + 30].replace("\n", " ")
            found.append(f"{page.relative_to(site)}: ...{excerpt}...")
    return found


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "site")
    found = raw_roles(site)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} raw reST roles in the built site", file=sys.stderr)
        return 1
    print(f"no raw reST roles in {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
