"""The built-in model zoo: the architectures the StructADMM paper prunes, as plain torch modules.

This file owns the layer structure and weight initialisation of every built-in model and
registers one :class:`~structadmm.models.registry.ModelSpec` per model at import time.
There is no torchvision dependency; where torchvision has the model, the layout (and the
``state_dict`` key names) match it, so parameter counts are identical and pretrained
torchvision weights load as is.

Every model is ``torch.fx.symbolic_trace``-able and built only from standard modules
(conv, batch norm, ReLU/ReLU6, pooling, dropout, linear) with residuals as ``a + b``, so the
pruning and surgery stages can reason about the graph without per-model code.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence, Union

import torch
from torch import nn

from ..layers import CONVS
from .registry import ModelSpec, register

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = nn.ReLU,
    dims: int = 2,
) -> list[nn.Module]:
    """Bias-free conv + BN (+ activation) as a flat list, so callers can nest or splice it."""
    layers: list[nn.Module] = [
        _CONV[dims](
            in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        _BN[dims](out_ch),
    ]
    if act is not None:
        layers.append(act())
    return layers


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs, unit/zero BN, N(0, 0.01) linears; deterministic under manual_seed."""
    for m in model.modules():
        if isinstance(m, CONVS):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class _Classifier(nn.Module):
    """features -> pool -> flatten -> classifier, the shape shared by the plain CNNs."""

    def __init__(
        self, features: nn.Module, avgpool: nn.Module | None, classifier: nn.Module
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # Small fixed-size-input nets skip the pool rather than carry an nn.Identity node.
        if self.avgpool is not None:
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


# --- LeNet-5 / AlexNet / VGG ---------------------------------------------------------------


def lenet5(num_classes: int = 10) -> nn.Module:
    # padding=2 gives 28x28 MNIST the original 32x32 geometry, so fc1 sees 16x5x5 = 400.
    features = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )  # fmt: skip
    return init_weights(_Classifier(features, None, classifier))


def alexnet_cifar(num_classes: int = 10) -> nn.Module:
    # 3x3 kernels and three 2x2 pools instead of the 11x11/stride-4 stem, which would
    # shrink a 32x32 image to nothing; BN lets it train without LRN or careful lr tuning.
    features = nn.Sequential(
        *_conv_bn(3, 64, 3), nn.MaxPool2d(2),
        *_conv_bn(64, 192, 3), nn.MaxPool2d(2),
        *_conv_bn(192, 384, 3),
        *_conv_bn(384, 256, 3),
        *_conv_bn(256, 256, 3), nn.MaxPool2d(2),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 4 * 4, 1024), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, num_classes),
    )  # fmt: skip
    return init_weights(_Classifier(features, None, classifier))


def alexnet(num_classes: int = 1000) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, num_classes),
    )  # fmt: skip
    return init_weights(_Classifier(features, nn.AdaptiveAvgPool2d((6, 6)), classifier))


_VGG16: Sequence[Union[int, str]] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def vgg16_bn(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            # torchvision's VGG keeps the conv bias even before BN; kept for equal layouts.
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            in_ch = int(v)
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )  # fmt: skip
    return init_weights(
        _Classifier(nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7)), classifier)
    )


# --- ResNets ---------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        # Stride on the 3x3 conv (torchvision's "ResNet v1.5"), not on the first 1x1.
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_Block = Union[type[BasicBlock], type[Bottleneck]]


def _make_stage(
    block: _Block, in_ch: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """One ResNet stage; a conv1x1+BN shortcut (option B) wherever the shape changes."""
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride, act=None))
    layers = [block(in_ch, planes, stride, downsample)]
    layers += [block(out_ch, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_ch


class ResNet(nn.Module):
    """ImageNet ResNet in torchvision's layout (attribute names included)."""

    def __init__(self, block: _Block, layers: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        ch = 64
        self.layer1, ch = _make_stage(block, ch, 64, layers[0], 1)
        self.layer2, ch = _make_stage(block, ch, 128, layers[1], 2)
        self.layer3, ch = _make_stage(block, ch, 256, layers[2], 2)
        self.layer4, ch = _make_stage(block, ch, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): three stages of n basic blocks, 16/32/64 wide."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        ch = 16
        self.layer1, ch = _make_stage(BasicBlock, ch, 16, n, 1)
        self.layer2, ch = _make_stage(BasicBlock, ch, 32, n, 2)
        self.layer3, ch = _make_stage(BasicBlock, ch, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- MobileNetV2 -----------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(nn.Sequential(*_conv_bn(in_ch, hidden, 1, act=nn.ReLU6)))
        layers += [
            nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)),
            *_conv_bn(hidden, out_ch, 1, act=None),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # use_res_connect is fixed at construction, so fx traces this as a static branch.
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper's Table 2.
_MOBILENETV2: Sequence[tuple[int, int, int, int]] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    # Width 1.0 only: every channel count above is already a multiple of 8, so
    # torchvision's _make_divisible rounding is a no-op and is left out.
    layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, 2, act=nn.ReLU6))]
    in_ch = 32
    for t, c, n, s in _MOBILENETV2:
        for i in range(n):
            layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
            in_ch = c
    layers.append(nn.Sequential(*_conv_bn(in_ch, 1280, 1, act=nn.ReLU6)))
    classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
    return init_weights(
        _Classifier(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), classifier)
    )


# --- C3D -------------------------------------------------------------------------------------


def c3d_small(num_classes: int = 101) -> nn.Module:
    # The first pool keeps the time axis (1x2x2), as in C3D, so 8-frame clips are not
    # collapsed before the deeper layers see any temporal structure.
    conv3d = partial(_conv_bn, kernel_size=3, dims=3)
    features = nn.Sequential(
        *conv3d(3, 32), nn.MaxPool3d((1, 2, 2)),
        *conv3d(32, 64), nn.MaxPool3d(2),
        *conv3d(64, 128),
        *conv3d(128, 128), nn.MaxPool3d(2),
        *conv3d(128, 256),
    )  # fmt: skip
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256, num_classes))
    return init_weights(_Classifier(features, nn.AdaptiveAvgPool3d(1), classifier))


def mnist1d_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """1-D CNN for MNIST-1D (1x40): w-2w-pool-2w-pool-4w-pool convs, flatten (4w x 5), linear classifier."""
    conv1d = partial(_conv_bn, kernel_size=3, dims=1)
    features = nn.Sequential(
        *_conv_bn(1, width, 5, dims=1),
        *conv1d(width, 2 * width), nn.MaxPool1d(2),
        *conv1d(2 * width, 2 * width), nn.MaxPool1d(2),
        *conv1d(2 * width, 4 * width), nn.MaxPool1d(2),
    )  # fmt: skip
    return init_weights(nn.Sequential(features, nn.Flatten(), nn.Linear(4 * width * 5, num_classes)))


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: patches -> class token + position embedding -> pre-norm blocks -> class-token head."""

    def __init__(self, image: int = 16, patch: int = 4, channels: int = 1, dim: int = 64, depth: int = 4,
                 heads: int = 8, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --- registration ----------------------------------------------------------------------------

_IMAGENET = (3, 224, 224)
_CIFAR = (3, 32, 32)

for _spec in (
    ModelSpec("lenet5", lenet5, (1, 28, 28), "LeNet-5 for MNIST", 10),
    ModelSpec("alexnet-cifar", alexnet_cifar, _CIFAR, "AlexNet-style CNN with BN for CIFAR-10", 10),
    ModelSpec("alexnet", alexnet, _IMAGENET, "AlexNet for ImageNet (torchvision layout)", 1000),
    ModelSpec("vgg16", vgg16_bn, _IMAGENET, "VGG-16 with BN (torchvision vgg16_bn)", 1000),
    ModelSpec(
        "resnet18", partial(ResNet, BasicBlock, (2, 2, 2, 2)), _IMAGENET,
        "ResNet-18 for ImageNet (torchvision layout)", 1000,
    ),
    ModelSpec(
        "resnet50", partial(ResNet, Bottleneck, (3, 4, 6, 3)), _IMAGENET,
        "ResNet-50 for ImageNet (torchvision layout, v1.5)", 1000,
    ),
    ModelSpec(
        "resnet20", partial(CifarResNet, 20), _CIFAR,
        "ResNet-20 for CIFAR-10 (option-B shortcuts)", 10,
    ),
    ModelSpec(
        "resnet56", partial(CifarResNet, 56), _CIFAR,
        "ResNet-56 for CIFAR-10 (option-B shortcuts)", 10,
    ),
    ModelSpec("mobilenetv2", mobilenet_v2, _IMAGENET, "MobileNetV2 1.0 (torchvision layout)", 1000),
    ModelSpec(
        "vit-digits", VisionTransformer, (1, 16, 16),
        "ViT for the built-in digits (4x4 patches, 4 blocks of 8 heads, width 64, MLP 256)", 10,
    ),
    ModelSpec("mnist1d-cnn", mnist1d_cnn, (1, 40), "4-conv 1-D CNN for the built-in MNIST-1D data (1x40)", 10),
    ModelSpec("c3d-small", c3d_small, (3, 8, 56, 56), "Small C3D for UCF101 8-frame clips", 101),
):  # fmt: skip
    register(_spec)
del _spec
