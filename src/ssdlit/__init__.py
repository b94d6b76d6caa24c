"""ssdlit: single-shot object detectors on PyTorch Lightning and Hydra.

Importing the package registers the built-in components in the registries of
:mod:`ssdlit.registry`; :func:`ssdlit.registry.load_plugins` adds third-party ones.
"""

from ssdlit import anchors, boxes, registry
from ssdlit.registry import load_plugins

__version__ = "0.1.0"

__all__ = ["__version__", "anchors", "boxes", "load_plugins", "registry"]
