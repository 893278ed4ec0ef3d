"""The Python version pyproject declares agrees with the code: its syntax, the standard-library
modules it imports, the interpreter running the suite (CI runs the declared minimum) and the README."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "structadmm").rglob("*.py"))

#: Standard-library modules added after Python 3.8, with the release that added them.
STDLIB_ADDED = {"graphlib": (3, 9), "zoneinfo": (3, 9), "tomllib": (3, 11)}


def _declared_minimum() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match, f"requires-python should be a plain lower bound like '>=3.11', got {spec!r}"
    return 3, int(match.group(1))


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_interpreter_meets_the_declared_minimum() -> None:
    assert sys.version_info[:2] >= _declared_minimum()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sources_parse_at_the_declared_minimum(path: Path) -> None:
    ast.parse(path.read_text(), str(path), feature_version=_declared_minimum())


def test_stdlib_imports_exist_at_the_declared_minimum() -> None:
    minimum = _declared_minimum()
    too_new = sorted(
        f"{path.relative_to(ROOT)} imports {name} (Python {'.'.join(map(str, STDLIB_ADDED[name]))})"
        for path in SOURCES for name in _imported_modules(ast.parse(path.read_text()))
        if name in STDLIB_ADDED and STDLIB_ADDED[name] > minimum
    )
    assert not too_new, f"pyproject declares >={minimum[0]}.{minimum[1]}, but " + "; ".join(too_new)


def test_the_readme_names_the_declared_minimum() -> None:
    major, minor = _declared_minimum()
    assert f"Python {major}.{minor}" in (ROOT / "README.md").read_text()
