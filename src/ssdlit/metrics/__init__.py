"""Detection metrics: Pascal VOC AP (devkit-exact) and COCO mAP via torchmetrics."""

from ssdlit.metrics.coco import COCOMeanAP
from ssdlit.metrics.voc import IOU_RULES, VOCMeanAP, average_precision, voc_iou

__all__ = ["IOU_RULES", "COCOMeanAP", "VOCMeanAP", "average_precision", "voc_iou"]
