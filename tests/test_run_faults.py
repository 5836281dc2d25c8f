"""Run directories under real faults: damaged and missing files, foreign directories, a full
disk, read-only and misplaced ``--out``, and parents of worker processes killed with SIGKILL or
SIGTERM. Every test uses the tiny ``toy`` study (or a copy of it whose points can be slowed).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from telescope.cli import main
from telescope.runs import RunStore
from telescope.runs import store as store_module
from telescope.runs.store import RunInUseError
from telescope.studies import REGISTRY, toy

SMALL = ["--set", "data.n_train=40", "data.n_test=40", "ridges=0.1,1", "times=1,inf"]
N_POINTS = 4   # 2 ridges x 2 seeds
ROOT = Path(__file__).resolve().parents[1]


def run_toy(out: Path, *extra: str) -> int:
    return main(["study", "toy", "--out", str(out), *SMALL, "--no-progress", "--no-report",
                 *extra])


def point_files(out: Path) -> list[Path]:
    return sorted((out / "points").glob("*.parquet"))


def exit_code(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A complete toy run (4 points, 8 rows); tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_toy(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# --------------------------------------------------------------------------- report never loses


WRITE_ONLY = Path("/proc/sys/vm/drop_caches")   # mode 0200: EACCES on read, root included


def _make_unreadable(path: Path) -> None:
    """Make the point file ``path`` unreadable for real: ``chmod 0``; where that does not stop
    this process (root), replace it by a link to a write-only kernel file, which refuses reads
    to root too. Skips when neither gives EACCES."""
    path.chmod(0)
    with contextlib.suppress(PermissionError):
        path.read_bytes()
        path.chmod(0o644)
        path.unlink()
        path.symlink_to(WRITE_ONLY)
        with contextlib.suppress(PermissionError):
            path.read_bytes()
            pytest.skip("no file here refuses reads to this process")


@pytest.mark.parametrize("damage", ["no-points", "truncated", "unreadable"])
def test_report_on_a_damaged_run_leaves_results_byte_identical(run_copy, damage, capsys):
    out = run_copy
    before = (out / "results.parquet").read_bytes()
    victim = point_files(out)[1]
    if damage == "no-points":
        shutil.rmtree(out / "points")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        _make_unreadable(victim)

    code = main(["report", str(out)])
    err = capsys.readouterr().err
    assert (out / "results.parquet").read_bytes() == before
    assert (out / "report.html").is_file()
    if damage == "no-points":
        assert code == 0
        assert f"{out / 'points'} is missing" in err
    else:
        assert code == 1
        assert victim.exists() or victim.is_symlink()  # report deletes nothing
        assert "1 file(s)" in err and str(victim) in err and "left as it is" in err
        if damage == "unreadable":
            assert "Permission denied" in err
        assert "could not be read" in (out / "report.html").read_text()
        # the report shows all 8 rows of results.parquet, not the 6 of the readable points
        meta = json.loads((out / "run.json").read_text())
        assert meta["points_done"] == N_POINTS


def test_report_on_a_read_only_run_is_one_line(run_copy, capsys):
    before = (run_copy / "results.parquet").read_bytes()
    with read_only_dir(run_copy):
        assert exit_code(["report", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"telescope: error: cannot write to the run directory {run_copy} (")
    assert "make it writable" in err and len(err.strip().splitlines()) == 1
    assert (run_copy / "results.parquet").read_bytes() == before


def test_report_rebuilds_results_only_when_nothing_is_lost(run_copy, capsys):
    out = run_copy
    full = pd.read_parquet(out / "results.parquet")
    # a run killed between a point file and results.parquet: the report catches up
    store = RunStore(out)
    points = [{"ridge": 0.1, "seed": 0}, {"ridge": 0.1, "seed": 1}]
    store.write_results(points, {k: v for k, v in store.load_points(points).items()})
    assert len(pd.read_parquet(out / "results.parquet")) == 4
    assert main(["report", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), full)

    # while a run holds the directory, the report does not rewrite anything of it
    (out / "results.parquet").unlink()
    with RunStore(out) as holder:
        holder.acquire_lock()
        assert main(["report", str(out)]) == 0
        assert "a run is writing" in capsys.readouterr().err
        assert not (out / "results.parquet").exists()


def test_sweep_keeps_a_damaged_point_file_aside_and_recomputes_it(run_copy, capsys):
    out = run_copy
    victim = point_files(out)[2]
    results = (out / "results.parquet").read_bytes()
    damaged = victim.read_bytes()[:100]
    victim.write_bytes(damaged)
    assert run_toy(out) == 0
    err = capsys.readouterr().err
    assert f"{victim} cannot be read" in err and "its point runs again" in err
    kept = sorted((out / "set-aside").iterdir(), key=lambda p: p.name.endswith("results.parquet"))
    assert kept[0].name.endswith(f"points-{victim.name}") and kept[0].read_bytes() == damaged
    # results.parquet held the damaged point's rows too: it is kept aside, not overwritten
    assert len(kept) == 2 and kept[1].read_bytes() == results
    assert "holds 8 rows, the readable point files 6" in err
    assert len(pd.read_parquet(victim)) == 2                  # recomputed
    assert len(pd.read_parquet(out / "results.parquet")) == 2 * N_POINTS


def test_sweep_keeps_a_results_file_that_holds_more_than_the_points(run_copy, capsys):
    out = run_copy
    before = (out / "results.parquet").read_bytes()
    shutil.rmtree(out / "points")
    assert run_toy(out) == 0
    assert "was not rebuilt from the point files" in capsys.readouterr().err
    kept = [p for p in (out / "set-aside").iterdir() if p.name.endswith("results.parquet")]
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert len(point_files(out)) == N_POINTS


# --------------------------------------------------------------------------- foreign directories


def test_force_never_touches_a_directory_that_is_not_a_telescope_run(tmp_path, capsys):
    out = tmp_path / "project"
    (out / "points").mkdir(parents=True)
    mine = out / "points" / "mine.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(mine)
    (out / "config.json").write_text('{"name": "my app", "debug": true}')
    assert exit_code(["study", "toy", "--out", str(out), *SMALL, "--force",
                      "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'config.json'} is not a telescope run's config" in err
    assert "no 'study' and no 'preset' and no 'config' key" in err and "study None" not in err
    assert mine.is_file() and sorted(p.name for p in out.iterdir()) == ["config.json", "points"]


@pytest.mark.parametrize("content, needle", [
    ("[1, 2, 3]", "a JSON list"),
    ("not json {", "not valid JSON"),
    ('{"study": 3, "preset": null, "config": {}}', "'study' is 3"),
])
def test_config_json_that_is_not_a_run_is_refused_clearly(tmp_path, capsys, content, needle):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(content)
    for argv in (["study", "toy", "--out", str(out), *SMALL, "--force"], ["report", str(out)]):
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("telescope: error: ") and "Traceback" not in err
        assert f"{out / 'config.json'} is not a telescope run's config ({needle}" in err
    assert (out / "config.json").read_text() == content


def test_a_non_empty_directory_without_config_is_refused(tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert exit_code(["study", "toy", "--out", str(out), *SMALL, "--force"]) == 2
    assert "is not empty and holds no telescope run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # an empty directory, or one left by a run killed before its config.json, is fine
    empty = tmp_path / "empty"
    (empty / "points").mkdir(parents=True)
    assert run_toy(empty) == 0


def test_force_may_discard_another_telescope_studys_run(run_copy, capsys):
    out = run_copy
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "study": "double-descent"}))
    assert exit_code(["study", "toy", "--out", str(out), *SMALL, "--no-progress",
                      "--no-report"]) == 2
    assert "study 'double-descent', not 'toy'" in capsys.readouterr().err
    assert run_toy(out, "--force") == 0
    assert json.loads((out / "config.json").read_text())["study"] == "toy"


def test_a_second_run_on_a_locked_directory_is_refused(run_copy):
    with RunStore(run_copy) as holder:
        holder.acquire_lock()
        with pytest.raises(RunInUseError, match=r"being written by another telescope run \(pid "
                                                rf"{os.getpid()}\)"):
            RunStore(run_copy).prepare("toy", "quick", {}, force=True)
    assert point_files(run_copy)                              # nothing was cleared


# --------------------------------------------------------------------------- --out problems


@contextlib.contextmanager
def read_only_dir(path: Path):
    """``path`` made read-only for real (chmod, or ``chattr +i`` where root ignores modes);
    skips the test where neither stops a write."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    immutable = False
    try:
        probe = path / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(path)],
                                                capture_output=True).returncode:
                pytest.skip("cannot make a read-only directory here (root, no chattr +i)")
            immutable = True
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.mark.parametrize("command", [
    ["study", "toy", *SMALL, "--no-progress"],
    ["study", "ntk-width", "--set", "data.n_train=4", "widths=8", "--no-progress"],
    ["ntk", "--model", "mlp", "--n", "4"],
    ["study", "approximation", "--set", "steps=1", "--no-progress"],
])
def test_out_that_is_a_file_or_under_a_file_or_read_only(tmp_path, capsys, command):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a directory: choose another --out"),
             (a_file / "sub", f"{a_file} is a file, not a directory; choose another --out")]
    for out, needle in cases:
        assert exit_code([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("telescope: error: ") and needle in err, err
        assert len(err.strip().splitlines()) == 1
    with read_only_dir(tmp_path / "ro") as ro:
        for out in (ro, ro / "sub"):
            assert exit_code([*command, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("telescope: error: ") and "Traceback" not in err
            assert "writable --out" in err and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "x"


# --------------------------------------------------------------------------- disk full


def test_disk_full_fails_points_cleanly_then_one_line_with_what_was_saved(tmp_path, capsys,
                                                                         monkeypatch):
    real = store_module.atomic_write
    saved_points: list[Path] = []

    def filling_writer(path, write):
        """The disk fills up once the first point file is written."""
        if saved_points:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        result = real(path, write)
        if Path(path).parent.name == "points":
            saved_points.append(Path(path))
        return result

    monkeypatch.setattr(store_module, "atomic_write", filling_writer)
    out = tmp_path / "run"
    assert exit_code(["study", "toy", "--out", str(out), *SMALL, "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("telescope: error: cannot write run.json, results.parquet in")
    assert "No space left on device" in last and "1 of 4 points are saved" in last
    assert "3 failed or could not be saved" in last and "re-run the same command" in last
    assert "Traceback" not in err and err.count("cannot save its rows") == 3
    assert point_files(out) == saved_points

    monkeypatch.setattr(store_module, "atomic_write", real)      # space freed: it resumes
    assert run_toy(out) == 0
    assert "3 computed now, 1 already done" in capsys.readouterr().out


# --------------------------------------------------------------------------- killed parents

SLOW_STUDY = '''
"""toy, but the points of seed >= 1 sleep SLOW_TOY_SLEEP seconds first."""
import dataclasses
import os
import time

from telescope.studies import toy


def run_point(config, point, progress):
    if point["seed"] >= 1:
        time.sleep(float(os.environ.get("SLOW_TOY_SLEEP", "0")))
    return toy.run_point(config, point, progress)


STUDY = dataclasses.replace(toy.STUDY, name="slow-toy", run_point=run_point)
'''


def _marked_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() not in (proc / "environ").read_bytes():
                continue
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if int((proc / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    out.append(int(proc.name))
    return out


def _start_slow_run(tmp_path: Path, marker: str) -> tuple[subprocess.Popen, Path]:
    """``telescope study slow-toy --workers 2`` in a subprocess, returned once its two fast
    points are saved and its two slow ones are running in the workers."""
    (tmp_path / "slow_toy.py").write_text(textwrap.dedent(SLOW_STUDY))
    out = tmp_path / "run"
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import slow_toy; "
              "from telescope.studies import register; register(slow_toy.STUDY); "
              "from telescope.cli import main; sys.exit(main())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "SLOW_TOY_SLEEP": "300",
           "TELESCOPE_TEST_MARKER": marker}
    proc = subprocess.Popen([sys.executable, "-c", script, "study", "slow-toy", "--out", str(out),
                             *SMALL, "--workers", "2", "--no-progress", "--no-report"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(point_files(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert len(point_files(out)) == 2
    return proc, out


def _assert_no_worker_left(marker: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _marked_processes(marker)
    for pid in left:  # clean up before failing
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes left alive: {left}"


pytestmark_linux = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                      reason="finds processes through /proc")


@pytestmark_linux
def test_sigkill_of_the_parent_ends_its_workers(tmp_path):
    marker = f"sigkill-{os.getpid()}-{time.monotonic_ns()}"
    proc, out = _start_slow_run(tmp_path, marker)
    workers = [pid for pid in _children(proc.pid) if pid in _marked_processes(marker)]
    try:
        assert len(workers) >= 2                  # the two workers (and a resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _assert_no_worker_left(marker)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert len(point_files(out)) == 2


@pytestmark_linux
def test_sigterm_of_the_parent_stops_cleanly_and_the_run_resumes(tmp_path, monkeypatch,
                                                                 capsys):
    marker = f"sigterm-{os.getpid()}-{time.monotonic_ns()}"
    proc, out = _start_slow_run(tmp_path, marker)
    try:
        assert len(_marked_processes(marker)) >= 3        # the parent and its two workers
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143
    assert (f"telescope: terminated (SIGTERM); 2 of 4 points are saved in {out}; re-run the "
            "same command to resume") in err.splitlines()
    assert "Traceback" not in err
    _assert_no_worker_left(marker, seconds=2.0)
    meta = json.loads((out / "run.json").read_text())
    assert meta["points_done"] == 2 and meta["sessions"][-1]["computed"] == 2
    assert meta["failed"] == []

    # the same command again resumes: only the two slow points run (without sleeping now)
    spec = importlib.util.spec_from_file_location("slow_toy", tmp_path / "slow_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(REGISTRY, "slow-toy", module.STUDY)
    monkeypatch.setenv("SLOW_TOY_SLEEP", "0")
    assert main(["study", "slow-toy", "--out", str(out), *SMALL, "--no-progress",
                 "--no-report"]) == 0
    assert "2 computed now, 2 already done" in capsys.readouterr().out


_CALLS: list[dict] = []


def _terminate_on_third_point(config, point, progress):
    _CALLS.append(point)
    if len(_CALLS) == 3:
        os.kill(os.getpid(), signal.SIGTERM)    # a real signal, delivered to this process
        time.sleep(5)                           # the handler interrupts this sleep
    return toy.run_point(config, point, progress)


def test_sigterm_of_a_sequential_run_keeps_the_finished_points(tmp_path, monkeypatch, capsys):
    import dataclasses

    _CALLS.clear()
    monkeypatch.setitem(REGISTRY, "toy", dataclasses.replace(
        toy.STUDY, run_point=_terminate_on_third_point))
    out = tmp_path / "run"
    start = time.monotonic()
    assert run_toy(out) == 143
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert (f"telescope: terminated (SIGTERM); 2 of 4 points are saved in {out.resolve()}; "
            "re-run the same command to resume") in err.splitlines()
    assert len(point_files(out)) == 2
    assert json.loads((out / "run.json").read_text())["sessions"][-1]["computed"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # restored after main()


@pytestmark_linux
def test_a_worker_whose_parent_dies_exits_without_prctl(tmp_path):
    """The portable fallback alone (prctl skipped): the watchdog thread notices the parent's
    death within a second."""
    flag = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import os, sys, time
        from telescope.runs import executors
        executors.WATCHDOG_SECONDS = 0.1
        if os.fork():                  # the parent: wait for the child to be ready, then die
            while not os.path.exists({str(flag)!r}):
                time.sleep(0.01)
            os._exit(0)
        sys.platform = "darwin"        # no prctl: only the watchdog
        executors._die_with_parent(os.getppid())
        open({str(flag)!r} + ".tmp", "w").write(str(os.getpid()))
        os.replace({str(flag)!r} + ".tmp", {str(flag)!r})
        time.sleep(60)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    child = int(flag.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the orphaned worker did not exit")

