"""Export the inference path (network, decoding, NMS) to ONNX and TorchScript, verified.

The exported graph (:class:`ExportWrapper`) takes ``images`` uint8 ``[B, 3, H, W]`` and
returns ``detections`` ``[N, 7]`` = (image index, label, score, x1, y1, x2, y2) in input
pixels, sorted by score. ONNX needs the ``onnx`` package (and ``onnxruntime`` to
verify): ``pip install "ssdlit[export]"``.

- :func:`export_onnx`, :func:`export_torchscript`: write one file;
- :func:`verify_onnx`, :func:`verify_torchscript`: compare a written file with PyTorch on
  sample images, raising :class:`VerificationError` when they disagree;
- :func:`export_and_verify`: both steps for every requested format (what
  ``python -m ssdlit.export`` runs).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssdlit.detector import Detector

__all__ = [
    "FORMATS",
    "ExportWrapper",
    "VerificationError",
    "export_and_verify",
    "export_onnx",
    "export_torchscript",
    "load_torchscript",
    "run_onnx",
    "verify_onnx",
    "verify_torchscript",
]

#: The formats a detector is exported to.
FORMATS = ("onnx", "torchscript")


class VerificationError(RuntimeError):
    """An exported model disagrees with PyTorch on the sample images."""


class ExportWrapper(nn.Module):
    """The inference path as one traceable graph: uint8 images in, detections out.

    ``forward(images [B, 3, H, W] uint8) -> [N, 7]`` = (image index, label, score, x1,
    y1, x2, y2) in input pixels, sorted by score; decoding and NMS are inside the graph.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tensor:
        scores, boxes = self.detector.decode(self.detector.raw(images))
        h, w = self.detector.image_size
        boxes = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        return self.detector.postprocess.flat(scores, boxes)


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
    """Compare onnxruntime's detections with PyTorch's on ``images``; raise
    :class:`VerificationError` if they differ.

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
            raise VerificationError(
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location=map_location)


@torch.inference_mode()
def verify_torchscript(
    detector: Detector,
    path: str | Path,
    images: Tensor,
    atol: float = 1e-2,
    score_tol: float = 1e-4,
) -> dict[str, float]:
    """Compare the saved TorchScript module with PyTorch, one image at a time (the traced
    batch size); raise :class:`VerificationError` when the detections differ: another
    number of detections or other labels, or a box (pixels) or score farther than
    ``atol`` / ``score_tol``.

    Returns the number of detections and the largest box and score differences.
    """
    loaded = load_torchscript(path, map_location="cpu").eval()
    reference = ExportWrapper(detector).eval()
    worst = {"detections": 0.0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    for i in range(len(images)):
        x = images[i : i + 1]
        ours = reference(x).float().cpu()
        theirs = loaded(x).float().cpu()
        if ours.shape != theirs.shape:
            raise VerificationError(
                f"TorchScript gives {theirs.shape[0]} detections on sample image {i}, "
                f"PyTorch {ours.shape[0]}"
            )
        worst["detections"] += float(ours.shape[0])
        if ours.numel():
            if not torch.equal(ours[:, :2], theirs[:, :2]):
                raise VerificationError(
                    f"TorchScript and PyTorch labels differ on sample image {i}"
                )
            box = float((ours[:, 3:] - theirs[:, 3:]).abs().max())
            score = float((ours[:, 2] - theirs[:, 2]).abs().max())
            if box > atol or score > score_tol:
                raise VerificationError(
                    f"TorchScript and PyTorch differ on sample image {i}: box {box:.3g} px, "
                    f"score {score:.3g}"
                )
            worst["max_box_diff"] = max(worst["max_box_diff"], box)
            worst["max_score_diff"] = max(worst["max_score_diff"], score)
    return worst


def export_and_verify(
    detector: Detector,
    out_dir: str | Path,
    name: str,
    images: Tensor,
    formats: Sequence[str] = FORMATS,
    opset: int = 17,
    atol: float = 1e-2,
    score_tol: float = 1e-4,
) -> dict[str, dict[str, Any]]:
    """Export ``detector`` in each of ``formats`` into ``out_dir`` and verify each file on
    ``images`` (uint8 ``[n, 3, H, W]``; the first one is the tracing example).

    Writes ``<name>.onnx`` (dynamic batch) and ``<name>.torchscript.pt`` (batch of one).
    Returns ``{format: entry}``, each entry with the file's ``path``, ``verified``, the
    ``verification`` numbers (None when it failed) and ``error`` (the
    :class:`VerificationError`'s message, or None). A failed verification does not stop
    the other formats; the caller decides what it means.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {', '.join(FORMATS)}")
    detector = detector.eval()
    out_dir = Path(out_dir)
    example = images[:1]
    entries: dict[str, dict[str, Any]] = {}
    for kind in formats:
        if kind == "onnx":
            path = export_onnx(detector, out_dir / f"{name}.onnx", example=example, opset=opset)
            entry: dict[str, Any] = {"path": str(path), "opset": int(opset), "batch": "dynamic"}
            verify = verify_onnx
        else:
            path = export_torchscript(detector, out_dir / f"{name}.torchscript.pt", example=example)
            entry = {"path": str(path), "batch": 1}
            verify = verify_torchscript
        try:
            numbers: dict[str, float] | None = verify(
                detector, path, images, atol=atol, score_tol=score_tol
            )
            error = None
        except VerificationError as exc:
            numbers, error = None, str(exc)
        entries[kind] = {
            **entry,
            "verified": error is None,
            "verification": numbers,
            "error": error,
        }
    return entries
