"""Memory of the benchmark process: its resident set now, its growth during a call (sampled by a
thread), and its peak since it started."""

from __future__ import annotations

import os
import threading
import time


def rss() -> int:
    """Resident set size of this process now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn, interval: float = 0.01):
    """``(result, seconds, peak RSS growth in bytes)`` of one call of ``fn``, the resident set
    sampled every ``interval`` seconds by a thread."""
    base = rss()
    top, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            top[0] = max(top[0], rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return out, seconds, max(top[0], rss()) - base


def peak_rss_gb() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would carry over the peak of
    the process that spawned it across ``exec``), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20   # kB
    raise RuntimeError("no VmHWM in /proc/self/status")
