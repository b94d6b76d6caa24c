"""The anchors as the generator lays them out: a grid per level, not a flat guess.

An :class:`AnchorGrid` holds, per level, the cell centres along x and y and the box
sizes of one cell (what every generator knows), plus the clipping rule. ``flat()``
gives the anchors ``[A, 4]`` cxcywh normalised in the order (level, row y, column x,
box); ``shapes`` gives each level's ``(fh, fw, n)``: the block structure that lets the
matcher compute overlaps per level as outer products (see
:class:`~ssdlit.anchors.matching.overlaps.AnchorOverlaps`). Clipping keeps that
structure (it acts on x and y intervals separately), so clipped grids are grids too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ssdlit.boxes import convert

__all__ = ["CLIP_MODES", "AnchorGrid", "GridLevel", "grid_boxes"]

CLIP_MODES = (False, True, "ssd_keras", "unit", "size")


def grid_boxes(cx: Tensor, cy: Tensor, wh: Tensor) -> Tensor:
    """The boxes of one level ``[fh * fw * n, 4]`` cxcywh, in the order (row y, column x, box).

    Args:
        cx: ``[fw]`` cell centres along x; cy: ``[fh]`` along y.
        wh: ``[n, 2]`` the widths and heights of a cell's boxes (the same units as the
            centres), or ``[fh, fw, n, 2]`` when they differ from cell to cell.
    """
    fh, fw, n = cy.shape[0], cx.shape[0], wh.shape[-2]
    cy_grid, cx_grid = torch.meshgrid(cy, cx, indexing="ij")  # [fh, fw] each
    wh = wh.expand(fh, fw, n, 2)
    boxes = torch.stack(
        (
            cx_grid[:, :, None].expand(fh, fw, n),
            cy_grid[:, :, None].expand(fh, fw, n),
            wh[..., 0],
            wh[..., 1],
        ),
        dim=-1,
    )  # [fh, fw, n, 4]
    return boxes.reshape(-1, 4)


@dataclass(frozen=True)
class GridLevel:
    """One level: centres ``cx [fw]``, ``cy [fh]`` and box sizes ``wh [n, 2]`` (float64,
    in the units of :attr:`AnchorGrid.scale`)."""

    cx: Tensor
    cy: Tensor
    wh: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(fh, fw, n)``: rows, columns and boxes per cell."""
        return int(self.cy.shape[0]), int(self.cx.shape[0]), int(self.wh.shape[0])


@dataclass(frozen=True)
class AnchorGrid:
    """Every level's grid, the units and the clipping rule of one anchor set.

    Args:
        levels: one :class:`GridLevel` per feature map, finest first.
        scale: ``(W, H)`` the levels' units per input (pixels: the input size; 1 when
            the levels are already normalised).
        clip: ``False``; ``True``/``"ssd_keras"`` (in pixels: below 0 -> 0, at or past
            the border -> size - 1); ``"unit"`` (clamp to [0, 1] after normalising);
            ``"size"`` (widths and heights clamped to the input, centres kept:
            torchvision's ``DefaultBoxGenerator(clip=True)``; the grid stays a grid).
    """

    levels: tuple[GridLevel, ...]
    scale: tuple[float, float] = (1.0, 1.0)
    clip: bool | str = False

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {self.clip!r}")

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """``(fh, fw, n)`` of every level, in anchor order."""
        return [level.shape for level in self.levels]

    @property
    def num_anchors(self) -> int:
        """A, the number of anchors of :meth:`flat`."""
        return sum(fh * fw * n for fh, fw, n in self.shapes)

    def flat(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Anchors ``[A, 4]`` cxcywh normalised, order (level, y, x, box); computed in
        float64 and cast to ``dtype`` at the end."""
        parts = [self._level(level) for level in self.levels]
        return torch.cat(parts, dim=0).to(device=device, dtype=dtype)

    def _level(self, level: GridLevel) -> Tensor:
        w, h = self.scale
        wh = level.wh
        if self.clip == "size":
            wh = torch.stack((wh[:, 0].clamp(0.0, w), wh[:, 1].clamp(0.0, h)), dim=1)
        boxes = grid_boxes(level.cx, level.cy, wh)  # [fh * fw * n, 4]
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        if self.clip in (False, "size"):
            # Straight in cxcywh: every anchor of one prior keeps exactly the same w, h.
            return boxes / scale
        boxes = convert(boxes, "cxcywh", "xyxy")
        if self.clip in (True, "ssd_keras"):
            x, y = boxes[..., 0::2], boxes[..., 1::2]
            x = torch.where(x >= w, w - 1.0, x).clamp(min=0)
            y = torch.where(y >= h, h - 1.0, y).clamp(min=0)
            boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
        boxes = boxes / scale
        if self.clip == "unit":
            boxes = boxes.clamp(0.0, 1.0)
        return convert(boxes, "xyxy", "cxcywh")

    @classmethod
    def of(
        cls,
        levels: Sequence[tuple[Tensor, Tensor, Tensor]],
        scale: tuple[float, float] = (1.0, 1.0),
        clip: bool | str = False,
    ) -> AnchorGrid:
        """From ``(cx, cy, wh)`` per level (any float tensors; stored as float64)."""
        f64 = torch.float64
        return cls(
            tuple(GridLevel(cx.to(f64), cy.to(f64), wh.to(f64)) for cx, cy, wh in levels),
            (float(scale[0]), float(scale[1])),
            clip,
        )
