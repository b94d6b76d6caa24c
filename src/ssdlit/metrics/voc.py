"""Pascal VOC average precision, computed the way the official devkit does.

``VOCMeanAP(iou_threshold=0.5, use_07_metric=True)`` follows VOCevaldet/VOCap:

- detections of a class are ranked by decreasing score (stable: ties keep the order
  in which they were given, image by image);
- each detection is compared with every ground-truth box of its class in its image
  and takes the one of highest IoU; IoU uses +1 on widths and heights
  (``pixel_inclusive=True``, the devkit's pixel convention; ``False`` gives
  continuous IoU for 0-based continuous boxes);
- it is a hit when that IoU reaches the threshold. ``iou_rule="devkit"`` (default) is
  VOCevaldet.m's ``ovmax >= VOCopts.minoverlap``: an IoU of exactly ``iou_threshold``
  counts. ``iou_rule="strict"`` is py-faster-rcnn's ``voc_eval`` rule ``ovmax > ovthresh``
  (also mmdetection's and most Python ports'): use it to compare with their numbers.
  A detection that overlaps no ground truth of its class is never a hit (the devkit's
  ``ovmax`` stays ``-inf``), whatever the threshold;
- a hit is a true positive when its box was not taken by a better-ranked detection
  (each ground truth is matched once; a later detection of it is a false positive); a
  hit whose best box is ``difficult`` is neither true nor false positive; a detection
  that is not a hit is a false positive;
- recall counts only non-difficult ground truth;
- AP: VOC2007 11-point interpolation (``use_07_metric=True``) or the VOC2010+
  area under the monotone precision envelope (``False``).

``map`` is the mean over classes that have at least one non-difficult ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["IOU_RULES", "VOCMeanAP", "average_precision", "voc_iou"]

#: ``devkit``: a hit when IoU >= threshold (VOCevaldet.m); ``strict``: IoU > threshold
#: (py-faster-rcnn's ``voc_eval``, mmdetection).
IOU_RULES = ("devkit", "strict")


def voc_iou(a: Tensor, b: Tensor, pixel_inclusive: bool = True) -> Tensor:
    """IoU ``[N, M]`` of xyxy boxes; with ``pixel_inclusive`` widths are ``x2 - x1 + 1``."""
    one = 1.0 if pixel_inclusive else 0.0
    iw = (
        torch.minimum(a[:, None, 2], b[None, :, 2])
        - torch.maximum(a[:, None, 0], b[None, :, 0])
        + one
    )
    ih = (
        torch.minimum(a[:, None, 3], b[None, :, 3])
        - torch.maximum(a[:, None, 1], b[None, :, 1])
        + one
    )
    overlap = (iw > 0) & (ih > 0)
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(overlap, inter / union, torch.zeros_like(inter))


def average_precision(recall: Tensor, precision: Tensor, use_07_metric: bool) -> float:
    """AP from the recall/precision curve (float64 ``[N]`` each) as VOCap / the 07 rule."""
    if use_07_metric:
        ap = 0.0
        for t in torch.arange(11, dtype=torch.float64) * 0.1:
            reached = precision[recall >= t]
            ap += (float(reached.max()) if reached.numel() else 0.0) / 11.0
        return ap
    zero, one = recall.new_zeros(1), recall.new_ones(1)
    mrec = torch.cat((zero, recall, one))
    mpre = torch.cat((zero, precision, zero))
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # envelope
    change = torch.nonzero(mrec[1:] != mrec[:-1]).flatten() + 1
    return float(((mrec[change] - mrec[change - 1]) * mpre[change]).sum())


class VOCMeanAP(Metric):
    """VOC mAP over images given as torchmetrics-style lists of dicts.

    ``update(preds, targets)``: ``preds[i]`` has ``boxes`` ``[D, 4]`` xyxy pixels,
    ``scores`` ``[D]``, ``labels`` ``[D]``; ``targets[i]`` has ``boxes`` ``[G, 4]``,
    ``labels`` ``[G]`` and optionally ``difficult`` ``[G]`` bool.
    ``compute()`` returns ``map`` (float64 tensor), ``ap_per_class`` (float64 tensor
    indexed by label, NaN for labels without non-difficult ground truth) and
    ``classes`` (the labels that count in ``map``).

    Args:
        iou_threshold: the minimum overlap (VOCopts.minoverlap, 0.5).
        use_07_metric: VOC2007 11-point AP (True) or VOC2010+ all-point AP (False).
        pixel_inclusive: ``x2 - x1 + 1`` widths (the devkit's integer pixel boxes).
        iou_rule: ``"devkit"`` (default): a detection is a hit when its IoU is
            ``>= iou_threshold``, as the official VOCevaldet.m; ``"strict"``: ``>``, as
            py-faster-rcnn's ``voc_eval`` and mmdetection (to reproduce their numbers).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        iou_threshold: float = 0.5,
        use_07_metric: bool = True,
        pixel_inclusive: bool = True,
        iou_rule: str = "devkit",
        **kwargs: Any,
    ) -> None:
        if iou_rule not in IOU_RULES:
            raise ValueError(
                f"iou_rule must be one of {IOU_RULES} ('devkit': IoU >= threshold as "
                f"VOCevaldet.m; 'strict': IoU > threshold as py-faster-rcnn), got {iou_rule!r}"
            )
        kwargs.setdefault("sync_on_compute", False)  # compute() gathers per-image lists itself
        super().__init__(**kwargs)
        self.iou_threshold = float(iou_threshold)
        self.use_07_metric = bool(use_07_metric)
        self.pixel_inclusive = bool(pixel_inclusive)
        self.iou_rule = iou_rule
        for name in (
            "det_boxes",
            "det_scores",
            "det_labels",
            "gt_boxes",
            "gt_labels",
            "gt_difficult",
        ):
            self.add_state(name, default=[], dist_reduce_fx=None)

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        for p, t in zip(preds, targets, strict=True):
            self.det_boxes.append(torch.as_tensor(p["boxes"], dtype=torch.float64).reshape(-1, 4))
            self.det_scores.append(torch.as_tensor(p["scores"], dtype=torch.float64).reshape(-1))
            self.det_labels.append(torch.as_tensor(p["labels"], dtype=torch.long).reshape(-1))
            gt = torch.as_tensor(t["boxes"], dtype=torch.float64).reshape(-1, 4)
            self.gt_boxes.append(gt)
            self.gt_labels.append(torch.as_tensor(t["labels"], dtype=torch.long).reshape(-1))
            diff = t.get("difficult")
            diff = (
                torch.zeros(len(gt), dtype=torch.bool)
                if diff is None
                else torch.as_tensor(diff, dtype=torch.bool)
            )
            self.gt_difficult.append(diff.reshape(-1))

    def _gather(self) -> list[list[Tensor]]:
        """Per-image lists from every process (images of rank r follow rank r-1's)."""
        states = [
            self.det_boxes,
            self.det_scores,
            self.det_labels,
            self.gt_boxes,
            self.gt_labels,
            self.gt_difficult,
        ]
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [[x.cpu() for x in s] for s in states]
        world = torch.distributed.get_world_size()
        gathered: list[list[list[Tensor]]] = [[None] * world for _ in states]  # type: ignore[list-item]
        for i, s in enumerate(states):
            torch.distributed.all_gather_object(gathered[i], [x.cpu() for x in s])
        return [[x for part in g for x in part] for g in gathered]

    def compute(self) -> dict[str, Tensor]:
        det_boxes, det_scores, det_labels, gt_boxes, gt_labels, gt_diff = self._gather()
        n_img = len(det_boxes)
        # Per detection: best gt (of its class, in its image) and that IoU.
        ov_max, j_max, d_img = [], [], []
        gt_offset = 0
        for i in range(n_img):
            d, g = det_boxes[i], gt_boxes[i]
            if len(d) and len(g):
                iou = voc_iou(d, g, self.pixel_inclusive)
                # Boxes of other classes and boxes without overlap (IoU exactly 0) never
                # become ovmax: the devkit computes no overlap for them (ovmax = -inf).
                other = (det_labels[i][:, None] != gt_labels[i][None, :]) | (iou <= 0)
                iou = iou.masked_fill(other, -math.inf)
                best, idx = iou.max(dim=1)  # first maximum, as MATLAB's max
            else:
                best = torch.full((len(d),), -math.inf, dtype=torch.float64)
                idx = torch.zeros(len(d), dtype=torch.long)
            ov_max.append(best)
            j_max.append(idx + gt_offset)
            d_img.append(torch.full((len(d),), i, dtype=torch.long))
            gt_offset += len(g)
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
        ov_max, j_max = cat(ov_max, torch.float64), cat(j_max, torch.long)
        scores, labels = cat(det_scores, torch.float64), cat(det_labels, torch.long)
        all_gt_labels, all_gt_diff = cat(gt_labels, torch.long), cat(gt_diff, torch.bool)

        classes = torch.unique(torch.cat((labels, all_gt_labels))).tolist()
        size = (max(classes) + 1) if classes else 1
        ap_per_class = torch.full((size,), float("nan"), dtype=torch.float64)
        counted = []
        for c in classes:
            npos = int(((all_gt_labels == c) & ~all_gt_diff).sum())
            if npos == 0:
                continue
            counted.append(c)
            sel = torch.nonzero(labels == c).flatten()
            order = sel[torch.argsort(-scores[sel], stable=True)]
            ov = ov_max[order]
            hit = ov >= self.iou_threshold if self.iou_rule == "devkit" else ov > self.iou_threshold
            gt_idx = j_max[order]
            difficult = hit.clone()  # a hit always has a gt behind it
            difficult[hit] = all_gt_diff[gt_idx[hit]]
            claims = hit & ~difficult
            # The first (best-ranked) claim of a gt is the true positive; later ones are not.
            first = torch.zeros_like(claims)
            if claims.any():
                claim_pos = torch.nonzero(claims).flatten()
                _, inverse = torch.unique(gt_idx[claim_pos], return_inverse=True)
                earliest = torch.full((int(inverse.max()) + 1,), len(order), dtype=torch.long)
                earliest.scatter_reduce_(0, inverse, claim_pos, reduce="amin")
                first[earliest] = True
            tp = first.double()
            fp = (~hit | (claims & ~first)).double()
            tp_cum, fp_cum = torch.cumsum(tp, 0), torch.cumsum(fp, 0)
            recall = tp_cum / npos
            denom = tp_cum + fp_cum
            precision = torch.where(
                denom > 0, tp_cum / denom.clamp(min=1e-300), torch.zeros_like(denom)
            )
            ap_per_class[c] = average_precision(recall, precision, self.use_07_metric)
        mean = (
            ap_per_class[counted].mean()
            if counted
            else torch.tensor(float("nan"), dtype=torch.float64)
        )
        return {
            "map": mean,
            "ap_per_class": ap_per_class,
            "classes": torch.tensor(counted, dtype=torch.long),
        }
