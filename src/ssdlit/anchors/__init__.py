"""Anchor generators, matchers and anchor fitting.

Generators lay anchors out as an :class:`AnchorGrid` (``generator.grid(feature_sizes)``)
whose ``flat()`` is the anchors ``[A, 4]`` cxcywh normalised to [0, 1] in the order
(level, row y, column x, box) (``generator(feature_sizes)`` gives that directly);
matchers (:mod:`ssdlit.anchors.matching`) turn a batch of ground truth into
``matches [B, A]`` (gt index, -1 background, -2 ignored).
"""

from ssdlit.anchors.base import AnchorGenerator
from ssdlit.anchors.d2l import D2LAnchorGenerator
from ssdlit.anchors.grid import AnchorGrid
from ssdlit.anchors.kmeans import AnchorCoverage, anchor_coverage, kmeans_anchors, shape_iou
from ssdlit.anchors.matching import (
    BACKGROUND,
    IGNORE,
    FasterRCNNMatcher,
    Matcher,
    MatchSampler,
    SSDMatcher,
    YOLOv3Matcher,
    greedy_bipartite,
    masked_iou,
    ssd_match,
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
    "AnchorGrid",
    "D2LAnchorGenerator",
    "FasterRCNNMatcher",
    "MatchSampler",
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
    "ssd_match",
]
