"""What every stage needs to know about torch layers and models, in one place:

* :data:`CONVS` — the convolution types the pipeline prunes, lowers and counts;
* :func:`is_depthwise` — whether a convolution reads every input channel on its own;
* :func:`replace_module` — put a module in another's place in a model;
* :func:`eval_mode` — eval mode for a forward pass, each model's own mode restored after
  (callers measure, export or check models in the middle of training);
* :func:`flat_outputs` — a model's output tensors in order, for parity checks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import StructADMMError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_depthwise(conv: nn.Module) -> bool:
    """A grouped convolution with one group per input channel (any channel multiplier)."""
    return isinstance(conv, CONVS) and conv.groups > 1 and conv.groups == conv.in_channels


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every model as the pipeline traces, compacts, exports and checks it, for the duration: in
    eval mode, and with its key/value cache off (a transformers model whose config has
    ``use_cache``: a cache is state carried from one call to the next, not an output). Every
    module gets its own mode back (a user's BatchNorm frozen in eval inside a training model
    stays frozen), and every config its own ``use_cache``."""
    modes = {module: module.training for model in models for module in model.modules()}
    configs = {id(c): c for model in models for module in model.modules()
               for c in [getattr(module, "config", None)] if isinstance(getattr(c, "use_cache", None), bool)}
    caches = {key: config.use_cache for key, config in configs.items()}
    for model in models:
        model.eval()
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for key, config in configs.items():
            config.use_cache = caches[key]


@contextlib.contextmanager
def train_mode_trial(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in train mode for the block, as a trial that leaves no trace: each
    module's mode, every buffer (BatchNorm statistics) and torch's random state are as they were
    afterwards."""
    modes = {module: module.training for module in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    model.train()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for module, mode in modes.items():
            module.training = mode


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """A model's output tensors in order, from a tensor or nested tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    raise StructADMMError(f"model outputs must be tensors or tuples/lists/dicts of tensors, got {type(out).__name__}")


#: torch's loggers that speak during torch.export and the ONNX exporter (guards, fake tensors)
_TORCH_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch._subclasses.fake_tensor",
                  "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's warnings and log lines while it traces or exports (a failure is reported by
    the exception, as one line of ours; "torchvision is not installed" and guard chatter are noise)."""
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        # torch.export prints the partial graph of a data-dependent failure
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class Captured:
    """What a :func:`captured_output` block printed (filled in when the block ends)."""

    text: str = ""


@contextlib.contextmanager
def captured_output() -> Iterator[Captured]:
    """Capture what the block prints at the file-descriptor level (fds 1 and 2), so that output
    written by native code (the TorchScript exporter's IR dumps) is captured too, not only Python's.
    Where the descriptors cannot be redirected, the block runs as it is."""
    captured = Captured()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
                yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace") + out.getvalue() + err.getvalue()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` is (a child of a Sequential/ModuleList too)."""
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
