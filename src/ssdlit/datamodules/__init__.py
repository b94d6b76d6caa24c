"""Data: annotation sources (VOC, CSV, COCO, synthetic) parsed into validated records.

Importing this package registers the sources in :data:`ssdlit.registry.DATASETS`
(``voc``, ``csv``, ``coco``, ``synthetic``). Every source is built with keyword
arguments only and exposes ``records`` (:class:`Record`), ``class_names`` and ``report``
(:class:`DataReport`). :class:`DetectionDataModule` turns sources into batches with the
augmentation pipelines of :func:`build_transforms` (``ssd``, ``light``, ``val``).
:func:`build_datamodule` (:mod:`ssdlit.datamodules.from_config`) builds both from the
``data`` and ``augment`` config nodes; :func:`split_off_val` carves a validation split
from the training images (``data.val_fraction``).
"""

from ssdlit.datamodules.coco import COCOSource
from ssdlit.datamodules.collate import collate_detection, pad_targets, to_original_pixels
from ssdlit.datamodules.csv_source import DEFAULT_COLUMNS, SSD_KERAS_COLUMNS, CSVSource
from ssdlit.datamodules.datamodule import DetectionDataModule, DetectionDataset
from ssdlit.datamodules.from_config import (
    build_datamodule,
    build_source,
    build_sources,
    split_roles,
    split_specs,
)
from ssdlit.datamodules.images import (
    ImageHeader,
    decode_image,
    image_size,
    load_rgb,
    read_header,
)
from ssdlit.datamodules.records import DataError, Record, Source
from ssdlit.datamodules.splitting import ValSplit, split_off_val
from ssdlit.datamodules.synthetic import SyntheticSource, write_synthetic_voc
from ssdlit.datamodules.transforms import build_transforms
from ssdlit.datamodules.validation import DataReport, Problem, Validator
from ssdlit.datamodules.voc import VOC_CLASSES, VOCSource

__all__ = [
    "DEFAULT_COLUMNS",
    "SSD_KERAS_COLUMNS",
    "VOC_CLASSES",
    "COCOSource",
    "CSVSource",
    "DataError",
    "DataReport",
    "DetectionDataModule",
    "DetectionDataset",
    "ImageHeader",
    "Problem",
    "Record",
    "Source",
    "SyntheticSource",
    "VOCSource",
    "ValSplit",
    "Validator",
    "build_datamodule",
    "build_source",
    "build_sources",
    "build_transforms",
    "collate_detection",
    "decode_image",
    "image_size",
    "load_rgb",
    "pad_targets",
    "read_header",
    "split_off_val",
    "split_roles",
    "split_specs",
    "to_original_pixels",
    "write_synthetic_voc",
]
