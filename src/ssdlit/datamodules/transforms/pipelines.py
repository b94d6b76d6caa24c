"""Augmentation pipelines by name: ``build_transforms("ssd" | "light" | "val", image_size)``.

Every pipeline is an :class:`albumentations.Compose` whose boxes are ``pascal_voc``
(xyxy, absolute pixels of the current image). Labels travel as an *index column*: the
boxes go in as ``[N, 5]`` = (x1, y1, x2, y2, i) and :func:`apply_transform` looks the
labels and difficult flags of the surviving rows up by ``i`` (cheaper than albumentations'
label encoders, and exact for any label type).

``BboxParams``: ``clip=True`` (annotations a little outside the image are clipped, not
refused), ``filter_invalid_bboxes=True`` (a degenerate box is dropped, never a crash in a
worker), and at the end of the pipeline boxes are clipped to the output image and those
smaller than ``min_size`` output pixels a side or with less than ``min_visibility`` of their
area inside the output are dropped (``check_each_transform=False``: filtering once, on the
final image, is what matters for training and saves a third of the pipeline's time; every
transform used here keeps boxes consistent when they extend past the image). The SSD crop
does its own centre-based filtering and clipping, so ``min_visibility`` only acts on
transforms added through ``extra``. Training pipelines default to ``min_size=1`` (a box
under one pixel of the network input is noise); ``val`` keeps every box (``0``).

Extra transforms come as dicts, ``{"name": "GaussNoise", "p": 0.2, ...}``: the name is
looked up among ssdlit's own transforms (:data:`CUSTOM_TRANSFORMS`), then in the
``albumentations`` namespace, and nowhere else. A compose (``OneOf``, ``SomeOf``,
``Sequential``) takes ``"transforms": [ {...}, ... ]``. ``extra`` goes just before the
final resize (so geometric extras keep the output size), ``extra_after_resize`` after it
(cheap pixel-level noise at the network resolution).

Reproducibility: ``seed`` seeds the Compose's own generators (albumentations 2.x never
reads the global ones). In DataLoader workers every worker holds a copy of the same
Compose, so :func:`ssdlit.datamodules.datamodule.seed_worker` reseeds each copy from the
worker's torch seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform

from ssdlit.config import plain
from ssdlit.datamodules.transforms.geometric import (
    SSD_MEAN_RGB,
    SSD_MIN_IOUS,
    Letterbox,
    MinIoURandomCrop,
    ZoomOut,
)
from ssdlit.datamodules.transforms.photometric import SSDPhotometricDistort
from ssdlit.registry import Registry

__all__ = [
    "CUSTOM_TRANSFORMS",
    "INTERPOLATIONS",
    "PIPELINES",
    "TransformResult",
    "apply_transform",
    "as_hw",
    "build_transforms",
    "find_letterbox",
    "light_pipeline",
    "make_compose",
    "ssd_pipeline",
    "transform_from_spec",
    "val_pipeline",
]

#: ssdlit's own transforms, addressable by name in ``extra`` specs.
CUSTOM_TRANSFORMS: dict[str, type] = {
    "Letterbox": Letterbox,
    "MinIoURandomCrop": MinIoURandomCrop,
    "SSDPhotometricDistort": SSDPhotometricDistort,
    "ZoomOut": ZoomOut,
}

#: Interpolation names accepted wherever an OpenCV flag is (config-friendly).
INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}

#: Pipeline builders by name: ``builder(image_size, *, seed=None, **options) -> A.Compose``.
PIPELINES = Registry("augmentation pipeline")

Spec = Mapping[str, Any]


def as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    hw = tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return hw  # type: ignore[return-value]


def _interp(value: int | str) -> int:
    if isinstance(value, str):
        try:
            return INTERPOLATIONS[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown interpolation {value!r}; known: {', '.join(INTERPOLATIONS)}"
            ) from None
    return int(value)


def transform_from_spec(spec: Spec | BasicTransform | BaseCompose) -> BasicTransform | BaseCompose:
    """Build one transform from ``{"name": ..., **kwargs}`` (or pass a built one through).

    ``name`` is looked up in :data:`CUSTOM_TRANSFORMS`, then as an attribute of the
    ``albumentations`` module; it must be a transform or compose class. A
    ``"transforms"`` list inside the spec is built recursively (for ``OneOf`` & co.).
    """
    if isinstance(spec, (BasicTransform, BaseCompose)):
        return spec
    spec = dict(plain(spec))
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name or name.startswith("_"):
        raise ValueError(f"a transform spec needs a 'name' (albumentations class), got {name!r}")
    cls = CUSTOM_TRANSFORMS.get(name) or getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (BasicTransform, BaseCompose))):
        raise ValueError(
            f"unknown transform {name!r}: not an ssdlit transform "
            f"({', '.join(sorted(CUSTOM_TRANSFORMS))}) nor an albumentations transform class"
        )
    if "transforms" in spec:
        spec["transforms"] = [transform_from_spec(s) for s in spec["transforms"]]
    if "interpolation" in spec and isinstance(spec["interpolation"], str):
        spec["interpolation"] = _interp(spec["interpolation"])
    return cls(**spec)


def _specs(specs: Sequence[Spec] | None) -> list[BasicTransform | BaseCompose]:
    return [transform_from_spec(s) for s in (plain(specs) or ())]


def make_compose(
    transforms: Sequence[BasicTransform | BaseCompose],
    *,
    min_visibility: float = 0.0,
    min_size: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """``A.Compose`` with ssdlit's box parameters (``pascal_voc``, clip, filtering)."""
    bbox_params = A.BboxParams(
        format="pascal_voc",
        clip=True,
        filter_invalid_bboxes=True,
        min_visibility=float(min_visibility),
        min_width=float(min_size),
        min_height=float(min_size),
        check_each_transform=False,
    )
    return A.Compose(list(transforms), bbox_params=bbox_params, seed=seed)


@PIPELINES.register("ssd")
def ssd_pipeline(
    image_size: int | Sequence[int],
    *,
    photometric: bool = True,
    brightness_delta: float = 32.0,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 18.0,
    distortion_p: float = 0.5,
    contrast_center: float = 127.5,
    zoom_out_p: float = 0.5,
    max_zoom: float = 4.0,
    fill: Sequence[float] = SSD_MEAN_RGB,
    crop: bool = True,
    min_ious: Sequence[float | None] = SSD_MIN_IOUS,
    max_trials: int = 50,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    crop_aspect_ratio: tuple[float, float] = (0.5, 2.0),
    flip_p: float = 0.5,
    interpolation: int | str = "linear",
    extra: Sequence[Spec] | None = None,
    extra_after_resize: Sequence[Spec] | None = None,
    min_visibility: float = 0.3,
    min_size: float = 1.0,
    seed: int | None = None,
) -> A.Compose:
    """The original SSD training chain.

    :class:`SSDPhotometricDistort` (each distortion p=``distortion_p``) ->
    :class:`ZoomOut` (1..``max_zoom``, canvas ``fill``, p=``zoom_out_p``) ->
    :class:`MinIoURandomCrop` (``min_ious``, ``max_trials``, ``crop_scale``,
    ``crop_aspect_ratio``) -> horizontal flip (p=``flip_p``) -> ``extra`` ->
    resize to ``image_size`` ``(H, W)`` -> ``extra_after_resize``.
    """
    h, w = as_hw(image_size)
    ts: list[BasicTransform | BaseCompose] = []
    if photometric:
        ts.append(
            SSDPhotometricDistort(
                brightness_delta=brightness_delta,
                contrast=tuple(contrast),
                saturation=tuple(saturation),
                hue_delta=hue_delta,
                distortion_p=distortion_p,
                contrast_center=contrast_center,
            )
        )
    if zoom_out_p > 0:
        ts.append(ZoomOut(max_scale=max_zoom, fill=tuple(fill), p=zoom_out_p))
    if crop:
        ts.append(
            MinIoURandomCrop(
                min_ious=tuple(plain(min_ious)),
                max_trials=max_trials,
                scale=tuple(crop_scale),
                aspect_ratio=tuple(crop_aspect_ratio),
            )
        )
    return _flip_resize_compose(
        ts, flip_p, extra, (h, w), interpolation, extra_after_resize, min_visibility, min_size, seed
    )


def _flip_resize_compose(
    ts: list[BasicTransform | BaseCompose],
    flip_p: float,
    extra: Sequence[Spec] | None,
    size: tuple[int, int],
    interpolation: int | str,
    extra_after_resize: Sequence[Spec] | None,
    min_visibility: float,
    min_size: float,
    seed: int | None,
) -> A.Compose:
    """The common tail of the training pipelines: ``ts`` -> horizontal flip (p=``flip_p``)
    -> ``extra`` -> resize to ``size`` (H, W) -> ``extra_after_resize``, composed."""
    if flip_p > 0:
        ts.append(A.HorizontalFlip(p=flip_p))
    ts += _specs(extra)
    ts.append(A.Resize(*size, interpolation=_interp(interpolation)))
    ts += _specs(extra_after_resize)
    return make_compose(ts, min_visibility=min_visibility, min_size=min_size, seed=seed)


@PIPELINES.register("light")
def light_pipeline(
    image_size: int | Sequence[int],
    *,
    flip_p: float = 0.5,
    interpolation: int | str = "linear",
    extra: Sequence[Spec] | None = None,
    extra_after_resize: Sequence[Spec] | None = None,
    min_visibility: float = 0.3,
    min_size: float = 1.0,
    seed: int | None = None,
) -> A.Compose:
    """Horizontal flip (p=``flip_p``) -> ``extra`` -> resize -> ``extra_after_resize``."""
    h, w = as_hw(image_size)
    ts: list[BasicTransform | BaseCompose] = []
    return _flip_resize_compose(
        ts, flip_p, extra, (h, w), interpolation, extra_after_resize, min_visibility, min_size, seed
    )


@PIPELINES.register("val")
def val_pipeline(
    image_size: int | Sequence[int],
    *,
    letterbox: bool = False,
    letterbox_center: bool = True,
    fill: Sequence[float] = SSD_MEAN_RGB,
    interpolation: int | str = "linear",
    extra: Sequence[Spec] | None = None,
    extra_after_resize: Sequence[Spec] | None = None,
    min_visibility: float = 0.0,
    min_size: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """Resize to ``image_size`` (or, with ``letterbox=True``, :class:`Letterbox`: scale to
    fit keeping the aspect ratio and pad with ``fill``). Keeps every box by default."""
    h, w = as_hw(image_size)
    ts: list[BasicTransform | BaseCompose] = list(_specs(extra))
    if letterbox:
        ts.append(
            Letterbox(
                h,
                w,
                fill=tuple(fill),
                center=letterbox_center,
                interpolation=_interp(interpolation),
            )
        )
    else:
        ts.append(A.Resize(h, w, interpolation=_interp(interpolation)))
    ts += _specs(extra_after_resize)
    return make_compose(ts, min_visibility=min_visibility, min_size=min_size, seed=seed)


def build_transforms(
    name: str, image_size: int | Sequence[int], *, seed: int | None = None, **options: Any
) -> A.Compose:
    """The pipeline registered as ``name`` (``ssd``, ``light``, ``val``, or a plugin's).

    Args:
        name: the pipeline name in :data:`PIPELINES`.
        image_size: network input ``(H, W)`` (or one int for a square).
        seed: seed of the Compose's random generators (None: fresh entropy).
        **options: the builder's keyword options (see :func:`ssd_pipeline`,
            :func:`light_pipeline`, :func:`val_pipeline`).
    """
    return PIPELINES.build(name, image_size=image_size, seed=seed, **plain(options))


# -- running a pipeline on one record -----------------------------------------------------


class TransformResult(NamedTuple):
    """One augmented sample: ``image`` uint8 ``[H, W, C]``; ``boxes`` float32 ``[n, 4]`` xyxy
    absolute pixels of ``image``; ``labels`` ``[n]``; ``difficult`` ``[n]`` (rows kept)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def apply_transform(
    transform: Callable[..., dict[str, Any]] | None,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    difficult: np.ndarray,
) -> TransformResult:
    """Run an albumentations pipeline on one image and its ``[N, 4]`` xyxy pixel boxes.

    Labels and difficult flags follow their boxes through an index column (no Python
    loop over boxes). ``transform=None`` returns the inputs unchanged.
    """
    if transform is None:
        return TransformResult(image, boxes, labels, difficult)
    n = len(boxes)
    rows = np.empty((n, 5), dtype=np.float32)
    rows[:, :4] = boxes
    rows[:, 4] = np.arange(n, dtype=np.float32)  # exact below 2**24 boxes
    out = transform(image=image, bboxes=rows)
    kept = np.asarray(out["bboxes"], dtype=np.float32)
    if kept.shape[0] == 0:
        idx = np.zeros(0, dtype=np.int64)
        kept_boxes = np.zeros((0, 4), dtype=np.float32)
    else:
        idx = kept[:, 4].astype(np.int64)
        kept_boxes = np.ascontiguousarray(kept[:, :4])
    return TransformResult(out["image"], kept_boxes, labels[idx], difficult[idx])


def find_letterbox(transform: Any) -> Letterbox | None:
    """The :class:`Letterbox` inside a (possibly nested) compose, or None."""
    if isinstance(transform, Letterbox):
        return transform
    for t in getattr(transform, "transforms", ()) or ():
        found = find_letterbox(t)
        if found is not None:
            return found
    return None
