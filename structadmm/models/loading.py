"""Load a user's model: by zoo name, from their own code, or from a saved ``torch.export`` program.

A model reference is one of

* a zoo name (``resnet20``; see ``structadmm models``),
* a library's own name: ``timm:NAME``, ``torchvision:NAME``, ``hf:FOLDER_OR_TYPE`` or
  ``ultralytics:CONFIG.yaml`` (see :mod:`.libraries`),
* ``module:function`` or ``path/to/file.py:function``: the module is imported and the function
  called with no arguments; it returns an ``nn.Module`` or ``(module, input_shape)`` with the
  shape of one sample (no batch dimension). **This runs the user's code**, with the current
  folder (or the file's folder) on ``sys.path`` while it is imported and called; for a ``.py``
  file, :func:`load_model` says so in one :class:`~structadmm.errors.StructADMMWarning` line,
* a ``.pt2`` file written by ``torch.export.save``. ``torch.export.load`` unpickles parts of the
  file, so a ``.pt2`` file is trusted like code: load only files you made or trust
  (:func:`load_model` says so in one warning line),
* an ``.onnx`` file, loaded as data and converted (see :mod:`.onnx_input`).

Weights come separately, from a checkpoint that is always loaded safely: ``.safetensors``
files with safetensors, anything else with ``torch.load(weights_only=True)``, which refuses
to unpickle anything but tensors and plain containers.

Every mistake a user can make here raises :class:`StructADMMError` with one line naming the
problem and the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import pickle
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import StructADMMError, StructADMMWarning, one_line
from .lifting import lift
from .libraries import input_shape_of, is_library_ref, load_from_library
from .loaded import LoadedModel
from .registry import get_spec

# Suffixes of files that hold weights but no architecture, for a better message when one is
# given where a model is expected.
_WEIGHT_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}


def load_model(ref: str, *, checkpoint: str | Path | None = None,
               input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """The model named by ``ref`` (see the module docstring), with ``checkpoint``'s weights if given.

    ``input_shape`` (one sample) is needed to load an ONNX file that leaves axes besides the
    batch dynamic; other sources ignore it."""
    if ref.lower().endswith(".onnx"):
        from .onnx_input import load_onnx_model

        loaded = load_onnx_model(ref, input_shape=input_shape)
    elif ref.lower().endswith(".pt2"):
        warnings.warn(f"loading {ref} runs code from it (torch.export.load unpickles parts of the file); "
                      "load only .pt2 files you made or trust", StructADMMWarning, stacklevel=2)
        loaded = _load_exported(Path(ref))
    elif is_library_ref(ref):
        loaded = load_from_library(ref)
    elif ":" in ref and not Path(ref).exists():
        target, _, function = ref.rpartition(":")
        if target.lower().endswith(".py"):
            warnings.warn(f"--model {ref} runs the code in {target} (imported, then {function}() called); "
                          "give only files you trust", StructADMMWarning, stacklevel=2)
        loaded = _load_from_function(ref)
    else:
        loaded = _load_from_zoo(ref)
    if checkpoint is not None:
        load_checkpoint(loaded.module, checkpoint, model_name=loaded.name)
    return loaded


def load_checkpoint(module: nn.Module, path: str | Path, *, model_name: str = "the model") -> None:
    """Load a state_dict from ``path`` into ``module`` (strict: every key and shape must match)."""
    path = Path(path)
    _require_file(path, "checkpoint")
    raw = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_torch(path)
    state = _state_dict_in(raw, path)
    _check_fits(module, state, path, model_name)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise StructADMMError(f"loading {path} into {model_name} failed: {one_line(exc)}") from exc


def call_function(ref: str) -> tuple[Any, str]:
    """Import the module of ``module:function`` (or ``file.py:function``), call the function with no
    arguments and return its result and a short name for it. This runs the user's code."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr.isidentifier():
        raise StructADMMError(
            f"{ref!r} is not module:function; write it like mypkg.models:build or path/to/file.py:build"
        )
    is_file = target.lower().endswith(".py")
    folder = Path(target).resolve().parent if is_file else Path.cwd()
    with _on_sys_path(folder):
        module = _import_file(Path(target)) if is_file else _import_module(target)
        func = _function_in(module, attr, target)
        result = _call(func, ref)
    return result, f"{Path(target).stem if is_file else target}:{attr}"


# --- zoo and user code ---------------------------------------------------------------------------


def _load_from_zoo(ref: str) -> LoadedModel:
    path = Path(ref)
    if path.suffix.lower() in _WEIGHT_SUFFIXES:
        raise StructADMMError(
            f"{ref} holds weights, not a model; name the architecture as the model (a zoo name or "
            "module:function) and give this file as its checkpoint (--checkpoint)"
        )
    if path.suffix.lower() == ".py":
        raise StructADMMError(f"name the function in {ref} that builds the model, like {ref}:build")
    try:
        spec = get_spec(ref)
    except StructADMMError as exc:
        raise StructADMMError(f"{exc}; or give module:function, a .pt2 file saved by torch.export, or an .onnx file") from None
    return LoadedModel(spec.build(), spec.name, spec.input_shape, spec.num_classes)


def _load_from_function(ref: str) -> LoadedModel:
    result, name = call_function(ref)
    input_shape = None
    if isinstance(result, tuple) and len(result) == 2:
        result, input_shape = result[0], _as_shape(result[1], ref)
    if not isinstance(result, nn.Module):
        raise StructADMMError(
            f"{ref} returned {_describe(result)}, not an nn.Module; return the model, "
            "or (model, input_shape) such as (net, (3, 32, 32))"
        )
    return LoadedModel(result, name, input_shape or input_shape_of(result), None)


def _as_shape(value: Any, ref: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list, torch.Size)) and value and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    ):
        return tuple(value)
    raise StructADMMError(
        f"{ref} returned the input shape {value!r}; it must be the positive sizes of one sample "
        "without the batch dimension, such as (3, 32, 32)"
    )


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    # The user's module may import its neighbours, at import time or lazily inside the function.
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _import_file(path: Path) -> ModuleType:
    _require_file(path, "Python file")
    # A prefixed name, so the user's file cannot shadow a real module such as ``data`` or ``models``.
    name = f"_structadmm_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise StructADMMError(f"cannot import {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise StructADMMError(f"importing {path} failed: {type(exc).__name__}: {one_line(exc)}") from exc
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise StructADMMError(
                f"cannot import module {name!r} ({exc}); check the name and that it can be imported "
                "from the current folder, or give a file path like path/to/file.py:build"
            ) from exc
        raise StructADMMError(f"importing {name} failed: {type(exc).__name__}: {one_line(exc)}") from exc
    except Exception as exc:
        raise StructADMMError(f"importing {name} failed: {type(exc).__name__}: {one_line(exc)}") from exc


def _function_in(module: ModuleType, attr: str, target: str) -> Callable[[], Any]:
    func = getattr(module, attr, None)
    if func is None:
        defined = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        raise StructADMMError(
            f"{target} has no function {attr!r}; it defines: {', '.join(defined) or 'no public functions'}"
        )
    if not callable(func):
        raise StructADMMError(f"{target}:{attr} is {_describe(func)}, not a function; name a function")
    return func


def _call(func: Callable[[], Any], ref: str) -> Any:
    try:
        inspect.signature(func).bind()
    except TypeError:
        raise StructADMMError(
            f"{ref} needs arguments, but it is called with none; give its parameters defaults "
            "or wrap it in a function that takes none"
        ) from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass
    try:
        return func()
    except Exception as exc:
        raise StructADMMError(f"{ref}() raised {type(exc).__name__}: {one_line(exc)}") from exc


# --- torch.export programs -----------------------------------------------------------------------


def _load_exported(path: Path) -> LoadedModel:
    _require_file(path, "torch.export program")
    how = f"save one with torch.export.save(torch.export.export(model, (x,)), '{path.name}')"
    # torch logs a full traceback as a warning before raising on a bad file; the error below says it.
    with _quiet("torch.export"):
        try:
            program = torch.export.load(path)
        except Exception as exc:
            # torch's own message points at the warnings silenced above, so it is not repeated.
            raise StructADMMError(
                f"{path} is not a torch.export program, or one saved by an incompatible torch version; {how}"
            ) from exc
    if not isinstance(program, torch.export.ExportedProgram):
        raise StructADMMError(f"{path} holds {_describe(program)}, not a torch.export program; {how}")
    sample = _single_input(program, path)
    if isinstance(sample.shape[0], int):
        raise StructADMMError(
            f"{path} was exported for batch size {sample.shape[0]} only, but the pipeline runs it at "
            "several batch sizes; export it with dynamic_shapes=({0: torch.export.Dim('batch')},)"
        )
    # the program's flat ATen graph, rebuilt with real layers so it can be pruned and trained
    return LoadedModel(lift(program.module()).eval(), path.stem, _exported_sample_shape(program, sample),
                       _exported_num_classes(program))


def _single_input(program: torch.export.ExportedProgram, path: Path) -> torch.Tensor:
    user_inputs = set(program.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor) or values[0].dim() == 0:
        raise StructADMMError(
            f"{path} takes {len(values)} inputs; structadmm prunes models that take one batched tensor"
        )
    return values[0]


def _exported_sample_shape(program: torch.export.ExportedProgram, sample: torch.Tensor) -> tuple[int, ...] | None:
    dims = tuple(sample.shape[1:])
    if all(isinstance(d, int) for d in dims):
        return dims
    # Other dynamic sizes than the batch: the inputs it was exported with are a valid example.
    example = program.example_inputs
    if example and example[0] and isinstance(example[0][0], torch.Tensor):
        return tuple(example[0][0].shape[1:])
    return None


def _exported_num_classes(program: torch.export.ExportedProgram) -> int | None:
    output = next(n for n in program.graph.nodes if n.op == "output")
    values = [getattr(arg, "meta", {}).get("val") for arg in output.args[0]]
    if len(values) == 1 and isinstance(values[0], torch.Tensor) and values[0].dim() == 2:
        classes = values[0].shape[1]
        return classes if isinstance(classes, int) else None
    return None


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- checkpoints ---------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise StructADMMError(
            f"cannot read {path}: the file is truncated or not safetensors ({one_line(exc)}); "
            "save it again with safetensors.torch.save_file(model.state_dict(), path)"
        ) from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise StructADMMError(
                f"{path} holds Python objects ({refused.group(1)}) that safe loading (weights_only=True) "
                "will not unpickle; save model.state_dict() instead, or convert the weights to .safetensors"
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # truncated zip, empty file, not a torch file at all
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> StructADMMError:
    reason = one_line(exc)
    return StructADMMError(
        f"cannot read checkpoint {path}: the file is truncated or not a torch checkpoint ({reason}); "
        "save it again with torch.save(model.state_dict(), path)"
    )


def _state_dict_in(raw: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        # Training scripts often save {"epoch": ..., "optimizer": ..., "state_dict" or "model": ...}.
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if isinstance(raw, Mapping) and any(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw
    what = f"a dict with keys {_few(list(map(str, raw)))}" if isinstance(raw, Mapping) else _describe(raw)
    raise StructADMMError(
        f"{path} holds {what} but no weights; expected a state_dict, or a dict with it under "
        "'state_dict' or 'model'"
    )


def _check_fits(module: nn.Module, state: Mapping[str, Any], path: Path, model_name: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    fix = f"check that the model is the architecture {path.name} was saved from"
    if missing or unexpected:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + (
            [f"unexpected keys {_few(unexpected)}"] if unexpected else [])
        raise StructADMMError(f"{path.name} does not fit {model_name}: {'; '.join(parts)}; {fix}")
    mismatched = [
        f"{k} is {_shape(state[k])} in the checkpoint but {_shape(v)} in the model"
        for k, v in expected.items()
        if isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if mismatched:
        raise StructADMMError(
            f"{path.name} does not fit {model_name}: {len(mismatched)} shape mismatches: {_few(mismatched)}; "
            f"{fix} (same widths and number of classes)"
        )


# --- small helpers -------------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise StructADMMError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise StructADMMError(f"{what} {path} is not a file; give the path of the file itself")


def _few(items: list[str], n: int = 3) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"an object of type {name}"
