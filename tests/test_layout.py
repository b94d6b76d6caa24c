"""The package's layers: the apps sit on top of the library and beside each other.

- no app module imports another app (what the apps share is :mod:`ssdlit.apps.common`);
- nothing in the library imports an app or the apps' support module;
- ``ssdlit/<app>.py`` only makes ``python -m ssdlit.<app>`` run the app;
- :mod:`ssdlit.training` is imported by the library only where training happens.

Read from the source (``ast``), so nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ssdlit"
APPS = ("train", "evaluate", "predict", "export", "inspect")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The ``ssdlit`` modules ``path`` imports (``from a import b``: ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "ssdlit" or n.startswith("ssdlit.")}


def app_modules(name: str) -> set[str]:
    return {f"ssdlit.apps.{name}", f"ssdlit.{name}"}


SOURCES = sorted(SRC.rglob("*.py"))
ENTRY_POINTS = [SRC / f"{app}.py" for app in APPS]


def test_the_layout_is_where_this_test_looks():
    assert all(p.is_file() for p in ENTRY_POINTS)
    assert all((SRC / "apps" / f"{app}.py").is_file() for app in APPS)


@pytest.mark.parametrize("app", APPS)
def test_no_app_imports_another_app(app):
    found = imported(SRC / "apps" / f"{app}.py")
    others = set().union(*(app_modules(a) for a in APPS if a != app))
    assert not found & others, sorted(found & others)


@pytest.mark.parametrize("app", APPS)
def test_the_entry_point_only_runs_its_app(app):
    assert imported(SRC / f"{app}.py") == {f"ssdlit.apps.{app}", f"ssdlit.apps.{app}.main"}


def test_the_library_does_not_import_the_apps():
    apps = set().union(*(app_modules(a) for a in APPS))
    offenders = {
        module_name(p): sorted(n for n in imported(p) if n.startswith("ssdlit.apps") or n in apps)
        for p in SOURCES
        if "apps" not in p.parts and p not in ENTRY_POINTS
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_training_is_imported_only_where_training_happens():
    """Only the Lightning system (which trains), the training app and transfer learning
    (which reads checkpoints) reach into :mod:`ssdlit.training`."""
    users = {
        module_name(p)
        for p in SOURCES
        if "training" not in p.parts and any(n.startswith("ssdlit.training") for n in imported(p))
    }
    assert users <= {
        "ssdlit.module",
        "ssdlit.transfer",
        "ssdlit.apps.train",
        "ssdlit.apps.evaluate",
    }
