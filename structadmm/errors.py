"""The one exception type that means "the user asked for something we cannot do", and the
one warning type for "this will run, but probably not as you meant".

Everything raised as :class:`StructADMMError` is shown by the CLI as a single line (no
traceback unless ``--debug``) and exits non-zero. Anything else is a bug in structadmm.
A :class:`StructADMMWarning` is shown by the CLI as one ``warning:`` line, and the run goes on.
"""

from __future__ import annotations


class StructADMMError(Exception):
    """A user-facing error: the message names the problem and, where possible, the fix."""


class ParityError(StructADMMError):
    """Two models that must compute the same function do not (surgery or export went wrong)."""


class StructADMMWarning(UserWarning):
    """A user-facing warning: the input is usable but likely a mistake (e.g. a class with no samples)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none),
    cut to ``limit`` characters: what a one-line error quotes of a library's exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
