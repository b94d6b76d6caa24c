"""The config edge: turn the composed Hydra config into data, model, callbacks and Trainer.

Only this module (and the apps) read the config tree; every component below it gets
plain keyword arguments. The config layout it reads (see ``conf/``):

- ``image_size``: the network input ``[H, W]`` (the data pipeline and the model share it);
- ``backbone``, ``anchors``, ``head``, ``matcher``, ``postprocess``: registry specs;
- ``data``: ``source`` (the options every split shares, with the ``DATASETS`` registry
  ``name``), ``train`` / ``val`` / ``test`` (per-split options merged over ``source``, or
  null for no such split), ``class_names`` (the one key for the class names, handed to
  every split's source; null: the first split's source decides, e.g. the names in its
  files, and the other splits get the same) and the loader options (``batch_size``,
  ``eval_batch_size``, ``num_workers``, ...); any other key (``root``...) is a free
  variable for interpolation;
- ``augment``: ``train`` and ``eval`` pipeline specs (``{name: ssd|light|val, ...}``);
- ``optim``, ``metrics``, ``trainer``, ``logger``, ``callbacks``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from ssdlit.cli import UsageError
from ssdlit.datamodules import DetectionDataModule
from ssdlit.module import DetectionModule, plain
from ssdlit.registry import DATASETS
from ssdlit.training.callbacks import (
    EMAWeights,
    ImagesPerSecond,
    PredictionImageLogger,
    SeedEveryEpoch,
    StopOnNonFiniteLoss,
)
from ssdlit.training.checkpoint import AtomicCheckpointIO

__all__ = [
    "DATAMODULE_OPTIONS",
    "LOGGERS",
    "SPLITS",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_module",
    "build_source",
    "build_sources",
    "build_trainer",
    "split_specs",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

#: ``data.*`` keys handed to :class:`~ssdlit.datamodules.DetectionDataModule`
#: (``data.class_names`` goes to the sources, see :func:`build_sources`).
DATAMODULE_OPTIONS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "persistent_workers",
    "pin_memory",
    "drop_last",
    "seed",
    "cache_images",
)

#: Logger names usable under ``logger:`` (no import paths in configs).
LOGGERS: dict[str, type[Logger]] = {"tensorboard": TensorBoardLogger, "csv": CSVLogger}


def split_specs(data: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{split: source spec or None}``: each split's options merged over ``data.source``."""
    data = plain(data)
    shared = dict(data.get("source") or {})
    out: dict[str, dict[str, Any] | None] = {}
    for split in SPLITS:
        own = data.get(split)
        out[split] = None if own is None else {**shared, **dict(own)}
    return out


#: The keyword arguments by which a source takes its class names, tried in this order.
_CLASS_NAME_ARGUMENTS = ("class_names", "classes")
CLASS_NAMES_KEY = "data.class_names"


def _class_names_argument(name: str) -> str | None:
    """The keyword by which the registered source ``name`` takes its class names."""
    try:
        params = inspect.signature(DATASETS.get(name)).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in _CLASS_NAME_ARGUMENTS if a in params), None)


def build_source(spec: Mapping[str, Any], class_names: Sequence[str] | None = None) -> Any:
    """A data source from ``{name: <DATASETS name>, **kwargs}``.

    ``class_names`` (the config's ``data.class_names``) is handed to the source under its
    own keyword (``classes`` for VOC and synthetic data, ``class_names`` for CSV and COCO).
    The spec itself may not set that keyword: the class names have one key
    (:class:`~ssdlit.cli.UsageError` otherwise).
    """
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError(f"a data source needs a 'name' (one of {DATASETS.names()}), got {spec}")
    arg = _class_names_argument(str(name))
    if arg is not None and kwargs.get(arg) is not None:
        raise UsageError(
            f"data.source.{arg}: the class names are set with {CLASS_NAMES_KEY}=[...] (one key "
            "for every source and split), not in the source's options"
        )
    if class_names is not None:
        if arg is None:
            raise UsageError(
                f"the {name!r} source takes no class names: leave {CLASS_NAMES_KEY} null"
            )
        kwargs[arg] = list(class_names)
    return DATASETS.build(name, **kwargs)


def build_sources(
    data: Mapping[str, Any],
    splits: Sequence[str] = SPLITS,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``{split: source}`` for the splits of ``data`` that exist, built in ``splits`` order.

    Every source gets ``data.class_names``; when it is null, ``class_names`` (e.g. a
    checkpoint's), else the first source built decides (the 20 VOC classes of a devkit, the
    names in a flat VOC folder's or a CSV's files, COCO's categories) and the others get
    the same names, so that a label means one class in every split.
    """
    data = plain(data)
    specs = split_specs(data)
    names = data.get("class_names")
    names = list(names) if names is not None else class_names
    sources: dict[str, Any] = {}
    for split in splits:
        spec = specs.get(split)
        if spec is None:
            continue
        sources[split] = build_source(spec, class_names=names)
        if names is None and _class_names_argument(str(spec.get("name"))) is not None:
            # the names the source accepts (VOC with include_classes: the superset)
            names = list(
                getattr(sources[split], "known_classes", None) or sources[split].class_names
            )
        report = getattr(sources[split], "report", None)
        if report is not None and hasattr(report, "summary"):
            log.info("data %s: %s", split, report.summary())
    return sources


def build_datamodule(
    data: Mapping[str, Any],
    augment: Mapping[str, Any] | None,
    image_size: int | Sequence[int],
    splits: Sequence[str] = SPLITS,
    rename: Mapping[str, str] | None = None,
    predict: Any = None,
    class_names: Sequence[str] | None = None,
) -> DetectionDataModule:
    """The datamodule of ``data`` with the ``augment`` pipelines at ``image_size``.

    Args:
        data, augment: the ``data`` and ``augment`` config nodes.
        image_size: the network input ``(H, W)``.
        splits: the splits to build (the sources of the others are never parsed).
        rename: serve a split under another role, e.g. ``{"val": "test"}`` makes the
            ``val`` source the datamodule's test split (``evaluate`` does this).
        predict: images for the predict split (files, folders, globs).
        class_names: the class names when ``data.class_names`` is null (e.g. those of the
            checkpoint being evaluated); see :func:`build_sources`.
    """
    data = plain(data)
    aug = plain(augment) or {}
    rename = dict(rename or {})
    built = build_sources(data, splits, class_names)
    sources = {rename.get(split, split): source for split, source in built.items()}
    eval_aug = aug.get("eval", "val")
    options = {k: data[k] for k in DATAMODULE_OPTIONS if k in data and data[k] is not None}
    names = data.get("class_names") or class_names
    return DetectionDataModule(
        train=sources.get("train"),
        val=sources.get("val"),
        test=sources.get("test"),
        predict=predict,
        class_names=None if sources or names is None else list(names),
        image_size=image_size,
        augment={
            "train": aug.get("train", "ssd"),
            "val": eval_aug,
            "test": eval_aug,
            "predict": eval_aug,
        },
        **options,
    )


def build_module(cfg: Mapping[str, Any], class_names: Sequence[str]) -> DetectionModule:
    """The :class:`~ssdlit.module.DetectionModule` of a composed config and the data's classes."""
    return DetectionModule(
        class_names=list(class_names),
        image_size=plain(cfg["image_size"]),
        backbone=cfg["backbone"],
        anchors=cfg["anchors"],
        head=cfg["head"],
        matcher=cfg.get("matcher"),
        postprocess=cfg.get("postprocess"),
        optim=cfg.get("optim"),
        metrics=cfg.get("metrics"),
        clip_boxes=bool(cfg.get("clip_boxes", True)),
        channels_last=bool(cfg.get("channels_last", False)),
    )


def build_loggers(logger: Mapping[str, Any] | None, run_dir: str | Path) -> list[Logger]:
    """Loggers under ``run_dir`` from ``{tensorboard: {...}, csv: {...}}`` (None/{}: none)."""
    out: list[Logger] = []
    for name, options in (plain(logger) or {}).items():
        if options is None:
            continue
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS)}")
        out.append(LOGGERS[name](save_dir=str(run_dir), **dict(options)))
    return out


def build_callbacks(
    callbacks: Mapping[str, Any] | None, run_dir: str | Path, with_logger: bool = True
) -> tuple[list[Callback], ModelCheckpoint | None]:
    """The training callbacks and the best-checkpoint callback (first, so ``ckpt_path="best"``
    finds it).

    ``callbacks`` keys (each null to disable): ``checkpoint`` (``monitor``, ``mode``,
    ``dirpath`` relative to ``run_dir``, ``filename``), ``last_checkpoint`` (``every_n_epochs``),
    ``lr_monitor``, ``throughput``, ``image_logger``, ``stop_on_nonfinite``, ``ema`` (``decay``,
    ``warmup_steps``: :class:`EMAWeights`), ``early_stopping``,
    ``seed_every_epoch`` (true when absent: each epoch's data randomness depends only on the
    seed and the epoch, what exact resume needs; see :class:`SeedEveryEpoch`).
    Without a logger (``with_logger=False``) the learning-rate monitor is left out (it needs one).
    """
    cfg = plain(callbacks) or {}
    run_dir = Path(run_dir)
    out: list[Callback] = []
    best: ModelCheckpoint | None = None
    ck = cfg.get("checkpoint")
    ckpt_dir = run_dir / str((ck or {}).get("dirpath", "checkpoints"))
    if ck is not None:
        # The best checkpoint by the monitored metric, written as best.ckpt.
        best = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=str(ck.get("filename", "best")),
            monitor=ck.get("monitor", "val/voc07_map50"),
            mode=str(ck.get("mode", "max")),
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        out.append(best)
    last = cfg.get("last_checkpoint")
    if last is not None:
        # last.ckpt after every epoch (Lightning's save_last with a monitor only writes it when
        # the monitored value improves), the file `ckpt_path=last` resumes from.
        out.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="last",
                monitor=None,
                save_top_k=1,
                every_n_epochs=int(last.get("every_n_epochs", 1)),
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    if cfg.get("lr_monitor") is not None and with_logger:
        out.append(LearningRateMonitor(**dict(cfg["lr_monitor"])))
    if cfg.get("throughput") is not None:
        out.append(ImagesPerSecond(**dict(cfg["throughput"])))
    if cfg.get("image_logger") is not None:
        out.append(PredictionImageLogger(**dict(cfg["image_logger"])))
    if cfg.get("stop_on_nonfinite"):
        out.append(StopOnNonFiniteLoss())
    if cfg.get("seed_every_epoch", True):
        out.append(SeedEveryEpoch())
    if cfg.get("ema") is not None:
        out.append(EMAWeights(**dict(cfg["ema"])))
    if cfg.get("early_stopping") is not None:
        from pytorch_lightning.callbacks import EarlyStopping

        out.append(EarlyStopping(**dict(cfg["early_stopping"])))
    return out, best


def _runs_on_cpu(accelerator: Any) -> bool:
    """Whether Lightning's ``accelerator`` choice lands on the CPU here."""
    name = str(accelerator or "auto").lower()
    if name == "cpu":
        return True
    if name != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def build_trainer(
    trainer: Mapping[str, Any],
    run_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    loggers: Sequence[Logger] = (),
) -> pl.Trainer:
    """``pl.Trainer(**trainer)`` with atomic checkpoint IO, ``run_dir`` as the root folder.

    ``sync_batchnorm`` is dropped (with a log line) when the run is on the CPU: torch's
    SyncBatchNorm needs GPUs, so ``trainer=ddp`` runs as is with CPU processes (gloo), each
    keeping its own BatchNorm statistics.
    """
    options = plain(trainer) or {}
    if options.get("sync_batchnorm") and _runs_on_cpu(options.get("accelerator", "auto")):
        log.info("sync_batchnorm is off: SyncBatchNorm needs GPUs and this run is on the CPU")
        options["sync_batchnorm"] = False
    return pl.Trainer(
        default_root_dir=str(run_dir),
        callbacks=list(callbacks),
        logger=list(loggers) if loggers else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        plugins=[AtomicCheckpointIO()],
        **options,
    )
