"""The built wheel metadata: no combination of extras installs two ONNX Runtime builds.

``onnxruntime`` and ``onnxruntime-gpu`` write the same module; with both installed, whichever came
last wins and a GPU install can lose its CUDA providers. The flavour is chosen by one extra
(``cpu`` or ``gpu``); every other combination of extras must pull at most that one.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from structadmm.bench.runtime import ORT_DISTRIBUTIONS

ROOT = Path(__file__).resolve().parent.parent
FLAVOURS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
BUILD_METADATA = (
    "import sys; from setuptools import build_meta; "
    "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
)


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory: pytest.TempPathFactory):
    """METADATA of the wheel setuptools would build from this tree's pyproject.toml (built in a copy)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    (src / "structadmm").mkdir()
    (src / "structadmm" / "__init__.py").write_text("")
    out = tmp_path_factory.mktemp("meta")
    done = subprocess.run([sys.executable, "-c", BUILD_METADATA, str(out)], cwd=src, capture_output=True,
                          text=True, check=True)
    dist_info = out / done.stdout.strip().splitlines()[-1]
    return Parser().parsestr((dist_info / "METADATA").read_text())


def ort_pulled(requirements: list[Requirement], extras: tuple[str, ...]) -> set[str]:
    """The ONNX Runtime distributions installing the package with ``extras`` pulls in directly."""
    names = set()
    for req in requirements:
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            names.add(canonicalize_name(req.name))
    return names & {canonicalize_name(n) for n in ORT_DISTRIBUTIONS}


def test_no_combination_of_extras_pulls_two_onnxruntime_builds(wheel_metadata) -> None:
    extras = wheel_metadata.get_all("Provides-Extra")
    requirements = [Requirement(r) for r in wheel_metadata.get_all("Requires-Dist")]
    assert set(FLAVOURS) <= set(extras)
    assert ort_pulled(requirements, ()) == set()  # the core names no flavour
    others = [e for e in extras if e not in FLAVOURS]
    checked = 0
    for flavour in (None, *FLAVOURS):
        for k in range(len(others) + 1):
            for combo in itertools.combinations(others, k):
                chosen = (*combo, flavour) if flavour else combo
                expected = {FLAVOURS[flavour]} if flavour else set()
                assert ort_pulled(requirements, chosen) == expected, f"extras {chosen}"
                checked += 1
    assert checked == 3 * 2 ** len(others)


def test_the_check_catches_a_core_dependency_on_one_flavour() -> None:
    # the packaging this replaced: onnxruntime in the core and onnxruntime-gpu in [gpu]
    old = [Requirement("onnxruntime>=1.18"), Requirement('onnxruntime-gpu>=1.18; extra == "gpu"')]
    assert ort_pulled(old, ("gpu",)) == {"onnxruntime", "onnxruntime-gpu"}


def test_makefile_installs_one_flavour_cpu_by_default() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "ORT ?= cpu" in makefile and '-e ".[$(ORT),dev]"' in makefile


def test_either_runtime_extra_brings_the_onnx_converter(wheel_metadata) -> None:
    # `pip install structadmm[cpu]` then `--model x.onnx` must not end in a missing onnx2torch (issue 24)
    requirements = [Requirement(r) for r in wheel_metadata.get_all("Requires-Dist")]
    for extra in FLAVOURS:
        assert any(r.name == "onnx2torch" and r.marker is not None and r.marker.evaluate({"extra": extra})
                   for r in requirements), extra
