"""Detectors trained elsewhere, inside ssdlit: torchvision's COCO models and ssd_keras's SSD300.

- :func:`from_torchvision` converts torchvision's ``ssd300_vgg16`` and
  ``ssdlite320_mobilenet_v3_large`` (a model, its state dict or a ``.pth`` file) into a
  :class:`~ssdlit.Detector` that computes the same detections.
- :func:`from_ssd_keras` reads ssd_keras's SSD300 HDF5 weights.
- :data:`NAMED_WEIGHTS`: ``torchvision:ssd300_vgg16_coco`` and ``torchvision:ssdlite320_coco``,
  what ``init_from=`` and ``ckpt=`` accept by name.
"""

from ssdlit.zoo.ssd_keras import from_ssd_keras
from ssdlit.zoo.torchvision import (
    ARCHITECTURES,
    NAMED_WEIGHTS,
    coco_class_names,
    detector_spec,
    from_torchvision,
    load_named_weights,
    torchvision_state_dict,
)

__all__ = [
    "ARCHITECTURES",
    "NAMED_WEIGHTS",
    "coco_class_names",
    "detector_spec",
    "from_ssd_keras",
    "from_torchvision",
    "load_named_weights",
    "torchvision_state_dict",
]
