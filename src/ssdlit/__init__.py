"""ssdlit: single-shot object detectors on PyTorch Lightning and Hydra.

Importing the package registers the built-in components in the registries of
:mod:`ssdlit.registry`; :func:`ssdlit.registry.load_plugins` adds third-party ones.
"""

from ssdlit import anchors, backbones, boxes, datamodules, heads, metrics, postprocess, registry
from ssdlit.detector import Detector
from ssdlit.registry import load_plugins

__version__ = "0.1.0"

__all__ = [
    "Detector",
    "__version__",
    "anchors",
    "backbones",
    "boxes",
    "datamodules",
    "heads",
    "load_plugins",
    "metrics",
    "postprocess",
    "registry",
]
