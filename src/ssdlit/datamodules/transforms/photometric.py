"""The SSD photometric distortions, uint8 in and out, through lookup tables.

What the original SSD does (Caffe ``DistortImage``; ssd_keras
``SSDPhotometricDistortions``), each distortion independently with probability 0.5:

- brightness: ``v + delta``, ``delta ~ U(-32, 32)`` in 0..255 units (additive), clipped;
- contrast: ``c + f * (v - c)``, ``f ~ U(0.5, 1.5)``, clipped; ssd_keras centres at
  ``c = 127.5`` (the default here), Caffe scales without centring (``contrast_center=0``);
- saturation: in HSV, ``S * f``, ``f ~ U(0.5, 1.5)``, clipped;
- hue: in HSV, ``H + delta`` (circular), ``delta ~ U(-18, 18)`` **degrees** (Caffe and
  ssd_keras add 18 units of OpenCV's 0..180 hue scale, i.e. 36 degrees; pass
  ``hue_delta=36`` for that);
- the order is brightness, contrast, saturation, hue, or brightness, saturation, hue,
  contrast, with equal probability.

Brightness and contrast are per-value functions, so each run of them becomes one
256-entry table (``cv2.LUT``); saturation and hue are one three-channel table applied in
OpenCV's full-range uint8 HSV (``COLOR_RGB2HSV_FULL``: hue 0..255 for 0..360 degrees).
No float image is ever made; clipping and rounding follow ssd_keras (clip after each
step, round to uint8 when a step leaves float).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from albumentations.core.transforms_interface import ImageOnlyTransform

__all__ = ["SSDPhotometricDistort", "ssd_photometric_distort"]

_VALUES = np.arange(256, dtype=np.float64)


def _to_lut(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _value_table(
    brightness: float | None, contrast: float | None, contrast_center: float
) -> np.ndarray | None:
    """The 256-entry table of ``contrast(brightness(v))`` (either may be None = skip)."""
    if brightness is None and contrast is None:
        return None
    v = _VALUES
    if brightness is not None:
        v = np.clip(v + brightness, 0.0, 255.0)
    if contrast is not None:
        v = np.clip(contrast_center + contrast * (v - contrast_center), 0.0, 255.0)
    return _to_lut(v)


def _adjust_hsv(img: np.ndarray, saturation: float | None, hue: float | None) -> np.ndarray:
    """Scale S by ``saturation`` and rotate H by ``hue`` degrees; RGB uint8 ``[H, W, 3]``."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    table = np.empty((1, 256, 3), dtype=np.uint8)
    ident = np.arange(256, dtype=np.uint8)
    if hue is not None:
        shift = round(hue * 256.0 / 360.0)
        table[0, :, 0] = (np.arange(256) + shift) % 256
    else:
        table[0, :, 0] = ident
    table[0, :, 1] = _to_lut(_VALUES * saturation) if saturation is not None else ident
    table[0, :, 2] = ident
    cv2.LUT(hsv, table, dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def ssd_photometric_distort(
    img: np.ndarray,
    *,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
    contrast_first: bool = True,
    contrast_center: float = 127.5,
) -> np.ndarray:
    """Apply the chosen SSD distortions (``None`` = skip that one) to a uint8 image.

    Args:
        img: uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` / ``[H, W, 1]`` gray: saturation and hue
            are then skipped).
        brightness: additive delta in 0..255 units.
        contrast: contrast factor around ``contrast_center``.
        saturation: saturation factor.
        hue: hue rotation in degrees.
        contrast_first: contrast before (True) or after (False) saturation and hue.

    Returns:
        uint8 array of the same shape (a new array unless nothing was applied).
    """
    if img.dtype != np.uint8:
        raise TypeError(f"SSD photometric distortion expects a uint8 image, got {img.dtype}")
    colour = img.ndim == 3 and img.shape[2] == 3
    do_hsv = colour and (saturation is not None or hue is not None)
    if contrast_first or not do_hsv:
        table = _value_table(brightness, contrast, contrast_center)
        if table is not None:
            img = _lut(img, table)
        if do_hsv:
            img = _adjust_hsv(img, saturation, hue)
        return img
    table = _value_table(brightness, None, contrast_center)
    if table is not None:
        img = _lut(img, table)
    img = _adjust_hsv(img, saturation, hue)
    table = _value_table(None, contrast, contrast_center)
    return img if table is None else _lut(img, table)


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = cv2.LUT(img, table)
    if img.ndim == 3 and out.ndim == 2:  # [H, W, 1] comes back as [H, W]
        out = out[:, :, None]
    return out


class SSDPhotometricDistort(ImageOnlyTransform):
    """The SSD photometric chain as one albumentations transform (see the module docstring).

    Args:
        brightness_delta: brightness delta range ``U(-d, d)``, 0..255 units (SSD: 32).
        contrast: contrast factor range (SSD: 0.5..1.5).
        saturation: saturation factor range (SSD: 0.5..1.5).
        hue_delta: hue rotation range ``U(-d, d)`` in degrees (18 by default).
        distortion_p: probability of each distortion (SSD: 0.5).
        contrast_center: the value contrast scales around (127.5 ssd_keras, 0 Caffe).
        p: probability of the whole chain.

    Targets: image. Image types: uint8.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        distortion_p: float = 0.5,
        contrast_center: float = 127.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = float(brightness_delta)
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.saturation = (float(saturation[0]), float(saturation[1]))
        self.hue_delta = float(hue_delta)
        if not 0.0 <= distortion_p <= 1.0:
            raise ValueError(f"distortion_p must be in [0, 1], got {distortion_p}")
        self.distortion_p = float(distortion_p)
        self.contrast_center = float(contrast_center)

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        q = self.distortion_p
        d, h = self.brightness_delta, self.hue_delta
        return {
            "contrast_first": r.random() < 0.5,
            "brightness": r.uniform(-d, d) if r.random() < q else None,
            "contrast_factor": r.uniform(*self.contrast) if r.random() < q else None,
            "saturation_factor": r.uniform(*self.saturation) if r.random() < q else None,
            "hue_shift": r.uniform(-h, h) if r.random() < q else None,
        }

    def apply(
        self,
        img: np.ndarray,
        contrast_first: bool = True,
        brightness: float | None = None,
        contrast_factor: float | None = None,
        saturation_factor: float | None = None,
        hue_shift: float | None = None,
        **params: Any,
    ) -> np.ndarray:
        return ssd_photometric_distort(
            img,
            brightness=brightness,
            contrast=contrast_factor,
            saturation=saturation_factor,
            hue=hue_shift,
            contrast_first=contrast_first,
            contrast_center=self.contrast_center,
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return (
            "brightness_delta",
            "contrast",
            "saturation",
            "hue_delta",
            "distortion_p",
            "contrast_center",
        )
