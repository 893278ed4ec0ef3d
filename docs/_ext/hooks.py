"""MkDocs hooks: pages in docs/ link to repository files outside it, as they do on GitHub.

A page such as ``docs/measurements.md`` links to ``../benchmarks/results/int8_speed.md``: on GitHub,
and for ``tests/test_docs.py``, that is a file of the repository. The site only holds what is under
``docs/``, so every file outside it that a page links to is added to the site at its path in the
repository (a Markdown file becomes a page, anything else is copied), and the page's link is
rewritten to reach it there. A link to something that does not exist is left as written, so
``mkdocs build --strict`` still fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _outside(page_uri: str, target: str, docs: Path, root: Path) -> str | None:
    """The repository path of ``target`` (a link on the page ``page_uri``) when it is a file outside docs/."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.partition("#")[0]
    resolved = (docs / posixpath.dirname(page_uri) / path).resolve()
    if docs in resolved.parents or not resolved.is_file() or root not in resolved.parents:
        return None
    return resolved.relative_to(root).as_posix()


def _links(markdown: str) -> list[str]:
    return LINK.findall(FENCE.sub("", markdown))


def on_files(files: Files, config) -> Files:
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    wanted = set()
    for page in files.documentation_pages():
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        wanted |= {uri for _, target, _ in _links(text) if (uri := _outside(page.src_uri, target, docs, root))}
    for uri in sorted(wanted):
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(root / uri),
                                        inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    if page.file.abs_src_path is None or docs not in Path(page.file.abs_src_path).resolve().parents:
        return markdown  # a repository file added above: its links are its own

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        uri = _outside(page.file.src_uri, target, docs, root)
        if uri is None:
            return match.group(0)
        _, hash_, anchor = target.partition("#")
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match.group(1)}{relative}{hash_}{anchor}{match.group(3)}"

    parts, last = [], 0
    for fence in FENCE.finditer(markdown):
        parts.append(LINK.sub(rewrite, markdown[last:fence.start()]))
        parts.append(fence.group(0))
        last = fence.end()
    parts.append(LINK.sub(rewrite, markdown[last:]))
    return "".join(parts)
