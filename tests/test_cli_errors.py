"""Every app ends a user error with one line on stderr and exit status 2.

Each case runs the real command line (``python -m ssdlit.<app>``) in a subprocess; all of
them start together (a module fixture) and each test checks one. The user errors: a config
key that does not exist, bad data (a malformed annotation found when parsing, and an image
that cannot be decoded, found inside Lightning's datamodule setup), a missing checkpoint,
a file that is not an ssdlit checkpoint, classes that differ between the checkpoint and
the data, an option a component does not take and a value it refuses.
``HYDRA_FULL_ERROR=1`` still shows the traceback. (Interpreter start-up is most
of the cost, so the cases spread over the apps rather than repeat each error per app;
``predict``'s are in test_apps.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.data_builders import add_flat_item, corrupt_jpeg

#: Runs through the command line or a real Trainer: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

CONF = Path(__file__).resolve().parents[1] / "conf"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)


@dataclass
class Done:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"{' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{self.stderr[-3000:]}"
        )


def flat_voc(root: Path, n: int = 6) -> Path:
    """A flat VOC folder (images/, annotations/) of ``n`` images of cats and dogs."""
    for i in range(n):
        add_flat_item(root, f"img{i}", [{"name": "cat" if i % 2 else "dog", "box": (2, 2, 20, 16)}])
    return root


def flat_data(root: Path, tiny) -> list[str]:
    """The data overrides of the flat VOC folder ``root`` (any app), loaded as in the tiny
    run (tests/conftest.py) in batches of 2."""
    return [
        "data=voc_folder",
        f"data.root={root}",
        "data.val={}",  # validate on the same images
        *tiny.replace(tiny.loader, "data.batch_size=2"),
    ]


def other_classes_checkpoint(path: Path) -> Path:
    """A valid ssdlit checkpoint (untrained) whose classes are bird and fish."""
    from ssdlit.module import DetectionModule

    def group(name: str) -> dict:
        return OmegaConf.to_container(OmegaConf.load(CONF / name), resolve=True)

    module = DetectionModule(
        class_names=["bird", "fish"],
        image_size=[64, 64],
        backbone=group("backbone/ssd7_small.yaml"),
        anchors=group("anchors/shapes.yaml"),
        head=group("head/ssd.yaml"),
        matcher=group("matcher/ssd.yaml"),
    )
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Done]:
    tmp = tmp_path_factory.mktemp("cli_errors")
    good = flat_voc(tmp / "good")
    bad_xml = flat_voc(tmp / "bad_xml")
    (bad_xml / "annotations" / "img3.xml").write_text("<annotation><object>", encoding="utf-8")
    bad_image = flat_voc(tmp / "bad_image")
    corrupt_jpeg(bad_image / "images" / "img3.jpg")
    ckpt = other_classes_checkpoint(tmp / "birds.ckpt")
    not_ckpt = tmp / "notes.ckpt"
    torch.save({"weights": torch.zeros(3)}, not_ckpt)

    cases: dict[str, tuple[str, list[str], dict[str, str]]] = {
        "unknown_key": ("train", ["no_such_key=1"], {}),
        "unknown_key_full_error": ("train", ["no_such_key=1"], {"HYDRA_FULL_ERROR": "1"}),
        "option_the_component_does_not_take": ("train", ["+head.no_such_option=1"], {}),
        "flat_folder_as_a_devkit": ("inspect", ["data=voc", f"data.root={good}"], {}),
        "value_the_component_refuses": ("train", ["anchors.scales=[0.1,0.2]"], {}),
        "undecodable_image_in_setup": (
            "train",
            [
                *flat_data(bad_image, tiny),
                *tiny.train,
                "data.source.on_bad=error",
                "++data.source.check_images=header",
                "data.cache_images=true",  # decoded in the datamodule's setup (a Lightning hook)
            ],
            {},
        ),
        "not_a_checkpoint": ("evaluate", [f"ckpt={not_ckpt}", *flat_data(good, tiny)], {}),
        "classes_differ": ("evaluate", [f"ckpt={ckpt}", *flat_data(good, tiny)], {}),
        "export_missing_checkpoint": ("export", [f"ckpt={tmp}/no/such.ckpt"], {}),
        "inspect_bad_xml": (
            "inspect",
            [*flat_data(bad_xml, tiny), "data.source.on_bad=error"],
            {},
        ),
    }
    procs = {}
    for name, (app, args, env) in cases.items():
        argv = [sys.executable, "-m", f"ssdlit.{app}", *args, f"hydra.run.dir={tmp}/{name}"]
        procs[name] = subprocess.Popen(
            argv,
            cwd=tmp,
            env={**ENV, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = Done([str(a) for a in proc.args], proc.returncode, out, err)
    return done


def one_line_error(run: Done, app: str) -> str:
    """The run ended with exit status 2 and one ``ssdlit.<app>: ...`` line, no traceback."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith(f"ssdlit.{app}: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], run
    return ours[0]


def test_unknown_config_key(runs) -> None:
    line = one_line_error(runs["unknown_key"], "train")
    assert "no_such_key" in line


def test_option_a_component_does_not_take(runs) -> None:
    line = one_line_error(runs["option_the_component_does_not_take"], "train")
    assert "head 'ssd'" in line and "no_such_option" in line


def test_value_a_component_refuses(runs) -> None:
    line = one_line_error(runs["value_the_component_refuses"], "train")
    assert "anchor" in line and "levels" in line


def test_a_flat_folder_given_as_a_devkit_says_how_to_read_it(runs) -> None:
    line = one_line_error(runs["flat_folder_as_a_devkit"], "inspect")
    assert "VOC2007" in line and "data=voc_folder" in line


def test_full_error_shows_the_traceback(runs) -> None:
    run = runs["unknown_key_full_error"]
    assert run.returncode != 0 and "Traceback" in run.stderr, run
    assert "no_such_key" in run.stderr


def test_undecodable_image_inside_a_lightning_hook(runs) -> None:
    line = one_line_error(runs["undecodable_image_in_setup"], "train")
    assert "img3.jpg" in line


def test_missing_checkpoint(runs) -> None:
    line = one_line_error(runs["export_missing_checkpoint"], "export")
    assert "checkpoint not found" in line and "such.ckpt" in line


def test_not_an_ssdlit_checkpoint(runs) -> None:
    line = one_line_error(runs["not_a_checkpoint"], "evaluate")
    assert "notes.ckpt" in line


def test_classes_differ_between_checkpoint_and_data(runs) -> None:
    line = one_line_error(runs["classes_differ"], "evaluate")
    assert "bird" in line and "cat" in line


def test_inspect_bad_annotation(runs) -> None:
    line = one_line_error(runs["inspect_bad_xml"], "inspect")
    assert "img3.xml" in line
