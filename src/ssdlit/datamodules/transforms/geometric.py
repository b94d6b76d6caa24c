"""Geometric transforms that albumentations lacks: SSD zoom-out, min-IoU crop, letterbox.

All three are albumentations :class:`~albumentations.core.transforms_interface.DualTransform`
subclasses (albumentations 2.x API), so they compose with every albumentations transform
and move the image, ``mask``/``masks``, ``bboxes`` and ``keypoints`` together.

Box conventions inside albumentations 2.x: ``apply_to_bboxes`` receives a float array
``[N, 4 + E]`` of xyxy boxes *normalised* by the current image size, followed by ``E``
extra columns (labels, indices) that must travel with their row. A transform may drop
rows (the extra columns go with them); the pipeline's ``BboxParams`` filtering runs
after every transform as well.

The sampling itself is in small pure functions (:func:`sample_min_iou_crop`,
:func:`letterbox_geometry`) that take pixel boxes and a NumPy generator, so that they
can be tested and reused without albumentations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from albumentations.core.transforms_interface import DualTransform
from albumentations.core.type_definitions import Targets

__all__ = [
    "SSD_MEAN_RGB",
    "SSD_MIN_IOUS",
    "Letterbox",
    "LetterboxGeometry",
    "MinIoURandomCrop",
    "ZoomOut",
    "box_iou_np",
    "centres_inside",
    "letterbox_geometry",
    "sample_min_iou_crop",
]

#: The mean colour of the original SSD (Caffe ``mean_value: 104, 117, 123`` in BGR), as RGB.
SSD_MEAN_RGB: tuple[int, int, int] = (123, 117, 104)

#: ``min_ious`` of the original SSD batch sampler: ``None`` = keep the whole image,
#: a float = the crop must overlap some box with at least this IoU, ``0.0`` = any crop.
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)

_TARGETS = (Targets.IMAGE, Targets.MASK, Targets.BBOXES, Targets.KEYPOINTS)

CropCoords = tuple[int, int, int, int]

#: dtypes cv2.copyMakeBorder takes.
_CV2_DTYPES = {
    np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)
}


def _fill_for(img: np.ndarray, fill: float | Sequence[float]) -> np.ndarray:
    """``fill`` as an array broadcastable over ``img``'s channels, in ``img``'s dtype."""
    value = np.asarray(fill, dtype=np.float64).reshape(-1)
    channels = img.shape[2] if img.ndim == 3 else 1
    if value.size == 1:
        value = np.repeat(value, channels)
    elif value.size != channels:  # e.g. an RGB fill for a single-channel image: its mean
        value = np.full(channels, value.mean())
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        value = np.clip(np.rint(value), info.min, info.max)
    value = value.astype(img.dtype)
    return value if img.ndim == 3 else value[0]


def _paste_on_canvas(
    img: np.ndarray, canvas_hw: tuple[int, int], top: int, left: int, fill: Any
) -> np.ndarray:
    """``img`` placed at ``(top, left)`` on a ``canvas_hw`` canvas filled with ``fill``.

    ``cv2.copyMakeBorder`` for up to 4 channels (every output pixel written once, in C);
    a NumPy fallback for more channels (stacked masks).
    """
    h, w = img.shape[:2]
    ch, cw = canvas_hw
    value = _fill_for(img, fill)
    channels = img.shape[2] if img.ndim == 3 else 1
    if channels <= 4 and img.dtype in _CV2_DTYPES:
        border = [float(v) for v in np.atleast_1d(value)]
        out = cv2.copyMakeBorder(
            img, top, ch - h - top, left, cw - w - left, cv2.BORDER_CONSTANT, value=border
        )
        return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out
    out = np.empty((ch, cw, *img.shape[2:]), dtype=img.dtype)
    out[...] = value
    out[top : top + h, left : left + w] = img
    return out


# -- pure box helpers ---------------------------------------------------------------------


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between xyxy boxes ``a [T, 4]`` and ``b [N, 4]`` -> ``[T, N]`` (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [T, N, 2]
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])  # [T, N, 2]
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # [T, N]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # [T]
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # [N]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def centres_inside(patches: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each box centre lies strictly inside each patch.

    Args:
        patches: ``[T, 4]`` xyxy, same units as ``boxes``.
        boxes: ``[N, 4]`` xyxy.

    Returns:
        bool ``[T, N]``.
    """
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5  # [N]
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    return (
        (patches[:, 0:1] < cx)
        & (cx < patches[:, 2:3])
        & (patches[:, 1:2] < cy)
        & (cy < patches[:, 3:4])
    )


def sample_min_iou_crop(
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    min_iou: float,
    rng: np.random.Generator,
    *,
    max_trials: int = 50,
    scale: tuple[float, float] = (0.3, 1.0),
    aspect_ratio: tuple[float, float] = (0.5, 2.0),
) -> CropCoords | None:
    """Sample the SSD random crop patch: the first of ``max_trials`` candidates that works.

    A candidate (all drawn at once, vectorised) has scale ``s ~ U(scale)`` and aspect ratio
    ``r ~ U(max(aspect_lo, s^2), min(aspect_hi, 1/s^2))`` (the Caffe SSD sampler), giving a
    patch of ``s*sqrt(r)*W`` by ``s/sqrt(r)*H`` pixels (rounded, at least 1) at a uniformly
    random integer position inside the image. It works when some box has its centre
    strictly inside the patch *and* IoU(patch, box) >= ``min_iou``. With no boxes, the first
    candidate works.

    Args:
        boxes: ``[N, 4]`` xyxy in absolute pixels.
        image_hw: ``(H, W)``.
        min_iou: the minimum IoU (0.0 = no IoU constraint, only a centre inside).
        rng: the generator to draw from.

    Returns:
        ``(x0, y0, x1, y1)`` integer pixel corners of the patch, or ``None`` when no
        candidate works.
    """
    h, w = image_hw
    t = max_trials
    s = rng.uniform(scale[0], scale[1], size=t)
    ar_lo = np.maximum(aspect_ratio[0], s * s)
    ar_hi = np.minimum(aspect_ratio[1], 1.0 / (s * s))
    ar = ar_lo + (ar_hi - ar_lo) * rng.random(t)
    root = np.sqrt(ar)
    pw = np.clip(np.rint(s * root * w), 1, w).astype(np.int64)  # [T]
    ph = np.clip(np.rint(s / root * h), 1, h).astype(np.int64)
    x0 = np.floor(rng.random(t) * (w - pw + 1)).astype(np.int64)
    y0 = np.floor(rng.random(t) * (h - ph + 1)).astype(np.int64)
    patches = np.stack([x0, y0, x0 + pw, y0 + ph], axis=1)  # [T, 4]
    if len(boxes) == 0:
        ok = np.ones(t, dtype=bool)
    else:
        boxes = np.asarray(boxes, dtype=np.float64)[:, :4]
        good = centres_inside(patches, boxes) & (box_iou_np(patches, boxes) >= min_iou)
        ok = good.any(axis=1)  # [T]
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    return tuple(int(v) for v in patches[i])  # type: ignore[return-value]


@dataclass(frozen=True)
class LetterboxGeometry:
    """How :class:`Letterbox` maps an ``(h, w)`` image into an ``(H, W)`` input.

    ``x_out = x_in * scale_x + pad_x`` (pixels; likewise for y). ``new_w, new_h`` is the
    size of the resized image before padding.
    """

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    new_w: int
    new_h: int


def letterbox_geometry(
    image_hw: tuple[int, int], out_hw: tuple[int, int], center: bool = True
) -> LetterboxGeometry:
    """Scale to fit ``out_hw`` keeping the aspect ratio; pad the rest (centred or top-left)."""
    h, w = image_hw
    oh, ow = out_hw
    s = min(oh / h, ow / w)
    new_w = min(ow, max(1, round(w * s)))
    new_h = min(oh, max(1, round(h * s)))
    pad_x = (ow - new_w) // 2 if center else 0
    pad_y = (oh - new_h) // 2 if center else 0
    return LetterboxGeometry(new_w / w, new_h / h, pad_x, pad_y, new_w, new_h)


# -- transforms ---------------------------------------------------------------------------


class ZoomOut(DualTransform):
    """SSD "expand": place the image on a canvas 1 to ``max_scale`` times larger.

    The canvas side ratio ``r ~ U(1, max_scale)`` (the same for both sides), the canvas is
    ``int(h*r) x int(w*r)`` filled with ``fill`` (the dataset mean colour, in image units,
    e.g. 0..255 for uint8), and the image sits at a uniformly random integer offset. Boxes
    and keypoints move with the image; masks are padded with ``fill_mask``.

    Args:
        max_scale: the largest canvas/image side ratio (SSD: 4).
        fill: canvas colour, one value per channel (or one for all).
        fill_mask: the value masks are padded with.
        p: probability (SSD: 0.5).

    Targets: image, mask, bboxes, keypoints.
    """

    _targets = _TARGETS

    def __init__(
        self,
        max_scale: float = 4.0,
        fill: float | Sequence[float] = SSD_MEAN_RGB,
        fill_mask: float = 0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        if max_scale < 1.0:
            raise ValueError(f"ZoomOut: max_scale must be >= 1, got {max_scale}")
        self.max_scale = float(max_scale)
        self.fill = tuple(fill) if isinstance(fill, Sequence) else fill
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        ch, cw = max(h, int(h * ratio)), max(w, int(w * ratio))
        return {
            "canvas_hw": (ch, cw),
            "top": self.py_random.randint(0, ch - h),
            "left": self.py_random.randint(0, cw - w),
        }

    def apply(
        self,
        img: np.ndarray,
        canvas_hw: tuple[int, int],
        top: int,
        left: int,
        **params: Any,
    ) -> np.ndarray:
        return _paste_on_canvas(img, canvas_hw, top, left, self.fill)

    def apply_to_mask(
        self,
        mask: np.ndarray,
        canvas_hw: tuple[int, int],
        top: int,
        left: int,
        **params: Any,
    ) -> np.ndarray:
        return _paste_on_canvas(mask, canvas_hw, top, left, self.fill_mask)

    def apply_to_bboxes(
        self,
        bboxes: np.ndarray,
        canvas_hw: tuple[int, int],
        top: int,
        left: int,
        **params: Any,
    ) -> np.ndarray:
        if not len(bboxes):
            return bboxes
        h, w = params["shape"][:2]
        ch, cw = canvas_hw
        out = bboxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] * w + left) / cw
        out[:, [1, 3]] = (out[:, [1, 3]] * h + top) / ch
        return out

    def apply_to_keypoints(
        self, keypoints: np.ndarray, top: int, left: int, **params: Any
    ) -> np.ndarray:
        out = keypoints.astype(np.float32, copy=True)
        out[:, 0] += left
        out[:, 1] += top
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill", "fill_mask")


class MinIoURandomCrop(DualTransform):
    """The SSD random crop: a patch that overlaps some object by at least a random IoU.

    Each call draws ``min_iou`` uniformly from ``min_ious`` (SSD: ``None`` = no crop, 0.1,
    0.3, 0.5, 0.7, 0.9, and ``0.0`` = any patch); then :func:`sample_min_iou_crop` tries up
    to ``max_trials`` patches (scale in ``scale``, aspect ratio in ``aspect_ratio``). When
    none works, the image is returned unchanged (as in ssd_keras).

    Boxes whose centre is inside the patch are kept and clipped to it; the others are
    dropped (their rows, with the extra columns, leave the array). Masks are cropped;
    keypoints are shifted (the keypoint processor drops the ones outside).

    Targets: image, mask, bboxes, keypoints.
    """

    _targets = _TARGETS

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        max_trials: int = 50,
        scale: tuple[float, float] = (0.3, 1.0),
        aspect_ratio: tuple[float, float] = (0.5, 2.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not min_ious:
            raise ValueError("MinIoURandomCrop: min_ious must not be empty")
        self.min_ious = tuple(None if v is None else float(v) for v in min_ious)
        if max_trials < 1:
            raise ValueError(f"MinIoURandomCrop: max_trials must be >= 1, got {max_trials}")
        self.max_trials = int(max_trials)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"MinIoURandomCrop: need 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if not 0.0 < aspect_ratio[0] <= aspect_ratio[1]:
            raise ValueError(f"MinIoURandomCrop: bad aspect_ratio {aspect_ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.aspect_ratio = (float(aspect_ratio[0]), float(aspect_ratio[1]))

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        full = (0, 0, w, h)
        min_iou = self.min_ious[self.py_random.randrange(len(self.min_ious))]
        if min_iou is None:
            return {"crop_coords": full, "min_iou": None}
        bboxes = data.get("bboxes")
        boxes = (
            np.zeros((0, 4))
            if bboxes is None or not len(bboxes)
            else np.asarray(bboxes, dtype=np.float64)[:, :4] * np.array([w, h, w, h])
        )
        coords = sample_min_iou_crop(
            boxes,
            (h, w),
            min_iou,
            self.random_generator,
            max_trials=self.max_trials,
            scale=self.scale,
            aspect_ratio=self.aspect_ratio,
        )
        return {"crop_coords": full if coords is None else coords, "min_iou": min_iou}

    def apply(self, img: np.ndarray, crop_coords: CropCoords, **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop_coords
        if (x0, y0) == (0, 0) and (y1, x1) == tuple(img.shape[:2]):
            return img
        return img[y0:y1, x0:x1]

    def apply_to_mask(self, mask: np.ndarray, crop_coords: CropCoords, **params: Any) -> np.ndarray:
        return self.apply(mask, crop_coords)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: CropCoords, **params: Any
    ) -> np.ndarray:
        h, w = params["shape"][:2]
        x0, y0, x1, y1 = crop_coords
        if not len(bboxes) or crop_coords == (0, 0, w, h):
            return bboxes
        scale = np.array([w, h, w, h], dtype=np.float64)
        px = np.asarray(bboxes[:, :4], dtype=np.float64) * scale  # same as at sampling time
        patch = np.array([[x0, y0, x1, y1]], dtype=np.float64)
        keep = centres_inside(patch, px)[0]  # [N]
        px = px[keep]
        pw, ph = x1 - x0, y1 - y0
        px -= np.array([x0, y0, x0, y0], dtype=np.float64)
        px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, pw)
        px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, ph)
        out = bboxes[keep].astype(np.float32, copy=True)
        out[:, :4] = px / np.array([pw, ph, pw, ph], dtype=np.float64)
        return out

    def apply_to_keypoints(
        self, keypoints: np.ndarray, crop_coords: CropCoords, **params: Any
    ) -> np.ndarray:
        out = keypoints.astype(np.float32, copy=True)
        out[:, 0] -= crop_coords[0]
        out[:, 1] -= crop_coords[1]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "max_trials", "scale", "aspect_ratio")


class Letterbox(DualTransform):
    """Resize keeping the aspect ratio so the image fits ``(height, width)``; pad the rest.

    The geometry is :func:`letterbox_geometry` (``x_out = x_in * scale_x + pad_x``); the
    padding is ``fill`` for images and ``fill_mask`` for masks. ``center=False`` puts the
    image in the top-left corner.

    Targets: image, mask, bboxes, keypoints.
    """

    _targets = _TARGETS

    def __init__(
        self,
        height: int,
        width: int,
        fill: float | Sequence[float] = SSD_MEAN_RGB,
        fill_mask: float = 0,
        center: bool = True,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height = int(height)
        self.width = int(width)
        self.fill = tuple(fill) if isinstance(fill, Sequence) else fill
        self.fill_mask = fill_mask
        self.center = bool(center)
        self.interpolation = int(interpolation)

    def geometry(self, image_hw: tuple[int, int]) -> LetterboxGeometry:
        """The mapping this transform applies to an image of size ``image_hw``."""
        return letterbox_geometry(image_hw, (self.height, self.width), self.center)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        return {"geometry": self.geometry(tuple(params["shape"][:2]))}

    def _letterbox(
        self, img: np.ndarray, g: LetterboxGeometry, interpolation: int, fill: Any
    ) -> np.ndarray:
        if (g.new_h, g.new_w) != img.shape[:2]:
            img = cv2.resize(img, (g.new_w, g.new_h), interpolation=interpolation)
        return _paste_on_canvas(img, (self.height, self.width), g.pad_y, g.pad_x, fill)

    def apply(self, img: np.ndarray, geometry: LetterboxGeometry, **params: Any) -> np.ndarray:
        out = self._letterbox(img, geometry, self.interpolation, self.fill)
        if img.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
            out = out[:, :, None]
        return out

    def apply_to_mask(
        self, mask: np.ndarray, geometry: LetterboxGeometry, **params: Any
    ) -> np.ndarray:
        out = self._letterbox(mask, geometry, cv2.INTER_NEAREST, self.fill_mask)
        if mask.ndim == 3 and out.ndim == 2:
            out = out[:, :, None]
        return out

    def apply_to_bboxes(
        self, bboxes: np.ndarray, geometry: LetterboxGeometry, **params: Any
    ) -> np.ndarray:
        if not len(bboxes):
            return bboxes
        g = geometry
        out = bboxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] * g.new_w + g.pad_x) / self.width
        out[:, [1, 3]] = (out[:, [1, 3]] * g.new_h + g.pad_y) / self.height
        return out

    def apply_to_keypoints(
        self, keypoints: np.ndarray, geometry: LetterboxGeometry, **params: Any
    ) -> np.ndarray:
        out = keypoints.astype(np.float32, copy=True)
        out[:, 0] = out[:, 0] * geometry.scale_x + geometry.pad_x
        out[:, 1] = out[:, 1] * geometry.scale_y + geometry.pad_y
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "fill", "fill_mask", "center", "interpolation")
