"""Saving a benchmark's rows as a JSON record that ``tools/readme_bench.py`` turns into the
README's tables: the rows plus what produced them (command line, commit, machine, date)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def save_record(path: str | os.PathLike, rows: list[dict], **extra: object) -> None:
    """Write ``{"argv", "commit", "machine", "date", "rows", **extra}`` atomically to ``path``
    (``commit`` gains ``+uncommitted`` when ``src/`` or ``bench/`` had changes)."""
    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                            capture_output=True, text=True, check=False).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                              "src", "bench"], cwd=here.parent, capture_output=True, text=True,
                             check=False).stdout.strip()
    if commit and changed:
        commit += "+uncommitted"   # src/ or bench/ differed from the commit when this ran
    record = {"argv": ["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]],
              "commit": commit or "unknown",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "date": datetime.date.today().isoformat(), "rows": rows, **extra}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)
