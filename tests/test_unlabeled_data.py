"""Inputs without labels, from every source: flat image folders, ``.npz`` files with ``x`` alone,
user code returning inputs (tensors, 1-tuples, iterables of samples or batches, several inputs),
and the built-in ``photos``; and their checks before a run (finite inputs, a model that runs on
them, no label checks)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from structadmm.batches import make_loader, split_batch
from structadmm.errors import StructADMMError
from structadmm.models import data as data_module
from structadmm.models.data import load_data
from structadmm.models.photos import PHOTO_NAMES, PhotoCrops, photo_splits, source_photos
from structadmm.models.validate import check_data


def fails(match: str):
    return pytest.raises(StructADMMError, match=match)


def write_images(folder: Path, count: int, size=(12, 10), start: int = 0) -> list[np.ndarray]:
    """``count`` RGB images of ``size`` (width, height) directly in ``folder``; their pixels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    pixels = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]
    for i, p in enumerate(pixels):
        Image.fromarray(p, "RGB").save(folder / f"{start + i:03d}.png")
    return pixels


def inputs_of(dataset) -> torch.Tensor:
    x, y = split_batch(next(iter(DataLoader(dataset, batch_size=len(dataset)))))
    assert y is None
    return x


# --- image folders ---------------------------------------------------------------------------------


def test_flat_folder_is_inputs_without_labels(tmp_path: Path) -> None:
    pixels = write_images(tmp_path / "pics", 10)
    data = load_data(str(tmp_path / "pics"), seed=1)
    assert (data.labelled, data.num_classes, data.input_shape, data.name) == (False, None, (3, 10, 12), "pics")
    assert (len(data.train), len(data.val)) == (8, 2)
    sample = data.val[0]
    assert isinstance(sample, tuple) and len(sample) == 1  # (inputs,)
    row = data.val.indices[0]  # the split indexes the sorted files: held-out sample 0 is image `row`
    assert torch.allclose(sample[0], torch.from_numpy(pixels[row]).permute(2, 0, 1).float() / 255)
    assert set(data.train.indices) | set(data.val.indices) == set(range(10))
    assert data.val.indices == load_data(str(tmp_path / "pics"), seed=1).val.indices
    grey = load_data(str(tmp_path / "pics"), input_shape=(1, 8, 8))
    assert grey.input_shape == (1, 8, 8) and inputs_of(grey.train).shape == (8, 1, 8, 8)


def test_flat_train_and_val_folders(tmp_path: Path) -> None:
    write_images(tmp_path / "pics" / "train", 5)
    write_images(tmp_path / "pics" / "val", 3, start=5)
    data = load_data(str(tmp_path / "pics"), input_shape=(3, 6, 6))
    assert not data.labelled and (len(data.train), len(data.val)) == (5, 3)
    assert inputs_of(data.val).shape == (3, 3, 6, 6)
    assert [p.name for p in data.val.files] == ["005.png", "006.png", "007.png"]


def test_folder_layouts_that_are_refused(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    write_images(mixed, 2)
    write_images(mixed / "cat", 2)
    with fails(r"mixed holds both images \(000\.png\) and folders of images \(cat\); put every image in a class "
               r"folder \(labelled data\) or every image directly in"):
        load_data(str(mixed))
    (mixed / "cat" / "000.png").unlink(), (mixed / "cat" / "001.png").unlink()
    (mixed / "cat" / "notes.txt").write_text("a folder without images does not make the folder labelled")
    assert not load_data(str(mixed)).labelled

    unlike = tmp_path / "unlike"
    write_images(unlike / "train", 3)
    write_images(unlike / "val" / "cat", 2)
    with fails(r"unlike/train holds its images directly but .*unlike/val has class folders; lay out both alike"):
        load_data(str(unlike))
    empty_val = tmp_path / "empty_val"
    write_images(empty_val / "train", 3)
    (empty_val / "val").mkdir()
    with fails(r"found no images in .*empty_val/val \(looked for \.png"):
        load_data(str(empty_val))


def test_labelled_folders_are_unchanged(tmp_path: Path) -> None:
    write_images(tmp_path / "pics" / "a", 3)
    write_images(tmp_path / "pics" / "b", 3, start=3)
    data = load_data(str(tmp_path / "pics"))
    assert data.labelled and data.num_classes == 2 and len(data.train[0]) == 2


# --- .npz -------------------------------------------------------------------------------------------


def test_npz_with_x_alone(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 2, 3)).astype(np.float64)
    np.savez(tmp_path / "in.npz", x=x)
    data = load_data(str(tmp_path / "in.npz"), test_fraction=0.25, seed=2)
    assert (data.labelled, data.num_classes, data.input_shape) == (False, None, (2, 3))
    assert (len(data.train), len(data.val)) == (15, 5)
    row = data.val.indices[0]
    assert data.val[0][0].dtype == torch.float32 and np.allclose(data.val[0][0].numpy(), x[row])
    np.savez(tmp_path / "both.npz", x=x, x_val=x[:4])
    both = load_data(str(tmp_path / "both.npz"))
    assert (len(both.train), len(both.val), both.labelled) == (20, 4, False)
    x_val, labels = split_batch(next(iter(make_loader(both.val, 8, shuffle=False))))
    assert labels is None and torch.allclose(x_val, torch.from_numpy(x[:4]).float())


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2)), "x_val": np.zeros((2, 3))}, r"x_val samples are 3 but x samples are 2"),
    ({"x": np.zeros((4, 2)), "y_val": np.zeros(2, np.int64)}, r"has y_val but no y; give y too"),
    ({"x": np.zeros(4)}, r"x in .* is float64 of shape \(4,\); it must be numeric samples, N x C"),
])
def test_npz_without_labels_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with fails(message):
        load_data(str(tmp_path / "bad.npz"))


# --- user code --------------------------------------------------------------------------------------

USER_DATA = """
import torch

def _x(n=10, *shape):
    return torch.arange(n * 12, dtype=torch.float32).reshape(n, *(shape or (3, 4)))

def alone():
    return _x()

def one_tuple():
    return (_x(),)

def numpy_alone():
    return _x().numpy().astype("float64")

def two_inputs():
    return ((_x(), _x() * -1),)

def sample_generator():
    for i in range(9):
        yield _x(1)[0] + i

def batch_generator():
    for i in range(3):
        yield (_x(4) + i,)

def labelled_batches():
    for i in range(3):
        yield _x(4), torch.arange(4) + i

def labelled_samples():
    return [(_x(1)[0], i % 2) for i in range(6)]

def two_input_samples():
    return (((_x(1)[0] + i, torch.zeros(5)),) for i in range(6))

def two_inputs_labelled():
    return (_x(), _x() * -1), torch.arange(10) % 3

def float_pair():
    return _x(), torch.rand(10, 3)

def float_second_element():
    return ((_x(1)[0], torch.rand(3, 4)) for _ in range(4))

def unlike_items():
    yield (_x(2),)
    yield (_x(2), torch.zeros(2, dtype=torch.long))

def unlike_shapes():
    yield _x(2)
    yield _x(2, 4, 3)

def broken():
    yield _x(2)
    raise OSError("disk gone")

def endless():
    while True:
        yield _x(1)

def empty():
    return iter(())
"""


@pytest.fixture
def user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sa_unlabeled_user.py").write_text(textwrap.dedent(USER_DATA))
    yield "sa_unlabeled_user"
    sys.modules.pop("sa_unlabeled_user", None)


@pytest.mark.parametrize("function, samples", [("alone", 10), ("one_tuple", 10), ("numpy_alone", 10),
                                               ("batch_generator", 12)])
def test_user_inputs_without_labels(user_data: str, function: str, samples: int) -> None:
    data = load_data(f"{user_data}:{function}", input_shape=(3, 4), test_fraction=0.5)
    assert (data.labelled, data.num_classes, data.input_shape) == (False, None, (3, 4))
    assert len(data.train) + len(data.val) == samples
    everything = torch.cat([inputs_of(data.train), inputs_of(data.val)])
    assert everything.shape == (samples, 3, 4) and everything.dtype == torch.float32
    if function == "batch_generator":  # batch k is _x(4) + k: every value of every batch is there once
        expected = torch.cat([torch.arange(48.0).reshape(4, 3, 4) + k for k in range(3)])
        assert torch.equal(everything.sum(0), expected.sum(0))


def test_a_generator_of_single_samples_is_told_by_the_models_shape(user_data: str) -> None:
    data = load_data(f"{user_data}:sample_generator", input_shape=(3, 4), test_fraction=0.3)
    assert data.input_shape == (3, 4) and len(data.train) + len(data.val) == 9
    x = torch.cat([inputs_of(data.train), inputs_of(data.val)])
    assert sorted(float(v) for v in x[:, 0, 0]) == [float(i) for i in range(9)]  # sample i starts at i
    # without the model's shape an item is a batch, as a DataLoader yields: nine batches of three 4-vectors
    as_batches = load_data(f"{user_data}:sample_generator", test_fraction=0.3)
    assert as_batches.input_shape == (4,) and len(as_batches.train) + len(as_batches.val) == 27


def test_several_inputs_without_labels(user_data: str) -> None:
    data = load_data(f"{user_data}:two_inputs", test_fraction=0.2)
    assert (data.labelled, data.input_shape, len(data.train), len(data.val)) == (False, (3, 4), 8, 2)
    (a, b), = data.train[0]  # ((a, b),)
    assert torch.equal(b, -a)
    x, y = split_batch(next(iter(make_loader(data.train, 4, shuffle=False))))
    assert y is None and isinstance(x, tuple) and len(x) == 2 and torch.equal(x[1], -x[0])
    samples = load_data(f"{user_data}:two_input_samples", input_shape=(3, 4))
    assert not samples.labelled and len(samples.train) + len(samples.val) == 6
    (a, b), = samples.val[0]
    assert a.shape == (3, 4) and b.shape == (5,)


def test_labelled_items_stay_labelled(user_data: str) -> None:
    batches = load_data(f"{user_data}:labelled_batches", input_shape=(3, 4))
    assert batches.labelled and len(batches.train) + len(batches.val) == 12
    _, y = split_batch(next(iter(make_loader(batches.train, 12, shuffle=False))))
    assert y.dtype == torch.int64
    two = load_data(f"{user_data}:two_inputs_labelled", test_fraction=0.5)
    assert two.labelled and two.input_shape == (3, 4) and len(two.train) == 5
    (a, b), label = two.train[0]
    assert torch.equal(b, -a) and label == int(a[0, 0]) // 12 % 3  # sample i starts at 12 i and has label i % 3
    samples = load_data(f"{user_data}:labelled_samples", input_shape=(3, 4), test_fraction=0.5)
    assert samples.labelled and len(samples.train) == 3
    labels = sorted(int(samples.train[i][1]) for i in range(3)) + sorted(int(samples.val[i][1]) for i in range(3))
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("function, message", [
    ("float_pair", r"returned an \(x, y\) pair whose y is float32 of shape 10x3, not integer labels: a pair is "
                   r"read as \(inputs, labels\); give several inputs without labels as \(\(a, b\),\) \(or training and "
                   r"held-out inputs as \(TensorDataset\(x\), TensorDataset\(x_val\)\)\)"),
    ("float_second_element", r"the labels of item 0 of .* is float32 .* give several inputs without labels as"),
    ("unlike_items", r"item 1 of .* has 1 input\(s\) with labels but item 0 has 1 without; every item must be alike"),
    ("unlike_shapes", r"item 1 of .*: input 0 is 2x4x3, not 2 sample\(s\) of 3x4 like the rest"),
    ("broken", r"cannot read the data from .*broken: disk gone"),
    ("empty", r"the data from .*empty is empty"),
])
def test_user_data_refused_in_one_line(user_data: str, function: str, message: str) -> None:
    with fails(message) as info:
        load_data(f"{user_data}:{function}", input_shape=(3, 4))
    assert "\n" not in str(info.value)


def test_an_endless_generator_is_refused(user_data: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "MAX_ITEMS", 50)
    with fails(r"endless yields more than 50 items; return a Dataset or DataLoader"):
        load_data(f"{user_data}:endless", input_shape=(3, 4))


# --- photos -----------------------------------------------------------------------------------------


def sklearn_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def test_photo_crops_are_real_images_and_deterministic() -> None:
    photos = sklearn_photos()  # scikit-learn ships these two, so this runs without scikit-image
    crops = PhotoCrops(photos, 24, (3, 32, 40), seed=5)
    x = torch.stack([crops[i][0] for i in range(24)])
    assert x.shape == (24, 3, 32, 40) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert len(crops[0]) == 1  # (image,): inputs without labels
    # photographs, not noise: neighbouring pixels are close (uniform noise differs by 1/3 on average)
    assert float((x[..., 1:] - x[..., :-1]).abs().mean()) < 0.1
    assert len({round(float(v), 4) for v in x.mean(dim=(1, 2, 3))}) == 24  # every sample its own crop
    again = PhotoCrops(photos, 24, (3, 32, 40), seed=5)
    assert all(torch.equal(crops[i][0], again[i][0]) for i in (0, 7, 23))  # same seed, same samples
    assert torch.equal(crops[3][0], crops[3][0])  # read again, in any order
    other = PhotoCrops(photos, 24, (3, 32, 40), seed=6)
    held = PhotoCrops(photos, 24, (3, 32, 40), seed=5, split="held-out")
    assert not torch.equal(crops[0][0], other[0][0]) and not torch.equal(crops[0][0], held[0][0])
    # grey is the same crop in ITU-R 601 luma
    grey = PhotoCrops(photos, 24, (1, 32, 40), seed=5)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    assert grey[4][0].shape == (1, 32, 40)
    assert torch.allclose(grey[4][0][0], (crops[4][0] * luma).sum(0), atol=1e-5)


def test_photo_crop_shapes_refused() -> None:
    with fails(r"the photos data set gives 1xHxW or 3xHxW images, but the model takes 4x8x8"):
        PhotoCrops(sklearn_photos(), 4, (4, 8, 8))
    with fails(r"gives 1xHxW or 3xHxW images, but the model takes 64"):
        load_data("photos", input_shape=(64,))
    with fails(r"photos:1 is too few samples; ask for at least 2"):
        load_data("photos:1", input_shape=(3, 8, 8))


def test_photos_without_scikit_image_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    source_photos.cache_clear()
    try:
        with fails(r"^the photos data set is cut from scikit-image's sample photographs, and scikit-image is not "
                   r"installed; pip install 'structadmm\[photos\]'"):
            load_data("photos", input_shape=(3, 16, 16))
    finally:
        source_photos.cache_clear()


def test_a_folder_named_photos_is_not_taken_for_the_built_in_set(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "photos", 4)
    with fails(r"photos names both the built-in photographs and the folder photos here; give \./photos for "
               r"that, or photos:640 for the photographs"):
        load_data("photos")
    data = load_data("./photos")
    assert data.name == "photos" and len(data.train) + len(data.val) == 4 and not data.labelled


def test_the_built_in_photos() -> None:
    pytest.importorskip("skimage")
    assert len(source_photos()) == len(PHOTO_NAMES) == 7
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in source_photos())
    data = load_data("photos", input_shape=(3, 24, 24), seed=3)
    assert (data.name, data.labelled, data.num_classes, data.input_shape) == ("photos", False, None, (3, 24, 24))
    assert (len(data.train), len(data.val)) == (512, 128)
    x = inputs_of(data.val)
    assert x.shape == (128, 3, 24, 24) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, inputs_of(load_data("photos", input_shape=(3, 24, 24), seed=3).val))
    train, held_out = photo_splits((1, 16, 16), train=10, held_out=3, seed=0)
    assert (len(train), len(held_out), train[9][0].shape) == (10, 3, (1, 16, 16))
    small = load_data("photos:20", input_shape=(3, 8, 8), test_fraction=0.25)
    assert (len(small.train), len(small.val)) == (15, 5)
    # all seven photographs are drawn on: a sample's colours come from its photograph
    picks = {int(np.random.default_rng([3, 0, i]).integers(7)) for i in range(512)}
    assert picks == set(range(7))


# --- checks before a run ------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A model whose output is not class scores: a tuple of two maps, like a detector's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.mean(dim=(2, 3))


def test_inputs_without_labels_pass_without_label_checks() -> None:
    x = torch.rand(12, 3, 8, 8)
    check_data(TwoHeads(), TensorDataset(x), TensorDataset(x[:4]), labels=False)
    check_data(TwoHeads(), TensorDataset(x), None, labels=None)  # no labels: none checked
    # labels present but not used: neither they nor the class scores are checked
    check_data(TwoHeads(), TensorDataset(x, torch.full((12,), 99)), None, labels=False)
    with fails(r"the training data has no labels; give \(input, label\) pairs, or compress without labels"):
        check_data(TwoHeads(), TensorDataset(x), None)
    with fails(r"returns tuple, not class scores"):  # labels present and asked for: the output must be scores
        check_data(TwoHeads(), TensorDataset(x, torch.zeros(12, dtype=torch.long)), None, labels=None)


def test_inputs_without_labels_are_still_checked() -> None:
    x = torch.rand(12, 3, 8, 8)
    bad = x.clone()
    bad[9, 1, 2, 3] = float("nan")
    with fails(r"^training sample 9 has NaN in its inputs"):
        check_data(TwoHeads(), TensorDataset(bad), None, labels=False)
    with fails(r"^held-out sample 2 has inf in its inputs"):
        check_data(TwoHeads(), TensorDataset(x), TensorDataset(torch.where(bad.isnan(), torch.inf, bad)[7:]),
                   labels=False)
    with fails(r"TwoHeads cannot run on the training data's 1x8x8 samples"):
        check_data(TwoHeads(), TensorDataset(torch.rand(4, 1, 8, 8)), None, labels=False)
    with fails(r"the held-out data is empty"):
        check_data(TwoHeads(), TensorDataset(x), TensorDataset(x[:0]), labels=False)


def test_several_inputs_without_labels_are_checked_per_input(tmp_path: Path) -> None:
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    a, b = torch.rand(6, 5), torch.rand(6, 5)
    b[4, 0] = float("inf")
    dataset = data_module.InputTensors((a, b))
    with fails(r"^training sample 4 has inf in its inputs"):
        check_data(Add(), dataset, None, labels=False)
    check_data(Add(), data_module.InputTensors((a, a)), None, labels=None)


def test_loaded_unlabeled_sources_pass_the_checks(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", 6)
    folder = load_data(str(tmp_path / "pics"), input_shape=(3, 8, 8))
    check_data(TwoHeads(), folder.train, folder.val, labels=False)
    crops = PhotoCrops(sklearn_photos(), 6, (3, 8, 8))
    check_data(TwoHeads(), crops, None, labels=None)
