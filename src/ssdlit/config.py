"""Reading ssdlit's Hydra configs: plain values out of OmegaConf, and the configs' resolver.

- :func:`plain`: OmegaConf nodes (resolved), mappings and tuples to plain dicts and lists,
  recursively. Wherever a config node reaches the library (hyper-parameters saved in a
  checkpoint, component specs, data options), it goes through here, so that nothing
  downstream depends on OmegaConf and checkpoints load with ``weights_only=True``.
- ``${ssdlit.repo_path:REL}`` (:func:`repo_path`): ``REL`` resolved against the root of
  the source checkout that holds the configs (the folder with ``pyproject.toml`` above
  ``conf/``) when ssdlit is installed editable from a checkout, else (a wheel) against the
  working directory. So ``${ssdlit.repo_path:../shared/datasets/raccoon}`` finds the
  dataset next to the checkout whatever the working directory is. Importing
  ``ssdlit.conf`` registers it (:func:`register_resolvers`).

The configs themselves (YAML) are the package ``ssdlit.conf`` (the ``conf/`` folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["plain", "register_resolvers", "repo_path", "repo_root"]


def plain(obj: Any) -> Any:
    """OmegaConf containers (resolved), mappings and tuples to plain dicts and lists,
    recursively; anything else is returned as it is."""
    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def repo_root() -> Path | None:
    """The source checkout holding ``ssdlit.conf`` (editable install), or None (a wheel)."""
    import ssdlit.conf

    conf_dir = Path(ssdlit.conf.__file__).resolve().parent
    root = conf_dir.parent
    if conf_dir.name == "conf" and (root / "pyproject.toml").is_file():
        return root
    return None


def repo_path(rel: str) -> str:
    """``rel`` against :func:`repo_root` (or the working directory), as a string."""
    path = Path(rel).expanduser()
    if path.is_absolute():
        return str(path)
    base = repo_root() or Path.cwd()
    return str((base / path).resolve())


def register_resolvers() -> None:
    """Register the resolvers once (idempotent)."""
    if not OmegaConf.has_resolver("ssdlit.repo_path"):
        OmegaConf.register_new_resolver("ssdlit.repo_path", repo_path)
