"""Batched anchor matchers: which ground-truth box (if any) each anchor learns from.

Every matcher takes

- ``gt_boxes`` ``[B, G, 4]`` xyxy normalised to [0, 1] (padded to the largest G),
- ``gt_mask``  ``[B, G]`` bool, True for real boxes and False for padding,
- ``anchors``  ``[A, 4]`` cxcywh normalised,

and returns ``matches`` ``[B, A]`` long: the gt index (>= 0) an anchor regresses
to, :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2, enters no loss). The whole
batch is matched at once; the only Python loop is over G in the greedy bipartite
step, which is sequential by nature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ssdlit.boxes import box_iou, convert
from ssdlit.registry import MATCHERS

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "FasterRCNNMatcher",
    "Matcher",
    "SSDMatcher",
    "YOLOv3Matcher",
    "masked_iou",
]

BACKGROUND = -1
IGNORE = -2


def masked_iou(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
    """IoU ``[B, G, A]`` of gt boxes (xyxy) and anchors (cxcywh); padded rows are -1."""
    iou = box_iou(gt_boxes, convert(anchors, "cxcywh", "xyxy").to(gt_boxes.dtype))
    return iou.masked_fill(~gt_mask[:, :, None], -1.0)


def _check(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> None:
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2] or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool [B, G] = {tuple(gt_boxes.shape[:2])}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")


class Matcher(ABC):
    """Base class: call with ``(gt_boxes, gt_mask, anchors)``, get ``matches [B, A]``."""

    def __call__(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        _check(gt_boxes, gt_mask, anchors)
        if gt_boxes.shape[1] == 0:  # nothing to match: every anchor is background
            return gt_boxes.new_full(
                (gt_boxes.shape[0], anchors.shape[0]), BACKGROUND, dtype=torch.long
            )
        return self.match(gt_boxes, gt_mask.to(gt_boxes.device), anchors.to(gt_boxes.device))

    @abstractmethod
    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        """``matches [B, A]`` for a batch with at least one (maybe padded) gt slot."""


def greedy_bipartite(iou: Tensor) -> Tensor:
    """ssd_keras's ``match_bipartite_greedy`` for a whole batch.

    Repeatedly takes the highest remaining (gt, anchor) IoU of each image (ties:
    lowest gt index, then lowest anchor index), matches that pair, and removes the
    gt and the anchor. Every real gt gets exactly one anchor, even at IoU 0.

    Args:
        iou: ``[B, G, A]`` with padded gts set to a negative value.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    b, g, a = iou.shape
    k = min(g, a)
    # A gt picked at step t has lost at most t - 1 < G anchors to earlier picks, so its
    # pick is among its k best anchors: the loop runs on [B, G, k] candidates only.
    # Exact ordering (IoU desc, anchor index asc) through an integer key: the bits of a
    # non-negative float32 sort like the float.
    bits = iou.float().clamp(min=0).view(torch.int32).long()  # [B, G, A]
    anchor_ids = torch.arange(a, device=iou.device)
    keys = (bits << 32) | (a - 1 - anchor_ids)  # larger key: higher IoU, then lower index
    keys = keys.masked_fill(iou < 0, -1)
    top_keys, _ = keys.topk(k, dim=2)  # [B, G, k], sorted descending
    padded = top_keys < 0
    cand_anchor = ((a - 1) - (top_keys & 0xFFFFFFFF)).masked_fill(padded, 0)  # [B, G, k]
    cand_iou = torch.gather(iou, 2, cand_anchor).masked_fill(padded, -1.0)
    matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
    rows = torch.arange(b, device=iou.device)
    for _ in range(g):
        best, flat = cand_iou.reshape(b, -1).max(dim=1)  # first maximum: lowest gt, then anchor
        gt = flat // k
        anchor = cand_anchor.reshape(b, -1).gather(1, flat[:, None]).squeeze(1)  # [B]
        valid = best >= 0
        current = matches[rows, anchor]
        matches[rows, anchor] = torch.where(valid, gt, current)
        taken = (cand_anchor == anchor[:, None, None]) & valid[:, None, None]  # [B, G, k]
        # (a padded slot may alias anchor 0, but its IoU is already -1)
        taken[rows, gt] |= valid[:, None]
        cand_iou = cand_iou.masked_fill(taken, -1.0)
    return matches


@MATCHERS.register("ssd")
class SSDMatcher(Matcher):
    """SSD matching as ssd_keras's ``SSDInputEncoder`` does it.

    1. Greedy bipartite: each real gt gets its own best anchor, even below the threshold.
    2. With ``matching="multi"``: every other anchor goes to its highest-IoU gt when
       that IoU is ``>= pos_iou_threshold`` (ties: lowest gt index).
    3. Anchors still unmatched whose best IoU is ``>= neg_iou_limit`` are ignored (-2);
       ``neg_iou_limit=None`` leaves them all background.
    """

    def __init__(
        self,
        matching: str = "multi",
        pos_iou_threshold: float = 0.5,
        neg_iou_limit: float | None = 0.3,
    ) -> None:
        if matching not in ("multi", "bipartite"):
            raise ValueError(f"matching must be 'multi' or 'bipartite', got {matching!r}")
        if neg_iou_limit is not None and neg_iou_limit > pos_iou_threshold:
            raise ValueError(
                f"neg_iou_limit ({neg_iou_limit}) must not exceed pos_iou_threshold "
                f"({pos_iou_threshold})"
            )
        self.matching = matching
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_limit = None if neg_iou_limit is None else float(neg_iou_limit)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        matches = greedy_bipartite(iou)
        best_iou, best_gt = iou.max(dim=1)  # [B, A], lowest gt on ties
        free = matches == BACKGROUND
        if self.matching == "multi":
            positive = free & (best_iou >= self.pos_iou_threshold)
            matches = torch.where(positive, best_gt, matches)
            free = free & ~positive
        if self.neg_iou_limit is not None:
            neutral = free & (best_iou >= self.neg_iou_limit)
            matches = matches.masked_fill(neutral, IGNORE)
        return matches

    def __repr__(self) -> str:
        return (
            f"SSDMatcher(matching={self.matching!r}, pos_iou_threshold={self.pos_iou_threshold}, "
            f"neg_iou_limit={self.neg_iou_limit})"
        )


@MATCHERS.register("faster_rcnn")
class FasterRCNNMatcher(Matcher):
    """The Faster R-CNN RPN rule.

    IoU ``>= pos_iou_threshold`` (0.7): positive, to the anchor's best gt; ``<
    neg_iou_threshold`` (0.3): background; in between: ignored. With
    ``allow_low_quality_matches`` the anchors that reach a gt's highest IoU (ties
    included, IoU > 0) are positive too, assigned to their own best gt as in
    torchvision's ``Matcher``.
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

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.full_like(best_gt, IGNORE)
        matches = torch.where(best_iou < self.neg_iou_threshold, BACKGROUND, matches)
        matches = torch.where(best_iou >= self.pos_iou_threshold, best_gt, matches)
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == gt_best) & (gt_best > 0) & gt_mask[:, :, None]  # [B, G, A]
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches


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

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        b, g, _ = gt_boxes.shape
        anchors = anchors.to(gt_boxes.dtype)
        shapes, prior_of = torch.unique(anchors[:, 2:], dim=0, return_inverse=True)  # [U, 2], [A]
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
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        ignore = (matches == BACKGROUND) & (iou.max(dim=1).values > self.ignore_threshold)
        return matches.masked_fill(ignore, IGNORE)
