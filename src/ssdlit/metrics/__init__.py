"""Detection metrics: Pascal VOC AP (devkit-exact), COCO mAP via torchmetrics, and
:class:`DetectionEvaluator`, which reports both over a split (validation, test, evaluate)."""

from ssdlit.metrics.coco import COCOMeanAP
from ssdlit.metrics.evaluator import DetectionEvaluator, batch_to_metric_inputs, format_ap_table
from ssdlit.metrics.voc import IOU_RULES, VOCMeanAP, average_precision, voc_iou

__all__ = [
    "IOU_RULES",
    "COCOMeanAP",
    "DetectionEvaluator",
    "VOCMeanAP",
    "average_precision",
    "batch_to_metric_inputs",
    "format_ap_table",
    "voc_iou",
]
