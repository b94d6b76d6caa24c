"""RetinaNet anchors: several octave scales and aspect ratios per pyramid level."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.anchors.base import AnchorGenerator, PerLevel
from ssdlit.registry import ANCHORS

__all__ = ["RetinaAnchorGenerator"]


@ANCHORS.register("retina")
class RetinaAnchorGenerator(AnchorGenerator):
    """RetinaNet anchors (Lin et al. 2017).

    Per level a base size (32 to 512 pixels on strides 8 to 128); per cell one box
    per (aspect ratio, octave scale) pair, ratio-major: for each ratio r (width /
    height) the scales 2^0, 2^(1/3), 2^(2/3): ``w = size * scale * sqrt(r)``,
    ``h = size * scale / sqrt(r)``. Centres at ``(offset + i) * stride``, offset 0.5.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (512, 512),
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        strides: PerLevel | None = (8, 16, 32, 64, 128),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        offsets: PerLevel | None = None,
        clip: bool | str = False,
    ) -> None:
        super().__init__(image_size, steps=strides, offsets=offsets, clip=clip)
        if any(s <= 0 for s in sizes) or any(r <= 0 for r in aspect_ratios):
            raise ValueError("sizes and aspect ratios must be positive")
        if any(s <= 0 for s in scales):
            raise ValueError("scales must be positive")
        self.sizes = [float(s) for s in sizes]
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.scales = [float(s) for s in scales]

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def cell_sizes(self, level: int) -> Tensor:
        base = self.sizes[level]
        wh = [
            (base * s * math.sqrt(r), base * s / math.sqrt(r))
            for r in self.aspect_ratios
            for s in self.scales
        ]
        return torch.tensor(wh, dtype=torch.float64)
