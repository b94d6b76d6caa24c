"""Every ``python -m ssdlit.*`` command written in README.md and in the config comments runs.

The commands are extracted from the text (code lines of the README, ``#`` comment lines of
``conf/**/*.yaml``; ``\\`` continuations joined, trailing ``# comments`` and synopsis
brackets such as ``[data=...]`` dropped, ``VAR=value`` prefixes kept as environment), so
a command added or changed there is tested as written. Each runs with its own arguments,
where the placeholders become tiny local stand-ins:

- ``ckpt=...`` and ``init_from=...`` -> the checkpoint of a tiny run trained once for this module (and
  ``hydra.run.dir=outputs/train/<run>`` -> a copy of that run's folder); torchvision weights
  (``torchvision:NAME``, a ``.pth``; also a config's own ``init_from`` such as the
  ``finetune_*`` experiments' default, which would download) -> a ``.pth`` of torchvision's
  model of that architecture with random weights (91 COCO outputs), written when first needed;
- ``input=...`` -> a folder of two images;
- ``data.root=...`` of a VOC devkit -> a generated VOCdevkit (VOC2007 + VOC2012, the
  paper's split lists); of ``data=voc_folder`` -> a generated flat VOC folder; the raccoon data (``SSDLIT_RACCOON_DIR``) -> a generated folder of
  the same layout; ``data.*_csv`` / ``data.images_dir`` -> a generated CSV dataset; of a
  config whose data source is ``coco`` -> a generated COCO 2017 folder (``annotations/``,
  ``train2017/``, ``val2017/``, categories named as COCO names them);
- ``--config-dir my_conf`` -> a folder with ``experiment/mine.yaml``;

plus overrides that keep it short (appended after the command's own): one training step
(``trainer.fast_dev_run=1``), no workers, small synthetic data, no pretrained download,
``hydra.run.dir`` / ``hydra.sweep.dir`` in a temporary folder, one process where a config
asks for more than two (``trainer.devices=8`` of the COCO recipes). Commands run in this
process through the app's ``main`` with ``sys.argv`` set (interpreter start-up is most of
a small command's cost); a DDP strategy (``trainer=ddp``, or an experiment selecting it)
starts a process group and worker processes, and runs as a subprocess.
:data:`EXCLUDED` lists what cannot run here, with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.data_builders import voc_xml, write_coco, write_image

#: Runs through the command line or a real Trainer: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
APPS = ("train", "evaluate", "predict", "export", "inspect")

#: Commands (matched by a regular expression on the normalised command) that cannot run
#: here, and why.
EXCLUDED: dict[str, str] = {
    r"\+hparams_search=optuna": "needs the hydra-optuna-sweeper package (pip install "
    "hydra-optuna-sweeper), not a dependency of ssdlit",
}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written, its environment prefix and arguments."""

    where: str
    module: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def text(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env)
        return " ".join(filter(None, [env, "python -m", self.module, *self.args]))


_START = re.compile(r"((?:[A-Z_][A-Z0-9_]*=\S+\s+)*)python -m (ssdlit\.\w+)")


def _cut(rest: str) -> str:
    """The command's own text: up to a closing backtick or parenthesis, a sentence end."""
    for stop in ("`", ")"):
        if stop in rest:
            rest = rest[: rest.index(stop)]
    rest = rest.rstrip(" ,;:")
    if rest.endswith(".") and not rest.endswith("..."):  # a sentence's full stop
        rest = rest[:-1]
    return rest


def _drop_synopsis(tokens: list[str]) -> list[str]:
    """Remove synopsis groups: ``[overrides]``, ``[data=...]``, ``[any override ...]``."""
    out: list[str] = []
    depth = 0
    for tok in tokens:
        if depth == 0 and tok.startswith("["):
            depth = 1
        if depth:
            if tok.endswith("]"):
                depth = 0
            continue
        out.append(tok)
    return out


def extract(text: str, where: str, comments: bool) -> list[Command]:
    """The ``python -m ssdlit.*`` commands of ``text`` (``comments``: only ``#`` lines)."""
    lines = text.splitlines()
    if comments:
        lines = [ln.split("#", 1)[1] if ln.lstrip().startswith("#") else "" for ln in lines]
    found: list[Command] = []
    i = 0
    while i < len(lines):
        m = _START.search(lines[i])
        if not m:
            i += 1
            continue
        rest = lines[i][m.end() :]
        # inside inline code (`python -m ...`), which a line break of the prose may cut
        inline = lines[i][: m.start()].count("`") % 2 == 1
        while rest.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            rest = rest.rstrip()[:-1] + " " + lines[i].strip()
        while inline and "`" not in rest and i + 1 < len(lines) and lines[i + 1].strip():
            i += 1
            rest = rest.rstrip() + " " + lines[i].strip()
        i += 1
        tokens = _drop_synopsis(shlex.split(_cut(rest), comments=True))
        env = tuple(tuple(kv.split("=", 1)) for kv in m.group(1).split())
        found.append(Command(where, m.group(2), tuple(tokens), env))  # type: ignore[arg-type]
    return found


def documented_commands() -> list[Command]:
    commands = extract((ROOT / "README.md").read_text(encoding="utf-8"), "README.md", False)
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        commands += extract(text, str(path.relative_to(ROOT)), True)
    unique: dict[tuple, Command] = {}
    for c in commands:
        unique.setdefault((c.module, c.args, c.env), c)
    return list(unique.values())


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_app() -> None:
    """The extraction finds the commands (a broken pattern would silently test nothing)."""
    assert {c.module.split(".")[1] for c in COMMANDS} >= set(APPS)
    assert len(COMMANDS) >= 15, [c.text for c in COMMANDS]
    for c in COMMANDS:
        assert not any("python" in a or a.startswith("#") for a in c.args), c.text


# -- stand-ins for the data, checkpoints and folders the commands name ----------------------


VOC_NAMES = ("cat", "dog", "person")


def voc_devkit(root: Path) -> Path:
    """A VOCdevkit with VOC2007 (trainval, test) and VOC2012 (trainval), 2-3 images each."""
    for year, sets in (("2007", {"trainval": 3, "test": 2}), ("2012", {"trainval": 2})):
        base = root / f"VOC{year}"
        (base / "ImageSets" / "Main").mkdir(parents=True)
        for name, n in sets.items():
            ids = [f"{year}_{name}_{i}" for i in range(n)]
            (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            for k, image_id in enumerate(ids):
                write_image(base / "JPEGImages" / f"{image_id}.jpg", 64, 48)
                obj = {"name": VOC_NAMES[k % 3], "box": (5, 5, 40, 30)}
                xml = voc_xml(f"{image_id}.jpg", 64, 48, [obj])
                (base / "Annotations").mkdir(exist_ok=True)
                (base / "Annotations" / f"{image_id}.xml").write_text(xml)
    return root


def voc_folder(root: Path, n: int = 4) -> Path:
    """A flat VOC folder: ``images/`` and ``annotations/`` of ``n`` images of cats and dogs."""
    for i in range(n):
        write_image(root / "images" / f"img{i}.jpg", 64, 48)
        obj = {"name": ("cat", "dog")[i % 2], "box": (5, 5, 40, 30)}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"img{i}.xml").write_text(voc_xml(f"img{i}.jpg", 64, 48, [obj]))
    return root


def csv_dataset(root: Path, n_train: int, n_test: int, cls: str = "raccoon") -> Path:
    """``images/``, ``train_labels.csv``, ``test_labels.csv`` (the raccoon layout, 1-based)."""
    header = "filename,width,height,class,xmin,ymin,xmax,ymax"
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [header]
        for i in range(n):
            name = f"{split}_{i}.jpg"
            write_image(root / "images" / name, 64, 48)
            rows.append(f"{name},64,48,{cls},6,6,40,30")
        (root / f"{split}_labels.csv").write_text("\n".join(rows) + "\n")
    return root


#: COCO category ids and names (as COCO and torchvision's COCO detectors name them) of the
#: COCO stand-in: a COCO model's classes include them, so evaluating it keeps their rows.
COCO_CATEGORIES = {1: "person", 17: "cat", 18: "dog"}


def coco_folder(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    """COCO 2017's layout (``data.root`` of ``conf/data/coco.yaml``): ``annotations/``
    ``instances_{train,val}2017.json``, ``train2017/``, ``val2017/``; 64x48 images with one
    box each, the categories of :data:`COCO_CATEGORIES` in turn."""
    categories = [{"id": k, "name": v, "supercategory": "x"} for k, v in COCO_CATEGORIES.items()]
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        images, annotations = [], []
        for i in range(1, n + 1):
            name = f"{i:012d}.jpg"
            write_image(root / split / name, 64, 48, colour=(30 * i, 90, 200))
            images.append({"id": i, "file_name": name, "width": 64, "height": 48})
            category = list(COCO_CATEGORIES)[(i - 1) % len(COCO_CATEGORIES)]
            annotations.append(
                {
                    "id": i,
                    "image_id": i,
                    "category_id": category,
                    "bbox": [5, 5, 35, 25],
                    "area": 35 * 25,
                    "iscrowd": 0,
                }
            )
        data = {"images": images, "annotations": annotations, "categories": categories}
        write_coco(root / "annotations" / f"instances_{split}.json", data)
    return root


def torchvision_pth(path: Path, arch: str) -> Path:
    """torchvision's ``arch`` (a builder of ``torchvision.models.detection``) with random
    weights and COCO's 91 outputs, its state dict saved to ``path`` as torchvision's own
    ``.pth`` files are: what ``torchvision:NAME`` downloads, without the download."""
    import torch
    from torchvision.models import detection

    torch.manual_seed(0)
    model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=91)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@dataclass
class Stage:
    """The temporary folder and what the commands' placeholders become."""

    tmp: Path
    ckpt: Path
    run_dir: Path
    photos: Path
    voc: Path
    voc_folder: Path
    raccoon: Path
    csv: Path
    coco: Path
    my_conf: Path
    zoo: dict[str, Path] = field(default_factory=dict)

    def torchvision(self, arch: str) -> Path:
        """The stand-in ``.pth`` of torchvision's ``arch``, written at the first call (the
        SSD300 VGG16 one is ~140 MB and takes seconds: only for a command that needs it)."""
        if arch not in self.zoo:
            self.zoo[arch] = torchvision_pth(self.tmp / "zoo" / f"{arch}.pth", arch)
        return self.zoo[arch]


def run_in_process(module: str, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m module argv`` through the app's ``main`` in this process."""
    main = importlib.import_module(module).main
    old_argv, out = sys.argv, io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {k: os.environ.get(k) for k in env}
    sys.argv = [module, *argv]
    os.environ.update(env)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    return code, out.getvalue()


#: The tiny run's data and loading (tests/conftest.py), smaller still: 4 / 2 / 2 images in
#: batches of 2, for commands that run on the synthetic data.
FEWER = ("data.source.num_images={train: 4, val: 2, test: 2}",)
SMALL_BATCHES = ("data.batch_size=2", "data.eval_batch_size=2")


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny) -> Stage:
    tmp = tmp_path_factory.mktemp("docs")
    run_dir = tmp / "trained"
    overrides = tiny.run(tmp / "synthetic", *FEWER, *SMALL_BATCHES, "trainer.limit_train_batches=1")
    code, out = run_in_process(
        "ssdlit.train", [*overrides, f"hydra.run.dir={run_dir}"], {"OMP_NUM_THREADS": "1"}
    )
    assert code == 0, out[-3000:]
    photos = tmp / "photos"
    for i in range(2):
        write_image(photos / f"photo{i}.jpg", 80, 60, colour=(40 * i, 90, 200))
    my_conf = tmp / "my_conf"
    (my_conf / "experiment").mkdir(parents=True)
    (my_conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nimage_size: [64, 64]\n", encoding="utf-8"
    )
    return Stage(
        tmp=tmp,
        ckpt=run_dir / "checkpoints" / "best.ckpt",
        run_dir=run_dir,
        photos=photos,
        voc=voc_devkit(tmp / "VOCdevkit"),
        voc_folder=voc_folder(tmp / "mine"),
        raccoon=csv_dataset(tmp / "raccoon", 4, 2),
        csv=csv_dataset(tmp / "csv", 4, 2, cls="car"),
        coco=coco_folder(tmp / "coco"),
        my_conf=my_conf,
    )


def compose(config_name: str, overrides: list[str], config_dir: Path | None) -> object:
    """The config the app will run with (to choose the stand-in data and speed-ups)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from ssdlit.config import register_resolvers

    register_resolvers()
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=[*overrides, *extra])


def substitute(
    cmd: Command, st: Stage, case: Path
) -> tuple[list[str], dict[str, str], Path | None]:
    """The command's arguments and environment with the placeholders replaced."""
    args: list[str] = []
    env = {k: str(st.raccoon) if k == "SSDLIT_RACCOON_DIR" else v for k, v in cmd.env}
    config_dir = None
    it = iter(cmd.args)
    for a in it:
        key, _, value = a.partition("=")
        if a == "--config-dir":
            next(it)
            config_dir = st.my_conf
            args += ["--config-dir", str(st.my_conf)]
        elif key in ("ckpt", "init_from") and _torchvision_weights(value):
            args.append(a)  # a stand-in of its architecture, once composed (see fit_to_config)
        elif key in ("ckpt", "init_from"):
            args.append(f"{key}={st.ckpt}")
        elif key == "input":
            args.append(f"input={st.photos}")
        elif key == "data.root":
            words = " ".join(cmd.args)
            if "raccoon" in words:
                args.append(f"data.root={st.raccoon}")
            elif "data=voc_folder" in words:
                args.append(f"data.root={st.voc_folder}")
            else:  # a COCO config's becomes the COCO stand-in once composed (fit_to_config)
                args.append(f"data.root={st.voc}")
        elif key in ("data.train_csv", "data.val_csv"):
            split = "train" if key == "data.train_csv" else "test"
            args.append(f"{key}={st.csv / f'{split}_labels.csv'}")
        elif key == "data.images_dir":
            args.append(f"data.images_dir={st.csv / 'images'}")
        elif value == "...":  # a placeholder for any choice ("backbone=..."): the default
            continue
        elif key == "hydra.run.dir":
            resumed = case / "run"
            shutil.copytree(st.run_dir, resumed)
            args.append(f"hydra.run.dir={resumed}")
        else:
            args.append(a)
    env.setdefault("SSDLIT_RACCOON_DIR", str(st.raccoon))
    return args, env, config_dir


def _torchvision_weights(value: object) -> bool:
    from ssdlit.zoo.loading import is_torchvision_weights

    return value is not None and is_torchvision_weights(str(value))


def torchvision_arch(value: str, cfg: object) -> str:
    """The architecture of torchvision weights ``value``: the one a name stands for, else (a
    ``.pth`` placeholder, ``torchvision:...``) the composed config's network's; a config
    without one (evaluate, predict, export take the network from the file): SSDLite320, the
    cheaper one."""
    from ssdlit.zoo.torchvision import ARCHITECTURES, NAMED_WEIGHTS

    if value in NAMED_WEIGHTS:
        return NAMED_WEIGHTS[value]
    of_backbone = {a.backbone["name"]: name for name, a in ARCHITECTURES.items()}
    backbone = (cfg.get("backbone") or {}).get("name")  # type: ignore[attr-defined]
    return of_backbone.get(backbone, "ssdlite320_mobilenet_v3_large")


def _source_name(cfg: object) -> str | None:
    data = cfg.get("data")  # type: ignore[attr-defined]
    source = data.get("source") if data is not None else None
    return source.get("name") if source is not None else None


def fit_to_config(args: list[str], cfg: object, st: Stage) -> list[str]:
    """The stand-ins that depend on the composed config: torchvision weights (the command's
    ``ckpt=`` / ``init_from=``, or the config's own ``init_from``, appended after the command's
    arguments) -> a ``.pth`` of their architecture; the COCO data's ``data.root`` -> the COCO
    stand-in."""
    out: list[str] = []
    for a in args:
        key, _, value = a.partition("=")
        if key in ("ckpt", "init_from") and _torchvision_weights(value):
            a = f"{key}={st.torchvision(torchvision_arch(value, cfg))}"
        elif key == "data.root" and _source_name(cfg) == "coco":
            a = f"data.root={st.coco}"
        out.append(a)
    keys = {a.partition("=")[0].lstrip("+~") for a in args}
    init_from = cfg.get("init_from")  # type: ignore[attr-defined]
    if "init_from" not in keys and _torchvision_weights(init_from):  # e.g. finetune_ssdlite's
        out.append(f"init_from={st.torchvision(torchvision_arch(str(init_from), cfg))}")
    return out


def _ddp(cfg: object) -> bool:
    trainer = cfg.get("trainer") or {}  # type: ignore[attr-defined]
    return "ddp" in str(trainer.get("strategy"))


def speedups(app: str, args: list[str], cfg: object, case: Path, multirun: bool, tiny) -> list[str]:
    """Overrides that keep the command short (after its own, so they win)."""
    out = []
    keys = {a.partition("=")[0].lstrip("+~") for a in args}
    data = getattr(cfg, "data", None)
    source = getattr(data, "source", None) if data is not None else None
    run_data = app == "evaluate" and "data" not in keys  # the trained run's data
    if source is not None:
        if source.get("name") == "synthetic" and not run_data:
            out += [*tiny.replace(tiny.data, *FEWER), f"data.source.root={case}/synthetic"]
        loader = tiny.replace(tiny.loader, *SMALL_BATCHES)
        if "eval_batch_size" not in data:
            loader = [o for o in loader if not o.startswith("data.eval_batch_size=")]
        out += [o for o in loader if o.partition("=")[0] not in keys]
        if data.get("cache_images") is not None:
            out.append("data.cache_images=false")
    if app in ("train", "inspect") and "pretrained" in (cfg.get("backbone") or {}):
        out.append("backbone.pretrained=false")  # no download
    if app == "train":
        out += ["trainer.fast_dev_run=1", "logger=none", "picture.enabled=false"]
        out += ["metrics.coco=false"]
        devices = (cfg.get("trainer") or {}).get("devices")
        if isinstance(devices, int) and devices > 2 and "trainer.devices" not in keys:
            # The COCO recipes' 8 processes (one per GPU): one here. The documented command
            # takes the same path (DDP strategy, process group, distributed sampler), only the
            # process count differs; two CPU processes are what README's `trainer=ddp` runs
            # already, and two full-size networks would share this machine's two cores.
            out.append("trainer.devices=1")
    if app == "export":
        out.append("verify.num_images=1")
    if app == "inspect":
        out.append("coverage.k=2")
    if multirun:
        out.append(f"hydra.sweep.dir={case}/multirun")
    elif "hydra.run.dir" not in keys:
        out.append(f"hydra.run.dir={case}/run")
    return out


def _optuna_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def _excluded(cmd: Command) -> str | None:
    for pattern, reason in EXCLUDED.items():
        if re.search(pattern, cmd.text):
            return reason
    return None


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where}:{c.text[10:70]}" for c in COMMANDS])
def test_documented_command_runs(cmd: Command, stage: Stage, tmp_path: Path, tiny) -> None:
    reason = _excluded(cmd)
    if reason is not None:
        assert not _optuna_installed(), (
            f"{cmd.text} is excluded ({reason}) but could run here: remove the exclusion"
        )
        return
    app = cmd.module.split(".")[1]
    assert app in APPS, cmd.text
    args, env, config_dir = substitute(cmd, stage, tmp_path)
    multirun = "-m" in args or "--multirun" in args
    hydra_args = [a for a in args if a not in ("-m", "--multirun") and not a.startswith("--")]
    if "--config-dir" in args:
        hydra_args = [a for a in hydra_args if a != str(stage.my_conf)]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        composed = compose(
            app, [a.split(",")[0] if multirun else a for a in hydra_args], config_dir
        )
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    args = fit_to_config(args, composed, stage)
    argv = [*args, *speedups(app, hydra_args, composed, tmp_path, multirun, tiny)]
    env = {**env, "OMP_NUM_THREADS": "1"}
    if _ddp(composed):  # a process group and worker processes: a real command line
        proc = subprocess.run(
            [sys.executable, "-m", cmd.module, *argv],
            cwd=tmp_path,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    else:
        with _cwd(tmp_path):
            code, out = run_in_process(cmd.module, argv, env)
    assert code == 0, f"{cmd.where}: {cmd.text}\nran as: {' '.join(argv)}\n{out[-4000:]}"


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
