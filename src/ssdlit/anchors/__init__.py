"""Anchor generators, matchers and anchor fitting.

Generators return anchors ``[A, 4]`` cxcywh normalised to [0, 1] in the order
(level, row y, column x, box); matchers turn a batch of ground truth into
``matches [B, A]`` (gt index, -1 background, -2 ignored).
"""

from ssdlit.anchors.base import AnchorGenerator
from ssdlit.anchors.d2l import D2LAnchorGenerator
from ssdlit.anchors.kmeans import AnchorCoverage, anchor_coverage, kmeans_anchors, shape_iou
from ssdlit.anchors.matchers import (
    BACKGROUND,
    IGNORE,
    FasterRCNNMatcher,
    Matcher,
    SSDMatcher,
    YOLOv3Matcher,
    greedy_bipartite,
    masked_iou,
)
from ssdlit.anchors.retina import RetinaAnchorGenerator
from ssdlit.anchors.ssd import SSDAnchorGenerator, SSDCaffeAnchorGenerator
from ssdlit.anchors.yolo import COCO_YOLOV3_PRIORS, YoloAnchorGenerator

__all__ = [
    "BACKGROUND",
    "COCO_YOLOV3_PRIORS",
    "IGNORE",
    "AnchorCoverage",
    "AnchorGenerator",
    "D2LAnchorGenerator",
    "FasterRCNNMatcher",
    "Matcher",
    "RetinaAnchorGenerator",
    "SSDAnchorGenerator",
    "SSDCaffeAnchorGenerator",
    "SSDMatcher",
    "YOLOv3Matcher",
    "YoloAnchorGenerator",
    "anchor_coverage",
    "greedy_bipartite",
    "kmeans_anchors",
    "masked_iou",
    "shape_iou",
]
