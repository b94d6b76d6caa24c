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

__all__ = ["export_onnx", "export_torchscript", "load_torchscript", "run_onnx", "verify_onnx"]


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
    detector: Detector,
    path: str | Path,
    images: Tensor,
    atol: float = 1e-2,
    score_tol: float = 1e-4,
) -> dict[str, float]:
    """Compare onnxruntime's detections with PyTorch's on ``images``; raise if they differ.

    Every detection must have a partner in the other output: same image and label,
    score within ``score_tol`` and box within ``atol`` pixels. The two runtimes round
    differently, so candidates whose scores differ by less than ``score_tol`` may swap
    places; the only detections allowed without a partner are those at the top-k cut
    of their image (scores within ``score_tol`` of its lowest kept score). Returns the
    number of detections and the largest differences found among the pairs.
    """
    with torch.no_grad():
        ours = ExportWrapper(detector).eval()(images).cpu().numpy().astype(np.float64)
    theirs = run_onnx(path, images).astype(np.float64)
    worst = {"box": 0.0, "score": 0.0}
    for img in np.union1d(ours[:, 0], theirs[:, 0]):
        a, b = ours[ours[:, 0] == img], theirs[theirs[:, 0] == img]
        close = (
            (a[:, None, 1] == b[None, :, 1])
            & (np.abs(a[:, None, 2] - b[None, :, 2]) <= score_tol)
            & (np.abs(a[:, None, 3:] - b[None, :, 3:]).max(axis=2, initial=0.0) <= atol)
        )  # [n, m] possible partners
        used = np.zeros(len(b), dtype=bool)
        unmatched_a = []
        for i in range(len(a)):
            options = np.nonzero(close[i] & ~used)[0]
            if options.size == 0:
                unmatched_a.append(i)
                continue
            j = options[np.argmin(np.abs(a[i, 2] - b[options, 2]))]
            used[j] = True
            worst["box"] = max(worst["box"], float(np.abs(a[i, 3:] - b[j, 3:]).max(initial=0.0)))
            worst["score"] = max(worst["score"], float(abs(a[i, 2] - b[j, 2])))
        cut = min(a[:, 2].min(initial=np.inf), b[:, 2].min(initial=np.inf))
        loose = [a[i] for i in unmatched_a] + [b[j] for j in np.nonzero(~used)[0]]
        bad = [row for row in loose if row[2] > cut + score_tol]
        if bad:
            raise AssertionError(
                f"ONNX and PyTorch disagree on image {int(img)}: {len(bad)} detections without "
                f"a partner, e.g. (label, score, box) = {bad[0][1:].round(4).tolist()}"
            )
    return {
        "detections": float(len(ours)),
        "max_box_diff": worst["box"],
        "max_score_diff": worst["score"],
    }


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


def load_torchscript(path: str | Path, map_location: str | torch.device | None = None):
    """Load a file of :func:`export_torchscript`: ``model(images uint8 [B, 3, H, W]) ->
    detections [N, 7]``. The graph calls ``torchvision::nms``, whose operator exists once
    torchvision is imported (done here); outside Python, link torchvision's C++ library."""
    import torchvision  # noqa: F401  (registers torchvision::nms for the loaded graph)

    return torch.jit.load(str(path), map_location=map_location)
