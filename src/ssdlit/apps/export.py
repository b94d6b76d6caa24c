"""``python -m ssdlit.export ckpt=PATH format=onnx|torchscript|both``: deployable models.

Loads a checkpoint (``weights_only=True``) and writes the inference path (network,
decoding and NMS in one graph: uint8 ``images [B, 3, H, W]`` in, ``detections [N, 7]`` =
(image index, label, score, x1, y1, x2, y2) in network-input pixels out, sorted by score)
into the output folder (the run folder ``outputs/export/<date>_<time>/`` or ``output=DIR``):

- ``<name>.onnx``: ONNX (``opset``, :func:`ssdlit.exporting.export_onnx`), dynamic batch;
- ``<name>.torchscript.pt``: TorchScript, traced with a batch of one image
  (:func:`ssdlit.exporting.export_torchscript`); its NMS is torchvision's operator, so
  ``import torchvision`` before ``torch.jit.load`` (else: "Unknown builtin op:
  torchvision::nms");
- ``export.json``: the files, the sample images used and the verification numbers.

``<name>`` is the checkpoint's file stem unless ``name=...`` is given. Each file is
verified against PyTorch (:func:`ssdlit.exporting.export_and_verify`): onnxruntime and the
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from ssdlit.apps.common import (
    UsageError,
    checkpoint_path,
    hydra_app,
    load_module,
    run_dir,
    set_threads,
    write_json,
)
from ssdlit.config import plain
from ssdlit.datamodules import DataError, DetectionDataModule, build_source, split_specs
from ssdlit.exporting import FORMATS, VerificationError, export_and_verify

__all__ = ["CHOICES", "export", "main", "sample_images"]

log = logging.getLogger(__name__)

#: ``format=`` values and the formats they write.
CHOICES = {"onnx": ("onnx",), "torchscript": ("torchscript",), "both": FORMATS}


def _val_spec(data: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
    """``(source spec, "", data name)`` of ``data``'s val split, reading existing files
    only, or ``(None, why not, data name)``. The spec may hold ``class_names`` for
    :func:`~ssdlit.datamodules.build_source`'s argument of that name."""
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


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def _numbers(v: Mapping[str, float]) -> str:
    return (
        f"{int(v['detections'])} detections, max box diff {v['max_box_diff']:.2e} px, "
        f"max score diff {v['max_score_diff']:.2e}"
    )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt`` as ``cfg.format``; returns the results written to ``export.json``.

    Raises :class:`~ssdlit.exporting.VerificationError` (after writing the files and the
    report) when an exported file disagrees with PyTorch.
    """
    set_threads(cfg.get("threads"))
    choice = str(cfg.format).lower()
    if choice not in CHOICES:
        raise UsageError(f"format={choice!r}: choose one of {', '.join(CHOICES)}")
    ckpt = checkpoint_path(cfg.ckpt)
    module = load_module(ckpt)
    detector = module.detector
    out_dir = Path(str(cfg.output)) if cfg.get("output") else run_dir(cfg)
    name = str(cfg.get("name") or ckpt.stem.replace(":", "_"))
    verify = plain(cfg.verify)
    images, described = sample_images(
        cfg.get("data"),
        cfg.get("augment"),
        detector.image_size,
        num_images=int(verify["num_images"]),
        seed=int(cfg.seed),
    )
    log.info("verifying on %s", described)
    files = export_and_verify(
        detector,
        out_dir,
        name,
        images,
        formats=CHOICES[choice],
        opset=int(cfg.opset),
        atol=float(verify["box_atol"]),
        score_tol=float(verify["score_tol"]),
    )
    failures = [f"{_LABELS[kind][0]}: {e['error']}" for kind, e in files.items() if e["error"]]
    results: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "class_names": module.class_names,
        "image_size": list(detector.image_size),
        "input": "images uint8 [B, 3, H, W] (RGB, 0..255)",
        "output": "detections float32 [N, 7] = (image index, label, score, x1, y1, x2, y2), "
        "network-input pixels, sorted by score",
        "samples": described,
        "files": files,
        "verified": not failures,
    }
    results["report"] = str(write_json(results, out_dir / "export.json"))
    print(_summary(ckpt, module.class_names, detector.image_size, files, described), flush=True)
    if failures:
        raise VerificationError("; ".join(failures))
    return results


#: How the summary names each format and what it was verified with.
_LABELS = {
    "onnx": ("ONNX", "onnxruntime vs PyTorch"),
    "torchscript": ("TorchScript", "TorchScript vs PyTorch"),
}


def _summary(
    ckpt: Path,
    class_names: Sequence[str],
    image_size: Sequence[int],
    files: Mapping[str, Mapping[str, Any]],
    described: str,
) -> str:
    """The lines printed at the end: each file, its size and its verification."""
    lines = [f"exported {ckpt} ({', '.join(class_names)}; input {tuple(image_size)})"]
    for kind, entry in files.items():
        path = Path(entry["path"])
        title, label = _LABELS[kind]
        if kind == "onnx":
            what = f"opset {entry['opset']}, dynamic batch"
        else:
            what = "batch of 1 image; load with ssdlit.exporting.load_torchscript"
        lines.append(f"{title:12} {path}  ({_size(path)}, {what})")
        if entry["verified"]:
            lines.append(f"  verified ({label}) on {described}: {_numbers(entry['verification'])}")
        else:
            lines.append(f"  VERIFICATION FAILED ({label}): {entry['error']}")
    return "\n".join(lines)


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
