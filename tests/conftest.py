"""What the tests share: the tiny training run, written once, and the test markers.

Markers (registered in ``pyproject.toml``):

- ``e2e``: runs the apps through their command lines or a real Trainer (minutes);
- ``slow``: a unit test of several seconds (a full-size network, worker processes).

``pytest -m "not e2e and not slow"`` is the everyday loop, ``pytest -m "not e2e"`` adds
the slow unit tests, ``pytest`` runs everything (what CI runs).

The command-line tests run ``python -m ssdlit.train`` (and the other apps) on the synthetic
shapes with the overrides of :class:`Tiny` (the ``tiny`` fixture): small images, few of
them, batches in the main process, a 64x64 network, one quiet epoch. A test adds the
overrides it is about; one of the same key replaces the tiny run's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n auto`` in pyproject: one worker per core) each worker
    gets its share of the cores for torch's intra-op threads, instead of every worker
    starting as many threads as there are cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def replace(base: Iterable[str], *overrides: str) -> list[str]:
    """``base`` followed by ``overrides``, each key once: a later override of a key replaces
    an earlier one, so that the command line states each value once."""
    merged: dict[str, str] = {}
    for override in (*base, *overrides):
        key = override.split("=", 1)[0].lstrip("+~")
        merged.pop(key, None)
        merged[key] = override
    return list(merged.values())


class Tiny:
    """The tiny training run's Hydra overrides, in three parts and whole."""

    #: The synthetic shapes, small: 64x64 images, 16 / 8 / 8 per split.
    data = (
        "data.source.image_size=64",
        "data.source.num_images={train: 16, val: 8, test: 8}",
    )
    #: Batches of 4 (8 for evaluation), loaded in the main process.
    loader = (
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.persistent_workers=false",
    )
    #: A 64x64 network, one epoch, nothing written but the checkpoints and metrics.json.
    train = (
        "image_size=[64,64]",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
        "metrics.coco=false",
        "picture.enabled=false",
    )
    replace = staticmethod(replace)

    def run(self, data_root: str | Path, *overrides: str) -> list[str]:
        """The whole tiny run on synthetic data under ``data_root``, with ``overrides``."""
        base = [*self.data, f"data.source.root={data_root}", *self.loader, *self.train]
        return replace(base, *overrides)


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    """The tiny training run's overrides (:class:`Tiny`)."""
    return Tiny()
