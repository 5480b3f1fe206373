"""A thread-safe name -> item table in which a name registered as built-in cannot be taken again.

The one rule behind every registry that extensions add to (extra networks, always-on scripts, the Script
dropdown's scripts): a plug-in may add names and replace its own, never a built-in's.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class NamedRegistry(Generic[T]):
    """``key -> item``; ``what`` names the kind of item in error messages ("extra network", ...)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._items: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._lock = threading.Lock()

    def register(self, key: str, item: T, *, builtin: bool = False, label: str | None = None) -> None:
        """Store ``item`` under ``key``; ValueError (naming ``label`` or the key) if a built-in holds the key."""
        with self._lock:
            if key in self._builtin:
                raise ValueError(f"{self._what} {(label or key)!r} is built in and cannot be replaced")
            self._items[key] = item
            if builtin:
                self._builtin.add(key)

    def is_builtin(self, key: str) -> bool:
        """Whether ``key`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        with self._lock:
            return key in self._builtin

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._items.get(key)

    def snapshot(self) -> dict[str, T]:
        """A copy of the table, sorted by key, for use without holding the lock."""
        with self._lock:
            return {key: self._items[key] for key in sorted(self._items)}
