"""What the five command-line apps share: a user error ends the run with one line.

``train``, ``evaluate``, ``predict``, ``export`` and ``inspect`` are each built with
:func:`hydra_app`. A *user error* (:data:`USER_ERRORS`: :class:`UsageError`, a bad input's
:class:`~ssdlit.datamodules.DataError`, an unknown component name, a config key that
does not exist or a mandatory value left unset, a component that refuses its options
(:class:`~ssdlit.registry.ConfigError`), a file or folder the config names that does not
exist, Hydra's own composition errors) ends the
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
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.errors import CompactHydraException, HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ssdlit.datamodules import DataError
from ssdlit.module import DetectionModule
from ssdlit.registry import ConfigError, RegistryError

__all__ = [
    "FULL_ERROR",
    "USER_ERRORS",
    "UsageError",
    "checkpoint_path",
    "hydra_app",
    "load_module",
    "one_line",
    "report_usage_errors",
    "user_error_message",
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
    OmegaConfBaseException,
    HydraException,
)


def checkpoint_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is a file; else :class:`UsageError`."""
    ckpt = Path(str(path)).expanduser()
    if not ckpt.exists():
        where = "" if ckpt.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise UsageError(f"checkpoint not found: {ckpt}{where}")
    if ckpt.is_dir():
        raise UsageError(f"checkpoint {ckpt} is a folder; give the .ckpt file")
    return ckpt


def load_module(path: str | Path, **overrides: Any) -> DetectionModule:
    """The :class:`~ssdlit.module.DetectionModule` of checkpoint ``path``, in eval mode.

    Raises :class:`UsageError` naming the path when it is missing, a folder, or not a
    readable ssdlit checkpoint.
    """
    ckpt = checkpoint_path(path)
    try:
        module = DetectionModule.from_checkpoint(ckpt, **overrides)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"cannot load checkpoint {ckpt} ({type(exc).__name__}: {exc}); is it a checkpoint "
            "written by python -m ssdlit.train?"
        ) from exc
    return module.eval()


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
