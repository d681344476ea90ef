"""The architectures, in plain torch (no torchvision, nothing downloaded).

Every network has the same three parts, so that transfer learning can name them:

- `stem`: the first convolution(s);
- `blocks`: an ordered `nn.ModuleList` of stages; `last-k` fine-tuning trains the last k;
- `head`: global average pooling is done in `forward`, then `head` is the one linear layer
  (the classifier). `head` mode trains only this.

The backbone is `stem` + `blocks`: exactly the parameters whose names start with `stem.` or
`blocks.`. Each network takes `norm="batch"` or `norm="group"`; the GroupNorm variant has no
running statistics, so per-sample gradients (DP-SGD, Opacus) are well defined for it.
Activations are not in-place: Opacus' backward hooks forbid modifying a hooked output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("batch", "group")
_MAX_GROUPS = 32


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with gcd(channels, 32) groups (always divides channels)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, _MAX_GROUPS), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _conv_norm_act(
    norm: str, c_in: int, c_out: int, stride: int = 1, groups: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False),
        norm_layer(norm, c_out),
        act(),
    )


class TesseraNet(nn.Module):
    """Stem, blocks, pooled linear head: the shape every registered architecture has."""

    def __init__(
        self,
        stem: nn.Module,
        blocks: list[nn.Module],
        features: int,
        classes: int,
        pool: str = "mean",
    ):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(features, classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, classes)."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        # Reductions over H, W rather than adaptive pooling: one ONNX ReduceMean/ReduceMax.
        pooled = x.amax(dim=(2, 3)) if self.pool == "max" else x.mean(dim=(2, 3))
        return self.head(pooled)  # type: ignore[no-any-return]


def spot_cnn(channels: int, classes: int, norm: str) -> TesseraNet:
    """small-cnn's layers with global max pooling: a small bright or dark spot anywhere in
    the image (a nodule, a lesion) drives the pooled feature. Group normalisation followed
    by global mean pooling keeps mostly the shape of each feature map's distribution, which a
    spot covering a few percent of the pixels barely moves; the maximum keeps the spot."""
    net = small_cnn(channels, classes, norm)
    net.pool = "max"
    return net


def small_cnn(channels: int, classes: int, norm: str) -> TesseraNet:
    """Three conv stages of 16, 32, 64 channels; about 25k parameters. For tests and demos."""
    stem = _conv_norm_act(norm, channels, 16)
    blocks: list[nn.Module] = [
        nn.Sequential(nn.MaxPool2d(2), _conv_norm_act(norm, 16, 32)),
        nn.Sequential(nn.MaxPool2d(2), _conv_norm_act(norm, 32, 64)),
    ]
    return TesseraNet(stem, blocks, 64, classes)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and an identity (or 1x1) shortcut."""

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = norm_layer(norm, c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm_layer(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(F(x) + shortcut(x))."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # type: ignore[no-any-return]


def resnet18(channels: int, classes: int, norm: str) -> TesseraNet:
    """ResNet-18 (He et al. 2016): 7x7/2 stem, max pool, four stages of two basic blocks."""
    stem = nn.Sequential(
        nn.Conv2d(channels, 64, 7, 2, 3, bias=False),
        norm_layer(norm, 64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )
    blocks: list[nn.Module] = []
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks.append(
            nn.Sequential(BasicBlock(norm, c_in, c_out, stride), BasicBlock(norm, c_out, c_out, 1))
        )
        c_in = c_out
    return TesseraNet(stem, blocks, 512, classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual if same."""

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(c_in, hidden, 1, bias=False),
                norm_layer(norm, hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            norm_layer(norm, hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            norm_layer(norm, c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + body(x) where shapes allow, else body(x)."""
        out: torch.Tensor = self.body(x)
        return x + out if self.residual else out


# (expansion t, output channels c, repeats n, first stride s), Sandler et al. 2018, Table 2.
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def mobilenet_v2(channels: int, classes: int, norm: str) -> TesseraNet:
    """MobileNetV2 (width 1.0): seven stages of inverted residuals, then a 1x1 to 1280."""
    stem = _conv_norm_act(norm, channels, 32, stride=2, act=nn.ReLU6)
    blocks: list[nn.Module] = []
    c_in = 32
    for expand, c_out, repeats, stride in _MOBILENET_V2:
        stage = [
            InvertedResidual(norm, c_out if i else c_in, c_out, 1 if i else stride, expand)
            for i in range(repeats)
        ]
        blocks.append(nn.Sequential(*stage))
        c_in = c_out
    blocks.append(
        nn.Sequential(nn.Conv2d(c_in, 1280, 1, bias=False), norm_layer(norm, 1280), nn.ReLU6())
    )
    return TesseraNet(stem, blocks, 1280, classes)
