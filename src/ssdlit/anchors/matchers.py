"""Batched anchor matchers: which ground-truth box (if any) each anchor learns from.

Every matcher takes

- ``gt_boxes`` ``[B, G, 4]`` xyxy normalised to [0, 1] (padded to the largest G),
- ``gt_mask``  ``[B, G]`` bool, True for real boxes and False for padding,
- ``anchors``  ``[A, 4]`` cxcywh normalised,

and returns ``matches`` ``[B, A]`` long: the gt index (>= 0) an anchor regresses
to, :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2, enters no loss). The whole
batch is matched at once; the only Python loop is the rounds of the greedy
bipartite step (at most G), which is sequential by nature.

:class:`SSDMatcher` never builds the dense ``[M, A]`` IoU matrix for anchors that
form product grids (every generator's unclipped output): a gt can only reach the
matching thresholds on a rectangle of cells of each anchor level and size, so only
those pairs are computed (:meth:`AnchorOverlaps.above`), with results identical to
the dense computation (tested against it and against a loop restatement of ssd_keras).
Its bipartite bookkeeping works on one number per gt and on the candidates of the
few images where gts compete for an anchor: those steps run on the host in NumPy,
where an operation on a hundred numbers costs a microsecond instead of several.
:meth:`Matcher.match_positives` also returns the flat indices of the positives,
which the SSD matcher knows while matching (no second pass over ``matches``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from ssdlit.boxes import convert
from ssdlit.registry import MATCHERS

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "AnchorOverlaps",
    "FasterRCNNMatcher",
    "Matcher",
    "SSDMatcher",
    "YOLOv3Matcher",
    "greedy_on_candidates",
    "masked_iou",
    "overlaps_for",
    "positive_indices",
    "top_anchors",
]

BACKGROUND = -1
IGNORE = -2


def _grid_levels(anchors_cxcywh: Tensor) -> list[tuple[int, int, int, int]] | None:
    """Split anchors into product grids ``(start, fh, fw, n)``, or None if they are not.

    A level is a product grid when, in the order (row y, column x, box k), the centre x
    depends only on x, the centre y only on y and the size only on k: what every
    unclipped generator of ssdlit gives. Anything else returns None.
    """
    a = anchors_cxcywh.detach().cpu()
    total, start, levels = a.shape[0], 0, []
    while start < total:
        centre = a[start, :2]
        n = 1  # boxes in the first cell
        while start + n < total and torch.equal(a[start + n, :2], centre):
            n += 1
        fw = 1  # cells in the first row
        while start + (fw + 1) * n <= total and a[start + fw * n, 1] == centre[1]:
            fw += 1
        row0 = a[start : start + fw * n].view(fw, n, 4)
        fh = 1
        while start + (fh + 1) * fw * n <= total:
            row = a[start + fh * fw * n : start + (fh + 1) * fw * n].view(fw, n, 4)
            if not (
                torch.equal(row[..., 0], row0[..., 0])
                and torch.equal(row[..., 2:], row0[..., 2:])
                and bool((row[..., 1] == row[0, 0, 1]).all())
                and row[0, 0, 1] != a[start + (fh - 1) * fw * n, 1]
            ):
                break
            fh += 1
        block = a[start : start + fh * fw * n].view(fh, fw, n, 4)
        if not (
            bool((block[..., 0] == block[:1, :, :1, 0]).all())
            and bool((block[..., 1] == block[:, :1, :1, 1]).all())
            and bool((block[..., 2:] == block[:1, :1, :, 2:]).all())
        ):
            return None
        levels.append((start, fh, fw, n))
        start += fh * fw * n
    return levels if len(levels) <= 32 else None


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

    def __init__(self, anchors_cxcywh: Tensor) -> None:
        if anchors_cxcywh.dim() != 2 or anchors_cxcywh.shape[-1] != 4:
            raise ValueError(f"anchors must be [A, 4], got {tuple(anchors_cxcywh.shape)}")
        self.anchors = anchors_cxcywh.detach()
        xyxy = convert(self.anchors, "cxcywh", "xyxy")
        self.columns = tuple(c.contiguous() for c in xyxy.t())  # x1, y1, x2, y2: [A] each
        self.area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])  # [A]
        self.levels = _grid_levels(self.anchors)
        # With positive anchor areas the union is never 0 (it is at least the anchor's).
        self._may_divide_by_zero = bool((self.area <= 0).any())
        self._work: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.parts: list[tuple[int, int, int, int, Tensor, Tensor]] = []
        for start, fh, fw, n in self.levels or []:
            block = xyxy[start : start + fh * fw * n].view(fh, fw, n, 4)
            x_int = block[0, :, :, 0::2].contiguous()  # [fw, n, 2] (x1, x2)
            y_int = block[:, 0, :, 1::2].contiguous()  # [fh, n, 2] (y1, y2)
            self.parts.append((start, fh, fw, n, x_int, y_int))
        self._tables = self._interval_tables() if self.parts else None

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
        dev, dt = self.area.device, self.area.dtype
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
        lo, hi = boxes[:, None, :2], boxes[:, None, 2:]  # [M, 1, 2] (x, y)
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
        gt = torch.cat((boxes, area), dim=1).index_select(0, m).t().contiguous()  # [5, P]
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

    ``anchors`` is either the anchors ``[A, 4]`` cxcywh, whose tables are computed here
    (correct, and as slow as that), or tables their owner built once (a
    :class:`~ssdlit.Detector` keeps them with its anchors), used as they are when they
    have the dtype and device of ``like`` and rebuilt from their anchors otherwise.
    Nothing is cached here: the tables always belong to the anchors they came from.
    """
    if isinstance(anchors, AnchorOverlaps):
        if anchors.dtype == like.dtype and anchors.device == like.device:
            return anchors
        anchors = anchors.anchors
    return AnchorOverlaps(anchors.detach().to(device=like.device, dtype=like.dtype))


def masked_iou(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor | AnchorOverlaps) -> Tensor:
    """IoU ``[B, G, A]`` of gt boxes ``[B, G, 4]`` (xyxy) and anchors ``[A, 4]`` (cxcywh,
    or their :class:`AnchorOverlaps`); padded rows (``gt_mask`` False) are -1."""
    iou = overlaps_for(anchors, gt_boxes)(gt_boxes)
    return iou.masked_fill_(~gt_mask[:, :, None], -1.0)


def _check(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> None:
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2] or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool [B, G] = {tuple(gt_boxes.shape[:2])}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")


class Matcher(ABC):
    """Base class: call with ``(gt_boxes, gt_mask, anchors)``, get ``matches [B, A]``.

    ``anchors`` is the anchors ``[A, 4]`` cxcywh or their :class:`AnchorOverlaps`
    (the tables their owner built once: the product path, see
    :meth:`ssdlit.Detector.anchor_overlaps`); with a plain tensor the built-in
    matchers compute the tables they need on every call. A subclass implements
    :meth:`match`, which always receives the anchors as a tensor.
    """

    def __call__(
        self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor | AnchorOverlaps
    ) -> Tensor:
        return self._checked(gt_boxes, gt_mask, anchors, positives=False)[0]

    @abstractmethod
    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        """``matches [B, A]`` for a batch with at least one (maybe padded) gt slot."""

    def match_positives(
        self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor | AnchorOverlaps
    ) -> tuple[Tensor, Tensor]:
        """``matches [B, A]`` (as a call gives) and ``positives [P]`` long: the flat
        indices into ``matches.view(-1)`` of its positive entries (``>= 0``), ascending
        (row-major). A matcher that knows its positives while matching returns them
        without searching ``matches`` again."""
        matches, positives = self._checked(gt_boxes, gt_mask, anchors, positives=True)
        return matches, positive_indices(matches) if positives is None else positives

    def _checked(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor | AnchorOverlaps,
        positives: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Checks the inputs, answers an empty batch, moves mask and anchors to the
        boxes' device, then :meth:`_match`."""
        overlaps = anchors if isinstance(anchors, AnchorOverlaps) else None
        anchors = overlaps.anchors if overlaps is not None else anchors
        _check(gt_boxes, gt_mask, anchors)
        if gt_boxes.shape[1] == 0:  # nothing to match: every anchor is background
            empty = gt_boxes.new_full(
                (gt_boxes.shape[0], anchors.shape[0]), BACKGROUND, dtype=torch.long
            )
            return empty, None
        dev = gt_boxes.device
        return self._match(gt_boxes, gt_mask.to(dev), anchors.to(dev), positives, overlaps)

    def _match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        positives: bool,
        overlaps: AnchorOverlaps | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``matches`` and, where the matcher finds them while matching (and
        ``positives`` asks for them), the flat indices of its positives; else None.
        ``overlaps``: the anchors' tables when the caller has them (a matcher that
        computes IoU uses them, see :func:`overlaps_for`)."""
        return self.match(gt_boxes, gt_mask, anchors), None


def positive_indices(matches: Tensor, block: int = 64) -> Tensor:
    """The flat indices ``[P]`` of ``matches >= 0`` (any shape), ascending, for sparse
    positives: blocks of ``block`` entries are tested first (one max per block), and
    only the blocks that hold a positive are searched, which touches far less memory
    than a full boolean mask."""
    flat = matches.reshape(-1)
    if flat.numel() % block or flat.numel() == 0:
        return (flat >= 0).nonzero().squeeze(1)
    blocks = flat.view(-1, block)
    hit = (blocks.amax(dim=1) >= 0).nonzero().squeeze(1)  # blocks with a positive
    row, col = (blocks.index_select(0, hit) >= 0).nonzero(as_tuple=True)
    return hit.index_select(0, row) * block + col


def greedy_bipartite(iou: Tensor) -> Tensor:
    """ssd_keras's ``match_bipartite_greedy`` for a whole batch.

    Repeatedly takes the highest remaining (gt, anchor) IoU of each image (ties:
    lowest gt index, then lowest anchor index), matches that pair, and removes the
    gt and the anchor. Every real gt gets exactly one anchor, even at IoU 0.

    Args:
        iou: ``[B, G, A]`` with padded gts set to a negative value.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    _, g, a = iou.shape
    # A gt picked at step t has lost at most t - 1 < G anchors to earlier picks, so its
    # pick is among its k = G best anchors: the loop runs on [B, G, k] candidates only.
    cand_anchor, cand_iou = top_anchors(iou, min(g, a))
    return greedy_on_candidates(cand_anchor, cand_iou, a)


def top_anchors(iou: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best anchors of each row of ``iou [..., A]`` in the exact greedy order
    (IoU descending, then anchor index ascending): ``anchor [..., k]`` long and
    ``iou [..., k]``; entries of negative IoU (padding) come back as IoU -1."""
    a = iou.shape[-1]
    if iou.dtype == torch.float64:  # no room for an index beside 64 bits: a stable sort
        values, anchor = iou.sort(dim=-1, descending=True, stable=True)
        return anchor[..., :k], values[..., :k].clamp(min=-1.0)
    # An integer key orders exactly: the bits of a non-negative float32 sort like the float.
    bits = iou.float().clamp(min=0).view(torch.int32).long()  # [..., A]
    keys = (bits << 32) | (a - 1 - torch.arange(a, device=iou.device))
    keys = keys.masked_fill(iou < 0, -1)
    top_keys = keys.topk(k, dim=-1).values  # sorted descending
    padded = top_keys < 0
    anchor = ((a - 1) - (top_keys & 0xFFFFFFFF)).masked_fill(padded, 0)
    return anchor, torch.gather(iou, -1, anchor).masked_fill(padded, -1.0)


def greedy_on_candidates(
    cand_anchor: Tensor, cand_iou: Tensor, num_anchors: int, steps: int | None = None
) -> Tensor:
    """The greedy bipartite procedure on each gt's best anchors.

    The greedy order of the pairs is IoU descending, then gt, then anchor ascending.
    A pair that comes before every other pair sharing its gt or its anchor is matched
    by the sequential procedure whatever else happens (nothing earlier can take its
    gt or anchor), so each round matches all such pairs at once and removes their
    gts and anchors: the same result as one pair per step, in a few rounds.

    Args:
        cand_anchor: ``[B, G, k]`` long, each gt's k best anchors in greedy order
            (IoU descending, anchor index ascending); k must be at least the number of
            real gts of the image.
        cand_iou: ``[B, G, k]`` their IoU, negative for padding.
        num_anchors: A.
        steps: the most real gts of an image (default G), the most rounds needed.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    b = cand_anchor.shape[0]
    image, anchor, gt = greedy_picks(cand_anchor, cand_iou, steps)
    matches = torch.full((b, num_anchors), BACKGROUND, dtype=torch.long, device=cand_iou.device)
    matches[image, anchor] = gt
    return matches


def greedy_picks(
    cand_anchor: Tensor, cand_iou: Tensor, steps: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`greedy_on_candidates` as the matched pairs: ``image``, ``anchor`` and
    ``gt`` ``[P]`` long each (the arguments are the same).

    The candidates are a few hundred numbers, so the rounds run on the host in NumPy
    (:func:`_greedy_rounds`: a torch operation on tensors this small costs several
    times more in overhead than in work); the pairs come back on the candidates' device.
    """
    iou = cand_iou.detach().cpu()
    iou = iou if iou.dtype in (torch.float32, torch.float64) else iou.float()
    picks = _greedy_rounds(cand_anchor.cpu().numpy(), iou.numpy(), steps)
    return tuple(torch.from_numpy(x).to(cand_iou.device) for x in picks)


def _greedy_rounds(
    cand_anchor: np.ndarray, cand_iou: np.ndarray, steps: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`greedy_picks` on host arrays ``[B, G, k]``: ``image``, ``anchor``, ``gt``
    (int64 ``[P]`` each)."""
    b, g, k = cand_anchor.shape
    n = g * k
    iou = cand_iou.reshape(b, n)
    anchor = cand_anchor.reshape(b, n)
    gt = np.arange(n) // k  # [n] the gt of each flattened candidate
    alive = iou >= 0  # [B, n]
    picked = np.zeros((b, n), dtype=bool)
    rounds = g if steps is None else min(steps, g)  # each round matches >= 1 gt
    if n > 1024:  # the pairwise tables would be large: one pair per step
        image = np.arange(b)
        for _ in range(rounds):
            flat = np.where(alive, iou, -1.0).argmax(axis=1)  # the first maximum
            live = alive[image, flat]  # images with a pair left
            picked[image, flat] |= live
            alive &= (
                ~((anchor == anchor[image, flat][:, None]) | (gt == gt[flat][:, None]))
                | ~live[:, None]
            )
            if not alive.any():
                break
    else:
        # The greedy order as a rank (IoU descending, then flattened position: gt,
        # then the gt's list); conflict[p, q]: p and q share a gt or an anchor;
        # blocks[p, q]: they conflict and q comes first.
        order = np.argsort(-iou, axis=1, kind="stable")
        rank = np.empty_like(order)
        rank[np.arange(b)[:, None], order] = np.arange(n)
        conflict = (gt[:, None] == gt[None, :]) | (anchor[:, :, None] == anchor[:, None, :])
        blocks = conflict & (rank[:, None, :] < rank[:, :, None])  # [B, n, n]
        for _ in range(rounds):
            # dominant: alive, and no alive pair that comes first shares its gt or anchor
            take = alive & ~(blocks & alive[:, None, :]).any(axis=2)
            alive &= ~(conflict & take[:, :, None]).any(axis=1)  # shares with a taken pair
            picked |= take
            if not alive.any():
                break
    image, p = np.nonzero(picked)
    return tuple(np.ascontiguousarray(x, dtype=np.int64) for x in (image, anchor[image, p], gt[p]))


@MATCHERS.register("ssd")
class SSDMatcher(Matcher):
    """SSD matching as ssd_keras's ``SSDInputEncoder`` does it.

    1. Greedy bipartite: each real gt gets its own best anchor, even below the threshold.
    2. With ``matching="multi"``: every other anchor goes to its highest-IoU gt when
       that IoU is ``>= pos_iou_threshold`` (ties: lowest gt index).
    3. Anchors still unmatched whose best IoU is ``>= neg_iou_limit`` are ignored (-2);
       ``neg_iou_limit=None`` leaves them all background.
    """

    def __init__(
        self,
        matching: str = "multi",
        pos_iou_threshold: float = 0.5,
        neg_iou_limit: float | None = 0.3,
    ) -> None:
        if matching not in ("multi", "bipartite"):
            raise ValueError(f"matching must be 'multi' or 'bipartite', got {matching!r}")
        if neg_iou_limit is not None and neg_iou_limit > pos_iou_threshold:
            raise ValueError(
                f"neg_iou_limit ({neg_iou_limit}) must not exceed pos_iou_threshold "
                f"({pos_iou_threshold})"
            )
        self.matching = matching
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_limit = None if neg_iou_limit is None else float(neg_iou_limit)
        self._keys: dict[torch.dtype, int] = {}

    def _low_threshold(self) -> float | None:
        """The lowest IoU that decides anything beyond the bipartite step: the pairs the
        sparse path computes. None: too low for skipping anchors to pay off."""
        used = [self.neg_iou_limit] + ([self.pos_iou_threshold] if self.matching == "multi" else [])
        used = [x for x in used if x is not None]
        low = min(used) if used else 0.5  # bipartite alone: the pairs only guide the search
        return low if low >= 0.05 else None

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        return self._match(gt_boxes, gt_mask, anchors, positives=False)[0]

    def _match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        positives: bool,
        overlaps: AnchorOverlaps | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``matches [B, A]``, and with ``positives`` the flat indices of its positives
        when the sparse path found them while matching (None otherwise)."""
        b, a = gt_mask.shape[0], anchors.shape[0]
        matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=gt_boxes.device)
        # Only the real gts, packed: rows grouped by image, in slot order.
        img, slot = gt_mask.nonzero(as_tuple=True)  # [M] each
        if img.shape[0] == 0:
            return matches, None
        overlaps = overlaps_for(anchors if overlaps is None else overlaps, gt_boxes)
        boxes = gt_boxes[img, slot]  # [M, 4]
        low = self._low_threshold()
        if overlaps.sparse and low is not None:
            found = self._match_sparse(matches, boxes, img, slot, overlaps, low, positives)
            return matches, torch.unique(torch.cat(found)) if positives else None
        self._match_dense(matches, boxes, img, slot, overlaps)
        return matches, None

    def _bipartite(
        self,
        matches: Tensor,
        boxes: Tensor,
        img: Tensor,
        slot: Tensor,
        best_anchor: Tensor,
        overlaps: AnchorOverlaps,
        pairs: tuple[Tensor, Tensor] | None = None,
    ) -> list[Tensor]:
        """Greedy bipartite into ``matches [B, A]`` (overwriting what is there), given
        each packed gt's first best anchor ``best_anchor [M]``: directly where an
        image's gts have distinct best anchors; for the other images the sequential
        procedure runs on each gt's k best anchors (k = the most gts of such an image).
        ``pairs``: ``rows [N]`` (ascending) and ``keys [N]`` (IoU float32 bits << 32 |
        A - 1 - anchor) of the pairs above a threshold, where a gt with at least k of
        them finds its k best; the other gts get a dense row. Returns the flat indices
        of the matched anchors (every gt's one anchor).

        The bookkeeping is on M numbers (one per gt), so it runs on the host in NumPy.
        """
        b, a = matches.shape
        dev = matches.device
        out = matches.view(-1)
        flat = img * a + best_anchor  # [M]
        flat_h, slot_h = flat.cpu().numpy(), slot.cpu().numpy()
        ordered = np.sort(flat_h)
        same = ordered[1:] == ordered[:-1]  # two gts of one image share a best anchor
        if not same.any():
            out.index_put_((flat,), slot)
            return [flat]
        clash = np.zeros(b, dtype=bool)
        clash[ordered[1:][same] // a] = True  # [B] images with a clash
        img_h = flat_h // a
        hard_gt = clash[img_h]  # [M]
        easy = np.flatnonzero(~hard_gt)
        flat = torch.from_numpy(flat_h[easy]).to(dev)
        out.index_put_((flat,), torch.from_numpy(slot_h[easy]).to(dev))
        hard = np.flatnonzero(hard_gt)  # [S] the gts of the clashing images
        hard_img, hard_slot = img_h[hard], slot_h[hard]
        g = int(hard_slot.max()) + 1
        k = min(int(np.bincount(hard_img).max()), a)
        cand_anchor = np.zeros((hard.shape[0], k), dtype=np.int64)
        cand_iou = np.full((hard.shape[0], k), -1.0)  # float64 holds every IoU dtype exactly
        dense = np.ones(hard.shape[0], dtype=bool)
        if pairs is not None:
            rows, keys = pairs
            use = torch.from_numpy(hard_gt).to(dev).index_select(0, rows).nonzero().squeeze(1)
            rows, keys = rows.index_select(0, use).cpu().numpy(), keys.index_select(0, use)
            counts = np.bincount(rows, minlength=hard_gt.shape[0])  # [M] pairs per gt
            most = int(counts.max()) if rows.size else 0
            if most >= k:
                # each gt's pairs in a row of a [S, most] table, then its k largest keys
                start = np.cumsum(counts) - counts
                cell = (np.cumsum(hard_gt) - 1)[rows] * most + (np.arange(rows.size) - start[rows])
                table = np.full(hard.shape[0] * most, -1, dtype=np.int64)
                table[cell] = keys.cpu().numpy()
                top = -np.sort(-table.reshape(-1, most), axis=1)[:, :k]  # descending
                cand_anchor = (a - 1) - (top & 0xFFFFFFFF)
                cand_iou = (top >> 32).astype(np.int32).view(np.float32).astype(np.float64)
                dense = counts[hard] < k
        lack = np.flatnonzero(dense)
        if lack.size:
            few = boxes.index_select(0, torch.from_numpy(hard[lack]).to(dev))  # [F, 4]
            d_anchor, d_iou = top_anchors(overlaps(few[None])[0], k)  # [F, k]
            cand_anchor[lack] = d_anchor.cpu().numpy()
            cand_iou[lack] = d_iou.double().cpu().numpy()
        # the [R, g, k] layout of the greedy rounds: clashing image, then gt slot
        images = np.flatnonzero(clash)  # [R]
        position = (np.cumsum(clash) - 1)[hard_img] * g + hard_slot
        layout_anchor = np.zeros((images.size * g, k), dtype=np.int64)
        layout_iou = np.full((images.size * g, k), -1.0)
        layout_anchor[position] = cand_anchor
        layout_iou[position] = cand_iou
        image, anchor, gt = _greedy_rounds(
            layout_anchor.reshape(-1, g, k), layout_iou.reshape(-1, g, k), steps=k
        )
        picked = torch.from_numpy(images[image] * a + anchor).to(dev)
        out.index_put_((picked,), torch.from_numpy(gt).to(dev))
        return [flat, picked]

    def _match_dense(
        self, matches: Tensor, boxes: Tensor, img: Tensor, slot: Tensor, overlaps: AnchorOverlaps
    ) -> None:
        """All steps on the dense IoU ``[M, A]`` (anchors that are not product grids)."""
        b, a = matches.shape
        m, dev = img.shape[0], matches.device
        iou = overlaps(boxes[None], reuse=True)[0]  # [M, A]
        self._bipartite(matches, boxes, img, slot, iou.argmax(dim=1), overlaps)
        # Best IoU of every anchor over the gts of its image.
        best_iou = iou.new_full((b, a), -1.0)
        best_iou.scatter_reduce_(0, img[:, None].expand(m, a), iou, reduce="amax")
        free = matches == BACKGROUND
        if self.matching == "multi":
            positive = free & (best_iou >= self.pos_iou_threshold)
            pb, pa = positive.nonzero(as_tuple=True)  # [P]
            if pb.numel():
                # The best gt of each positive anchor, lowest slot on ties.
                counts = torch.bincount(img, minlength=b)
                first = torch.cumsum(counts, 0) - counts  # first packed row of each image
                j = torch.arange(int(counts.max()), device=dev)  # [Gmax]
                valid = j[None, :] < counts[pb, None]  # [P, Gmax]
                rows_pj = (first[pb, None] + j[None, :]).clamp(max=m - 1)
                cand = iou[rows_pj, pa[:, None]].masked_fill(~valid, -1.0)  # [P, Gmax]
                matches[pb, pa] = slot[first[pb] + cand.argmax(dim=1)]
            free = free & ~positive
        if self.neg_iou_limit is not None:
            matches.masked_fill_(free & (best_iou >= self.neg_iou_limit), IGNORE)

    def _match_sparse(
        self,
        matches: Tensor,
        boxes: Tensor,
        img: Tensor,
        slot: Tensor,
        overlaps: AnchorOverlaps,
        low: float,
        positives: bool = False,
    ) -> list[Tensor]:
        """The same result from the (gt, anchor) pairs with IoU ``>= low`` only.

        Every decision after the bipartite step compares an IoU with a threshold
        ``>= low``, and a gt's best anchor is among its pairs whenever it has any; the
        few gts without one (best IoU below ``low``) get a dense row. The multi and
        ignore decisions are written first; the bipartite matches then overwrite theirs
        (a bipartite anchor keeps its gt whatever else reaches it). Returns flat
        indices that, deduplicated, are the positives of ``matches`` (with
        ``positives``; else only the bipartite ones).
        """
        a = matches.shape[1]
        m, dev = img.shape[0], matches.device
        rows, anchor, iou = overlaps.above(boxes, low)  # [N] each, rows ascending
        bits = keys = None  # the float32 keys (float64 orders exactly without them)
        # 1. Each gt's first best anchor.
        if iou.dtype == torch.float64:  # two passes: the best IoU, then the lowest anchor
            best = iou.new_full((m,), -1.0).scatter_reduce_(0, rows, iou, reduce="amax")
            top = (iou == best.index_select(0, rows)).nonzero().squeeze(1)
            best_anchor = torch.full((m,), a, dtype=torch.long, device=dev)
            best_anchor.scatter_reduce_(0, rows[top], anchor[top], reduce="amin")
        else:  # one pass on a key: the bits of a positive float32 sort like the float
            bits = iou.float().view(torch.int32).long() << 32
            keys = bits | (a - 1 - anchor)
            key = torch.full((m,), -1, dtype=torch.long, device=dev)
            key.scatter_reduce_(0, rows, keys, reduce="amax")
            best_anchor = torch.where(key < 0, a, (a - 1) - (key & 0xFFFFFFFF))
        lonely = (best_anchor == a).nonzero().squeeze(1)
        if lonely.numel():
            best_anchor[lonely] = overlaps(boxes[lonely][None])[0].argmax(dim=1)
        # 2. Multi and ignore: every pair is >= low, the lower of the thresholds in use.
        found = []
        if iou.numel() and (self.matching == "multi" or self.neg_iou_limit is not None):
            out = matches.view(-1)
            flat = img.index_select(0, rows) * a + anchor  # [N] into matches.view(-1)
            if self.matching == "bipartite":
                out.index_fill_(0, flat, IGNORE)
            else:
                flat, value = self._multi(out, flat, rows, iou, slot, bits)
                if positives:  # (the bipartite step only turns anchors positive)
                    found.append(flat.index_select(0, (value >= 0).nonzero().squeeze(1)))
        pairs = None if keys is None else (rows, keys)
        return found + self._bipartite(matches, boxes, img, slot, best_anchor, overlaps, pairs)

    def _threshold_key(self, dtype: torch.dtype) -> int:
        """The smallest key (float32 bits << 32) of an IoU of ``dtype`` that is
        ``>= pos_iou_threshold`` (the threshold rounded to ``dtype``, as a comparison
        in ``dtype`` rounds it)."""
        if dtype not in self._keys:
            pos = torch.tensor(self.pos_iou_threshold, dtype=dtype).float()
            self._keys[dtype] = int(pos.view(torch.int32)) << 32
        return self._keys[dtype]

    def _multi(
        self,
        out: Tensor,
        flat: Tensor,
        rows: Tensor,
        iou: Tensor,
        slot: Tensor,
        bits: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Each anchor of the pairs to its best gt (ties: the lowest slot, which is the
        lowest packed row): the gt's slot where that IoU is ``>= pos_iou_threshold``,
        else IGNORE (the pairs are all ``>= neg_iou_limit`` then). ``out`` is
        ``matches.view(-1)``, still BACKGROUND at ``flat``; the pairs' ``rows`` ascend;
        ``bits``: the IoU's float32 bits << 32 (None: float64, exact two passes).
        Returns the flat indices written and their values (an anchor may repeat, with
        the same value)."""
        m = slot.shape[0]
        if bits is not None:
            # The best key of each anchor lands in `out` itself (every key is >= 0 >
            # BACKGROUND), and every pair of an anchor then writes the same value.
            out.scatter_reduce_(0, flat, bits | (m - 1 - rows), reduce="amax")
            won = out.index_select(0, flat)
            value = slot.index_select(0, (m - 1) - (won & 0xFFFFFFFF))
            if self.neg_iou_limit is not None:
                value = torch.where(won >= self._threshold_key(iou.dtype), value, IGNORE)
        else:  # highest IoU first, rows ascending among equals; then grouped by anchor
            order = iou.sort(descending=True, stable=True).indices
            order = order[flat[order].sort(stable=True).indices]
            grouped = flat[order]
            first = torch.ones_like(grouped, dtype=torch.bool)
            first[1:] = grouped[1:] != grouped[:-1]
            win = order[first]
            flat, iou = flat[win], iou[win]
            value = slot[rows[win]]
            if self.neg_iou_limit is not None:
                value = torch.where(iou >= self.pos_iou_threshold, value, IGNORE)
        out.index_put_((flat,), value)
        return flat, value

    def __repr__(self) -> str:
        return (
            f"SSDMatcher(matching={self.matching!r}, pos_iou_threshold={self.pos_iou_threshold}, "
            f"neg_iou_limit={self.neg_iou_limit})"
        )


@MATCHERS.register("faster_rcnn")
class FasterRCNNMatcher(Matcher):
    """The Faster R-CNN RPN rule.

    IoU ``>= pos_iou_threshold`` (0.7): positive, to the anchor's best gt; ``<
    neg_iou_threshold`` (0.3): background; in between: ignored. With
    ``allow_low_quality_matches`` the anchors that reach a gt's highest IoU (ties
    included, IoU > 0) are positive too, assigned to their own best gt as in
    torchvision's ``Matcher``.
    """

    def __init__(
        self,
        pos_iou_threshold: float = 0.7,
        neg_iou_threshold: float = 0.3,
        allow_low_quality_matches: bool = True,
    ) -> None:
        if neg_iou_threshold > pos_iou_threshold:
            raise ValueError("neg_iou_threshold must not exceed pos_iou_threshold")
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_threshold = float(neg_iou_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        return self._match(gt_boxes, gt_mask, anchors, positives=False)[0]

    def _match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        positives: bool,
        overlaps: AnchorOverlaps | None = None,
    ) -> tuple[Tensor, None]:
        iou = masked_iou(gt_boxes, gt_mask, anchors if overlaps is None else overlaps)  # [B, G, A]
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.full_like(best_gt, IGNORE)
        matches = torch.where(best_iou < self.neg_iou_threshold, BACKGROUND, matches)
        matches = torch.where(best_iou >= self.pos_iou_threshold, best_gt, matches)
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == gt_best) & (gt_best > 0) & gt_mask[:, :, None]  # [B, G, A]
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches, None


@MATCHERS.register("yolov3")
class YOLOv3Matcher(Matcher):
    """YOLOv3 assignment: one anchor per gt, chosen by shape then by grid cell.

    Each gt goes to the prior (distinct anchor width and height, across all levels)
    with the best shape-only IoU (centres aligned), at the grid cell that holds the
    gt centre: among that prior's anchors, the one whose centre is nearest in x and
    in y. When two gts land on one anchor, the higher gt index wins. Anchors left
    over whose IoU with any gt exceeds ``ignore_threshold`` are ignored; the rest are
    background. Priors are found by exact equality of anchor sizes, so the anchors
    must not be clipped.
    """

    def __init__(self, ignore_threshold: float = 0.5) -> None:
        self.ignore_threshold = float(ignore_threshold)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        return self._match(gt_boxes, gt_mask, anchors, positives=False)[0]

    def _match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        positives: bool,
        overlaps: AnchorOverlaps | None = None,
    ) -> tuple[Tensor, None]:
        b, g, _ = gt_boxes.shape
        anchors = anchors.to(gt_boxes.dtype)
        shapes, prior_of = torch.unique(anchors[:, 2:], dim=0, return_inverse=True)  # [U, 2], [A]
        gt = convert(gt_boxes, "xyxy", "cxcywh")  # [B, G, 4]
        inter = torch.minimum(gt[..., None, 2], shapes[:, 0]) * torch.minimum(
            gt[..., None, 3], shapes[:, 1]
        )  # [B, G, U]
        union = gt[..., None, 2] * gt[..., None, 3] + shapes[:, 0] * shapes[:, 1] - inter
        best_prior = (inter / union.clamp(min=torch.finfo(union.dtype).tiny)).argmax(
            dim=2
        )  # [B, G]
        same_prior = prior_of[None, None, :] == best_prior[:, :, None]  # [B, G, A]
        far = torch.finfo(gt.dtype).max
        dx = (anchors[:, 0] - gt[..., None, 0]).abs().masked_fill(~same_prior, far)  # [B, G, A]
        dy = (anchors[:, 1] - gt[..., None, 1]).abs().masked_fill(~same_prior, far)
        in_cell = (dx == dx.min(dim=2, keepdim=True).values) & (
            dy == dy.min(dim=2, keepdim=True).values
        )
        chosen = in_cell.int().argmax(dim=2)  # [B, G] first anchor of the cell
        gt_ids = torch.arange(g, device=gt.device).expand(b, g)
        src = torch.where(gt_mask, gt_ids, BACKGROUND)
        matches = torch.full((b, anchors.shape[0]), BACKGROUND, dtype=torch.long, device=gt.device)
        matches.scatter_reduce_(1, chosen, src, reduce="amax")
        iou = masked_iou(gt_boxes, gt_mask, anchors if overlaps is None else overlaps)  # [B, G, A]
        ignore = (matches == BACKGROUND) & (iou.max(dim=1).values > self.ignore_threshold)
        return matches.masked_fill(ignore, IGNORE), None
