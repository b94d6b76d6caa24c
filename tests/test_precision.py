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


def test_decoding_under_bf16_autocast_is_float32():
    """Scores and boxes come out in float32 under autocast: the bfloat16 network outputs
    widened, then decoded with autocast off (not rounded to bfloat16's 8-bit mantissa)."""
    det = tiny_module().detector.eval()
    images = tiny_batch(2)["images"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = det.raw(images)
        scores, boxes = det.decode(outputs)
    assert outputs["box_deltas"].dtype == torch.bfloat16
    assert scores.dtype == torch.float32 and boxes.dtype == torch.float32
    wide = {k: v.float() for k, v in outputs.items()}
    with torch.no_grad():
        want_scores, want_boxes = det.decode(wide)
    assert torch.equal(scores, want_scores) and torch.equal(boxes, want_boxes)
    # bfloat16 boxes would sit on a grid of 2**-8 near 1; these do not
    assert not torch.equal(boxes, boxes.bfloat16().float())
