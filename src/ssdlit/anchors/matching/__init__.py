"""Matchers: which ground-truth box (if any) each anchor learns from.

- :mod:`.base`: ``BACKGROUND``/``IGNORE`` and the :class:`Matcher` contract;
- :mod:`.reference`: SSD matching as a readable specification on the dense IoU
  (also the path on accelerators and for anchors without a grid);
- :mod:`.overlaps`: IoU against one anchor set, dense and sparse on anchor grids;
- :mod:`.keys`: value-and-index int64 keys (one reduction finds "best, lowest index");
- :mod:`.ssd`, :mod:`.faster_rcnn`, :mod:`.yolov3`: the registered matchers;
- :mod:`.sampling`: the Faster R-CNN sampler of anchors per image.
"""

from ssdlit.anchors.matching.base import BACKGROUND, IGNORE, Matcher
from ssdlit.anchors.matching.faster_rcnn import FasterRCNNMatcher
from ssdlit.anchors.matching.overlaps import AnchorOverlaps, masked_iou, overlaps_for
from ssdlit.anchors.matching.reference import greedy_bipartite, ssd_match
from ssdlit.anchors.matching.sampling import MatchSampler
from ssdlit.anchors.matching.ssd import SSDMatcher
from ssdlit.anchors.matching.yolov3 import YOLOv3Matcher

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "AnchorOverlaps",
    "FasterRCNNMatcher",
    "MatchSampler",
    "Matcher",
    "SSDMatcher",
    "YOLOv3Matcher",
    "greedy_bipartite",
    "masked_iou",
    "overlaps_for",
    "ssd_match",
]
