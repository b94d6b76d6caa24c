"""IoU of gt boxes against one fixed anchor set: dense, and sparse on anchor grids.

:class:`AnchorOverlaps` computes the IoU of batched gt boxes with the anchors. When
it knows the anchors' grid (the ``(fh, fw, n)`` shapes of an
:class:`~ssdlit.anchors.grid.AnchorGrid`, in anchor order), every level is a product:
the x-interval of an anchor depends only on its column and box, the y-interval only
on its row and box. The dense IoU is then an outer product per level, and
:meth:`AnchorOverlaps.above` lists the (gt, anchor) pairs above a threshold without
the dense matrix. Both give exactly the values of the direct formula (same
operations on the same numbers). Without the grid (hand-made anchors) only the
dense direct formula is available. Clipped grids keep the block structure (the dense
product is exact) but not the evenly spaced centres that :meth:`above` relies on:
their owner passes no ``shapes``, and they take the dense path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssdlit.boxes import convert

__all__ = ["AnchorOverlaps", "masked_iou", "overlaps_for"]


def _starts(shapes: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """``(start, fh, fw, n)`` of every level from the grid's ``(fh, fw, n)``."""
    levels, start = [], 0
    for fh, fw, n in shapes:
        levels.append((start, int(fh), int(fw), int(n)))
        start += fh * fw * n
    return levels


class AnchorOverlaps:
    """IoU of batched gt boxes against one fixed anchor set, built for speed.

    Anchors from a generator form product grids: on a level the x-interval of an
    anchor depends only on its column and box, the y-interval only on its row and box.
    The intersection of a gt with a whole level is then the outer product of its
    widths ``[fw, n]`` and heights ``[fh, n]``, written in one operation; the IoU
    equals the direct formula (same operations on the same numbers). Anchors that
    are not product grids (clipped, hand-made) take the direct path.

    The tables are derived from ``anchors_cxcywh [A, 4]`` (kept as :attr:`anchors`) and
    belong to them: whoever owns the anchors owns their tables (a
    :class:`~ssdlit.Detector` builds them with its anchors and rebuilds them when it
    moves); a matcher given a plain tensor builds its own.
    """

    def __init__(
        self, anchors_cxcywh: Tensor, shapes: Sequence[tuple[int, int, int]] | None = None
    ) -> None:
        if anchors_cxcywh.dim() != 2 or anchors_cxcywh.shape[-1] != 4:
            raise ValueError(f"anchors must be [A, 4], got {tuple(anchors_cxcywh.shape)}")
        if shapes is not None and sum(fh * fw * n for fh, fw, n in shapes) != len(anchors_cxcywh):
            raise ValueError(
                f"the grid shapes {list(shapes)} do not hold {len(anchors_cxcywh)} anchors"
            )
        self.anchors = anchors_cxcywh.detach()
        xyxy = convert(self.anchors, "cxcywh", "xyxy")
        self.columns = tuple(c.contiguous() for c in xyxy.t())  # x1, y1, x2, y2: [A] each
        self.area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])  # [A]
        self.levels = _starts(shapes) if shapes is not None else None
        # With positive anchor areas the union is never 0 (it is at least the anchor's).
        self._may_divide_by_zero = bool((self.area <= 0).any())
        self._work: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._priors: tuple[Tensor, Tensor] | None = None
        self.parts: list[tuple[int, int, int, int, Tensor, Tensor]] = []
        for start, fh, fw, n in self.levels or []:
            block = xyxy[start : start + fh * fw * n].view(fh, fw, n, 4)
            x_int = block[0, :, :, 0::2].contiguous()  # [fw, n, 2] (x1, x2)
            y_int = block[:, 0, :, 1::2].contiguous()  # [fh, n, 2] (y1, y2)
            self.parts.append((start, fh, fw, n, x_int, y_int))
        self._tables = self._interval_tables() if self.parts else None

    def priors(self) -> tuple[Tensor, Tensor]:
        """The distinct anchor sizes ``[U, 2]`` (w, h) and each anchor's index among them
        ``[A]`` (``torch.unique`` once, then kept: its size depends on the data, which
        would cost a host synchronisation per call on a GPU)."""
        if self._priors is None:
            self._priors = torch.unique(self.anchors[:, 2:], dim=0, return_inverse=True)
        return self._priors

    @property
    def shapes(self) -> list[tuple[int, int, int]] | None:
        """The grid's ``(fh, fw, n)`` per level, or None (hand-made anchors)."""
        return None if self.levels is None else [(fh, fw, n) for _, fh, fw, n in self.levels]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the anchors (and of every IoU computed here)."""
        return self.anchors.dtype

    @property
    def device(self) -> torch.device:
        """The device of the anchors."""
        return self.anchors.device

    def __repr__(self) -> str:
        return (
            f"AnchorOverlaps(anchors={self.anchors.shape[0]}, dtype={self.dtype}, "
            f"device={self.device}, sparse={self.sparse})"
        )

    def _interval_tables(self) -> dict[str, Tensor]:
        """Per anchor group g (level, box k), what :meth:`above` needs: the x and y
        intervals of the groups' columns and rows concatenated over groups (``x1``,
        ``x2`` ``[Cx]``, ``y1``, ``y2`` ``[Cy]``), each group's largest anchor
        ``size [K, 2]`` and smallest area ``amin [K]``, the affine map from the
        intersection ends to cell indices (``shift``, ``scale``, ``eps``, clamped to
        ``low``/``high``, all ``[K, 4]``: -first column, -first row, last column, last
        row) and ``group [K, 5]``: the anchor index of cell (row r, column c) is
        ``base + r * row_step + c * n``, then the group's first column and row in the
        interval tables."""
        xs, ys = [], []
        rows: list[tuple] = []
        x_off = y_off = 0
        for start, fh, fw, n, xi, yi in self.parts:
            level_area = self.area[start : start + fh * fw * n].view(fh * fw, n)
            cx, cy = xi.mean(dim=2), yi.mean(dim=2)  # [fw, n], [fh, n] centres
            for k in range(n):
                xs.append(xi[:, k])
                ys.append(yi[:, k])
                rows.append(
                    (
                        (x_off, y_off),
                        (
                            float((xi[:, k, 1] - xi[:, k, 0]).max()),
                            float((yi[:, k, 1] - yi[:, k, 0]).max()),
                        ),
                        float(level_area[:, k].min()),
                        (float(cx[0, k]), float(cy[0, k])),
                        (  # a single column or row: any spacing works (clamped to the grid)
                            float(cx[-1, k] - cx[0, k]) / (fw - 1) if fw > 1 else 1.0,
                            float(cy[-1, k] - cy[0, k]) / (fh - 1) if fh > 1 else 1.0,
                        ),
                        (fw, fh),
                        (start + k, fw * n, n),
                    )
                )
                x_off, y_off = x_off + fw, y_off + fh
        # The pruning bounds in float32 or wider (float16 rounding would lose pairs);
        # the IoU itself stays in the anchors' dtype.
        dev, dt = self.area.device, torch.promote_types(self.area.dtype, torch.float32)
        off, size, amin, first, step, cells, index = zip(*rows, strict=True)

        def table(values: tuple, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        size_t, first_t, step_t = table(size, dt), table(first, dt), table(step, dt)
        last = table(cells, dt) - 1  # [K, 2] the last column, row
        x, y = torch.cat(xs), torch.cat(ys)
        base, row_step, n = zip(*index, strict=True)
        return {
            "x1": x[:, 0].contiguous(),
            "x2": x[:, 1].contiguous(),
            "y1": y[:, 0].contiguous(),
            "y2": y[:, 1].contiguous(),
            "size": size_t,
            "amin": table(amin, dt),
            "eps": torch.tensor(1e-3, dtype=dt, device=dev),
            # Centres i with first + i * step inside [lo + need - size / 2, hi - need +
            # size / 2] as -start and stop in one affine map + floor: (lo + need, hi -
            # need) minus "shift", times "scale", plus the margin (1/1000 cell).
            "shift": torch.cat((first_t + size_t / 2, first_t - size_t / 2), dim=1),  # [K, 4]
            "scale": torch.cat((-1 / step_t, 1 / step_t), dim=1),
            "low": torch.cat((-(last + 1), last.new_full(last.shape, -1.0)), dim=1),
            "high": torch.cat((torch.zeros_like(last), last), dim=1),
            # per group: first anchor, anchors per row, per cell, first column, first row
            "group": torch.stack(
                (
                    table(base, torch.long),
                    table(row_step, torch.long),
                    table(n, torch.long),
                    *table(off, torch.long).unbind(1),
                ),
                dim=1,
            ),  # [K, 5]
        }

    @property
    def sparse(self) -> bool:
        """Whether :meth:`above` can skip the anchors that cannot reach a threshold."""
        return self._tables is not None

    def above(self, boxes: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        """Every (box, anchor) pair with IoU ``>= threshold``, without the dense matrix.

        On a group of anchors of one size (level, box k), a pair can only reach
        ``threshold`` where the intersection width is at least
        ``need = max(t * max(gt area, anchor area), t / (1 + t) * (gt area + anchor area))
        / min(gt height, anchor height)`` (and likewise the height), that is for anchor
        centres within ``[x1 + need - w / 2, x2 - need + w / 2]``: a range of columns
        times a range of rows (with a margin against rounding). Only those cells are
        computed, with the same operations on the same numbers as :meth:`__call__`, so
        the values equal the dense IoU exactly.

        Args:
            boxes: ``[M, 4]`` xyxy, the dtype of the anchors.
            threshold: > 0.
        Returns:
            ``rows [N]`` (index into boxes), ``anchors [N]`` and ``iou [N]``: every pair
            whose IoU is ``>= threshold``.
        """
        t = self._tables
        if t is None:
            raise RuntimeError("above() needs anchors that form product grids")
        num_groups = t["group"].shape[0]
        wide = boxes.to(t["size"].dtype)
        lo, hi = wide[:, None, :2], wide[:, None, 2:]  # [M, 1, 2] (x, y)
        extent = hi - lo
        area = extent.prod(dim=2)  # [M, 1]
        # IoU >= t needs inter = iw * ih >= t * union, where union >= max(areas) and
        # union = sum(areas) - inter (so inter >= t / (1 + t) * sum(areas)); ih <= min(heights).
        margin = 1 - 1e-4
        need = torch.maximum(
            area.clamp(min=t["amin"]) * (threshold * margin),
            (area + t["amin"]) * (threshold / (1 + threshold) * margin),
        )  # [M, K] the least intersection area
        short = torch.minimum(extent, t["size"])  # [M, K, 2] the most intersection w, h
        need = need[..., None] / short.flip(-1)  # [M, K, 2] the least intersection w, h
        ends = torch.cat((lo + need, hi - need), dim=2).sub_(t["shift"])  # [M, K, 4]
        # -first column, -first row, last column, last row (clamped to the grid)
        bounds = torch.addcmul(t["eps"], ends, t["scale"]).floor_()
        bounds = torch.clamp_(bounds, min=t["low"], max=t["high"])
        span = (bounds[..., 2:] + bounds[..., :2]).add_(1).clamp_(min=0)  # [M, K, 2] columns, rows
        possible = (need <= short).all(dim=2)  # NaN: False
        count = torch.where(possible, span.prod(dim=2), 0).long().flatten()  # [M * K] cells
        pairs = count.nonzero().squeeze(1)  # [P] flat (box, group) ids with cells
        if pairs.numel() == 0:
            empty = pairs.new_empty(0)
            return empty, empty, boxes.new_empty(0)
        count = count.index_select(0, pairs)
        m = pairs // num_groups
        group = t["group"].index_select(0, pairs % num_groups)  # [P, 5]
        b4 = bounds.view(-1, 4).index_select(0, pairs).long()  # [P, 4]
        xy0 = group[:, 3:] - b4[:, :2]  # the pair's first cell in the interval tables
        # Per pair (int32 rows: half the per-cell memory): the first cell's anchor and
        # interval entries, the pair's first cell in the output, its width, the strides.
        table = torch.stack(
            (
                group[:, 0] - b4[:, 1] * group[:, 1] - b4[:, 0] * group[:, 2],
                xy0[:, 0],
                xy0[:, 1],
                torch.cumsum(count, 0) - count,
                (b4[:, 2] + b4[:, 0]).add_(1),
                group[:, 1],
                group[:, 2],
            )
        ).int()  # [7, P]
        gt_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # as the dense IoU
        gt = torch.cat((boxes, gt_area[:, None]), dim=1).index_select(0, m).t().contiguous()
        cell_pair = torch.repeat_interleave(count)  # [N] the pair of each cell
        a0, x0, y0, c0, w, rs, ns = (c.index_select(0, cell_pair) for c in table)
        x1, y1, x2, y2, gt_area = (c.index_select(0, cell_pair) for c in gt)
        q = torch.arange(cell_pair.shape[0], dtype=torch.int32, device=pairs.device) - c0
        row = torch.div(q, w, rounding_mode="floor")
        col = q - row * w  # (row, col) within the pair's rectangle
        xi, yi = x0 + col, y0 + row
        iw = (
            torch.minimum(x2, t["x2"].index_select(0, xi))
            - torch.maximum(x1, t["x1"].index_select(0, xi))
        ).clamp_(min=0)
        ih = (
            torch.minimum(y2, t["y2"].index_select(0, yi))
            - torch.maximum(y1, t["y1"].index_select(0, yi))
        ).clamp_(min=0)
        inter = ih * iw
        anchor = a0 + row * rs + col * ns
        iou = inter / ((gt_area + self.area.index_select(0, anchor)) - inter)
        keep = (iou >= threshold).nonzero().squeeze(1)
        return (
            m.index_select(0, cell_pair.index_select(0, keep)),
            anchor.index_select(0, keep).long(),
            iou.index_select(0, keep),
        )

    def __call__(self, gt_boxes: Tensor, reuse: bool = False) -> Tensor:
        """IoU ``[B, G, A]`` of ``gt_boxes [B, G, 4]`` xyxy with the anchors.

        With ``reuse`` the result lives in a workspace that the next call with the
        same shape overwrites (no fresh allocation: large fresh tensors cost page
        faults on every call); use it for values consumed at once.
        """
        g = gt_boxes.to(self.area.dtype)
        b, m = g.shape[:2]
        flat = g.reshape(b * m, 4)
        x1, y1, x2, y2 = (c[:, None, None] for c in flat.unbind(-1))  # [BG, 1, 1]
        shape = (b * m, self.area.shape[0])
        if reuse:
            key = (shape, flat.dtype, flat.device)
            if key not in self._work:
                self._work.clear()
                self._work[key] = (flat.new_empty(shape), flat.new_empty(shape))
            inter, union = self._work[key]
        else:
            inter, union = flat.new_empty(shape), flat.new_empty(shape)  # [BG, A] each
        if self.parts and b * m > 4:  # (a few rows: fewer operations on the direct path)
            for start, fh, fw, n, xi, yi in self.parts:
                iw = (torch.minimum(x2, xi[..., 1]) - torch.maximum(x1, xi[..., 0])).clamp_(min=0)
                ih = (torch.minimum(y2, yi[..., 1]) - torch.maximum(y1, yi[..., 0])).clamp_(min=0)
                out = inter[:, start : start + fh * fw * n].view(b * m, fh, fw, n)
                torch.mul(ih[:, :, None, :], iw[:, None, :, :], out=out)  # [BG, fh, fw, n]
        else:
            ax1, ay1, ax2, ay2 = self.columns
            iw = (torch.minimum(x2[:, :, 0], ax2) - torch.maximum(x1[:, :, 0], ax1)).clamp_(min=0)
            ih = (torch.minimum(y2[:, :, 0], ay2) - torch.maximum(y1[:, :, 0], ay1)).clamp_(min=0)
            torch.mul(iw, ih, out=inter)
        torch.add(
            ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]))[:, None], self.area, out=union
        )
        union.sub_(inter)
        iou = inter.div_(union)
        if self._may_divide_by_zero:
            iou.nan_to_num_(0.0)  # a zero union (degenerate pair) gives IoU 0
        return iou.view(b, m, -1)


def overlaps_for(anchors: Tensor | AnchorOverlaps, like: Tensor) -> AnchorOverlaps:
    """The :class:`AnchorOverlaps` to match ``like`` (gt boxes) against.

    ``anchors`` is either the anchors ``[A, 4]`` cxcywh (dense only), or tables their
    owner built once with the grid (a :class:`~ssdlit.Detector` keeps them with its
    anchors), used as they are when they have the dtype and device of ``like`` and
    rebuilt from their anchors and grid otherwise. Nothing is cached here.
    """
    if isinstance(anchors, AnchorOverlaps):
        if anchors.dtype == like.dtype and anchors.device == like.device:
            return anchors
        return AnchorOverlaps(
            anchors.anchors.to(device=like.device, dtype=like.dtype), anchors.shapes
        )
    return AnchorOverlaps(anchors.detach().to(device=like.device, dtype=like.dtype))


def masked_iou(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor | AnchorOverlaps) -> Tensor:
    """IoU ``[B, G, A]`` of gt boxes ``[B, G, 4]`` (xyxy) and anchors ``[A, 4]`` (cxcywh,
    or their :class:`AnchorOverlaps`); padded rows (``gt_mask`` False) are -1."""
    iou = overlaps_for(anchors, gt_boxes)(gt_boxes)
    return iou.masked_fill_(~gt_mask[:, :, None], -1.0)
