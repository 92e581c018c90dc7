"""Plain (unkeyed) CIFAR-style classifiers: VGG16-BN, pre-activation ResNets and a compact net.

Every model here is an :class:`torch.nn.Sequential` of *named* stages whose forward pass is
exactly "apply the children in order". :func:`models.keyed.keyed` relies on that: it walks the
children in order and builds a keyed twin with the same child names, so the twin's
``state_dict`` has the same keys as the plain model's. The only non-sequential block is
:class:`PreActBlock` (a residual block), which the keyed converter handles explicitly.

All models take ``in_channels`` (1 for mono, 3 for RGB, 4 for packed CFA planes) and
``num_classes``. Module names follow the usual CIFAR code bases (``features`` / ``classifier``
for VGG; ``conv1``, ``layer1..3``, ``bn``, ``fc`` with ``downsample.0`` shortcuts for
PreResNet, as in the pytorch-classification PreResNet).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = [
    "MODEL_NAMES",
    "VGG16_CFG",
    "CompactNet",
    "PreActBlock",
    "PreResNet",
    "VGG",
    "build_model",
    "compact",
    "preresnet",
    "vgg16_bn",
]

#: VGG16 layout: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan_out), unit/zero BatchNorm, default Linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VGG(nn.Sequential):
    """CIFAR-style VGG with BatchNorm: ``features`` -> ``flatten`` -> ``classifier`` (Linear).

    Every conv is 3x3, stride 1, padding 1, followed by BatchNorm2d and ReLU; "M" is a 2x2
    max-pool. With :data:`VGG16_CFG` (13 convs, 5 pools) a 32x32 input ends as a 512 x 1 x 1 map.

    Args:
        cfg: conv widths and "M" markers.
        in_channels: input channels.
        num_classes: logits.
        input_size: input height = width; the classifier takes ``512 * (input_size / 2**pools)**2``
            features (a larger final map is flattened, so the keyed twin permutes its columns).

    Shape:
        (B, in_channels, input_size, input_size) -> (B, num_classes).
    """

    def __init__(self, cfg: tuple[int | str, ...] = VGG16_CFG, in_channels: int = 3,
                 num_classes: int = 10, input_size: int = 32) -> None:
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        _check_positive("input_size", input_size)
        pools = sum(1 for v in cfg if v == "M")
        if input_size % (2**pools):
            raise ValueError(f"input_size: expected a multiple of {2**pools} ({pools} 2x2 pools), "
                             f"got {input_size}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        side = input_size // 2**pools
        super().__init__(OrderedDict([
            ("features", nn.Sequential(*layers)),
            ("flatten", nn.Flatten(1)),
            ("classifier", nn.Linear(c * side * side, num_classes)),
        ]))
        _init_weights(self)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    The shortcut is the identity, or ``downsample`` (a strided 1x1 conv, no BN) applied to the
    block *input* when the stride or width changes (pytorch-classification layout).

    Shape:
        (B, inplanes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False))
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(x))
        out = self.conv1(out)
        out = self.relu(self.bn2(out))
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        return out + residual


class PreResNet(nn.Sequential):
    """CIFAR pre-activation ResNet of depth ``6n + 2`` (20, 56, 110, ...), widths 16/32/64.

    Stages: ``conv1`` (3x3, 16) -> ``layer1`` (n blocks, 16) -> ``layer2`` (n blocks, 32,
    stride 2) -> ``layer3`` (n blocks, 64, stride 2) -> ``bn`` -> ``relu`` -> ``avgpool``
    (global) -> ``flatten`` -> ``fc``. Depth 110 has about 1.70M parameters.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes) for any H, W >= 1.
    """

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10) -> None:
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n + 2 with n >= 1 (20, 56, 110, ...), got {depth!r}")
        n = (depth - 2) // 6
        stages: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(in_channels, 16, 3, padding=1, bias=False))]
        inplanes = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for b in range(n):
                blocks.append(PreActBlock(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes
            stages.append((f"layer{i}", nn.Sequential(*blocks)))
        stages += [
            ("bn", nn.BatchNorm2d(64)),
            ("relu", nn.ReLU(inplace=True)),
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("fc", nn.Linear(64, num_classes)),
        ]
        super().__init__(OrderedDict(stages))
        self.depth = depth
        _init_weights(self)


class CompactNet(nn.Sequential):
    """Small VGG-style net that trains on a 2-core CPU in minutes (about 94k parameters).

    ``features``: three blocks conv3x3 (32, 64, 128) + BN + ReLU + 2x2 max-pool; then ``avgpool``
    (global), ``flatten`` and ``fc``. Works on 28x28 and 32x32 inputs (any size >= 8).

    Shape:
        (B, in_channels, H, W) -> (B, num_classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 64, 128)) -> None:
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        super().__init__(OrderedDict([
            ("features", nn.Sequential(*layers)),
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("fc", nn.Linear(c, num_classes)),
        ]))
        _init_weights(self)


def vgg16_bn(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> VGG:
    """CIFAR VGG16 with BatchNorm (13 convs, 5 max-pools, one Linear)."""
    return VGG(VGG16_CFG, in_channels, num_classes, input_size)


def preresnet(depth: int, in_channels: int = 3, num_classes: int = 10) -> PreResNet:
    """CIFAR pre-activation ResNet of the given depth (6n + 2)."""
    return PreResNet(depth, in_channels, num_classes)


def compact(in_channels: int = 1, num_classes: int = 10) -> CompactNet:
    """The compact CPU-trainable net."""
    return CompactNet(in_channels, num_classes)


MODEL_NAMES: tuple[str, ...] = ("vgg16_bn", "preresnet20", "preresnet56", "preresnet110", "compact")


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Sequential:
    """Build a plain model by name (one of :data:`MODEL_NAMES`).

    ``kwargs`` go to the constructor (``input_size`` for ``vgg16_bn``).
    """
    if name == "vgg16_bn":
        return vgg16_bn(in_channels, num_classes, **kwargs)
    if name in ("preresnet20", "preresnet56", "preresnet110"):
        return preresnet(int(name[len("preresnet"):]), in_channels, num_classes, **kwargs)
    if name == "compact":
        return compact(in_channels, num_classes, **kwargs)
    raise ValueError(f"model name: expected one of {', '.join(MODEL_NAMES)}, got {name!r}")
