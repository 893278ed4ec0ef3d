"""The one exception type that means "the user asked for something we cannot do".

Everything raised as :class:`StructADMMError` is shown by the CLI as a single line (no
traceback unless ``--debug``) and exits non-zero. Anything else is a bug in structadmm.
"""

from __future__ import annotations


class StructADMMError(Exception):
    """A user-facing error: the message names the problem and, where possible, the fix."""


class ParityError(StructADMMError):
    """Two models that must compute the same function do not (surgery or export went wrong)."""
