"""d2l's anchors (``multibox_prior`` of *Dive into Deep Learning*, 14.4 / 14.7).

On a feature map of ``fh x fw`` pixels, with sizes ``s_1..s_n`` and ratios ``r_1..r_m``
(fractions of the input), every pixel gets ``n + m - 1`` boxes centred at its centre
``((x + 0.5) / fw, (y + 0.5) / fh)``: ``(s_i, r_1)`` for every size, then ``(s_1, r_j)``
for ``j > 1``. A box of size ``s`` and ratio ``r`` is ``s * sqrt(r) * fh / fw`` wide and
``s / sqrt(r)`` high, both normalised to the input (d2l's factor ``fh / fw`` makes a
ratio-1 box square in pixels on a map with the input's proportions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.anchors.base import AnchorGenerator
from ssdlit.anchors.grid import AnchorGrid
from ssdlit.registry import ANCHORS

__all__ = ["D2LAnchorGenerator", "d2l_shapes"]


def d2l_shapes(sizes: Sequence[float], ratios: Sequence[float]) -> list[tuple[float, float]]:
    """The ``n + m - 1`` (size, ratio) pairs of one pixel, in d2l's order."""
    return [(float(s), float(ratios[0])) for s in sizes] + [
        (float(sizes[0]), float(r)) for r in ratios[1:]
    ]


@ANCHORS.register("d2l")
class D2LAnchorGenerator(AnchorGenerator):
    """d2l's ``multibox_prior`` on every level (its TinySSD calls it once per map).

    Args:
        image_size: network input ``(H, W)`` in pixels.
        sizes: one list of sizes per level (fractions of the input; d2l's TinySSD:
            ``[[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]``).
        ratios: one list of ratios (width / height) per level, or one flat list for every
            level (TinySSD: ``[1, 2, 0.5]``).

    Centres are the pixel centres of each feature map (``steps`` = input / feature size,
    offset 0.5, as d2l); boxes are not clipped (d2l does not clip). ``__call__`` returns
    ``[A, 4]`` cxcywh normalised to the input, order (level, row y, column x, box).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        sizes: Sequence[Sequence[float]],
        ratios: Sequence[float] | Sequence[Sequence[float]],
    ) -> None:
        super().__init__(image_size)
        if len(sizes) == 0:
            raise ValueError("d2l anchors need at least one level of sizes")
        self.sizes = [[float(s) for s in level] for level in sizes]
        if all(isinstance(r, (int, float)) for r in ratios):
            self.ratios = [[float(r) for r in ratios] for _ in self.sizes]
        else:
            self.ratios = [[float(r) for r in level] for level in ratios]  # type: ignore[union-attr]
        if len(self.ratios) != len(self.sizes):
            raise ValueError(
                f"d2l: sizes and ratios need one entry per level: {len(self.sizes)} vs "
                f"{len(self.ratios)}"
            )
        for level, (s, r) in enumerate(zip(self.sizes, self.ratios, strict=True)):
            if not s or not r:
                raise ValueError(f"d2l: level {level} needs at least one size and one ratio")
            if min(s) <= 0 or min(r) <= 0:
                raise ValueError(f"d2l: sizes and ratios must be positive, level {level}: {s}, {r}")

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def _normalised_wh(self, level: int, feature_size: tuple[int, int]) -> Tensor:
        """Widths and heights ``[n, 2]`` (float64, fractions of the input) on ``fh x fw``."""
        fh, fw = feature_size
        wh = [
            (s * math.sqrt(r) * fh / fw, s / math.sqrt(r))
            for s, r in d2l_shapes(self.sizes[level], self.ratios[level])
        ]
        return torch.tensor(wh, dtype=torch.float64)

    def cell_sizes(self, level: int) -> Tensor:
        """Box widths and heights ``[n, 2]`` in pixels on a map with the input's proportions.

        There the factor ``fh / fw`` is ``H / W``: a box is ``s * sqrt(r) * H`` by
        ``s / sqrt(r) * H`` pixels. :meth:`__call__` uses each map's own ``fh / fw``.
        """
        img_h, img_w = self.image_size
        wh = self._normalised_wh(level, (img_h, img_w))
        return wh * torch.tensor([img_w, img_h], dtype=torch.float64)

    def grid(self, feature_sizes: Sequence[Sequence[int]]) -> AnchorGrid:
        """The grid on maps of ``feature_sizes`` (``(h, w)`` per level), normalised:
        centres at ``(i + 0.5) / f`` and each map's own box sizes."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} is configured for {self.num_levels} levels, "
                f"got {len(feature_sizes)} feature sizes: {list(feature_sizes)}"
            )
        levels = []
        f64 = torch.float64
        for level, size in enumerate(feature_sizes):
            fh, fw = int(size[0]), int(size[1])
            wh = self._normalised_wh(level, (fh, fw))  # [n, 2]
            cy = (torch.arange(fh, dtype=f64) + 0.5) / fh  # [fh]
            cx = (torch.arange(fw, dtype=f64) + 0.5) / fw  # [fw]
            levels.append((cx, cy, wh))
        return AnchorGrid.of(levels)
