"""What the five command-line apps share (:mod:`ssdlit.apps`): user errors, checkpoints,
run folders.

**One-line user errors.** ``train``, ``evaluate``, ``predict``, ``export`` and ``inspect``
are each built with :func:`hydra_app`. A *user error* (:data:`USER_ERRORS`:
:class:`UsageError`, a bad input's :class:`~ssdlit.datamodules.DataError`, an unknown
component name, a config key that does not exist or a mandatory value left unset, a
component that refuses its options (:class:`~ssdlit.registry.ConfigError`), a file or
folder the config names that does not exist, Hydra's own composition errors) ends the
process with one line on stderr, ``ssdlit.<app>: <message>``, and exit status 2, never a
traceback, wherever it was raised: while Hydra composes the config, in the app, or in a
Lightning hook (datamodule setup; Lightning re-raises the hook's exception unchanged).
Any other exception is a bug and keeps its traceback (Hydra's, exit status 1).
``HYDRA_FULL_ERROR=1`` shows the full traceback of user errors too.

How: Hydra prints its composition errors itself (several lines) and exits with status 1
unless ``HYDRA_FULL_ERROR=1``, in which case it re-raises them. The wrapper sets that
variable while Hydra composes (so it can print the error as one line), and puts the
user's value back for the app itself (so that processes the app starts inherit it and
Hydra formats the app's own bugs as usual).

**Checkpoints and their run.** :func:`load_module` reads a checkpoint (a
:class:`UsageError` naming the path when it is missing or not an ssdlit checkpoint);
:func:`run_groups` reads the ``data`` / ``augment`` config of the training run it belongs
to (``RUN/config.yaml`` for ``RUN/checkpoints/best.ckpt``).

**Run folders and results.** :func:`run_dir` (Hydra's output folder), :func:`save_config`,
:func:`write_json`, and :func:`set_threads` for the process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
import torch
from hydra.errors import CompactHydraException, HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssdlit.backbones.pretrained import PretrainedWeightsError
from ssdlit.datamodules import DataError
from ssdlit.module import DetectionModule
from ssdlit.registry import ConfigError, RegistryError
from ssdlit.zoo.loading import is_torchvision_weights

__all__ = [
    "FULL_ERROR",
    "RUN_GROUPS",
    "USER_ERRORS",
    "UsageError",
    "checkpoint_path",
    "hydra_app",
    "json_safe",
    "load_module",
    "one_line",
    "report_usage_errors",
    "run_config_path",
    "run_dir",
    "run_groups",
    "save_config",
    "set_threads",
    "torchvision_module",
    "user_error_message",
    "write_json",
]

T = TypeVar("T")

#: The environment variable that shows full tracebacks (Hydra's).
FULL_ERROR = "HYDRA_FULL_ERROR"


class UsageError(Exception):
    """What the user asked for cannot be done: a missing or incompatible checkpoint, a
    pattern matching nothing, classes that differ between a checkpoint and the data.

    The apps print it as one line (no traceback) and exit with status 2.
    """


#: Exceptions that are the user's to fix (the input, the config, the command line).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    DataError,
    RegistryError,
    ConfigError,
    FileNotFoundError,  # a data folder, file list or input the config names that is not there
    PretrainedWeightsError,  # weights that cannot be downloaded (offline): where to put them
    OmegaConfBaseException,
    HydraException,
)


#: What a run folder given as ``ckpt=`` stands for, in order of preference.
RUN_CHECKPOINTS = ("checkpoints/best.ckpt", "checkpoints/last.ckpt")


def checkpoint_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is a file; a training run's folder
    stands for its best checkpoint (else its last, see :data:`RUN_CHECKPOINTS`); a name of
    torchvision weights (``torchvision:...``) stays as it is; anything else is a
    :class:`UsageError`."""
    if str(path).startswith("torchvision:"):  # weights by name (ssdlit.zoo), no file yet
        return Path(str(path))
    ckpt = Path(str(path)).expanduser()
    if not ckpt.exists():
        where = "" if ckpt.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise UsageError(f"checkpoint not found: {ckpt}{where}")
    if ckpt.is_dir():
        for name in RUN_CHECKPOINTS:
            if (ckpt / name).is_file():
                return ckpt / name
        wanted = " or ".join(RUN_CHECKPOINTS)
        raise UsageError(f"checkpoint {ckpt} is a folder without {wanted}; give the .ckpt file")
    return ckpt


def load_module(
    path: str | Path, class_names: Sequence[str] | None = None, **options: Any
) -> DetectionModule:
    """The :class:`~ssdlit.module.DetectionModule` of checkpoint ``path``, in eval mode.

    ``options`` go to :meth:`~ssdlit.module.DetectionModule.from_checkpoint` (saved
    hyper-parameters to replace, ``postprocess_options``). Raises :class:`UsageError`
    naming the path when it is missing, a folder, or not a readable ssdlit checkpoint.
    ``path`` may also name torchvision weights (``torchvision:ssd300_vgg16_coco``, a
    torchvision ``.pth``: :func:`torchvision_module`); ``class_names`` then picks their
    classes by name (COCO's 90 by default).
    """
    if is_torchvision_weights(path):  # torchvision:NAME or a torchvision .pth (ssdlit.zoo)
        return torchvision_module(path, class_names, **options)
    ckpt = checkpoint_path(path)
    try:
        module = DetectionModule.from_checkpoint(ckpt, **options)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"cannot load checkpoint {ckpt} ({type(exc).__name__}: {exc}); is it a checkpoint "
            "written by python -m ssdlit.train?"
        ) from exc
    return module.eval()


def torchvision_module(
    path: str | Path, class_names: Sequence[str] | None = None, **options: Any
) -> DetectionModule:
    """A module of torchvision's weights (:func:`ssdlit.zoo.loading.module_from_torchvision`)
    with :func:`load_module`'s ``options``; a missing or foreign file is a :class:`UsageError`."""
    from ssdlit.zoo.loading import module_from_torchvision

    extra = dict(options)
    post = extra.pop("postprocess_options", None)
    if post:
        extra["postprocess"] = post
    try:
        return module_from_torchvision(path, class_names, **extra)
    except (FileNotFoundError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"cannot load {path}: {exc}") from exc


def one_line(text: str) -> str:
    """``text`` on one line: its lines stripped and joined with single spaces."""
    return re.sub(r"\s+", " ", str(text)).strip()


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, or None when ``exc`` is not one (a bug).

    OmegaConf's messages keep their first line (the ``full_key`` / ``object_type`` lines
    below it repeat what the message says); a Hydra error whose cause is an OmegaConf
    error gets that cause's first line in parentheses (e.g. "Could not override 'foo'.
    To append to your config use +foo=1 (Key 'foo' is not in struct)").
    """
    if not isinstance(exc, USER_ERRORS):
        return None
    if isinstance(exc, OmegaConfBaseException):
        return one_line(str(exc).strip().split("\n")[0])
    message = one_line(str(exc))
    cause = exc.__cause__
    if isinstance(exc, CompactHydraException) and isinstance(cause, OmegaConfBaseException):
        detail = one_line(str(cause).strip().split("\n")[0])
        if detail and detail not in message:
            message = f"{message} ({detail})"
    return message or type(exc).__name__


def _full_error() -> bool:
    return os.environ.get(FULL_ERROR) == "1"


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, remove) the environment variable ``name`` for the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _exit_with(app: str, exc: BaseException) -> None:
    """Raise ``SystemExit(2)`` after ``app: message`` when ``exc`` is a user error."""
    message = user_error_message(exc)
    if message is None:
        return
    print(f"{app}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


@contextlib.contextmanager
def report_usage_errors(app: str) -> Iterator[None]:
    """Turn a user error raised in the block into ``app: message`` on stderr and exit
    status 2 (unless ``HYDRA_FULL_ERROR=1``: then it propagates with its traceback)."""
    try:
        yield
    except USER_ERRORS as exc:
        if _full_error():
            raise
        _exit_with(app, exc)
        raise  # pragma: no cover - _exit_with raised


def hydra_app(app: str, config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T]]:
    """Decorate an app's task function: the Hydra entry point ``main()`` of ``app``
    (``ssdlit.<name>``) with the package config ``config_name``, ending user errors with
    one line and exit status 2 (see the module docstring).
    """

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T]:
        user_value = os.environ.get(FULL_ERROR)

        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> T:
            with _environ(FULL_ERROR, user_value), report_usage_errors(app):
                return task(cfg)

        hydra_main = hydra.main(
            config_path="pkg://ssdlit.conf", config_name=config_name, version_base="1.3"
        )(guarded)

        @functools.wraps(task)
        def main() -> Any:
            nonlocal user_value
            user_value = os.environ.get(FULL_ERROR)
            if _full_error():
                return hydra_main()
            # Hydra re-raises composition errors instead of printing them (see above).
            with _environ(FULL_ERROR, "1"):
                try:
                    return hydra_main()
                except USER_ERRORS as exc:
                    _exit_with(app, exc)
                    raise  # pragma: no cover - _exit_with raised

        return main

    return decorate


# -- the training run of a checkpoint ---------------------------------------------------


#: The config groups an app takes from the training run of its checkpoint.
RUN_GROUPS = ("data", "augment")


def run_config_path(ckpt: str | Path) -> Path | None:
    """The ``config.yaml`` of the training run a checkpoint belongs to, or None: beside the
    checkpoint or one folder up (``RUN/checkpoints/best.ckpt`` -> ``RUN/config.yaml``)."""
    ckpt = Path(ckpt)
    for folder in (ckpt.parent, ckpt.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            return path
    return None


def _command_line() -> list[str]:
    """This run's command-line overrides (none outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig not set: called as a function
        return []


def run_groups(
    cfg: DictConfig, ckpt: str | Path, command_line: Sequence[str] | None = None
) -> tuple[dict[str, Any], str]:
    """``({group: node}, where from)`` for :data:`RUN_GROUPS`: the nodes of the training
    run of checkpoint ``ckpt`` (:func:`run_config_path`) with the command line's
    ``group.*`` overrides applied, unless the command line chose the group (``data=voc``)
    or there is no run config (then the app config ``cfg``'s own nodes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(
        list(_command_line() if command_line is None else command_line)
    )
    chosen = {o.key_or_group for o in overrides if o.key_or_group in RUN_GROUPS}
    path = run_config_path(ckpt)
    run_cfg = OmegaConf.load(path) if path is not None else None
    nodes: dict[str, Any] = {}
    sources: list[str] = []
    for group in RUN_GROUPS:
        if group in chosen or run_cfg is None or run_cfg.get(group) is None:
            nodes[group] = cfg.get(group)
            sources.append(
                f"{group}: {'the command line' if group in chosen else 'the app config'}"
            )
            continue
        for o in overrides:
            key = o.key_or_group
            if not key.startswith(f"{group}."):
                continue
            if o.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(run_cfg, parent)
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(run_cfg, key, o.value(), merge=True, force_add=True)
        nodes[group] = run_cfg[group]
        sources.append(f"{group}: the run's {path}")
    return nodes, "; ".join(sources)


# -- run folders and results -------------------------------------------------------------


def run_dir(cfg: DictConfig | None = None) -> Path:
    """Hydra's output folder of this run (the working directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        out = cfg.get("paths", {}).get("output_dir") if cfg is not None else None
        return Path(out) if out else Path.cwd()


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the config with every interpolation resolved (what the run really used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    path.write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
    return path


def json_safe(obj: Any) -> Any:
    """Plain JSON values: tensors to numbers, NaN/inf to None, paths to strings."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (through a temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def set_threads(threads: int | None) -> None:
    """The app's threads: ``torch.set_num_threads(threads)`` unless None, and one OpenCV
    thread.

    One OpenCV thread, as in every DataLoader worker
    (:func:`ssdlit.datamodules.datamodule.seed_worker`): the data pipeline's work is
    spread over the loader's workers, not over OpenCV threads competing with torch's.
    (The datamodule also sets it before forking workers: a worker forked from a process
    whose OpenCV pool had threads hangs when it reconfigures the pool.)
    """
    if threads is not None and int(threads) > 0:
        torch.set_num_threads(int(threads))
    try:
        import cv2
    except ImportError:  # pragma: no cover - albumentations brings OpenCV
        return
    cv2.setNumThreads(1)
