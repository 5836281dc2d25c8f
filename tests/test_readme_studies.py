"""tools/readme_studies.py on tiny runs made by the CLI: it rewrites only the marked Studies table,
each row carries its study's headline numbers (read here from the same results), missing or
unfinished runs get no row and a warning, and --check passes on the result and fails on a
hand-edited table or a missing run."""

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from telescope.cli import main as telescope
from telescope.studies import get_study
from telescope.studies.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_studies",
                                               ROOT / "tools" / "readme_studies.py")
rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)

STUDIES = ("ntk-double-descent", "toy", "double-descent")   # the table of these tests
RUNS = {
    "toy": ["--seeds", "1", "--set", "data.n_train=60", "data.n_test=60", "ridges=0.01,1",
            "times=10,inf"],
    "double-descent": ["--seeds", "2", "--set", "widths=2,16", "steps=30", "evals=2",
                       "data.n_train=40", "data.n_test=30"],
}

README = """# title

## Studies

Hand-written prose stays.

<!-- studies:begin -->
| `double-descent` | typed by hand: peak at width 12 (2.43) | 4.9 min |
<!-- studies:end -->

## API stays as it is
"""


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("studies")
    for name, args in RUNS.items():
        assert telescope(["--threads", "1", "study", name, "--preset", "quick", "--out",
                          str(runs / name), "--no-progress", "--no-report", *args]) == 0
    return runs


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(rs, "STUDIES", STUDIES)


def _copy(runs_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir, runs)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return runs, readme


def _headline(run):
    saved = json.loads((run / "config.json").read_text())
    study = get_study(saved["study"])
    config = config_from_dict(study.config_cls, saved["config"])
    return study.headline(pd.read_parquet(run / "results.parquet"), config)


def _row(text, name):
    (row,) = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    return row


def test_writes_rows_from_the_headlines_and_check_passes(runs_dir, tmp_path, table, capsys):
    runs, readme = _copy(runs_dir, tmp_path)
    args = [str(runs), "--readme", str(readme)]
    assert rs.main(args) == 0
    text = readme.read_text()
    before, _, rest = text.partition(rs.BEGIN)
    inside, _, after = rest.partition(rs.END)
    assert before == README.split(rs.BEGIN)[0] and after == README.split(rs.END)[1]
    assert "typed by hand" not in text
    assert "| study | what it shows (quick preset) | quick wall time |" in inside
    assert _row(inside, "ntk-double-descent") == "| `ntk-double-descent` | the answer above | " \
                                                 "see above |"

    h = _headline(runs / "double-descent")                 # the numbers, read independently
    dd = _row(inside, "double-descent")
    if h["peak width"] != h["largest width"]:
        assert (f"test-MSE peak at width {h['peak width']} ({h['peak test MSE']:.3g} -> "
                f"{h['test MSE at largest width']:.3g} at width {h['largest width']})") in dd
    assert f"`p_train` {h['p_train at smallest width']:.3g} at the smallest width" in dd
    assert f"{h['p_test at largest width']:.3g}" in dd
    assert f"(n = {h['n_train']})" in dd and f"{100 * h['label noise']:.3g} % label noise" in dd
    assert "means over 2 seeds (the headline gives no spread)" in dd
    assert "not the current quick preset: quick preset with" in dd and "steps=30" in dd
    meta = json.loads((runs / "double-descent" / "run.json").read_text())
    seconds = sum(s["seconds"] for s in meta["sessions"] if s["computed"])
    assert dd.endswith(f"| {seconds:.1f} s |")             # tiny runs: under 10 s

    h = _headline(runs / "toy")
    toy = _row(inside, "toy")
    assert (f"lowest at ridge {h['best ridge']:g} ({h['test MSE at best ridge']:.3g}, train MSE "
            f"{h['train MSE at best ridge']:.3g}) against {h['test MSE at smallest ridge']:.3g} "
            f"at the smallest ridge 0.01; one seed") in toy

    note = " ".join(inside.split("\n\n", 1)[1].split())
    assert f"on {meta['versions']['machine']}" in note
    assert "`local, sequential`, threads not recorded" in note    # main() called in-process
    assert f"`tools/readme_studies.py {runs.as_posix()}`" in note
    assert max(len(line) for line in inside.splitlines()   # a long tmp path cannot wrap
               if not line.startswith(("|", "<!--")) and runs.as_posix() not in line) <= 100

    assert rs.main([*args, "--check"]) == 0
    assert rs.main(args) == 0 and readme.read_text() == text    # idempotent


def test_check_fails_on_a_hand_edit_and_on_a_missing_run(runs_dir, tmp_path, table, capsys):
    runs, readme = _copy(runs_dir, tmp_path)
    args = [str(runs), "--readme", str(readme)]
    assert rs.main([*args, "--check"]) == 1                     # not generated yet
    assert rs.main(args) == 0
    text = readme.read_text()
    shown = f"{_headline(runs / 'toy')['test MSE at best ridge']:.3g}"
    readme.write_text(text.replace(shown, shown[:-1] + ("1" if shown[-1] != "1" else "2"), 1))
    capsys.readouterr()
    assert rs.main([*args, "--check"]) == 1
    assert "from the runs" in capsys.readouterr().out           # the diff is printed
    readme.write_text(text)
    assert rs.main([*args, "--check"]) == 0

    shutil.rmtree(runs / "toy")
    assert rs.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert "no row for toy: no run directory" in err and "no run for toy" in err
    assert rs.main(args) == 0                                   # written without the row
    assert "| `toy` |" not in readme.read_text() and "| `double-descent` |" in readme.read_text()
    assert "warning: no row for toy" in capsys.readouterr().err


def test_an_unfinished_run_gets_no_row(runs_dir, tmp_path, table, capsys):
    runs, readme = _copy(runs_dir, tmp_path)
    meta_path = runs / "double-descent" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "points_done": meta["points_total"] - 1}))
    assert rs.main([str(runs), "--readme", str(readme)]) == 0
    assert "| `double-descent` |" not in readme.read_text()
    err = capsys.readouterr().err
    assert "no row for double-descent" in err and "unfinished" in err


def test_usage_error_without_markers(runs_dir, tmp_path, table, capsys):
    runs, readme = _copy(runs_dir, tmp_path)
    readme.write_text(README.replace(rs.END, ""))
    assert rs.main([str(runs), "--readme", str(readme)]) == 2
    assert "marker lines" in capsys.readouterr().err


def test_number_format():
    assert [rs.num(v) for v in (12, 12.0, 2.4312, 0.000605, float("nan"), None)] == \
        ["12", "12", "2.43", "0.000605", "n/a", "n/a"]
    assert rs.pct(0.2) == "20 %" and rs.step(float("nan")) == "never"
    assert rs.seeds_note(1) == "one seed"
    assert rs.seeds_note(3, "in 2 of 3 seeds") == "means over 3 seeds, in 2 of 3 seeds"
