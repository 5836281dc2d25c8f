"""Atomic file writes, shared by the run directories (:mod:`telescope.runs.store`, which adds
``atomic_write_text``) and the figure helpers (:mod:`telescope.plotting`); at the bottom of the
layers, so both can import it.

A file is written to a temporary file in its own directory (named ``TMP_PREFIX + name + ...``)
and then ``os.replace``d into place, so a reader, or a process killed at any moment, sees either
the old file or the new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_PREFIX", "FILE_MODE", "atomic_write"]

TMP_PREFIX = ".tmp-"
"""How the names of temporary files begin (a run directory recognizes leftovers by it)."""


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask): mkstemp's files are 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()
"""The mode of the files written here (that of a plainly created file)."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then ``os.replace`` it there.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path

