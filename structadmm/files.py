"""Writing files so that a reader never sees a half-written one.

Every file the pipeline, the exporters and the benchmarks write goes through :func:`atomic_path`
(or :func:`write_atomic`): the data is written to a hidden temporary file in the same folder,
flushed to disk, and renamed onto the final name, which is atomic; on any failure the temporary
file is removed and the final name is untouched. :func:`read_toml` reads the TOML files
(configs, plans) with one-line errors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import StructADMMError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; it replaces ``path`` when the block succeeds.

    The name is hidden and ends in ``.tmp`` (``.{name}.{random}.tmp``): a leftover of a killed
    process is easy to recognise. Same folder, so the rename is atomic; not ``mkstemp``, whose
    0600 mode would stick to the final file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must never expose a file whose data is not on disk
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's contents; a one-line error naming ``what`` it was meant to be otherwise."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise StructADMMError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StructADMMError(f"{what} {path} is not valid TOML: {exc}") from None
