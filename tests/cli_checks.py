"""What every CLI test asks of a result: the command ended by itself, never by an exception.

typer's CliRunner catches what the command raises and keeps it in ``result.exception``; it never
prints a traceback into ``result.output``, so looking for "Traceback" there can never fail. An
ended command's exception is None (exit 0) or the SystemExit that carries its exit status.
"""

from __future__ import annotations

from typing import Any


def ended_cleanly(result: Any) -> None:
    """The command exited with a status of its own: no exception escaped, no internal error."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "internal error" not in result.output, result.output
