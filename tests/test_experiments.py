"""The ``*_voc`` experiments are the recipes their papers state.

The expected values below are written from the papers (and the SSD Caffe script
``ssd_pascal.py``), not read back from the configs; each experiment's comments list its
deliberate deviations.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ssdlit.anchors.matching import IGNORE
from ssdlit.detector import build_component
from ssdlit.registry import ANCHORS, HEADS, MATCHERS

CONF = Path(__file__).resolve().parents[1] / "conf"
VOC_EXPERIMENTS = ("ssd300_voc", "ssd512_voc", "ssdlite_voc", "retina_voc", "yolo_voc")


@functools.cache
def _compose(overrides: tuple[str, ...]):
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def experiment(name: str):
    return _compose((f"+experiment={name}",))


# The SSD paper / ssd_pascal.py: what each SSD-family VOC experiment must state.
SSD_MATCHING = {"name": "ssd", "matching": "multi", "pos_iou_threshold": 0.5, "neg_iou_limit": 0.5}
SSD_LOSS = {"variances": [0.1, 0.1, 0.2, 0.2], "neg_pos_ratio": 3.0, "alpha": 1.0, "beta": 1.0}
SSD_RECIPE = {
    "optim": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4},
    "milestones": [80_000, 100_000],
    "max_steps": 120_000,
    "batch_size": 32,
    "postprocess": {
        "name": "per_class",
        "confidence_thresh": 0.01,
        "iou_threshold": 0.45,
        "top_k": 200,
        "nms_max_output_size": 400,
    },
    "train_splits": [["2007", "trainval"], ["2012", "trainval"]],
    "val_splits": [["2007", "test"]],
}


@pytest.mark.parametrize("name", VOC_EXPERIMENTS)
def test_voc_experiments_state_the_papers_training_recipe(name):
    cfg = experiment(name)
    assert cfg.backbone.pretrained is True
    for key, value in SSD_RECIPE["optim"].items():
        assert cfg.optim[key] == value, key
    assert list(cfg.optim.scheduler.milestones) == SSD_RECIPE["milestones"]
    assert cfg.optim.scheduler.gamma == 0.1
    assert cfg.trainer.max_steps == SSD_RECIPE["max_steps"] and cfg.trainer.max_epochs is None
    assert cfg.data.batch_size == SSD_RECIPE["batch_size"]
    assert OmegaConf.to_container(cfg.data.train.splits) == SSD_RECIPE["train_splits"]
    assert OmegaConf.to_container(cfg.data.val.splits) == SSD_RECIPE["val_splits"]
    for key, value in SSD_RECIPE["postprocess"].items():
        assert cfg.postprocess[key] == value, key
    assert cfg.augment.train.name == "ssd" and cfg.augment.train.max_zoom == 4.0
    assert cfg.metrics.iou_threshold == 0.5


@pytest.mark.parametrize("name", ["ssd300_voc", "ssd512_voc", "ssdlite_voc"])
def test_ssd_experiments_match_and_mine_as_the_paper(name):
    cfg = experiment(name)
    assert OmegaConf.to_container(cfg.matcher) == SSD_MATCHING
    # The loss the head builds (the values the config leaves out are the head's defaults).
    spec = OmegaConf.to_container(cfg.head)
    head = build_component(HEADS, spec, in_channels=[4] * 6, num_anchors=[4] * 6, num_classes=20)
    loss = head.criterion
    assert list(loss.coder.variances) == SSD_LOSS["variances"]
    for key in ("neg_pos_ratio", "alpha", "beta"):
        assert getattr(loss, key) == SSD_LOSS[key], key
    assert loss.mining == "per_image"  # Caffe's MultiBoxLoss mines image by image


def test_ssd300_voc_has_no_ignore_band():
    # Every anchor that is not a positive is a negative: nothing is left out of the loss.
    cfg = experiment("ssd300_voc")
    matcher = build_component(MATCHERS, OmegaConf.to_container(cfg.matcher))
    gen = build_component(ANCHORS, OmegaConf.to_container(cfg.anchors), image_size=(300, 300))
    anchors = gen([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
    assert anchors.shape == (8732, 4)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 6, 2, generator=g) * 0.6
    wh = torch.rand(4, 6, 2, generator=g) * 0.35 + 0.05
    boxes = torch.cat([xy, xy + wh], dim=-1)  # [4, 6, 4] xyxy
    mask = torch.ones(4, 6, dtype=torch.bool)
    matches = matcher(boxes, mask, anchors)
    assert (matches >= 0).any() and not (matches == IGNORE).any()


def test_retina_voc_states_retinanets_assignment_and_loss():
    cfg = experiment("retina_voc")
    assert cfg.matcher.name == "faster_rcnn"
    assert (cfg.matcher.pos_iou_threshold, cfg.matcher.neg_iou_threshold) == (0.5, 0.4)
    assert (cfg.head.focal_alpha, cfg.head.focal_gamma, cfg.head.prior) == (0.25, 2.0, 0.01)
    assert list(cfg.anchors.aspect_ratios) == [0.5, 1.0, 2.0]
    assert list(cfg.anchors.scales) == pytest.approx([2**0, 2 ** (1 / 3), 2 ** (2 / 3)])


def test_yolo_voc_states_yolov3s_ignore_threshold():
    cfg = experiment("yolo_voc")
    assert cfg.matcher.name == "yolov3" and cfg.matcher.ignore_threshold == 0.5


@pytest.mark.parametrize("name", VOC_EXPERIMENTS)
def test_voc_experiments_list_their_deviations(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert "Deliberate deviations" in text
    base = (CONF / "experiment" / "base" / "voc.yaml").read_text()
    assert "Deliberate deviations" in base and "/experiment/base/voc" in "".join(
        (CONF / "experiment" / f"{n}.yaml").read_text() for n in ("ssd300_voc", name)
    )
