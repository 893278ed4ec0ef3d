"""Small architectures for tests, each exercising one pattern of the channel graph."""

from __future__ import annotations

import torch
from torch import nn


def chain2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 1 * 1, 10), nn.ReLU(), nn.Linear(10, 5),
    )


def two_convs(in_channels: int = 3, classes: int = 10) -> nn.Module:
    """Convs of 32 and 64 channels, global pooling, a classifier: narrow enough for channel_multiple to matter."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


def chain1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(32, 3),
    )


def chain3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(6, 10, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(10, 4),
    )


class Residual(nn.Module):
    """Two residual blocks sharing one channel space, then a 1x1 projection shortcut block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.a2 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1))
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a1(x))
        x = torch.relu(self.a2(x) + x)
        x = torch.relu(self.b(x) + self.short(x))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Inception-style branches concatenated on the channel axis, read by one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.bn = nn.BatchNorm2d(18)
        self.fuse = nn.Conv2d(18, 10, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(10 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = self.bn(torch.cat([self.b1(s), s, self.b2(s)], dim=1))
        return self.head(nn.functional.adaptive_avg_pool2d(torch.relu(self.fuse(y)), 4))


class Depthwise(nn.Module):
    """MobileNetV2-style inverted residual with a squeeze-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.se1, self.se2 = nn.Linear(24, 6), nn.Linear(6, 24)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(self.expand(x))
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3))))))
        h = h * gate.view(gate.size(0), -1, 1, 1)
        x = x + self.project(h)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


#: (builder, example input shape) for every test architecture.
NETS = {
    "chain2d": (chain2d, (2, 3, 8, 8)),
    "chain1d": (chain1d, (2, 2, 16)),
    "chain3d": (chain3d, (2, 3, 4, 8, 8)),
    "residual": (Residual, (2, 3, 8, 8)),
    "concat": (Concat, (2, 3, 8, 8)),
    "depthwise": (Depthwise, (2, 3, 8, 8)),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so eval-mode outputs exercise them."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model
