"""Export the inference path (network, decoding, NMS) to ONNX and TorchScript.

The exported graph takes ``images`` uint8 ``[B, 3, H, W]`` and returns
``detections`` ``[N, 7]`` = (image index, label, score, x1, y1, x2, y2) in input
pixels, sorted by score. ONNX needs the ``onnx`` package (and ``onnxruntime`` to
verify): ``pip install "ssdlit[export]"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssdlit.detector import Detector, ExportWrapper

__all__ = ["export_onnx", "export_torchscript", "run_onnx", "verify_onnx"]


def _example(detector: Detector, batch_size: int) -> Tensor:
    g = torch.Generator().manual_seed(0)
    h, w = detector.image_size
    return torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, generator=g)


def export_onnx(
    detector: Detector,
    path: str | Path,
    example: Tensor | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Write the detector's inference path to ``path`` as ONNX (opset 17, NMS inside).

    Uses the TorchScript-based exporter, which records torchvision's NMS as the ONNX
    ``NonMaxSuppression`` operator. The batch dimension is dynamic unless
    ``dynamic_batch=False``; the image size is fixed to the detector's.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            'ONNX export needs the onnx package: pip install "ssdlit[export]"'
        ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(detector).eval()
    images = example if example is not None else _example(detector, 1)
    dynamic = {"images": {0: "batch"}, "detections": {0: "num_detections"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side constants
        torch.onnx.export(
            wrapper,
            (images,),
            str(path),
            opset_version=opset,
            input_names=["images"],
            output_names=["detections"],
            dynamic_axes=dynamic if dynamic_batch else {"detections": {0: "num_detections"}},
            dynamo=False,
        )
    return path


def run_onnx(path: str | Path, images: Tensor | np.ndarray) -> np.ndarray:
    """Run an exported model in onnxruntime (CPU): ``[N, 7]`` detections."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError('running ONNX needs onnxruntime: pip install "ssdlit[export]"') from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    array = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    return session.run(["detections"], {"images": array.astype(np.uint8)})[0]


def verify_onnx(
    detector: Detector, path: str | Path, images: Tensor, atol: float = 1e-3
) -> dict[str, float]:
    """Compare onnxruntime's detections with PyTorch's on ``images``; raise if they differ.

    Detections are compared after sorting by (image, score); boxes within ``atol``
    pixels, scores within 1e-4. Returns the largest differences found.
    """
    with torch.no_grad():
        ours = ExportWrapper(detector).eval()(images).cpu().numpy()
    theirs = run_onnx(path, images)
    if ours.shape != theirs.shape:
        raise AssertionError(f"ONNX gives {theirs.shape[0]} detections, PyTorch {ours.shape[0]}")

    def order(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort((-a[:, 2], a[:, 0]))]

    ours, theirs = order(ours), order(theirs)
    diff_box = float(np.abs(ours[:, 3:] - theirs[:, 3:]).max(initial=0.0))
    diff_score = float(np.abs(ours[:, 2] - theirs[:, 2]).max(initial=0.0))
    same_labels = bool((ours[:, :2] == theirs[:, :2]).all())
    if not same_labels or diff_box > atol or diff_score > 1e-4:
        raise AssertionError(
            f"ONNX and PyTorch disagree: labels equal={same_labels}, max box diff "
            f"{diff_box:.4g} px, max score diff {diff_score:.4g}"
        )
    return {"detections": float(len(ours)), "max_box_diff": diff_box, "max_score_diff": diff_score}


def export_torchscript(detector: Detector, path: str | Path, example: Tensor | None = None) -> Path:
    """Trace the inference path to TorchScript (fixed batch size of ``example``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(detector).eval()
    images = example if example is not None else _example(detector, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (images,), check_trace=False)
    traced.save(str(path))
    return path
