"""``python -m ssdlit.evaluate ckpt=PATH [data=...] [split=val]``: metrics of a checkpoint.

The data (and the evaluation pipeline, ``augment``'s ``eval``) are the run's: the
``config.yaml`` that ``python -m ssdlit.train`` wrote into the run folder beside the
checkpoint's folder (``RUN/config.yaml`` for ``RUN/checkpoints/best.ckpt``), with any
``data.*`` / ``augment.*`` override of the command line applied on top. A ``data=NAME``
(or ``augment=NAME``) group choice on the command line selects that config instead, and
without a run config the one of ``conf/evaluate.yaml`` is used. The log says which.

Reports Pascal VOC mAP@0.5 as VOC2007 (11-point) and VOC2010+ (all-point), both ignoring
difficult boxes, and COCO mAP@[.5:.95] (torchmetrics + pycocotools); prints a per-class
table and writes ``metrics.json`` in the run folder (or ``output=...``). The checkpoint is
read with ``weights_only=True``; its input size and class names are used, and the data's
class names must be the same. ``ckpt=`` also takes torchvision's COCO detectors
(``torchvision:ssd300_vgg16_coco``, ``torchvision:ssdlite320_coco``, or a torchvision
``.pth``, :mod:`ssdlit.zoo`): the data's classes are then taken from theirs by name (COCO's
80 categories from the 90 labels, whose ten unused ids are dropped).

Examples::

    python -m ssdlit.evaluate ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt
    python -m ssdlit.evaluate ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt split=test
    python -m ssdlit.evaluate ckpt=best.ckpt data=voc data.root=/data/VOCdevkit
    python -m ssdlit.evaluate ckpt=best.ckpt data=raccoon 'postprocess={top_k: 100}'
    python -m ssdlit.evaluate ckpt=torchvision:ssd300_vgg16_coco data=coco data.root=/data/coco
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssdlit.apps.common import (
    UsageError,
    hydra_app,
    load_module,
    run_dir,
    run_groups,
    set_threads,
    write_json,
)
from ssdlit.config import plain
from ssdlit.datamodules import build_datamodule
from ssdlit.metrics import format_ap_table
from ssdlit.training.builders import build_trainer
from ssdlit.zoo.loading import is_torchvision_weights

__all__ = ["evaluate", "main"]

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split`` of the run's data (see the module docstring);
    returns the results dict."""
    set_threads(cfg.get("threads"))
    out_dir = run_dir(cfg)
    ckpt = Path(str(cfg.ckpt))
    options: dict[str, Any] = {"postprocess_options": plain(cfg.get("postprocess"))}
    if cfg.get("test_flip") is not None:  # null: the checkpoint's own setting
        options["test_flip"] = bool(cfg.test_flip)
    if cfg.get("metrics") is not None:
        options["metrics"] = plain(cfg.metrics)
    module = load_module(ckpt, **options)
    nodes, where = run_groups(cfg, ckpt)
    log.info("evaluating %s with %s", ckpt, where)

    split = str(cfg.split)

    def data(class_names: list[str] | None = None):
        return build_datamodule(
            nodes["data"],
            nodes["augment"],
            module.detector.image_size,
            splits=[split],
            rename={split: "test"},
            class_names=class_names,
        )

    datamodule = data()
    names = datamodule.class_names
    if (
        names != module.class_names
        and set(names) <= set(module.class_names)
        and not is_torchvision_weights(ckpt)
    ):  # a split whose files lack some class: the checkpoint's labels for the ones it has
        datamodule = data(module.class_names)
    if datamodule.class_names != module.class_names and is_torchvision_weights(ckpt):
        # torchvision's COCO detectors: the data's classes, each with its row of the file
        module = load_module(ckpt, class_names=datamodule.class_names, **options)
    if datamodule.class_names != module.class_names:
        raise UsageError(
            f"the data's classes {datamodule.class_names} differ from the checkpoint's "
            f"{module.class_names}"
        )
    if not datamodule.test_dataloader():
        raise UsageError(f"the data has no {split!r} split to evaluate")
    trainer = build_trainer(cfg.trainer, out_dir)
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.last_eval["test"]
    table = format_ap_table(result["per_class"], result["summary"])
    print(f"\n{ckpt} on {split} ({len(datamodule.dataset('test'))} images):\n{table}\n")
    summary = result["summary"]
    print(
        "VOC07 mAP@0.5 (11-point) {voc07:.4f}   VOC mAP@0.5 (all-point) {voc:.4f}   "
        "COCO mAP@[.5:.95] {coco}".format(
            voc07=summary["voc07_map50"],
            voc=summary["voc_map50"],
            coco=f"{summary['coco_map']:.4f}" if "coco_map" in summary else "-",
        )
    )
    results = {
        "checkpoint": str(ckpt),
        "split": split,
        "images": len(datamodule.dataset("test")),
        "class_names": module.class_names,
        **result,
    }
    output = Path(str(cfg.output)) if cfg.get("output") else out_dir / "metrics.json"
    if trainer.is_global_zero:
        write_json(results, output)
        log.info("metrics: %s", output)
    return results


@hydra_app("ssdlit.evaluate", "evaluate")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (see the module docstring); returns the VOC07 mAP@0.5."""
    return float(evaluate(cfg)["summary"]["voc07_map50"])


if __name__ == "__main__":
    main()
