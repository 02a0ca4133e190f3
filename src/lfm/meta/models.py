"""Small networks for meta-learning benchmarks.

`MLP` is the regressor of MAML (Finn et al. 2017, arXiv 1703.03400, Sec. 5.1): two hidden layers
of 40 ReLU units. Its last layer is named `head`, the subset ANIL adapts.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Hidden ReLU layers (`body`) and a linear `head`.

    Args:
        d_in: input features (for images: C·H·W).
        d_out: outputs (1 for regression, N ways, or an embedding size for ProtoNets).
        hidden: widths of the hidden layers.
        image: flatten (B, C, H, W) inputs to (B, C·H·W) first.
    """

    def __init__(
        self, d_in: int = 1, d_out: int = 1, hidden: Sequence[int] = (40, 40), image: bool = False
    ):
        super().__init__()
        self.image = image
        layers: list[nn.Module] = []
        width = d_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=-3) if self.image else x  # (B, C, H, W) -> (B, C·H·W)
        return self.head(self.body(x))
