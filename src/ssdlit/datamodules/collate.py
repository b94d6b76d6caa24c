"""Batching detection samples, and mapping network boxes back to the original image.

A *sample* (what :class:`~ssdlit.datamodules.datamodule.DetectionDataset` returns) is a
dict:

- ``image``: uint8 ``[3, H, W]`` (the network input size);
- ``boxes``: float32 ``[n, 4]`` xyxy normalised to [0, 1] of the network input;
- ``labels``: int64 ``[n]`` in 1..C; ``difficult``: bool ``[n]``;
- ``meta``: dict, see :func:`make_meta`.

A *batch* (:func:`collate_detection`) is a dict: ``images`` uint8 ``[B, 3, H, W]``,
``boxes`` float32 ``[B, G, 4]``, ``labels`` int64 ``[B, G]`` (0 on padding), ``mask`` bool
``[B, G]`` (True on real boxes), ``difficult`` bool ``[B, G]``, ``meta`` list of B dicts;
``G`` is the largest box count in the batch, at least 1. Padding rows are zeros.

``meta`` keys: ``image_id``, ``path`` (str), ``orig_size`` ``(H0, W0)`` of the decoded
image, ``input_size`` ``(H, W)``, and the affine map from original pixels to network
pixels, ``x_net = x_orig * scale[0] + offset[0]`` (``y`` with index 1):

- plain resize: ``scale = (W / W0, H / H0)``, ``offset = (0, 0)``;
- letterbox: ``scale`` the per-axis resize factors, ``offset`` the padding (left, top).

For random training crops the map describes the final resize only (it is exact for the
deterministic evaluation pipelines, which is where :func:`to_original_pixels` is used).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["collate_detection", "make_meta", "pad_targets", "to_original_pixels"]

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def make_meta(
    *,
    image_id: str,
    path: str,
    orig_size: tuple[int, int],
    input_size: tuple[int, int],
    scale: tuple[float, float],
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """The per-image metadata dict (plain Python values, cheap to pickle and log)."""
    return {
        "image_id": image_id,
        "path": path,
        "orig_size": (int(orig_size[0]), int(orig_size[1])),
        "input_size": (int(input_size[0]), int(input_size[1])),
        "scale": (float(scale[0]), float(scale[1])),
        "offset": (float(offset[0]), float(offset[1])),
    }


def pad_targets(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], difficult: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad per-image targets into dense tensors, without a Python loop over images or boxes.

    Args:
        boxes: B tensors ``[n_i, 4]`` float32.
        labels: B tensors ``[n_i]`` int64.
        difficult: B tensors ``[n_i]`` bool.

    Returns:
        ``boxes [B, G, 4]`` float32, ``labels [B, G]`` int64, ``mask [B, G]`` bool,
        ``difficult [B, G]`` bool, with ``G = max(1, max n_i)`` and zeros on padding.
    """
    b = len(boxes)
    counts = torch.tensor([int(x.shape[0]) for x in boxes], dtype=torch.long)  # [B]
    g = max(1, int(counts.max())) if b else 1
    out_boxes = torch.zeros(b, g, 4, dtype=torch.float32)
    out_labels = torch.zeros(b, g, dtype=torch.int64)
    out_diff = torch.zeros(b, g, dtype=torch.bool)
    mask = torch.arange(g).unsqueeze(0) < counts.unsqueeze(1)  # [B, G]
    if b and int(counts.sum()):
        # Boolean-mask assignment fills rows in order: image 0's boxes, then image 1's...
        out_boxes[mask] = torch.cat(list(boxes)).to(torch.float32).reshape(-1, 4)
        out_labels[mask] = torch.cat(list(labels)).to(torch.int64)
        out_diff[mask] = torch.cat(list(difficult)).to(torch.bool)
    return out_boxes, out_labels, mask, out_diff


def collate_detection(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples (see the module docstring) into a padded batch dict."""
    images = torch.stack([s["image"] for s in samples])  # [B, 3, H, W]
    boxes, labels, mask, difficult = pad_targets(
        [s["boxes"] for s in samples],
        [s["labels"] for s in samples],
        [s["difficult"] for s in samples],
    )
    return {
        "images": images,
        "boxes": boxes,
        "labels": labels,
        "mask": mask,
        "difficult": difficult,
        "meta": [s["meta"] for s in samples],
    }


def to_original_pixels(boxes_norm: ArrayT, meta: dict[str, Any], clip: bool = True) -> ArrayT:
    """Map boxes from the network input back to the original image.

    Args:
        boxes_norm: ``[k, 4]`` (or ``[..., 4]``) xyxy normalised to [0, 1] of the network
            input, a tensor or an array.
        meta: the image's meta dict (``input_size``, ``scale``, ``offset``, ``orig_size``).
        clip: clip to the original image.

    Returns:
        ``[k, 4]`` xyxy in absolute pixels of the original image, same type and dtype
        (float) as the input.
    """
    h, w = meta["input_size"]
    sx, sy = meta["scale"]
    ox, oy = meta["offset"]
    h0, w0 = meta["orig_size"]
    mul = [w / sx, h / sy, w / sx, h / sy]
    sub = [ox / sx, oy / sy, ox / sx, oy / sy]
    hi = [w0, h0, w0, h0]
    if isinstance(boxes_norm, Tensor):
        t = boxes_norm.to(torch.float32) if not boxes_norm.is_floating_point() else boxes_norm
        out = t * t.new_tensor(mul) - t.new_tensor(sub)
        if clip:
            out = torch.minimum(out.clamp(min=0), out.new_tensor(hi))
        return out
    arr = np.asarray(boxes_norm)
    arr = arr.astype(np.float32) if not np.issubdtype(arr.dtype, np.floating) else arr
    out_np = arr * np.asarray(mul, dtype=arr.dtype) - np.asarray(sub, dtype=arr.dtype)
    if clip:
        out_np = np.clip(out_np, 0, np.asarray(hi, dtype=arr.dtype))
    return out_np
