"""The code's layout rules: a helper has one home that its users import, no module imports
another module's private (``_x``) names, and the exporters do not reach into the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "structadmm").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
                  *(ROOT / "tests").glob("*.py")])
PROJECT = {"structadmm", *(p.stem for p in (ROOT / "tests").glob("*.py")), *(p.stem for p in (ROOT / "benchmarks").glob("*.py"))}

#: Private imports still waiting for a module that is being rewritten elsewhere (bench/latency.py),
#: and the alias kept for it; remove both when it imports errors.one_line.
PENDING: set = set()
PENDING_ALIASES: set = set()

#: Helpers that were written out several times, and their one home.
HOMES = {
    "one_line": "structadmm/errors.py",
    "atomic_path": "structadmm/files.py",
    "write_atomic": "structadmm/files.py",
    "eval_mode": "structadmm/layers.py",
    "CONVS": "structadmm/layers.py",
    "is_depthwise": "structadmm/layers.py",
    "flat_outputs": "structadmm/layers.py",
    "slice_groups": "structadmm/graph/channels.py",
}
#: The names those copies went by.
OLD_NAMES = {"_one_line", "_first_line", "_write_atomic", "_write", "_eval_mode", "_layer_macs", "_macs"}
#: graph.py is being rewritten elsewhere; its own copies go when it lands.
NOT_YET: set = set()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _module_of(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _private_imports() -> set[tuple[str, str, str]]:
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = _module_of(path, node)
            if module.split(".")[0] not in PROJECT:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add((_rel(path), module, alias.name))
    return found


def _definitions(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_no_module_imports_another_modules_private_names() -> None:
    assert _private_imports() <= PENDING


def test_every_shared_helper_has_one_home() -> None:
    defined: dict[str, list[str]] = {}
    for path in SOURCES:
        for name in _definitions(path) & (set(HOMES) | OLD_NAMES):
            defined.setdefault(name, []).append(_rel(path))
    for name, home in HOMES.items():
        assert defined.get(name) == [home], (name, defined.get(name))
    copies = {name: [p for p in paths if p not in NOT_YET and (name, p) not in PENDING_ALIASES]
              for name, paths in defined.items() if name in OLD_NAMES}
    assert not any(copies.values()), copies


def test_the_conv_types_are_spelled_out_once() -> None:
    convs = ["Conv1d", "Conv2d", "Conv3d"]
    spelled = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple) and [getattr(e, "attr", None) for e in node.elts][:3] == convs:
                spelled.append(_rel(path))
    assert [p for p in spelled if p not in NOT_YET] == [HOMES["CONVS"]]


def test_the_exporters_do_not_import_the_pipeline() -> None:
    for path in sorted((ROOT / "structadmm" / "exporters").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level: what importing the exporters loads
            if isinstance(node, ast.ImportFrom):
                assert not _module_of(path, node).startswith("structadmm.pipeline"), _rel(path)


# -- the rooms and their floors -----------------------------------------------------------------

#: Each room's floor: a module may import from rooms on lower floors and from its own room, never
#: from a room on its own floor or above (so there is no circle between rooms). The base modules
#: (errors, files, layers, cpu, batches, version) are the ground floor.
FLOORS = {
    "base": 0,
    "graph": 1, "exporters": 1,
    "bench": 2,
    "prune": 3, "models": 3,
    "pipeline": 4,
    "cli": 5, "structadmm": 5,
}
BASE = {"errors", "files", "layers", "cpu", "batches", "version"}
PACKAGE = ROOT / "structadmm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "structadmm"
    return "base" if parts[1] in BASE else parts[1]


def _imports() -> dict[str, set[str]]:
    """Every import between the package's modules, lazy ones (inside functions) included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _module_of(path, node)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                found = subs if subs and node.module is None else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges[name].update(m for m in found if m in modules and m != name)
    return edges


def test_every_module_has_a_room() -> None:
    assert {_room(m) for m in _imports()} <= set(FLOORS)


def test_imports_point_down_only() -> None:
    upward = sorted((a, b) for a, targets in _imports().items() for b in targets
                    if _room(a) != _room(b) and FLOORS[_room(b)] >= FLOORS[_room(a)])
    assert not upward, upward


def test_graph_under_prune_under_pipeline() -> None:
    assert FLOORS["graph"] < FLOORS["prune"] < FLOORS["pipeline"] < FLOORS["cli"]
    rooms = {_room(m) for m in _imports()}
    assert {"graph", "prune", "pipeline"} <= rooms


def test_no_import_circles() -> None:
    edges = _imports()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_the_package_imports_ultralytics_only_when_a_user_asks_for_it() -> None:
    """Ultralytics is AGPL-licensed: never a dependency; only the ``ultralytics:`` model loader
    imports it, inside the function that runs when a user names such a model."""
    allowed = PACKAGE / "models" / "libraries.py"
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "ultralytics" for n in names):
                assert path == allowed and id(node) not in top, _rel(path)
