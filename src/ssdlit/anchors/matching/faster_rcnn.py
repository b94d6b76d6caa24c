"""The Faster R-CNN RPN matcher."""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.anchors.matching.base import BACKGROUND, IGNORE, Matcher
from ssdlit.anchors.matching.overlaps import AnchorOverlaps, masked_iou
from ssdlit.registry import MATCHERS

__all__ = ["FasterRCNNMatcher"]


@MATCHERS.register("faster_rcnn")
class FasterRCNNMatcher(Matcher):
    """The Faster R-CNN RPN rule.

    IoU ``>= pos_iou_threshold`` (0.7): positive, to the anchor's best gt; ``<
    neg_iou_threshold`` (0.3): background; in between: ignored. With
    ``allow_low_quality_matches`` the anchors that reach a gt's highest IoU (ties
    included, IoU > 0) are positive too, assigned to their own best gt as in
    torchvision's ``Matcher``. The paper's sampling of 256 anchors per image is a
    separate step (:class:`~ssdlit.anchors.matching.sampling.MatchSampler`).
    """

    def __init__(
        self,
        pos_iou_threshold: float = 0.7,
        neg_iou_threshold: float = 0.3,
        allow_low_quality_matches: bool = True,
    ) -> None:
        if neg_iou_threshold > pos_iou_threshold:
            raise ValueError("neg_iou_threshold must not exceed pos_iou_threshold")
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_threshold = float(neg_iou_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        overlaps: AnchorOverlaps | None = None,
    ) -> Tensor:
        iou = masked_iou(gt_boxes, gt_mask, anchors if overlaps is None else overlaps)  # [B, G, A]
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.full_like(best_gt, IGNORE)
        matches = torch.where(best_iou < self.neg_iou_threshold, BACKGROUND, matches)
        matches = torch.where(best_iou >= self.pos_iou_threshold, best_gt, matches)
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == gt_best) & (gt_best > 0) & gt_mask[:, :, None]  # [B, G, A]
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches

    def __repr__(self) -> str:
        return (
            f"FasterRCNNMatcher(pos_iou_threshold={self.pos_iou_threshold}, "
            f"neg_iou_threshold={self.neg_iou_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )
