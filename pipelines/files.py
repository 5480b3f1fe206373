"""Writing files so that nobody ever sees half of one: the one atomic writer of the app.

The data goes to a hidden temporary file beside the target (its name starts with ``.`` so that a crash never
leaves something that looks like output), is flushed to disk, and then replaces the target in one rename.
A reader, or a process killed half way, sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_output(path: Path | str, *, prefix: str = ".tmp-") -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` when the block ends without an error; on an error the
    temporary file is removed and ``path`` is left as it was. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_atomically(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as handle:
        handle.write(data)
