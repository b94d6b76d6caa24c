"""``python -m ssdlit.predict ckpt=PATH input=PATH_OR_DIR_OR_GLOB``: detect objects in images.

Loads a checkpoint (``weights_only=True``; the model, its input size and class names come
from the checkpoint's hyper-parameters), runs it on one image, every image of a folder
(not recursive) or a glob pattern (``**`` recursive; quote it so the shell leaves it
alone), and writes into the output folder, per image::

    <image id>.json   {"image", "image_id", "width", "height", "detections": [{"label",
                      "label_id", "score", "box": [x1, y1, x2, y2]}, ...]}
    <image id>.png    the original image with the detections drawn

Boxes are xyxy in pixels of the original image (continuous coordinates, 0 at the image's
left/top edge), best score first; only detections scoring at least ``score_threshold``
are kept. One summary line per image is printed. The output folder is the run folder
(``outputs/predict/<date>_<time>/``) unless ``output=DIR`` is given.

Examples::

    python -m ssdlit.predict ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt input=photo.jpg
    python -m ssdlit.predict ckpt=best.ckpt input=photos/ output=predictions score_threshold=0.5
    python -m ssdlit.predict ckpt=best.ckpt 'input=photos/**/*.jpg'

A missing checkpoint or an input that names no image ends the run with a one-line
message and exit status 2 (:class:`~ssdlit.apps.common.UsageError`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
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
from ssdlit.datamodules import DataError, DetectionDataModule, Record, to_original_pixels
from ssdlit.datamodules.datamodule import predict_records
from ssdlit.visualize import draw_detections, save_image

__all__ = ["find_images", "main", "predict", "resolve_device", "safe_name"]

log = logging.getLogger(__name__)


def find_images(inputs: str | Path | Sequence[str | Path]) -> list[Record]:
    """Records (without boxes) of the images that ``inputs`` names: files, folders, globs.

    Raises :class:`UsageError` when a path does not exist or nothing is found.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    if not items:
        raise UsageError("input is empty: give an image, a folder or a glob pattern")
    try:
        records = predict_records(items)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    if not records:
        shown = ", ".join(repr(str(i)) for i in items)
        raise UsageError(
            f"input {shown} matches no image files (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)"
        )
    return records


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device string."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def safe_name(image_id: str) -> str:
    """A file name from an image id (path separators and odd characters become ``_``)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(image_id)).strip(".")
    return name or "image"


def _image_result(
    det: Tensor, meta: dict[str, Any], class_names: Sequence[str], score_threshold: float
) -> tuple[dict[str, Any], Tensor]:
    """The JSON dict of one image and its kept detections ``[k, 6]`` in original pixels."""
    det = det.detach().float().cpu()
    det = det[det[:, 1] >= score_threshold]
    boxes = to_original_pixels(det[:, 2:6], meta)  # [k, 4] xyxy original pixels, clipped
    pixel_det = torch.cat([det[:, :2], boxes], dim=1)
    h0, w0 = meta["orig_size"]
    detections = [
        {
            "label": class_names[label - 1] if 1 <= label <= len(class_names) else str(label),
            "label_id": label,
            "score": round(score, 6),
            "box": [round(v, 2) for v in box],
        }
        for label, score, box in zip(
            det[:, 0].long().tolist(), det[:, 1].tolist(), boxes.tolist(), strict=True
        )
    ]
    result = {
        "image": str(Path(meta["path"]).resolve()),
        "image_id": meta["image_id"],
        "width": int(w0),
        "height": int(h0),
        "box_format": "xyxy, pixels of the original image",
        "detections": detections,
    }
    return result, pixel_det


def _draw(record: Record, pixel_det: Tensor, class_names: Sequence[str], path: Path) -> Path:
    """Write the original image with ``pixel_det`` ``[k, 6]`` (pixel boxes) drawn."""
    image = torch.tensor(record.load_image()).permute(2, 0, 1).contiguous()  # [3, H0, W0]
    h0, w0 = image.shape[-2:]
    det = pixel_det.clone()
    det[:, 2:6] /= torch.tensor([w0, h0, w0, h0], dtype=det.dtype)  # draw_detections: normalised
    drawn = draw_detections(image, det, class_names, score_threshold=0.0, max_boxes=len(det))
    return save_image(drawn, path)


def _summary_line(name: str, detections: list[dict[str, Any]], json_path: Path) -> str:
    if not detections:
        found = "no detections"
    else:
        shown = ", ".join(f"{d['label']} {d['score']:.2f}" for d in detections[:5])
        more = f", ... ({len(detections) - 5} more)" if len(detections) > 5 else ""
        found = f"{len(detections)} detection{'s' * (len(detections) != 1)}: {shown}{more}"
    return f"{name}: {found} -> {json_path}"


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run ``cfg.ckpt`` on ``cfg.input``; returns the per-image result dicts (as written).

    The model is built outside inference mode (buffers made in it could not be used by
    autograd-aware code later); only the forward passes run in it.
    """
    set_threads(cfg.get("threads"))
    ckpt = checkpoint_path(cfg.ckpt)  # both inputs checked before the slow part
    records = find_images(plain(cfg.input))
    flip = cfg.get("test_flip")  # null: the checkpoint's own setting
    module = load_module(ckpt, **({} if flip is None else {"test_flip": bool(flip)}))
    out_dir = Path(str(cfg.output)) if cfg.get("output") else run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.get("device"))
    module.to(device)
    class_names = module.class_names
    threshold = float(cfg.get("score_threshold", 0.3))
    augment = plain(cfg.get("augment")) or {}
    on_bad = str(cfg.get("on_bad", "error"))
    datamodule = DetectionDataModule(
        predict=records,
        class_names=class_names,
        image_size=module.detector.image_size,
        augment={"predict": augment.get("eval", "val")},
        eval_batch_size=int(cfg.get("batch_size", 8)),
        num_workers=int(cfg.get("num_workers", 0)),
        on_bad=on_bad,
    )
    log.info(
        "%s: %d images, classes %s, input %s, output %s",
        cfg.ckpt,
        len(records),
        ", ".join(class_names),
        "x".join(map(str, module.detector.image_size)),
        out_dir,
    )
    by_path = {str(r.path): r for r in records}
    names: dict[str, int] = {}
    results: list[dict[str, Any]] = []
    done: set[str] = set()
    try:
        for batch in datamodule.predict_dataloader():
            with torch.inference_mode():
                detections = module(batch["images"].to(device))
            results += _write_batch(
                detections, batch["meta"], by_path, done, names, class_names, threshold, out_dir
            )
    except DataError as err:
        raise UsageError(f"{err} (on_bad=skip leaves out the images that cannot be read)") from err
    skipped = [str(r.path) for r in records if str(r.path) not in done]
    if skipped:  # on_bad=skip: their places were taken by other images, written once
        log.warning(
            "%d image(s) could not be read and were left out (on_bad=skip): %s",
            len(skipped),
            ", ".join(skipped),
        )
    total = sum(len(r["detections"]) for r in results)
    log.info(
        "%d images, %d detections (score >= %g) written to %s",
        len(results),
        total,
        threshold,
        out_dir,
    )
    return results


def _write_batch(
    detections: list[Tensor],
    metas: list[dict[str, Any]],
    by_path: dict[str, Record],
    done: set[str],
    names: dict[str, int],
    class_names: Sequence[str],
    threshold: float,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """Write the JSON and picture of each image of a batch not written yet; their results."""
    results = []
    for det, meta in zip(detections, metas, strict=True):
        if meta["path"] in done:  # a stand-in for an image that could not be read
            continue
        done.add(meta["path"])
        result, pixel_det = _image_result(det, meta, class_names, threshold)
        stem = safe_name(meta["image_id"])
        names[stem] = names.get(stem, 0) + 1
        if names[stem] > 1:  # two ids that sanitise to one name
            stem = f"{stem}_{names[stem]}"
        result["picture"] = str(
            _draw(by_path[meta["path"]], pixel_det, class_names, out_dir / f"{stem}.png")
        )
        json_path = write_json(result, out_dir / f"{stem}.json")
        print(_summary_line(Path(meta["path"]).name, result["detections"], json_path), flush=True)
        results.append(result)
    return results


@hydra_app("ssdlit.predict", "predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see the module docstring)."""
    predict(cfg)


if __name__ == "__main__":
    main()
