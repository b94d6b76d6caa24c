"""Pictures of predictions: boxes drawn on network-input images, tiled into a grid.

Ground truth is drawn first in white (thin), predictions above it in one colour per class
with ``"name score"`` labels. Everything here takes the network's view (uint8 ``[3, H, W]``
images, boxes normalised to [0, 1]), which is what a validation batch holds. Used by
training (``predictions.png``, the TensorBoard image logger), ``predict`` and
:mod:`ssdlit.inspection` (:data:`PALETTE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

__all__ = ["PALETTE", "draw_detections", "prediction_grid", "predictions_picture", "save_image"]

#: Distinct colours, cycled over the class labels.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)
GT_COLOUR = (255, 255, 255)


def _pixels(boxes_norm: Tensor, h: int, w: int) -> Tensor:
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return (boxes_norm.detach().float().cpu() * scale).round()


def draw_detections(
    image: Tensor,
    detections: Tensor,
    class_names: Sequence[str],
    gt_boxes: Tensor | None = None,
    gt_labels: Tensor | None = None,
    score_threshold: float = 0.3,
    max_boxes: int = 20,
) -> Tensor:
    """Draw on one uint8 ``[3, H, W]`` image; returns a new uint8 ``[3, H, W]`` tensor.

    Args:
        image: the network input (uint8).
        detections: ``[k, 6]`` (label, score, x1, y1, x2, y2) normalised, best first.
        class_names: C names (label ``i`` is ``class_names[i - 1]``).
        gt_boxes: ``[n, 4]`` xyxy normalised ground truth (optional), ``gt_labels`` ``[n]``.
        score_threshold: predictions below it are not drawn.
        max_boxes: at most this many predictions are drawn.
    """
    img = image.detach().cpu()
    if img.dtype != torch.uint8:
        img = img.clamp(0, 255).to(torch.uint8)
    h, w = img.shape[-2:]
    if gt_boxes is not None and len(gt_boxes):
        img = draw_bounding_boxes(img, _pixels(gt_boxes, h, w), colors=GT_COLOUR, width=1)
    det = detections.detach().float().cpu()
    det = det[det[:, 1] >= score_threshold][:max_boxes]
    if len(det):
        labels = det[:, 0].long().tolist()
        names = [
            f"{class_names[lab - 1] if 1 <= lab <= len(class_names) else lab} {s:.2f}"
            for lab, s in zip(labels, det[:, 1].tolist(), strict=True)
        ]
        colours = [PALETTE[(lab - 1) % len(PALETTE)] for lab in labels]
        img = draw_bounding_boxes(
            img, _pixels(det[:, 2:6], h, w), labels=names, colors=colours, width=2
        )
    return img


def prediction_grid(
    images: Tensor,
    detections: Sequence[Tensor],
    class_names: Sequence[str],
    gt_boxes: Tensor | None = None,
    gt_labels: Tensor | None = None,
    gt_mask: Tensor | None = None,
    score_threshold: float = 0.3,
    max_images: int = 8,
    nrow: int = 4,
) -> Tensor:
    """A grid (uint8 ``[3, H', W']``) of the first ``max_images`` images with their boxes.

    ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]``, ``gt_mask [B, G]`` are the padded batch
    targets (optional).
    """
    n = min(max_images, len(images))
    tiles = []
    for i in range(n):
        gb = gl = None
        if gt_boxes is not None:
            keep = gt_mask[i].cpu() if gt_mask is not None else slice(None)
            gb = gt_boxes[i].cpu()[keep]
            gl = gt_labels[i].cpu()[keep] if gt_labels is not None else None
        tiles.append(
            draw_detections(images[i], detections[i], class_names, gb, gl, score_threshold)
        )
    return make_grid(torch.stack(tiles), nrow=min(nrow, n), padding=2, pad_value=0)


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 ``[3, H, W]`` tensor as an image file (PNG by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy())
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def predictions_picture(
    model: Any,
    loader: Iterable[dict[str, Any]],
    path: str | Path,
    class_names: Sequence[str],
    max_images: int = 8,
    score_threshold: float = 0.3,
) -> Path | None:
    """Draw the first batch of ``loader`` with ``model``'s detections (and the batch's
    ground truth) into ``path`` (PNG); None when the loader is empty.

    ``model`` maps uint8 images ``[B, 3, H, W]`` to detections (a
    :class:`~ssdlit.Detector` or a :class:`~ssdlit.module.DetectionModule`); it runs in
    eval mode on its own device and is put back in the mode it was in.
    """
    batch = next(iter(loader), None)
    if batch is None:
        return None
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        detections = model(batch["images"][:max_images].to(device))
    finally:
        model.train(was_training)
    grid = prediction_grid(
        batch["images"][:max_images],
        detections,
        class_names,
        gt_boxes=batch["boxes"],
        gt_labels=batch["labels"],
        gt_mask=batch["mask"],
        score_threshold=score_threshold,
        max_images=max_images,
    )
    return save_image(grid, path)
