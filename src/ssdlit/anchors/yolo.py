"""YOLOv3 priors: a few absolute box shapes per level, one box per shape in each cell."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.anchors.base import AnchorGenerator, PerLevel
from ssdlit.registry import ANCHORS

__all__ = ["COCO_YOLOV3_PRIORS", "YoloAnchorGenerator"]

#: The 9 YOLOv3 COCO priors (width, height) in pixels of a 416 x 416 input, per level
#: from the finest (stride 8) to the coarsest (stride 32).
COCO_YOLOV3_PRIORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)


@ANCHORS.register("yolo")
class YoloAnchorGenerator(AnchorGenerator):
    """YOLOv3 anchors: each cell of a level holds one box per prior of that level.

    Args:
        image_size: input ``(H, W)`` in pixels.
        priors: per level a list of ``(width, height)`` in pixels (default: the 9 COCO
            priors of YOLOv3, defined for a 416 x 416 input).
        strides: per level cell size in pixels (8, 16, 32).
        prior_image_size: the input size ``(H, W)`` the priors were measured on; when
            it differs from ``image_size`` the priors are rescaled to it. ``None``
            means the priors are already in ``image_size`` pixels.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (416, 416),
        priors: Sequence[Sequence[Sequence[float]]] = COCO_YOLOV3_PRIORS,
        strides: PerLevel | None = (8, 16, 32),
        offsets: PerLevel | None = None,
        clip: bool | str = False,
        prior_image_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(image_size, steps=strides, offsets=offsets, clip=clip)
        sy = sx = 1.0
        if prior_image_size is not None:
            sy = self.image_size[0] / float(prior_image_size[0])
            sx = self.image_size[1] / float(prior_image_size[1])
        levels = []
        for level in priors:
            shapes = [(float(w) * sx, float(h) * sy) for w, h in level]
            if not shapes or any(w <= 0 or h <= 0 for w, h in shapes):
                raise ValueError(f"each level needs positive (w, h) priors, got {level}")
            levels.append(shapes)
        self.priors = levels

    @property
    def num_levels(self) -> int:
        return len(self.priors)

    def cell_sizes(self, level: int) -> Tensor:
        return torch.tensor(self.priors[level], dtype=torch.float64)
