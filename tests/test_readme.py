"""README.md cannot drift from the code: every Python and shell code block in it runs here.

* Python blocks run as written, each in a fresh interpreter in an empty folder (the default suite:
  README's examples use small sizes so that they can).
* Transcripts (a fenced block of ``$ command`` lines, each followed by its output) run each command
  and compare the output (default suite).
* Shell blocks (``bash``): every ``structadmm`` command in them is parsed by the real CLI, so a flag
  that does not exist fails at once (default suite); the blocks themselves run as written in the
  slow suite, in a folder holding the files they name (made here, the TOML files from README's own
  TOML blocks), and ``make`` blocks in a copy of the repository with this interpreter's virtualenv.

A block whose info string carries ``slow`` (````` ```python slow `````) runs in the slow suite only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELLS = {"bash", "sh", "shell"}


@dataclass(frozen=True)
class Block:
    lang: str
    flags: frozenset[str]
    code: str
    line: int  # where the block starts in README.md

    @property
    def id(self) -> str:
        return f"{self.lang or 'transcript'}@README.md:{self.line}"


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, re.M | re.S):
        info = match.group(1).split()
        lang = info[0].lower() if info else ""
        blocks.append(Block(lang, frozenset(info[1:]), match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in SHELLS]
TRANSCRIPTS = [b for b in BLOCKS if b.lang == "" and b.code.lstrip().startswith("$ ")]


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
    known = {"python", "toml", "json", ""} | SHELLS
    assert PYTHON and SHELL and TRANSCRIPTS
    assert {b.lang for b in BLOCKS} <= known, "a new kind of block in README.md: teach tests/test_readme.py"
    untagged = [b for b in BLOCKS if b.lang == "" and b not in TRANSCRIPTS]
    assert all(not re.search(r"^\s*(import |from |structadmm |\$ )", b.code, re.M) for b in untagged), \
        "a code block without a language: tag it python or bash so that it runs"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=_marks(b)) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"README.md:{block.line} failed:\n{result.stderr[-3000:]}"
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
        assert got == expected, f"README.md:{block.line}: `{command}` printed\n{got}"


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
def test_every_structadmm_command_in_readme_parses(block: Block, args: list[str]) -> None:
    import typer

    from structadmm.cli import app

    group = typer.main.get_command(app)
    with group.make_context("structadmm", list(args)) as ctx:
        name, command, rest = group.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert command is not None, f"README.md:{block.line}: no command {args[:1]}"
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
    """The files README's shell blocks name, made small: a user's model, data, weights and ONNX files."""
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


def _repository_copy(folder: Path) -> Path:
    """What `make` needs, in a copy whose virtualenv counts as set up: this interpreter's, the one every test uses.

    The Makefile installs when its stamp (``STAMP``, set in the environment to a file of the copy) is
    older than pyproject.toml; the copy's pyproject.toml is dated before it, so nothing is installed
    (and PYTHON=false in the environment fails any attempt).
    """
    copy = folder / "repo"
    for name in ("structadmm", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("Makefile", "pyproject.toml", "README.md"):
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
    assert result.returncode == 0, f"README.md:{block.line} failed:\n{(result.stdout + result.stderr)[-4000:]}"


# --- links ------------------------------------------------------------------------------------
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def local_links(page: Path) -> list[tuple[str, str]]:
    """(path, anchor) of every link on ``page`` that points into the repository."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            links.append((path, anchor))
    return links


def test_heading_anchor_follows_github() -> None:
    assert heading_anchor("The zoo at 50 %") == "the-zoo-at-50-"
    assert heading_anchor("ADMM against simpler pruning") == "admm-against-simpler-pruning"
    assert heading_anchor("report.json") == "reportjson"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_local_links_resolve(page: Path) -> None:
    """Every relative link on README and docs/ names a file that exists, and a heading that exists there."""
    assert local_links(page), f"{page.name} links to nothing: the link pattern is broken"
    for path, anchor in local_links(page):
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name} links to {path}, which does not exist"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {heading_anchor(h) for h in headings}, f"{page.name} links to {path}#{anchor}: no such heading"
