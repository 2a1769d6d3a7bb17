"""Atomic writes: a file (or folder) appears whole at its path, or not at all, and a failed write leaves nothing.

The one helper every cache and artifact writer uses: a temporary sibling is written, flushed, then
renamed into place (``os.replace`` is atomic on one file system); on any failure, the temporary is
removed. Temporaries are named ``.<name>.tmp-*`` so a later writer can clean what a killed one left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path`` (its folder is made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_folder(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Call ``fill(temporary_folder)`` and rename the folder to ``path``, replacing an existing one (kept aside
    until the new one is in place); on failure nothing changes at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(temporary)
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, backup)
            os.replace(temporary, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return path


def remove_stale(folder: str | os.PathLike[str], name: str) -> None:
    """Remove the temporaries (and kept-aside folders) a killed writer of ``folder/name`` left behind; call it
    holding the writer's lock."""
    for stale in [*Path(folder).glob(f".{name}.tmp-*"), *Path(folder).glob(f".{name}.old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()
