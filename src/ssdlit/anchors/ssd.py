"""SSD anchors ("default boxes"): scale-based (paper, ssd_keras) and size-based (Caffe, SSD-TF)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.anchors.base import AnchorGenerator, PerLevel
from ssdlit.registry import ANCHORS

__all__ = ["SSDAnchorGenerator", "SSDCaffeAnchorGenerator", "ssd_cell_sizes"]


def ssd_cell_sizes(
    aspect_ratios: Sequence[float], size: float, next_size: float | None, two_boxes_for_ar1: bool
) -> Tensor:
    """Widths and heights ``[n, 2]`` (float64) of one SSD cell.

    One box per aspect ratio in the given order: ``w = size * sqrt(ar)``,
    ``h = size / sqrt(ar)``; right after the ratio-1 box, when ``two_boxes_for_ar1``
    and ``next_size`` is given, an extra square of side ``sqrt(size * next_size)``.
    """
    wh: list[tuple[float, float]] = []
    for ar in aspect_ratios:
        if ar <= 0:
            raise ValueError(f"aspect ratios must be positive, got {ar}")
        if ar == 1:
            wh.append((size, size))
            if two_boxes_for_ar1 and next_size is not None:
                extra = math.sqrt(size * next_size)
                wh.append((extra, extra))
        else:
            root = math.sqrt(ar)
            wh.append((size * root, size / root))
    return torch.tensor(wh, dtype=torch.float64)


def _ratios_per_level(aspect_ratios: Sequence, levels: int | None) -> list[list[float]]:
    """Accept one list per level, or one flat list shared by ``levels`` levels."""
    if len(aspect_ratios) == 0:
        raise ValueError("aspect_ratios must not be empty")
    if all(isinstance(a, (int, float)) for a in aspect_ratios):
        if levels is None:
            raise ValueError(
                "a flat aspect_ratios list needs scales or num_levels to know the levels"
            )
        return [[float(a) for a in aspect_ratios] for _ in range(levels)]
    return [[float(a) for a in level] for level in aspect_ratios]


@ANCHORS.register("ssd")
class SSDAnchorGenerator(AnchorGenerator):
    """The SSD paper's anchors, identical to ssd_keras's ``SSDInputEncoder``.

    Per level k a scale ``s_k`` (explicit ``scales``, one more than levels, or
    linear from ``min_scale`` to ``max_scale``); box side ``s_k * min(H, W)`` scaled
    by each aspect ratio; with ``two_boxes_for_ar1`` an extra square of side
    ``sqrt(s_k * s_k+1) * min(H, W)`` after the ratio-1 box.

    Args:
        image_size: input ``(H, W)`` in pixels.
        aspect_ratios: a list per level (``[[1, 2, .5], [1, 2, .5, 3, 1/3], ...]``),
            or one flat list used for every level (ratio = width / height).
        scales: ``num_levels + 1`` scales (fractions of the shorter input side).
        min_scale, max_scale: used when ``scales`` is None (``linspace`` over levels + 1).
        num_levels: needed only with a flat ``aspect_ratios`` and no ``scales``.
        steps, offsets, clip: see :class:`~ssdlit.anchors.base.AnchorGenerator`
            (``steps=None`` means input size / feature size, as in ssd_keras; the
            paper's SSD300 steps are in :meth:`ssd300`).
    """

    def __init__(
        self,
        image_size: Sequence[int] = (300, 300),
        aspect_ratios: Sequence = ((1.0, 2.0, 0.5),)
        + ((1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),) * 3
        + ((1.0, 2.0, 0.5),) * 2,
        scales: Sequence[float] | None = (0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05),
        min_scale: float | None = None,
        max_scale: float | None = None,
        two_boxes_for_ar1: bool = True,
        steps: PerLevel | None = None,
        offsets: PerLevel | None = None,
        clip: bool | str = False,
        num_levels: int | None = None,
    ) -> None:
        super().__init__(image_size, steps=steps, offsets=offsets, clip=clip)
        if scales is None and min_scale is not None and max_scale is not None:
            nested = not all(isinstance(a, (int, float)) for a in aspect_ratios)
            levels = len(aspect_ratios) if nested else num_levels
            if levels is None:
                raise ValueError(
                    "min_scale/max_scale with a flat aspect_ratios list need num_levels"
                )
            if not 0 < min_scale <= max_scale:
                raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
            scales = torch.linspace(min_scale, max_scale, levels + 1, dtype=torch.float64).tolist()
        if scales is None:
            raise ValueError("give either scales or both min_scale and max_scale")
        if any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {list(scales)}")
        self.scales = [float(s) for s in scales]
        self.aspect_ratios = _ratios_per_level(aspect_ratios, len(self.scales) - 1)
        if len(self.scales) != len(self.aspect_ratios) + 1:
            raise ValueError(
                f"scales needs one more entry than levels: {len(self.aspect_ratios)} levels of "
                f"aspect ratios, {len(self.scales)} scales"
            )
        self.two_boxes_for_ar1 = bool(two_boxes_for_ar1)

    @property
    def num_levels(self) -> int:
        return len(self.aspect_ratios)

    def cell_sizes(self, level: int) -> Tensor:
        side = float(min(self.image_size))
        return ssd_cell_sizes(
            self.aspect_ratios[level],
            self.scales[level] * side,
            self.scales[level + 1] * side,
            self.two_boxes_for_ar1,
        )

    @classmethod
    def ssd300(cls, **overrides) -> SSDAnchorGenerator:
        """The SSD300 Pascal VOC configuration: 8732 anchors on 38/19/10/5/3/1 maps."""
        cfg: dict = dict(image_size=(300, 300), steps=(8, 16, 32, 64, 100, 300))
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def ssd512(cls, **overrides) -> SSDAnchorGenerator:
        """The SSD512 Pascal VOC configuration: 24564 anchors on 64/32/16/8/4/2/1 maps."""
        cfg: dict = dict(
            image_size=(512, 512),
            scales=(0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05),
            aspect_ratios=((1.0, 2.0, 0.5),)
            + ((1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),) * 4
            + ((1.0, 2.0, 0.5),) * 2,
            steps=(8, 16, 32, 64, 128, 256, 512),
        )
        cfg.update(overrides)
        return cls(**cfg)


@ANCHORS.register("ssd_caffe")
class SSDCaffeAnchorGenerator(AnchorGenerator):
    """SSD anchors from absolute sizes in pixels (Caffe ``PriorBox`` / SSD-Tensorflow style).

    ``sizes`` holds one ``(min_size, max_size)`` pair per level (SSD300 from
    SSD-Tensorflow: ``(21, 45), (45, 99), (99, 153), (153, 207), (207, 261), (261, 315)``);
    the ratio-r box is ``min_size * sqrt(r)`` by ``min_size / sqrt(r)`` and the
    extra square after the ratio-1 box has side ``sqrt(min_size * max_size)``.
    A level given as ``(min_size,)`` or ``(min_size, None)`` has no extra square.

    Two ways to write the ratios, chosen by ``implicit_ar1`` (never guessed):

    - ``implicit_ar1=False`` (default): each level lists every ratio, 1 included
      (``[[1, 2, .5], [1, 2, .5, 3, 1/3], ...]``); boxes in the listed order, the extra
      square right after the ratio-1 box. A level without ratio 1 is refused: it is
      almost certainly a list written for the other convention.
    - ``implicit_ar1=True``: SSD-Tensorflow's ``anchor_ratios`` (``[[2, .5], [2, .5, 3,
      1/3], ...]``; Caffe's ``PriorBox`` is the same): per cell the ratio-1 box of side
      ``min_size``, the extra square (when the level has a ``max_size``), then one box per
      listed ratio: ``len(sizes) + len(ratios)`` boxes, as SSD-Tensorflow's
      ``ssd_anchor_one_layer``. Listing 1 is refused (it would be a second ratio-1 box).
    """

    def __init__(
        self,
        image_size: Sequence[int] = (300, 300),
        sizes: Sequence[Sequence[float | None]] = (
            (21, 45),
            (45, 99),
            (99, 153),
            (153, 207),
            (207, 261),
            (261, 315),
        ),
        aspect_ratios: Sequence = ((1.0, 2.0, 0.5),)
        + ((1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),) * 3
        + ((1.0, 2.0, 0.5),) * 2,
        two_boxes_for_ar1: bool = True,
        steps: PerLevel | None = (8, 16, 32, 64, 100, 300),
        offsets: PerLevel | None = None,
        clip: bool | str = False,
        implicit_ar1: bool = False,
    ) -> None:
        super().__init__(image_size, steps=steps, offsets=offsets, clip=clip)
        pairs: list[tuple[float, float | None]] = []
        for s in sizes:
            lo = float(s[0])
            hi = float(s[1]) if len(s) > 1 and s[1] is not None else None
            if lo <= 0 or (hi is not None and hi <= 0):
                raise ValueError(f"anchor sizes must be positive, got {s}")
            pairs.append((lo, hi))
        self.sizes = pairs
        ratios = _ratios_per_level(aspect_ratios, len(pairs))
        if len(ratios) != len(pairs):
            raise ValueError(
                f"sizes and aspect_ratios need one entry per level: {len(pairs)} vs {len(ratios)}"
            )
        self.implicit_ar1 = bool(implicit_ar1)
        for level, listed in enumerate(ratios):
            if self.implicit_ar1 and 1.0 in listed:
                raise ValueError(
                    f"ssd_caffe with implicit_ar1=true: level {level}'s aspect_ratios "
                    f"{listed} list ratio 1, but the ratio-1 box (and the extra square) "
                    "come first implicitly; remove 1 from the lists, or set "
                    "implicit_ar1=false to list every ratio yourself"
                )
            if not self.implicit_ar1 and 1.0 not in listed:
                raise ValueError(
                    f"ssd_caffe: level {level}'s aspect_ratios {listed} have no ratio 1, so "
                    "that level would get neither the ratio-1 box nor the extra square. "
                    "SSD-Tensorflow and Caffe write their ratio lists without 1 (the "
                    "ratio-1 box and the extra square are implicit): set implicit_ar1=true "
                    "(anchors.implicit_ar1=true) for that convention, or list 1 explicitly"
                )
        # Stored in the explicit form: the implicit boxes first, as SSD-Tensorflow orders them.
        self.aspect_ratios = [[1.0, *r] for r in ratios] if self.implicit_ar1 else ratios
        self.two_boxes_for_ar1 = bool(two_boxes_for_ar1)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def cell_sizes(self, level: int) -> Tensor:
        lo, hi = self.sizes[level]
        return ssd_cell_sizes(self.aspect_ratios[level], lo, hi, self.two_boxes_for_ar1)
