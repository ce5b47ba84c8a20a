"""U-Net and ResU-Net for 2D and 3D."""

from training.networks.blocks import ConvNormAct, DoubleConv, ResidualBlock, UpBlock
from training.networks.registry import NETWORKS, build_network, count_parameters
from training.networks.unet import DEFAULT_CHANNELS, UNet

__all__ = [
    "DEFAULT_CHANNELS",
    "NETWORKS",
    "ConvNormAct",
    "DoubleConv",
    "ResidualBlock",
    "UNet",
    "UpBlock",
    "build_network",
    "count_parameters",
]
