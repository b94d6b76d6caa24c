"""The command-line apps, one module each, run as ``python -m ssdlit.<app>``:

- :mod:`ssdlit.apps.train`: fit a detector, then evaluate its best checkpoint;
- :mod:`ssdlit.apps.evaluate`: the metrics of a checkpoint on a split;
- :mod:`ssdlit.apps.predict`: detections (JSON and pictures) for image files;
- :mod:`ssdlit.apps.export`: ONNX / TorchScript files, verified against PyTorch;
- :mod:`ssdlit.apps.inspect`: a dataset's statistics and anchor coverage before training.

An app reads its Hydra config (``conf/<app>.yaml``) and calls the library; what the apps
share (one-line user errors, checkpoints, run folders) is :mod:`ssdlit.apps.common`. No
app imports another, and nothing outside this package imports an app; ``ssdlit/train.py``
and its siblings only make ``python -m ssdlit.train`` run :func:`ssdlit.apps.train.main`.
"""
