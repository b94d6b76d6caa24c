"""COCO mAP@[.5:.95] through torchmetrics' ``MeanAveragePrecision`` (pycocotools backend).

:class:`COCOMeanAP` takes the same inputs as :class:`~ssdlit.metrics.VOCMeanAP`:
torchmetrics-style lists of dicts with ``boxes`` xyxy in pixels, ``scores`` and
``labels`` (1..C), targets with ``boxes``, ``labels`` and an optional ``difficult`` bool.
Difficult ground truth is handed to COCOeval as ``iscrowd``: a detection that overlaps
it is neither a true nor a false positive and it is never counted as missed, which is
how the VOC devkit treats difficult boxes. COCOeval computes IoU on continuous
coordinates (no +1), which is the convention of ssdlit's 0-based continuous boxes.

``compute()`` returns torchmetrics' dict (``map``, ``map_50``, ``map_75``, ``map_small``,
..., ``mar_100``, and with ``class_metrics=True`` ``map_per_class`` with ``classes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["COCOMeanAP"]


class COCOMeanAP(MeanAveragePrecision):
    """COCO-style mAP of xyxy pixel boxes; ``difficult`` targets count as crowd (ignored).

    Args:
        class_metrics: also compute AP per class (slower on many classes).
        backend: ``"pycocotools"`` (a dependency of ssdlit) or ``"faster_coco_eval"``.
        **kwargs: passed to :class:`torchmetrics.detection.MeanAveragePrecision`.
    """

    def __init__(
        self, class_metrics: bool = True, backend: str = "pycocotools", **kwargs: Any
    ) -> None:
        super().__init__(
            box_format="xyxy",
            iou_type="bbox",
            class_metrics=class_metrics,
            backend=backend,  # type: ignore[arg-type]
            **kwargs,
        )
        # COCO counts the best 100 detections per image (max_detection_thresholds); keeping
        # more (SSD's top_k is 200) is normal, not something to warn about at every update.
        self.warn_on_many_detections = False

    def update(  # type: ignore[override]
        self, preds: Sequence[dict[str, Tensor]], target: Sequence[dict[str, Tensor]]
    ) -> None:
        converted = []
        for t in target:
            item = {"boxes": t["boxes"].float(), "labels": t["labels"].long()}
            difficult = t.get("difficult")
            item["iscrowd"] = (
                torch.zeros_like(item["labels"])
                if difficult is None
                else torch.as_tensor(difficult, device=item["labels"].device).long()
            )
            converted.append(item)
        preds = [
            {
                "boxes": p["boxes"].float(),
                "scores": p["scores"].float(),
                "labels": p["labels"].long(),
            }
            for p in preds
        ]
        super().update(preds, converted)
