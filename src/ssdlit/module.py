"""The Lightning system: a :class:`~ssdlit.Detector` plus its loss, metrics and optimiser.

Everything the model needs comes as plain ``{name: ..., **kwargs}`` specs of the registries
(backbone, anchors, head, matcher, post-processing) and the class names of the data; what
can be derived is derived once by :meth:`ssdlit.Detector.build` (the head's input channels
from the backbone, its anchors per location from the generator, the number of classes
from ``class_names``), so nothing is configured twice.

- ``training_step``: the detector normalises the uint8 batch, the matcher assigns the whole
  batch on the device, the head returns its named losses; each term is logged
  (``train/loss``, ``train/loss_cls``, ...), the total on the progress bar.
- ``validation_step`` / ``test_step``: validation loss, decoding + NMS, boxes mapped back to
  the original image's pixels with the batch ``meta``
  (:func:`~ssdlit.datamodules.to_original_pixels`), VOC07 / VOC / COCO metrics accumulated
  (:class:`~ssdlit.training.evaluation.DetectionEvaluator`); at the epoch end the means are
  logged as ``{val,test}/voc07_map50``, ``.../voc_map50``, ``.../coco_map``, ... and the
  per-class APs as ``{val,test}_ap/<metric>/<class>``. The last result is kept in
  :attr:`DetectionModule.last_eval` for the apps to print and save.
- ``configure_optimizers``: :mod:`ssdlit.training.optim` (SGD or AdamW, no weight decay on
  biases and norm parameters, per-step warm-up + multistep/cosine schedule).

Hyper-parameters are stored as plain containers, so checkpoints load with
``torch.load(weights_only=True)`` (:meth:`DetectionModule.from_checkpoint`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ssdlit.detector import Detector
from ssdlit.training.checkpoint import load_checkpoint
from ssdlit.training.evaluation import DetectionEvaluator, batch_to_metric_inputs
from ssdlit.training.optim import build_optimizer, build_scheduler, parameter_groups

__all__ = ["DEFAULT_OPTIM", "DetectionModule", "plain"]

#: The paper's optimiser: SGD, momentum 0.9, weight decay 5e-4, warm-up and step decays.
DEFAULT_OPTIM: dict[str, Any] = {
    "name": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "no_decay_norm_and_bias": True,
    "scheduler": {
        "name": "multistep",
        "warmup_steps": 500,
        "warmup_factor": 0.001,
        "milestones": [],
        "gamma": 0.1,
    },
}


def plain(obj: Any) -> Any:
    """OmegaConf containers (resolved) and tuples to plain dicts and lists, recursively."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - hydra brings omegaconf
        pass
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


class DetectionModule(pl.LightningModule):
    """A single-shot detector to train, validate and test with Lightning.

    Args:
        class_names: the C object class names (label ``i`` is ``class_names[i - 1]``); C
            is taken from here (the datamodule's ``class_names``).
        image_size: network input ``(H, W)`` (or one int).
        backbone, anchors, head: registry specs ``{name: ..., **kwargs}``.
        matcher: the matcher spec (needed for the loss).
        postprocess: the post-processor spec (default per-class NMS).
        optim: ``{name: sgd|adamw, lr, momentum, weight_decay, no_decay_norm_and_bias,
            betas, scheduler: {name, warmup_steps, warmup_factor, milestones, gamma,
            min_factor}}`` (see conf/optim).
        metrics: ``{iou_threshold: 0.5, iou_rule: devkit, coco: true, class_metrics: true}``
            (``iou_rule``: ``devkit`` counts IoU >= threshold, ``strict`` IoU > threshold).
        clip_boxes: clamp decoded boxes to the image before NMS.
        channels_last: keep the network's weights (and so its activations) in the NHWC
            memory format, which the CPU convolutions run fastest in.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        image_size: int | Sequence[int],
        backbone: Mapping[str, Any],
        anchors: Mapping[str, Any],
        head: Mapping[str, Any],
        matcher: Mapping[str, Any] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        clip_boxes: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        size = (
            [int(image_size), int(image_size)] if isinstance(image_size, int) else plain(image_size)
        )
        hparams = {
            "class_names": [str(c) for c in plain(class_names)],
            "image_size": [int(s) for s in size],
            "backbone": plain(backbone),
            "anchors": plain(anchors),
            "head": plain(head),
            "matcher": plain(matcher),
            "postprocess": plain(postprocess) if postprocess is not None else {"name": "per_class"},
            "optim": plain(optim) if optim is not None else copy.deepcopy(DEFAULT_OPTIM),
            "metrics": plain(metrics) if metrics is not None else {},
            "clip_boxes": bool(clip_boxes),
            "channels_last": bool(channels_last),
        }
        if not hparams["class_names"]:
            raise ValueError("class_names is empty: the data gives no classes")
        self.save_hyperparameters(hparams)
        self.class_names: list[str] = hparams["class_names"]
        self.detector = Detector.build(
            num_classes=len(self.class_names),
            image_size=hparams["image_size"],
            backbone=hparams["backbone"],
            anchors=hparams["anchors"],
            head=hparams["head"],
            postprocess=hparams["postprocess"],
            matcher=hparams["matcher"],
            clip_boxes=hparams["clip_boxes"],
        )
        if channels_last:  # NHWC weights: the convolutions run in that layout (CPU: ~1.5x)
            self.detector.to(memory_format=torch.channels_last)
        m = hparams["metrics"]
        evaluator_options = {
            "iou_threshold": float(m.get("iou_threshold", 0.5)),
            "iou_rule": str(m.get("iou_rule", "devkit")),
            "coco": bool(m.get("coco", True)),
            "class_metrics": bool(m.get("class_metrics", True)),
        }
        self.val_evaluator = DetectionEvaluator(self.class_names, **evaluator_options)
        self.test_evaluator = DetectionEvaluator(self.class_names, **evaluator_options)
        #: The last epoch's evaluation (``{"summary": ..., "per_class": ...}``) per stage.
        self.last_eval: dict[str, dict[str, Any]] = {}
        #: The last training step's loss terms (detached), for messages and callbacks.
        self.last_losses: dict[str, Tensor] = {}

    # -- construction from a checkpoint ----------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: Any = "cpu", **overrides: Any
    ) -> DetectionModule:
        """Rebuild from a checkpoint read with ``weights_only=True``, weights included.

        The backbone is built with ``pretrained=False`` (the checkpoint's weights replace
        any download). ``overrides`` replace saved hyper-parameters (e.g. ``postprocess``,
        ``metrics``).
        """
        ckpt = load_checkpoint(path, map_location=map_location)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if "class_names" not in hparams:
            raise ValueError(f"{path} is not a ssdlit DetectionModule checkpoint (no class_names)")
        hparams.update(plain(overrides))
        backbone = dict(hparams["backbone"])
        if "pretrained" in backbone:
            backbone["pretrained"] = False
        hparams["backbone"] = backbone
        module = cls(**hparams)
        module.load_state_dict(ckpt["state_dict"])
        return module

    # -- inference -------------------------------------------------------------------------

    def forward(self, images: Tensor) -> list[Tensor]:
        """Detections per image: list of ``[k, 6]`` (label, score, x1, y1, x2, y2) normalised."""
        return self.detector(images)

    # -- training --------------------------------------------------------------------------

    def _losses(self, batch: dict[str, Any], outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.detector.loss(outputs, batch["boxes"], batch["labels"], batch["mask"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        outputs = self.detector.raw(batch["images"])
        losses = self._losses(batch, outputs)
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        bs = int(batch["images"].shape[0])
        self.log(
            "train/loss", losses["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=bs
        )
        terms = {f"train/{k}": v for k, v in losses.items() if k != "loss"}
        if terms:
            self.log_dict(terms, on_step=True, on_epoch=True, batch_size=bs)
        return losses["loss"]

    # -- evaluation ------------------------------------------------------------------------

    def _eval_step(
        self, batch: dict[str, Any], stage: str, evaluator: DetectionEvaluator
    ) -> list[Tensor]:
        outputs = self.detector.raw(batch["images"])
        bs = int(batch["images"].shape[0])
        if self.detector.matcher is not None and "boxes" in batch:
            losses = self._losses(batch, outputs)
            self.log(f"{stage}/loss", losses["loss"], on_step=False, on_epoch=True, batch_size=bs)
        scores, boxes = self.detector.decode(outputs)
        detections = self.detector.postprocess(scores, boxes)
        preds, targets = batch_to_metric_inputs(detections, batch)
        evaluator.update(preds, targets)
        return detections

    def _eval_epoch_end(self, stage: str, evaluator: DetectionEvaluator) -> None:
        result = evaluator.compute()
        evaluator.reset()
        self.last_eval[stage] = result
        summary = result["summary"]
        self.log_dict(
            {f"{stage}/{k}": float(v) for k, v in summary.items()},
            prog_bar=False,
            on_epoch=True,
        )
        if "voc07_map50" in summary:
            self.log(f"{stage}/mAP", float(summary["voc07_map50"]), prog_bar=True, on_epoch=True)
        per_class = {
            f"{stage}_ap/{metric}/{name}": float(v)
            for name, row in result["per_class"].items()
            for metric, v in row.items()
            if not math.isnan(v)
        }
        if per_class:
            self.log_dict(per_class, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        return self._eval_step(batch, "val", self.val_evaluator)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_evaluator)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        return self._eval_step(batch, "test", self.test_evaluator)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_evaluator)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        """Detections per image, ``[k, 6]`` normalised to the network input (see ``meta``)."""
        return self.detector(batch["images"])

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        cfg = dict(self.hparams["optim"])
        groups = parameter_groups(
            self,
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            no_decay_norm_and_bias=bool(cfg.get("no_decay_norm_and_bias", True)),
        )
        optimizer = build_optimizer(groups, cfg)
        sched_cfg = cfg.get("scheduler")
        if sched_cfg is None:
            return optimizer
        total = None
        if sched_cfg.get("name") == "cosine":
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "the cosine schedule needs a finite run length: set trainer.max_epochs or "
                    "trainer.max_steps (trainer.max_time alone does not say how many steps "
                    "the decay should span)"
                )
            total = int(estimated)
        scheduler = build_scheduler(optimizer, sched_cfg, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
