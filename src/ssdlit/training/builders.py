"""The training run from its config: loggers, callbacks and the Lightning ``Trainer``.

The config nodes read here (see ``conf/train.yaml``): ``logger`` (``{tensorboard: {...},
csv: {...}}``), ``callbacks`` (:func:`build_callbacks`) and ``trainer`` (``pl.Trainer``'s
keyword arguments). The data comes from :func:`ssdlit.datamodules.build_datamodule`, the
model from :meth:`ssdlit.module.DetectionModule.from_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from ssdlit.config import plain
from ssdlit.training.callbacks import (
    EMAWeights,
    ImagesPerSecond,
    PredictionImageLogger,
    SeedEveryEpoch,
    StopOnNonFiniteLoss,
)
from ssdlit.training.checkpoint import AtomicCheckpointIO

__all__ = ["LOGGERS", "build_callbacks", "build_loggers", "build_trainer"]

log = logging.getLogger(__name__)

#: Logger names usable under ``logger:`` (no import paths in configs).
LOGGERS: dict[str, type[Logger]] = {"tensorboard": TensorBoardLogger, "csv": CSVLogger}


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


def runs_on_cpu(accelerator: Any) -> bool:
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
    if options.get("sync_batchnorm") and runs_on_cpu(options.get("accelerator", "auto")):
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
