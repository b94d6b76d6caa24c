"""Augmentation for detection: ssdlit's albumentations transforms and named pipelines.

- :mod:`.photometric`: :class:`SSDPhotometricDistort` (uint8 lookup tables).
- :mod:`.geometric`: :class:`ZoomOut`, :class:`MinIoURandomCrop`, :class:`Letterbox`.
- :mod:`.mosaic`: :class:`Mosaic` (four training images in one, before a pipeline; the
  dataset applies it, ``augment.train.mosaic_p``).
- :mod:`.pipelines`: :func:`build_transforms` (``ssd``, ``light``, ``val``),
  :func:`transform_from_spec` (``{"name": "GaussNoise", ...}``), :func:`apply_transform`.
"""

from ssdlit.datamodules.transforms.geometric import (
    SSD_MEAN_RGB,
    SSD_MIN_IOUS,
    Letterbox,
    LetterboxGeometry,
    MinIoURandomCrop,
    ZoomOut,
    letterbox_geometry,
    sample_min_iou_crop,
)
from ssdlit.datamodules.transforms.mosaic import Mosaic, MosaicPart
from ssdlit.datamodules.transforms.photometric import SSDPhotometricDistort, ssd_photometric_distort
from ssdlit.datamodules.transforms.pipelines import (
    CUSTOM_TRANSFORMS,
    PIPELINES,
    TransformResult,
    apply_transform,
    as_hw,
    build_transforms,
    find_letterbox,
    light_pipeline,
    make_compose,
    ssd_pipeline,
    transform_from_spec,
    val_pipeline,
)

__all__ = [
    "CUSTOM_TRANSFORMS",
    "PIPELINES",
    "SSD_MEAN_RGB",
    "SSD_MIN_IOUS",
    "Letterbox",
    "LetterboxGeometry",
    "MinIoURandomCrop",
    "Mosaic",
    "MosaicPart",
    "SSDPhotometricDistort",
    "TransformResult",
    "ZoomOut",
    "apply_transform",
    "as_hw",
    "build_transforms",
    "find_letterbox",
    "letterbox_geometry",
    "light_pipeline",
    "make_compose",
    "sample_min_iou_crop",
    "ssd_photometric_distort",
    "ssd_pipeline",
    "transform_from_spec",
    "val_pipeline",
]
