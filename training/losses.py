"""Region losses: soft Dice plus binary cross-entropy on the WT, TC, ET channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """Mean of (1 - soft Dice) over the region channels plus binary cross-entropy.

    The Dice is computed over the whole batch per channel ("batch Dice", as nnU-Net does), so that a patch
    without tumour does not produce a degenerate per-sample Dice.

    Args:
        logits: ``(B, 3, *spatial)`` raw network outputs (any float dtype; computed in float32).
        target: ``(B, 3, *spatial)`` region masks in {0, 1}.

    Returns:
        A scalar tensor.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    logits = logits.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    dims = (0,) + tuple(range(2, logits.ndim))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return bce + (1.0 - dice).mean()
