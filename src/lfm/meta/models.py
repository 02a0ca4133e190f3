"""Small networks for meta-learning benchmarks.

`MLP` is the regressor of MAML (Finn et al. 2017, arXiv 1703.03400, Sec. 5.1): two hidden layers
of 40 ReLU units. `ConvNet` is the few-shot classifier of MAML Sec. 5.2 (after Vinyals et al.
2016, arXiv 1606.04080): four blocks of 3×3 convolution, BatchNorm, ReLU and 2×2 max-pooling.
BatchNorm always normalises by the statistics of the batch it is given (no running statistics),
as the MAML code does at train and test time: an episode is normalised transductively, and the
network holds no buffers, so a meta-batch runs under `vmap`. That normalisation is written out
(`BatchStatNorm2d`) rather than taken from `nn.BatchNorm2d`: under `torch.func.vmap` the fused
batch-norm backward gives wrong second-order meta-gradients (torch 2.13), while the plain
mean/variance ops are exact. The last layer of both is named `head`, the subset ANIL adapts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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

    def functional(self, params: dict[str, Tensor], x: Tensor) -> Tensor | None:
        """`forward` with the weights in `params` (names as `named_parameters`; one not given is
        the module's own, as `functional_call` takes it), written out so that an inner step
        costs no module swapping (`lfm.meta.functional.forward` uses it); None when a layer is
        no longer a Linear or ReLU (a replaced head), to take the general path."""
        x = x.flatten(start_dim=-3) if self.image else x
        for name, layer in [*self.body.named_children(), ("head", self.head)]:
            key = name if name == "head" else f"body.{name}"
            if type(layer) is nn.Linear:
                w, b = params.get(f"{key}.weight", layer.weight), params.get(f"{key}.bias")
                x = F.linear(x, w, b if b is not None or layer.bias is None else layer.bias)
            elif type(layer) is nn.ReLU:
                x = F.relu(x)
            else:
                return None
        return x


class BatchStatNorm2d(nn.Module):
    """BatchNorm over (N, H, W) by the batch's own statistics, with affine `weight` and `bias`.

    The same maths and parameter names as `nn.BatchNorm2d(c, track_running_stats=False)`, from
    plain tensor ops, so that meta-gradients through it stay exact under `vmap`.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        centred = x - mean
        # two passes, the centred values reused: torch's one-pass `var` (Welford) took 13× the
        # time of `mean` on a (32, 5, 32, 28, 28) meta-batch, and its backward recentres
        var = (centred * centred).mean((0, 2, 3), keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return centred * scale + self.bias[:, None, None]


def conv_block(c_in: int, c_out: int, pool: bool, running: bool = False) -> nn.Sequential:
    """3×3 conv, BatchNorm (batch statistics unless `running`), ReLU, 2×2 max-pool if `pool`."""
    norm = nn.BatchNorm2d(c_out) if running else BatchStatNorm2d(c_out)
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), norm, nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The 4-block convolutional learner of MAML Sec. 5.2, sized for small images.

    A block pools only while the feature map is at least 2×2, so 8×8 digits go 8→4→2→1→1 and
    28×28 images 28→14→7→3→1; the head sees `width` features either way.

    Args:
        n_out: outputs (N ways, or an embedding size for ProtoNets).
        width: filters per block (MAML: 64 on Omniglot, 32 on MiniImagenet).
        blocks: number of conv blocks.
        size: input height (= width) in pixels.
        channels: input channels.
        running: keep BatchNorm running statistics (a conventionally trained classifier, such as
            the pool models of data-free meta-learning, whose statistics model inversion matches).
    """

    def __init__(
        self,
        n_out: int = 5,
        width: int = 32,
        blocks: int = 4,
        size: int = 28,
        channels: int = 1,
        running: bool = False,
    ):
        super().__init__()
        layers, c = [], channels
        for _ in range(blocks):
            layers.append(conv_block(c, width, pool=size >= 2, running=running))
            size, c = (size // 2 if size >= 2 else size), width
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(width * size * size, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, C, H, W) -> (B, n_out)
