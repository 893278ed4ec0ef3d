"""README.md and the docs site cannot drift from the code: every code block on their pages runs here.

The pages are README.md and every Markdown page under docs/ (the site's sources, read on GitHub too).

* Python blocks run as written, each in a fresh interpreter in an empty folder (the default suite:
  the pages' examples use small sizes so that they can).
* Transcripts (a fenced block of ``$ command`` lines, each followed by its output) run each command
  and compare the output (default suite).
* Shell blocks (``bash``): every ``structadmm`` command in them is parsed by the real CLI, so a flag
  that does not exist fails at once (default suite); the blocks themselves run as written in the
  slow suite, in a folder holding the files they name (made here, the TOML files from the pages' own
  TOML blocks), and ``make`` blocks in a copy of the repository with this interpreter's virtualenv.
* TOML blocks are settings (``CompressConfig``) or, with ``[layers.``, a plan for the default model;
  both are loaded by the real code. JSON blocks parse.
* Diagrams (``mermaid``) and ``text`` blocks (a file tree) are pictures, not code; they are only
  checked not to hide code.

A block that appears on several pages (README's library flow is also in the guide) runs once.
A block whose info string carries ``slow`` (````` ```python slow `````) runs in the slow suite only.
Also here: every local link and anchor on these pages resolves, every page is in the site's nav, the
settings table names every key of ``CompressConfig`` with its default, the API reference names every
public name, and the layout page names every module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
#: every page: README and the site's sources (docs/_ext holds the site's build hooks, no pages)
PAGES = [README, *sorted(p for p in DOCS_DIR.rglob("*.md") if "_ext" not in p.relative_to(DOCS_DIR).parts)]
SHELLS = {"bash", "sh", "shell"}
PICTURES = {"mermaid", "text"}


@dataclass(frozen=True)
class Block:
    lang: str
    flags: frozenset[str]
    code: str
    places: tuple[str, ...]  # "page:line" of every copy of this block, the first one first

    @property
    def id(self) -> str:
        return f"{self.lang or 'transcript'}@{self.places[0]}"

    @property
    def where(self) -> str:
        return ", ".join(self.places)


def _page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def page_blocks() -> list[Block]:
    """Every fenced block of every page, a block found on several pages once (with all its places)."""
    found: dict[tuple, list[str]] = {}
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, re.M | re.S):
            info = match.group(1).split()
            lang = info[0].lower() if info else ""
            line = text.count("\n", 0, match.start()) + 1
            place = f"{_page_name(page)}:{line}"
            found.setdefault((lang, frozenset(info[1:]), match.group(2)), []).append(place)
    return [Block(lang, flags, code, tuple(places)) for (lang, flags, code), places in found.items()]


BLOCKS = page_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in SHELLS]
TRANSCRIPTS = [b for b in BLOCKS if b.lang == "" and b.code.lstrip().startswith("$ ")]
TOML = [b for b in BLOCKS if b.lang == "toml"]
JSON = [b for b in BLOCKS if b.lang == "json"]


#: packages a page's example may import that are test extras, not dependencies of structadmm
_TEST_EXTRAS = ("transformers", "timm", "torchvision", "ultralytics", "rapidocr_onnxruntime")


def _marks(block: Block) -> list:
    return [pytest.mark.slow] if "slow" in block.flags else []


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's environment, with this checkout's structadmm first and its scripts on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def test_every_code_block_is_one_these_tests_know() -> None:
    known = {"python", "toml", "json", ""} | SHELLS | PICTURES
    assert PYTHON and SHELL and TRANSCRIPTS and TOML
    assert {_page_name(README), "docs/measurements.md", "docs/guides/your-model.md"} <= {_page_name(p) for p in PAGES}
    unknown = [f"{b.lang}@{b.where}" for b in BLOCKS if b.lang not in known]
    assert not unknown, f"a new kind of code block: teach tests/test_docs.py ({unknown})"
    untagged = [b for b in BLOCKS if (b.lang == "" and b not in TRANSCRIPTS) or b.lang in PICTURES]
    hiding = [b.where for b in untagged if re.search(r"^\s*(import |from |structadmm |\$ )", b.code, re.M)]
    assert not hiding, f"code in a block that does not run ({hiding}): tag it python or bash so that it runs"


def test_diagrams_are_mermaid_flowcharts() -> None:
    for block in (b for b in BLOCKS if b.lang == "mermaid"):
        assert re.match(r"\s*(flowchart|graph) (LR|TD|TB|RL|BT)\n", block.code), block.where


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=_marks(b)) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    missing = [name for name in _TEST_EXTRAS if re.search(rf"^\s*(import|from) {name}\b", block.code, re.M)
               and importlib.util.find_spec(name) is None]
    if missing:  # the minimum-versions environment leaves some test extras out
        pytest.skip(f"{block.where} needs {', '.join(missing)}, not installed here")
    result = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stderr[-3000:]}"
    if "sa.benchmark(" in block.code:  # the stage-by-stage example writes both files it benchmarks
        assert (tmp_path / "dense.onnx").is_file() and (tmp_path / "pruned.onnx").is_file()
    if "sa.compress(" in block.code:  # the one-call example writes a run folder
        reports = list(tmp_path.glob("runs/*/report.json"))
        assert len(reports) == 1 and "mac_ratio" in reports[0].read_text()


def _transcript_steps(block: Block) -> list[tuple[str, str]]:
    steps: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return [(command, "\n".join(output).strip()) for command, output in steps]


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=_marks(b)) for b in TRANSCRIPTS])
def test_transcript_shows_what_the_command_prints(block: Block, tmp_path: Path) -> None:
    for command, expected in _transcript_steps(block):
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=_env(COLUMNS="200"), capture_output=True,
                                text=True, timeout=300)
        got = (result.stdout + result.stderr).strip()
        assert got == expected, f"{block.where}: `{command}` printed\n{got}"


def _commands(code: str) -> list[list[str]]:
    """The argument lists of the structadmm commands in a shell block (after `structadmm` or `-m structadmm.cli`)."""
    found = []
    for line in code.splitlines():
        for part in re.split(r"&&|;|\|\||&(?!\d)", line):
            words = shlex.split(part, comments=True)
            for i, word in enumerate(words):
                if word == "structadmm" or (word == "structadmm.cli" and i and words[i - 1] == "-m"):
                    found.append(words[i + 1:])
                    break
    return found


CLI_COMMANDS = [(b, args) for b in SHELL for args in _commands(b.code)]


def test_shell_blocks_call_structadmm() -> None:
    assert len(CLI_COMMANDS) >= 10


@pytest.mark.parametrize("block,args", [pytest.param(b, a, id=f"{b.id}:{' '.join(a)[:60]}") for b, a in CLI_COMMANDS])
def test_every_structadmm_command_on_the_pages_parses(block: Block, args: list[str]) -> None:
    import typer

    from structadmm.cli import app

    group = typer.main.get_command(app)
    with group.make_context("structadmm", list(args)) as ctx:
        name, command, rest = group.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert command is not None, f"{block.where}: no command {args[:1]}"
        command.make_context(name, rest, parent=ctx)  # raises on an unknown flag or a bad value


# --- the slow suite: the shell blocks themselves ------------------------------------------------------------


def _toml_block(needle: str) -> str:
    return next(b.code for b in BLOCKS if b.lang == "toml" and needle in b.code)


MY_NET = '''
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
'''


def _fixtures(folder: Path) -> None:
    """The files the pages' shell blocks name, made small: a user's model, data, weights and ONNX files."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import structadmm as sa
    from structadmm.models import get_spec

    (folder / "my.toml").write_text(_toml_block("dense_epochs"))
    (folder / "plan.toml").write_text(_toml_block("[layers."))
    (folder / "my_net.py").write_text(MY_NET)
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (folder / "images" / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / label / f"{i}.png")
    np.savez(folder / "train.npz", x=rng.standard_normal((96, 3, 32, 32)).astype(np.float32),
             y=rng.integers(0, 10, 96))
    torch.manual_seed(0)
    resnet = get_spec("resnet20").build()
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(folder / "weights.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    sa.PruningPlan.uniform(resnet, x, "filter", 0.5).project(resnet)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(folder / "masked.safetensors"))
    sa.export_onnx(get_spec("resnet20").build(), x, folder / "dense.onnx")
    sa.export_onnx(sa.compact(resnet, x), x, folder / "pruned.onnx")
    shutil.copy(folder / "dense.onnx", folder / "model.onnx")  # a model held only as ONNX
    # a detector held only as ONNX, YOLO-shaped ([batch, 4 + classes, anchors]), and unlabeled photographs
    sa.export_onnx(_detector(), torch.randn(1, 3, 640, 640), folder / "detector.onnx")
    (folder / "photos").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / "photos" / f"{i}.jpg")


def _detector():
    """A small YOLO-shaped detector for 640x640 images: an 80 x 80 grid of anchors, each with a box
    (centre and size, in pixels) and the sigmoid scores of 3 classes."""
    import torch
    from torch import nn

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
            self.head = nn.Conv2d(32, 7, 1)

        def forward(self, x):
            out = self.head(self.body(x)).flatten(2)
            return torch.cat([8 * out[:, :4].abs(), out[:, 4:].sigmoid()], dim=1)

    torch.manual_seed(0)
    return Detector().eval()


def _repository_copy(folder: Path) -> Path:
    """What `make` needs, in a copy whose virtualenv counts as set up: this interpreter's, the one every test uses.

    The Makefile installs when its stamp (``STAMP``, set in the environment to a file of the copy) is
    older than pyproject.toml; the copy's pyproject.toml is dated before it, so nothing is installed
    (and PYTHON=false in the environment fails any attempt).
    """
    copy = folder / "repo"
    for name in ("structadmm", "tests", "benchmarks", "docs", "tools"):  # tools: the floors the tests read
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copytree(ROOT / "benchmarks" / "results", copy / "benchmarks" / "results",  # the pages link to them
                    ignore=shutil.ignore_patterns("cache"))
    for name in ("Makefile", "pyproject.toml", "README.md", "mkdocs.yml"):
        shutil.copy2(ROOT / name, copy / name)
    stamp = copy / ".installed"
    stamp.touch()
    before = stamp.stat().st_mtime - 1
    os.utime(copy / "pyproject.toml", (before, before))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in SHELL])
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    if re.search(r"^\s*make\b", block.code, re.M):
        cwd = _repository_copy(tmp_path)
        # this interpreter's virtualenv; PYTHON=false makes any attempt to (re)install into it fail, not install
        env = _env(VENV=sys.prefix, STAMP=str(cwd / ".installed"), PYTHON="false", PYTHONPATH=str(cwd))
    else:
        cwd = tmp_path
        _fixtures(cwd)
        env = _env()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, f"{block.where} failed:\n{(result.stdout + result.stderr)[-4000:]}"


# --- TOML and JSON blocks, the settings table, the API reference ----------------------------------------


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in TOML])
def test_toml_block_loads(block: Block, tmp_path: Path) -> None:
    """A settings block is a valid config file; a plan block is a valid plan for the default model."""
    import torch

    import structadmm as sa
    from structadmm.models import get_spec

    path = tmp_path / "block.toml"
    path.write_text(block.code)
    if "[layers." in block.code:
        spec = get_spec("digits-cnn")
        plan = sa.PruningPlan.from_file(spec.build(), spec.example_input(batch=2), path)
        assert plan.summary(), f"{block.where}: the plan prunes nothing"
    else:
        config = sa.CompressConfig.from_toml(path)
        written = tomllib.loads(block.code)
        assert {k: getattr(config, k) for k in written} == written, block.where


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in JSON])
def test_json_block_parses(block: Block) -> None:
    json.loads(block.code)


SETTINGS = DOCS_DIR / "reference" / "settings.md"


def test_settings_table_names_every_key_with_its_default() -> None:
    """docs/reference/settings.md lists every key of CompressConfig once, with the default the class has."""
    from structadmm import CompressConfig

    rows = re.findall(r"^\| `(\w+)` \| (\*unset\*|`[^`]*`) \|", SETTINGS.read_text(), re.M)
    keys = [key for key, _ in rows]
    assert sorted(keys) == sorted(CompressConfig.model_fields), "settings.md and CompressConfig name different keys"
    defaults = CompressConfig()
    for key, default in rows:
        want = getattr(defaults, key)
        got = None if default == "*unset*" else tomllib.loads(f"v = {default.strip('`')}")["v"]
        assert got == want and type(got) is type(want), f"settings.md gives {key} = {default}; the default is {want!r}"


API = DOCS_DIR / "reference" / "api.md"


def _resolve(path: str) -> object:
    """The object a mkdocstrings identifier (``package.module.name``) names."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def test_api_reference_shows_every_public_name() -> None:
    """docs/reference/api.md renders each name of structadmm.__all__, and each of its entries is one of them."""
    import structadmm

    shown = [_resolve(path) for path in re.findall(r"^::: ([\w.]+)", API.read_text(), re.M)]
    public = {name: getattr(structadmm, name) for name in structadmm.__all__ if name != "__version__"}
    missing = [name for name, obj in public.items() if not any(obj is s for s in shown)]
    assert not missing, f"api.md does not show {missing}"
    extra = [s for s in shown if not any(s is obj for obj in public.values())]
    assert not extra, f"api.md shows names that are not public: {extra}"



def test_layout_page_names_every_module() -> None:
    """docs/reference/layout.md's tree names every module of the package, so a new module gets a line."""
    text = (DOCS_DIR / "reference" / "layout.md").read_text()
    tree = re.search(r"^```text\n(.*?)^```", text, re.M | re.S).group(1)
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "structadmm").rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"(?<![\w.]){re.escape(p.name)}", tree)]
    assert not missing, f"docs/reference/layout.md does not name {missing}"

# --- links ------------------------------------------------------------------------------------


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens.

    The site gives the same (mkdocs.yml: ``pymdownx.slugs.slugify``), so one link works in both."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """The anchors on ``page``: its headings', and the identifiers its ``::: name`` API entries render."""
    text = _without_code(page.read_text())
    return ({heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
            | set(re.findall(r"^::: ([\w.]+)", text, re.M)))


def local_links(page: Path) -> list[tuple[str, str]]:
    """(path, anchor) of every link on ``page`` that points into the repository."""
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text())):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            links.append((path, anchor))
    return links


def test_heading_anchor_follows_github() -> None:
    assert heading_anchor("The zoo at 50 %") == "the-zoo-at-50-"
    assert heading_anchor("ADMM against simpler pruning") == "admm-against-simpler-pruning"
    assert heading_anchor("report.json") == "reportjson"


def test_heading_anchor_is_the_sites() -> None:
    """The site's slugs (mkdocs.yml) are GitHub's, so a link checked here works on the site too."""
    slugify = pytest.importorskip("pymdownx.slugs").slugify(case="lower")
    for heading in ("The zoo at 50 %", "report.json", "7-bit weights", "Several processes (torchrun)"):
        assert slugify(heading, "-") == heading_anchor(heading)
    assert "pymdownx.slugs.slugify" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize("page", PAGES, ids=_page_name)
def test_local_links_resolve(page: Path) -> None:
    """Every relative link on README and docs/ names a file that exists, and an anchor that exists there."""
    links = local_links(page)
    if page in (README, DOCS_DIR / "index.md", DOCS_DIR / "measurements.md"):
        assert links, f"{_page_name(page)} links to nothing: the link pattern is broken"
    for path, anchor in links:
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{_page_name(page)} links to {path}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{_page_name(page)} links to {path}#{anchor}: no such anchor"


def test_every_page_is_in_the_site_nav() -> None:
    """Each page under docs/ is in mkdocs.yml's nav (the strict build fails on one left out, too)."""
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = {p.relative_to(DOCS_DIR).as_posix() for p in PAGES if p != README}
    assert set(nav) == pages
