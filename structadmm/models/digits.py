"""The embedded default: scikit-learn's real handwritten digits and a small VGG-style CNN.

The digits set (1,797 8x8 grey images, 10 classes) ships inside scikit-learn, so the whole
pipeline runs with no download. Images are upsampled to 16x16 so the network has room for
two pooling stages; the split is stratified and seeded, so every run sees the same data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .registry import ModelSpec, register

IMAGE_SIZE = 16


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of normalised 1x16x16 images and integer labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, stratify=y.numpy(), random_state=seed
    )
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """32-32-pool-64-64-pool-128 conv net with BatchNorm, then flatten -> 64 -> 10."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(1, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        spatial = (IMAGE_SIZE // 8) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * spatial, 2 * w), nn.ReLU(), nn.Linear(2 * w, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register(ModelSpec(
    name="digits-cnn",
    build=DigitsCNN,
    input_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
    description="5-conv VGG-style CNN for the built-in digits data (16x16 grey)",
    num_classes=10,
))
