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
class names must be the same.

Examples::

    python -m ssdlit.evaluate ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt
    python -m ssdlit.evaluate ckpt=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt split=test
    python -m ssdlit.evaluate ckpt=best.ckpt data=voc data.root=/data/VOCdevkit
    python -m ssdlit.evaluate ckpt=best.ckpt data=raccoon postprocess.top_k=100
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssdlit.cli import UsageError, hydra_app, load_module
from ssdlit.detector import build_component
from ssdlit.module import plain
from ssdlit.registry import POSTPROCESS
from ssdlit.training.builders import build_datamodule, build_trainer
from ssdlit.training.evaluation import format_ap_table
from ssdlit.training.runs import limit_opencv_threads, run_dir, set_threads, write_json

__all__ = ["evaluate", "main", "run_config_path", "run_groups"]

log = logging.getLogger(__name__)


#: The config groups ``evaluate`` takes from the training run's config.
RUN_GROUPS = ("data", "augment")


def run_config_path(ckpt: str | Path) -> Path | None:
    """The ``config.yaml`` of the training run a checkpoint belongs to, or None: beside the
    checkpoint or one folder up (``RUN/checkpoints/best.ckpt`` -> ``RUN/config.yaml``)."""
    ckpt = Path(ckpt)
    for folder in (ckpt.parent, ckpt.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            return path
    return None


def _command_line() -> list[str]:
    """This run's command-line overrides (none outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig not set: called as a function
        return []


def run_groups(
    cfg: DictConfig, ckpt: str | Path, command_line: Sequence[str] | None = None
) -> tuple[dict[str, Any], str]:
    """``({group: node}, where from)`` for :data:`RUN_GROUPS`: the training run's nodes
    with the command line's ``group.*`` overrides applied, unless the command line chose the
    group (``data=voc``) or there is no run config (then ``cfg``'s own nodes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(
        list(_command_line() if command_line is None else command_line)
    )
    chosen = {o.key_or_group for o in overrides if o.key_or_group in RUN_GROUPS}
    path = run_config_path(ckpt)
    run_cfg = OmegaConf.load(path) if path is not None else None
    nodes: dict[str, Any] = {}
    sources: list[str] = []
    for group in RUN_GROUPS:
        if group in chosen or run_cfg is None or run_cfg.get(group) is None:
            nodes[group] = cfg.get(group)
            sources.append(f"{group}: {'the command line' if group in chosen else 'evaluate.yaml'}")
            continue
        for o in overrides:
            key = o.key_or_group
            if not key.startswith(f"{group}."):
                continue
            if o.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(run_cfg, parent)
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(run_cfg, key, o.value(), merge=True, force_add=True)
        nodes[group] = run_cfg[group]
        sources.append(f"{group}: the run's {path}")
    return nodes, "; ".join(sources)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split`` of the run's data (see the module docstring);
    returns the results dict."""
    set_threads(cfg.get("threads"))
    limit_opencv_threads()
    out_dir = run_dir(cfg)
    ckpt = Path(str(cfg.ckpt))
    overrides: dict[str, Any] = {}
    if cfg.get("metrics") is not None:
        overrides["metrics"] = plain(cfg.metrics)
    module = load_module(ckpt, **overrides)
    nodes, where = run_groups(cfg, ckpt)
    log.info("evaluating %s with %s", ckpt, where)
    if cfg.get("postprocess"):
        # Replace the post-processor only (its options are not part of the weights).
        spec = {**module.hparams["postprocess"], **plain(cfg.postprocess)}
        module.detector.postprocess = build_component(POSTPROCESS, spec)
        module.hparams["postprocess"] = spec

    split = str(cfg.split)
    datamodule = build_datamodule(
        nodes["data"],
        nodes["augment"],
        module.hparams["image_size"],
        splits=[split],
        rename={split: "test"},
    )
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
