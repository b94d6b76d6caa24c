"""What validation, testing and ``python -m ssdlit.evaluate`` report: VOC mAP@0.5 two ways
and COCO mAP, over a whole split.

:class:`DetectionEvaluator` feeds the same per-image predictions and targets (pixels of
the original image) to three metrics:

- ``voc07_map50``: Pascal VOC2007 11-point AP at IoU 0.5 (:class:`~ssdlit.metrics.VOCMeanAP`);
- ``voc_map50``: VOC2010+ all-point AP (area under the precision envelope) at IoU 0.5;
- ``coco_map`` (@[.5:.95]), ``coco_map50``, ``coco_map75``, ``coco_mar100``:
  :class:`~ssdlit.metrics.COCOMeanAP` (torchmetrics + pycocotools).

Difficult ground truth is ignored by all of them (VOC devkit rule; crowd for COCO).
Both VOC metrics run with ``pixel_inclusive=False``: ssdlit's boxes (from every source,
and the detector's output) are 0-based continuous pixel coordinates, where a box's width
is ``x2 - x1``; the devkit's ``+1`` belongs to its 1-based inclusive integer indices, and
adding it here would inflate the IoU of small boxes.

:func:`batch_to_metric_inputs` turns a batch and the detector's normalised detections into
those per-image dicts with :func:`~ssdlit.datamodules.to_original_pixels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssdlit.datamodules.collate import to_original_pixels
from ssdlit.metrics.coco import COCOMeanAP
from ssdlit.metrics.voc import VOCMeanAP

__all__ = ["DetectionEvaluator", "batch_to_metric_inputs", "format_ap_table"]


def batch_to_metric_inputs(
    detections: Sequence[Tensor], batch: dict[str, Any]
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Per-image ``(preds, targets)`` in original-image pixels.

    Args:
        detections: B tensors ``[k, 6]`` (label, score, x1, y1, x2, y2) normalised to the
            network input (what :class:`~ssdlit.Detector` returns).
        batch: the collated batch (``boxes [B, G, 4]`` normalised, ``labels``, ``mask``,
            ``difficult``, ``meta``).
    """
    preds, targets = [], []
    mask = batch["mask"]
    difficult = batch.get("difficult")
    for i, (det, meta) in enumerate(zip(detections, batch["meta"], strict=True)):
        det = det.detach().float()
        preds.append(
            {
                "boxes": to_original_pixels(det[:, 2:6], meta),
                "scores": det[:, 1],
                "labels": det[:, 0].long(),
            }
        )
        m = mask[i]
        gt = {
            "boxes": to_original_pixels(batch["boxes"][i][m].float(), meta),
            "labels": batch["labels"][i][m].long(),
        }
        gt["difficult"] = (
            difficult[i][m].bool()
            if difficult is not None
            else torch.zeros_like(gt["labels"]).bool()
        )
        targets.append(gt)
    return preds, targets


class DetectionEvaluator(nn.Module):
    """VOC07 11-point, VOC all-point and COCO mAP over a split (torchmetrics states).

    Args:
        class_names: the C class names (label ``i`` is ``class_names[i - 1]``).
        iou_threshold: the VOC IoU threshold (0.5).
        iou_rule: ``"devkit"`` (IoU >= threshold, VOCevaldet.m) or ``"strict"`` (IoU >
            threshold, py-faster-rcnn / mmdetection); see :class:`~ssdlit.metrics.VOCMeanAP`.
        coco: also compute COCO mAP@[.5:.95] (pycocotools; a few seconds on big splits).
        class_metrics: COCO AP per class too.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        iou_threshold: float = 0.5,
        iou_rule: str = "devkit",
        coco: bool = True,
        class_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        # pixel_inclusive=False: our boxes are 0-based continuous (see the module docstring).
        self.voc07 = VOCMeanAP(
            iou_threshold=iou_threshold,
            use_07_metric=True,
            pixel_inclusive=False,
            iou_rule=iou_rule,
        )
        self.voc = VOCMeanAP(
            iou_threshold=iou_threshold,
            use_07_metric=False,
            pixel_inclusive=False,
            iou_rule=iou_rule,
        )
        self.coco = COCOMeanAP(class_metrics=class_metrics) if coco else None

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        self.voc07.update(preds, targets)
        self.voc.update(preds, targets)
        if self.coco is not None:
            self.coco.update(preds, targets)

    def reset(self) -> None:
        self.voc07.reset()
        self.voc.reset()
        if self.coco is not None:
            self.coco.reset()

    def compute(self) -> dict[str, Any]:
        """``{"summary": {name: float}, "per_class": {class: {metric: float}}}``.

        Classes without non-difficult ground truth get NaN per-class values (and do not
        count in the VOC means).
        """
        summary: dict[str, float] = {}
        per_class: dict[str, dict[str, float]] = {name: {} for name in self.class_names}
        for key, metric in (("voc07", self.voc07), ("voc", self.voc)):
            out = metric.compute()
            summary[f"{key}_map50"] = float(out["map"])
            ap = out["ap_per_class"]
            for label, name in enumerate(self.class_names, start=1):
                per_class[name][f"{key}_ap50"] = float(ap[label]) if label < len(ap) else math.nan
        if self.coco is not None:
            out = self.coco.compute()
            for src, dst in (
                ("map", "coco_map"),
                ("map_50", "coco_map50"),
                ("map_75", "coco_map75"),
                ("mar_100", "coco_mar100"),
            ):
                summary[dst] = float(out[src])
            classes = out.get("classes")
            values = out.get("map_per_class")
            if self.coco.class_metrics and classes is not None and values is not None:
                for label, value in zip(
                    classes.flatten().tolist(), values.flatten().tolist(), strict=False
                ):
                    if 1 <= int(label) <= len(self.class_names):
                        v = float(value)
                        per_class[self.class_names[int(label) - 1]]["coco_ap"] = (
                            v if v >= 0 else math.nan
                        )
        for name in self.class_names:
            per_class[name].setdefault("coco_ap", math.nan)
        return {"summary": summary, "per_class": per_class}


def format_ap_table(per_class: dict[str, dict[str, float]], summary: dict[str, float]) -> str:
    """A plain-text table: one row per class (VOC07 AP50, VOC AP50, COCO AP) and the means."""
    cols = [("voc07_ap50", "VOC07 AP50"), ("voc_ap50", "VOC AP50"), ("coco_ap", "COCO AP")]
    width = max([len("class"), len("mean"), *(len(n) for n in per_class)])
    head = f"{'class':<{width}}  " + "  ".join(f"{title:>10}" for _, title in cols)
    lines = [head, "-" * len(head)]

    def cell(v: float | None) -> str:
        return f"{'-':>10}" if v is None or math.isnan(v) else f"{v:>10.4f}"

    for name, row in per_class.items():
        lines.append(f"{name:<{width}}  " + "  ".join(cell(row.get(k)) for k, _ in cols))
    lines.append("-" * len(head))
    means = [summary.get("voc07_map50"), summary.get("voc_map50"), summary.get("coco_map")]
    lines.append(f"{'mean':<{width}}  " + "  ".join(cell(v) for v in means))
    return "\n".join(lines)
