"""Name -> network registry: the model card's ``architecture`` and ``network`` fields rebuild a model."""

from __future__ import annotations

from functools import partial

from torch import nn

from training.networks.unet import UNet

NETWORKS: dict[str, partial] = {
    "unet": partial(UNet, block="conv"),
    "resunet": partial(UNet, block="residual"),
}
"""Valid architecture names; each is :class:`UNet` with its encoder block fixed."""


def build_network(name: str, **kwargs) -> UNet:
    """Build the network registered as ``name`` with ``kwargs`` (e.g. a card's ``network`` field).

    ``kwargs`` may repeat ``block`` (as :meth:`UNet.config` does) only if it agrees with ``name``.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(sorted(NETWORKS))}")
    factory = NETWORKS[name]
    block = kwargs.pop("block", factory.keywords["block"])
    if block != factory.keywords["block"]:
        raise ValueError(f"network {name!r} uses block {factory.keywords['block']!r}, got block={block!r}")
    return factory(**kwargs)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
