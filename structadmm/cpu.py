"""What this CPU is, as far as ONNX Runtime's speed depends on it: its model name and flags.

INT8 speed and accuracy depend on the CPU's int8 dot-product instructions far more than FP32
speed does, so the INT8 benchmarks record them and the quantizer asks for them. Flags are read
on Linux only (``/proc/cpuinfo``); elsewhere the answers say "unknown" rather than guess.

:data:`INT8_TARGETS` names the CPUs an INT8 model can be made for (the config's
``quantize_target_cpu``) and :func:`reduced_range_for` says which of them need 7-bit weights:
x86 without an int8 dot product multiplies uint8 by int8 with ``vpmaddubsw``, whose int16 pair
sums saturate on full-range per-channel weights.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

from structadmm.errors import StructADMMError

__all__ = ["INT8_DOT_PRODUCT", "INT8_TARGETS", "X86_MACHINES", "cpu_flags", "cpu_name", "int8_flags",
           "reduced_range_for"]

#: x86 flags that give ORT's int8 kernels a dot product (without them, uint8 x int8 pairs saturate)
INT8_DOT_PRODUCT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_INT8_RELEVANT = INT8_DOT_PRODUCT | {"avx2", "avx512bw"}
#: ``platform.machine()`` of x86 CPUs (Linux, macOS and Windows spellings)
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})

#: The CPUs an INT8 model can be made for (``quantize_target_cpu``), with what each means for its weights.
INT8_TARGETS = {
    "auto": "the CPU that runs the quantization (an x86 CPU whose flags cannot be read counts as one without VNNI)",
    "x86-vnni": "x86 with AVX-512 VNNI, AVX-VNNI or AMX (Cascade Lake, Ice Lake, Sapphire Rapids and later Xeons, "
                "Alder Lake and later Core, Zen 4 and later): full-range weights",
    "x86-avx2": "x86 without VNNI (AVX2, or AVX-512 without VNNI such as Skylake-SP, Zen 2/3): 7-bit weights",
    "arm64": "64-bit ARM (Graviton, Ampere, Apple silicon): full-range weights",
    "any": "unknown or several machines: 7-bit weights, safe on every CPU at a small cost in precision",
}
_SEVEN_BIT_TARGETS = frozenset({"x86-avx2", "any"})


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


_READ = object()  # reduced_range_for's default: read this CPU


def reduced_range_for(target: str = "auto", machine: str | None = None,
                      flags: frozenset[str] | set[str] | None | object = _READ) -> tuple[bool, str]:
    """Whether an INT8 model made for ``target`` (a key of :data:`INT8_TARGETS`) needs 7-bit weights
    ([-64, 64]) rather than the full int8 range, and the reason, in words.

    ``auto`` decides for the CPU given by ``machine`` (``platform.machine()``) and ``flags`` (None:
    unknown), by default this one: x86 with an int8 dot product gets the full range, x86 without
    one *or whose flags cannot be read* (Windows, macOS, sandboxes) 7 bits, as does a CPU whose
    architecture cannot be read; other CPUs the full range.
    """
    if target not in INT8_TARGETS:
        raise StructADMMError(f"unknown INT8 target CPU {target!r}; one of {', '.join(INT8_TARGETS)}")
    if target != "auto":
        seven = target in _SEVEN_BIT_TARGETS
        return seven, f"made for {target}: {'7-bit' if seven else 'full-range'} weights"
    machine = platform.machine() if machine is None else machine
    flags = cpu_flags() if flags is _READ else flags
    if not machine:
        return True, "this CPU's architecture cannot be read: 7-bit weights, safe on every CPU"
    if machine.lower() not in X86_MACHINES:
        return False, f"this CPU ({machine}) has no int8 pair saturation: full-range weights"
    if flags is None:
        return True, "this x86 CPU's flags cannot be read, so VNNI is not known: 7-bit weights"
    dot = sorted(flags & INT8_DOT_PRODUCT)
    if dot:
        return False, f"this x86 CPU has {', '.join(dot)}: full-range weights"
    return True, "this x86 CPU has no VNNI or AMX: 7-bit weights"
