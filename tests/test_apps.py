"""The apps end to end, through their command lines: train, predict, export, inspect.

A module-scoped fixture trains a tiny model once (1 epoch of 2 batches on 16 synthetic
images) with ``python -m ssdlit.train`` in a subprocess while ``inspect draw=2`` runs in
this process; then ``python -m ssdlit.predict`` on a folder starts in the background on
the checkpoint, and meanwhile the single-image prediction, the export and the error cases
run in this process. In-process runs call the app's Hydra ``main`` with
``sys.argv`` set as the command line would (the same code path; the interpreter start-up,
most of the cost on a small machine, is paid once). Every process uses one thread
(``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Runs through the command line or a real Trainer: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
TIMEOUT = 300
SCORE_THRESHOLD = 0.05  # low: even the barely trained model has detections above it
ODD_SIZE = (200, 96)  # (width, height) of an image the network sees stretched to 64x64


@dataclass
class Run:
    """One finished command: its arguments, exit status and output."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Run:
        assert self.returncode == 0, (
            f"{' '.join(self.args)} exited with {self.returncode}\n"
            f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"
        )
        return self


def start(module: str, overrides: Sequence[str], cwd: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", module, *overrides]
    return subprocess.Popen(
        args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> Run:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Run([str(a) for a in proc.args], proc.returncode, out, err)


class Apps:
    """The trained checkpoint, the test images and the commands run on them.

    Commands started with :meth:`start` run in the background; :meth:`result` waits for
    one (once) and returns its :class:`Run`.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.ckpt = tmp / "run" / "checkpoints" / "best.ckpt"
        self.photos = tmp / "photos"
        self.single = self.photos / "set-by-the-fixture.jpg"
        self._procs: dict[str, subprocess.Popen] = {}
        self._runs: dict[str, Run] = {}
        self.inspect: Run | None = None

    def start(self, name: str, module: str, overrides: Sequence[str]) -> None:
        self._procs[name] = start(module, overrides, self.tmp)

    def result(self, name: str) -> Run:
        if name not in self._runs:
            self._runs[name] = finish(self._procs.pop(name))
        return self._runs[name]

    def close(self) -> None:
        for proc in self._procs.values():
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory, tiny) -> Iterator[Apps]:
    apps = Apps(tmp_path_factory.mktemp("apps"))
    tmp = apps.tmp
    overrides = tiny.run(
        apps.data,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.cache_images=false",
        "callbacks.image_logger=null",
        "evaluate.val=false",
        "evaluate.test=false",
    )
    apps.start("train", "ssdlit.train", [*overrides, f"hydra.run.dir={tmp}/run"])
    try:
        # Inspect (its own small dataset) runs in this process while the model trains.
        from ssdlit.apps.inspect import main as inspect_main

        apps.inspect = run_app(
            inspect_main,
            "ssdlit.inspect",
            [
                "draw=2",
                f"data.source.root={tmp}/inspect_data",
                "data.source.num_images={train: 8, val: 4, test: 4}",
                f"hydra.run.dir={tmp}/inspect",
            ],
        )
        apps.result("train").check()
        assert apps.ckpt.is_file(), sorted(p.name for p in (tmp / "run").rglob("*"))
        # Test images: two synthetic JPEGs, one 200x96 PNG, and a file that is no image.
        apps.photos.mkdir()
        val_images = sorted((apps.data / "JPEGImages").glob("val_*.jpg"))[:2]
        for path in val_images:
            shutil.copy(path, apps.photos / path.name)
        Image.open(val_images[0]).convert("RGB").resize(ODD_SIZE).save(apps.photos / "odd.png")
        (apps.photos / "notes.txt").write_text("not an image\n")
        apps.single = apps.photos / val_images[1].name
        # Predict on the folder runs in the background while the tests below run the
        # other commands in this process.
        apps.start(
            "predict_folder",
            "ssdlit.predict",
            [
                f"ckpt={apps.ckpt}",
                f"input={apps.photos}",
                f"score_threshold={SCORE_THRESHOLD}",
                f"output={tmp}/pred_folder",
                f"hydra.run.dir={tmp}/pred_folder_run",
            ],
        )
        yield apps
    finally:
        apps.close()


def run_app(main: Callable[[], object], module: str, overrides: Sequence[str]) -> Run:
    """Run a Hydra app's ``main`` in this process, as ``python -m module overrides`` would
    (``sys.argv`` set, stdout and stderr captured, ``SystemExit`` turned into the status)."""
    from hydra.core.global_hydra import GlobalHydra

    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.argv = [module, *overrides]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        # Leave no trace for other tests: Hydra's global state (the compose API refuses to
        # initialise twice) and the logging handlers its job configured.
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return Run([module, *overrides], code, out.getvalue(), err.getvalue())


def check_prediction(json_path: Path, image_path: Path, class_names: Sequence[str]) -> dict:
    """The JSON of one image: original size, boxes inside it, known classes, sorted scores."""
    result = json.loads(json_path.read_text())
    width, height = Image.open(image_path).size
    assert (result["width"], result["height"]) == (width, height)
    assert Path(result["image"]).resolve() == image_path.resolve()
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)
    assert all(s >= SCORE_THRESHOLD for s in scores)
    for d in result["detections"]:
        assert d["label"] in class_names
        assert class_names[d["label_id"] - 1] == d["label"]
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, d
    picture = Path(result["picture"])
    assert picture.is_file() and picture.suffix == ".png"
    assert Image.open(picture).size == (width, height)  # drawn on the original image
    return result


def class_names_of(apps: Apps) -> list[str]:
    metrics = json.loads((apps.tmp / "run" / "metrics.json").read_text())
    return metrics["class_names"]


def test_predict_single_image_into_the_run_folder(apps: Apps) -> None:
    from ssdlit.apps.predict import main

    out = apps.tmp / "pred_single"
    overrides = [
        f"ckpt={apps.ckpt}",
        f"input={apps.single}",
        f"score_threshold={SCORE_THRESHOLD}",
        f"hydra.run.dir={out}",
    ]
    run = run_app(main, "ssdlit.predict", overrides).check()
    check_prediction(out / f"{apps.single.stem}.json", apps.single, class_names_of(apps))
    assert len(list(out.glob("*.json"))) == 1
    assert run.stdout.count(f"{apps.single.name}: ") == 1


def test_missing_checkpoint_is_a_clear_error(apps: Apps) -> None:
    from ssdlit.apps.predict import main

    missing = apps.tmp / "no" / "such" / "model.ckpt"
    overrides = [f"ckpt={missing}", f"input={apps.photos}", f"hydra.run.dir={apps.tmp}/err1"]
    run = run_app(main, "ssdlit.predict", overrides)
    assert run.returncode == 2, run
    assert "checkpoint not found" in run.stderr and str(missing) in run.stderr
    assert "Traceback" not in run.stderr


def test_glob_matching_nothing_is_a_clear_error(apps: Apps) -> None:
    from ssdlit.apps.predict import main

    pattern = f"{apps.photos}/*.gif"
    overrides = [f"ckpt={apps.ckpt}", f"input={pattern}", f"hydra.run.dir={apps.tmp}/err2"]
    run = run_app(main, "ssdlit.predict", overrides)
    assert run.returncode == 2, run
    assert pattern in run.stderr and "matches no image files" in run.stderr
    assert "Traceback" not in run.stderr


def test_export_onnx_and_torchscript_verified(apps: Apps) -> None:
    from ssdlit.apps.export import main

    out = apps.tmp / "exported"
    overrides = [
        f"ckpt={apps.ckpt}",
        "format=both",
        f"data.source.root={apps.data}",
        f"output={out}",
        f"hydra.run.dir={apps.tmp}/export_run",
    ]
    run = run_app(main, "ssdlit.export", overrides).check()
    report = json.loads((out / "export.json").read_text())
    assert report["verified"] is True
    assert "val split" in report["samples"]  # the synthetic data was there: real images
    for kind in ("onnx", "torchscript"):
        entry = report["files"][kind]
        assert Path(entry["path"]).is_file() and entry["verified"], entry
        assert entry["verification"]["max_score_diff"] <= 1e-4
        assert str(entry["path"]) in run.stdout
    assert "verified (onnxruntime vs PyTorch)" in run.stdout

    import onnxruntime as ort

    session = ort.InferenceSession(
        report["files"]["onnx"]["path"], providers=["CPUExecutionProvider"]
    )
    h, w = report["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (2, 3, h, w), dtype=np.uint8)
    (detections,) = session.run(None, {"images": images})
    assert detections.ndim == 2 and detections.shape[1] == 7
    assert set(np.unique(detections[:, 0]).tolist()) <= {0.0, 1.0}  # image index

    import torch
    import torchvision  # noqa: F401  (registers torchvision::nms, which the graph calls)

    scripted = torch.jit.load(report["files"]["torchscript"]["path"])
    out_ts = scripted(torch.from_numpy(images[:1]))
    assert out_ts.ndim == 2 and out_ts.shape[1] == 7


def test_inspect_prints_classes_coverage_and_draws(apps: Apps) -> None:
    assert apps.inspect is not None
    run = apps.inspect.check()
    out = apps.tmp / "inspect"
    for title in ("=== train:", "=== val:", "=== test:", "=== anchors:"):
        assert title in run.stdout
    assert "class" in run.stdout and "boxes  images difficult" in run.stdout
    report = json.loads((out / "inspect.json").read_text())
    for name in report["class_names"]:
        assert name in run.stdout
    assert "anchor coverage:" in run.stdout
    assert "box size" in run.stdout and "box aspect ratio" in run.stdout
    assert "images kept" in run.stdout  # the source's bad-record report
    assert 0.0 < report["anchors"]["recall"] <= 1.0
    drawn = sorted((out / "draw").glob("*.png"))
    assert len(drawn) == 2
    assert report["splits"]["train"]["images"] == 8


def test_predict_folder_writes_json_in_original_pixels_and_pictures(apps: Apps) -> None:
    run = apps.result("predict_folder").check()
    out = apps.tmp / "pred_folder"
    names = class_names_of(apps)
    images = sorted(p for p in apps.photos.iterdir() if p.suffix != ".txt")
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(p.stem for p in images)
    boxes = 0
    for image in images:
        result = check_prediction(out / f"{image.stem}.json", image, names)
        assert f"{image.name}: " in run.stdout  # one summary line per image
        boxes += len(result["detections"])
    assert boxes > 0, run.stdout
    # The 200x96 image: boxes are in its pixels, not the 64x64 network input's (nor
    # scaled by its height).
    odd = json.loads((out / "odd.json").read_text())
    assert (odd["width"], odd["height"]) == ODD_SIZE
    assert max(d["box"][2] for d in odd["detections"]) > max(64, ODD_SIZE[1])


def test_predict_on_an_unreadable_image_stops_or_leaves_it_out(apps: Apps) -> None:
    from ssdlit.apps.predict import main

    folder = apps.tmp / "photos_with_a_broken_one"
    folder.mkdir()
    good = sorted(p for p in apps.photos.iterdir() if p.suffix == ".jpg")
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    common = [f"ckpt={apps.ckpt}", f"input={folder}", "batch_size=2"]
    run = run_app(main, "ssdlit.predict", [*common, f"hydra.run.dir={apps.tmp}/bad1"])
    assert run.returncode == 2, run
    assert "broken.jpg" in run.stderr and "on_bad=skip" in run.stderr
    assert "Traceback" not in run.stderr
    out = apps.tmp / "bad2"
    overrides = [*common, "on_bad=skip", f"output={out}", f"hydra.run.dir={apps.tmp}/bad2run"]
    run = run_app(main, "ssdlit.predict", overrides)
    assert run.returncode == 0, run
    # Every readable image written once; the broken one left out and named in the log.
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"{p.stem}.json" for p in good)
    log = (apps.tmp / "bad2run" / "predict.log").read_text()
    assert "1 image(s) could not be read and were left out" in log and "broken.jpg" in log
