"""A small U-Net: the Image-to-Perturbation transform and the inversion attack's network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Small U-Net: ``levels`` resolutions with widths ``width * 2**i``, max-pool down, bilinear up
    to the skip's size (odd sizes such as 7x7 work), concatenated skips, 1x1 head.

    The paper's transform has 5 resolutions of 64..1024 channels (about 31M parameters); on a
    2-core CPU we use 3 resolutions of 16, 32, 64 channels by default (about 0.1M).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W) logits (apply a sigmoid for images).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, levels: int = 3) -> None:
        super().__init__()
        if levels < 1 or width < 1:
            raise ValueError(f"UNet: expected levels >= 1 and width >= 1, got {levels}, {width}")
        widths = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])]
                                  + [_double_conv(widths[i - 1], widths[i]) for i in range(1, levels)])
        self.up = nn.ModuleList([_double_conv(widths[i] + widths[i - 1], widths[i - 1])
                                 for i in range(levels - 1, 0, -1)])
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "width": width, "levels": levels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
