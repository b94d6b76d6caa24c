"""A plain numpy, loop-by-loop restatement of ssd_keras's anchor and matching code paths.

Written from the published algorithm (SSDInputEncoder.generate_anchor_boxes_for_layer,
match_bipartite_greedy, match_multi and the neutral-box step) so the vectorised torch
code can be compared with something that has no cleverness in it.
"""

from __future__ import annotations

import numpy as np


def anchors_for_layer(
    img_h, img_w, fmap, ratios, this_scale, next_scale, two_boxes, step, offset, clip
):
    size = min(img_h, img_w)
    wh = []
    for ar in ratios:
        if ar == 1:
            wh.append((this_scale * size, this_scale * size))
            if two_boxes:
                s = np.sqrt(this_scale * next_scale) * size
                wh.append((s, s))
        else:
            wh.append((this_scale * size * np.sqrt(ar), this_scale * size / np.sqrt(ar)))
    if step is None:
        step_h, step_w = img_h / fmap[0], img_w / fmap[1]
    elif isinstance(step, (list, tuple)):
        step_h, step_w = step
    else:
        step_h = step_w = step
    if offset is None:
        off_h = off_w = 0.5
    elif isinstance(offset, (list, tuple)):
        off_h, off_w = offset
    else:
        off_h = off_w = offset
    cy = np.linspace(off_h * step_h, (off_h + fmap[0] - 1) * step_h, fmap[0])
    cx = np.linspace(off_w * step_w, (off_w + fmap[1] - 1) * step_w, fmap[1])
    out = np.zeros((fmap[0], fmap[1], len(wh), 4))
    for i in range(fmap[0]):
        for j in range(fmap[1]):
            for k, (w, h) in enumerate(wh):
                x1, y1, x2, y2 = cx[j] - w / 2, cy[i] - h / 2, cx[j] + w / 2, cy[i] + h / 2
                if clip:
                    x1, x2 = [img_w - 1 if v >= img_w else max(v, 0) for v in (x1, x2)]
                    y1, y2 = [img_h - 1 if v >= img_h else max(v, 0) for v in (y1, y2)]
                x1, x2, y1, y2 = x1 / img_w, x2 / img_w, y1 / img_h, y2 / img_h
                out[i, j, k] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return out.reshape(-1, 4)


def ssd_keras_anchors(
    img_h, img_w, fmaps, ratios, scales, two_boxes=True, steps=None, offsets=None, clip=False
):
    steps = steps or [None] * len(fmaps)
    offsets = offsets or [None] * len(fmaps)
    return np.concatenate(
        [
            anchors_for_layer(
                img_h, img_w, f, r, scales[i], scales[i + 1], two_boxes, steps[i], offsets[i], clip
            )
            for i, (f, r) in enumerate(zip(fmaps, ratios, strict=True))
        ]
    )


def iou_matrix(gt_xyxy, anchors_cxcywh):
    a = np.concatenate(
        [
            anchors_cxcywh[:, :2] - anchors_cxcywh[:, 2:] / 2,
            anchors_cxcywh[:, :2] + anchors_cxcywh[:, 2:] / 2,
        ],
        1,
    )
    out = np.zeros((len(gt_xyxy), len(a)))
    for g, b in enumerate(gt_xyxy):
        iw = np.maximum(0, np.minimum(b[2], a[:, 2]) - np.maximum(b[0], a[:, 0]))
        ih = np.maximum(0, np.minimum(b[3], a[:, 3]) - np.maximum(b[1], a[:, 1]))
        inter = iw * ih
        union = (b[2] - b[0]) * (b[3] - b[1]) + (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) - inter
        out[g] = inter / union
    return out


def ssd_keras_match(gt_xyxy, anchors_cxcywh, matching="multi", pos=0.5, neg=0.3):
    """matches [A]: gt index, -1 background, -2 neutral; one image, real gts only."""
    n_anchors = len(anchors_cxcywh)
    matches = -np.ones(n_anchors, dtype=np.int64)
    if len(gt_xyxy) == 0:
        return matches
    sim = iou_matrix(np.asarray(gt_xyxy, dtype=np.float64), anchors_cxcywh)
    w = sim.copy()
    for _ in range(len(gt_xyxy)):  # match_bipartite_greedy
        anchor_idx = np.argmax(w, axis=1)
        overlaps = w[np.arange(len(gt_xyxy)), anchor_idx]
        g = int(np.argmax(overlaps))
        matches[anchor_idx[g]] = g
        w[g] = 0
        w[:, anchor_idx[g]] = 0
    sim[:, matches >= 0] = 0
    if matching == "multi":  # match_multi
        best_g = np.argmax(sim, axis=0)
        best = sim[best_g, np.arange(n_anchors)]
        hit = np.nonzero(best >= pos)[0]
        matches[hit] = best_g[hit]
        sim[:, hit] = 0
    if neg is not None:
        neutral = (np.max(sim, axis=0) >= neg) & (matches < 0)
        matches[neutral] = -2
    return matches
