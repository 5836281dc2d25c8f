"""``telescope.ntk(..., out=PATH)`` killed with SIGKILL in the middle of a computation (a separate
process, no chance to clean up), locally and with ``executor="ray"``: the rerun keeps every block
recorded before the kill, computes only the others, and gives the in-memory kernel; the kill
leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import telescope

SCRIPT = textwrap.dedent("""
    import sys, torch, telescope
    from telescope.models import MLP
    torch.manual_seed(0)
    model = MLP(6, [32], 3).double()
    x = torch.randn(48, 6, dtype=torch.float64)
    if sys.argv[3] == "slow":   # slow each block's write down so that the kill lands mid-run
        import time
        from telescope.kernels import _blocks
        write = _blocks.KernelFile.write
        def slow(self, *args):
            time.sleep(0.15)
            write(self, *args)
        _blocks.KernelFile.write = slow
    executor = None if sys.argv[2] == "local" else "ray"
    if executor:
        import ray
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    telescope.ntk(model, x, out=sys.argv[1], block_size=6, executor=executor)
""")


def _model_and_data():
    from telescope.models import MLP

    torch.manual_seed(0)
    model = MLP(6, [32], 3).double()
    x = torch.randn(48, 6, dtype=torch.float64)
    return model, x


def _recorded(path: Path) -> list[tuple[int, int]]:
    progress = path.with_name(path.name + ".progress.json")
    try:
        return [tuple(b) for b in json.loads(progress.read_text())["blocks"]]
    except (OSError, ValueError, KeyError):
        return []


def _session(sid: int) -> set[int]:
    """Every live process of session ``sid`` (from /proc; the run is started as its leader)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.add(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_killed_kernel_resumes_from_the_blocks_it_recorded(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    path = tmp_path / "k.npy"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(path), executor, "slow"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    total = 8 * 9 // 2  # block pairs on and above the diagonal, 48 / 6 = 8 blocks a side
    deadline = time.monotonic() + 120
    while len(_recorded(path)) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no block recorded within two minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _recorded(path)
    assert 3 <= len(kept) < total, "the kill must land mid-run"
    on_disk = np.load(path)
    # a recorded block is what telescope computed; mark them to see that none is recomputed
    marked = np.array(on_disk)
    for a, b in kept:
        marked[a:a + 6, b:b + 6] = -1.0
        marked[b:b + 6, a:a + 6] = -1.0
    np.save(path, marked)
    model, x = _model_and_data()
    ref = telescope.ntk(model, x).numpy()
    for a, b in kept:
        np.testing.assert_allclose(on_disk[a:a + 6, b:b + 6], ref[a:a + 6, b:b + 6],
                                   rtol=1e-12, atol=1e-13)
    rerun = subprocess.run([sys.executable, str(script), str(path), executor, "fast"], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = np.array(np.load(path))
    for a, b in kept:
        assert (got[a:a + 6, b:b + 6] == -1.0).all() and (got[b:b + 6, a:a + 6] == -1.0).all()
        got[a:a + 6, b:b + 6] = ref[a:a + 6, b:b + 6]
        got[b:b + 6, a:a + 6] = ref[b:b + 6, a:a + 6]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert len(_recorded(path)) == total
    # nothing the killed run started outlives it, except Ray's two agents (spawned by the
    # raylet, they exit on their own a minute or two after noticing it is gone): killed here
    deadline = time.monotonic() + 30
    alive = _session(proc.pid)
    while alive and time.monotonic() < deadline:
        if all(_name(p).startswith(RAY_AGENTS) for p in alive):
            break
        time.sleep(0.2)
        alive = _session(proc.pid)
    names = {p: _name(p) for p in alive}
    for p, name in names.items():
        if name.startswith(RAY_AGENTS):
            os.kill(p, signal.SIGKILL)
    assert all(name.startswith(RAY_AGENTS) for name in names.values()), (
        f"processes left after the kill: {sorted(names.values())}")


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
