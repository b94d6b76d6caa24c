"""Every config group option and every experiment composes (Hydra's compose API) and
builds: components from the registries, the Detector for the base config and every
experiment, datamodules where the data can be made (or is) local. No forward pass
beyond the Detector's one-image probe, and no weight initialisation
(:func:`tests.fast_builds.no_weight_init`); ``pretrained`` stays false."""

from __future__ import annotations

import copy
import functools
import inspect
import json
from importlib import resources
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ssdlit.anchors.matching import MatchSampler
from ssdlit.config import plain
from ssdlit.datamodules import VOC_CLASSES, build_datamodule, split_specs, write_synthetic_voc
from ssdlit.detector import build_component
from ssdlit.module import DETECTOR_KEYS, DetectionModule
from ssdlit.registry import ANCHORS, BACKBONES, HEADS, MATCHERS, POSTPROCESS
from ssdlit.training.builders import build_loggers, build_trainer
from ssdlit.training.optim import configure_optimizer
from tests.data_builders import RACCOON_DEFAULT, require_dataset
from tests.fast_builds import no_weight_init

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RACCOON = RACCOON_DEFAULT
SHAPES = ["circle", "square", "triangle"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides: list[str] = (), config_name: str = "train"):
    """``compose(config_name, overrides)``, a fresh copy of a cached composition (composing
    costs a fraction of a second and many tests compose the same configs; interpolations,
    ``${oc.env:...}`` included, resolve on access, so the cache does not freeze them)."""
    return copy.deepcopy(_compose(tuple(overrides), config_name))


@functools.cache
def _compose(overrides: tuple[str, ...], config_name: str):
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def mandatory(cfg) -> set[str]:
    """The dotted keys of ``cfg`` still ``???`` (to give on the command line)."""
    found: set[str] = set()

    def walk(node, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if value == "???":
                found.add(f"{prefix}{key}")
            elif isinstance(value, (dict, list)):
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


@functools.cache
def _detector_for(key: str) -> DetectionModule:
    spec = json.loads(key)
    with no_weight_init():  # structure only: these modules never run their weights
        return DetectionModule.from_config(spec, spec.pop("class_names"))


def build_model(cfg, class_names) -> DetectionModule:
    """Build the module of ``cfg`` (cached per distinct model spec: builds cost a probe)."""
    spec = {k: plain(cfg.get(k)) for k in (*DETECTOR_KEYS, "optim", "metrics")}
    if "pretrained" in spec["backbone"]:
        assert spec["backbone"]["pretrained"] is False, "tests never download weights"
    return _detector_for(json.dumps({**spec, "class_names": list(class_names)}, sort_keys=True))


# -- packaging -----------------------------------------------------------------------------


def test_pyproject_lists_every_package_and_ships_the_configs():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO / "src").parts)
        for p in (REPO / "src" / "ssdlit").rglob("__init__.py")
    }
    assert found | {"ssdlit.conf"} == listed
    assert project["package-dir"]["ssdlit.conf"] == "conf"
    assert (CONF / "__init__.py").is_file()
    shipped = {f for pattern in project["package-data"]["ssdlit.conf"] for f in CONF.glob(pattern)}
    assert shipped == set(CONF.rglob("*.yaml"))  # every config file goes into the wheel
    # Installed (editable here), the package resolves to the configs from any directory.
    files = resources.files("ssdlit.conf")
    assert (files / "train.yaml").is_file() and (files / "experiment" / "raccoon.yaml").is_file()


def test_primary_configs_compose():
    # The base config is the demo: synthetic data, an SSD7, nothing mandatory left to give.
    cfg = compose_cfg()
    assert cfg.backbone.name == "ssd7" and cfg.anchors.name == "ssd" and cfg.head.name == "ssd"
    assert cfg.data.source.name == "synthetic"
    assert mandatory(cfg) == set()
    assert OmegaConf.select(cfg, "ckpt_path") is None
    ev = compose_cfg(["ckpt=x.ckpt"], config_name="evaluate")
    assert ev.split == "val" and ev.data.source.name == "synthetic"


# -- every option of every group ---------------------------------------------------------------


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options_build(name):
    cfg = compose_cfg([f"backbone={name}"])
    bb = build_component(BACKBONES, plain(cfg.backbone))
    assert len(bb.out_channels) >= 1 and getattr(bb, "pretrained", False) is False


@pytest.mark.parametrize("name", options("anchors"))
def test_anchor_options_build(name):
    cfg = compose_cfg([f"anchors={name}"])
    gen = build_component(ANCHORS, plain(cfg.anchors), image_size=(300, 300))
    per_level = gen.num_anchors_per_location()
    assert len(per_level) == gen.num_levels and min(per_level) >= 1


@pytest.mark.parametrize("name", options("head"))
def test_head_options_build(name):
    cfg = compose_cfg([f"head={name}"])
    head = build_component(
        HEADS,
        plain(cfg.head),
        in_channels=[16, 16, 16, 16],
        num_anchors=[4, 4, 4, 4],
        num_classes=3,
    )
    out = head.eval()([torch.zeros(1, 16, s, s) for s in (8, 4, 2, 1)])
    assert out["box_deltas"].shape == (1, 4 * (64 + 16 + 4 + 1), 4)


@pytest.mark.parametrize("group", ["matcher", "postprocess"])
def test_matcher_and_postprocess_options_build(group):
    registry = {"matcher": MATCHERS, "postprocess": POSTPROCESS}[group]
    for name in options(group):
        cfg = compose_cfg([f"{group}={name}"])
        spec = plain(cfg[group])
        if group == "matcher":  # the Detector's sampler option rides in the matcher group
            sampling = spec.pop("sampling", None)
            assert sampling is None or MatchSampler(**sampling)
        assert build_component(registry, spec) is not None


@pytest.mark.parametrize(
    "backbone, anchors, head, size",
    [
        pytest.param("mobilenet_v3_large", "ssdlite320", "ssdlite", 320, marks=pytest.mark.slow),
        pytest.param("resnet50", "ssd300", "ssd", 300, marks=pytest.mark.slow),
        ("ssd7", "ssd7", "retina", 96),
        ("ssd7", "ssd7", "yolo", 96),
        ("ssd7", "d2l", "ssd", 96),
    ],
)
def test_component_swaps_build_a_detector(backbone, anchors, head, size):
    cfg = compose_cfg(
        [
            f"backbone={backbone}",
            f"anchors={anchors}",
            f"head={head}",
            f"image_size=[{size},{size}]",
        ]
        + (["matcher=yolov3"] if head == "yolo" else [])
    )
    module = build_model(cfg, SHAPES)
    assert module.detector.anchors.shape[0] > 0


@pytest.mark.parametrize("name", options("augment"))
def test_augment_options_build(name, tmp_path):
    from ssdlit.datamodules import DetectionDataModule

    cfg = compose_cfg([f"augment={name}"])
    aug = plain(cfg.augment)
    dm = DetectionDataModule(
        class_names=SHAPES,
        image_size=64,
        augment={"train": aug["train"], "val": aug["eval"], "test": aug["eval"]},
    )
    assert dm.build_transform("train") is not None and dm.build_transform("val") is not None


@pytest.mark.parametrize("name", options("optim"))
def test_optim_options_build(name):
    cfg = compose_cfg([f"optim={name}"])
    opt_cfg = plain(cfg.optim)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer, scheduler = configure_optimizer(model, opt_cfg, total_steps=1000)
    assert scheduler is not None and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["weight_decay"] == opt_cfg["weight_decay"] > 0


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(name, tmp_path):
    cfg = compose_cfg([f"trainer={name}"])
    accepted = set(inspect.signature(pl.Trainer).parameters)
    assert set(cfg.trainer) <= accepted, set(cfg.trainer) - accepted
    if name in ("default", "cpu"):
        trainer = build_trainer(cfg.trainer, tmp_path)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(name, tmp_path):
    cfg = compose_cfg([f"logger={name}"])
    loggers = build_loggers(cfg.get("logger"), tmp_path)
    assert len(loggers) == len(plain(cfg.get("logger")) or {})


def _tiny_voc_devkit(root: Path) -> Path:
    """A VOCdevkit with VOC2007 (trainval, test) and VOC2012 (trainval) of synthetic shapes."""
    for year, splits in (("2007", {"trainval": 2, "test": 2}), ("2012", {"trainval": 2})):
        write_synthetic_voc(root / f"VOC{year}", num_images=splits, image_size=32, classes=SHAPES)
    return root


def _tiny_voc_folder(root: Path) -> Path:
    """A flat VOC folder (images/, annotations/) of 3 images, ids listed in train.txt / val.txt."""
    from tests.data_builders import add_flat_item

    for i, name in enumerate(("dog", "cat", "dog")):
        add_flat_item(root, f"img{i}", [{"name": name, "box": (2, 2, 20, 16)}])
    (root / "train.txt").write_text("img0\nimg1\n")
    (root / "val.txt").write_text("img2\n")
    return root


def _tiny_csv(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 80, 50, 90)).save(root / f"im{i}.jpg")
    rows = "filename,width,height,class,xmin,ymin,xmax,ymax\n"
    (root / "train.csv").write_text(
        rows + "im0.jpg,40,30,cat,2,3,20,25\nim1.jpg,40,30,dog,5,5,30,28\n"
    )
    (root / "val.csv").write_text(rows + "im1.jpg,40,30,cat,1,1,10,10\n")
    return root / "train.csv", root / "val.csv"


@pytest.mark.parametrize("name", options("data"))
def test_data_options(name, tmp_path):
    overrides = {
        "synthetic": [
            f"data.source.root={tmp_path}/syn",
            "data.source.num_images=2",
            "data.source.image_size=32",
        ],
        "voc": [f"data.root={tmp_path}/VOCdevkit", f"data.class_names=[{','.join(SHAPES)}]"],
        "csv": [f"data.train_csv={tmp_path}/csv/train.csv", f"data.val_csv={tmp_path}/csv/val.csv"],
        "coco": [f"data.root={tmp_path}/coco"],
        "raccoon": ["data.cache_images=false"],  # parse and count, do not decode
        "voc_folder": [
            f"data.root={tmp_path}/mine",
            "data.train.split_file=train.txt",
            "data.val={split_file: val.txt}",
        ],
    }[name]
    cfg = compose_cfg([f"data={name}", "data.num_workers=0", *overrides])
    specs = split_specs(cfg.data)
    assert specs["train"] is not None and specs["val"] is not None
    assert all(s is None or "name" in s for s in specs.values())
    if name == "voc":
        _tiny_voc_devkit(tmp_path / "VOCdevkit")
    elif name == "csv":
        _tiny_csv(tmp_path / "csv")
    elif name == "coco":
        assert specs["val"]["annotation_file"].endswith("instances_val2017.json")
        return  # no COCO on disk: composing and resolving is the check
    elif name == "voc_folder":
        _tiny_voc_folder(tmp_path / "mine")
    elif name == "raccoon":
        require_dataset(RACCOON, "the raccoon dataset")  # fails instead of skipping under CI
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    dm.setup("fit")
    assert len(dm.dataset("train")) > 0 and len(dm.dataset("val")) > 0
    expected = {
        "synthetic": None,
        "voc": SHAPES,
        "csv": ["cat", "dog"],
        "raccoon": ["raccoon"],
        "voc_folder": ["cat", "dog"],  # the names in the XML files, sorted
    }[name]
    if expected is not None:
        assert dm.class_names == expected
    if name == "voc_folder":  # the id lists split the folder
        assert (len(dm.dataset("train")), len(dm.dataset("val"))) == (2, 1)
    if name == "raccoon":
        assert (len(dm.dataset("train")), len(dm.dataset("val"))) == (160, 40)


def test_raccoon_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SSDLIT_RACCOON_DIR", raising=False)
    cfg = compose_cfg(["data=raccoon"])
    assert Path(cfg.data.root) == RACCOON.resolve()  # next to the checkout, from any cwd
    monkeypatch.setenv("SSDLIT_RACCOON_DIR", str(tmp_path))
    cfg = compose_cfg(["data=raccoon"])
    assert cfg.data.source.images_dir == f"{tmp_path}/images"
    assert compose_cfg(["data=raccoon", "data.root=/x"]).data.val.path == "/x/test_labels.csv"


# -- the base config (the demo) and every experiment ---------------------------------------


def test_experiments_do_not_inherit_the_demo_choices():
    # The demo picks a thin ReLU SSD7, flips only and AdamW; the paper-style experiments and
    # ssd_keras's SSD7 select their components themselves.
    demo = compose_cfg()
    assert demo.backbone.activation == "relu" and demo.augment.train.name == "light"
    assert demo.optim.name == "adamw"
    csv = compose_cfg(["+experiment=ssd7_csv"])
    assert csv.backbone.widths == [32, 48, 64, 64, 48, 48, 32] and csv.backbone.activation == "elu"
    assert csv.anchors.scales == [0.08, 0.16, 0.32, 0.64, 0.96] and csv.augment.train.name == "ssd"


def test_demo_config_builds_data_and_model(tmp_path):
    cfg = compose_cfg(
        [f"data.source.root={tmp_path}/syn", "data.source.num_images=2", "data.num_workers=0"]
    )
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    module = build_model(cfg, dm.class_names)
    assert module.detector.head.num_classes == 6 and tuple(module.detector.image_size) == tuple(
        cfg.image_size
    )
    assert cfg.callbacks.checkpoint.monitor == "val/voc07_map50"


EXPERIMENTS = options("experiment")


def test_all_experiments_are_listed():
    assert set(EXPERIMENTS) >= {
        "ssd300_voc",
        "ssd512_voc",
        "ssdlite_voc",
        "retina_voc",
        "yolo_voc",
        "ssd7_csv",
        "raccoon",
    }


#: Experiments on a full-size network (VGG-16, ResNet-50, MobileNetV3 at 300-512 px): their
#: builds cost seconds each, ``slow``.
FULL_SIZE = {
    "ssd300_voc",
    "ssd512_voc",
    "ssdlite_voc",
    "retina_voc",
    "yolo_voc",
    "ssd300_coco",
    "ssdlite320_coco",
    "finetune_ssd300",
    "finetune_ssdlite",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in FULL_SIZE else []) for n in EXPERIMENTS],
)
def test_experiment_composes_and_builds(name, tmp_path):
    probe = compose_cfg([f"+experiment={name}"])
    overrides = [f"+experiment={name}", "data.num_workers=0"]
    if "pretrained" in probe.backbone:
        overrides.append("backbone.pretrained=false")
    data_keys = set(probe.data.keys())  # `in` on a DictConfig is False for missing (???) values
    if "root" in data_keys and OmegaConf.is_missing(probe.data, "root"):
        overrides.append(f"data.root={tmp_path}")
    if probe.data.source.name == "csv" and "train_csv" in data_keys:
        train_csv, val_csv = _tiny_csv(tmp_path / "csv")
        overrides += [f"data.train_csv={train_csv}", f"data.val_csv={val_csv}"]
    cfg = compose_cfg(overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if cfg.data.source.name == "voc":
        classes = list(VOC_CLASSES)
    elif cfg.data.source.name == "csv" and (name != "raccoon" or RACCOON.is_dir()):
        dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size, splits=["val"])
        classes = dm.class_names
    else:
        classes = ["raccoon"]
    module = build_model(cfg, classes)
    assert module.detector.head.num_classes == len(classes)
    assert list(module.detector.image_size) == list(cfg.image_size)


def test_paper_recipes():
    for name, size, levels in (("ssd300_voc", 300, 6), ("ssd512_voc", 512, 7)):
        cfg = compose_cfg([f"+experiment={name}"])
        assert cfg.backbone.pretrained is True and list(cfg.image_size) == [size, size]
        assert len(cfg.anchors.scales) == levels + 1
        assert cfg.data.batch_size == 32 and cfg.optim.name == "sgd" and cfg.optim.lr == 1e-3
        assert cfg.optim.scheduler.milestones == [80000, 100000] and cfg.trainer.max_steps == 120000
        assert cfg.optim.scheduler.warmup_steps > 0 and cfg.data.source.name == "voc"
        assert (cfg.head.name, cfg.matcher.name, cfg.postprocess.name) == (
            "ssd",
            "ssd",
            "per_class",
        )
        assert cfg.augment.train.name == "ssd" and cfg.matcher.pos_iou_threshold == 0.5
        assert plain(cfg.data.train.splits) == [["2007", "trainval"], ["2012", "trainval"]]
        assert plain(cfg.data.val.splits) == [["2007", "test"]]


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search_options_compose(name):
    if name == "optuna":
        # optuna.yaml selects Hydra's Optuna sweeper (`override /hydra/sweeper: optuna`), a
        # plugin that is not a dependency of ssdlit: without it Hydra cannot compose this
        # one file, so it is skipped (not failed) unless hydra-optuna-sweeper is installed.
        pytest.importorskip(
            "hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed"
        )
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"+hparams_search={name}"], return_hydra_config=True)
    # The metric is one the train app returns: "split/name" of the evaluation summary.
    split, _, metric = str(cfg.optimized_metric).partition("/")
    assert split in ("val", "test") and metric in {
        "voc07_map50",
        "voc_map50",
        "coco_map",
        "coco_map50",
        "coco_map75",
        "coco_mar100",
    }
    sweeper = cfg.hydra.sweeper
    assert str(sweeper.direction) in ("maximize", "Direction.maximize")
    for key in sweeper.params:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key


def test_user_config_dir_on_the_search_path(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /head: ssdlite\ntask_name: mine\n"
    )
    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "+experiment=mine"])
    assert cfg.task_name == "mine" and cfg.head.name == "ssdlite"


def test_no_import_paths_in_component_configs():
    # Components are named by registry, never by import path (hparams_search configures
    # Hydra's own plugin and may).
    for path in CONF.rglob("*.yaml"):
        if "hparams_search" in path.parts:
            continue
        assert "_target_" not in path.read_text(), path


# -- the walk covers every group; experiments hold what differs ------------------------------

#: The groups the tests above walk (a new folder under conf/ needs its own check here).
WALKED_GROUPS = {
    "anchors",
    "augment",
    "backbone",
    "data",
    "experiment",
    "head",
    "hparams_search",
    "logger",
    "matcher",
    "optim",
    "paths",
    "postprocess",
    "trainer",
}


def test_every_config_group_is_walked():
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert groups == WALKED_GROUPS


@pytest.mark.parametrize("name", options("paths"))
def test_paths_options(name, monkeypatch, tmp_path):
    monkeypatch.delenv("SSDLIT_DATA_DIR", raising=False)
    assert compose_cfg([f"paths={name}"]).paths.data_dir == "data"
    monkeypatch.setenv("SSDLIT_DATA_DIR", str(tmp_path))
    cfg = compose_cfg([f"paths={name}"])
    assert cfg.paths.data_dir == str(tmp_path)
    assert cfg.data.source.root == f"{tmp_path}/synthetic"


@pytest.mark.parametrize("group", ["experiment", "hparams_search"])
def test_global_configs_declare_their_package(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first == "# @package _global_", f"{path.name} must start with '# @package _global_'"


def test_mandatory_values_of_the_experiments():
    expected = {
        "ssd300_voc": {"data.root"},
        "ssd512_voc": {"data.root"},
        "ssdlite_voc": {"data.root"},
        "retina_voc": {"data.root"},
        "yolo_voc": {"data.root"},
        "ssd7_csv": {"data.train_csv", "data.val_csv"},
        "raccoon": set(),  # the dataset's folder has a default
    }
    for name, keys in expected.items():
        assert mandatory(compose_cfg([f"+experiment={name}"])) == keys, name


def test_ssd300_recipe_keeps_the_papers_parts_of_the_base():
    # The paper's recipe, whatever the demo's base config selects.
    cfg = compose_cfg(["+experiment=ssd300_voc"])
    assert (
        cfg.backbone.name == "vgg16_ssd300"
        and cfg.anchors == compose_cfg(["anchors=ssd300"]).anchors
    )
    assert cfg.head == compose_cfg(["head=ssd"]).head  # the loss: tests/test_experiments.py
    assert list(cfg.head.variances) == [0.1, 0.1, 0.2, 0.2]
    assert cfg.matcher.name == "ssd" and cfg.matcher.pos_iou_threshold == 0.5
    assert cfg.augment.train.name == "ssd" and cfg.augment.train.max_zoom == 4.0
    assert cfg.postprocess.name == "per_class" and cfg.postprocess.iou_threshold == 0.45
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5e-4)
    assert cfg.optim.no_decay_norm_and_bias is True and cfg.optim.scheduler.name == "multistep"
    assert cfg.optim.scheduler.gamma == 0.1 and cfg.trainer.max_epochs is None


def test_paper_schedule_in_optimiser_steps(tmp_path):
    cfg = compose_cfg(
        ["+experiment=ssd300_voc", "backbone.pretrained=false", f"data.root={tmp_path}"]
    )
    # The experiment's optimiser config on any model: the schedule does not depend on it.
    model = torch.nn.Conv2d(3, 4, 3)
    _, scheduler = configure_optimizer(model, plain(cfg.optim), total_steps=120_000)
    warmup = cfg.optim.scheduler.warmup_steps

    def lr(step: int) -> float:
        return cfg.optim.lr * scheduler.lr_lambdas[0](step)

    assert lr(0) == pytest.approx(1e-3 * cfg.optim.scheduler.warmup_factor)
    assert lr(warmup) == pytest.approx(1e-3)
    assert [lr(s) for s in (79_999, 80_000, 99_999, 100_000, 119_999)] == pytest.approx(
        [1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    )


@pytest.mark.parametrize(
    "name, swapped",
    [
        ("ssd512_voc", {"backbone": "vgg16_ssd512", "anchors": "ssd512", "image_size": 512}),
        (
            "ssdlite_voc",
            {
                "backbone": "mobilenet_v3_large",
                "anchors": "ssdlite320",
                "head": "ssdlite",
                "image_size": 320,
            },
        ),
        ("retina_voc", {"anchors": "retina300", "head": "retina", "matcher": "retina"}),
        ("yolo_voc", {"anchors": "yolo300", "head": "yolo", "matcher": "yolov3"}),
    ],
)
def test_voc_variants_swap_components_of_the_ssd300_recipe(name, swapped):
    base = compose_cfg(["+experiment=ssd300_voc"])
    cfg = compose_cfg([f"+experiment={name}"])
    for key in ("data", "augment", "optim", "trainer", "postprocess", "callbacks", "metrics"):
        assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(base[key]), key
    assert cfg.backbone.pretrained is True
    for group in ("backbone", "anchors", "head", "matcher"):
        option = swapped.get(group)
        if option is None:
            assert cfg[group] == base[group], group
        else:
            option_cfg = compose_cfg([f"{group}={option}"])[group]
            stated = {}  # what the experiment states on top of the option
            if group == "backbone":
                stated = {"pretrained": True}
            assert OmegaConf.to_container(cfg[group]) == {
                **OmegaConf.to_container(option_cfg),
                **stated,
            }, group
    size = swapped.get("image_size", 300)
    assert list(cfg.image_size) == [size, size]


def test_raccoon_experiment_is_small_data_on_raccoon(monkeypatch):
    monkeypatch.delenv("SSDLIT_RACCOON_DIR", raising=False)
    cfg = compose_cfg(["+experiment=raccoon"])
    same = compose_cfg(["+experiment=small_data", "data=raccoon"])
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(same, resolve=True)
    assert Path(cfg.data.root) == RACCOON.resolve()
    assert cfg.data.train.path == f"{cfg.data.root}/train_labels.csv"
    # the test images choose nothing: validation is a share of the training images, and the
    # configured val file is served as the test split (tests/test_val_fraction.py)
    assert cfg.data.val.path == f"{cfg.data.root}/test_labels.csv" and cfg.data.test is None
    assert cfg.data.val_fraction == 0.15
    assert cfg.fit.anchors and cfg.fit.max_zoom and cfg.fit.precision and cfg.fit.minutes == 25
    assert not cfg.backbone.get("pretrained", False)  # from random weights
    assert cfg.optim.name == "adamw" and cfg.optim.scheduler.name == "cosine"
    # The cosine schedule spans Lightning's step estimate, which needs a finite max_epochs.
    assert cfg.trainer.max_epochs is not None and cfg.trainer.max_epochs > 0
    assert 224 <= min(cfg.image_size) <= max(cfg.image_size) <= 320
