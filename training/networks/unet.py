"""One U-Net for 2D and 3D, with plain (U-Net) or residual (ResU-Net) encoder blocks.

Diagram for ``channels=(c0, c1, c2, c3)`` (depth 4)::

    image -> enc0 (c0, S) ------------------------------------ up1 -> head -> logits (3, S)
               enc1 (c1, S/2, stride-2 first conv) ---------- up2
                 enc2 (c2, S/4) ---------------------------- up3
                   enc3 (c3, S/8)  (bottleneck) -------------^

Downsampling is a stride-2 first convolution in each lower encoder stage (nnU-Net style, no pooling);
upsampling a transposed convolution (kernel 2, stride 2). The decoder is the same for both encoder blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.networks.blocks import BLOCKS, CONV, NEGATIVE_SLOPE, UpBlock, check_spatial_dims

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)


class UNet(nn.Module):
    """U-Net (``block="conv"``) or ResU-Net (``block="residual"``) returning per-voxel logits.

    Args:
        spatial_dims: 2 (axial slices ``(B, C, X, Y)``) or 3 (volumes ``(B, C, X, Y, Z)``).
        in_channels: input channels (4 modalities).
        out_channels: output logits per voxel (3: WT, TC, ET; apply a sigmoid outside the graph).
        channels: width of each encoder stage, top to bottom; ``depth = len(channels)``.
        block: encoder block, ``"conv"`` (two 3^d convs) or ``"residual"`` (two convs with a shortcut).

    Input ``(B, in_channels, *S)`` with every spatial size divisible by :attr:`size_divisor`
    ``= 2 ** (depth - 1)``; output ``(B, out_channels, *S)`` logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        *,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        block: str = "conv",
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive widths, got {list(channels)}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.channels = channels
        self.block = block

        encoder_block = BLOCKS[block]
        widths_in = (self.in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            encoder_block(spatial_dims, c_in, c_out, stride=1 if level == 0 else 2)
            for level, (c_in, c_out) in enumerate(zip(widths_in, channels))
        )
        # Decoder from the bottom up: up[i] takes level i + 1 up to level i.
        self.decoder = nn.ModuleList(
            UpBlock(spatial_dims, channels[level + 1], channels[level], channels[level])
            for level in reversed(range(len(channels) - 1))
        )
        self.head = CONV[spatial_dims](channels[0], self.out_channels, kernel_size=1)
        self._init_weights()

    @property
    def depth(self) -> int:
        """Number of resolution levels (``len(channels)``)."""
        return len(self.channels)

    @property
    def size_divisor(self) -> int:
        """Every input spatial size must be a multiple of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    @property
    def architecture(self) -> str:
        """Registry name: ``"unet"`` or ``"resunet"``."""
        return "unet" if self.block == "conv" else "resunet"

    def config(self) -> dict:
        """JSON-ready keyword arguments that rebuild this network: ``UNet(**net.config())``."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "block": self.block,
        }

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``shape`` is ``(B, in_channels, *S)`` with S divisible by the divisor."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.spatial_dims + 2 or shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('XYZ'[: self.spatial_dims])}) "
                f"for a {self.spatial_dims}D network, got shape {shape}"
            )
        spatial = shape[2:]
        if any(s % self.size_divisor for s in spatial):
            raise ValueError(
                f"input spatial size {spatial} must be divisible by {self.size_divisor} "
                f"(2 ** (depth - 1) for depth {self.depth}); pad or crop each axis to a multiple of {self.size_divisor}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S)`` -> ``(B, out_channels, *S)`` logits."""
        if not torch.jit.is_tracing():
            self.check_input(x.shape)
        skips = []
        for encode in self.encoder:  # x0 .. x_{depth-1}, halving the size below the top level
            x = encode(x)
            skips.append(x)
        x = skips.pop()  # bottleneck
        for up in self.decoder:  # u_{depth-1} .. u1, doubling the size
            x = up(x, skips.pop())
        return self.head(x)

    def _init_weights(self) -> None:
        """He initialisation for LeakyReLU (as nnU-Net), zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
