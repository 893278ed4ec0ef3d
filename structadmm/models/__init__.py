"""The model zoo and built-in data: every architecture by name, with its example input."""

from . import digits, zoo  # noqa: F401  (importing registers the models)
from .digits import DigitsCNN, load_digits_split
from .registry import ModelSpec, get_spec, model_names

__all__ = ["DigitsCNN", "ModelSpec", "get_spec", "load_digits_split", "model_names"]
