"""A griffe extension: the reST of structadmm's docstrings read as the Markdown the site renders.

The docstrings are written for ``help()`` and for reading in the source, with Sphinx roles
(``:class:`~.registry.Chan```) and reST definition lists (a term, its text indented under it).
The API reference renders docstrings as Markdown, so this extension, run by mkdocstrings while
it loads the package, rewrites them:

* a role becomes a code span of its target, shortened as Sphinx shortens it
  (``:func:`~.trace.audit_rules``` -> ``audit_rules``, ``:mod:`.rules``` -> ``rules``);
* a line followed directly by indented lines (a definition list) becomes a bold term and its
  text, no longer indented (which Markdown would show as code);
* a list that follows a line of text directly gets the blank line Markdown needs before it.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)\.?([^`]+)`")


def _role(match: re.Match) -> str:
    shorten, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if shorten else target}`"


def markdown(text: str) -> str:
    """``text``, a docstring written in reST, as Markdown."""
    text = ROLE.sub(_role, text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        term = (line.strip() and not line.startswith(" ") and not line.rstrip().endswith("::")
                and i + 1 < len(lines) and lines[i + 1].startswith("    ") and lines[i + 1].strip()
                and not re.match(r"[*-] |\d+\. ", line))
        if term:
            body = []
            i += 1
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            out += [f"**{line.strip()}**", "", *textwrap.dedent("\n".join(body)).rstrip().split("\n"), ""]
            continue
        if re.match(r"\s*[*-] ", line) and out and out[-1].strip() and not re.match(r"\s*[*-] |\s", out[-1]):
            out.append("")
        out.append(line)
        i += 1
    return "\n".join(out)


class RestToMarkdown(Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
