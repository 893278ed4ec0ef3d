"""Blocks in the style of torchvision and timm models, written here (no torchvision needed).

Each one exercises a pattern the channel graph must handle generically; tests prune them
with random ratios and check surgery and export stay exact.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout), nn.ReLU())


class DenseNet(nn.Module):
    """Dense block: every layer reads the concat of all earlier outputs; then a transition."""

    def __init__(self, growth: int = 6, layers: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(8 + i * growth), nn.ReLU(), nn.Conv2d(8 + i * growth, growth, 3, padding=1))
            for i in range(layers)
        )
        self.transition = nn.Sequential(nn.BatchNorm2d(8 + layers * growth), nn.ReLU(),
                                        nn.Conv2d(8 + layers * growth, 10, 1), nn.AvgPool2d(2))
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = self.transition(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split in two, transform one half, concat, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.conv_last = conv_bn(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.units(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class ResNeXt(nn.Module):
    """Bottleneck with a grouped 3x3 conv (cardinality 4) and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.reduce = conv_bn(16, 16, 1)
        self.grouped = conv_bn(16, 16, 3, groups=4)
        self.expand = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.expand(self.grouped(self.reduce(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, MLP on channels, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.block = ConvNeXtBlock(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class LayerScaleNet(nn.Module):
    """Channels-first layer scale ([C, 1, 1] parameter) and GroupNorm with 4 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.conv1(x))) * self.scale
        x = nn.functional.adaptive_max_pool2d(torch.relu(self.conv2(x)), 4)
        return self.head(x.flatten(1))


class Inception(nn.Module):
    """Four branches (1x1, 3x3, double 3x3, pool-projection) concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.b1 = conv_bn(12, 4, 1)
        self.b2 = nn.Sequential(conv_bn(12, 6, 1), conv_bn(6, 8))
        self.b3 = nn.Sequential(conv_bn(12, 4, 1), conv_bn(4, 6), conv_bn(6, 6))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(12, 4, 1))
        self.fc = nn.Linear(22, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), Fire(16, 4, 8), Fire(16, 6, 12))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(24, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class R3D(nn.Module):
    """3-D residual video net (R3D-style basic blocks on clips)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, dims=3)
        self.block1 = nn.Sequential(conv_bn(8, 8, dims=3), nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8))
        self.down = nn.Sequential(nn.Conv3d(8, 12, 1, stride=2, bias=False), nn.BatchNorm3d(12))
        self.block2 = nn.Sequential(conv_bn(8, 12, stride=2, dims=3), nn.Conv3d(12, 12, 3, padding=1, bias=False),
                                    nn.BatchNorm3d(12))
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(self.down(x) + self.block2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool3d(x, 1), 1))


class SpatialAttention(nn.Module):
    """CBAM-style spatial attention: a mean over channels makes those channels unprunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.attn = nn.Conv2d(1, 1, 7, padding=3)
        self.conv2 = conv_bn(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x * torch.sigmoid(self.attn(x.mean(1, keepdim=True)))
        return self.fc(self.conv2(x).mean((2, 3)))


class HardCodedView(nn.Module):
    """An old-style classifier that flattens with a literal feature count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(3, 8), conv_bn(8, 6)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv1(x)).view(x.size(0), 6 * 8 * 8))


#: name -> (builder, example input shape)
ARCHS = {
    "densenet": (DenseNet, (2, 3, 8, 8)),
    "shufflenet": (ShuffleNet, (2, 3, 8, 8)),
    "resnext": (ResNeXt, (2, 3, 8, 8)),
    "convnext": (ConvNeXt, (2, 3, 16, 16)),
    "layerscale-groupnorm": (LayerScaleNet, (2, 3, 8, 8)),
    "inception": (Inception, (2, 3, 8, 8)),
    "squeezenet": (SqueezeNet, (2, 3, 17, 17)),
    "r3d": (R3D, (2, 3, 4, 8, 8)),
    "spatial-attention": (SpatialAttention, (2, 3, 8, 8)),
    "hard-coded-view": (HardCodedView, (2, 3, 8, 8)),
}
