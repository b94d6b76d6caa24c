"""Detector heads: the plugin point that owns layers, loss and output decoding.

Importing this package registers ``ssd``, ``ssdlite``, ``retina`` and ``yolo`` in
:data:`ssdlit.registry.HEADS`. Every head follows :class:`DetectionHead`:
``forward(features) -> {"cls_logits" [B, A, K], "box_deltas" [B, A, 4], ...}``,
``scores(outputs) -> [B, A, C + 1]``, ``decode_boxes(outputs, anchors) -> [B, A, 4]``
cxcywh and ``loss(outputs, matches, gt_boxes, gt_labels, anchors) -> {"loss": ...}``.
"""

from ssdlit.heads.base import DetectionHead, flatten_level, flatten_levels, prior_bias
from ssdlit.heads.losses import (
    MINING_MODES,
    MultiBoxLoss,
    background_loss,
    mine_negatives,
    multibox_loss,
)
from ssdlit.heads.retina import RetinaHead
from ssdlit.heads.ssd import SSDHead, SSDLiteHead
from ssdlit.heads.yolo import YoloHead

__all__ = [
    "MINING_MODES",
    "DetectionHead",
    "MultiBoxLoss",
    "RetinaHead",
    "SSDHead",
    "SSDLiteHead",
    "YoloHead",
    "background_loss",
    "flatten_level",
    "flatten_levels",
    "mine_negatives",
    "multibox_loss",
    "prior_bias",
]
