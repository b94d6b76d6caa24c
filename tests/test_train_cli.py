"""End to end through the real command lines: train two epochs, then evaluate."""

import json
import os
import subprocess
import sys

import pytest
import torch

TINY = [
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "image_size=[64,64]",
    "data.source.image_size=64",
    "data.source.num_images={train: 8, val: 8, test: 8}",
]


def run(module, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,  # configs must be found from any working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    run("ssdlit.train", [*TINY, f"data.source.root={tmp}/data", f"hydra.run.dir={tmp}/run"], tmp)
    return tmp


def test_train_leaves_a_complete_run_folder(trained):
    run_dir = trained / "run"
    for name in (
        "config.yaml",
        "metrics.json",
        "predictions.png",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 4
    for split in ("val", "test"):
        summary = metrics[split]["summary"]
        for key in ("voc07_map50", "voc_map50", "coco_map"):
            assert 0.0 <= summary[key] <= 1.0
        assert set(metrics[split]["per_class"]) == set(metrics["class_names"])
    # The checkpoint loads with weights_only=True (plain containers only).
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "state_dict" in ckpt


def test_evaluate_reads_the_checkpoint(trained):
    out = trained / "eval.json"
    ckpt = trained / "run" / "checkpoints" / "best.ckpt"
    proc = run(
        "ssdlit.evaluate",
        [
            f"ckpt={ckpt}",
            f"data.source.root={trained}/data",
            "data.source.image_size=64",
            "data.source.num_images={train: 8, val: 8, test: 8}",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "split=test",
            f"output={out}",
            f"hydra.run.dir={trained}/eval",
        ],
        trained,
    )
    result = json.loads(out.read_text())
    text = json.dumps(result)
    assert "voc07_map50" in text and "coco_map" in text
    assert "VOC07" in proc.stdout + proc.stderr  # the per-class table is printed
    # The same checkpoint on the same split gives what train reported for it.
    trained_metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert result["split"] == "test" and result["images"] == 8
    for key, value in trained_metrics["test"]["summary"].items():
        assert result["summary"][key] == pytest.approx(value, abs=1e-6), key


def test_tensorboard_holds_losses_lr_maps_and_pictures(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {"scalars": [], "images": [], "tensors": []}
    for events in (trained / "run" / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] += acc.Tags().get(kind, [])
    scalars = set(tags["scalars"])
    for tag in (
        "train/loss_step",
        "train/loss_cls_step",
        "train/loss_box_step",
        "train/images_per_sec",
        "val/loss",
        "val/voc07_map50",
        "val/voc_map50",
        "val/coco_map",
        "val_ap/voc07_ap50/circle",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(t.startswith("lr-") for t in scalars)
    assert "val/predictions" in tags["images"]


def test_bad_override_fails_with_a_clear_message(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssdlit.train",
            "head=no_such_head",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no_such_head" in proc.stderr


def test_ema_weights_are_validated_saved_and_resumed(tmp_path):
    """callbacks.ema: the checkpoint's state_dict holds the averaged weights, the raw ones
    and the averaging state beside them, and ckpt_path=last resumes both."""
    run_dir = tmp_path / "run"
    common = [
        *TINY,
        f"data.source.root={tmp_path}/data",
        f"hydra.run.dir={run_dir}",
        "callbacks.ema={decay: 0.9, warmup_steps: 2}",
        "evaluate.test=false",
    ]
    run("ssdlit.train", [*common, "trainer.max_epochs=1"], tmp_path)
    run("ssdlit.train", [*common, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4  # one update per step, resumed
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    weights = [k for k, v in raw.items() if v.is_floating_point()]
    assert any(not torch.equal(averaged[k], raw[k]) for k in weights)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["summary"]["voc07_map50"] <= 1.0
