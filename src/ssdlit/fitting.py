"""Settings derived from the training data at start-up, instead of fitted by hand.

What a small-data recipe (``+experiment=small_data``) must not hard-code, because it
depends on the dataset, computed from the TRAINING images only (never validation or test):

- :func:`fit_anchors`: the SSD anchors' scales and aspect ratios. Candidates span the
  training boxes' sizes (``sqrt(w * h)`` as a fraction of the shorter input side) between two
  quantiles, geometrically over the levels, with aspect ratios ``{1, r, 1/r}`` around the
  boxes' spread of ``w / h``; the candidate whose anchors (laid out on the detector's real
  grid) give the training boxes the highest mean best IoU, among those that reach nearly as
  many boxes with IoU >= 0.5 as the best candidate (:data:`RECALL_SLACK`), wins. The number of anchors per
  location stays what the configured ratio lists give.
- :func:`fit_max_zoom`: the zoom-out range of the SSD augmentation: the factor that brings
  the median training box down to the smallest anchor (1 to 4; the paper uses 4).
- :func:`fit_epochs`: the number of epochs that fit a time budget, from a measured time per
  training step and per validation pass.

Every fitted value is logged and saved with the run (``fitted.yaml``), and the run's
``config.yaml`` holds them, so a rerun with the same config trains the same detector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssdlit.anchors.kmeans import anchor_coverage
from ssdlit.detector import build_component
from ssdlit.registry import ANCHORS, BACKBONES

__all__ = [
    "MARGIN",
    "AnchorFit",
    "box_sizes_and_ratios",
    "feature_sizes",
    "fit_anchors",
    "fit_epochs",
    "fit_max_zoom",
    "fit_to_data",
]

#: Quantiles of the box sizes the smallest and the largest anchor scale are placed at.
LOW_QUANTILES = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20)
HIGH_QUANTILES = (0.80, 0.90, 0.95, 0.98, 1.0)
#: Share of the time budget the fitted epochs are planned to take, for what the measured
#: step leaves out (checkpoints, the moving average, logging) and for other work on the
#: machine. Measured on raccoon (small_data, 2 cores): a quiet machine ran 148 planned epochs
#: in 0.92x the planned time; with a test suite running beside it, 163 epochs took 1.06x.
MARGIN = 0.9
#: How far below the best candidate's recall@0.5 the chosen one may be (for a tighter fit).
RECALL_SLACK = 0.02
#: Quantiles of |log(w / h)| the non-square ratio r is placed at (plus the paper's 2).
RATIO_QUANTILES = (0.5, 0.75, 0.9)


def box_sizes_and_ratios(boxes: Tensor, image_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Sizes and aspect ratios of boxes as the network sees them after a plain resize.

    Args:
        boxes: ``[N, 4]`` xyxy normalised by their image's size.
        image_size: the network input ``(H, W)``.

    Returns:
        ``sizes [N]``: ``sqrt(w * h)`` in input pixels over the shorter input side (the unit
        of the ``ssd`` generator's scales), and ``ratios [N]``: ``w / h`` in input pixels.
    """
    h, w = float(image_size[0]), float(image_size[1])
    bw = (boxes[:, 2] - boxes[:, 0]).double().clamp(min=1e-6) * w
    bh = (boxes[:, 3] - boxes[:, 1]).double().clamp(min=1e-6) * h
    return (bw * bh).sqrt() / min(h, w), bw / bh


def feature_sizes(backbone: Mapping[str, Any], image_size: Sequence[int]) -> list[tuple[int, int]]:
    """The backbone's feature-map sizes ``(h, w)`` for ``image_size``, on the meta device."""
    spec = {**backbone, "pretrained": False} if "pretrained" in backbone else dict(backbone)
    with torch.device("meta"):
        net = build_component(BACKBONES, spec)
        feats = net.eval()(torch.zeros(1, 3, int(image_size[0]), int(image_size[1])))
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]


@dataclass(frozen=True)
class AnchorFit:
    """The fitted anchors and how well they reach the training boxes.

    Attributes:
        scales: ``levels + 1`` scales (fractions of the shorter input side).
        aspect_ratios: one list per level (ratio 1 first, as configured).
        mean_best_iou: over the training boxes, the IoU with their best anchor.
        recall: share of training boxes whose best anchor has IoU >= 0.5.
        configured: the same two numbers for the configured anchors, to compare.
        quantiles: the size quantiles the smallest and largest scales were placed at.
    """

    scales: list[float]
    aspect_ratios: list[list[float]]
    mean_best_iou: float
    recall: float
    configured: dict[str, float] = field(default_factory=dict)
    quantiles: tuple[float, float] = (0.0, 0.0)

    def summary(self) -> str:
        ratios = sorted({round(r, 3) for level in self.aspect_ratios for r in level})
        was = self.configured
        return (
            f"anchors fitted to the training boxes: scales {[round(s, 3) for s in self.scales]} "
            f"(size quantiles {self.quantiles[0]:g}-{self.quantiles[1]:g}), aspect ratios "
            f"{ratios}; mean best IoU {self.mean_best_iou:.3f}, recall@0.5 {self.recall:.1%} "
            f"(configured anchors: {was.get('mean_best_iou', float('nan')):.3f}, "
            f"{was.get('recall', float('nan')):.1%})"
        )


def _ratio_list(template: Sequence[float], r: float) -> list[float]:
    """The configured list of one level with its non-square ratios replaced by ``r^k, 1/r^k``
    (the first pair by r, a second pair by r^2: the same count as configured)."""
    others = [a for a in template if a != 1.0]
    out: list[float] = [1.0] if 1.0 in template else []
    for k in range(len(others) // 2):
        out += [r ** (k + 1), 1.0 / r ** (k + 1)]
    if len(others) % 2:  # an odd list: its last ratio kept
        out.append(float(others[-1]))
    return out


def _per_level(aspect_ratios: Sequence, levels: int) -> list[list[float]]:
    if all(isinstance(a, (int, float)) for a in aspect_ratios):
        return [[float(a) for a in aspect_ratios] for _ in range(levels)]
    return [[float(a) for a in level] for level in aspect_ratios]


def _coverage(
    anchors_spec: Mapping[str, Any], image_size: Sequence[int], sizes: list[tuple[int, int]], gt
) -> tuple[float, float]:
    """(recall@0.5, mean best IoU) of the boxes ``gt`` under the anchors of a spec."""
    gen = build_component(ANCHORS, anchors_spec, image_size=tuple(int(s) for s in image_size))
    cov = anchor_coverage(gt, gen(sizes))
    return cov.recall, cov.mean_best_iou


def fit_anchors(
    boxes: Tensor,
    anchors: Mapping[str, Any],
    backbone: Mapping[str, Any],
    image_size: Sequence[int],
) -> AnchorFit:
    """Scales and aspect ratios of an ``ssd`` anchors spec fitted to training boxes.

    Args:
        boxes: ``[N, 4]`` xyxy normalised, the training images' boxes (N >= 1).
        anchors: the configured ``ssd`` anchors spec (its ``scales`` give the number of
            levels, its ``aspect_ratios`` the number of boxes per location, kept).
        backbone: the backbone spec (its feature-map sizes lay the anchors out).
        image_size: the network input ``(H, W)``.

    Returns:
        Among the candidates whose recall@0.5 is within :data:`RECALL_SLACK` of the best
        candidate's, the one with the highest mean best IoU; with the configured anchors'
        numbers to compare.
    """
    if anchors.get("name") != "ssd":
        raise ValueError(f"fitting needs the 'ssd' anchor generator, got {anchors.get('name')!r}")
    if boxes.shape[0] == 0:
        raise ValueError("no training boxes to fit the anchors to")
    grid = feature_sizes(backbone, image_size)
    levels = len(grid)
    gt = boxes.float()
    sizes, ratios = box_sizes_and_ratios(boxes, image_size)
    log_spread = ratios.log().abs()
    base = _per_level(anchors.get("aspect_ratios", [1.0, 2.0, 0.5]), levels)
    recall0, miou0 = _coverage(anchors, image_size, grid, gt)
    configured = {"recall": recall0, "mean_best_iou": miou0}
    candidates_r = sorted(
        {2.0} | {max(1.25, float(math.exp(log_spread.quantile(q)))) for q in RATIO_QUANTILES}
    )
    found: list[tuple[float, float, dict[str, Any], tuple[float, float]]] = []
    for lo, hi, r in product(LOW_QUANTILES, HIGH_QUANTILES, candidates_r):
        s_lo, s_hi = float(sizes.quantile(lo)), float(sizes.quantile(hi))
        s_hi = max(s_hi, s_lo * 1.05)
        scales = np.geomspace(s_lo, s_hi, levels).tolist() if levels > 1 else [s_lo]
        step = scales[-1] / scales[-2] if levels > 1 else 1.5
        scales.append(min(scales[-1] * step, 1.05))  # the extra square of the last level
        spec = {
            **anchors,
            "scales": [round(s, 4) for s in scales],
            "aspect_ratios": [[round(a, 4) for a in _ratio_list(t, r)] for t in base],
        }
        recall, miou = _coverage(spec, image_size, grid, gt)
        found.append((recall, miou, spec, (lo, hi)))
    # Reach (nearly) every box the best candidate reaches, then be tight: a few outliers
    # must not stretch the scales away from where the boxes are.
    reach = max(f[0] for f in found) - RECALL_SLACK
    recall, miou, spec, quantiles = max((f for f in found if f[0] >= reach), key=lambda f: f[1])
    return AnchorFit(
        scales=list(spec["scales"]),
        aspect_ratios=[list(level) for level in spec["aspect_ratios"]],
        mean_best_iou=miou,
        recall=recall,
        configured=configured,
        quantiles=quantiles,
    )


def fit_max_zoom(boxes: Tensor, image_size: Sequence[int], smallest_scale: float) -> float:
    """The zoom-out range: median training box size over the smallest anchor scale, in [1, 4].

    Zooming out by ``z`` shrinks every box by ``z``; beyond this factor the typical object
    would become smaller than any anchor. Rounded to 0.1.
    """
    sizes, _ = box_sizes_and_ratios(boxes, image_size)
    z = float(sizes.median()) / max(float(smallest_scale), 1e-6)
    return round(min(4.0, max(1.0, z)), 1)


def fit_epochs(
    budget_seconds: float,
    steps_per_epoch: int,
    seconds_per_step: float,
    seconds_per_validation: float = 0.0,
    validate_every: int = 1,
    margin: float = MARGIN,
    max_epochs: int = 1000,
) -> int:
    """Epochs that fit ``margin * budget_seconds`` (:data:`MARGIN`): each epoch costs its
    steps, plus a validation pass every ``validate_every`` epochs; at least 1, at most
    ``max_epochs``."""
    per_epoch = steps_per_epoch * seconds_per_step + seconds_per_validation / max(1, validate_every)
    if per_epoch <= 0:
        return max_epochs
    return int(max(1, min(max_epochs, math.floor(margin * budget_seconds / per_epoch))))


def fit_to_data(
    options: Mapping[str, Any],
    boxes: Tensor,
    *,
    anchors: Mapping[str, Any],
    backbone: Mapping[str, Any],
    image_size: Sequence[int],
) -> tuple[dict[str, Any], list[str]]:
    """The config values a run's ``fit`` options derive from its training boxes.

    Args:
        options: ``{anchors: bool, max_zoom: bool, ...}`` (the ``fit`` config; ``minutes``
            is the train app's, it needs the built module).
        boxes: ``[N, 4]`` xyxy normalised, the training part's boxes.
        anchors, backbone, image_size: the run's specs.

    Returns:
        ``updates``, nested like the config (``{"anchors": {"scales": ..., "aspect_ratios":
        ...}, "augment": {"train": {"max_zoom": ...}}}``), and one line per fitted value.
    """
    updates: dict[str, Any] = {}
    lines: list[str] = []
    scales = anchors.get("scales") or [float("nan")]
    if options.get("anchors"):
        fit = fit_anchors(boxes, anchors, backbone, image_size)
        updates["anchors"] = {"scales": fit.scales, "aspect_ratios": fit.aspect_ratios}
        updates["anchor_fit"] = {
            "mean_best_iou": round(fit.mean_best_iou, 4),
            "recall": round(fit.recall, 4),
            "configured": {k: round(v, 4) for k, v in fit.configured.items()},
            "size_quantiles": list(fit.quantiles),
        }
        lines.append(fit.summary())
        scales = fit.scales
    if options.get("max_zoom"):
        zoom = fit_max_zoom(boxes, image_size, float(scales[0]))
        median = float(box_sizes_and_ratios(boxes, image_size)[0].median())
        updates["augment"] = {"train": {"max_zoom": zoom}}
        lines.append(
            f"zoom out up to {zoom:g}x: the median training box ({median:.3f} of the shorter "
            f"side) down to the smallest anchor ({float(scales[0]):.3f})"
        )
    return updates, lines
