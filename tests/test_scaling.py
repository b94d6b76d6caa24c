"""Scaling: DDP with 2 CPU processes (gloo) and a 2-job Hydra multirun.

Both go through the real command line (``python -m ssdlit.train``) on a tiny synthetic
dataset (16 training and 8 validation images of 64x64).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from ssdlit.datamodules import build_datamodule
from ssdlit.datamodules.collate import collate_detection
from ssdlit.metrics import DetectionEvaluator, batch_to_metric_inputs
from ssdlit.module import DetectionModule

#: Runs through the command line or a real Trainer: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e


#: The tiny run (tests/conftest.py), validated but not tested, at lr 1e-2 without warm-up.
SCALING = ("evaluate.test=false", "optim.lr=1e-2", "optim.scheduler.warmup_steps=0")


def run_train(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    proc = subprocess.run(
        [sys.executable, "-m", "ssdlit.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def close(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    if a is None or b is None:  # NaN in JSON
        return a is None and b is None
    return math.isclose(a, b, rel_tol=0.0, abs_tol=tol)


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_ddp_two_cpu_processes_matches_single_process_evaluation(tmp_path: Path, tiny) -> None:
    """``trainer=ddp`` with 2 CPU processes: one epoch, validation, metrics.json. Each rank
    trains on its own half (2 steps of 4 images instead of 4), and the validation mAP of
    the best checkpoint, gathered from both ranks, equals a single-process evaluation of
    the same checkpoint on all 8 images (with one rank's half only, it would not)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run_train(
        [
            *tiny.run(
                tmp_path / "data",
                *SCALING,
                "data.eval_batch_size=4",
                "trainer=ddp",
                "trainer.accelerator=cpu",  # gloo, also on a machine with GPUs
                "trainer.devices=2",
                "threads=1",  # one thread per rank: two ranks share the cores
                "metrics.coco=true",
            ),
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second rank ran
    assert metrics["epochs"] == 1
    assert metrics["global_step"] == 2  # 16 images / (2 ranks x batch 4): a sampler per rank
    best = Path(metrics["best_checkpoint"])
    assert best.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The same checkpoint evaluated in this (single) process on the whole validation split.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = build_datamodule(cfg.data, cfg.augment, cfg.image_size, splits=("val",))
    module = DetectionModule.from_checkpoint(best)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    single = module.last_eval["val"]
    ddp = metrics["val"]
    for key in ("voc07_map50", "voc_map50", "coco_map", "coco_map50", "coco_mar100"):
        assert close(ddp["summary"][key], single["summary"][key]), (
            key,
            ddp["summary"],
            single["summary"],
        )
    for name, row in single["per_class"].items():
        for key, value in row.items():
            value = None if math.isnan(value) else value
            assert close(ddp["per_class"][name][key], value), (name, key)
    # Not a vacuous comparison: the model found something on the 8 images, and one rank's
    # half alone (DistributedSampler without shuffling: images r, r + 2, ...) scores otherwise.
    assert single["summary"]["coco_mar100"] > 0
    halves = [half_summary(module, datamodule, rank) for rank in (0, 1)]
    assert all(any(not close(h[k], single["summary"][k]) for k in h) for h in halves), (
        halves,
        single["summary"],
    )


@torch.no_grad()
def half_summary(module: DetectionModule, datamodule, rank: int) -> dict[str, float]:
    """The validation summary of rank ``rank``'s share of the images in a 2-process run."""
    dataset = datamodule.dataset("val")
    share = Subset(dataset, list(range(rank, len(dataset), 2)))
    evaluator = DetectionEvaluator(module.class_names, coco=True)
    module.eval()
    for batch in DataLoader(share, batch_size=4, collate_fn=collate_detection):
        detections = module(batch["images"])
        evaluator.update(*batch_to_metric_inputs(detections, batch))
    return evaluator.compute()["summary"]


def test_multirun_two_jobs_each_write_metrics(tmp_path: Path, tiny) -> None:
    """``-m optim.lr=1e-3,2e-3``: Hydra's basic sweeper runs both jobs, one folder each."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_train(
        [
            "-m",
            *tiny.run(
                tmp_path / "data",
                *SCALING,
                "trainer=cpu",
                "trainer.limit_train_batches=2",
                "optim.lr=1e-3,2e-3",
            ),
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        env,
    )
    assert (sweep / "multirun.yaml").is_file()
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        folder = sweep / job
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["global_step"] == 2
        assert 0.0 <= metrics["val"]["summary"]["voc07_map50"] <= 1.0
        assert OmegaConf.load(folder / "config.yaml").optim.lr == pytest.approx(lr)
        assert (folder / "checkpoints" / "last.ckpt").is_file()
