"""Small helpers the apps share: the run folder, the resolved config, JSON results, threads."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "json_safe",
    "limit_opencv_threads",
    "run_dir",
    "save_config",
    "set_threads",
    "write_json",
]


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
    """``torch.set_num_threads(threads)`` unless None."""
    if threads is not None and int(threads) > 0:
        torch.set_num_threads(int(threads))


def limit_opencv_threads() -> None:
    """One OpenCV thread in this process, before any DataLoader worker is forked.

    Work-around: :func:`ssdlit.datamodules.datamodule.seed_worker` calls
    ``cv2.setNumThreads(1)`` in each forked worker. When the parent had already run a
    multi-threaded OpenCV operation (the synthetic dataset is drawn with OpenCV on first
    use), the child inherits the parent's thread pool without its threads, and
    reconfiguring it blocks forever (``pthread_cond_destroy``): the run hangs at the start
    of the first epoch. With the parent at one thread too, the pool has no threads to
    inherit and the worker's call changes nothing.
    """
    try:
        import cv2
    except ImportError:  # pragma: no cover - albumentations brings OpenCV
        return
    cv2.setNumThreads(1)
