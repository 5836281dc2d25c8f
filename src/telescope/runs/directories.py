"""Output directories: checking that one can be created and written (:func:`ensure_writable_dir`),
and the error, :class:`RunDirectoryError`, that says in one line why not."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from telescope._io import TMP_PREFIX as _TMP_PREFIX
from telescope.errors import TelescopeError

__all__ = ["RunDirectoryError", "ensure_writable_dir"]


class RunDirectoryError(TelescopeError, OSError):
    """A run directory (or another output directory) cannot be created, read or written: it is
    a file, lies under a file, is read-only, or the disk is full. The message says which file,
    what was saved and what to do."""


def _reason(err: BaseException) -> str:
    """``err`` in a few words: the OS's text for an OSError (``Permission denied``)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}"


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a directory (``None``: none is)."""
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def ensure_writable_dir(path: str | os.PathLike, what: str = "--out",
                        fix: str | None = None) -> Path:
    """Create the directory ``path`` if needed and check, with a real write, that files can be
    created in it; returns it. Every problem raises :class:`RunDirectoryError` with one line
    naming the directory and the fix (``what`` names the option that gave it; ``fix``
    replaces the default advice, "choose another / a writable --out")."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise RunDirectoryError(f"{what} {path} is a file, not a directory: "
                                f"{fix or f'choose another {what}'}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = _file_ancestor(path)
        if blocker is not None:
            raise RunDirectoryError(f"cannot create {what} {path}: {blocker} is a file, not a "
                                    f"directory; {fix or f'choose another {what}'}") from None
        raise RunDirectoryError(f"cannot create {what} {path} ({_reason(err)}); "
                                f"{fix or f'choose a writable {what}'}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirectoryError(f"cannot write to {what} {path} ({_reason(err)}); "
                                f"{fix or f'choose a writable {what}'}") from None
    return path
