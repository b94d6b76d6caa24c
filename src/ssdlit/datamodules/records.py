"""The parsed form of every annotation source: one :class:`Record` per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Record"]


@dataclass
class Record:
    """One image and its ground truth, as parsed (before any augmentation).

    Attributes:
        path: the image file.
        width, height: image size in pixels, as the annotation states (validated
            against the file).
        boxes: float32 ``[N, 4]`` xyxy in absolute pixels of the original image.
        labels: int64 ``[N]`` in 1..C (0 is background and never a label).
        difficult: bool ``[N]``; difficult boxes are kept for evaluation, where the
            VOC metric ignores them.
        image_id: unique id of the image within its dataset.
        source: where the record came from (annotation file, CSV path), for messages.
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    image_id: str
    difficult: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(
                f"{self.source or self.path}: boxes, labels and difficult differ in length "
                f"({len(self.boxes)}, {len(self.labels)}, {len(self.difficult)})"
            )

    @property
    def num_boxes(self) -> int:
        return int(len(self.labels))
