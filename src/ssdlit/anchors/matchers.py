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
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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
    "anchor_overlaps",
    "greedy_on_candidates",
    "masked_iou",
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
    """

    def __init__(self, anchors_cxcywh: Tensor) -> None:
        xyxy = convert(anchors_cxcywh, "cxcywh", "xyxy")
        self.xyxy = xyxy
        self.area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])  # [A]
        self.levels = _grid_levels(anchors_cxcywh)
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

    def _interval_tables(self) -> dict[str, Tensor]:
        """Per anchor group g (level, box k), what :meth:`above` needs, x then y in the
        last dimension: the intervals of the group's columns and rows concatenated
        over groups (``x [Cx, 2]``, ``y [Cy, 2]``, the group's first at ``off [K, 2]``),
        its anchors' largest ``size [K, 2]`` and smallest area ``amin [K]``, the first
        centre and the spacing of the centres (``first``, ``step [K, 2]``), the number
        of columns and rows ``cells [K, 2]``, and the anchor index of cell (row r,
        column c): ``base + r * row_step + c * n``."""
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
        x, y = torch.cat(xs), torch.cat(ys)
        return {
            "x": x,
            "y": y,
            "x1": x[:, 0].contiguous(),
            "x2": x[:, 1].contiguous(),
            "y1": y[:, 0].contiguous(),
            "y2": y[:, 1].contiguous(),
            "off": table(off, torch.long),
            "size": size_t,
            "amin": table(amin, dt),
            # centres within the overlap range: (lo + need - near) / step ... (hi - need - far) / step
            "near": first_t + size_t / 2,
            "far": first_t - size_t / 2,
            "step": step_t,
            "last": table(cells, dt) - 1,
            "index": table(index, torch.long),  # [K, 3] base, row_step, n
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
        num_groups = t["off"].shape[0]
        lo, hi = boxes[:, None, :2], boxes[:, None, 2:]  # [M, 1, 2] (x, y)
        extent = hi - lo
        area = extent.prod(dim=2)  # [M, 1]
        # IoU >= t needs inter = iw * ih >= t * union, where union >= max(areas) and
        # union = sum(areas) - inter (so inter >= t / (1 + t) * sum(areas)); ih <= min(heights).
        need = torch.maximum(
            area.clamp(min=t["amin"]) * threshold,
            (area + t["amin"]) * (threshold / (1 + threshold)),
        ) * (1 - 1e-4)  # [M, K]
        need = need[..., None] / torch.minimum(extent, t["size"]).flip(-1)  # [M, K, 2] (w, h)
        start = torch.ceil((lo + need - t["near"]) / t["step"] - 1e-3)
        stop = torch.floor((hi - need - t["far"]) / t["step"] + 1e-3)
        start = torch.minimum(start.clamp_(min=0), t["last"] + 1)
        stop = torch.minimum(stop, t["last"]).clamp_(min=-1)
        span = (stop - start + 1).clamp_(min=0)  # [M, K, 2] columns, rows
        possible = ((need <= t["size"]) & (need <= extent)).all(dim=2)  # NaN: False
        count = (span.prod(dim=2) * possible).long().flatten()  # [M * K] cells per pair
        pairs = count.nonzero().squeeze(1)  # [P] flat (box, group) ids with cells
        if pairs.numel() == 0:
            empty = pairs.new_empty(0)
            return empty, empty, boxes.new_empty(0)
        count = count.index_select(0, pairs)
        cell_pair = torch.repeat_interleave(
            torch.arange(pairs.shape[0], device=pairs.device), count
        )  # [N] the pair of each cell
        m, g = pairs // num_groups, pairs % num_groups
        start = start.view(-1, 2).index_select(0, pairs).long()  # [P, 2] first column, row
        width = span.view(-1, 2).index_select(0, pairs)[:, 0].long()
        base, row_step, n = t["index"].index_select(0, g).unbind(1)
        # Per pair (a [P, 8] table, int32 to halve the per-cell memory): the first
        # cell's anchor and interval entries, the pair's first cell, its width, strides
        # and box; then one gather spreads them to the cells.
        table = torch.stack(
            (
                base + start[:, 1] * row_step + start[:, 0] * n,
                t["off"][:, 0].index_select(0, g) + start[:, 0],
                t["off"][:, 1].index_select(0, g) + start[:, 1],
                torch.cumsum(count, 0) - count,
                width,
                row_step,
                n,
                m,
            ),
            dim=1,
        ).int()
        # column by column (1-D gathers: no large fresh [N, 8] block)
        a0, x0, y0, c0, w, rs, ns, mc = (c.index_select(0, cell_pair) for c in table.t())
        q = torch.arange(cell_pair.shape[0], dtype=torch.int32, device=pairs.device) - c0
        row = torch.div(q, w, rounding_mode="floor")
        col = q - row * w  # (row, col) within the pair's rectangle
        x1, y1, x2, y2 = (c.index_select(0, mc) for c in _columns(boxes))  # [N] each
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
        union = (area[:, 0].index_select(0, mc) + self.area.index_select(0, anchor)) - inter
        iou = inter / union
        keep = (iou >= threshold).nonzero().squeeze(1)
        return (
            mc.index_select(0, keep).long(),
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
            ax = self.xyxy
            iw = (
                torch.minimum(x2[:, :, 0], ax[:, 2]) - torch.maximum(x1[:, :, 0], ax[:, 0])
            ).clamp_(min=0)
            ih = (
                torch.minimum(y2[:, :, 0], ax[:, 3]) - torch.maximum(y1[:, :, 0], ax[:, 1])
            ).clamp_(min=0)
            torch.mul(iw, ih, out=inter)
        torch.add(
            ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]))[:, None], self.area, out=union
        )
        union.sub_(inter)
        iou = inter.div_(union)
        if self._may_divide_by_zero:
            iou.nan_to_num_(0.0)  # a zero union (degenerate pair) gives IoU 0
        return iou.view(b, m, -1)


def _columns(boxes: Tensor) -> tuple[Tensor, ...]:
    """The four coordinates of ``boxes [M, 4]`` as contiguous ``[M]`` columns."""
    return tuple(c.contiguous() for c in boxes.t())


_OVERLAPS_CACHE: dict[tuple, AnchorOverlaps] = {}


def anchor_overlaps(anchors_cxcywh: Tensor) -> AnchorOverlaps:
    """The :class:`AnchorOverlaps` of ``anchors``, cached while the tensor is unchanged."""
    key = (
        anchors_cxcywh.data_ptr(),
        anchors_cxcywh._version,
        tuple(anchors_cxcywh.shape),
        anchors_cxcywh.dtype,
        anchors_cxcywh.device,
    )
    found = _OVERLAPS_CACHE.get(key)
    if found is None:
        if len(_OVERLAPS_CACHE) >= 8:
            _OVERLAPS_CACHE.clear()
        found = _OVERLAPS_CACHE[key] = AnchorOverlaps(anchors_cxcywh.detach())
    return found


def masked_iou(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
    """IoU ``[B, G, A]`` of gt boxes (xyxy) and anchors (cxcywh); padded rows are -1."""
    iou = anchor_overlaps(anchors.to(gt_boxes.dtype))(gt_boxes)
    return iou.masked_fill_(~gt_mask[:, :, None], -1.0)


def _check(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> None:
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2] or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool [B, G] = {tuple(gt_boxes.shape[:2])}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")


class Matcher(ABC):
    """Base class: call with ``(gt_boxes, gt_mask, anchors)``, get ``matches [B, A]``."""

    def __call__(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        _check(gt_boxes, gt_mask, anchors)
        if gt_boxes.shape[1] == 0:  # nothing to match: every anchor is background
            return gt_boxes.new_full(
                (gt_boxes.shape[0], anchors.shape[0]), BACKGROUND, dtype=torch.long
            )
        return self.match(gt_boxes, gt_mask.to(gt_boxes.device), anchors.to(gt_boxes.device))

    @abstractmethod
    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        """``matches [B, A]`` for a batch with at least one (maybe padded) gt slot."""


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
    ``gt`` ``[P]`` long each (the arguments are the same)."""
    b, g, k = cand_anchor.shape
    n = g * k
    dev = cand_iou.device
    iou = cand_iou.reshape(b, n)
    anchor = cand_anchor.reshape(b, n)
    gt = torch.arange(g, device=dev).repeat_interleave(k)  # [n]
    alive = iou >= 0  # [B, n]
    blocks = conflict = None
    if n <= 1024:  # beyond, the pairwise tables would be large: one pair per step
        # conflict[p, q]: p and q share a gt or an anchor; blocks[p, q]: q also comes
        # first (IoU descending, then flattened position: gt, then the gt's list).
        conflict = (gt[:, None] == gt[None, :]) | (anchor[:, :, None] == anchor[:, None, :])
        pos = torch.arange(n, device=dev)
        first = (iou[:, :, None] > iou[:, None, :]) | (
            (iou[:, :, None] == iou[:, None, :]) & (pos[:, None] < pos[None, :])
        )  # [B, n, n] p comes before q
        blocks = conflict & ~first & (pos[:, None] != pos[None, :])
    picked = torch.zeros((b, n), dtype=torch.bool, device=dev)
    for _ in range(g if steps is None else min(steps, g)):  # each round matches >= 1 gt
        if blocks is not None:
            # dominant: alive, and no alive pair that comes first shares its gt or anchor
            take = alive & ~(blocks & alive[:, None, :]).any(dim=2)  # [B, n]
            gone = (conflict & take[:, :, None]).any(dim=1)  # [B, n] shares with a taken pair
        else:
            best, flat = iou.masked_fill(~alive, -1.0).max(dim=1)  # first maximum
            take = torch.zeros_like(alive)
            take[torch.arange(b, device=dev), flat] = best >= 0
            gone = (anchor == anchor.gather(1, flat[:, None])) | (gt == gt[flat][:, None])
            gone &= (best >= 0)[:, None]
        picked |= take
        alive &= ~gone
        if not bool(alive.any()):
            break
    image, p = picked.nonzero(as_tuple=True)
    return image, anchor[image, p], gt[p]


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
        self._work: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _low_threshold(self) -> float | None:
        """The lowest IoU that decides anything beyond the bipartite step: the pairs the
        sparse path computes. None: too low for skipping anchors to pay off."""
        used = [self.neg_iou_limit] + ([self.pos_iou_threshold] if self.matching == "multi" else [])
        used = [x for x in used if x is not None]
        low = min(used) if used else 0.5  # bipartite alone: the pairs only guide the search
        return low if low >= 0.05 else None

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        b, a = gt_mask.shape[0], anchors.shape[0]
        matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=gt_boxes.device)
        # Only the real gts, packed: rows grouped by image, in slot order.
        img, slot = gt_mask.nonzero(as_tuple=True)  # [M] each
        if img.shape[0] == 0:
            return matches
        overlaps = anchor_overlaps(anchors.to(gt_boxes.dtype))
        boxes = gt_boxes[img, slot]  # [M, 4]
        low = self._low_threshold()
        if overlaps.sparse and low is not None:
            self._match_sparse(matches, boxes, img, slot, overlaps, low)
        else:
            self._match_dense(matches, boxes, img, slot, overlaps)
        return matches

    def _bipartite(
        self,
        matches: Tensor,
        boxes: Tensor,
        img: Tensor,
        slot: Tensor,
        best_anchor: Tensor,
        overlaps: AnchorOverlaps,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Greedy bipartite into ``matches [B, A]``, given each packed gt's first best
        anchor ``best_anchor [M]``: directly where an image's gts have distinct best
        anchors; for the other images the sequential procedure runs on each gt's k best
        anchors (k = the most gts of such an image), taken from ``pairs`` (rows,
        anchors, IoU of the pairs above a threshold, as :meth:`AnchorOverlaps.above`
        gives) for gts with at least k of them, else from dense rows."""
        b, a = matches.shape
        dev = matches.device
        key, order = (img * a + best_anchor).sort()
        dup = key[1:] == key[:-1]
        clash_img = torch.zeros(b, dtype=torch.bool, device=dev)
        clash_img[img[order[1:][dup]]] = True
        easy = ~clash_img[img]
        matches[img[easy], best_anchor[easy]] = slot[easy]
        if not bool(clash_img.any()):
            return
        images = clash_img.nonzero().flatten()  # [R]
        at = torch.full((b,), -1, dtype=torch.long, device=dev)
        at[images] = torch.arange(images.shape[0], device=dev)  # image -> position in R
        hard = (~easy).nonzero().squeeze(1)  # [S] packed gts of those images
        g = int(slot[hard].max()) + 1
        k = min(int(torch.bincount(img[hard]).max()), a)
        cand_anchor = torch.zeros((images.shape[0], g, k), dtype=torch.long, device=dev)
        cand_iou = boxes.new_full((images.shape[0], g, k), -1.0)
        dense = hard
        if pairs is not None:
            rows, anchor, iou = pairs
            enough = torch.zeros(img.shape[0], dtype=torch.bool, device=dev)
            enough[hard] = torch.bincount(rows, minlength=img.shape[0])[hard] >= k
            dense = hard[~enough[hard]]
            use = enough[rows].nonzero().squeeze(1)
            rows, anchor, iou = rows[use], anchor[use], iou[use]
            # Order by gt, then IoU descending, then anchor (stable sorts, last key first).
            o = anchor.sort(stable=True).indices
            o = o[iou[o].sort(stable=True, descending=True).indices]
            o = o[rows[o].sort(stable=True).indices]
            rows, anchor, iou = rows[o], anchor[o], iou[o]
            counts = torch.bincount(rows, minlength=img.shape[0])
            rank = (
                torch.arange(rows.shape[0], device=dev) - (torch.cumsum(counts, 0) - counts)[rows]
            )
            top = (rank < k).nonzero().squeeze(1)
            r = rows[top]
            cand_anchor[at[img[r]], slot[r], rank[top]] = anchor[top]
            cand_iou[at[img[r]], slot[r], rank[top]] = iou[top]
        if dense.numel():
            d_anchor, d_iou = top_anchors(overlaps(boxes[dense][None])[0], k)  # [F, k]
            cand_anchor[at[img[dense]], slot[dense]] = d_anchor
            cand_iou[at[img[dense]], slot[dense]] = d_iou
        image, anchor, gt = greedy_picks(cand_anchor, cand_iou, steps=k)
        matches[images[image], anchor] = gt  # gt: the slot (the layout is by slot)

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
    ) -> None:
        """The same result from the (gt, anchor) pairs with IoU ``>= low`` only.

        Every decision after the bipartite step compares an IoU with a threshold
        ``>= low``, and a gt's best anchor is among its pairs whenever it has any; the
        few gts without one (best IoU below ``low``) get a dense row.
        """
        b, a = matches.shape
        m, dev = img.shape[0], matches.device
        rows, anchor, iou = overlaps.above(boxes, low)  # [N] each
        # 1. Each gt's first best anchor.
        if iou.dtype == torch.float64:  # two passes: the best IoU, then the lowest anchor
            best = iou.new_full((m,), -1.0).scatter_reduce_(0, rows, iou, reduce="amax")
            top = (iou == best.index_select(0, rows)).nonzero().squeeze(1)
            best_anchor = torch.full((m,), a, dtype=torch.long, device=dev)
            best_anchor.scatter_reduce_(0, rows[top], anchor[top], reduce="amin")
        else:  # one pass on a key: the bits of a positive float32 sort like the float
            bits = iou.float().view(torch.int32).long() << 32
            key = torch.full((m,), -1, dtype=torch.long, device=dev)
            key.scatter_reduce_(0, rows, bits | (a - 1 - anchor), reduce="amax")
            best_anchor = torch.where(key < 0, a, (a - 1) - (key & 0xFFFFFFFF))
        lonely = (best_anchor == a).nonzero().squeeze(1)
        if lonely.numel():
            best_anchor[lonely] = overlaps(boxes[lonely][None])[0].argmax(dim=1)
        self._bipartite(matches, boxes, img, slot, best_anchor, overlaps, (rows, anchor, iou))
        if iou.numel() == 0:
            return
        # 2. The best gt of each anchor that has a pair, per image; ties: the lowest
        # slot, which is the lowest packed row (rows are ordered by image, then slot).
        flat = img.index_select(0, rows) * a + anchor  # [N] into matches.view(-1)
        work = (b * a, dev)
        if work not in self._work:
            self._work.clear()
            self._work[work] = torch.empty(b * a, dtype=torch.long, device=dev)
        best = self._work[work]  # scratch: only the entries at `flat` are set and read
        if iou.dtype == torch.float64:  # two passes: the best IoU, then the lowest row
            top = iou.new_full((b * a,), -1.0).scatter_reduce_(0, flat, iou, reduce="amax")
            top = (iou == top.index_select(0, flat)).nonzero().squeeze(1)
            flat, rows, iou = flat[top], rows[top], iou[top]
            key = rows
            best.index_fill_(0, flat, m).scatter_reduce_(0, flat, key, reduce="amin")
        else:
            key = bits | (m - 1 - rows)
            best.index_fill_(0, flat, -1).scatter_reduce_(0, flat, key, reduce="amax")
        win = (key == best.index_select(0, flat)).nonzero().squeeze(1)
        flat, iou = flat.index_select(0, win), iou.index_select(0, win)  # one per anchor
        pair_slot = slot.index_select(0, rows.index_select(0, win))
        out = matches.view(-1)
        free = out.index_select(0, flat) == BACKGROUND
        if self.matching == "multi":
            positive = free & (iou >= self.pos_iou_threshold)
            out.index_put_((flat[positive],), pair_slot[positive])
            free &= ~positive
        if self.neg_iou_limit is not None:
            ignore = free & (iou >= self.neg_iou_limit)
            out.index_fill_(0, flat[ignore], IGNORE)

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
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.full_like(best_gt, IGNORE)
        matches = torch.where(best_iou < self.neg_iou_threshold, BACKGROUND, matches)
        matches = torch.where(best_iou >= self.pos_iou_threshold, best_gt, matches)
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == gt_best) & (gt_best > 0) & gt_mask[:, :, None]  # [B, G, A]
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches


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
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        ignore = (matches == BACKGROUND) & (iou.max(dim=1).values > self.ignore_threshold)
        return matches.masked_fill(ignore, IGNORE)
