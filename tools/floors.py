"""Print pyproject.toml's requirements with every lower bound turned into a pin (``>=X`` becomes ``==X``).

    python tools/floors.py cpu dev --without transformers > floors.txt

The core dependencies come first, then each named extra of ``[project.optional-dependencies]``.
A requirement already pinned (``==X``) is kept as it is; one with no lower bound is an error, since
then there is no floor to test. Markers and extras of a requirement are kept. ``make test-min``
installs the result into its own virtualenv and runs the fast suite, so the floors have one home:
pyproject.toml. ``--without NAME ...`` leaves packages out (by name, in any group).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: name, optional [extras], the version clauses, optional ; marker
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def floor_pin(requirement: str) -> str:
    """``requirement`` with its lower bound as an exact pin; other clauses (``<X``, ``!=X``) are dropped."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, extras, spec, marker = match.groups()
    clauses = [c.strip() for c in spec.split(",") if c.strip()]
    pinned = [c for c in clauses if c.startswith("==")]
    floors = [c[2:].strip() for c in clauses if c.startswith(">=")]
    if pinned:
        version = pinned[0]
    elif floors:
        version = "==" + floors[0]
    else:
        raise ValueError(f"{requirement!r} has no lower bound (>=X or ==X): there is no floor to test")
    return f"{name}{extras or ''}{version}{' ' + marker if marker else ''}"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor_pins(extras: list[str], without: list[str] = (), pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {', '.join(unknown)} (it has {', '.join(optional)})")
    requirements = [*project.get("dependencies", []), *(r for e in extras for r in optional[e])]
    left_out = {_key(n) for n in without}
    pins: dict[str, str] = {}
    for requirement in requirements:
        pin = floor_pin(requirement)
        key = _key(re.split(r"[\[=; ]", pin, maxsplit=1)[0])
        if key in pins and pins[key] != pin:
            raise SystemExit(f"{key} has two floors in pyproject.toml: {pins[key]} and {pin}")
        pins[key] = pin
    if left_out - set(pins):
        raise SystemExit(f"--without names what these groups do not require: {', '.join(sorted(left_out - set(pins)))}")
    return [pin for key, pin in pins.items() if key not in left_out]


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--without") if "--without" in args else len(args)
    print("\n".join(floor_pins(args[:cut], args[cut + 1:])))
