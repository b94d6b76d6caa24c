"""Fitting anchors to a dataset (YOLO9000 dimension clusters) and measuring how well they fit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssdlit.boxes import box_iou, convert

__all__ = ["AnchorCoverage", "anchor_coverage", "kmeans_anchors", "shape_iou"]


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU ``[N, M]`` of box shapes ``[N, 2]`` and ``[M, 2]`` (w, h) with centres aligned."""
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(
        wh1[:, None, 1], wh2[None, :, 1]
    )  # [N, M]
    union = (wh1[:, 0] * wh1[:, 1])[:, None] + (wh2[:, 0] * wh2[:, 1])[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def kmeans_anchors(boxes_wh: Tensor, k: int, seed: int = 0, max_iter: int = 300) -> Tensor:
    """YOLO9000 dimension clusters: k-means on box shapes with distance ``1 - IoU``.

    Args:
        boxes_wh: ``[N, 2]`` widths and heights (any unit, e.g. normalised), N >= k.
        k: number of clusters.
        seed: seeds the k-means++ initialisation; the same seed gives the same result.
        max_iter: stop after this many updates if the assignment still changes.
    Returns:
        ``[k, 2]`` cluster shapes (mean w, h of their members), sorted by area.
    """
    wh = torch.as_tensor(boxes_wh, dtype=torch.float64).reshape(-1, 2)
    if k < 1 or wh.shape[0] < k:
        raise ValueError(f"need at least k={k} boxes, got {wh.shape[0]}")
    if (wh <= 0).any():
        raise ValueError("box widths and heights must be positive")
    gen = torch.Generator().manual_seed(int(seed))
    # k-means++ seeding with the 1 - IoU distance.
    centres = wh[torch.randint(wh.shape[0], (1,), generator=gen)]
    for _ in range(1, k):
        dist = (1 - shape_iou(wh, centres)).min(dim=1).values  # [N]
        weights = dist**2
        if float(weights.sum()) <= 0:  # all points coincide with a centre
            pick = torch.randint(wh.shape[0], (1,), generator=gen)
        else:
            pick = torch.multinomial(weights, 1, generator=gen)
        centres = torch.cat((centres, wh[pick]), dim=0)
    assign = torch.full((wh.shape[0],), -1, dtype=torch.long)
    for _ in range(max_iter):
        new_assign = shape_iou(wh, centres).argmax(dim=1)  # nearest = highest IoU
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        for c in range(k):  # k is small; an empty cluster keeps its centre
            members = wh[assign == c]
            if members.shape[0]:
                centres[c] = members.mean(dim=0)
    order = (centres[:, 0] * centres[:, 1]).argsort()
    out_dtype = (
        boxes_wh.dtype if torch.is_tensor(boxes_wh) and boxes_wh.is_floating_point() else None
    )
    return centres[order].to(out_dtype or torch.float32)


@dataclass(frozen=True)
class AnchorCoverage:
    """How well a set of anchors reaches a set of ground-truth boxes."""

    recall: float  #: share of gt boxes whose best anchor has IoU >= threshold
    mean_best_iou: float  #: mean over gt boxes of the best anchor IoU
    num_boxes: int
    threshold: float
    best_iou: Tensor  #: [N] best anchor IoU of each gt box

    def __str__(self) -> str:
        return (
            f"{self.recall:.1%} of {self.num_boxes} boxes have an anchor with IoU >= "
            f"{self.threshold:g} (mean best IoU {self.mean_best_iou:.3f})"
        )


def anchor_coverage(
    gt_boxes: Tensor, anchors: Tensor, threshold: float = 0.5, chunk: int = 1024
) -> AnchorCoverage:
    """Share of gt boxes that some anchor overlaps with IoU >= ``threshold``.

    Args:
        gt_boxes: ``[N, 4]`` xyxy normalised (the same frame as the anchors).
        anchors: ``[A, 4]`` cxcywh normalised.
        threshold: IoU a gt needs with its best anchor to count as covered.
        chunk: gt boxes per IoU block (bounds memory at ``chunk * A`` floats).
    """
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    anchors_xyxy = convert(anchors.to(torch.float32), "cxcywh", "xyxy")
    if gt.shape[0] == 0:
        return AnchorCoverage(0.0, 0.0, 0, threshold, torch.zeros(0))
    best = torch.cat(
        [box_iou(part, anchors_xyxy).max(dim=1).values for part in gt.split(chunk)]
    )  # [N]
    return AnchorCoverage(
        recall=float((best >= threshold).float().mean()),
        mean_best_iou=float(best.mean()),
        num_boxes=int(gt.shape[0]),
        threshold=float(threshold),
        best_iou=best,
    )
