"""The Faster R-CNN sampler: a random subset of each image's anchors enters the loss."""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.anchors.matching.base import BACKGROUND, IGNORE

__all__ = ["MatchSampler"]


class MatchSampler:
    """Keep ``size`` anchors per image, at most ``positive_fraction`` of them positive,
    chosen at random; every other anchor becomes :data:`IGNORE` (enters no loss).

    As in the Faster R-CNN paper (256 anchors, up to half positive) and torchvision's
    ``BalancedPositiveNegativeSampler``: ``min(positives, size * positive_fraction)``
    positives, then negatives (``BACKGROUND``) up to ``size`` in all. Works on any
    ``matches [B, A]``, so any head whose loss takes matches can use it (the
    :class:`~ssdlit.Detector` applies it after its matcher). Random numbers come
    from torch's default generator on the matches' device (or ``generator``): seeded
    runs sample the same anchors.
    """

    def __init__(self, size: int = 256, positive_fraction: float = 0.5) -> None:
        if int(size) < 1:
            raise ValueError(f"sampling size must be >= 1, got {size}")
        if not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.size = int(size)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, matches: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``matches [B, A]`` with the anchors left out of the sample set to IGNORE."""
        b, a = matches.shape
        positive, negative = matches >= 0, matches == BACKGROUND
        num_pos = positive.sum(1).clamp(max=int(self.size * self.positive_fraction))  # [B]
        num_neg = (self.size - num_pos).minimum(negative.sum(1))  # [B]
        # One random order per image: its positives first, then its negatives.
        r = torch.rand(b, a, generator=generator, device=matches.device)
        key = torch.where(positive, r + 2.0, torch.where(negative, r, -1.0))
        order = key.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(a, device=matches.device).expand(b, a)
        )  # [B, A] position of each anchor in its image's order
        total_pos = positive.sum(1, keepdim=True)
        keep = (positive & (rank < num_pos[:, None])) | (
            negative & (rank - total_pos < num_neg[:, None])
        )
        return torch.where(keep | ~(positive | negative), matches, IGNORE)

    def __repr__(self) -> str:
        return f"MatchSampler(size={self.size}, positive_fraction={self.positive_fraction})"
