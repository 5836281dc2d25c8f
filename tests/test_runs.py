"""The study machinery: configs from presets and --set, run directories, resume after a kill,
atomic writes, local and Ray executors, figures and the self-contained HTML report.

Everything runs the small built-in ``toy`` study with tiny sizes (a point takes milliseconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from _oracles import np_relu_ntk

from telescope.cli import main
from telescope.errors import UsageError
from telescope.runs import RunStore, atomic_write, make_executor, point_key
from telescope.runs.executors import ExecutorUnavailableError
from telescope.studies import REGISTRY, Study, get_study, make_config, toy
from telescope.studies.config import config_from_dict, config_to_dict, parse_overrides

SMALL = ["--set", "data.n_train=40", "data.n_test=40", "ridges=0.1,1", "times=1,inf"]
N_POINTS = 4   # 2 ridges x 2 seeds
N_TIMES = 2


def toy_oracle(ridge: float, seed: int, t: float, n_train: int = 40, n_test: int = 40
               ) -> tuple[float, float]:
    """(train MSE, test MSE) of the toy study's point, recomputed with numpy: the NTK of a
    1-hidden-layer ReLU net, ``f_t = K_* (K + lambda I)^-1 (I - expm(-t (K + lambda I) / n)) y``
    (kernel ridge regression ``K_* (K + lambda I)^-1 y`` at t = inf) by ``np.linalg.solve``."""
    from telescope.data import teacher_regression

    data = teacher_regression(n_train, n_test, 16, noise=0.5, seed=seed, width=64,
                              dtype=torch.float64)
    x, x_test = data.x_train.numpy(), data.x_test.numpy()
    y, y_test = data.y_train.numpy(), data.y_test.numpy()
    k, k_st = np_relu_ntk(x, None, depth=1), np_relu_ntk(x_test, x, depth=1)
    a = k + ridge * np.eye(n_train)
    r = y if t == math.inf else y - scipy.linalg.expm(-t * a / n_train) @ y
    coef = np.linalg.solve(a, r)
    return float(((k @ coef - y) ** 2).mean()), float(((k_st @ coef - y_test) ** 2).mean())



def run_toy(out: Path, *extra: str, report: bool = False) -> int:
    """The toy study on 4 tiny points; figures and report (slow-ish) only when asked."""
    flags = [] if report else ["--no-report"]
    return main(["study", "toy", "--out", str(out), *SMALL, "--no-progress", *flags, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """results.parquet of an uninterrupted sequential run of :func:`run_toy`."""
    out = tmp_path_factory.mktemp("reference")
    assert run_toy(out) == 0
    return pd.read_parquet(out / "results.parquet")


def point_files(out: Path) -> list[Path]:
    return sorted((out / "points").glob("*.parquet"))


def temp_files(out: Path) -> list[Path]:
    return [p for d in (out, out / "points") if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".tmp-")]


@pytest.fixture
def counting_toy(monkeypatch):
    """Replace the registered toy study by one that counts (and can sabotage) run_point."""
    calls: list[dict] = []
    behaviour: dict = {"fail": None, "interrupt_after": None}

    def run_point(config, point, progress):
        calls.append(dict(point))
        if behaviour["interrupt_after"] is not None and \
                len(calls) > behaviour["interrupt_after"]:
            raise KeyboardInterrupt  # a run stopped in the middle of its next point
        if behaviour["fail"] is not None and behaviour["fail"](point):
            raise RuntimeError(f"sabotaged point {point}")
        return toy.run_point(config, point, progress)

    monkeypatch.setitem(REGISTRY, "toy", dataclasses.replace(toy.STUDY, run_point=run_point))
    return calls, behaviour


# --------------------------------------------------------------------------- end to end


def test_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_toy(out, report=True) == 0
    printed = capsys.readouterr().out
    assert f"report:  {out.resolve() / 'report.html'}" in printed
    # the plan, before the run: 4 points of 40 + 40 points; the estimate 8 * (15 * 40**2 +
    # 10 * 40 * 40) bytes of float64 kernels and their temporaries
    plan = printed.index("telescope study toy (quick): 4 points, the largest needs about "
                         "320.0 kB")
    assert plan < printed.index("4 of 4 points done")

    saved = json.loads((out / "config.json").read_text())
    assert saved["study"] == "toy" and saved["preset"] == "quick"
    assert saved["config"]["data"]["n_train"] == 40
    assert saved["config"]["ridges"] == [0.1, 1.0]
    assert len(point_files(out)) == N_POINTS

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == N_POINTS * N_TIMES
    assert list(df.columns[:2]) == ["ridge", "seed"]
    # sweep order: ridge-major, then seed; every row carries its point's keys
    assert df["ridge"].tolist() == [0.1] * 4 + [1.0] * 4
    assert df["seed"].tolist() == [0, 0, 1, 1] * 2
    assert np.isinf(df["t"]).sum() == N_POINTS
    # every row (t = 1 and converged) against the numpy recomputation
    for row in df.itertuples():
        train_mse, test_mse = toy_oracle(row.ridge, row.seed, row.t)
        assert row.train_mse == pytest.approx(train_mse, rel=1e-10), row
        assert row.test_mse == pytest.approx(test_mse, rel=1e-10), row

    assert (out / "toy_mse.png").stat().st_size > 0 and (out / "toy_mse.svg").stat().st_size > 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["points_done"] == meta["points_total"] == N_POINTS
    assert meta["figures"] == ["toy_mse.png"]
    assert temp_files(out) == []


def test_list_and_unknown_study(capsys):
    assert main(["study", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("toy ") and "quick|full" in line for line in lines)
    assert get_study("Toy") is REGISTRY["toy"] is toy.STUDY
    with pytest.raises(SystemExit) as exc:
        main(["study", "toyy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown study 'toyy'" in err and "did you mean 'toy'" in err


# --------------------------------------------------------------------------- resume


def test_resume_skips_finished_points(tmp_path, counting_toy, capsys):
    calls, _ = counting_toy
    out = tmp_path / "run"
    assert run_toy(out) == 0
    assert len(calls) == N_POINTS
    first = pd.read_parquet(out / "results.parquet")
    stamps = {p.name: p.stat().st_mtime_ns for p in point_files(out)}

    assert run_toy(out) == 0
    assert len(calls) == N_POINTS                       # nothing recomputed
    assert "0 computed now, 4 already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in point_files(out)} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), first)

    # one more seed: only its points run
    assert run_toy(out, "--seeds", "3", "--force") == 0  # more seeds: another config
    assert len(calls) == 2 * N_POINTS + 2


def test_interrupted_run_resumes_to_the_same_results(tmp_path, counting_toy, reference):
    calls, behaviour = counting_toy
    out = tmp_path / "run"
    behaviour["interrupt_after"] = len(calls) + 2
    assert run_toy(out) == 130                           # "killed" during the third point
    assert len(point_files(out)) == 2
    assert temp_files(out) == []
    assert len(pd.read_parquet(out / "results.parquet")) == 2 * N_TIMES

    behaviour["interrupt_after"] = None
    n_before = len(calls)
    assert run_toy(out) == 0
    assert len(calls) - n_before == N_POINTS - 2         # only the missing points ran
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), reference)


def test_sigkilled_run_loses_only_points_in_flight(tmp_path):
    """A real process killed with SIGKILL right after its first point file appears."""
    args = ["study", "toy", "--set", "data.n_train=600", "data.n_test=50", "ridges=0.1,1,10",
            "times=10,inf", "--no-progress", "--no-report"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-m", "telescope.cli", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not point_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = point_files(out)
    assert 1 <= len(done) < 6, "the run should have been killed mid-way"
    for f in done:                                       # every point file is complete
        assert len(pd.read_parquet(f)) == 2

    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    assert main([*args, "--out", str(out)]) == 0         # resumes
    assert temp_files(out) == []
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"),
                                  pd.read_parquet(reference / "results.parquet"))
    meta = json.loads((out / "run.json").read_text())
    assert meta["sessions"][-1]["skipped"] == len(done)


# --------------------------------------------------------------------------- files


def test_atomic_write_never_leaves_partial_files(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"old"))

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]

    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.bin", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_stale_temp_files_are_removed_and_keys_are_stable(tmp_path):
    out = tmp_path / "run"
    (out / "points").mkdir(parents=True)
    stale = out / "points" / ".tmp-0123.parquet.x1y2"   # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a parquet file")
    assert run_toy(out) == 0
    assert not stale.exists()

    point = {"seed": 1, "ridge": 0.1}
    assert point_key(point) == point_key({"ridge": 0.1, "seed": 1})
    assert point_key(point) == hashlib.sha1(b'{"ridge":0.1,"seed":1}').hexdigest()[:16]
    assert (out / "points" / f"{point_key(point)}.parquet").is_file()
    assert RunStore(out).point_info(out / "points" / f"{point_key(point)}.parquet")[
        "point"] == point


def test_config_mismatch_is_an_error_unless_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_toy(out) == 0
    with pytest.raises(SystemExit) as exc:
        run_toy(out, "--set", "data.noise=0.1")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "different config" in err and "data.noise: 0.5 -> 0.1" in err and "--force" in err
    assert run_toy(out, "--set", "data.noise=0.1", "--force") == 0
    assert json.loads((out / "config.json").read_text())["config"]["data"]["noise"] == 0.1
    assert len(point_files(out)) == N_POINTS


def test_failed_points_are_reported_and_retried(tmp_path, counting_toy, capsys):
    calls, behaviour = counting_toy
    out = tmp_path / "run"
    behaviour["fail"] = lambda point: point["seed"] == 1
    assert run_toy(out, report=True) == 1                # non-zero exit at the end
    err = capsys.readouterr().err
    assert "point ridge=0.1 seed=1 failed" in err and "sabotaged point" in err
    assert "run_point" in err                            # traceback summary: the frames
    assert len(calls) == N_POINTS and len(point_files(out)) == 2
    meta = json.loads((out / "run.json").read_text())
    assert [f["point"]["seed"] for f in meta["failed"]] == [1, 1]
    assert "RuntimeError" in meta["failed"][0]["traceback"]
    assert "2 failed" in (out / "report.html").read_text()

    behaviour["fail"] = None
    assert run_toy(out) == 0
    assert len(calls) == N_POINTS + 2                    # only the failed points ran again
    assert json.loads((out / "run.json").read_text())["failed"] == []


def test_report_rebuilds_from_saved_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_toy(out) == 0
    assert "make it with: telescope report" in capsys.readouterr().out
    assert not (out / "report.html").exists()
    results = pd.read_parquet(out / "results.parquet")
    (out / "results.parquet").unlink()
    assert main(["report", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    for name in ("report.html", "toy_mse.png", "toy_mse.svg"):
        assert (out / name).stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), results)

    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    assert "not a run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- configs


@dataclass
class DataCfg:
    name: str = "digits"
    path: Path | None = None
    classes: tuple[int, ...] = (3, 5)


@dataclass
class Cfg:
    data: DataCfg = field(default_factory=DataCfg)
    widths: tuple[int, ...] = (4, 8)
    lrs: list[float] = field(default_factory=lambda: [0.1])
    pair: tuple[int, float] = (1, 0.5)
    lr: float = 0.1
    steps: int = 100
    label_noise: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"
    max_time: float | None = None
    seeds: int = 1
    seed: int = 0


CFG_STUDY = Study(name="cfg-test", description="config parsing", config_cls=Cfg,
                  presets={"quick": {"steps": 10, "data.classes": [0, 1]},
                           "full": {"data": {"name": "mnist1d"}, "widths": [16, 32]}},
                  points=lambda c: [{"seed": c.seed}], run_point=lambda c, p, pr: [],
                  figures=lambda df, c, d: [], headline=lambda df, c: {}, guide="")


def test_make_config_presets_and_typed_overrides():
    c = make_config(CFG_STUDY, "quick", {})
    assert c.steps == 10 and c.data.classes == (0, 1) and c.widths == (4, 8)
    c = make_config(CFG_STUDY, "full", {})
    assert c.data.name == "mnist1d" and c.widths == (16, 32) and isinstance(c.widths, tuple)

    c = make_config(CFG_STUDY, "quick", parse_overrides([
        "widths=2,4,8", "lrs=[0.5, 1e-2]", "pair=3,0.25", "lr=1e-3", "steps=1e3",
        "label_noise=yes", "optimizer=adamw", "max_time=2.5", "data.path=~/x.csv",
        "data.classes=7", "data.name=my set", "seeds=3"]))
    assert c.widths == (2, 4, 8) and c.lrs == [0.5, 0.01] and c.pair == (3, 0.25)
    assert c.lr == 1e-3 and c.steps == 1000 and isinstance(c.steps, int)
    assert c.label_noise is True and c.optimizer == "adamw" and c.max_time == 2.5
    assert c.data.path == Path("~/x.csv").expanduser() and c.data.classes == (7,)
    assert c.data.name == "my set" and c.seeds == 3
    c = make_config(CFG_STUDY, None, {"max_time": "none", "widths": "[]", "label_noise": "0"})
    assert c.max_time is None and c.widths == () and c.label_noise is False

    # config.json round trip
    assert config_from_dict(Cfg, json.loads(json.dumps(config_to_dict(c)))) == c


@pytest.mark.parametrize("overrides, message", [
    ({"stepz": "1"}, r"unknown config key 'stepz' of study 'cfg-test' \(did you mean 'steps'\?\)"
                     r"; valid keys: data\.name, data\.path, data\.classes, widths"),
    ({"data.nam": "x"}, r"did you mean 'data\.name'"),
    ({"steps.x": "1"}, r"unknown config key 'steps\.x'"),
    ({"steps": "ten"}, r"--set steps=ten: expected an integer, got 'ten'"),
    ({"steps": "1.5"}, r"expected an integer"),
    ({"lr": "fast"}, r"expected a number"),
    ({"label_noise": "maybe"}, r"expected a boolean"),
    ({"optimizer": "adam"}, r"expected one of 'sgd', 'adamw'"),
    ({"widths": "4,x"}, r"expected an integer, got 'x'"),
    ({"pair": "1,2,3"}, r"expected 2 comma-separated values"),
    ({"data": "x"}, r"group of settings"),
    ({"seeds": "0"}, r"seeds must be a positive integer"),
])
def test_make_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(CFG_STUDY, "quick", overrides)


@dataclass
class NeedsValue:
    n: int
    seeds: int = 1
    seed: int = 0


def test_config_json_format_and_fields_without_default():
    # config.json keeps its format (existing run directories resume): pinned
    c = make_config(CFG_STUDY, "quick", {"data.path": "/d", "max_time": "2.5", "pair": "2,1e-3"})
    assert json.dumps(config_to_dict(c)) == (
        '{"data": {"name": "digits", "path": "/d", "classes": [0, 1]}, "widths": [4, 8], '
        '"lrs": [0.1], "pair": [2, 0.001], "lr": 0.1, "steps": 10, "label_noise": false, '
        '"optimizer": "sgd", "max_time": 2.5, "seeds": 1, "seed": 0}')
    with pytest.raises(ValueError, match=r"config key 'widths': expected an integer, got 'x'"):
        config_from_dict(Cfg, {**config_to_dict(c), "widths": [1, "x"]})

    study = Study(name="needs-value", description="", config_cls=NeedsValue, presets={},
                  points=lambda c: [], run_point=lambda c, p, pr: [],
                  figures=lambda df, c, d: [], headline=lambda df, c: {}, guide="")
    with pytest.raises(ValueError, match=r"cannot build NeedsValue: n: .*every config field "
                                         r"needs a default"):
        make_config(study, None, {})
    assert make_config(study, None, {"n": "0x10"}).n == 16


def test_cli_config_errors(tmp_path, capsys):
    for argv, message in [
        (["--set", "ridges"], "--set expects key=value, got 'ridges'"),
        (["--set", "nope=1"], "unknown config key 'nope' of study 'toy'"),
        (["--preset", "huge"], "unknown preset 'huge' for study 'toy'; presets: quick, full"),
        (["--set", "ridges=-1"], "ridges must be a non-empty list"),
        (["--address", "auto"], "--address is for --executor ray"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["study", "toy", "--out", str(tmp_path / "x"), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_absurd_sizes_are_refused_before_any_point_runs(tmp_path, counting_toy, capsys):
    calls, _ = counting_toy
    out = tmp_path / "huge"
    with pytest.raises(SystemExit) as exc:
        main(["study", "toy", "--out", str(out), "--set", "data.n_train=100000000",
              "data.n_test=1", "ridges=0.1", "--no-progress", "--no-report"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # 8 * 15 * (1e8)**2 bytes of [n_train, n_train] float64 temporaries: 1.2e18 B = 1200000 TB
    assert "the largest point of study 'toy' (ridge=0.1 seed=0) needs about 1200000.0 TB" in err
    assert "of memory here" in err and "Traceback" not in err
    assert calls == [] and not out.exists()


def test_default_out_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "toy", *SMALL, "--no-progress", "--no-report"]) == 0
    assert (tmp_path / "out" / "toy-quick" / "results.parquet").is_file()
    assert str(tmp_path / "out" / "toy-quick" / "results.parquet") in capsys.readouterr().out


# --------------------------------------------------------------------------- executors


def test_two_local_workers_match_sequential(tmp_path, reference):
    par = tmp_path / "par"
    assert run_toy(par, "--workers", "2") == 0
    meta = json.loads((par / "run.json").read_text())
    assert "2 worker processes" in meta["sessions"][-1]["executor"]
    pd.testing.assert_frame_equal(pd.read_parquet(par / "results.parquet"), reference,
                                  rtol=1e-10)


def test_ray_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)        # "import ray" raises ImportError
    with pytest.raises(ExecutorUnavailableError, match=r"pip install 'telescope\[ray\]'"):
        make_executor("ray")


def test_ray_executor_on_a_local_instance(tmp_path, reference):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    assert run_toy(out, "--executor", "ray") == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["sessions"][-1]["executor"].startswith("ray on a local instance")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), reference,
                                  rtol=1e-10)


# --------------------------------------------------------------------------- the report


def test_report_html_is_self_contained_and_renders(tmp_path):
    out = tmp_path / "run"
    assert run_toy(out, report=True) == 0
    page = (out / "report.html").read_text()
    assert "telescope study: toy" in page and toy.STUDY.description in page
    assert "How to read this" in page and "<strong>Panel a</strong>" in page
    assert "best ridge" in page and "data.n_train" in page and "4 of 4 points done" in page
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"\bhref\s*=", page)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.I)
    assert not re.search(r"url\(", page)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium binary: the headless rendering check is skipped")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (out / "report.html").resolve().as_uri()],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 0.05                              # not blank
    # the page itself is grey-scale: strongly coloured pixels come from the embedded figure
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 0.3).sum() > 2000


def test_config_classes_check_their_declared_ranges_when_called_directly():
    """A config class called in Python (not built by make_config) refuses a value out of its
    declared range with the same one-line message, before its own __post_init__ runs."""
    from telescope.studies.double_descent import DoubleDescentConfig
    from telescope.studies.slingshot import SlingshotConfig

    with pytest.raises(UsageError, match=r"^n_heads must be >= 1, got 0$"):
        SlingshotConfig(n_heads=0)      # before __post_init__'s d_model % n_heads
    with pytest.raises(UsageError, match=r"^every value of widths must be >= 1, got 4,0$"):
        DoubleDescentConfig(widths=(4, 0))
    assert SlingshotConfig().n_heads == 4
