"""Mixed precision: bf16 autocast trains on the CPU with the same matches as float32."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader

from tests.spies import record_matches
from tests.test_module import tiny_batch, tiny_module


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return tiny_batch(2)


def test_matches_and_loss_under_bf16_autocast_equal_float32():
    module = tiny_module()
    det = module.detector
    batch = tiny_batch(2)
    args = (batch["boxes"], batch["labels"], batch["mask"])
    fp32_matches = det.matcher(batch["boxes"], batch["mask"], det.anchor_overlaps())
    outputs = det.raw(batch["images"])
    fp32 = det.loss(outputs, *args)
    seen = record_matches(det)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_outputs = det.raw(batch["images"])
        bf16 = det.loss(bf16_outputs, *args)
    assert bf16_outputs["cls_logits"].dtype == torch.bfloat16  # autocast did run
    assert torch.equal(seen["matches"], fp32_matches)
    assert bf16["loss"].dtype == torch.float32 and torch.isfinite(bf16["loss"])
    assert bf16["loss"].item() == pytest.approx(fp32["loss"].item(), rel=0.05)


def test_bf16_mixed_trains_a_few_steps_on_the_cpu(tmp_path):
    module = tiny_module()
    losses: list[float] = []
    original = module.training_step

    def step(batch, batch_idx):
        loss = original(batch, batch_idx)
        losses.append(float(loss.detach()))
        return loss

    module.training_step = step
    loader = DataLoader(_Batches(4), batch_size=None)
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
