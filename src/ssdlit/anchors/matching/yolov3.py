"""The YOLOv3 matcher: one anchor per gt, by shape then by grid cell."""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.anchors.matching.base import BACKGROUND, IGNORE, Matcher
from ssdlit.anchors.matching.overlaps import AnchorOverlaps, masked_iou, overlaps_for
from ssdlit.boxes import convert
from ssdlit.registry import MATCHERS

__all__ = ["YOLOv3Matcher"]


@MATCHERS.register("yolov3")
class YOLOv3Matcher(Matcher):
    """YOLOv3 assignment: one anchor per gt, chosen by shape then by grid cell.

    Each gt goes to the prior (distinct anchor width and height, across all levels)
    with the best shape-only IoU (centres aligned), at the grid cell that holds the
    gt centre: among that prior's anchors, the one whose centre is nearest in x and
    in y. When two gts land on one anchor, the higher gt index wins. Anchors left
    over whose IoU with any gt exceeds ``ignore_threshold`` are ignored; the rest are
    background. Priors are found by exact equality of anchor sizes, so the anchors
    must not be clipped.
    """

    def __init__(self, ignore_threshold: float = 0.5) -> None:
        self.ignore_threshold = float(ignore_threshold)

    def __repr__(self) -> str:
        return f"YOLOv3Matcher(ignore_threshold={self.ignore_threshold})"

    def match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        overlaps: AnchorOverlaps | None = None,
    ) -> Tensor:
        b, g, _ = gt_boxes.shape
        tables = overlaps_for(anchors if overlaps is None else overlaps, gt_boxes)
        anchors = tables.anchors
        shapes, prior_of = tables.priors()  # [U, 2], [A]
        gt = convert(gt_boxes, "xyxy", "cxcywh")  # [B, G, 4]
        inter = torch.minimum(gt[..., None, 2], shapes[:, 0]) * torch.minimum(
            gt[..., None, 3], shapes[:, 1]
        )  # [B, G, U]
        union = gt[..., None, 2] * gt[..., None, 3] + shapes[:, 0] * shapes[:, 1] - inter
        best_prior = (inter / union.clamp(min=torch.finfo(union.dtype).tiny)).argmax(
            dim=2
        )  # [B, G]
        same_prior = prior_of[None, None, :] == best_prior[:, :, None]  # [B, G, A]
        far = torch.finfo(gt.dtype).max
        dx = (anchors[:, 0] - gt[..., None, 0]).abs().masked_fill(~same_prior, far)  # [B, G, A]
        dy = (anchors[:, 1] - gt[..., None, 1]).abs().masked_fill(~same_prior, far)
        in_cell = (dx == dx.min(dim=2, keepdim=True).values) & (
            dy == dy.min(dim=2, keepdim=True).values
        )
        chosen = in_cell.int().argmax(dim=2)  # [B, G] first anchor of the cell
        gt_ids = torch.arange(g, device=gt.device).expand(b, g)
        src = torch.where(gt_mask, gt_ids, BACKGROUND)
        matches = torch.full((b, anchors.shape[0]), BACKGROUND, dtype=torch.long, device=gt.device)
        matches.scatter_reduce_(1, chosen, src, reduce="amax")
        iou = masked_iou(gt_boxes, gt_mask, tables)  # [B, G, A]
        ignore = (matches == BACKGROUND) & (iou.max(dim=1).values > self.ignore_threshold)
        return matches.masked_fill(ignore, IGNORE)
