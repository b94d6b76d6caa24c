"""OmegaConf resolvers used by ssdlit's configs (registered on import of ``ssdlit.conf``).

- ``${ssdlit.repo_path:REL}``: ``REL`` resolved against the root of the source checkout
  that holds the configs (the folder with ``pyproject.toml`` above ``conf/``), when ssdlit
  is installed editable from a checkout; otherwise (a wheel) against the working
  directory. So ``${ssdlit.repo_path:../shared/datasets/raccoon}`` finds the dataset next
  to the checkout whatever the working directory is.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "repo_path", "repo_root"]


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
