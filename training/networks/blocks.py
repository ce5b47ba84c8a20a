"""Building blocks shared by the 2D and 3D U-Net and ResU-Net.

The dimensionality is chosen once, through the small dicts below keyed by ``spatial_dims``. Every
convolution is followed by ``InstanceNorm(affine=True)`` and ``LeakyReLU(0.01)`` (nnU-Net's defaults);
convolutions followed by a norm have no bias, since the norm removes it anyway.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE: dict[int, type[nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
NORM: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
AVG_POOL: dict[int, type[nn.Module]] = {2: nn.AvgPool2d, 3: nn.AvgPool3d}

NEGATIVE_SLOPE = 0.01


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise ``ValueError``."""
    if spatial_dims not in CONV:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def _norm(spatial_dims: int, channels: int) -> nn.Module:
    return NORM[spatial_dims](channels, affine=True)


class ConvNormAct(nn.Module):
    """Convolution (same padding) -> InstanceNorm -> LeakyReLU (the activation is optional).

    Maps ``(B, in_channels, *S)`` to ``(B, out_channels, *S / stride)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.conv = CONV[spatial_dims](
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = _norm(spatial_dims, out_channels)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DoubleConv(nn.Module):
    """Two 3^d ConvNormAct; the first one carries the stride (downsampling, nnU-Net style).

    Maps ``(B, in_channels, *S)`` to ``(B, out_channels, *S / stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, stride=stride)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ResidualBlock(nn.Module):
    """Two 3^d convolutions with a shortcut; the activation comes after the addition (ResNet-D, as
    dynamic-network-architectures' ``BasicBlockD``).

    The shortcut is ``nn.Identity`` when neither the stride nor the channel count changes. Otherwise it is
    an ``nn.Sequential`` of ``pool``, an average pooling with kernel = stride, where the stride changes
    (every input voxel counts, where a strided 1^d convolution would read one voxel in ``stride ** d``),
    and ``conv`` + ``norm``, a 1^d convolution and an InstanceNorm, where the channel count changes.

    The norm that ends the residual branch (``conv2.norm``) starts with weight and bias zero, so a fresh
    block computes ``LeakyReLU(shortcut(x))``: a deep stack starts close to the identity and the branches
    learn their corrections from there.

    Maps ``(B, in_channels, *S)`` to ``(B, out_channels, *S / stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, stride=stride)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, act=False)
        nn.init.zeros_(self.conv2.norm.weight)
        nn.init.zeros_(self.conv2.norm.bias)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stride != 1:
            layers["pool"] = AVG_POOL[spatial_dims](kernel_size=stride, stride=stride)
        if in_channels != out_channels:
            layers["conv"] = CONV[spatial_dims](in_channels, out_channels, kernel_size=1, bias=False)
            layers["norm"] = _norm(spatial_dims, out_channels)
        self.shortcut: nn.Module = nn.Sequential(layers) if layers else nn.Identity()
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {"conv": DoubleConv, "residual": ResidualBlock}
"""Encoder blocks by name: the only difference between U-Net and ResU-Net."""


class UpBlock(nn.Module):
    """Decoder stage: transposed conv (kernel 2, stride 2), concatenate the skip, then a DoubleConv.

    ``forward(x, skip)`` maps ``x (B, in_channels, *S)`` and ``skip (B, skip_channels, *2S)`` to
    ``(B, out_channels, *2S)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.up = CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)
        self.block = DoubleConv(spatial_dims, out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))
