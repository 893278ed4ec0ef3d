"""Models by the names their libraries give them: ``timm:NAME``, ``torchvision:NAME``,
``hf:FOLDER_OR_TYPE`` and ``ultralytics:CONFIG.yaml``, with the input shape read from the
library's own metadata (timm's ``pretrained_cfg``, torchvision's weights transforms, a
transformers config, a detector's stride) rather than asked for.

Each library is imported only when its prefix is used, and only if it is installed (none of them
is a dependency; Ultralytics, AGPL-licensed, never is). Models get random weights: nothing is
downloaded. ``hf:`` takes a local folder (its ``config.json``, and safetensors weights when there
are any; no remote code runs) or a model type such as ``gpt2``, built from its default config.
Names are checked against what the library lists before anything is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import StructADMMError, one_line
from .loaded import LoadedModel

__all__ = ["LIBRARIES", "input_shape_of", "is_library_ref", "load_from_library"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_TEXT_LENGTH = 32  # tokens per sample for a text model's example input


def is_library_ref(ref: str) -> bool:
    prefix, sep, _ = ref.partition(":")
    return bool(sep) and prefix in LIBRARIES


def load_from_library(ref: str) -> LoadedModel:
    """The model ``ref`` names (``library:name``); one-line errors for a missing library or name."""
    prefix, _, name = ref.partition(":")
    if not name:
        raise StructADMMError(f"{ref!r} names no model; write it like {prefix}:{_EXAMPLES[prefix]}")
    if importlib.util.find_spec(_MODULES[prefix]) is None:
        raise StructADMMError(f"{ref} needs the {_MODULES[prefix]} package, which is not installed "
                              f"(pip install {_MODULES[prefix]})")
    return LIBRARIES[prefix](name)


def input_shape_of(module: nn.Module) -> tuple[int, ...] | None:
    """One sample's input shape as the model's library records it (timm, transformers), or None."""
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return tuple(int(d) for d in cfg["input_size"])
    config = getattr(module, "config", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        return (channels, size, size)
    return None


def _checked(name: str, ref: str) -> str:
    if not _NAME.match(name):
        raise StructADMMError(f"{ref}: {name!r} is not a model name (letters, digits, '.', '_' and '-')")
    return name


def _timm(name: str) -> LoadedModel:
    import timm

    _checked(name, f"timm:{name}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise StructADMMError(f"timm has no model {name!r}" + (f"; close names: {', '.join(close)}" if close else ""))
    model = timm.create_model(name, pretrained=False)
    return LoadedModel(model, name, input_shape_of(model), getattr(model, "num_classes", None))


def _torchvision(name: str) -> LoadedModel:
    import torchvision

    _checked(name, f"torchvision:{name}")
    names = torchvision.models.list_models()
    if name not in names:
        close = [n for n in names if name.split("_")[0] in n][:5]
        raise StructADMMError(f"torchvision has no model {name!r}" + (f"; close names: {', '.join(close)}" if close else ""))
    model = torchvision.models.get_model(name, weights=None)
    shape, classes = None, None
    try:
        weights = next(iter(torchvision.models.get_model_weights(name)))
        crop = getattr(weights.transforms(), "crop_size", None)  # classifiers: the size they were trained at
        if crop and type(weights.transforms()).__name__ == "ImageClassification":
            shape = (3, int(crop[0]), int(crop[-1]))
        classes = len(weights.meta.get("categories") or []) or None
    except (StopIteration, ValueError, KeyError, TypeError):
        pass  # no weights registered: the user gives the shape
    return LoadedModel(model, name, shape, classes)


def _hf(name: str) -> LoadedModel:
    import transformers

    folder = Path(name)
    if folder.is_dir():
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for a bad folder
            raise StructADMMError(f"{folder}: not a transformers model folder ({one_line(exc)})") from None
    else:
        _checked(name, f"hf:{name}")
        if name not in transformers.CONFIG_MAPPING:
            raise StructADMMError(f"hf:{name}: neither a local model folder nor a transformers model type "
                                  "(like bert, gpt2, llama, vit)")
        config = transformers.AutoConfig.for_model(name)
    auto = _auto_class(config, transformers)
    try:
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            model = auto.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                         trust_remote_code=False)
        else:
            model = auto.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config that names no model class of this auto class
        raise StructADMMError(f"hf:{name}: cannot build a model from its config ({one_line(exc)})") from None
    model.eval()
    shape = input_shape_of(model)
    vocab = getattr(config, "vocab_size", None) if shape is None else None
    if shape is None and isinstance(vocab, int):
        shape = (_TEXT_LENGTH,)
    classes = getattr(config, "num_labels", None) if "ForSequenceClassification" in type(model).__name__ else None
    return LoadedModel(model, folder.name if folder.is_dir() else name, shape, classes, vocab_size=vocab)


def _auto_class(config: Any, transformers: Any) -> Any:
    """A decoder gets its language-model head, anything else the bare model: picked from the auto
    classes' own tables by the config's type, never by a name read from a file."""
    if type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False):
        architectures = getattr(config, "architectures", None) or []
        if not architectures or any("CausalLM" in a or "LMHead" in a for a in architectures):
            return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _ultralytics(name: str) -> LoadedModel:
    from ultralytics import YOLO  # AGPL: imported only here, only when asked for

    _checked(name, f"ultralytics:{name}")
    if not name.endswith((".yaml", ".yml")):
        raise StructADMMError(f"ultralytics:{name}: give a model config such as yolov8n.yaml (weights files are "
                              "not loaded from here: export them to ONNX and give the .onnx file)")
    try:
        model = YOLO(name).model
    except Exception as exc:  # noqa: BLE001 - an unknown config, a YAML that does not build
        raise StructADMMError(f"ultralytics:{name}: cannot build it ({one_line(exc)})") from None
    return LoadedModel(model.eval(), Path(name).stem, (3, 640, 640), None)


LIBRARIES: dict[str, Callable[[str], LoadedModel]] = {
    "timm": _timm, "torchvision": _torchvision, "hf": _hf, "ultralytics": _ultralytics,
}
_MODULES = {"timm": "timm", "torchvision": "torchvision", "hf": "transformers", "ultralytics": "ultralytics"}
_EXAMPLES = {"timm": "resnet18", "torchvision": "resnet18", "hf": "gpt2", "ultralytics": "yolov8n.yaml"}
