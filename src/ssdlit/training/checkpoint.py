"""Checkpoints written atomically and read with ``torch.load(weights_only=True)``.

:class:`AtomicCheckpointIO` replaces Lightning's default checkpoint IO (pass it to the
Trainer's ``plugins``): a local checkpoint is serialised into a temporary file in the
target's folder, flushed and ``fsync``-ed, then moved over the target with ``os.replace``
(atomic on POSIX and Windows within one file system) and the folder is ``fsync``-ed. A
crash mid-write leaves the previous ``last.ckpt`` intact and at worst a stray
``.*.tmp`` file, never a truncated checkpoint. Remote paths (``s3://`` & co.) go through
Lightning's own fsspec path.

Loading defaults to ``weights_only=True``: ssdlit's checkpoints hold only tensors and
plain Python containers (hyper-parameters are saved as plain dicts, the learning-rate
schedule's state is plain numbers), so nothing needs unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "load_checkpoint"]


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file + fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic local writes, ``weights_only=True`` reads by default."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, Path(str(path).removeprefix("file://")))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path,
            map_location=map_location,
            weights_only=True if weights_only is None else weights_only,
        )
