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
  (:class:`~ssdlit.metrics.DetectionEvaluator`); at the epoch end the means are
  logged as ``{val,test}/voc07_map50``, ``.../voc_map50``, ``.../coco_map``, ... and the
  per-class APs as ``{val,test}_ap/<metric>/<class>``. The last result is kept in
  :attr:`DetectionModule.last_eval` for the apps to print and save.
- ``configure_optimizers``: :mod:`ssdlit.training.optim` (SGD or AdamW, no weight decay on
  biases and norm parameters, per-step warm-up + multistep/cosine schedule).

Hyper-parameters are stored as plain containers, so checkpoints load with
``torch.load(weights_only=True)`` (:meth:`DetectionModule.from_checkpoint`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor

from ssdlit.config import plain
from ssdlit.detector import Detector
from ssdlit.metrics.evaluator import DetectionEvaluator, batch_to_metric_inputs
from ssdlit.training.checkpoint import load_checkpoint
from ssdlit.training.optim import configure_optimizer

__all__ = ["DETECTOR_KEYS", "DetectionModule", "default_optim"]

#: The config keys that describe the detector: the keyword arguments of
#: :meth:`ssdlit.Detector.build` but ``num_classes`` (which ``class_names`` gives).
DETECTOR_KEYS: tuple[str, ...] = tuple(
    name for name in inspect.signature(Detector.build).parameters if name != "num_classes"
)


def default_optim() -> dict[str, Any]:
    """The optimiser of a module built without one: ``conf/optim/sgd.yaml`` (the SSD
    paper's SGD with warm-up and step decays), read from the installed configs."""
    text = (files("ssdlit.conf") / "optim" / "sgd.yaml").read_text(encoding="utf-8")
    return plain(OmegaConf.create(text))


class DetectionModule(pl.LightningModule):
    """A single-shot detector to train, validate and test with Lightning.

    Args:
        class_names: the C object class names (label ``i`` is ``class_names[i - 1]``); C
            is taken from here (the datamodule's ``class_names``).
        optim: ``{name: sgd|adamw, lr, ..., scheduler: {...}}``
            (:func:`ssdlit.training.optim.configure_optimizer`; the files of conf/optim);
            None: :func:`default_optim`.
        metrics: keyword arguments of :class:`~ssdlit.metrics.DetectionEvaluator`
            (``iou_threshold``, ``iou_rule``, ``coco``, ``class_metrics``).
        channels_last: keep the network's weights (and so its activations) in the NHWC
            memory format, which the CPU convolutions run fastest in.
        detector: the keyword arguments of :meth:`ssdlit.Detector.build` (the
            :data:`DETECTOR_KEYS`: ``image_size``, the ``{name: ..., **kwargs}`` specs of
            the backbone, anchors, head, matcher and post-processing, ...); ``image_size``
            may be one int for a square input.

    Every argument is saved as a hyper-parameter in plain containers (the detector's
    with the defaults of :meth:`~ssdlit.Detector.build` filled in), so that
    :meth:`from_checkpoint` rebuilds the same module.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        optim: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        **detector: Any,
    ) -> None:
        super().__init__()
        names = [str(c) for c in plain(class_names)]
        if not names:
            raise ValueError("class_names is empty: the data gives no classes")
        spec = plain(detector)
        if isinstance(spec.get("image_size"), int):
            spec["image_size"] = [spec["image_size"]] * 2
        bound = inspect.signature(Detector.build).bind(num_classes=len(names), **spec)
        bound.apply_defaults()
        hparams = {
            "class_names": names,
            **{k: v for k, v in bound.arguments.items() if k != "num_classes"},
            "optim": plain(optim) if optim is not None else default_optim(),
            "metrics": plain(metrics) or {},
            "channels_last": bool(channels_last),
        }
        self.save_hyperparameters(hparams)
        self.class_names: list[str] = names
        self.detector = Detector.build(*bound.args, **bound.kwargs)
        if channels_last:  # NHWC weights: the convolutions run in that layout (CPU: ~1.5x)
            self.detector.to(memory_format=torch.channels_last)
        self.val_evaluator = DetectionEvaluator(self.class_names, **hparams["metrics"])
        self.test_evaluator = DetectionEvaluator(self.class_names, **hparams["metrics"])
        #: The last epoch's evaluation (``{"summary": ..., "per_class": ...}``) per stage.
        self.last_eval: dict[str, dict[str, Any]] = {}
        #: The last training step's loss terms (detached), for messages and callbacks.
        self.last_losses: dict[str, Tensor] = {}

    # -- construction from a config or a checkpoint ----------------------------------------

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], class_names: Sequence[str]) -> DetectionModule:
        """The module of a composed train config (``conf/train.yaml``) for the data's
        ``class_names``: its :data:`DETECTOR_KEYS`, ``optim``, ``metrics`` and
        ``channels_last``; a key the config leaves out keeps its default."""
        keys = (*DETECTOR_KEYS, "optim", "metrics", "channels_last")
        return cls(class_names=list(class_names), **{k: cfg[k] for k in keys if k in cfg})

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        map_location: Any = "cpu",
        *,
        postprocess_options: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> DetectionModule:
        """Rebuild from a checkpoint read with ``weights_only=True``, weights included.

        The backbone is built with ``pretrained=False`` (the checkpoint's weights replace
        any download). ``overrides`` replace saved hyper-parameters (e.g. ``metrics``);
        ``postprocess_options`` change some options of the saved post-processing (e.g.
        ``{"top_k": 100}``; with ``name``, another post-processor), which is not part of
        the weights.
        """
        ckpt = load_checkpoint(path, map_location=map_location)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if "class_names" not in hparams:
            raise ValueError(f"{path} is not a ssdlit DetectionModule checkpoint (no class_names)")
        hparams.update(plain(overrides))
        if postprocess_options:
            hparams["postprocess"] = {
                **(hparams.get("postprocess") or {}),
                **plain(postprocess_options),
            }
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
        detections = self.detector.postprocess(*self.detector.candidates(batch["images"], outputs))
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
        cfg = self.hparams["optim"]
        total = None
        if (cfg.get("scheduler") or {}).get("name") == "cosine":
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "the cosine schedule needs a finite run length: set trainer.max_epochs or "
                    "trainer.max_steps (trainer.max_time alone does not say how many steps "
                    "the decay should span)"
                )
            total = int(estimated)
        optimizer, scheduler = configure_optimizer(self, cfg, total)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
