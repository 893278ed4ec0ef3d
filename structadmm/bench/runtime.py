"""Which ONNX Runtime build is installed, and whether two builds overwrite each other.

Every ONNX Runtime flavour (``onnxruntime``, ``onnxruntime-gpu``, ...) installs the same
``onnxruntime`` module, so with two of them installed whichever was installed last wins and a
GPU build may silently lose its CUDA and TensorRT providers. This module owns the list of those
distributions, the one-line warning with its fix, and the facts ``structadmm doctor`` prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

__all__ = ["ORT_DISTRIBUTIONS", "RuntimeFacts", "conflict_message", "installed_ort", "runtime_facts",
           "warn_if_conflicting"]

#: Distributions that all provide the ``onnxruntime`` module (only one may be installed).
ORT_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
    "onnxruntime-training",
)

log = logging.getLogger("structadmm")


def installed_ort() -> dict[str, str]:
    """Installed ONNX Runtime distributions, name -> version (normally exactly one)."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def conflict_message(installed: dict[str, str] | None = None) -> str | None:
    """The one-line warning with the fix when several ONNX Runtime builds are installed, else None."""
    installed = installed_ort() if installed is None else installed
    if len(installed) < 2:
        return None
    names = " and ".join(installed)
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in installed else next(iter(installed))
    return (f"{names} are both installed and overwrite each other's onnxruntime module (GPU providers may be "
            f"missing); fix: pip uninstall -y {' '.join(installed)} && pip install {keep}")


def warn_if_conflicting() -> str | None:
    """Log the conflict warning (one line on stderr by default); returns it, or None."""
    message = conflict_message()
    if message:
        log.warning("warning: %s", message)
    return message


@dataclass(frozen=True)
class RuntimeFacts:
    """What ``structadmm doctor`` reports."""

    ort_packages: dict[str, str]  # distribution -> version
    ort_module_version: str | None  # onnxruntime.__version__ (None if it cannot be imported)
    ort_device: str | None  # onnxruntime.get_device(): CPU or GPU
    providers: list[str]  # the providers this build can use
    torch_version: str | None
    torch_cuda: bool
    conflict: str | None  # the warning line when several builds are installed

    @property
    def ort_package(self) -> str | None:
        """The installed distribution's name ("+"-joined when several are installed)."""
        return "+".join(self.ort_packages) or None


def runtime_facts() -> RuntimeFacts:
    packages = installed_ort()
    try:
        import onnxruntime as ort
    except ImportError:
        version, device, providers = None, None, []
    else:
        version, device, providers = ort.__version__, ort.get_device(), list(ort.get_available_providers())
    try:
        import torch
    except ImportError:
        torch_version, cuda = None, False
    else:
        torch_version, cuda = torch.__version__, bool(torch.cuda.is_available())
    return RuntimeFacts(packages, version, device, providers, torch_version, cuda, conflict_message(packages))
