"""Random CNN graphs for property tests: chains, residuals, concats, depthwise, grouped,
squeeze-excitation and shuffle blocks, in 1-D, 2-D or 3-D, drawn from one seed."""

from __future__ import annotations

import random

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
SPATIAL = {1: (16,), 2: (8, 8), 3: (4, 6, 6)}


def conv_unit(cin: int, cout: int, dims: int, rng: random.Random, groups: int = 1) -> nn.Sequential:
    k = rng.choice([1, 3])
    layers = [CONV[dims](cin, cout, k, padding=k // 2, groups=groups, bias=rng.random() < 0.5)]
    if rng.random() < 0.7:
        layers.append(BN[dims](cout))
    layers.append(rng.choice([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Identity()]))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, dims: int, rng: random.Random) -> None:
        super().__init__()
        mid = rng.randint(2, 8)
        self.body = nn.Sequential(conv_unit(c, mid, dims, rng), conv_unit(mid, c, dims, rng))

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, c: int, dims: int, rng: random.Random) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_unit(c, rng.randint(2, 6), dims, rng) for _ in range(rng.randint(2, 3)))
        self.keep_input = rng.random() < 0.5
        self.out = sum(b[0].out_channels for b in self.branches) + (c if self.keep_input else 0)

    def forward(self, x):
        parts = [b(x) for b in self.branches]
        return torch.cat(parts + [x] if self.keep_input else parts, 1)


class Depthwise(nn.Module):
    def __init__(self, c: int, dims: int, rng: random.Random) -> None:
        super().__init__()
        self.dw = CONV[dims](c, c, 3, padding=1, groups=c, bias=False)
        self.bn = BN[dims](c)
        self.pw = conv_unit(c, rng.randint(3, 10), dims, rng)

    def forward(self, x):
        return self.pw(torch.relu(self.bn(self.dw(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, dims: int, rng: random.Random) -> None:
        super().__init__()
        self.dims = dims
        self.fc1, self.fc2 = nn.Linear(c, max(2, c // 2)), nn.Linear(max(2, c // 2), c)

    def forward(self, x):
        w = x.mean(tuple(range(2, 2 + self.dims)))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))
        return x * w.view(w.size(0), w.size(1), *([1] * self.dims))


class Shuffle(nn.Module):
    def __init__(self, c: int, dims: int, rng: random.Random) -> None:
        super().__init__()
        self.branch = conv_unit(c // 2, c // 2, dims, rng)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c = y.size(0), y.size(1)
        return y.reshape(n, 2, c // 2, -1).transpose(1, 2).reshape(y.shape)


class RandomNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.dims = rng.choice([1, 2, 2, 3])
        self.in_channels = rng.choice([1, 3])
        c = rng.randint(4, 8)
        blocks = [conv_unit(self.in_channels, c, self.dims, rng)]
        for _ in range(rng.randint(2, 5)):
            kind = rng.choice(["conv", "residual", "concat", "depthwise", "grouped", "se", "shuffle", "pool"])
            if kind == "conv":
                block = conv_unit(c, rng.randint(3, 10), self.dims, rng)
                c = block[0].out_channels
            elif kind == "residual":
                block = Residual(c, self.dims, rng)
            elif kind == "concat":
                block = Concat(c, self.dims, rng)
                c = block.out
            elif kind == "depthwise":
                block = Depthwise(c, self.dims, rng)
                c = block.pw[0].out_channels
            elif kind == "grouped" and c % 2 == 0:
                block = conv_unit(c, 2 * rng.randint(2, 5), self.dims, rng, groups=2)
                c = block[0].out_channels
            elif kind == "se":
                block = SqueezeExcite(c, self.dims, rng)
            elif kind == "shuffle" and c % 2 == 0:
                block = Shuffle(c, self.dims, rng)
            else:
                block = POOL[self.dims](2, ceil_mode=True) if kind == "pool" else nn.Identity()
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.flatten = rng.random() < 0.5
        spatial = self.features(torch.zeros(2, self.in_channels, *SPATIAL[self.dims])).shape[2:].numel()
        features = c * spatial if self.flatten else c
        hidden = rng.randint(4, 12)
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1) if self.flatten else x.mean(tuple(range(2, 2 + self.dims)))
        return self.head(x)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, self.in_channels, *SPATIAL[self.dims])
