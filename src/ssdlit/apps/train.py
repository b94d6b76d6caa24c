"""``python -m ssdlit.train [overrides]``: fit a detector, then evaluate its best checkpoint.

With no arguments this is the demo: the synthetic VOC-format dataset is written under
``data/synthetic`` on first use, a small SSD trains on the CPU, and the run folder
(``outputs/train/<date>_<time>/``) receives::

    config.yaml              the resolved config
    checkpoints/best.ckpt    best by validation VOC07 mAP@0.5 (callbacks.checkpoint.monitor)
    checkpoints/last.ckpt    the end of the last epoch (resume with ckpt_path=...)
    tensorboard/             losses, learning rate, mAPs, per-class AP, prediction images
    metrics.json             the best checkpoint's metrics on val (and test), per class
    predictions.png          validation images with predicted (colour) and true (white) boxes

``init_from=PATH`` starts from an ssdlit checkpoint whose classes may differ (transfer
learning, :mod:`ssdlit.transfer`): the rows of the classes named alike are kept, new
classes start fresh, the rest of the network loads; the log says what was kept.
``init_from=torchvision:ssdlite320_coco`` (or ``torchvision:ssd300_vgg16_coco``, or a
torchvision ``.pth`` file) does the same from torchvision's COCO detectors
(:mod:`ssdlit.zoo`), with the experiment that builds their network
(``+experiment=finetune_ssdlite`` / ``finetune_ssd300``).

Examples::

    python -m ssdlit.train +experiment=ssd300_voc data.root=/data/VOCdevkit
    python -m ssdlit.train backbone=mobilenet_v3_large anchors=ssdlite320 head=ssdlite image_size=[320,320]
    python -m ssdlit.train -m optim.lr=1e-3,3e-3          # a sweep (Hydra's basic sweeper)
    python -m ssdlit.train data=raccoon init_from=outputs/train/2024-01-01_12-00-00/checkpoints/best.ckpt
    python -m ssdlit.train +experiment=finetune_ssdlite data=raccoon init_from=torchvision:ssdlite320_coco
    python -m ssdlit.train --config-dir my_conf +experiment=mine   # your own configs
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import TensorBoardLogger

from ssdlit.apps.common import (
    UsageError,
    checkpoint_path,
    hydra_app,
    json_safe,
    run_dir,
    save_config,
    set_threads,
    write_json,
)
from ssdlit.config import plain
from ssdlit.datamodules import DetectionDataModule, build_datamodule
from ssdlit.fitting import fit_epochs, fit_to_data
from ssdlit.inspection import normalised_boxes
from ssdlit.metrics import format_ap_table
from ssdlit.module import DetectionModule
from ssdlit.training.builders import build_callbacks, build_loggers, build_trainer, runs_on_cpu
from ssdlit.training.calibration import choose_precision, measure_step_times
from ssdlit.training.callbacks import NonFiniteLossError
from ssdlit.transfer import init_from_checkpoint
from ssdlit.visualize import predictions_picture
from ssdlit.zoo.loading import init_from_torchvision, is_torchvision_weights

__all__ = ["init_from", "main", "objective", "train"]

log = logging.getLogger(__name__)


def init_from(module: DetectionModule, path: str | Path) -> str:
    """Start ``module`` from the ssdlit checkpoint ``path`` (``weights_only=True``), whose
    classes may differ (:func:`ssdlit.transfer.init_from_checkpoint`: the rows of classes
    with the same name are kept, new classes start as initialised, everything else loads);
    returns the one-line report. A missing or incompatible checkpoint is a
    :class:`~ssdlit.apps.common.UsageError`."""
    if is_torchvision_weights(path):
        try:
            return init_from_torchvision(module, path)
        except (FileNotFoundError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise UsageError(f"init_from={path}: {exc}") from exc
    ckpt = checkpoint_path(path)
    try:
        return init_from_checkpoint(module, ckpt)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(f"init_from={ckpt}: {exc}") from exc


def fit_from_training_data(
    cfg: DictConfig, datamodule: DetectionDataModule, options: dict[str, Any]
) -> dict[str, Any]:
    """Derive the anchors and the zoom-out range from the training part's boxes
    (:func:`ssdlit.fitting.fit_to_data`), write them into ``cfg`` and the datamodule's
    training pipeline, log them; returns what ``fitted.yaml`` records."""
    train_aug = plain(cfg.get("augment") or {}).get("train") or {}
    if (
        options.get("max_zoom")
        and (train_aug.get("name") if isinstance(train_aug, dict) else train_aug) != "ssd"
    ):
        raise UsageError(
            "fit.max_zoom sets the zoom-out range of the ssd augmentation, but augment.train is "
            f"{train_aug!r}: use augment=ssd, or set fit.max_zoom=false"
        )
    boxes = normalised_boxes(datamodule.records("train"))
    if boxes.shape[0] == 0:
        raise UsageError("fit derives settings from the training boxes, and there are none")
    updates, lines = fit_to_data(
        options,
        boxes,
        anchors=plain(cfg.anchors),
        backbone=plain(cfg.backbone),
        image_size=list(cfg.image_size),
    )
    for line in lines:
        log.info("fit: %s", line)
    with open_dict(cfg):
        if "anchors" in updates:
            cfg.anchors.scales = updates["anchors"]["scales"]
            cfg.anchors.aspect_ratios = updates["anchors"]["aspect_ratios"]
        if "augment" in updates:
            cfg.augment.train.max_zoom = updates["augment"]["train"]["max_zoom"]
    if "augment" in updates:
        zoom = updates["augment"]["train"]["max_zoom"]
        train_aug = dict(plain(datamodule.augment["train"]))
        datamodule.augment["train"] = {**train_aug, "max_zoom": zoom}
    return {"boxes": int(boxes.shape[0]), **updates}


#: The keys of the ``fit`` config (experiment/small_data.yaml); any other is refused.
FIT_OPTIONS = ("anchors", "max_zoom", "minutes", "precision")


def check_fit_options(options: dict[str, Any]) -> None:
    """A :class:`UsageError` naming the keys of ``fit`` that no fitting reads (a typo
    would otherwise leave its setting silently unfitted)."""
    unknown = sorted(set(options) - set(FIT_OPTIONS))
    if unknown:
        raise UsageError(
            f"fit: unknown key(s) {', '.join(unknown)}; fit takes {', '.join(FIT_OPTIONS)}"
        )


def fit_precision(
    cfg: DictConfig, module: DetectionModule, datamodule: DetectionDataModule
) -> dict[str, Any]:
    """``fit.precision``: on a CPU run configured in float32, time a training step in
    float32 and under bfloat16 autocast (:func:`ssdlit.training.calibration.choose_precision`)
    and set ``trainer.precision`` to ``bf16-mixed`` where that is clearly faster (CPUs
    with bfloat16 matrix instructions); elsewhere the configured precision stays. Returns
    what ``fitted.yaml`` records."""
    configured = str(cfg.trainer.get("precision", "32-true"))
    if not runs_on_cpu(cfg.trainer.get("accelerator", "auto")):
        log.info("fit: precision %s kept (fit.precision compares on the CPU only)", configured)
        return {"precision": configured}
    if configured not in ("32", "32-true"):
        log.info("fit: precision %s kept (trainer.precision is set)", configured)
        return {"precision": configured}
    datamodule.setup("fit")
    chosen, seconds = choose_precision(module, datamodule.train_dataloader())
    with open_dict(cfg):
        cfg.trainer.precision = chosen
    log.info(
        "fit: precision %s (measured: %.3f s a training step in float32, %.3f s in bf16-mixed)",
        chosen,
        seconds["32-true"],
        seconds["bf16-mixed"],
    )
    return {
        "precision": chosen,
        "precision_seconds_per_step": {k: round(v, 4) for k, v in seconds.items()},
    }


def fit_epochs_to_budget(
    cfg: DictConfig, module: DetectionModule, datamodule: DetectionDataModule, minutes: float
) -> dict[str, Any]:
    """Set ``trainer.max_epochs`` to what fits ``minutes`` (measured step and validation
    times, :func:`ssdlit.fitting.fit_epochs`) and ``trainer.max_time`` to ``minutes``."""
    datamodule.setup("fit")
    val_loader = datamodule.val_dataloader() or None
    times = measure_step_times(
        module,
        datamodule.train_dataloader(),
        val_loader,
        precision=cfg.trainer.get("precision", "32-true"),
    )
    every = int(cfg.trainer.get("check_val_every_n_epoch") or 1)
    epochs = fit_epochs(
        float(minutes) * 60.0,
        times.train_batches,
        times.train_step,
        times.validation(),
        every,
    )
    total = round(float(minutes) * 60)
    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
        cfg.trainer.max_time = f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    log.info(
        "fit: %d epochs in %g minutes (measured: %.3f s a training step, %d steps an epoch; "
        "%.1f s a validation pass, every %d epochs)",
        epochs,
        minutes,
        times.train_step,
        times.train_batches,
        times.validation(),
        every,
    )
    return {
        "max_epochs": epochs,
        "max_time": cfg.trainer.max_time,
        "seconds_per_step": round(times.train_step, 4),
        "steps_per_epoch": times.train_batches,
        "seconds_per_validation": round(times.validation(), 2),
    }


def evaluate_splits(
    trainer: pl.Trainer,
    module: DetectionModule,
    datamodule: DetectionDataModule,
    ckpt: str | None,
    evaluate_cfg: Any,
) -> dict[str, Any]:
    """``{split: result}`` of checkpoint ``ckpt`` (None: the weights in memory) on the val
    and test splits that exist and ``evaluate_cfg`` asks for (the weights stay loaded)."""
    out: dict[str, Any] = {}
    if evaluate_cfg.get("val", True) and datamodule.val_dataloader():
        trainer.validate(
            module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False
        )
        out["val"] = module.last_eval.get("val")
    if evaluate_cfg.get("test", True) and datamodule.test_dataloader():
        trainer.test(
            module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False
        )
        out["test"] = module.last_eval.get("test")
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, evaluate the best checkpoint, write the run folder; returns the results dict."""
    out_dir = run_dir(cfg)
    save_config(cfg, out_dir / "config.yaml")
    set_threads(cfg.get("threads"))
    pl.seed_everything(int(cfg.seed), workers=True)

    datamodule = build_datamodule(cfg.data, cfg.get("augment"), cfg.image_size)
    fit_options = plain(cfg.get("fit")) or {}
    check_fit_options(fit_options)
    fitted = fit_from_training_data(cfg, datamodule, fit_options) if fit_options else {}
    module = DetectionModule.from_config(cfg, datamodule.class_names)
    if cfg.get("init_from"):
        log.info(init_from(module, cfg.init_from))
    if fit_options.get("precision"):
        fitted["trainer"] = fit_precision(cfg, module, datamodule)
    if fit_options.get("minutes"):
        budget = fit_epochs_to_budget(cfg, module, datamodule, fit_options["minutes"])
        fitted["trainer"] = {**fitted.get("trainer", {}), **budget}
    if fitted:
        save_config(cfg, out_dir / "config.yaml")  # with the fitted values
        save_config(OmegaConf.create(json_safe(fitted)), out_dir / "fitted.yaml")
    loggers = build_loggers(cfg.get("logger"), out_dir)
    callbacks, best_cb = build_callbacks(cfg.get("callbacks"), out_dir, with_logger=bool(loggers))
    trainer = build_trainer(cfg.trainer, out_dir, callbacks, loggers)
    log.info(
        "classes (%d): %s; anchors: %d; run folder: %s",
        len(module.class_names),
        ", ".join(module.class_names),
        module.detector.anchors.shape[0],
        out_dir,
    )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_seconds = time.perf_counter() - start

    best_path = best_cb.best_model_path if best_cb is not None else ""
    ckpt = best_path or None  # None: the weights in memory (no best checkpoint written)
    results: dict[str, Any] = {
        "best_checkpoint": best_path or None,
        "last_checkpoint": str(out_dir / "checkpoints" / "last.ckpt")
        if (out_dir / "checkpoints" / "last.ckpt").is_file()
        else None,
        "monitor": best_cb.monitor if best_cb is not None else None,
        "best_score": float(best_cb.best_model_score)
        if best_cb is not None and best_cb.best_model_score is not None
        else None,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "fit_seconds": round(fit_seconds, 2),
        "class_names": module.class_names,
    }
    if datamodule.val_split is not None:  # data.val_fraction: which images validated
        results["val_split"] = datamodule.val_split.to_dict()
    if fitted:
        results["fitted"] = fitted
    evaluate_cfg = cfg.get("evaluate") or {}
    if trainer.interrupted:
        log.warning("training was interrupted: skipping the final evaluation")
    else:
        last = results["last_checkpoint"]
        if evaluate_cfg.get("final", True) and best_path and last:
            # the weights at the end of training, beside the checkpoint the monitor chose
            results["final"] = evaluate_splits(trainer, module, datamodule, last, evaluate_cfg)
            results["final"]["checkpoint"] = last
        results["weights"] = (
            "val and test: the selected checkpoint (best_checkpoint, best by monitor on the val "
            "split); final: the weights at the end of training (last_checkpoint)"
        )
        results.update(evaluate_splits(trainer, module, datamodule, ckpt, evaluate_cfg))
    for split in ("val", "test"):
        final = (results.get("final") or {}).get(split)
        if final:
            table = format_ap_table(final["per_class"], final["summary"])
            log.info("%s (final weights):\n%s", split, table)
        if results.get(split):
            table = format_ap_table(results[split]["per_class"], results[split]["summary"])
            log.info("%s (best checkpoint):\n%s", split, table)
            for lg in loggers:  # the table as text in TensorBoard too
                if isinstance(lg, TensorBoardLogger) and trainer.is_global_zero:
                    text = "    " + table.replace("\n", "\n    ")  # markdown code block
                    lg.experiment.add_text(f"{split}/ap_per_class", text, trainer.global_step)
    if trainer.is_global_zero:
        loader = datamodule.val_dataloader() or datamodule.test_dataloader()
        picture = cfg.get("picture") or {}
        if loader and picture.get("enabled", True):
            png = predictions_picture(
                module,
                loader,
                out_dir / "predictions.png",
                module.class_names,
                max_images=int(picture.get("max_images", 8)),
                score_threshold=float(picture.get("score_threshold", 0.3)),
            )
            results["predictions_png"] = str(png) if png else None
        write_json(results, out_dir / "metrics.json")
        log.info("metrics: %s", out_dir / "metrics.json")
    return results


def objective(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The number a sweeper optimises: ``optimized_metric`` (``split/key``) of the results."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    split, _, name = str(key).partition("/")
    value = (results.get(split) or {}).get("summary", {}).get(name)
    return float(value) if value is not None else None


@hydra_app("ssdlit.train", "train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (see the module docstring).

    A user error (bad data, a config key that does not exist, ...) ends the process with
    one line and exit status 2 (:mod:`ssdlit.apps.common`). A non-finite loss ends it with exit
    status 1 and the callback's message (step, loss terms, the last good checkpoint) on
    stderr, without a traceback.
    """
    try:
        return objective(cfg, train(cfg))
    except NonFiniteLossError as err:
        raise SystemExit(f"ssdlit.train: {err}") from None


if __name__ == "__main__":
    main()
