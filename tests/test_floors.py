"""tools/floors.py, which `make test-min` uses to install every dependency at its floor."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)


@pytest.mark.parametrize(("requirement", "pin"), [
    ("torch>=2.14.1", "torch==2.14.1"),
    ("numpy >= 1.24, <3", "numpy==1.24"),
    ("timm==1.0.31", "timm==1.0.31"),
    ("typer[all]>=0.15.4", "typer[all]==0.15.4"),
    ('onnxruntime>=1.27; sys_platform == "linux"', 'onnxruntime==1.27 ; sys_platform == "linux"'),
])
def test_a_lower_bound_becomes_a_pin(requirement: str, pin: str) -> None:
    assert floors.floor_pin(requirement) == pin


@pytest.mark.parametrize("requirement", ["torch", "numpy<3", "onnx!=1.17"])
def test_a_requirement_without_a_floor_is_refused(requirement: str) -> None:
    with pytest.raises(ValueError, match="no lower bound"):
        floors.floor_pin(requirement)


def test_every_runtime_dependency_and_test_tool_has_a_floor() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = floors.floor_pins(["cpu", "dev"])
    names = {re.split(r"[\[=]", p)[0] for p in pins}
    assert len(pins) == len(project["dependencies"]) + len(extras["cpu"]) + len(extras["dev"])
    assert {"torch", "onnxruntime", "numpy", "onnx2torch", "pytest"} <= names
    assert all("==" in p for p in pins)
    left_out = floors.floor_pins(["cpu", "dev"], without=["timm", "Transformers"])
    assert {re.split(r"[\[=]", p)[0] for p in left_out} == names - {"timm", "transformers"}
    with pytest.raises(SystemExit, match="tranformers"):
        floors.floor_pins(["cpu", "dev"], without=["tranformers"])  # a typo leaves nothing out silently
