"""Look at a dataset before training on it: counts, box shapes, anchor coverage, pictures.

The functions here back ``python -m ssdlit.inspect``; they work on parsed
:class:`~ssdlit.datamodules.records.Record` s and plain tensors, so they can be used
from a notebook as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssdlit.anchors.kmeans import AnchorCoverage, anchor_coverage, kmeans_anchors
from ssdlit.datamodules.records import Record
from ssdlit.visualize import PALETTE

__all__ = [
    "DatasetStats",
    "coverage_report",
    "dataset_statistics",
    "draw_records",
    "normalised_boxes",
    "text_histogram",
]


@dataclass
class DatasetStats:
    """Per-class counts and box shape distributions of a list of records."""

    num_images: int
    num_empty_images: int
    boxes_per_class: dict[str, int]
    images_per_class: dict[str, int]
    difficult_per_class: dict[str, int]
    relative_sizes: np.ndarray  #: sqrt(box area / image area) per box
    aspect_ratios: np.ndarray  #: box width / height per box
    image_sizes: dict[tuple[int, int], int]  #: (width, height) -> number of images

    def summary(self) -> str:
        lines = [
            f"{self.num_images} images, {int(self.relative_sizes.size)} boxes, "
            f"{self.num_empty_images} images without boxes",
            "",
            f"{'class':24} {'boxes':>7} {'images':>7} {'difficult':>9}",
        ]
        for name, n in self.boxes_per_class.items():
            lines.append(
                f"{name:24} {n:>7} {self.images_per_class[name]:>7} "
                f"{self.difficult_per_class[name]:>9}"
            )
        common = sorted(self.image_sizes.items(), key=lambda kv: -kv[1])[:5]
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common)
        lines += ["", f"most common image sizes: {sizes}"]
        if self.relative_sizes.size:
            lines += [
                "",
                "box size (sqrt of box area / image area):",
                text_histogram(self.relative_sizes, [0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
                "",
                "box aspect ratio (width / height):",
                text_histogram(
                    self.aspect_ratios, [0, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 2, 2, 3, 4, math.inf]
                ),
            ]
        return "\n".join(lines)


def dataset_statistics(records: Sequence[Record], class_names: Sequence[str]) -> DatasetStats:
    """Counts per class and the distribution of box sizes and aspect ratios."""
    boxes_per_class = dict.fromkeys(class_names, 0)
    images_per_class = dict.fromkeys(class_names, 0)
    difficult_per_class = dict.fromkeys(class_names, 0)
    sizes: list[np.ndarray] = []
    aspects: list[np.ndarray] = []
    image_sizes: dict[tuple[int, int], int] = {}
    empty = 0
    for r in records:
        image_sizes[(r.width, r.height)] = image_sizes.get((r.width, r.height), 0) + 1
        if r.num_boxes == 0:
            empty += 1
            continue
        for label in np.unique(r.labels):
            images_per_class[class_names[label - 1]] += 1
        for label, diff in zip(r.labels.tolist(), r.difficult.tolist(), strict=True):
            boxes_per_class[class_names[label - 1]] += 1
            difficult_per_class[class_names[label - 1]] += int(diff)
        w = r.boxes[:, 2] - r.boxes[:, 0]
        h = r.boxes[:, 3] - r.boxes[:, 1]
        sizes.append(np.sqrt(w * h / float(r.width * r.height)))
        aspects.append(w / np.maximum(h, 1e-9))
    return DatasetStats(
        num_images=len(records),
        num_empty_images=empty,
        boxes_per_class=boxes_per_class,
        images_per_class=images_per_class,
        difficult_per_class=difficult_per_class,
        relative_sizes=np.concatenate(sizes) if sizes else np.zeros(0),
        aspect_ratios=np.concatenate(aspects) if aspects else np.zeros(0),
        image_sizes=image_sizes,
    )


def text_histogram(values: np.ndarray, edges: Sequence[float], width: int = 40) -> str:
    """A histogram as text lines ``[lo, hi)  count  ####``."""
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=float))
    top = max(int(counts.max()), 1)
    lines = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True):
        label = f"[{lo:.3g}, {hi:.3g})" if math.isfinite(hi) else f">= {lo:.3g}"
        lines.append(f"  {label:>16} {int(n):>7}  {'#' * round(width * n / top)}")
    return "\n".join(lines)


def normalised_boxes(records: Sequence[Record]) -> Tensor:
    """All boxes ``[N, 4]`` xyxy, normalised by their image size (as a plain resize sees them)."""
    parts = [
        torch.from_numpy(r.boxes / np.array([r.width, r.height, r.width, r.height], np.float32))
        for r in records
        if r.num_boxes
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 4)


def coverage_report(
    records: Sequence[Record],
    anchors: Tensor,
    image_size: Sequence[int],
    threshold: float = 0.5,
    good_recall: float = 0.95,
    k: int = 6,
    seed: int = 0,
) -> tuple[AnchorCoverage, str]:
    """Anchor coverage of the dataset's boxes, with k-means anchors suggested when poor.

    Args:
        records: the dataset; boxes are normalised by image size (a plain resize).
        anchors: ``[A, 4]`` cxcywh normalised, as the detector uses them.
        image_size: the network input ``(H, W)``, to state suggestions in pixels.
        threshold: IoU a box needs with some anchor to count as reachable.
        good_recall: below this share of reachable boxes, suggest anchors.
        k: number of k-means clusters to suggest.
    """
    boxes = normalised_boxes(records)
    cov = anchor_coverage(boxes, anchors, threshold=threshold)
    lines = [f"anchor coverage: {cov}"]
    if cov.num_boxes and cov.recall < good_recall:
        lines.append(
            f"  {cov.num_boxes - round(cov.recall * cov.num_boxes)} boxes have no anchor with "
            f"IoU >= {threshold:g}: the detector can hardly learn them."
        )
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
        if wh.shape[0] >= k:
            h, w = image_size
            clusters = kmeans_anchors(wh, k, seed=seed)
            lines.append(f"  k-means ({k} clusters, 1 - IoU distance) suggests these box shapes:")
            side = min(h, w)
            for cw, ch in clusters.tolist():
                scale = math.sqrt(cw * w * ch * h) / side
                lines.append(
                    f"    {cw * w:7.1f} x {ch * h:7.1f} px  (scale {scale:.3f} of the shorter "
                    f"side, aspect ratio w/h {cw * w / (ch * h):.2f})"
                )
            lines.append(
                "  put these scales and aspect ratios into the anchors config (or use the "
                "`yolo` generator with them as priors)."
            )
    return cov, "\n".join(lines)


def draw_records(
    records: Sequence[Record],
    class_names: Sequence[str],
    out_dir: str | Path,
    n: int,
) -> list[Path]:
    """Write the first ``n`` images with their labelled boxes drawn; returns the paths."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in list(records)[:n]:
        image = Image.fromarray(r.load_image())
        draw = ImageDraw.Draw(image)
        for box, label, diff in zip(
            r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist(), strict=True
        ):
            color = PALETTE[(label - 1) % len(PALETTE)]
            draw.rectangle(box, outline=color, width=2)
            text = class_names[label - 1] + (" (difficult)" if diff else "")
            draw.text((box[0] + 3, box[1] + 2), text, fill=color)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(r.image_id))
        path = out / f"{safe}.png"
        image.save(path)
        written.append(path)
    return written
