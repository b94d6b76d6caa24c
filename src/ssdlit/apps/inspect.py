"""``python -m ssdlit.inspect [data=...] [draw=N]``: look at a dataset before training on it.

Prints, for every split of the data config (train, val, test):

- the source's bad-record report (what was kept, problems counted per kind, the first
  examples with file and line or XML element); the full list goes to
  ``<run folder>/bad_records_<split>.jsonl`` when there is any problem;
- per-class box and image counts, the most common image sizes, and text histograms of box
  sizes (sqrt of box area / image area) and aspect ratios (:mod:`ssdlit.inspection`);

with ``fit`` in the config (``+experiment=small_data``), the anchors and zoom-out range
``train`` derives from the training boxes (:mod:`ssdlit.fitting`); then the anchor
coverage: the Detector is built from the same config groups as
``train`` (backbone, anchors, head at ``image_size``) and its anchors are matched
against the boxes of ``coverage.split``; when too few boxes have an anchor with IoU >=
``coverage.threshold``, k-means box shapes are suggested. ``draw=N`` writes the first N
images of ``draw_split`` with their labelled boxes into ``<run folder>/draw/``. The run
folder (``outputs/inspect/<date>_<time>/``) also receives ``inspect.json``.

The config is train's, so every train override works here::

    python -m ssdlit.inspect                             # the demo's synthetic data
    python -m ssdlit.inspect draw=8
    python -m ssdlit.inspect +experiment=raccoon         # what that experiment trains on
    python -m ssdlit.inspect data=voc data.root=/data/VOCdevkit anchors=ssd300 \\
        backbone=vgg16_ssd300 image_size=[300,300]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict

from ssdlit.apps.common import UsageError, hydra_app, run_dir, set_threads, write_json
from ssdlit.config import plain
from ssdlit.datamodules import Record, build_sources, split_off_val, split_specs
from ssdlit.detector import Detector
from ssdlit.fitting import fit_to_data
from ssdlit.inspection import coverage_report, dataset_statistics, draw_records, normalised_boxes
from ssdlit.module import DETECTOR_KEYS

__all__ = ["build_anchors", "inspect_data", "main"]

log = logging.getLogger(__name__)


def build_anchors(
    cfg: Mapping[str, Any], num_classes: int
) -> tuple[Detector, list[tuple[int, int]], list[int]]:
    """The Detector of ``cfg`` (its :data:`~ssdlit.module.DETECTOR_KEYS` but the matcher).

    The backbone is built with ``pretrained=False``: only the anchors are needed, so
    nothing is downloaded. Returns the detector, its feature map sizes and the anchors per
    location of each level; the anchors are ``detector.anchors`` ``[A, 4]`` cxcywh
    normalised.
    """
    spec = plain({k: cfg[k] for k in DETECTOR_KEYS if k in cfg and k != "matcher"})
    if "pretrained" in spec["backbone"]:
        spec["backbone"]["pretrained"] = False
    detector = Detector.build(num_classes=num_classes, **spec)
    per_location = list(detector.anchor_generator.num_anchors_per_location())
    return detector, list(detector.feature_sizes), per_location


def _with_fitted_values(
    cfg: DictConfig, records: dict[str, list[Record]], options: dict[str, Any], results: dict
) -> DictConfig:
    """What ``train`` derives from the training boxes at start-up (``fit``), printed and put
    into ``results["fitted"]``; returns the config with the fitted anchors. The boxes are the
    same: the training split less the ``data.val_fraction`` validation part."""
    if "train" not in records:
        raise UsageError("fit derives settings from the train split, and the data has none")
    train = records["train"]
    data = plain(cfg.data)
    if data.get("val_fraction"):
        train = split_off_val(train, data["val_fraction"], int(data.get("seed") or 0))[0]
    updates, lines = fit_to_data(
        options,
        normalised_boxes(train),
        anchors=plain(cfg.anchors),
        backbone=plain(cfg.backbone),
        image_size=list(cfg.image_size),
    )
    print(_title(f"fitted to the {len(train)} training images (what train will use)"), flush=True)
    print("\n".join(lines), flush=True)
    results["fitted"] = updates
    cfg = cfg.copy()
    if "anchors" in updates:
        with open_dict(cfg):
            cfg.anchors.scales = updates["anchors"]["scales"]
            cfg.anchors.aspect_ratios = updates["anchors"]["aspect_ratios"]
    return cfg


def _title(text: str) -> str:
    return f"\n=== {text} " + "=" * max(3, 86 - len(text))


def _where(spec: Mapping[str, Any]) -> str:
    for key in ("root", "path", "annotation_file"):
        if spec.get(key):
            return str(spec[key])
    return ""


def inspect_data(cfg: DictConfig) -> dict[str, Any]:
    """Inspect ``cfg.data`` and the anchors of ``cfg``; returns what ``inspect.json`` holds."""
    set_threads(cfg.get("threads"))
    out_dir = run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = plain(cfg.data)
    specs = {s: spec for s, spec in split_specs(data).items() if spec is not None}
    if not specs:
        raise UsageError("the data config has no train, val or test split")

    results: dict[str, Any] = {"splits": {}}
    records: dict[str, list[Record]] = {}
    class_names: list[str] | None = None
    sources = build_sources(data, tuple(specs))  # data.class_names reaches every source
    for split, spec in specs.items():
        source = sources[split]
        names = class_names or list(source.class_names)
        class_names = names
        records[split] = list(source.records)
        print(_title(f"{split}: {spec.get('name')} data {_where(spec)}".strip()), flush=True)
        report = getattr(source, "report", None)
        entry: dict[str, Any] = {"source": spec.get("name"), "images": len(records[split])}
        if report is not None:
            print(report.summary(), flush=True)
            entry["problems"] = report.counts()
            if report.problems:
                entry["problems_file"] = str(report.write(out_dir / f"bad_records_{split}.jsonl"))
                print(f"  full list: {entry['problems_file']}", flush=True)
        stats = dataset_statistics(records[split], names)
        print("\n" + stats.summary(), flush=True)
        entry.update(
            boxes=int(stats.relative_sizes.size),
            empty_images=stats.num_empty_images,
            boxes_per_class=stats.boxes_per_class,
            images_per_class=stats.images_per_class,
        )
        results["splits"][split] = entry
    assert class_names is not None
    results["class_names"] = class_names

    fit_options = plain(cfg.get("fit")) or {}
    if fit_options.get("anchors") or fit_options.get("max_zoom"):
        cfg = _with_fitted_values(cfg, records, fit_options, results)
    detector, feature_sizes, per_location = build_anchors(cfg, len(class_names))
    anchors = detector.anchors
    h, w = detector.image_size
    cov_cfg = plain(cfg.get("coverage")) or {}
    cov_split = str(cov_cfg.get("split", "train"))
    if cov_split not in records:
        cov_split = next(iter(records))
    levels = ", ".join(
        f"{fh}x{fw} ({n}/cell)" for (fh, fw), n in zip(feature_sizes, per_location, strict=True)
    )
    print(_title(f"anchors: {plain(cfg.anchors).get('name')} at {h}x{w}"), flush=True)
    print(f"{anchors.shape[0]} anchors on the feature maps {levels}", flush=True)
    letterbox = bool(((plain(cfg.get("augment")) or {}).get("eval") or {}).get("letterbox"))
    print(
        f"boxes of the {cov_split} split, normalised by their image size (a plain resize"
        f"{'; the eval pipeline letterboxes, so shapes differ slightly' if letterbox else ''}):",
        flush=True,
    )
    coverage, text = coverage_report(
        records[cov_split],
        anchors,
        (h, w),
        threshold=float(cov_cfg.get("threshold", 0.5)),
        good_recall=float(cov_cfg.get("good_recall", 0.95)),
        k=int(cov_cfg.get("k", 6)),
        seed=int(cfg.get("seed", 0)),
    )
    print(text, flush=True)
    results["anchors"] = {
        "num_anchors": int(anchors.shape[0]),
        "feature_sizes": [list(s) for s in feature_sizes],
        "per_location": per_location,
        "coverage_split": cov_split,
        "recall": coverage.recall,
        "mean_best_iou": coverage.mean_best_iou,
        "num_boxes": coverage.num_boxes,
        "threshold": coverage.threshold,
    }

    n_draw = int(cfg.get("draw") or 0)
    if n_draw > 0:
        draw_split = str(cfg.get("draw_split", "train"))
        if draw_split not in records:
            draw_split = next(iter(records))
        written = draw_records(records[draw_split], class_names, out_dir / "draw", n_draw)
        results["drawn"] = [str(p) for p in written]
        print(
            _title("pictures")
            + f"\n{len(written)} {draw_split} images with their boxes: {out_dir / 'draw'}",
            flush=True,
        )
    write_json(results, out_dir / "inspect.json")
    log.info("inspection: %s", out_dir / "inspect.json")
    return results


@hydra_app("ssdlit.inspect", "inspect")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see the module docstring)."""
    inspect_data(cfg)


if __name__ == "__main__":
    main()
