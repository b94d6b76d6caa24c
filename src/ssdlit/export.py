"""``python -m ssdlit.export ckpt=PATH format=onnx|torchscript|both``: deployable models.

Loads a checkpoint (``weights_only=True``) and writes the inference path (network,
decoding and NMS in one graph: uint8 ``images [B, 3, H, W]`` in, ``detections [N, 7]`` =
(image index, label, score, x1, y1, x2, y2) in network-input pixels out, sorted by score)
into the output folder (the run folder ``outputs/export/<date>_<time>/`` or ``output=DIR``):

- ``<name>.onnx``: ONNX opset 17 (:func:`ssdlit.exporting.export_onnx`), dynamic batch;
- ``<name>.torchscript.pt``: TorchScript, traced with a batch of one image
  (:func:`ssdlit.exporting.export_torchscript`); its NMS is torchvision's operator, so
  ``import torchvision`` before ``torch.jit.load`` (else: "Unknown builtin op:
  torchvision::nms");
- ``export.json``: the files, the sample images used and the verification numbers.

``<name>`` is the checkpoint's file stem unless ``name=...`` is given. Each file is
verified against PyTorch: onnxruntime (:func:`ssdlit.exporting.verify_onnx`) and the
loaded TorchScript module must give the same detections on a few sample images, taken
from the data config's ``val`` split when it is available (for the synthetic data: when
it has been written already; export never writes a dataset), else random uint8 images;
the log says which. A failed verification exits with status 1.

Examples::

    python -m ssdlit.export ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt
    python -m ssdlit.export ckpt=best.ckpt format=onnx output=deploy name=ssd7_shapes
    python -m ssdlit.export ckpt=best.ckpt data=raccoon verify.num_images=8
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from ssdlit.cli import UsageError, checkpoint_path, hydra_app, load_module
from ssdlit.datamodules import DataError, DetectionDataModule
from ssdlit.detector import Detector, ExportWrapper
from ssdlit.exporting import export_onnx, export_torchscript, load_torchscript, verify_onnx
from ssdlit.module import plain
from ssdlit.training.builders import build_source, split_specs
from ssdlit.training.runs import limit_opencv_threads, run_dir, set_threads, write_json

__all__ = [
    "FORMATS",
    "VerificationError",
    "export",
    "main",
    "sample_images",
    "verify_torchscript",
]

log = logging.getLogger(__name__)

#: ``format=`` values and the files they write.
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "both": ("onnx", "torchscript")}


class VerificationError(RuntimeError):
    """An exported model disagrees with PyTorch on the sample images."""


def _val_spec(data: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
    """``(source spec, "", data name)`` of ``data``'s val split, reading existing files
    only, or ``(None, why not, data name)``. The spec may hold ``class_names`` for
    :func:`~ssdlit.training.builders.build_source`'s argument of that name."""
    spec = split_specs(data).get("val")
    if spec is None:
        return None, "the data config has no val split", ""
    kind = str(spec.get("name"))
    if spec.get("name") == "synthetic":
        # Building the synthetic source writes the dataset when it is missing (or its
        # parameters changed): read an existing one as the VOC folder it is instead.
        from ssdlit.datamodules.synthetic import MANIFEST

        root = Path(str(spec.get("root", "data/synthetic")))
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return (
                None,
                f"the synthetic data is not written at {root} (export never writes it)",
                kind,
            )
        split = spec.get("split", "val")
        if not (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            return None, f"the synthetic data at {root} has no {split!r} split", kind
        return (
            {
                "name": "voc",
                "root": str(root),
                "splits": [split] if isinstance(split, str) else list(split),
                "layout": "devkit",
                "class_names": manifest.get("classes"),
                "on_bad": "skip",
            },
            "",
            kind,
        )
    return {**spec, "class_names": data.get("class_names")}, "", kind


def sample_images(
    data: Mapping[str, Any] | None,
    augment: Mapping[str, Any] | None,
    image_size: Sequence[int],
    num_images: int = 4,
    seed: int = 0,
) -> tuple[Tensor, str]:
    """Images to verify an export with: uint8 ``[n, 3, H, W]`` and where they come from.

    The first ``num_images`` images of ``data``'s val split through the evaluation
    pipeline of ``augment`` (resized to ``image_size``) when the split can be read, else
    ``num_images`` random uint8 images (the description says why).
    """
    h, w = int(image_size[0]), int(image_size[1])
    reason = "no data config given"
    if data is not None:
        try:
            spec, reason, kind = _val_spec(plain(data))
            if spec is not None:
                class_names = spec.pop("class_names", None)
                source = build_source(spec, class_names=class_names)
                records = list(source.records)[: max(1, int(num_images))]
                if records:
                    eval_aug = (plain(augment) or {}).get("eval", "val")
                    dm = DetectionDataModule(
                        val=records,
                        class_names=list(source.class_names),
                        image_size=(h, w),
                        augment={"val": eval_aug},
                        eval_batch_size=len(records),
                    )
                    images = next(iter(dm.val_dataloader()))["images"]
                    where = getattr(source, "root", None) or spec.get("path") or spec.get("root")
                    return (
                        images,
                        f"{len(records)} images of the val split ({kind} data at {where})",
                    )
                reason = "the val split has no images"
        except (OmegaConfBaseException, DataError, OSError, ValueError, KeyError, TypeError) as exc:
            reason = f"the val split cannot be read ({type(exc).__name__}: {exc})"
    g = torch.Generator().manual_seed(int(seed))
    images = torch.randint(
        0, 256, (max(1, int(num_images)), 3, h, w), dtype=torch.uint8, generator=g
    )
    return images, f"{len(images)} random uint8 images ({reason})"


@torch.inference_mode()
def verify_torchscript(
    detector: Detector,
    path: str | Path,
    images: Tensor,
    atol: float = 1e-2,
    score_tol: float = 1e-4,
) -> dict[str, float]:
    """Compare the saved TorchScript module with PyTorch, one image at a time (the traced
    batch size); raise :class:`VerificationError` when the detections differ.

    Returns the number of detections and the largest box (pixels) and score differences.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
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


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def _numbers(v: Mapping[str, float]) -> str:
    return (
        f"{int(v['detections'])} detections, max box diff {v['max_box_diff']:.2e} px, "
        f"max score diff {v['max_score_diff']:.2e}"
    )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt`` as ``cfg.format``; returns the results written to ``export.json``."""
    set_threads(cfg.get("threads"))
    limit_opencv_threads()
    fmt = str(cfg.get("format", "both")).lower()
    if fmt not in FORMATS:
        raise UsageError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    ckpt = checkpoint_path(cfg.ckpt)
    module = load_module(ckpt)
    detector = module.detector.eval()
    out_dir = Path(str(cfg.output)) if cfg.get("output") else run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = str(cfg.get("name") or ckpt.stem)
    verify = plain(cfg.get("verify")) or {}
    images, described = sample_images(
        cfg.get("data"),
        cfg.get("augment"),
        detector.image_size,
        num_images=int(verify.get("num_images", 4)),
        seed=int(cfg.get("seed", 0)),
    )
    atol = float(verify.get("box_atol", 1e-2))
    score_tol = float(verify.get("score_tol", 1e-4))
    log.info("verifying on %s", described)
    results: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "class_names": module.class_names,
        "image_size": list(detector.image_size),
        "input": "images uint8 [B, 3, H, W] (RGB, 0..255)",
        "output": "detections float32 [N, 7] = (image index, label, score, x1, y1, x2, y2), "
        "network-input pixels, sorted by score",
        "samples": described,
        "files": {},
    }
    lines = [f"exported {ckpt} ({', '.join(module.class_names)}; input {detector.image_size})"]
    example = images[:1]
    failures: list[str] = []
    for kind in FORMATS[fmt]:
        if kind == "onnx":
            path = export_onnx(
                detector, out_dir / f"{name}.onnx", example=example, opset=int(cfg.get("opset", 17))
            )
            entry: dict[str, Any] = {
                "path": str(path),
                "opset": int(cfg.get("opset", 17)),
                "batch": "dynamic",
            }
            lines.append(
                f"ONNX         {path}  ({_size(path)}, opset {entry['opset']}, dynamic batch)"
            )
            try:
                numbers = verify_onnx(detector, path, images, atol=atol, score_tol=score_tol)
            except AssertionError as exc:
                failures.append(f"ONNX: {exc}")
                numbers = None
            label = "onnxruntime vs PyTorch"
        else:
            path = export_torchscript(detector, out_dir / f"{name}.torchscript.pt", example=example)
            entry = {"path": str(path), "batch": 1}
            lines.append(
                f"TorchScript  {path}  ({_size(path)}, batch of 1 image; "
                "load with ssdlit.exporting.load_torchscript)"
            )
            try:
                numbers = verify_torchscript(detector, path, images, atol=atol, score_tol=score_tol)
            except VerificationError as exc:
                failures.append(f"TorchScript: {exc}")
                numbers = None
            label = "TorchScript vs PyTorch"
        entry["verified"] = numbers is not None
        entry["verification"] = numbers
        results["files"][kind] = entry
        if numbers is not None:
            lines.append(f"  verified ({label}) on {described}: {_numbers(numbers)}")
        else:
            lines.append(f"  VERIFICATION FAILED ({label}): {failures[-1]}")
    results["verified"] = not failures
    results["report"] = str(write_json(results, out_dir / "export.json"))
    print("\n".join(lines), flush=True)
    if failures:
        raise VerificationError("; ".join(failures))
    return results


@hydra_app("ssdlit.export", "export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see the module docstring)."""
    try:
        export(cfg)
    except VerificationError as exc:
        print(f"ssdlit.export: verification failed: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
