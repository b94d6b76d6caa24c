"""The COCO experiments are torchvision's reference recipes, and ``python -m ssdlit.evaluate``
reports COCO mAP@[.5:.95] on COCO-format data as pycocotools computes it.

The expected values are written from torchvision (``references/detection/README.md``,
``train.py``, ``engine.py``, ``presets.py`` and the ``ssd300_vgg16`` /
``ssdlite320_mobilenet_v3_large`` builders), not read back from the configs; the experiments'
headers list their deliberate deviations. Full-size detectors are built on the meta device
(shapes and settings, no weights); the anchors are compared with torchvision's own
``DefaultBoxGenerator``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from ssdlit.boxes import convert
from ssdlit.config import plain
from ssdlit.detector import Detector, build_component
from ssdlit.module import DETECTOR_KEYS, DetectionModule
from ssdlit.registry import MATCHERS
from ssdlit.training.optim import configure_optimizer
from tests.data_builders import write_coco
from tests.test_configs import compose_cfg

NAMES = ("ssd300_coco", "ssdlite320_coco")

#: COCO train2017 images with annotations (torchvision's training set) and the steps of one
#: epoch on 8 processes: ceil(ceil(117266 / 8) / batch).
TRAIN_IMAGES = 117266


def steps_per_epoch(batch: int, devices: int = 8) -> int:
    return math.ceil(math.ceil(TRAIN_IMAGES / devices) / batch)


#: torchvision's recipes (README command lines, train.py's defaults: momentum 0.9, every
#: parameter decayed; engine.py's warm-up: LinearLR from 1/1000 over 1000 steps).
RECIPES = {
    "ssd300_coco": {
        "batch_size": 4,
        "lr": 0.002,
        "weight_decay": 5e-4,
        "epochs": 120,
        "schedule": "multistep",
        "milestones": [80 * steps_per_epoch(4), 110 * steps_per_epoch(4)],
        "augment": {"photometric": True, "zoom_out_p": 0.5, "max_zoom": 4.0, "crop": True},
    },
    "ssdlite320_coco": {
        "batch_size": 24,
        "lr": 0.15,
        "weight_decay": 4e-5,
        "epochs": 660,
        "schedule": "cosine",
        "milestones": [],
        "augment": {"photometric": False, "zoom_out_p": 0.0, "crop": True},
    },
}

#: Input normalisations (mean, std) in 0..1 units: torchvision's ImageNet classifiers, its
#: ssd300_vgg16 (image_mean, image_std: 0..255 minus the mean pixel) and SSDLite ([-1, 1]).
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CAFFE = ((0.48235, 0.45882, 0.40784), (1 / 255, 1 / 255, 1 / 255))
UNIT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: What torchvision's builders set, as ssdlit settings (``ssd300_vgg16``: image_mean
#: 0.48235, 0.45882, 0.40784 and std 1/255 for its COCO weights, but see ``ssd300_coco``'s
#: deviation: trained here from IMAGENET1K_V1 with its ImageNet normalisation).
DETECTORS = {
    "ssd300_coco": {
        "image_size": (300, 300),
        "anchors": 8732,
        "feature_sizes": [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)],
        "normalization": IMAGENET,
        "out_channels": [512, 1024, 512, 256, 256, 256],
        "head": "SSDHead",
        "postprocess": {
            "confidence_thresh": 0.01,
            "iou_threshold": 0.45,
            "top_k": 200,
            "pre_nms_top_k": 400,
            "nms_max_output_size": None,
        },
        # DefaultBoxGenerator's arguments in ssd300_vgg16()
        "torchvision_anchors": {
            "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            "scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            "steps": [8, 16, 32, 64, 100, 300],
        },
    },
    "ssdlite320_coco": {
        "image_size": (320, 320),
        "anchors": 3234,
        "feature_sizes": [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
        "normalization": UNIT,
        # MobileNetV3-Large with the reduced tail (C5: 480 channels)
        "out_channels": [672, 480, 512, 256, 256, 128],
        "head": "SSDLiteHead",
        "postprocess": {
            "confidence_thresh": 0.001,
            "iou_threshold": 0.55,
            "top_k": 300,
            "pre_nms_top_k": 300,
            "nms_max_output_size": None,
        },
        "torchvision_anchors": {
            "aspect_ratios": [[2, 3]] * 6,
            "min_ratio": 0.2,
            "max_ratio": 0.95,
        },
    },
}


def experiment(name: str, *overrides: str):
    return compose_cfg([f"+experiment={name}", "data.root=/data/coco", *overrides])


def detector_spec(cfg) -> dict:
    """The Detector.build keywords of a composed config, never downloading weights."""
    spec = {k: plain(cfg[k]) for k in DETECTOR_KEYS}
    spec["backbone"]["pretrained"] = False
    return spec


def meta_detector(spec: dict, num_classes: int = 80) -> Detector:
    """The detector of ``spec`` on the meta device (no weights, no arithmetic); the matcher
    is built apart (its anchor tables need values)."""
    with torch.device("meta"):
        return Detector.build(num_classes=num_classes, **{**spec, "matcher": None})


# -- the training recipes ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_coco_experiments_state_torchvisions_training_recipe(name):
    cfg = experiment(name)
    recipe = RECIPES[name]
    # COCO 2017: train2017 for training (no crowd boxes, no image without one), val2017
    assert cfg.data.source.name == "coco"
    assert cfg.data.train.annotation_file == "/data/coco/annotations/instances_train2017.json"
    assert cfg.data.val.annotation_file == "/data/coco/annotations/instances_val2017.json"
    assert cfg.data.train.include_crowd is False and cfg.data.train.keep_images_without_gt is False
    assert cfg.data.source.include_crowd is True  # val2017: crowd regions ignored by the metric
    # --batch-size is per GPU: 8 DDP processes, data.batch_size per process
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 8, 1)
    assert cfg.data.batch_size == recipe["batch_size"]
    assert cfg.trainer.sync_batchnorm is False  # train.py without --sync-bn
    assert cfg.trainer.max_epochs == recipe["epochs"] and cfg.trainer.max_steps == -1
    # SGD, momentum 0.9, the weight decay on every parameter, 1000 warm-up steps from 1/1000
    optim = cfg.optim
    assert (optim.name, optim.lr, optim.momentum) == ("sgd", recipe["lr"], 0.9)
    assert optim.nesterov is False
    assert optim.weight_decay == recipe["weight_decay"] and optim.no_decay_norm_and_bias is False
    assert (optim.scheduler.warmup_steps, optim.scheduler.warmup_factor) == (1000, 0.001)
    assert optim.scheduler.name == recipe["schedule"]
    assert list(optim.scheduler.milestones) == recipe["milestones"]
    # torchvision's "ssd" / "ssdlite" augmentation: (distortion, zoom out,) IoU crop, flip
    train = cfg.augment.train
    assert train.name == "ssd" and train.flip_p == 0.5 and train.max_trials == 40
    for key, value in recipe["augment"].items():
        assert train[key] == value, key
    assert cfg.augment.eval.name == "val" and cfg.augment.eval.letterbox is False
    # the metric: COCO mAP@[.5:.95] on val2017 picks the best checkpoint
    assert cfg.metrics.coco is True
    assert cfg.callbacks.checkpoint.monitor == "val/coco_map"
    assert cfg.callbacks.checkpoint.mode == "max"
    assert cfg.optimized_metric == "val/coco_map"


@pytest.mark.parametrize("name", NAMES)
def test_coco_schedules_in_optimiser_steps(name):
    cfg = experiment(name)
    recipe = RECIPES[name]
    total = recipe["epochs"] * steps_per_epoch(recipe["batch_size"])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer, scheduler = configure_optimizer(model, plain(cfg.optim), total_steps=total)
    # every parameter decayed, biases and BatchNorm included (train.py's default)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [recipe["weight_decay"]]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4

    def lr(step: int) -> float:
        return recipe["lr"] * scheduler.lr_lambdas[0](step)

    base = recipe["lr"]
    assert lr(0) == pytest.approx(base / 1000) and lr(500) == pytest.approx(base * 0.5005)
    if recipe["schedule"] == "multistep":  # x0.1 at epochs 80 and 110
        first, second = recipe["milestones"]
        assert [lr(s) for s in (1000, first - 1, first, second - 1, second, total - 1)] == (
            pytest.approx([base, base, base / 10, base / 10, base / 100, base / 100])
        )
    else:  # cosine to 0 over the run
        assert lr(1000) == pytest.approx(base)
        assert lr((total + 1000) // 2) == pytest.approx(base / 2, rel=1e-3)
        assert lr(total) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_coco_training_augmentation_builds_and_runs(name):
    from ssdlit.datamodules import DetectionDataModule

    cfg = experiment(name)
    size = list(cfg.image_size)
    dm = DetectionDataModule(
        class_names=["a"], image_size=size, augment={"train": plain(cfg.augment.train)}
    )
    pipeline = dm.build_transform("train")
    names = [type(t).__name__ for t in pipeline.transforms]
    for only_ssd300 in ("SSDPhotometricDistort", "ZoomOut", "ChannelShuffle"):
        assert (only_ssd300 in names) == (name == "ssd300_coco"), only_ssd300
    assert "MinIoURandomCrop" in names and "HorizontalFlip" in names
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = pipeline(image=image, bboxes=np.array([[10.0, 20.0, 80.0, 70.0, 1.0]]))
    assert out["image"].shape == (*size, 3)


# -- the detectors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_coco_experiments_build_torchvisions_detectors(name):
    cfg = experiment(name)
    want = DETECTORS[name]
    det = meta_detector(detector_spec(cfg))
    assert det.image_size == want["image_size"] and det.clip_boxes is True
    assert det.anchors.shape == (want["anchors"], 4)
    assert det.feature_sizes == want["feature_sizes"]
    assert det.anchor_generator.clip == "size"
    assert (det.backbone.mean, det.backbone.std) == want["normalization"]
    assert det.backbone.out_channels == want["out_channels"]
    assert type(det.head).__name__ == want["head"]
    # torchvision's SSD loss: softmax + smooth-L1 (beta 1), BoxCoder weights (10, 10, 5, 5),
    # exactly 3 hard negatives per positive, image by image
    loss = det.head.criterion
    assert list(loss.coder.variances) == [0.1, 0.1, 0.2, 0.2]
    assert (loss.neg_pos_ratio, loss.n_neg_min, loss.mining) == (3.0, 0, "per_image")
    assert (loss.alpha, loss.beta) == (1.0, 1.0)
    # its post-processing: per class, score > thresh, top-k before NMS, no cap after NMS
    pp = det.postprocess
    assert type(pp).__name__ == "PerClassNMS"
    for key, value in want["postprocess"].items():
        assert getattr(pp, key) == value, key
    # SSDMatcher(0.5): each gt's best anchor, then IoU >= 0.5, every other anchor background
    matcher = build_component(MATCHERS, plain(cfg.matcher))
    assert (matcher.matching, matcher.pos_iou_threshold, matcher.neg_iou_limit) == (
        "multi",
        0.5,
        0.5,
    )


@pytest.mark.parametrize("name", NAMES)
def test_coco_anchors_are_torchvisions_default_boxes(name):
    cfg = experiment(name)
    want = DETECTORS[name]
    det = meta_detector(detector_spec(cfg))
    ours = det.anchor_generator.grid(det.feature_sizes).flat(dtype=torch.float64)  # [A, 4]
    h, w = want["image_size"]
    generator = DefaultBoxGenerator(**want["torchvision_anchors"])  # clip=True by default
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    features = [torch.zeros(1, 1, fh, fw) for fh, fw in want["feature_sizes"]]
    theirs = generator(images, features)[0].double()  # [A, 4] xyxy pixels of the image
    assert theirs.shape == ours.shape == (want["anchors"], 4)
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    # the same boxes in the same order (torchvision computes in float32: 4e-5 px)
    torch.testing.assert_close(convert(ours, "cxcywh", "xyxy"), theirs / scale, rtol=0, atol=1e-6)
    # a few by hand: the first cell (centre 4 px / 8 px), the last level clipped in size
    if name == "ssd300_coco":
        first = [[-6.5, -6.5, 14.5, 14.5]]  # 0.07 x 300 = 21 px around (4, 4)
        last = [[0.0, 150 - 0.87 * 150 / 2**0.5, 300.0, 150 + 0.87 * 150 / 2**0.5]]  # ratio 2
        assert det.anchor_generator.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]
    else:
        first = [[-24.0, -24.0, 40.0, 40.0]]  # 0.2 x 320 = 64 px around (8, 8)
        last = [[0.0, 160 - 0.95 * 160 / 3**0.5, 320.0, 160 + 0.95 * 160 / 3**0.5]]  # ratio 3
        assert det.anchor_generator.num_anchors_per_location() == [6] * 6
    ours_px = convert(ours, "cxcywh", "xyxy") * scale
    torch.testing.assert_close(ours_px[:1], torch.tensor(first, dtype=torch.float64))
    torch.testing.assert_close(ours_px[-2:-1], torch.tensor(last, dtype=torch.float64))


@pytest.mark.parametrize(
    "name, arch",
    [("ssd300_coco", "ssd300_vgg16"), ("ssdlite320_coco", "ssdlite320_mobilenet_v3_large")],
)
def test_coco_experiments_build_what_the_zoo_converts(name, arch):
    # ssdlit.zoo's spec of torchvision's architecture (what from_torchvision loads the COCO
    # weights into) and the experiment's detector agree in everything but ssd300_coco's
    # normalisation (its documented deviation: IMAGENET1K_V1 with the ImageNet statistics).
    zoo = pytest.importorskip("ssdlit.zoo.torchvision")
    cfg = experiment(name)
    ours = meta_detector(detector_spec(cfg))
    spec = zoo.detector_spec(arch, 80)
    theirs = meta_detector({k: v for k, v in spec.items() if k != "num_classes"})

    def described(det: Detector) -> dict:
        loss = det.head.criterion
        return {
            "image_size": det.image_size,
            "anchors": det.anchor_generator.grid(det.feature_sizes).flat(dtype=torch.float64),
            "out_channels": det.backbone.out_channels,
            "head": type(det.head).__name__,
            "loss": (list(loss.coder.variances), loss.neg_pos_ratio, loss.n_neg_min, loss.mining),
            "postprocess": (type(det.postprocess).__name__, vars(det.postprocess)),
            "clip_boxes": det.clip_boxes,
        }

    a, b = described(ours), described(theirs)
    torch.testing.assert_close(a.pop("anchors"), b.pop("anchors"), rtol=0, atol=0)
    assert a == b
    assert plain(cfg.matcher) == spec["matcher"]
    normalization = (ours.backbone.mean, ours.backbone.std)
    if name == "ssd300_coco":
        assert (theirs.backbone.mean, theirs.backbone.std) == CAFFE
        assert normalization == IMAGENET
    else:
        assert normalization == (theirs.backbone.mean, theirs.backbone.std) == UNIT


# -- evaluation on COCO-format data --------------------------------------------------------

#: Category ids with gaps, listed out of order: labels follow the sorted ids (cat 3, dog 7).
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
CATEGORY_IDS = [3, 7]
#: (width, height) of the val images: none is the network's 64x64.
SIZES = [(80, 48), (48, 64), (96, 72), (64, 40)]


def _coco_val(root: Path, annotations: list[dict]) -> Path:
    """``root/annotations/instances_val2017.json`` over the images in ``root/val2017``."""
    images = [
        {"id": 10 + i, "file_name": f"{i:012d}.png", "width": w, "height": h}
        for i, (w, h) in enumerate(SIZES)
    ]
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    return write_coco(root / "annotations" / "instances_val2017.json", data)


def _detections(module: DetectionModule, root: Path) -> list[dict]:
    """The module's detections of the val images, as evaluate computes them (resize to the
    input, original pixels): COCO results (image id, category id, xywh, score)."""
    from ssdlit.datamodules import build_datamodule
    from ssdlit.metrics.evaluator import batch_to_metric_inputs

    source = {
        "name": "coco",
        "annotation_file": str(root / "annotations" / "instances_val2017.json"),
        "images_dir": str(root / "val2017"),
    }
    data = {"source": source, "val": {}, "eval_batch_size": 3, "num_workers": 0}
    dm = build_datamodule(data, {"eval": {"name": "val"}}, module.detector.image_size, ["val"])
    dm.setup("validate")
    results = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            preds, _ = batch_to_metric_inputs(module(batch["images"]), batch)
            for meta, p in zip(batch["meta"], preds, strict=True):
                for box, score, label in zip(p["boxes"], p["scores"], p["labels"], strict=True):
                    x1, y1, x2, y2 = box.tolist()
                    results.append(
                        {
                            "image_id": int(meta["image_id"]),
                            "category_id": CATEGORY_IDS[int(label) - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score),
                        }
                    )
    return results


def _ground_truth(results: list[dict]) -> list[dict]:
    """Boxes at some of the model's own detections, so that its COCO AP is neither 0 nor 1:
    per image and category the best detection (images 10-12; 13 has no object), and the
    second best dog of image 10 as a crowd region (ignored, neither hit nor miss)."""
    anns: list[dict] = []

    def add(det: dict, crowd: int) -> None:
        x, y, w, h = det["bbox"]
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": crowd,
            }
        )

    for image_id in (10, 11, 12):
        for cat in CATEGORY_IDS:
            ranked = sorted(
                (r for r in results if (r["image_id"], r["category_id"]) == (image_id, cat)),
                key=lambda r: -r["score"],
            )
            ranked = [r for r in ranked if min(r["bbox"][2:]) > 2]  # no sliver boxes
            add(ranked[0], 0)
            if (image_id, cat) == (10, 7):
                add(ranked[1], 1)
    return anns


def _pycocotools(annotation_file: Path, results: list[dict]) -> tuple[list[float], dict]:
    """COCOeval's 12 numbers and the AP per category id, from the files as COCO gives them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] area all, 100 detections
    per_cat = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_cat[cat] = float(p[p > -1].mean())
    return [float(s) for s in ev.stats], per_cat


@pytest.mark.e2e  # the evaluate app with its Trainer (in this process)
def test_evaluate_reports_coco_map_on_coco_data(tmp_path, tiny):
    from ssdlit.apps.evaluate import main as evaluate_main
    from tests.test_apps import run_app

    # A tiny checkpoint, untrained: the tiny run's model (tests/conftest.py) for cat and dog.
    torch.manual_seed(0)
    module = DetectionModule.from_config(compose_cfg(list(tiny.train)), ["cat", "dog"]).eval()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    # COCO-format data: noise images (PNG: decoded exactly), first without annotations to
    # learn what the model detects, then with objects at some of its detections.
    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / f"{i:012d}.png")
    _coco_val(root, [])
    module = DetectionModule.from_checkpoint(ckpt).eval()  # as evaluate loads it
    results = _detections(module, root)
    annotation_file = _coco_val(root, _ground_truth(results))

    out = tmp_path / "metrics.json"
    run = run_app(
        evaluate_main,
        "ssdlit.evaluate",
        [
            f"ckpt={ckpt}",
            "data=coco",
            f"data.root={root}",
            "split=val",
            *tiny.loader,
            "data.pin_memory=false",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"output={out}",
            f"hydra.run.dir={tmp_path}/evaluate",
        ],
    ).check()
    assert "COCO mAP@[.5:.95]" in run.stdout
    written = json.loads(out.read_text())
    assert (written["split"], written["images"]) == ("val", len(SIZES))
    assert written["class_names"] == ["cat", "dog"]  # the categories in id order
    summary = written["summary"]

    stats, per_cat = _pycocotools(annotation_file, results)
    assert 0.05 < stats[0] < 0.95  # a real number: neither nothing nor everything found
    assert summary["coco_map"] == pytest.approx(stats[0], abs=1e-6)
    assert summary["coco_map50"] == pytest.approx(stats[1], abs=1e-6)
    assert summary["coco_map75"] == pytest.approx(stats[2], abs=1e-6)
    assert summary["coco_mar100"] == pytest.approx(stats[8], abs=1e-6)
    for name, cat in (("cat", 3), ("dog", 7)):
        assert written["per_class"][name]["coco_ap"] == pytest.approx(per_cat[cat], abs=1e-6)
