"""tools/readme_results.py on a synthetic run directory: it rewrites only the marked section (and
the ./dev.sh run wall time) from the results, copies the figure, and --check passes on the
result and fails on a tampered README or figure."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from telescope.studies import get_study, make_config
from telescope.studies.config import config_to_dict
from telescope.studies.ntk_double_descent.analysis import compare, final_rows, verdict_details
from telescope.studies.ntk_double_descent.formatting import fmt_estimate, fmt_peak, fmt_stat
from telescope.studies.ntk_double_descent.limit import limit_value
from telescope.studies.ntk_double_descent.words import answer_for, limit_answer_for

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_results",
                                               ROOT / "tools" / "readme_results.py")
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)

WIDTHS = {"transformer": [3, 4, 6, 8, 16], "ntk-transformer": [4, 8, 16, 32, 64],
          "mlp": [1, 2, 4, 8, 32]}
NET = [1.0, 1.4, 2.0, 1.5, 1.1]
SIZES = [10, 20, 40]


def _results(seeds=4):
    rng = np.random.default_rng(0)
    rows = []
    for kind, widths in WIDTHS.items():
        for seed in range(seeds):
            limit = {} if kind == "transformer" else {
                "infinite_ntk_test_mse": 0.7 + 0.01 * seed, "infinite_ntk_test_error": 0.25,
                "infinite_nngp_test_mse": 1.1, "infinite_nngp_test_error": 0.3,
                "infinite_ntk_draw_test_mse": 0.72, "infinite_gap_floor": 0.05}
            for i, w in enumerate(widths):
                net = NET[i] + rng.normal(0, 0.05)
                if limit:
                    limit.update(infinite_gap=1.0 - 0.1 * i, infinite_init_gap=0.9 - 0.1 * i)
                rows.append({"model": kind, "width": w, "seed": seed, "step": 50, "n_train": 40,
                             "train_mse": 0.5 / (i + 1), "test_mse": net,
                             "lazy_test_mse": [2.0, 9.0, 4.0, 3.0, 2.5][i] * (1 + 0.01 * seed),
                             "lazy_gap": 1.5, "lazy_p_train": min(40.0, 10.0 * w),
                             "after_test_mse": net * 1.05, "after_gap": 0.1,
                             "telescoping_test_mse": net, "telescoping_gap": 0.02,
                             "kernel_distance": 0.3 / (i + 1), "n_params": 10 * w, **limit})
            if kind != "transformer":     # the sample-wise view: the limit falls with n
                rows += [{"model": kind, "view": "samples", "seed": seed, "sample_size": n,
                          "infinite_ntk_test_mse": 0.9 - 0.1 * j + 0.01 * seed,
                          "infinite_nngp_test_mse": 1.2 - 0.1 * j}
                         for j, n in enumerate(SIZES)]
    return pd.DataFrame(rows)


def _run_dir(tmp_path, meta_versions, per_session=False):
    """A finished run: one computing session; with ``per_session`` its versions are recorded in
    the session and a later resume (top-level versions of another commit) follows."""
    run = tmp_path / "run"
    run.mkdir()
    config = make_config(get_study("ntk-double-descent"), "quick", {
        "widths": ",".join(map(str, WIDTHS["transformer"])),
        "ntk_widths": ",".join(map(str, WIDTHS["ntk-transformer"])),
        "mlp_widths": ",".join(map(str, WIDTHS["mlp"])), "seeds": "4",
        "data.n_train": "40", "sample_sizes": ",".join(map(str, SIZES)),
        "sample_trained": "20"})
    (run / "config.json").write_text(json.dumps(
        {"study": "ntk-double-descent", "preset": "quick", "config": config_to_dict(config)}))
    ran = {"started": "2031-02-03T04:05:06+00:00", "seconds": 600.0,
           "executor": "local, 2 worker processes x 1 thread", "computed": 40, "skipped": 0,
           "failed": 0}
    meta = {"study": "ntk-double-descent", "versions": meta_versions, "sessions": [ran]}
    if per_session:
        meta["sessions"] = [{**ran, "versions": meta_versions},
                            {"started": "2031-02-04T00:00:00+00:00", "seconds": 3.0,
                             "executor": "local, sequential", "computed": 0, "skipped": 40,
                             "failed": 0}]
        meta["versions"] = {**meta_versions, "git_commit": "later999"}
    (run / "run.json").write_text(json.dumps(meta))
    _results().to_parquet(run / "results.parquet", index=False)
    (run / "ntk_double_descent.png").write_bytes(b"\x89PNG fake figure")
    (run / "ntk_double_descent_samples.png").write_bytes(b"\x89PNG fake sample-wise figure")
    return run


README = """```
./dev.sh run     # sets up .venv if needed, then asks the question (~3 min + setup)
```

# title

## Can NTK theory predict double descent in transformers?

<!-- ntk-double-descent:begin -->
typed by hand: peak at width 12 (1.55)
<!-- ntk-double-descent:end -->

## Next section stays as it is
"""


def _paths(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return readme, tmp_path / "docs" / "figures" / "ntk_double_descent.png"


def test_rewrites_the_section_from_the_results_and_check_passes(tmp_path, capsys):
    run = _run_dir(tmp_path, {"platform": "Linux-x86_64", "machine": "box-7",
                              "git_commit": "abc1234", "torch": "2.13.0"}, per_session=True)
    readme, figure = _paths(tmp_path)
    args = [str(run), "--readme", str(readme), "--figure", str(figure)]
    assert rr.main(args) == 0
    text = readme.read_text()
    before, _, rest = text.partition(rr.BEGIN)
    inside, _, after = rest.partition(rr.END)
    assert "typed by hand" not in text
    assert before == README.split(rr.BEGIN)[0].replace("(~3 min", "(~10 min")  # 600 s
    assert after == README.split(rr.END)[1]
    final = final_rows(_results())
    # the numbers come from the study's own functions on these results
    net = compare(final, "transformer")["network"]
    assert net["peak_width"] == 6
    assert f"| trained network: test-MSE peak width | {fmt_peak(net, WIDTHS['transformer'])}"\
        in inside
    assert fmt_stat(net, "peak") in inside
    details = verdict_details(final, "mlp")
    assert f"**{details['category']}**" in inside
    assert answer_for(final, "transformer")[:60] in inside.replace("\n  ", " ")
    assert "| verdict on seeds 0-1 / 2-3 |" in inside
    assert "| | transformer | NTK-param. transformer (limit known) | MLP (contrast) |" in inside
    # the infinite-width rows: the limit's numbers over seeds, none for the standard transformer
    mean, ci = limit_value(final, "ntk-transformer", "infinite_ntk_test_mse", _results())
    assert mean == pytest.approx(0.715)
    row = next(line for line in inside.splitlines() if line.startswith("| **infinite width**"))
    assert row.split(" | ")[1] == "no closed-form limit"
    assert fmt_estimate(mean, ci) in row.split(" | ")[2]
    samples = "| ... sample-wise: the limit's largest rise of test MSE with n |  | never rises"
    assert samples in inside
    assert "**no** (network peak at 16" in inside                # no counterpart in the limit
    assert limit_answer_for(final, _results(), "mlp")[:60] in inside.replace("\n  ", " ")
    assert ("![ntk-double-descent, sample-wise](docs/figures/ntk_double_descent_samples.png)"
            in inside)
    assert "![ntk-double-descent](docs/figures/ntk_double_descent.png)" in inside
    assert "machine box-7, commit abc1234, 2031-02-03" in inside.replace("\n", " ")
    assert "60 trained networks with their kernels in 10.0 min" in inside.replace("\n", " ")
    assert max(len(line) for line in inside.splitlines()
               if not line.startswith(("|", "<!--"))) <= 100
    assert figure.read_bytes() == b"\x89PNG fake figure"
    assert figure.with_name("ntk_double_descent_samples.png").read_bytes() == (
        b"\x89PNG fake sample-wise figure")
    assert rr.main([*args, "--check"]) == 0
    assert rr.main(args) == 0 and readme.read_text() == text       # idempotent


def test_check_fails_on_a_tampered_readme_or_figure(tmp_path, capsys):
    run = _run_dir(tmp_path, {"platform": "Linux-x86_64"})        # no machine / commit keys
    readme, figure = _paths(tmp_path)
    args = [str(run), "--readme", str(readme), "--figure", str(figure)]
    assert rr.main([*args, "--check"]) == 1                        # not generated yet
    assert rr.main(args) == 0
    text = readme.read_text()
    assert "machine Linux-x86_64, unknown commit, 2031-02-03." in text.replace("\n", " ")
    net = compare(final_rows(_results()), "transformer")["network"]
    shown = fmt_stat(net, "peak")
    readme.write_text(text.replace(shown, shown.replace(shown[0], "9", 1), 1))
    capsys.readouterr()
    assert rr.main([*args, "--check"]) == 1
    assert "from the results" in capsys.readouterr().out               # the diff is printed
    readme.write_text(text)
    assert rr.main([*args, "--check"]) == 0
    figure.write_bytes(b"another figure")
    assert rr.main([*args, "--check"]) == 1
    assert rr.main(args) == 0 and rr.main([*args, "--check"]) == 0
    figure.with_name("ntk_double_descent_samples.png").write_bytes(b"stale")
    assert rr.main([*args, "--check"]) == 1


@pytest.mark.parametrize("broken, message", [("markers", "marker lines"),
                                             ("results", "lacks results.parquet")])
def test_usage_errors_name_the_fix(tmp_path, capsys, broken, message):
    run = _run_dir(tmp_path, {})
    readme, figure = _paths(tmp_path)
    if broken == "markers":
        readme.write_text(README.replace(rr.END, ""))
    else:
        (run / "results.parquet").unlink()
    assert rr.main([str(run), "--readme", str(readme), "--figure", str(figure)]) == 2
    assert message in capsys.readouterr().err


def test_provenance_is_the_computing_sessions():
    ran = {"started": "2031-01-01T00:00:00", "computed": 5, "executor": "local, sequential"}
    resumed = {"started": "2031-03-01T00:00:00", "computed": 0}
    top = {"machine": "box-2", "git_commit": "new456", "platform": "Linux"}
    # versions recorded per session: the computing session's, whatever came later
    p = rr.provenance({"versions": top, "sessions": [
        {**ran, "versions": {"machine": "box-1", "git_commit": "old123"}}, resumed]})
    assert (p["machine"], p["commit"], p["date"]) == ("box-1", "commit old123", "2031-01-01")
    # only top-level versions, written by the computing session itself
    p = rr.provenance({"versions": top, "sessions": [resumed, ran]})
    assert (p["machine"], p["commit"]) == ("box-2", "commit new456")
    # only top-level versions, written by a later resume: its commit is not the computing one
    p = rr.provenance({"versions": {"platform": "Linux"}, "sessions": [ran, resumed]})
    assert p["commit"] == "unknown commit" and p["machine"].startswith("Linux (as recorded")
    assert p["date"] == "2031-01-01"
