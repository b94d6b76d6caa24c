"""How long a training step and a validation pass take on this machine, measured.

What :func:`ssdlit.fitting.fit_epochs` turns into a number of epochs for a time budget
(``fit.minutes``), and what :func:`choose_precision` compares (``fit.precision``: float32
against bfloat16 autocast on a CPU). The measurement runs the real data loaders (their
workers and augmentation included) and the real network (forward, loss and backward, in
the run's precision; no optimiser step), then puts every weight and statistic back: the
run starts from the same state as without it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MIXED_SPEEDUP", "StepTimes", "autocast_for", "choose_precision", "measure_step_times"]

#: The least speed-up of a bfloat16-mixed training step over float32 for
#: :func:`choose_precision` to take it: below it the rounding is not worth it (CPUs
#: without bfloat16 instructions run it several times slower, not faster).
MIXED_SPEEDUP = 1.25

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_for(precision: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context that Lightning's ``precision`` runs the step in on ``device``
    (``"bf16-mixed"``, ``"16-mixed"``; anything else, e.g. ``"32-true"``: none)."""
    dtype = _AUTOCAST_DTYPES.get(str(precision))
    if dtype is None or device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
    precision: Any = "32-true",
) -> StepTimes:
    """Time ``steps`` training steps and validation batches of ``module`` (a
    :class:`~ssdlit.module.DetectionModule`) on its loaders, after ``warmup`` untimed ones
    (worker start-up, first-call costs), under the autocast of Lightning's ``precision``
    (:func:`autocast_for`); the module's state is restored afterwards."""
    detector = module.detector
    saved = copy.deepcopy(module.state_dict())
    was_training = module.training
    device = next(module.parameters()).device

    def train_step(batch: dict[str, Any]) -> None:
        with autocast_for(precision, device):
            outputs = detector.raw(batch["images"])
            losses = detector.loss(outputs, batch["boxes"], batch["labels"], batch["mask"])
        losses["loss"].backward()
        module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_step(batch: dict[str, Any]) -> None:
        with autocast_for(precision, device):
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


def choose_precision(
    module: Any, train_loader: Iterable[Any], *, steps: int = 4, warmup: int = 2
) -> tuple[str, dict[str, float]]:
    """``"bf16-mixed"`` where a training step of ``module`` on ``train_loader`` runs at
    least :data:`MIXED_SPEEDUP` times faster under bfloat16 autocast than in float32 on
    this machine (CPUs with bfloat16 matrix instructions: AMX, AVX512-BF16), else
    ``"32-true"``; with the measured seconds per step of each, ``{"32-true": s,
    "bf16-mixed": s}``. For CPU runs: GPUs have their own ``trainer=gpu`` precision."""
    seconds = {
        precision: measure_step_times(
            module, train_loader, None, steps=steps, warmup=warmup, precision=precision
        ).train_step
        for precision in ("32-true", "bf16-mixed")
    }
    mixed, full = seconds["bf16-mixed"], seconds["32-true"]
    chosen = "bf16-mixed" if mixed > 0 and full >= MIXED_SPEEDUP * mixed else "32-true"
    return chosen, seconds


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, starting again when it runs out (short loaders)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
