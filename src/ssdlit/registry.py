"""Name -> component registries and third-party plugin discovery.

Every swappable part of a detector (backbone, anchor generator, matcher, head,
post-processor, data source) is registered under a short name and built from
config as ``REGISTRY.build(name, **kwargs)``. Configs never name import paths.

A third-party package adds components without editing ssdlit by declaring an
entry point in the group ``ssdlit.plugins``; :func:`load_plugins` imports it, and
the import registers its classes::

    # the plugin's pyproject.toml
    [project.entry-points."ssdlit.plugins"]
    my_heads = "my_package.heads"

    # my_package/heads.py
    from ssdlit.registry import HEADS

    @HEADS.register("my_head")
    class MyHead(torch.nn.Module): ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, TypeVar, overload

__all__ = [
    "ANCHORS",
    "BACKBONES",
    "DATASETS",
    "HEADS",
    "MATCHERS",
    "PLUGIN_GROUP",
    "POSTPROCESS",
    "ConfigError",
    "Registry",
    "RegistryError",
    "load_plugins",
]

T = TypeVar("T")

PLUGIN_GROUP = "ssdlit.plugins"


class RegistryError(KeyError):
    """A name was registered twice or looked up without being registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ValueError, TypeError):
    """A registered component cannot be built from its config: an option it does not take,
    or a value it refuses (the message names the component and says why).

    A ``ValueError`` and a ``TypeError`` both (what the constructor raised), so callers that
    catch either keep working; the apps report it as a one-line user error.
    """


class Registry:
    """A named table of factories (classes or functions).

    Register with a decorator (``@REG.register("name")`` or bare ``@REG.register``,
    which uses the object's ``__name__``) or with a call (``REG.register("name", obj)``).
    A duplicate name is refused; an unknown name raises :class:`RegistryError`
    listing the known names and the closest match.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    @overload
    def register(self, name: Callable[..., Any]) -> Callable[..., Any]: ...
    @overload
    def register(self, name: str | None = None) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: Any = None, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; returns ``obj`` (or a decorator)."""
        if callable(name) and obj is None:  # bare @REG.register
            self._add(name.__name__, name)
            return name
        if obj is not None:
            self._add(name or obj.__name__, obj)
            return obj

        def decorator(target: T) -> T:
            self._add(name or target.__name__, target)  # type: ignore[attr-defined]
            return target

        return decorator

    def _add(self, name: str, obj: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} registry: names must be non-empty strings")
        if name in self._table:
            existing = self._table[name]
            raise RegistryError(
                f"{self.kind} registry: {name!r} is already registered "
                f"(by {existing.__module__}.{getattr(existing, '__qualname__', existing)})"
            )
        self._table[name] = obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (mainly for tests and interactive sessions)."""
        self.get(name)
        del self._table[name]

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name``."""
        try:
            return self._table[name]
        except KeyError:
            raise RegistryError(self._unknown_message(name)) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with keyword arguments.

        A plain ``TypeError`` or ``ValueError`` of the factory (an unknown option, a refused
        value) becomes a :class:`ConfigError` naming the component, the original as its
        cause; their subclasses (a data source's ``DataError``) pass unchanged.
        """
        factory = self.get(name)
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as exc:
            if type(exc) not in (TypeError, ValueError):
                raise
            raise ConfigError(f"{self.kind} {name!r}: {exc}") from exc

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._table)

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        msg = f"unknown {self.kind} {name!r}; known: {', '.join(known) if known else '(none)'}"
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        if close:
            msg += f". Did you mean {close[0]!r}?"
        return msg

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


BACKBONES = Registry("backbone")
ANCHORS = Registry("anchor generator")
MATCHERS = Registry("matcher")
HEADS = Registry("head")
POSTPROCESS = Registry("post-processor")
DATASETS = Registry("data source")

_loaded_plugins: set[str] = set()


def load_plugins(group: str = PLUGIN_GROUP) -> list[str]:
    """Import every entry point in ``group`` so that its components register.

    Each entry point is loaded once per process. Returns the names of the entry
    points loaded by this call. A plugin that fails to import raises a
    ``RuntimeError`` naming the plugin and its distribution.
    """
    loaded = []
    for ep in metadata.entry_points(group=group):
        key = f"{ep.name}={ep.value}"
        if key in _loaded_plugins:
            continue
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            dist = getattr(ep, "dist", None)
            owner = f" from distribution {dist.name!r}" if dist is not None else ""
            raise RuntimeError(
                f"ssdlit plugin {ep.name!r} ({ep.value}){owner} failed to load: {exc}"
            ) from exc
        _loaded_plugins.add(key)
        loaded.append(ep.name)
    return loaded
