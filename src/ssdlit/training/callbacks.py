"""Lightning callbacks of the training app.

- :class:`StopOnNonFiniteLoss`: a NaN or infinite training loss stops the run *before* the
  optimiser step that would spread it into the weights, with a message that names the step
  and the loss terms; since no checkpoint is written after it, the last good ``last.ckpt``
  stays as it was.
- :class:`SeedEveryEpoch`: every training epoch draws its randomness (shuffling, augmentation,
  worker seeds, the global RNGs) from ``(seed, epoch)`` alone, so a run resumed from the
  end of an epoch continues exactly as the uninterrupted run would.
- :class:`ImagesPerSecond`: training throughput (images/s, data loading included) on the
  progress bar and in the logs.
- :class:`PredictionImageLogger`: every few epochs, a grid of validation images with
  predicted (coloured) and ground-truth (white) boxes, to TensorBoard.
- :class:`EMAWeights`: an exponential moving average of the weights (Lightning's
  ``WeightAveraging``): validation, the checkpoints and so evaluate / predict / export
  use the averaged weights.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, WeightAveraging
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from ssdlit.visualize import prediction_grid

__all__ = [
    "EMAWeights",
    "ImagesPerSecond",
    "NonFiniteLossError",
    "PredictionImageLogger",
    "SeedEveryEpoch",
    "StopOnNonFiniteLoss",
    "epoch_seed",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run was stopped."""


def _last_checkpoint(trainer: pl.Trainer) -> str | None:
    paths = [
        getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        for cb in trainer.checkpoint_callbacks
    ]
    paths = [p for p in paths if p]
    return paths[-1] if paths else None


class StopOnNonFiniteLoss(Callback):
    """Stop training on a NaN/inf loss, before ``backward`` and the optimiser step.

    Raises :class:`NonFiniteLossError` (every rank agrees first, so DDP does not hang). No
    checkpoint is saved on the way out, so the last checkpoint written (``last.ckpt``, the
    end of the previous epoch) holds the last good weights.
    """

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        terms = getattr(pl_module, "last_losses", {}) or {}
        detail = (
            ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) or f"loss={float(loss):.4g}"
        )
        last = _last_checkpoint(trainer)
        message = (
            f"non-finite training loss at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step} ({detail}); training stopped before this step's update. "
            + (
                f"The last good checkpoint is {last}. "
                if last
                else "No checkpoint had been written yet. "
            )
            + "Lower optim.lr, add warm-up (optim.scheduler.warmup_steps) or gradient clipping "
            "(trainer.gradient_clip_val), or check the data."
        )
        log.error(message)
        raise NonFiniteLossError(message)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed of ``(seed, epoch)`` (``SeedSequence``: no collisions like seed + epoch)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)[0])


def _loaders(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _loaders(v)]
    return [] if obj is None else [obj]


class SeedEveryEpoch(Callback):
    """Start every training epoch from random state that depends only on ``(seed, epoch)``.

    Lightning's checkpoints do not hold the random state of the data pipeline: the order
    of the training loader's sampler, the augmentation's own generators (seeded once, then
    drawn on from epoch to epoch) and the global RNGs. A run resumed from ``last.ckpt``
    would replay epoch 0's shuffling and augmentation in epoch 1. So for epoch ``e`` all of
    them are seeded with :func:`epoch_seed` of the seed and ``e``: the sampler gets a
    generator of its own, the loader's generator (which draws the worker processes' base
    seed, hence their augmentation seeds) is reseeded, and so are the dataset's
    augmentation and Python's, NumPy's and torch's global generators.

    When: at the start of each training epoch, before Lightning makes that epoch's data
    iterator, except for the first epoch of a (re)started fit, whose iterator Lightning
    makes right after asking for the training loader and before any epoch hook (with
    worker processes, it starts them and prefetches indices then). For that one the
    callback seeds the loader as it is made: from ``setup`` on, the training loader of the
    datamodule (or of the LightningModule when there is none) comes through
    :meth:`seed_loaders` for the epoch about to run (:meth:`epoch`). A run resumed from the end of an epoch then repeats the uninterrupted run
    bit for bit, with ``data.num_workers=0`` or worker processes alike.

    Args:
        seed: the base seed; None: the datamodule's ``seed``, else ``PL_GLOBAL_SEED``
            (set by ``seed_everything``), else 0.

    Scope: persistent workers (``data.persistent_workers=true``) are started once per
    fit and keep their augmentation streams across epochs, so a resumed run differs
    (validly) from the uninterrupted one; a warning says so when resuming.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._wrapped: Any = None

    def base_seed(self, trainer: pl.Trainer) -> int:
        if self.seed is not None:
            return int(self.seed)
        seed = getattr(trainer.datamodule, "seed", None)
        if seed is None:
            seed = os.environ.get("PL_GLOBAL_SEED", 0)
        return int(seed)

    @staticmethod
    def epoch(trainer: pl.Trainer) -> int:
        """The epoch the training loop is running or about to run (Lightning's own count
        for ``set_epoch`` of samplers: ``trainer.current_epoch`` lags it by one when a run
        resumes from a checkpoint written at the end of an epoch, until the loop starts)."""
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def seed_loaders(self, trainer: pl.Trainer, loaders: Any) -> None:
        """Seed the training ``loaders`` (and the global RNGs) for :meth:`epoch`."""
        from torch.utils.data import RandomSampler

        from ssdlit.datamodules.datamodule import _reseed

        seed = epoch_seed(self.base_seed(trainer), self.epoch(trainer))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for loader in _loaders(loaders):
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(seed)  # the workers' base seed
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, RandomSampler):
                if sampler.generator is None or sampler.generator is generator:
                    sampler.generator = torch.Generator()
                sampler.generator.manual_seed(seed)  # the order
            dataset = getattr(loader, "dataset", None)
            if dataset is not None:
                _reseed(dataset, seed)  # the augmentation (num_workers=0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        make = getattr(owner, "train_dataloader", None)
        if make is None or getattr(make, "_seeded_by", None) is self:
            return

        def train_dataloader() -> Any:
            loaders = make()
            self.seed_loaders(trainer, loaders)  # before Lightning makes the first iterator
            return loaders

        train_dataloader._seeded_by = self  # type: ignore[attr-defined]
        owner.train_dataloader = train_dataloader  # this object only, for this fit
        self._wrapped = owner

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._wrapped is not None:
            vars(self._wrapped).pop("train_dataloader", None)  # the class's method again
            self._wrapped = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path and any(
            getattr(dl, "num_workers", 0) > 0 and getattr(dl, "persistent_workers", False)
            for dl in _loaders(trainer.train_dataloader)
        ):
            log.warning(
                "resuming with persistent data-loader workers (data.persistent_workers=true): "
                "the resumed run is not bit-identical to an uninterrupted one "
                "(data.persistent_workers=false is)"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seed_loaders(trainer, trainer.train_dataloader)


class ImagesPerSecond(Callback):
    """Log training throughput, ``train/images_per_sec``, on the progress bar.

    The time of a step runs from the end of the previous step to the end of this one, so it
    includes waiting for the data loader. The value shown is an exponential moving average
    (``smoothing``); the epoch's mean is logged as ``train/images_per_sec_epoch``.
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = float(smoothing)
        self._last: float | None = None
        self._ema: float | None = None
        self._images = 0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()
        self._start = self._last
        self._images = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        n = int(batch["images"].shape[0]) * trainer.world_size
        self._images += n
        if self._last is not None and now > self._last:
            rate = n / (now - self._last)
            self._ema = (
                rate
                if self._ema is None
                else self.smoothing * self._ema + (1 - self.smoothing) * rate
            )
            pl_module.log(
                "train/images_per_sec", self._ema, prog_bar=True, on_step=True, on_epoch=False
            )
        self._last = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and self._images:
            pl_module.log(
                "train/images_per_sec_epoch", self._images / elapsed, on_step=False, on_epoch=True
            )


class PredictionImageLogger(Callback):
    """Every ``every_n_epochs`` (and at the last epoch), a grid of the first validation
    batch's images with predicted and ground-truth boxes, as ``val/predictions`` in
    TensorBoard.

    Args:
        every_n_epochs: how often (0 disables it).
        max_images: images in the grid.
        score_threshold: predictions below it are not drawn.
    """

    def __init__(
        self, every_n_epochs: int = 5, max_images: int = 8, score_threshold: float = 0.3
    ) -> None:
        self.every_n_epochs = int(every_n_epochs)
        self.max_images = int(max_images)
        self.score_threshold = float(score_threshold)

    def _due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = (
            trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and epoch >= trainer.max_epochs
        )
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or not trainer.is_global_zero
            or not self._due(trainer)
        ):
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or not isinstance(outputs, (list, tuple)):
            return
        grid = prediction_grid(
            batch["images"],
            outputs,
            getattr(pl_module, "class_names", []),
            gt_boxes=batch["boxes"],
            gt_labels=batch["labels"],
            gt_mask=batch["mask"],
            score_threshold=self.score_threshold,
            max_images=self.max_images,
        )
        for writer in writers:
            writer.add_image("val/predictions", grid, global_step=trainer.global_step)


class EMAWeights(WeightAveraging):
    """Exponential moving average of the weights and buffers (BatchNorm statistics).

    After every optimiser step ``avg <- d * avg + (1 - d) * weights`` with
    ``d = decay * (1 - exp(-updates / warmup_steps))``: the average follows the raw
    weights closely at first (when they move fast) and settles to ``decay`` later; the
    time constant is ``1 / (1 - decay)`` steps. Lightning's ``WeightAveraging`` swaps the
    average in for validation and writes it as the checkpoint's ``state_dict`` (the raw
    weights and the averaging state go beside it, so ``ckpt_path=last`` resumes both);
    evaluate, predict and export therefore use the averaged model.

    The callback acts during ``fit`` only. Outside it (``trainer.validate`` / ``test`` /
    ``predict`` with ``ckpt_path``, as the training app runs after fit) the checkpoint's
    ``state_dict``, the averaged weights, is the model, exactly what ``evaluate`` loads:
    Lightning's base class would instead, after a fit in the same process, load the raw
    weights (``current_model_state``) into the model and swap the average back in for
    validation only, so that test ran on the raw weights.

    Args:
        decay: in [0, 1); e.g. 0.99 for a run of a few hundred steps, 0.999 for long runs.
        warmup_steps: the ramp of the decay in optimiser steps (0: none).
    """

    def __init__(self, decay: float = 0.999, warmup_steps: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"ema warmup_steps must be >= 0, got {warmup_steps}")
        self.decay, self.warmup_steps = float(decay), int(warmup_steps)
        super().__init__(avg_fn=self._average)

    def current_decay(self, updates: int) -> float:
        """The decay ``d`` of the ``updates``-th update (1-based)."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_steps))

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):  # swap the average in (fit's validation)
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):  # and the raw weights back
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._fitting(trainer):  # resume: raw weights and the average, each in its place
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _average(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        d = self.current_decay(int(num_averaged))
        if not averaged.is_floating_point():  # counters (BatchNorm's num_batches_tracked)
            return current
        return averaged + (current - averaged) * (1.0 - d)
