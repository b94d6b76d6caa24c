"""How long a training step and a validation pass take on this machine, measured.

What :func:`ssdlit.fitting.fit_epochs` turns into a number of epochs for a time budget
(``fit.minutes``). The measurement runs the real data loaders (their workers and
augmentation included) and the real network (forward, loss and backward; no optimiser
step), then puts every weight and statistic back: the run starts from the same state as
without it.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StepTimes", "measure_step_times"]


@dataclass(frozen=True)
class StepTimes:
    """Measured seconds per training step and per validation batch (loading included)."""

    train_step: float
    val_batch: float
    train_batches: int
    val_batches: int

    def validation(self) -> float:
        """Seconds of one validation pass over :attr:`val_batches` batches."""
        return self.val_batch * self.val_batches


def _timed(batches: Iterator[Any], step, count: int, warmup: int) -> float:
    """Mean seconds of ``step(batch)`` with the batch's loading, after ``warmup`` untimed."""
    for batch in itertools.islice(batches, warmup):
        step(batch)
    seconds, done = 0.0, 0
    while done < count:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        step(batch)
        seconds += time.perf_counter() - start
        done += 1
    return seconds / done if done else 0.0


def measure_step_times(
    module: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    steps: int = 10,
    warmup: int = 3,
) -> StepTimes:
    """Time ``steps`` training steps and validation batches of ``module`` (a
    :class:`~ssdlit.module.DetectionModule`) on its loaders, after ``warmup`` untimed ones
    (worker start-up, first-call costs); the module's state is restored afterwards."""
    detector = module.detector
    saved = copy.deepcopy(module.state_dict())
    was_training = module.training

    def train_step(batch: dict[str, Any]) -> None:
        losses = detector.loss(
            detector.raw(batch["images"]), batch["boxes"], batch["labels"], batch["mask"]
        )
        losses["loss"].backward()
        module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_step(batch: dict[str, Any]) -> None:
        scores, boxes = detector.candidates(batch["images"])
        detector.postprocess(scores, boxes)

    try:
        module.train()
        train_s = _timed(_cycle(train_loader), train_step, steps, warmup)
        val_s = 0.0
        if val_loader is not None and len(val_loader):  # type: ignore[arg-type]
            module.eval()
            val_s = _timed(_cycle(val_loader), val_step, max(2, steps // 2), 1)
    finally:
        module.load_state_dict(saved)
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return StepTimes(
        train_step=train_s,
        val_batch=val_s,
        train_batches=len(train_loader),  # type: ignore[arg-type]
        val_batches=len(val_loader) if val_loader is not None else 0,  # type: ignore[arg-type]
    )


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, starting again when it runs out (short loaders)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
