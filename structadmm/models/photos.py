"""``photos``: real photographs, cut into as many model-sized samples as asked, made offline.

A demo or a test of compression without labels needs inputs that look like what a vision model
sees, not noise. This data set is cut from seven colour photographs that ship inside two packages,
so nothing is downloaded: scikit-image's ``astronaut``, ``chelsea`` (a cat), ``coffee``,
``rocket`` and the left view of ``stereo_motorcycle``, and scikit-learn's ``china`` and
``flower`` (:func:`sklearn.datasets.load_sample_images`). scikit-learn is a dependency;
scikit-image is not, and comes with the ``photos`` extra (``pip install 'structadmm[photos]'``):
without it the data set is refused in one line rather than made from fewer photographs, so the
samples for a seed are the same wherever they are made.

Sample ``i`` of a split is made from its own random stream (seeded by ``seed``, the split and
``i``), so it is the same on every read, in any order, and the data set is made on access
(nothing is held but the seven photographs, so a 3x640x640 detector's samples cost no memory):

1. a photograph, chosen at random;
2. a crop covering 10-100 % of its area, with an aspect ratio within 3:4..4:3 of the sample's,
   at a random place;
3. a horizontal flip, with probability 1/2;
4. resized (bilinear) to the sample's height and width;
5. colour jitter: brightness, contrast and saturation each scaled by a factor in 0.8..1.2;
6. grey (ITU-R 601 luma, as PIL's ``"L"`` mode) when the model takes one channel.

Pixels are scaled to [0, 1], as image folders are (:mod:`.data`); samples are 1-tuples
``(image,)``, inputs without labels. The held-out split is other crops of the same photographs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import StructADMMError

__all__ = ["PHOTO_NAMES", "PhotoCrops", "load_photos", "photo_splits", "source_photos"]

#: The photographs, in the order samples choose among them.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower")
TRAIN_SAMPLES = 512
HELD_OUT_SAMPLES = 128
SCALE = (0.1, 1.0)  # the crop's share of the photograph's area
ASPECT = (3 / 4, 4 / 3)  # the crop's aspect ratio relative to the sample's
JITTER = 0.2  # brightness, contrast and saturation factors within 1 +- JITTER
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SPLITS = {"train": 0, "held-out": 1}


@functools.lru_cache(maxsize=1)
def source_photos() -> tuple[np.ndarray, ...]:
    """The seven photographs (H x W x 3 uint8, in :data:`PHOTO_NAMES` order), read once."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise StructADMMError(
            "the photos data set is cut from scikit-image's sample photographs, and scikit-image is not "
            "installed; pip install 'structadmm[photos]' (or scikit-image), or give other data"
        ) from None
    from sklearn.datasets import load_sample_images

    sklearn_photos = load_sample_images().images  # china, flower
    photos = (skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(),
              skdata.stereo_motorcycle()[0], *sklearn_photos)
    return tuple(np.ascontiguousarray(p[..., :3], dtype=np.uint8) for p in photos)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise StructADMMError(
            f"the photos data set gives 1xHxW or 3xHxW images, but the model takes "
            f"{'x'.join(map(str, shape))}; use a model that takes grey or RGB images"
        )
    return shape  # type: ignore[return-value]


class PhotoCrops(Dataset):
    """``count`` samples cut from ``photos`` (H x W x 3 uint8 arrays), each a 1-tuple ``(image,)``
    of a ``input_shape`` (C x H x W) float32 tensor in [0, 1]; sample ``i`` depends only on
    ``seed``, ``split`` and ``i`` (see the module docstring for how it is made)."""

    def __init__(self, photos: Sequence[np.ndarray], count: int, input_shape: Sequence[int], *,
                 seed: int = 0, split: str = "train"):
        if not photos:
            raise StructADMMError("no photographs to cut samples from")
        if count < 1:
            raise StructADMMError(f"the photos data set needs at least 1 sample, got {count}")
        if split not in _SPLITS:
            raise StructADMMError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        self.photos = tuple(photos)
        self.count, self.input_shape = int(count), _check_shape(input_shape)
        self.seed, self.split = int(seed), split

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        if not -self.count <= i < self.count:
            raise IndexError(f"sample {i} of {self.count}")
        i %= self.count
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        return (torch.from_numpy(_sample(self.photos, self.input_shape, rng)),)


def _sample(photos: Sequence[np.ndarray], shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    area = ph * pw * rng.uniform(*SCALE)
    aspect = (width / height) * np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1])))  # width / height
    cw = int(np.clip(round(np.sqrt(area * aspect)), 1, pw))
    ch = int(np.clip(round(np.sqrt(area / aspect)), 1, ph))
    top, left = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = photo[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0  # H x W x 3
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    x = x * brightness
    mean = float((x @ _LUMA).mean())
    x = (x - mean) * contrast + mean
    grey = (x @ _LUMA)[..., None]
    x = np.clip((x - grey) * saturation + grey, 0.0, 1.0)
    if channels == 1:
        return np.ascontiguousarray((x @ _LUMA)[None], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def photo_splits(input_shape: Sequence[int], *, train: int = TRAIN_SAMPLES, held_out: int = HELD_OUT_SAMPLES,
                 seed: int = 0) -> tuple[PhotoCrops, PhotoCrops]:
    """(train, held-out) :class:`PhotoCrops` of ``input_shape`` (C x H x W, C 1 or 3) samples.

    Needs scikit-image (the ``photos`` extra); refused in one line without it.
    """
    _check_shape(input_shape)
    photos = source_photos()
    return (PhotoCrops(photos, train, input_shape, seed=seed, split="train"),
            PhotoCrops(photos, held_out, input_shape, seed=seed, split="held-out"))


def load_photos(input_shape: Sequence[int], count: int, test_fraction: float,
                seed: int) -> tuple[PhotoCrops, PhotoCrops]:
    """``count`` samples in all, ``test_fraction`` of them (at least one) held out: the data ref
    ``photos`` (640 samples: 512 + 128 at the default 0.2) or ``photos:COUNT``."""
    if count < 2:
        raise StructADMMError(f"photos:{count} is too few samples; ask for at least 2 (some are held out)")
    held_out = min(count - 1, max(1, round(count * test_fraction)))
    return photo_splits(input_shape, train=count - held_out, held_out=held_out, seed=seed)
