"""Clear errors at the door: every user mistake exits with code 2 and one line, every bug keeps
its traceback; configs are checked whole before the first point; absurd sweep sizes are
refused before they are built; the run metadata records the commit and the machine."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import tracemalloc

import pytest

from telescope.cli import main
from telescope.runs import executors
from telescope.runs.plan import MAX_POINTS, SweepTooLargeError, plan_sweep
from telescope.studies import REGISTRY, make_config, toy
from telescope.studies.config import check_generic

SMALL = ["--set", "data.n_train=40", "data.n_test=40", "ridges=0.1,1", "times=1,inf"]


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("telescope: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- exit code 2


@pytest.mark.parametrize("argv, needle", [
    (["study", "toy", "--workers", "0"], "expected a positive integer, got '0'"),
    (["study", "toy", "--executor", "dask"], "invalid choice: 'dask'"),
    (["report"], "the following arguments are required: DIR"),
    (["study"], "give a study NAME"),
    (["study", "toyy"], "unknown study 'toyy' (did you mean 'toy'?)"),
    (["study", "toy", "--set", "ridges"], "--set expects key=value, got 'ridges'"),
    (["study", "toy", "--set", "ridgez=1"], "unknown config key 'ridgez' of study 'toy'"),
    (["study", "toy", "--set", "seeds=two"], "--set seeds=two: expected an integer"),
    (["study", "toy", "--preset", "huge"], "unknown preset 'huge' for study 'toy'"),
    (["study", "toy", "--executor", "ray", "--workers", "2"], "--workers is for --executor"),
])
def test_user_mistakes_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    assert run([*argv, "--out", str(tmp_path / "x")] if argv[0] == "study" else argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_ray_missing_exits_2_with_the_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)        # "import ray" raises ImportError
    assert run(["study", "toy", "--executor", "ray", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'telescope[ray]'" in one_error_line(capsys)


def _broken_study(monkeypatch, **changes) -> None:
    monkeypatch.setitem(REGISTRY, "toy", dataclasses.replace(toy.STUDY, **changes))


def _bad_headline(df, config):
    return {"best": 1 / 0}


def test_a_bug_in_headline_shows_its_traceback_and_exits_1(monkeypatch, tmp_path, capsys):
    _broken_study(monkeypatch, headline=_bad_headline)
    out = tmp_path / "run"
    assert run(["study", "toy", "--out", str(out), *SMALL, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert "_bad_headline" in err and "the study's headline failed" in err
    assert "ZeroDivisionError" in (out / "report.html").read_text()


def _bad_points(config):
    return [{"ridge": r, "seed": 0} for r in config.ridges] + [None.keys()]


def test_a_bug_in_points_propagates(monkeypatch, tmp_path):
    _broken_study(monkeypatch, points=_bad_points)
    with pytest.raises(AttributeError, match="keys"):
        main(["study", "toy", "--out", str(tmp_path / "run"), *SMALL, "--no-progress"])


@dataclasses.dataclass
class BuggyConfig(toy.ToyConfig):
    def __post_init__(self) -> None:
        raise ValueError("an internal bug, not a user mistake")


def test_a_plain_value_error_is_a_bug_not_exit_2(monkeypatch, tmp_path):
    _broken_study(monkeypatch, config_cls=BuggyConfig)
    with pytest.raises(ValueError, match="internal bug"):
        main(["study", "toy", "--out", str(tmp_path / "run"), *SMALL])


def _run_point_raises(config, point, progress):
    raise RuntimeError("inside a point")


def test_a_bug_inside_a_point_is_a_failed_point(monkeypatch, tmp_path, capsys):
    _broken_study(monkeypatch, run_point=_run_point_raises)
    assert run(["study", "toy", "--out", str(tmp_path / "run"), *SMALL, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "4 point(s) failed" in err and "RuntimeError: inside a point" in err


# --------------------------------------------------------------------------- configs checked whole


@pytest.mark.parametrize("study, setting, needle", [
    ("toy", "data.n_train=-5", "data.n_train must be >= 1, got -5"),   # the study's own check
    ("toy", "data.n_train=0", "data.n_train must be >= 1, got 0"),
    ("toy", "ridges=nan", "ridges=nan: ridges must be a number, not NaN"),
    ("toy", "ridges=1,1e999", "ridges must be a finite number"),
    ("toy", "seed=-5", "seed=-5: seed must be >= 0"),
    ("toy", "data.noise=1e999", "data.noise must be a finite number"),
    ("toy", "data.noise=-1", "data.noise must be >= 0, got -1"),
    ("toy", "times=1,nan", "times must be a number, not NaN"),
    ("approximation", "lrs=", "lrs is empty but optimizers include sgd"),
    ("approximation", "data.size=0", "data.size must be >= 1"),
    ("approximation", "hidden=200,0", "hidden must be layer widths >= 1"),
    ("double-descent", "momentum=1.5", "momentum must lie in [0, 1), got 1.5"),
    ("double-descent", "data.seed=-1", "data.seed must be >= 0"),
    ("grokking", "polynomial.lr=-1", "polynomial.lr must be > 0"),
    ("grokking", "digits.classes=3", "digits.classes must be empty (all ten digits)"),
    ("grokking", "polynomial.width=0", "polynomial.width must be >= 1"),
    ("grokking-transformer", "mlp_ratio=0", "mlp_ratio must be >= 1"),
    ("grokking-transformer", "smoother_ridge=nan", "smoother_ridge must be a number"),
    ("mode-connectivity", "channels=0", "channels must be >= 1"),
    ("mode-connectivity", "lr=0", "lr must be > 0, got 0"),
    ("entropy-collapse", "n_heads=3", "d_model (64) must be a multiple"),
    ("slingshot", "train_fraction=1", "train_fraction must be"),
    ("lazy-regime", "n_probe=0", "n_probe must be >= 1"),
    ("trees-vs-nets", "net.epochs=0", "net.epochs must be >= 1"),
    ("trees-vs-nets", "trees.learning_rate=0", "trees.learning_rate must be > 0"),
    ("trees-vs-nets", "data.synthetic_n=50", "data.synthetic_n must be >= 102"),
    ("double-descent", "data.name=imagenet", "data.name must be one of mnist1d, digits"),
    ("double-descent", "device=gpu9", "device=gpu9: not a device"),
    ("approximation", "data.path=/data", "data.name=digits does not read files"),
    ("grokking-transformer", "kernel_method=fast", "kernel_method must be one of auto"),
    ("entropy-collapse", "data.name=words", "data.name must be one of mnist1d-patches"),
    ("ntk-double-descent", "ridge=nan", "ridge must be a number, not NaN"),
    ("ntk-double-descent", "data.patch=-4", "data.patch must"),
    ("ntk-double-descent", "data.patch=3", "data.patch must divide MNIST-1D's 40 samples"),
    ("ntk-double-descent", "n_heads=0", "n_heads must be >= 1, got 0"),
    ("ntk-double-descent", "momentum=-1", "momentum must be >= 0 and < 1"),
    ("ntk-double-descent", "device=gpu9", "device=gpu9: not a device"),
])
def test_absurd_values_are_refused_before_any_point(study, setting, needle, tmp_path, capsys):
    assert run(["study", study, "--out", str(tmp_path / "x"), "--set", setting]) == 2
    line = one_error_line(capsys)
    assert needle in line, line
    assert "cannot build" not in line                  # the check's message, not a wrapper
    assert not (tmp_path / "x").exists()


def test_generic_checks_follow_the_defaults():
    check_generic("times", (1.0, math.inf), default=(1.0, math.inf))     # inf is a default there
    with pytest.raises(ValueError, match="must be a finite number"):
        check_generic("ridges", (1.0, math.inf), default=(1.0,))
    check_generic("shift", -3, default=-1)                                # negative default
    check_generic("shift", -3, default=0, metadata={"allow_negative": True})
    with pytest.raises(ValueError, match="shift must be >= 0"):
        check_generic("shift", -3, default=0)
    with pytest.raises(ValueError, match="not NaN"):
        check_generic("times", (math.nan,), default=(math.inf,))


# --------------------------------------------------------------------------- sweep size


def test_a_seeds_typo_is_refused_at_once_without_memory(tmp_path, capsys):
    tracemalloc.start()
    try:
        assert run(["study", "toy", "--out", str(tmp_path / "x"), "--set",
                    "seeds=100000000"]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = one_error_line(capsys)
    assert "seeds=100000000" in line and "lower seeds" in line
    assert f"at most {MAX_POINTS:,} points" in line
    assert peak < 50e6
    assert not (tmp_path / "x").exists()


def test_the_count_is_checked_before_the_points_are_built(monkeypatch):
    asked: list[int] = []

    def points(config):
        asked.append(config.seeds)
        return toy.points(config)

    study = dataclasses.replace(toy.STUDY, points=points)
    config = make_config(study, "quick", {"seeds": "50000"})          # 5 ridges x 50,000
    with pytest.raises(SweepTooLargeError, match=r"has 250,000 points \(seeds=50000 x 5 points "
                                                 r"per seed\), more than the 100,000 a run may "
                                                 r"have: lower seeds"):
        plan_sweep(study, config)
    assert asked == [1]                                  # never built with 50,000 seeds

    ridges = ",".join(str(i) for i in range(60_000))
    config = make_config(study, "quick", {"ridges": ridges})
    with pytest.raises(SweepTooLargeError, match=r"\(60,000 points per seed x seeds=2\), more "
                                                 r".*: shorten ridges \(60,000 values\) or "
                                                 r"lower seeds"):
        plan_sweep(study, config)


def _estimate(config, point):
    n = config.data.n_train
    return 8 * (n * n + config.data.n_test * n) * 3


def test_memory_estimate_is_printed_and_absurd_sizes_refused(monkeypatch, tmp_path, capsys):
    _broken_study(monkeypatch, estimate_memory=_estimate)
    assert run(["study", "toy", "--out", str(tmp_path / "a"), *SMALL, "--no-progress",
                "--no-report"]) == 0
    assert "4 points, the largest needs about 76.8 kB" in capsys.readouterr().out

    assert run(["study", "toy", "--out", str(tmp_path / "b"), *SMALL,
                "--set", "data.n_train=10000000"]) == 2
    line = one_error_line(capsys)
    assert "(ridge=0.1 seed=0) needs about 2400.0 TB" in line and "of memory here" in line
    assert "lower the config's sizes" in line
    assert not (tmp_path / "b").exists()

    study = REGISTRY["toy"]
    config = make_config(study, "quick", {"data.n_train": "20000"})   # 10 GB per point
    with pytest.raises(SweepTooLargeError, match=r"x 4 points at once \(--workers 4\).*lower "
                                                 r"--workers"):
        plan_sweep(study, config, workers=4, memory_limit=32 * 10**9)
    assert plan_sweep(study, config, workers=2, memory_limit=32 * 10**9).memory == 9_984_000_000
    assert plan_sweep(study, config, workers=None, memory_limit=1).largest is not None  # Ray


# --------------------------------------------------------------------------- versions


def test_versions_record_the_machine_and_the_git_commit(tmp_path, monkeypatch):
    info = executors.versions()
    assert info["machine"].endswith(" CPUs") or info["machine"].endswith(" CPU")
    git = subprocess.run(["git", "--version"], capture_output=True)
    if git.returncode:
        pytest.skip("git is not installed")

    import telescope

    pkg = tmp_path / "checkout" / "telescope"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(telescope, "__file__", str(pkg / "__init__.py"))
    assert "git_commit" not in executors.versions()          # not a git checkout

    def git_(*args):
        return subprocess.run(["git", "-C", str(pkg.parent), "-c", "user.name=t",
                               "-c", "user.email=t@t", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git_("init", "-q")
    git_("add", ".")
    git_("commit", "-q", "-m", "x")
    head = git_("rev-parse", "HEAD")
    assert executors.versions()["git_commit"] == head
    (pkg / "__init__.py").write_text("# changed\n")
    assert executors.versions()["git_commit"] == head + "-dirty"


def test_run_json_has_git_commit_and_machine(tmp_path):
    out = tmp_path / "run"
    assert main(["study", "toy", "--out", str(out), *SMALL, "--no-progress",
                 "--no-report"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["versions"]["machine"] == executors.machine()
    commit = meta["versions"].get("git_commit")
    assert (commit is None) == (executors.git_commit() is None)
    if commit is not None:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    # each session keeps its own versions (a later resume must not relabel earlier points)
    assert main(["study", "toy", "--out", str(out), *SMALL, "--no-progress", "--no-report"]) == 0
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and [s["computed"] for s in sessions] == [4, 0]
    assert all(s["versions"]["machine"] == executors.machine() for s in sessions)


@pytest.mark.parametrize("argv, needle", [
    (["ntk", "--model", "cnn", "--n", "100000000"], "the [N, N] kernel of --n 100000000 points"),
    (["ntk", "--model", "transformer", "--n", "100000", "--output", "full"],
     "(or use --output trace)"),
])
def test_kernels_too_big_for_memory_are_refused_before_allocating(argv, needle, tmp_path,
                                                                  capsys):
    assert run([*argv, "--out", str(tmp_path / "x")]) == 2
    line = one_error_line(capsys)
    assert needle in line and "of memory here: lower --n" in line
    assert not (tmp_path / "x").exists()
