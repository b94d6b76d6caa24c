"""The grid that every anchor generator shares.

A generator decides the box sizes of one cell per level (in input pixels); this
module lays them out over the feature map: centres at ``(offset + i) * step``,
order (level, row y, column x, box), output cxcywh normalised by the input size.
:meth:`AnchorGenerator.cells` gives, in the same order, each anchor's grid cell (its
unclipped centre, one step wide and high): what grid-relative box coders (YOLO) need,
from the very steps and offsets the anchors were laid out with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.anchors.grid import CLIP_MODES, AnchorGrid, grid_boxes

__all__ = ["AnchorGenerator", "PerLevel", "grid_boxes", "pair_per_level"]

Number = int | float
#: One number per level or a (y, x) pair per level.
PerLevel = Sequence[Number | Sequence[Number]]


def pair_per_level(
    values: PerLevel | None, levels: int, what: str
) -> list[tuple[float, float] | None]:
    """Normalise ``steps``/``offsets`` to one ``(y, x)`` pair (or None) per level."""
    if values is None:
        return [None] * levels
    if len(values) != levels:
        raise ValueError(
            f"{what} needs one entry per level ({levels}), got {len(values)}: {values}"
        )
    out: list[tuple[float, float] | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)):
            out.append((float(v), float(v)))
        elif len(v) == 2:
            out.append((float(v[0]), float(v[1])))
        else:
            raise ValueError(f"{what}: each entry is a number or a (y, x) pair, got {v!r}")
    return out


class AnchorGenerator(ABC):
    """Base class: subclasses give the box sizes of one cell per level.

    Args:
        image_size: network input ``(H, W)`` in pixels.
        steps: distance between cell centres in pixels, one number or ``(y, x)`` pair
            per level; ``None`` (or a ``None`` entry) uses input size / feature size.
        offsets: position of the first centre in units of the step, one number or
            ``(y, x)`` pair per level; ``None`` means 0.5 (the cell centre).
        clip: ``False`` keeps boxes as they are; ``True`` or ``"ssd_keras"`` clips
            corners as ssd_keras does (in pixels: below 0 -> 0, at or past the border
            -> size - 1); ``"unit"`` clamps corners to [0, 1] after normalising;
            ``"size"`` clamps widths and heights to the input and keeps the centres
            (torchvision's ``DefaultBoxGenerator(clip=True)``).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        steps: PerLevel | None = None,
        offsets: PerLevel | None = None,
        clip: bool | str = False,
    ) -> None:
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be (H, W) with positive sides, got {image_size}")
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._steps = steps
        self._offsets = offsets
        self.clip = clip

    # -- to be provided by subclasses ---------------------------------------------------
    @property
    @abstractmethod
    def num_levels(self) -> int:
        """Number of feature-map levels the generator is configured for."""

    @abstractmethod
    def cell_sizes(self, level: int) -> Tensor:
        """Box widths and heights ``[n, 2]`` (pixels, float64) of one cell of ``level``."""

    # -- shared -------------------------------------------------------------------------
    def num_anchors_per_location(self) -> list[int]:
        """Number of anchors in one cell, per level (sizes the head's predictors)."""
        return [int(self.cell_sizes(level).shape[0]) for level in range(self.num_levels)]

    def __call__(
        self,
        feature_sizes: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors ``[A, 4]`` cxcywh normalised to the input, order (level, y, x, box):
        ``self.grid(feature_sizes).flat(device, dtype)``."""
        return self.grid(feature_sizes).flat(device=device, dtype=dtype)

    def grid(self, feature_sizes: Sequence[Sequence[int]]) -> AnchorGrid:
        """The :class:`~ssdlit.anchors.grid.AnchorGrid` on maps of ``feature_sizes``
        (``(h, w)`` per level): centres ``(offset + i) * step`` and :meth:`cell_sizes`,
        in pixels, with this generator's clipping."""
        levels = []
        for level, (size, step, offset) in enumerate(self._grids(feature_sizes)):
            cx, cy, _, _ = self._centres(size, step, offset)
            levels.append((cx, cy, self.cell_sizes(level)))
        img_h, img_w = self.image_size
        return AnchorGrid.of(levels, scale=(img_w, img_h), clip=self.clip)

    def cells(
        self,
        feature_sizes: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The grid cell of every anchor ``[A, 4]`` cxcywh normalised, in anchor order.

        A cell is centred on its anchors' centre ``(offset + i) * step`` (before any
        clipping) and is one step of its level wide and high: with ``steps`` that
        differ from input size / feature size (SSD300's 8, 16, 32, 64, 100, 300 on
        38, 19, 10, 5, 3, 1 maps) the cells are the generator's, not ``1 / W``.
        """
        parts = []
        for level, (size, step, offset) in enumerate(self._grids(feature_sizes)):
            cx, cy, sx, sy = self._centres(size, step, offset)
            n = len(self.cell_sizes(level))
            step_wh = torch.tensor([[sx, sy]], dtype=torch.float64).expand(n, 2)  # [n, 2]
            parts.append(grid_boxes(cx, cy, step_wh))  # [fh * fw * n, 4] pixels
        scale = torch.tensor([self.image_size[1], self.image_size[0]] * 2, dtype=torch.float64)
        return (torch.cat(parts, dim=0) / scale).to(device=device, dtype=dtype)

    def _grids(
        self, feature_sizes: Sequence[Sequence[int]]
    ) -> list[tuple[tuple[int, int], tuple[float, float] | None, tuple[float, float] | None]]:
        """Per level: ``(fh, fw)``, the configured ``(step_y, step_x)`` and ``(off_y, off_x)``
        (``None``: the defaults of :meth:`_centres`)."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} is configured for {self.num_levels} levels, "
                f"got {len(feature_sizes)} feature sizes: {list(feature_sizes)}"
            )
        steps = pair_per_level(self._steps, self.num_levels, "steps")
        offsets = pair_per_level(self._offsets, self.num_levels, "offsets")
        return [
            ((int(fs[0]), int(fs[1])), steps[level], offsets[level])
            for level, fs in enumerate(feature_sizes)
        ]

    def _centres(
        self,
        feature_size: tuple[int, int],
        step: tuple[float, float] | None,
        offset: tuple[float, float] | None,
    ) -> tuple[Tensor, Tensor, float, float]:
        """Cell centres of one level in pixels, ``cx [fw]`` and ``cy [fh]`` (float64), and
        the steps ``step_x``, ``step_y``."""
        img_h, img_w = self.image_size
        fh, fw = feature_size
        step_y, step_x = step if step is not None else (img_h / fh, img_w / fw)
        off_y, off_x = offset if offset is not None else (0.5, 0.5)
        cy = (off_y + torch.arange(fh, dtype=torch.float64)) * step_y  # [fh]
        cx = (off_x + torch.arange(fw, dtype=torch.float64)) * step_x  # [fw]
        return cx, cy, float(step_x), float(step_y)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, levels={self.num_levels}, "
            f"per_location={self.num_anchors_per_location()})"
        )
