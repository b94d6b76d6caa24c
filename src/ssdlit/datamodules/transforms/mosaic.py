"""Mosaic: four training images in one sample, at the scale each would have alone.

YOLOv4's mosaic, in the variant that keeps every object's size: each of the four images
is resized to the output size ``(H, W)`` exactly as the rest of the pipeline would resize
it on its own (stretched, like the evaluation pipeline), the four tiles meet at a random
centre ``(cy, cx)`` of the output, and the output shows the part of each tile that falls
in its quadrant: the bottom-right of the first image in the top-left quadrant, the
bottom-left of the second in the top-right, the top-right of the third in the bottom-left,
the top-left of the fourth in the bottom-right. The quadrants cover the output, so nothing
is filled.

A box cut by its quadrant's edges becomes its visible part; it is kept when its centre
lies in the quadrant (the rule of the SSD crop, :class:`~.geometric.MinIoURandomCrop`)
and the visible part is at least ``min_size`` pixels a side, else it is dropped with its
label. A sample built this way holds the
objects (and the background) of four images: more objects and more contexts per step,
objects cut at the edges like truncated ones.

The result then runs through the split's pipeline as any image would (``ssd``:
photometric distortion, zoom out, min-IoU crop, flip, resize).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from ssdlit.datamodules.transforms.geometric import centres_inside

__all__ = ["Mosaic", "MosaicPart"]


class MosaicPart(NamedTuple):
    """One image and its annotations: ``image`` uint8 ``[H0, W0, C]``, ``boxes`` float
    ``[N, 4]`` xyxy absolute pixels of ``image``, ``labels`` ``[N]``, ``difficult`` ``[N]``."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass(frozen=True)
class Mosaic:
    """Four images in one (see the module docstring).

    Args:
        size: the output ``(H, W)`` in pixels (the network input).
        p: the probability that a training sample is a mosaic (the dataset draws it).
        center: the range of the tiles' meeting point, as a fraction of the output's height
            and width (drawn uniformly and independently along each axis).
        min_size: the least visible width and height of a kept box, in output pixels.
    """

    size: tuple[int, int]
    p: float = 0.5
    center: tuple[float, float] = (0.25, 0.75)
    min_size: float = 1.0

    def __post_init__(self) -> None:
        h, w = (int(v) for v in self.size)
        if min(h, w) < 2:
            raise ValueError(f"mosaic size must be at least 2x2 pixels, got {self.size!r}")
        object.__setattr__(self, "size", (h, w))
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"mosaic p must be in [0, 1], got {self.p!r}")
        lo, hi = (float(v) for v in self.center)
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"mosaic center must satisfy 0 < low <= high < 1, got {self.center!r}")
        object.__setattr__(self, "center", (lo, hi))

    def sample_center(self, rng: np.random.Generator) -> tuple[int, int]:
        """The tiles' meeting point ``(cy, cx)``, whole pixels strictly inside the output."""
        h, w = self.size
        lo, hi = self.center
        cy = int(np.clip(round(rng.uniform(lo, hi) * h), 1, h - 1))
        cx = int(np.clip(round(rng.uniform(lo, hi) * w), 1, w - 1))
        return cy, cx

    def __call__(self, parts: Sequence[MosaicPart], rng: np.random.Generator) -> MosaicPart:
        """The mosaic of four ``parts`` around a centre drawn from ``rng``."""
        return self.compose(parts, self.sample_center(rng))

    def compose(self, parts: Sequence[MosaicPart], center: tuple[int, int]) -> MosaicPart:
        """The mosaic of four ``parts`` whose tiles meet at ``center = (cy, cx)``.

        Returns the ``[H, W, C]`` image and the kept boxes (xyxy output pixels, float32),
        labels and difficult flags, in the order of ``parts`` and of their rows.
        """
        if len(parts) != 4:
            raise ValueError(f"a mosaic takes 4 images, got {len(parts)}")
        h, w = self.size
        cy, cx = (int(v) for v in center)
        if not (0 < cy < h and 0 < cx < w):
            raise ValueError(f"mosaic center {center!r} is not inside the {h}x{w} output")
        channels = {p.image.shape[2] if p.image.ndim == 3 else 1 for p in parts}
        if len(channels) != 1:
            raise ValueError(f"mosaic images must have the same channels, got {sorted(channels)}")
        first = parts[0].image
        out = np.empty((h, w, *first.shape[2:]), dtype=first.dtype)
        # (tile offset, visible region) per quadrant: TL, TR, BL, BR; regions y0, y1, x0, x1
        offsets = ((cy - h, cx - w), (cy - h, cx), (cy, cx - w), (cy, cx))
        regions = ((0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w))
        boxes, labels, difficult = [], [], []
        for part, (oy, ox), (y0, y1, x0, x1) in zip(parts, offsets, regions, strict=True):
            tile = cv2.resize(part.image, (w, h), interpolation=cv2.INTER_LINEAR)
            if tile.ndim < out.ndim:
                tile = tile[..., None]
            out[y0:y1, x0:x1] = tile[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            h0, w0 = part.image.shape[:2]
            b = np.asarray(part.boxes, dtype=np.float32).reshape(-1, 4)
            b = b * np.array([w / w0, h / h0, w / w0, h / h0], dtype=np.float32)
            b = b + np.array([ox, oy, ox, oy], dtype=np.float32)
            seen = np.empty_like(b)
            seen[:, 0::2] = b[:, 0::2].clip(x0, x1)
            seen[:, 1::2] = b[:, 1::2].clip(y0, y1)
            bw, bh = seen[:, 2] - seen[:, 0], seen[:, 3] - seen[:, 1]
            keep = (bw >= self.min_size) & (bh >= self.min_size)
            keep &= centres_inside(np.array([[x0, y0, x1, y1]], dtype=np.float32), b)[0]
            boxes.append(seen[keep])
            labels.append(np.asarray(part.labels)[keep])
            difficult.append(np.asarray(part.difficult, dtype=bool)[keep])
        return MosaicPart(
            out,
            np.concatenate(boxes).astype(np.float32, copy=False),
            np.concatenate(labels),
            np.concatenate(difficult),
        )
