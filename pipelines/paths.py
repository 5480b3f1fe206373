"""Folders a request may name: every output or input folder stays inside the allowed roots.

The roots are the data dir and the folders the operator named on the command line (``--allowed-dir``,
the models dir, ``--ckpt-dir``, ``--lora-dir`` ...). :func:`confine` is the one check: the options
(``outdir_*``, from the Settings tab, ``/sdapi/v1/options`` and ``override_settings``), the engine when it
saves, and the Extras tab's "Batch from Directory" all go through it.

Standard library only, like :mod:`pipelines.settings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AllowedRoots:
    """Where a folder named by a user may be: ``data_dir`` (relative paths resolve against it) or ``extra``."""

    data_dir: Path
    extra: tuple[Path, ...] = ()

    @property
    def folders(self) -> tuple[Path, ...]:
        """Every root, resolved (symbolic links followed), without repeats, the data dir first."""
        return tuple(dict.fromkeys(Path(root).resolve() for root in (self.data_dir, *self.extra)))

    def describe(self) -> str:
        return ", ".join(str(folder) for folder in self.folders)


def confine(path_text: str, roots: AllowedRoots, *, field: str) -> Path:
    """The absolute folder ``path_text`` names, checked to lie inside ``roots``; ValueError naming ``field``.

    A relative path resolves against the data dir, never the working folder; ``~`` is never expanded (the
    caller may be on another machine); symbolic links are followed before the check, so a link inside a
    root that points outside it is refused like the outside folder itself.
    """
    text = str(path_text).strip()
    if not text:
        raise ValueError(f"{field}: empty folder name")
    if "\x00" in text:
        raise ValueError(f"{field}: a folder name cannot hold a NUL character")
    if text.startswith("~"):
        raise ValueError(f"{field}: {text!r}: '~' is not expanded here; give a folder relative to the data "
                         f"folder, or inside one of: {roots.describe()}")
    path = Path(text)
    if not path.is_absolute():
        path = Path(roots.data_dir) / path
    resolved = path.resolve()
    for root in roots.folders:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise ValueError(f"{field}: {text!r} is outside the folders this server may use ({roots.describe()}); "
                     "give a folder relative to the data folder, or start the server with --allowed-dir")


def check_writable(folder: Path, *, field: str) -> None:
    """ValueError naming ``field`` when files cannot be written into ``folder`` (created when needed): a
    part of it is a file, or the nearest existing folder is not writable. Nothing is created here."""
    existing = Path(folder)
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: writing would follow it somewhere else
            raise ValueError(f"{field}: {existing} is a broken symbolic link")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{field}: {existing} is a file, not a folder, so images cannot be saved in {folder}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{field}: the folder {existing} is not writable by the server")


def confine_writable(path_text: str, roots: AllowedRoots, *, field: str) -> Path:
    """:func:`confine`, then :func:`check_writable`: a folder images can be saved in."""
    folder = confine(path_text, roots, field=field)
    check_writable(folder, field=field)
    return folder
