"""What computed a run, recorded in ``run.json``: library versions, the git commit of the
telescope source tree, and the machine (CPU model and count)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import telescope

__all__ = ["versions", "git_commit", "machine"]


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the git checkout telescope is imported from (``-dirty`` appended when
    ``git status --porcelain`` lists changes); ``None`` when it is not imported from a git
    checkout (an installed package), or git is missing. Never raises."""
    try:
        package = Path(telescope.__file__).resolve().parent
    except (TypeError, OSError):  # no file (a frozen or namespace package)
        return None
    # the package itself must be tracked by that repository (not a venv inside another repo)
    if _git("ls-files", "--error-unmatch", "__init__.py", cwd=package) is None:
        return None
    head = _git("rev-parse", "HEAD", cwd=package)
    if not head or not head.strip():
        return None
    status = _git("status", "--porcelain", cwd=package)
    return head.strip() + ("-dirty" if status and status.strip() else "")


def machine() -> str:
    """A short description of this machine: the CPU model and the number of CPUs, e.g.
    ``"AMD EPYC 7B13 (x86_64), 2 CPUs"``."""
    model = ""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                model = value.strip()
                break
    model = model or platform.processor() or "unknown CPU"
    arch = platform.machine()
    if arch and arch not in model:
        model += f" ({arch})"
    n = os.cpu_count() or 0
    return f"{model}, {n} CPU{'s' if n != 1 else ''}"


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a run depends on, the git commit
    of the telescope source tree (``git_commit``, where it is a git checkout) and the machine
    (``machine``: CPU model and count)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("telescope", "torch", "numpy", "pandas", "pyarrow", "matplotlib",
                "scikit-learn", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    out["machine"] = machine()
    return out
