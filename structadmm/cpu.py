"""What this CPU is, as far as ONNX Runtime's speed depends on it: its model name and flags.

INT8 speed and accuracy depend on the CPU's int8 dot-product instructions far more than FP32
speed does (see :func:`structadmm.exporters.quantize.needs_reduced_range`), so the INT8
benchmarks record them and the quantizer asks for them. Linux only (``/proc/cpuinfo``);
elsewhere the answers say "unknown" rather than guess.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["INT8_DOT_PRODUCT", "cpu_flags", "cpu_name", "int8_flags"]

#: x86 flags that give ORT's int8 kernels a dot product (without them, uint8 x int8 pairs saturate)
INT8_DOT_PRODUCT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_INT8_RELEVANT = INT8_DOT_PRODUCT | {"avx2", "avx512bw"}


@lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (None where they cannot be read)."""
    text = _cpuinfo()
    return None if text is None else frozenset(text.split())


def cpu_name() -> str:
    """The CPU's model name, e.g. ``AMD EPYC 7B13`` (``platform.processor()`` or "unknown" elsewhere)."""
    for line in (_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def int8_flags() -> list[str]:
    """The flags among those that decide which int8 kernels ORT's MLAS runs (sorted; [] if unknown)."""
    return sorted((cpu_flags() or frozenset()) & _INT8_RELEVANT)
