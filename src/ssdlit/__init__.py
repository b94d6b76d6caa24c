"""ssdlit: single-shot object detectors on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
