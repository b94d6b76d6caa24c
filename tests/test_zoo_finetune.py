"""Fine-tuning from torchvision's COCO detectors: ``init_from=`` a name or a ``.pth`` file.

The weights are torchvision's SSDLite320 with random weights saved to disk (no network);
the rows of the classes the data shares with COCO by name are carried over.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from ssdlit.module import DetectionModule
from ssdlit.zoo import coco_class_names, detector_spec
from ssdlit.zoo.loading import init_from_torchvision, module_from_torchvision
from tests.data_builders import raccoon_dataset

ARCH = "ssdlite320_mobilenet_v3_large"
CLS = "head.classification_head.module_list.{}.1.{}"  # torchvision's 1x1 class convolutions


@pytest.fixture(scope="module")
def ssdlite_file(tmp_path_factory):
    """A COCO-shaped (91 outputs) torchvision SSDLite320 with random weights, as a .pth."""
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("zoo") / "ssdlite.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def module(class_names, **backbone):
    spec = detector_spec(ARCH, len(class_names), reduced_tail=True)
    spec.pop("num_classes")
    spec["backbone"].update(backbone)
    return DetectionModule(class_names=class_names, **spec)


@pytest.mark.slow
def test_classes_shared_by_name_keep_cocos_rows(ssdlite_file):
    path, state = ssdlite_file
    m = module(["cat", "raccoon", "dog"])
    report = init_from_torchvision(m, path)
    assert "kept 2 of the file's 80 classes (cat, dog), new: raccoon" in report
    coco = {name: i + 1 for i, name in enumerate(coco_class_names()) if name != "N/A"}
    own = m.state_dict()
    for level, n in enumerate(m.detector.anchor_generator.num_anchors_per_location()):
        for part in ("weight", "bias"):
            theirs = state[CLS.format(level, part)].reshape(n, 91, -1)
            ours = own[f"detector.head.cls_predictors.{level}.3.{part}"].reshape(n, 4, -1)
            assert torch.equal(ours[:, 0], theirs[:, 0])  # background
            assert torch.equal(ours[:, 1], theirs[:, coco["cat"]])
            assert torch.equal(ours[:, 3], theirs[:, coco["dog"]])
    box = "head.regression_head.module_list.0.1.weight"
    assert torch.equal(own["detector.head.box_predictors.0.3.weight"], state[box])


@pytest.mark.slow
def test_another_network_is_refused_with_the_experiment_that_fits(ssdlite_file):
    path, _ = ssdlite_file
    with pytest.raises(
        ValueError, match=r"normalization='imagenet' \(needs 'unit'\).*finetune_ssdlite"
    ):
        init_from_torchvision(module(["dog"], normalization="imagenet"), path)
    with pytest.raises(ValueError, match=r"reduced_tail=False \(needs True\)"):
        init_from_torchvision(module(["dog"], reduced_tail=False), path)


@pytest.mark.slow
def test_a_module_of_the_files_own_classes(ssdlite_file):
    path, state = ssdlite_file
    m = module_from_torchvision(path)
    assert m.class_names == coco_class_names() and not m.training
    key = CLS.format(0, "weight")
    assert torch.equal(m.state_dict()["detector.head.cls_predictors.0.3.weight"], state[key])
    sub = module_from_torchvision(path, ["dog", "person"])
    assert sub.class_names == ["dog", "person"]
    with pytest.raises(ValueError, match="has no class named raccoon"):
        module_from_torchvision(path, ["raccoon"])


@pytest.mark.e2e
def test_finetune_experiment_runs_from_a_torchvision_file(ssdlite_file, tmp_path):
    """``python -m ssdlit.train +experiment=finetune_ssdlite data=raccoon init_from=PATH.pth``
    (two steps at learning rate 0: the network afterwards is the file's)."""
    path, state = ssdlite_file
    root = raccoon_dataset()
    args = [
        "+experiment=finetune_ssdlite",
        "data=raccoon",
        f"data.root={root}",
        f"init_from={path}",
        "data.batch_size=2",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.cache_images=false",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "metrics.coco=false",
        "picture.enabled=false",
        "optim.lr=0",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "ssdlit.train", *args],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"init_from {path} ({ARCH}): kept 0 of the file's 80 classes (-), new: raccoon" in log
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    trained = ckpt["state_dict"]
    for tv_key, key in (
        ("backbone.features.0.0.0.weight", "detector.backbone.c4.0.0.weight"),
        ("backbone.extra.3.2.0.weight", "detector.backbone.extras.3.2.0.weight"),
        ("head.regression_head.module_list.5.1.bias", "detector.head.box_predictors.5.3.bias"),
    ):
        assert torch.equal(trained[key], state[tv_key]), key


@pytest.mark.e2e  # the apps with their Trainer (in this process)
def test_evaluate_and_predict_take_a_torchvision_file(ssdlite_file, tmp_path, tiny):
    """``ckpt=PATH.pth`` of torchvision's COCO SSDLite: evaluate on COCO-format data of two
    COCO categories takes those two classes from the file by name; predict names COCO's."""
    import json

    import numpy as np
    from PIL import Image

    from ssdlit.apps.evaluate import main as evaluate_main
    from ssdlit.apps.predict import main as predict_main
    from tests.data_builders import write_coco
    from tests.test_apps import run_app

    path, _ = ssdlite_file
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(
            root / "val2017" / f"{i}.png"
        )
        images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 60})
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 18 if i % 2 else 17,
                "bbox": [10, 8, 40, 30],
                "area": 1200,
                "iscrowd": 0,
            }
        )
    categories = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    write_coco(
        root / "annotations" / "instances_val2017.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )
    out = tmp_path / "metrics.json"
    common = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    run_app(
        evaluate_main,
        "ssdlit.evaluate",
        [
            f"ckpt={path}",
            "data=coco",
            f"data.root={root}",
            "split=val",
            *tiny.loader,
            "data.pin_memory=false",
            *common,
            f"output={out}",
            f"hydra.run.dir={tmp_path}/evaluate",
        ],
    ).check()
    written = json.loads(out.read_text())
    assert written["class_names"] == ["cat", "dog"] and written["images"] == 3
    assert set(written["per_class"]) == {"cat", "dog"}

    run_app(
        predict_main,
        "ssdlit.predict",
        [
            f"ckpt={path}",
            f"input={root / 'val2017' / '0.png'}",
            "score_threshold=0.005",
            f"hydra.run.dir={tmp_path}/p",
        ],
    ).check()
    result = json.loads((tmp_path / "p" / "0.json").read_text())
    assert result["detections"] and all(
        d["label"] == coco_class_names()[d["label_id"] - 1] for d in result["detections"]
    )
