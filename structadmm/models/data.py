"""Load a user's data: the built-in sets, an ``.npz`` file, an image folder, or their own code.

A data reference is one of

* ``digits``: scikit-learn's handwritten digits, 1x16x16 (see :mod:`structadmm.models.digits`),
* ``mnist1d``: MNIST-1D generated offline, 1x40; held out is its validation split
  (see :mod:`structadmm.models.mnist1d`),
* ``photos`` (or ``photos:COUNT``): real colour photographs cut into ``COUNT`` samples (640 by
  default, ``test_fraction`` of them held out: 512 + 128) of the model's ``input_shape`` (3x224x224
  when not given), without labels (see :mod:`structadmm.models.photos`; needs scikit-image, the
  ``photos`` extra). A folder named ``photos`` is given as ``./photos``,
* ``path/to/file.npz`` with arrays ``x`` (samples, N x C x ...) and ``y`` (integer class indices,
  N), and optionally ``x_val``/``y_val``; or ``x`` alone (optionally with ``x_val``) for inputs
  without labels. ``x`` is used as it is (no normalisation). It is read with
  ``allow_pickle=False``, so the file cannot run code,
* an image folder with one sub-folder per class (``root/cat/001.png``, classes in sorted name
  order), or ``root/train/<class>/`` and ``root/val/<class>/`` (``test`` for ``val`` also works);
  or, without labels, a flat folder with the images directly in it (``root/001.png``, or
  ``root/train/*.png`` and ``root/val/*.png``). A folder holding both images and sub-folders of
  images is refused (class folders or a flat folder, not both), as are ``train/`` and ``val/``
  laid out differently. Images are read lazily, converted to grey or RGB and resized to
  ``input_shape`` when given (else to the first image's size and colour), and scaled to [0, 1],
* ``module:function`` or ``path/to/file.py:function``, called with no arguments (this runs the
  user's code). It returns

  - ``(train, val)`` datasets or DataLoaders (``val`` may be None), or a single dataset or
    DataLoader; DataLoaders are kept as given;
  - an ``(x, y)`` tensor pair: inputs and integer labels, one per sample (``((a, b), y)`` for a
    model with several inputs);
  - inputs without labels: a tensor ``x`` alone (N x ...), or a 1-tuple ``(x,)``, or ``((a, b),)``
    for a model with several inputs;
  - any other iterable, a generator say, of items that are each ``inputs``, ``(inputs,)`` or
    ``(inputs, labels)``, where ``inputs`` is a tensor or a tuple of tensors (several model inputs).
    It is read to its end once, when the data is loaded (at most 100,000 items). Items are single
    samples when their (first) input has the model's ``input_shape``, else batches (N x ...), as a
    DataLoader yields.

  Inputs or labels? A pair is always ``(inputs, labels)``, as in torch's data sets: a dataset's
  sample ``(a, b)``, an iterable's item ``(a, b)``, a returned ``(x, y)``. Labels are integer class
  indices; a returned pair or an item whose second element is not integers of one per sample is
  refused, with the hint to give several inputs without labels as ``((a, b),)``. A sample or
  batch of inputs alone is a 1-tuple ``(inputs,)`` (``TensorDataset(x)`` gives these) or a bare
  tensor. For a model with several inputs, samples are ``((a, b), label)`` or ``((a, b),)``.

:class:`LoadedData` says whether the data has labels (``labelled``); data without labels has no
``num_classes``. Where no held-out part is given, ``test_fraction`` of the samples are held out with a seeded
split, stratified by label where the labels are known and every class is big enough; the two
parts are ``Subset``s of the whole, so sample ``i`` of an ``.npz`` file is ``x[i]`` in messages.

This module checks what it can see in the files; what the model must be able to learn from
(finite inputs, labels within its classes, readable images) is checked, for every source, by
:mod:`.validate` when a run starts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from ..errors import StructADMMError, one_line
from .digits import load_digits_split
from .loading import call_function

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
PHOTOS_SHAPE = (3, 224, 224)  # the photos' sample shape where the model does not say
PHOTOS_COUNT = 640  # photos' samples in all, 512 + 128 at the default test_fraction
MAX_ITEMS = 100_000  # the most items read from an iterable the user's code returns


@dataclass
class LoadedData:
    """Training and held-out data, with the shape of one sample and the number of classes.

    ``labelled`` is False for inputs without labels (samples ``(inputs,)``); their
    ``num_classes`` is None.
    """

    train: Dataset | DataLoader
    val: Dataset | DataLoader | None
    input_shape: tuple[int, ...]  # one sample, no batch dimension (the first input's, for several)
    num_classes: int | None  # None where the source does not say (user code) or has no labels
    name: str
    labelled: bool = True


def load_data(
    ref: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> LoadedData:
    """The data named by ``ref`` (see the module docstring).

    ``input_shape`` is the shape of one sample the model takes: image folders are resized to it;
    other sources report their own shape (compare with :func:`check_compatible`).
    """
    if not 0 < test_fraction < 1:
        raise StructADMMError(f"test_fraction must be in (0, 1) (the fraction held out), got {test_fraction}")
    path = Path(ref)
    if ref == "digits":
        return _load_digits(test_fraction, seed)
    if ref == "mnist1d":
        return _load_mnist1d()
    photos = re.fullmatch(r"photos(?::(\d+))?", ref)
    if photos:
        if path.exists():
            raise StructADMMError(
                f"{ref} names both the built-in photographs and the {'folder' if path.is_dir() else 'file'} "
                f"{ref} here; give ./{ref} for that, or photos:{int(photos.group(1) or PHOTOS_COUNT)} "
                "for the photographs"
            )
        count = int(photos.group(1)) if photos.group(1) else PHOTOS_COUNT
        return _load_photos(input_shape, count, test_fraction, seed)
    if path.is_dir():
        return _load_folder(path, input_shape, test_fraction, seed)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, test_fraction, seed)
    if ":" in ref and not path.exists():
        return _load_from_function(ref, input_shape, test_fraction, seed)
    if path.exists():
        raise StructADMMError(f"{ref} is neither an .npz file nor an image folder; give one of those")
    if len(path.parts) > 1 or path.suffix:
        raise StructADMMError(f"data {ref} does not exist; check the path")
    raise StructADMMError(
        f"unknown data set {ref!r}; give 'digits', 'mnist1d', 'photos', an .npz file, an image folder, "
        "or module:function"
    )


def check_compatible(
    model_input_shape: Sequence[int] | None,
    data_input_shape: Sequence[int],
    model_name: str,
    data_name: str,
) -> None:
    """Raise a one-line error when the data's samples are not the shape the model takes."""
    if model_input_shape is None or tuple(model_input_shape) == tuple(data_input_shape):
        return
    model_shape, data_shape = format_shape(model_input_shape), format_shape(data_input_shape)
    raise StructADMMError(
        f"the data {data_name} gives {data_shape} samples but {model_name} takes {model_shape}; "
        f"use data of {model_shape} samples (image folders are resized to the model's input) "
        f"or a model that takes {data_shape}"
    )


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` (or ``"3,32,32"``) as ``(3, 32, 32)``."""
    parts = re.split(r"[x,]", text.strip().lower())
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise StructADMMError(
            f"input shape must be the positive sizes of one sample joined by x, like 3x32x32, got {text!r}"
        )
    return tuple(int(p) for p in parts)


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# --- built-in and .npz ---------------------------------------------------------------------------


def _load_digits(test_fraction: float, seed: int) -> LoadedData:
    train, val = load_digits_split(test_fraction=test_fraction, seed=seed)
    return LoadedData(train, val, tuple(train.tensors[0].shape[1:]), 10, "digits")


def _load_mnist1d() -> LoadedData:
    from .mnist1d import load_mnist1d_splits

    train, val, _test = load_mnist1d_splits()  # the test split is the benchmark's, read once per final setting
    return LoadedData(train, val, tuple(train.tensors[0].shape[1:]), 10, "mnist1d")


def _load_photos(input_shape: tuple[int, ...] | None, count: int, test_fraction: float, seed: int) -> LoadedData:
    from .photos import load_photos

    shape = tuple(input_shape) if input_shape is not None else PHOTOS_SHAPE
    train, val = load_photos(shape, count, test_fraction, seed)
    return LoadedData(train, val, shape, None, "photos", labelled=False)


def _load_npz(path: Path, test_fraction: float, seed: int) -> LoadedData:
    arrays = _read_npz(path)
    if "x" not in arrays:
        raise StructADMMError(
            f"{path} has arrays {', '.join(arrays) or 'none'}; it needs x (samples, N x C x ...) and "
            "y (integer labels, N), optionally x_val and y_val: numpy.savez(path, x=x, y=y); "
            "or x alone (and x_val) for inputs without labels"
        )
    if "y" not in arrays:
        return _load_npz_inputs(path, arrays, test_fraction, seed)
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise StructADMMError(f"{path} has only one of x_val and y_val; give both, or neither to split x/y")
    x, y = _tensors(arrays["x"], arrays["y"], path, "x", "y")
    if "x_val" in arrays:
        x_val, y_val = _tensors(arrays["x_val"], arrays["y_val"], path, "x_val", "y_val")
        _same_samples(x, x_val, path)
        train, val = TensorDataset(x, y), TensorDataset(x_val, y_val)
        num_classes = int(max(y.max(), y_val.max())) + 1
    else:
        train_idx, val_idx = _split_indices(len(y), y.numpy(), test_fraction, seed, path)
        everything = TensorDataset(x, y)  # the splits index it: no copies, and sample i stays x[i]
        train, val = Subset(everything, train_idx.tolist()), Subset(everything, val_idx.tolist())
        num_classes = int(y.max()) + 1
    return LoadedData(train, val, tuple(x.shape[1:]), num_classes, path.stem)


def _load_npz_inputs(path: Path, arrays: dict[str, np.ndarray], test_fraction: float, seed: int) -> LoadedData:
    """An ``.npz`` of inputs without labels: ``x`` and optionally ``x_val``."""
    if "y_val" in arrays:
        raise StructADMMError(
            f"{path} has y_val but no y; give y too (labelled data) or leave out y_val (inputs without labels)"
        )
    x = _inputs(arrays["x"], path, "x")
    if "x_val" in arrays:
        x_val = _inputs(arrays["x_val"], path, "x_val")
        _same_samples(x, x_val, path)
        train, val = TensorDataset(x), TensorDataset(x_val)
    else:
        train_idx, val_idx = _split_indices(len(x), None, test_fraction, seed, path)
        everything = TensorDataset(x)
        train, val = Subset(everything, train_idx.tolist()), Subset(everything, val_idx.tolist())
    return LoadedData(train, val, tuple(x.shape[1:]), None, path.stem, labelled=False)


def _same_samples(x: torch.Tensor, x_val: torch.Tensor, path: Path) -> None:
    if x_val.shape[1:] != x.shape[1:]:
        raise StructADMMError(
            f"{path}: x_val samples are {format_shape(x_val.shape[1:])} but x samples are "
            f"{format_shape(x.shape[1:])}; they must be the same shape"
        )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise StructADMMError(f"data file {path} does not exist; check the path")
    how = "write it with numpy.savez(path, x=x, y=y) using numeric arrays"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise StructADMMError(f"{path} holds a single array, not named arrays; {how}")
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except StructADMMError:
        raise
    except Exception as exc:  # numpy's reasons suggest unsafe loading, so the message says it in our words
        raise StructADMMError(
            f"cannot read {path}: it is not an .npz archive of numeric arrays (truncated, pickled objects "
            f"or another format); {how}"
        ) from exc


def _inputs(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or x.ndim < 2 or len(x) == 0:
        raise StructADMMError(
            f"{key} in {path} is {x.dtype} of shape {x.shape}; it must be numeric samples, N x C x ..."
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _tensors(x: np.ndarray, y: np.ndarray, path: Path, x_key: str, y_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = _inputs(x, path, x_key)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise StructADMMError(
            f"labels {y_key} in {path} are {y.dtype} of shape {y.shape}; they must be integer class "
            f"indices, one per sample (save {y_key}.astype(numpy.int64))"
        )
    if len(x) != len(y):
        raise StructADMMError(
            f"{x_key} in {path} has {len(x)} samples but {y_key} has {len(y)} labels; they must match one to one"
        )
    if y.min() < 0:
        raise StructADMMError(f"labels {y_key} in {path} include {y.min()}; they must be class indices 0..K-1")
    return inputs, torch.from_numpy(y.astype(np.int64))


def _split_indices(
    n: int, labels: np.ndarray | None, test_fraction: float, seed: int, source: Any
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if n < 2:
        raise StructADMMError(f"{source} has {n} sample(s); at least 2 are needed to hold some out")
    indices = np.arange(n)
    if labels is not None:
        try:
            return train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
        except ValueError:  # a class with too few samples for both sides: fall back to a plain split
            pass
    return train_test_split(indices, test_size=test_fraction, random_state=seed)


# --- image folders -------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Images read from disk on access, as C x H x W float tensors in [0, 1], with integer labels;
    samples are ``(image, label)``, or ``(image,)`` where ``labels`` is None."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None, mode: str, size: tuple[int, int]):
        self.files, self.labels = list(files), (list(labels) if labels is not None else None)
        self.mode, self.size = mode, size  # PIL mode ("L" or "RGB"), (height, width)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor]:
        from PIL import Image

        height, width = self.size
        with _open_image(self.files[i]) as img:
            img = img.convert(self.mode)
            if img.size != (width, height):
                img = img.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
        return (x,) if self.labels is None else (x, self.labels[i])


def _load_folder(root: Path, input_shape: tuple[int, ...] | None, test_fraction: float, seed: int) -> LoadedData:
    splits = _split_folders(root)
    labelled = _has_class_folders(splits[0] if splits else root)
    if splits and _has_class_folders(splits[1]) != labelled and (labelled or _holds_images(splits[1])):
        flat, classes_in = (splits[1], splits[0]) if labelled else (splits[0], splits[1])
        raise StructADMMError(
            f"{flat} holds its images directly but {classes_in} has class folders; lay out both alike "
            "(class folders for labelled data, images directly inside for inputs without labels)"
        )
    if not labelled:
        return _load_flat_folder(root, splits, input_shape, test_fraction, seed)
    classes, files, labels = _scan_classes(splits[0] if splits else root)
    mode, size = _image_format(files[0], input_shape)
    if splits:
        val_files, val_labels = _held_out_images(splits, classes)
        train, val = ImageFiles(files, labels, mode, size), ImageFiles(val_files, val_labels, mode, size)
    else:
        train_idx, val_idx = _split_indices(len(files), np.array(labels), test_fraction, seed, root)
        everything = ImageFiles(files, labels, mode, size)
        train, val = Subset(everything, train_idx.tolist()), Subset(everything, val_idx.tolist())
    channels = 1 if mode == "L" else 3
    return LoadedData(train, val, (channels, *size), len(classes), root.name)


def _load_flat_folder(root: Path, splits: tuple[Path, Path] | None, input_shape: tuple[int, ...] | None,
                      test_fraction: float, seed: int) -> LoadedData:
    """Images directly in ``root`` (or in ``root/train`` and ``root/val``): inputs without labels."""
    files = _direct_images(splits[0] if splits else root)
    mode, size = _image_format(files[0], input_shape)
    if splits:
        train, val = ImageFiles(files, None, mode, size), ImageFiles(_direct_images(splits[1]), None, mode, size)
    else:
        train_idx, val_idx = _split_indices(len(files), None, test_fraction, seed, root)
        everything = ImageFiles(files, None, mode, size)
        train, val = Subset(everything, train_idx.tolist()), Subset(everything, val_idx.tolist())
    channels = 1 if mode == "L" else 3
    return LoadedData(train, val, (channels, *size), None, root.name, labelled=False)


def _has_class_folders(root: Path) -> bool:
    """Whether ``root`` is laid out as class folders (labelled) rather than images directly inside
    it (flat, no labels); refused when it holds both images and sub-folders of images. A folder
    with neither counts as class folders, whose scan then says what is missing."""
    direct = _direct_images(root, required=False)
    if not direct:
        return True
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _holds_images(d))
    if folders:
        names = ", ".join(d.name for d in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        raise StructADMMError(
            f"{root} holds both images ({direct[0].name}) and folders of images ({names}); put every image "
            f"in a class folder (labelled data) or every image directly in {root} (inputs without labels)"
        )
    return False


def _is_image(path: Path) -> bool:
    # Dot files are skipped: macOS writes "._name.png" companions that are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _holds_images(folder: Path) -> bool:
    return any(_is_image(p) for p in folder.rglob("*"))


def _direct_images(folder: Path, *, required: bool = True) -> list[Path]:
    """The images directly in ``folder`` (not in its sub-folders), sorted by name."""
    found = sorted(p for p in folder.iterdir() if _is_image(p))
    if required and not found:
        raise StructADMMError(
            f"found no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); add images or give the "
            "right folder"
        )
    return found


def _held_out_images(splits: tuple[Path, Path], classes: list[str]) -> tuple[list[Path], list[int]]:
    """The held-out folder's images, labelled by the training folder's class order."""
    val_classes, files, labels = _scan_classes(splits[1])
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise StructADMMError(
            f"{splits[1]} has classes {', '.join(unknown)} that {splits[0]} does not; "
            "every held-out class must also be a training class"
        )
    return files, [classes.index(val_classes[label]) for label in labels]


def _split_folders(root: Path) -> tuple[Path, Path] | None:
    """``root/train`` and ``root/val`` (or ``root/test``) when the folder is laid out that way."""
    if not (root / "train").is_dir():
        return None
    held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    return (root / "train", held_out) if held_out is not None else None


def _scan_classes(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted) and every image file with its class index."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    looked_for = ", ".join(IMAGE_EXTENSIONS)
    if not class_dirs:
        raise StructADMMError(
            f"{root} has no images and no class folders; put each class's images in a sub-folder of its own "
            f"({root}/<class>/), or images directly in {root} for inputs without labels"
        )
    per_class = [_images_in(d) for d in class_dirs]
    if not any(per_class):
        raise StructADMMError(
            f"found no images in the class folders of {root} (looked for {looked_for}); "
            "add images or give the right folder"
        )
    empty = [d for d, found in zip(class_dirs, per_class) if not found]
    if empty:
        raise StructADMMError(
            f"class folder {empty[0]} has no images (looked for {looked_for}); add images or remove the folder"
        )
    files = [f for found in per_class for f in found]
    labels = [label for label, found in enumerate(per_class) for _ in found]
    return [d.name for d in class_dirs], files, labels


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _image_format(first: Path, input_shape: tuple[int, ...] | None) -> tuple[str, tuple[int, int]]:
    """PIL mode and (height, width): from ``input_shape`` when given, else from the first image."""
    if input_shape is None:
        with _open_image(first) as img:
            return ("L" if img.mode in _GREY_MODES else "RGB"), (img.height, img.width)
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise StructADMMError(
            f"an image folder gives 1xHxW or 3xHxW samples, but the input shape is {format_shape(input_shape)}; "
            "use a model that takes grey or RGB images"
        )
    return ("L" if input_shape[0] == 1 else "RGB"), (input_shape[1], input_shape[2])


def _open_image(path: Path) -> Any:
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here and not halfway through training
    except Exception as exc:
        raise StructADMMError(f"cannot read image {path} ({exc}); replace or remove the file") from exc
    return img


# --- user code -----------------------------------------------------------------------------------


class InputTensors(Dataset):
    """Samples of a model with several inputs, from one tensor per input (N x ...) and optional
    labels: ``((a[i], b[i]), labels[i])``, or ``((a[i], b[i]),)`` without labels."""

    def __init__(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor | None = None):
        self.inputs, self.labels = tuple(inputs), labels

    def __len__(self) -> int:
        return len(self.inputs[0])

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        x = tuple(t[i] for t in self.inputs)
        return (x,) if self.labels is None else (x, self.labels[i])


def _load_from_function(ref: str, input_shape: tuple[int, ...] | None, test_fraction: float, seed: int) -> LoadedData:
    result, name = call_function(ref)
    train, val = _train_val(result, ref, input_shape, test_fraction, seed)
    first = _first_item(train, ref)
    labelled = isinstance(first, (tuple, list)) and len(first) > 1
    return LoadedData(train, val, _sample_shape(first, isinstance(train, DataLoader), ref), None, name,
                      labelled=labelled)


def _train_val(result: Any, ref: str, input_shape: tuple[int, ...] | None, test_fraction: float,
               seed: int) -> tuple[Any, Any]:
    data_types = (Dataset, DataLoader)
    if isinstance(result, (tuple, list)) and len(result) == 2:
        first, second = result
        if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
            return _split_dataset(_pair_dataset(first, second, ref), ref, test_fraction, seed)
        if isinstance(first, data_types) and (second is None or isinstance(second, data_types)):
            return first, second
        if (isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first)
                and isinstance(second, torch.Tensor)):  # ((a, b), y): several inputs with labels
            return _split_dataset(_collect([result], ref, None), ref, test_fraction, seed)
    if isinstance(result, data_types):
        dataset = result.dataset if isinstance(result, DataLoader) else result
        return _split_dataset(dataset, ref, test_fraction, seed)
    if isinstance(result, (torch.Tensor, np.ndarray)) or (isinstance(result, (tuple, list)) and len(result) == 1):
        # x alone, (x,) or ((a, b),): one batch of inputs without labels
        return _split_dataset(_collect([result], ref, None), ref, test_fraction, seed)
    if isinstance(result, Iterable) and not isinstance(result, (str, bytes, dict)):
        return _split_dataset(_collect(result, ref, input_shape), ref, test_fraction, seed)
    raise StructADMMError(
        f"{ref} returned {type(result).__name__}; return (train, val) datasets or DataLoaders, "
        "a single dataset, an (x, y) tensor pair, inputs x alone, or an iterable of batches or samples"
    )


def _pair_dataset(x: torch.Tensor, y: torch.Tensor, ref: str) -> TensorDataset:
    _check_labels(y, len(x), f"{ref} returned an (x, y) pair whose y",
                  " (or training and held-out inputs as (TensorDataset(x), TensorDataset(x_val)))")
    return TensorDataset(x, y)


def _check_labels(y: torch.Tensor, samples: int, what: str, more: str = "") -> None:
    """Labels are integer class indices, one per sample; else the pair was meant as two inputs."""
    hint = f"; give several inputs without labels as ((a, b),){more}"
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() == 0:
        raise StructADMMError(
            f"{what} is {str(y.dtype).removeprefix('torch.')} of shape {format_shape(y.shape) or 'scalar'}, not "
            f"integer labels: a pair is read as (inputs, labels){hint}"
        )
    if len(y) != samples:
        raise StructADMMError(
            f"{what} has {len(y)} labels for {samples} samples; they must match one to one{hint}"
        )


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))  # as .npz inputs are read
    if isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise StructADMMError(
        f"{what} is {type(value).__name__}, not a tensor; give tensors (or numeric numpy arrays)"
    )


def _item_parts(item: Any, where: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """One item of an iterable as (inputs, labels): ``inputs``, ``(inputs,)`` or ``(inputs, labels)``."""
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise StructADMMError(
                f"{where} has {len(item)} parts; give inputs, (inputs,) or (inputs, labels), with several "
                "inputs as a tuple: ((a, b),) or ((a, b), labels)"
            )
        inputs, labels = item[0], (item[1] if len(item) == 2 else None)
    else:
        inputs, labels = item, None
    parts = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not parts:
        raise StructADMMError(f"{where} has no inputs; give inputs, (inputs,) or (inputs, labels)")
    if isinstance(labels, (int, float, np.number)) and not isinstance(labels, bool):
        labels = torch.as_tensor(labels)  # one sample's label, as a number
    return (tuple(_as_tensor(p, f"an input of {where}") for p in parts),
            _as_tensor(labels, f"the labels of {where}") if labels is not None else None)


def _collect(items: Iterable, ref: str, input_shape: tuple[int, ...] | None) -> Dataset:
    """Every item of ``items`` (samples or batches) as one data set, read once."""
    inputs: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    batched, labelled = True, False
    try:
        for k, item in enumerate(itertools.islice(items, MAX_ITEMS + 1)):
            where = f"item {k} of {ref}"
            if k == MAX_ITEMS:
                raise StructADMMError(
                    f"{ref} yields more than {MAX_ITEMS} items; return a Dataset or DataLoader for data this "
                    "big (or endless)"
                )
            parts, y = _item_parts(item, where)
            if k == 0:
                shape = tuple(parts[0].shape)
                batched = input_shape is None or shape != tuple(input_shape)  # a sample has the model's shape
                if batched and not shape:
                    raise StructADMMError(f"{where} is a single number; give inputs as N x ... tensors")
                inputs, labelled = [[] for _ in parts], y is not None
            elif len(parts) != len(inputs) or (y is not None) != labelled:
                raise StructADMMError(
                    f"{where} has {len(parts)} input(s) {'with' if y is not None else 'without'} labels but item 0 "
                    f"has {len(inputs)} {'with' if labelled else 'without'}; every item must be alike"
                )
            count = len(parts[0]) if batched else 1
            for i, t in enumerate(parts):
                expected = (inputs[i][0].shape[1:] if batched else inputs[i][0].shape) if inputs[i] else None
                got = t.shape[1:] if batched else t.shape
                if (batched and (not t.dim() or len(t) != count)) or (expected is not None and got != expected):
                    raise StructADMMError(
                        f"{where}: input {i} is {format_shape(t.shape) or 'a scalar'}, not {count} "
                        f"sample(s) of {format_shape(expected if expected is not None else got)} like the rest; "
                        "every item must be alike"
                    )
                inputs[i].append(t)
            if y is not None:
                y = y if batched else y.unsqueeze(0)
                _check_labels(y, count, f"the labels of {where}")
                labels.append(y)
    except StructADMMError:
        raise
    except Exception as exc:  # the user's generator failed
        raise StructADMMError(f"cannot read the data from {ref}: {one_line(exc)}") from exc
    if not inputs or not inputs[0]:
        raise StructADMMError(f"the data from {ref} is empty; give it samples")
    join = torch.cat if batched else torch.stack
    tensors = [join(parts) for parts in inputs]
    try:
        y_all = torch.cat(labels) if labelled else None
    except RuntimeError as exc:
        raise StructADMMError(f"the labels from {ref} are not all alike: {one_line(exc)}") from exc
    if len(tensors) == 1:
        return TensorDataset(tensors[0], y_all) if y_all is not None else TensorDataset(tensors[0])
    return InputTensors(tensors, y_all)


def _split_dataset(dataset: Dataset, ref: str, test_fraction: float, seed: int) -> tuple[Subset, Subset]:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise StructADMMError(f"{ref} returned data that cannot be indexed, so it cannot be split; return (train, val)")
    train_idx, val_idx = _split_indices(len(dataset), None, test_fraction, seed, ref)
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())


def _first_item(data: Dataset | DataLoader, ref: str) -> Any:
    """The first training sample, or the first batch of a DataLoader or an iterable data set."""
    try:
        return next(iter(data)) if isinstance(data, (DataLoader, IterableDataset)) else data[0]
    except (IndexError, StopIteration):
        raise StructADMMError(f"the training data from {ref} is empty; return data with samples in it") from None


def _sample_shape(first: Any, batched: bool, ref: str) -> tuple[int, ...]:
    """The shape of one training sample: the first one's, or the first batch's without its batch size."""
    inputs = first[0] if isinstance(first, (tuple, list)) else first
    if isinstance(inputs, (tuple, list)) and inputs:  # several inputs, ((a, b), label): a's shape
        inputs = inputs[0]
    if not isinstance(inputs, (torch.Tensor, np.ndarray)):
        raise StructADMMError(
            f"the samples from {ref} are {type(inputs).__name__}, not tensors; convert them "
            "(e.g. with a ToTensor transform)"
        )
    return tuple(inputs.shape[1:] if batched else inputs.shape)
