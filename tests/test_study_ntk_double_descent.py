"""ntk-double-descent: the kernel predictions against closed forms and independently computed
kernels, the sweep mechanics on tiny settings, the seed bootstrap against plain resampling and
scipy, and the headline / answer / verdict logic on hand-made results."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

import telescope
from telescope.runs import Progress
from telescope.studies import get_study, make_config
from telescope.studies import ntk_double_descent as ndd
from telescope.studies.ntk_double_descent import (
    analysis,
    bootstrap,
    formatting,
    limit,
    predictions,
    words,
)

STUDY = get_study("ntk-double-descent")
TINY = {"widths": "2,4", "ntk_widths": "4", "mlp_widths": "2,8", "steps": "6", "evals": "2",
        "seeds": "1", "data.n_train": "24", "data.n_test": "16", "warmup": "2", "telescoping": "8",
        "sample_sizes": "8,16,24", "sample_trained": "16", "sample_widths": "4"}


def test_kernel_prediction_of_a_linear_model_is_least_squares():
    """For f(x) = w.x + b the NTK is [X 1][X 1]^T: converged kernel regression from any f0 is
    the least-squares fit, and the smoother is the hat matrix (p_train = d + 1)."""
    torch.manual_seed(0)
    n, m, d = 30, 12, 5
    x, xt = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    out = predictions.kernel_prediction(model, x, y, xt, f0, f0t, ridge=0.0)
    a = np.c_[x.numpy(), np.ones(n)]
    at = np.c_[xt.numpy(), np.ones(m)]
    beta = np.linalg.lstsq(a, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(out["test"].numpy(), (at @ beta).ravel(), atol=1e-9)
    np.testing.assert_allclose(out["train"].numpy(), (a @ beta).ravel(), atol=1e-9)
    pinv = np.linalg.pinv(a)
    hat_test = at @ pinv                                          # smoother weights [m, n]
    assert out["p_train"] == pytest.approx(d + 1, rel=1e-9)       # trace of the hat matrix
    assert out["p_test"] == pytest.approx(n / m * (hat_test ** 2).sum(), rel=1e-9)


def test_kernel_prediction_interpolates_when_overparametrized():
    """More parameters than points: the converged prediction interpolates (p_train = n)."""
    torch.manual_seed(1)
    n = 10
    x, xt = torch.randn(n, 3), torch.randn(5, 3)
    y = torch.randn(n, 1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    out = predictions.kernel_prediction(model, x, y, xt, f0, f0t, ridge=0.0)
    np.testing.assert_allclose(out["train"].numpy(), y.double().ravel().numpy(), atol=1e-7)
    assert out["p_train"] == pytest.approx(n, rel=1e-8)


def test_tiny_sweep_runs_and_fills_every_column():
    config = make_config(STUDY, "quick", TINY)
    pts = ndd.points(config)
    assert [(p["model"], p.get("width", p.get("view"))) for p in pts] == [
        ("transformer", 2), ("transformer", 4), ("ntk-transformer", 4), ("mlp", 2), ("mlp", 8),
        ("ntk-transformer", "samples"), ("mlp", "samples")]
    rows = ndd.run_point(config, pts[1], Progress())
    assert [r["step"] for r in rows] == [3, 6]
    last = rows[-1]
    for col in ("test_mse", "lazy_test_mse", "after_test_mse", "telescoping_test_mse",
                "lazy_p_train", "lazy_p_test", "after_p_test", "kernel_distance", "lazy_gap"):
        assert math.isfinite(last[col]), col
    # six small Adam steps barely move a transformer: the telescoping model follows it closely
    assert last["telescoping_gap"] < 0.05
    # the standard transformer has no closed-form limit: its infinite columns are NaN
    assert all(math.isnan(last[c]) for c in ndd.LIMIT_COLUMNS)
    mlp_rows = ndd.run_point(config, pts[3], Progress())
    assert mlp_rows[-1]["n_params"] == 40 * 2 + 2 + 2 + 1
    for col in ndd.LIMIT_COLUMNS:       # Adam: converged limit, no training-time columns
        assert math.isnan(mlp_rows[-1][col]) == (col.startswith("infinite_ntk_t_")), col
    assert mlp_rows[-1]["infinite_time"] == math.inf


def _jacobian_kernel(model, x1, x2):
    """K(x1, x2) = J(x1) J(x2)^T from autograd's per-example Jacobians (one output)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return torch.func.functional_call(model, p, (x[None],))[0, 0]

    def jac(x):
        j = torch.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x)
        return torch.cat([v.reshape(x.shape[0], -1) for v in j.values()], dim=1)

    return jac(x1) @ jac(x2).T


def test_lazy_columns_match_an_independent_kernel_when_rank_deficient():
    """n = 120 points, an MLP 40-1-1 with 43 parameters: the initial NTK has rank <= 43 < n.
    Min-norm kernel interpolation (no ridge) then has p_train = rank K (the smoother K K^+ is a
    projection), p_test = n/m ||K_* K^+||_F^2 and predictions f0 + K_* K^+ (y - f0); all three
    recomputed here from an autograd Jacobian kernel, matrix_rank and pinv."""
    config = make_config(STUDY, "quick", {**TINY, "models": "mlp", "mlp_widths": "1",
                                          "data.n_train": "120", "steps": "2", "evals": "1"})
    point = ndd.points(config)[0]
    last = ndd.run_point(config, point, Progress())[-1]
    ds = ndd.load_task(config, point["seed"])
    torch.manual_seed(point["seed"])
    model = ndd.build_model(config, "mlp", 1, tuple(ds.x_train.shape[1:])).double()
    x, xt = ds.x_train.double(), ds.x_test.double()
    y, yt = ds.y_train.double().reshape(-1), ds.y_test.double().reshape(-1)
    k, k_test = _jacobian_kernel(model, x, x), _jacobian_kernel(model, xt, x)
    rank = int(torch.linalg.matrix_rank(k, hermitian=True))
    assert 2 < rank <= 43 < 120, rank
    assert last["ntk_rank_init"] == rank
    assert last["lazy_p_train"] == pytest.approx(rank, abs=1e-6)
    s_test = k_test @ torch.linalg.pinv(k, hermitian=True)
    n, m = x.shape[0], xt.shape[0]
    assert last["lazy_p_test"] == pytest.approx(n / m * float(s_test.pow(2).sum()), rel=1e-6)
    with torch.no_grad():
        f0, f0t = model(x).reshape(-1), model(xt).reshape(-1)
    lazy = f0t + s_test @ (y - f0)
    assert last["lazy_test_mse"] == pytest.approx(float((lazy - yt).pow(2).mean()), rel=1e-6)


def test_full_preset_builds_and_runs_with_tiny_overrides():
    """The full preset's network smoother: its effective parameters are n/m sum_j ||S(x_j)||^2
    of the Smoother's weights, recomputed here by retraining the same model with a Smoother."""
    config = make_config(STUDY, "full", {**TINY, "device": "cpu", "smoother": "true",
                                         "n_layers": "1", "widths": "2", "mlp_widths": "2"})
    assert config.n_heads == 2 and config.smoother
    point = ndd.points(config)[0]
    last = ndd.run_point(config, point, Progress())[-1]
    ds = ndd.load_task(config, point["seed"])
    x, y, xt = ds.x_train, ds.y_train, ds.x_test
    torch.manual_seed(point["seed"])
    model = ndd.build_model(config, point["model"], point["width"], tuple(x.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup))
    smoother = telescope.Smoother(model, opt, x, y, probes={"test": xt})
    for _ in range(config.steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        smoother.record(torch.arange(x.shape[0]))
        opt.step()
        sched.step()
    n = x.shape[0]
    for name, pts in (("train", x), ("test", xt)):
        w = smoother.weights(name)                            # [m, n]: f~(x_j) = w_j . y + c_j
        assert tuple(w.shape) == (pts.shape[0], n)
        expected = n / pts.shape[0] * float(w.double().pow(2).sum())
        assert last[f"network_p_{name}"] == pytest.approx(expected, rel=1e-5)
    smoother.close()


def test_network_smoother_is_skipped_above_its_parameter_budget():
    config = make_config(STUDY, "quick", {**TINY, "smoother": "true", "smoother_max_params": "10",
                                          "models": "mlp"})
    rows = ndd.run_point(config, ndd.points(config)[0], Progress())
    assert math.isnan(rows[-1]["network_p_train"]) and math.isnan(rows[-1]["network_p_test"])


@pytest.mark.parametrize("override, message", [
    ({"widths": "3"}, "divisible by n_heads"),
    ({"models": "cnn"}, "models must be"),
    ({"label_noise": "1.5"}, "label_noise"),
    ({"data.kind": "cifar"}, "data.kind"),
])
def test_bad_configs_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        make_config(STUDY, "quick", {**override, **({"n_heads": "2"} if "widths" in override
                                                    else {})})


def _fake(curve_net, curve_lazy, gaps, kind="transformer"):
    widths = [2, 4, 8, 16, 32]
    rows = []
    for seed in (0, 1):
        for w, net, lazy, gap in zip(widths, curve_net, curve_lazy, gaps, strict=True):
            rows.append({"model": kind, "width": w, "seed": seed, "step": 10, "n_train": 100,
                         "test_mse": net + 0.01 * seed, "lazy_test_mse": lazy,
                         "after_test_mse": net * 1.1, "lazy_gap": gap,
                         "kernel_distance": 0.1})
    return pd.DataFrame(rows)


def test_headline_finds_peak_rank_correlation_and_lazy_validity():
    df = _fake([1.1, 2.0, 1.5, 1.2, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0, 1.0, 0.3, 0.2, 0.1])
    config = make_config(STUDY, "quick", {})
    stats = analysis.compare(analysis.final_rows(df), "transformer")
    assert stats["network"]["peak"] == pytest.approx(2.005)        # mean of 2.00 and 2.01
    assert stats["network"]["peak_ci"] == pytest.approx((2.0, 2.01))
    assert stats["network"]["peak_widths"] == [4]
    assert stats["lazy"]["rho"] == pytest.approx(1.0)
    assert stats["lazy"]["gap"] == pytest.approx(0.3)
    h = ndd.headline(df, config)
    assert h["transformer: trained network: peak width"] == "4"
    assert h["transformer: trained network: peak test MSE"] == "2.00 [2.00, 2.01]"
    assert h["transformer: NTK at init (lazy): peak width"] == "4"
    assert h["transformer: NTK at init (lazy): rank correlation with the network"] == (
        "1.00 [1.00, 1.00]")
    assert h["transformer: NTK at init (lazy): median relative distance to the network"] == (
        "0.300 [0.300, 0.300]")
    assert h["transformer: lazy prediction within 25 % from width"] == 16
    assert h["transformer: can NTK theory (at init) predict its double descent?"] == "yes"
    assert h["transformer: verdict on each half of the seeds"] == "yes (seeds 0) / yes (seeds 1)"
    assert "double descent" in h["answer"] and "from width 16" in h["answer"]


def test_verdicts_follow_peak_location_and_validity():
    # peak one width early, lazy never valid: partly; two widths early: no
    partly = _fake([1.1, 1.5, 2.0, 1.2, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0] * 5)
    assert analysis.verdict(analysis.final_rows(partly), "transformer") == "partly"
    no = _fake([1.1, 1.2, 1.5, 2.0, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0] * 5)
    assert analysis.verdict(analysis.final_rows(no), "transformer") == "no"
    flat = _fake([2.0, 1.5, 1.2, 1.1, 1.0], [3.0, 2.0, 1.5, 1.2, 1.1], [2.0] * 5)
    assert analysis.verdict(analysis.final_rows(flat), "transformer") == "no double descent"


def test_answer_says_when_there_is_no_peak_and_no_lazy_regime():
    df = _fake([2.0, 1.5, 1.2, 1.1, 1.0], [3.0, 2.0, 1.5, 1.2, 1.1], [2.0, 1.0, 0.9, 0.8, 0.7])
    final = analysis.final_rows(df)
    assert analysis.lazy_valid_from(final, "transformer") is None
    text = words.answer(final)
    assert "no clear double descent" in text and "never come within 25 %" in text
    assert "relative distance 0.700 [0.700, 0.700] at the largest width" in text
    assert "as much as at every width from 2 on" in text           # kernel distance 0.1 flat


def test_figures_and_report_from_tiny_run(tmp_path):
    config = make_config(STUDY, "quick", TINY)
    rows = []
    for p in ndd.points(config)[:2]:
        rows += [{**p, **r} for r in ndd.run_point(config, p, Progress())]
    paths = ndd.figures(pd.DataFrame(rows), config, tmp_path)
    assert [p.name for p in paths] == ["ntk_double_descent.png", "ntk_double_descent_steps.png"]
    assert all(p.stat().st_size > 0 and p.with_suffix(".svg").exists() for p in paths)


def test_cli_run_resumes_after_losing_a_point(tmp_path, capsys):
    """A finished run whose point file is lost (as if killed while computing it) recomputes only
    that point on the same command, and the results come out identical; the terminal shows the
    headline with the answer in words."""
    import json

    from telescope.cli import main

    sets = [f"{k}={v}" for k, v in TINY.items()]
    args = ["study", "ntk-double-descent", "--out", str(tmp_path), "--set", *sets,
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "\nanswer: Transformer: " in printed and "verdict" in printed.lower()
    first = pd.read_parquet(tmp_path / "results.parquet")
    files = sorted((tmp_path / "points").glob("*.parquet"))
    assert len(files) == 7 and (tmp_path / "report.html").exists()
    assert (tmp_path / "ntk_double_descent_samples.png").exists()
    files[1].unlink()
    assert main(args) == 0
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["sessions"][-1]["skipped"] == 6
    again = pd.read_parquet(tmp_path / "results.parquet")
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), first.drop(columns="seconds"))


# --------------------------------------------------------------------------- seed bootstrap


def test_rank_correlation_matches_scipy_with_ties_and_masks():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(40, 7)).astype(float)       # many ties
    b = rng.normal(size=(40, 7))
    b[::5, 2] = np.nan
    mask = rng.random((40, 7)) > 0.25
    got = bootstrap.rank_correlation(a, b, mask)
    for r in range(40):
        keep = mask[r] & ~np.isnan(b[r])
        if keep.sum() < 3 or len(set(a[r, keep])) < 2:
            assert math.isnan(got[r])
        else:
            assert got[r] == pytest.approx(spearmanr(a[r, keep], b[r, keep]).statistic, abs=1e-12)


def test_seed_weights_and_weighted_means_are_plain_resampling():
    """Row 0 weighs every seed once; a resample's mean curve equals the plain mean over the seeds
    it drew (with repeats), skipping seeds a width lacks; the draws are reproducible."""
    w = bootstrap.seed_weights(5, resamples=50, seed=7)
    assert w.shape == (51, 5) and (w[0] == 1).all() and (w.sum(1) == 5).all()
    np.testing.assert_array_equal(w, bootstrap.seed_weights(5, resamples=50, seed=7))
    assert not np.array_equal(w, bootstrap.seed_weights(5, resamples=50, seed=8))
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 5))                         # [widths, seeds]
    values[2, 1] = np.nan                                    # a point not run
    means = bootstrap.weighted_means(values, w)
    for r in (0, 1, 17, 50):
        drawn = np.repeat(np.arange(5), w[r].astype(int))
        for j in range(4):
            vals = values[j, drawn]
            vals = vals[~np.isnan(vals)]
            expected = vals.mean() if len(vals) else np.nan
            np.testing.assert_allclose(means[r, j], expected, rtol=1e-12)


def _seeded(curves_by_seed, lazy, kind="transformer", widths=(2, 4, 8, 16, 32), gap=2.0):
    """A final frame: one network test-MSE curve per seed, the same lazy curve for every seed."""
    rows = []
    for seed, net in enumerate(curves_by_seed):
        for w, v, lz in zip(widths, net, lazy, strict=True):
            rows.append({"model": kind, "width": w, "seed": seed, "step": 10, "n_train": 100,
                         "test_mse": v, "lazy_test_mse": lz, "lazy_gap": gap})
    return pd.DataFrame(rows)


def test_widths_within_noise_of_the_peak_follow_the_seed_spread():
    """Widths 4 and 8 differ by 0.05 in the mean: with seeds spread by +-0.5 both are plausible
    peaks and the headline says so; with seeds spread by +-0.005 only width 4 is."""
    base = np.array([1.0, 2.0, 1.95, 1.3, 1.0])
    rng = np.random.default_rng(1)
    for spread, plausible, text in ((0.5, [4, 8], "4 (4-8 within noise)"), (0.005, [4], "4")):
        noise = rng.choice([-1.0, 1.0], size=(8, 5)) * spread
        noise -= noise.mean(0)                               # the mean curve stays `base`
        final = analysis.final_rows(_seeded(base + noise, [1.0, 9.0, 3.0, 2.0, 1.5]))
        net = analysis.compare(final, "transformer")["network"]
        assert net["peak_width"] == 4 and net["peak"] == pytest.approx(2.0)
        assert net["peak_widths"] == plausible
        assert formatting.fmt_peak(net, [2, 4, 8, 16, 32]) == text
        lo, hi = net["peak_ci"]
        assert lo < 2.0 < hi and hi - lo < (1.2 if spread > 0.1 else 0.012)


def _halves_agree_or_undetermined(final, kind="transformer"):
    a, b = analysis.half_verdicts(final, kind)
    full = ndd.headline(final, make_config(STUDY, "quick", {}))
    said = full[f"{kind}: can NTK theory (at init) predict its double descent?"]
    assert a["category"] == b["category"] or said.startswith("undetermined (within noise: ")
    return a, b, said


def test_verdict_on_disjoint_halves_of_the_seeds_agrees_in_a_clear_case():
    rng = np.random.default_rng(2)
    net = np.array([1.1, 2.0, 1.5, 1.2, 1.0]) + rng.normal(0, 0.03, size=(8, 5))
    final = analysis.final_rows(_seeded(net, [1.3, 5.0, 2.0, 1.5, 1.1]))
    a, b, said = _halves_agree_or_undetermined(final)
    assert a["category"] == b["category"] == said == "partly"   # lazy never within 25 %
    assert a["seeds"] == [0, 1, 2, 3] and b["seeds"] == [4, 5, 6, 7]
    assert analysis.verdict_details(final, "transformer")["shares"] == {"partly": 1.0}


def test_verdict_is_undetermined_when_the_peak_flips_between_halves_of_the_seeds():
    """Seeds 0-3 peak at width 4 (where the lazy prediction peaks: "partly"), seeds 4-7 at 16
    (two sweep widths away: "no"): each half decides, they disagree, and on all seeds the
    verdict must be undetermined, naming the network's peak as what the noise leaves open."""
    rng = np.random.default_rng(4)
    early, late = [1.0, 2.0, 1.5, 1.4, 1.0], [1.0, 1.4, 1.5, 2.0, 1.0]
    net = np.array([early] * 4 + [late] * 4) + rng.normal(0, 0.02, size=(8, 5))
    final = analysis.final_rows(_seeded(net, [1.3, 5.0, 2.0, 1.5, 1.1]))
    a, b, said = _halves_agree_or_undetermined(final)
    assert (a["category"], b["category"]) == ("partly", "no")
    assert said.startswith("undetermined (within noise: the network's peak anywhere in widths 4")
    d = analysis.verdict_details(final, "transformer")
    assert d["category"] == "undetermined" and max(d["shares"].values()) < analysis.AGREEMENT
    assert set(d["shares"]) == {"partly", "no"}
    # partly or no: either way not in full, and the one-line answer says so
    assert "undetermined" in words.answer(final)
    assert words.short_answer(final).startswith("Not in full: the NTK at initialization peaks at "
                                              "width 4,")
    assert "(partly) or not (no) is within the seeds' noise" in words.short_answer(final)


def test_one_seed_verdict_says_its_noise_is_unknown():
    final = analysis.final_rows(_seeded([[1.1, 2.0, 1.5, 1.2, 1.0]], [1.3, 5.0, 2.0, 1.5, 1.1]))
    assert analysis.verdict(final, "transformer") == "partly (one seed: its noise is not estimated)"
    assert analysis.half_verdicts(final, "transformer") is None


def test_number_and_width_formats():
    assert [formatting.fmt_number(v) for v in (1.5, 20.49, 0.018, 152.4, 1234.5, float("nan"))] == [
        "1.50", "20.5", "0.0180", "152", "1234", "n/a"]
    assert formatting.fmt_estimate(-0.1449, (-0.5, 0.3), decimals=2) == "-0.14 [-0.50, 0.30]"
    sweep = [3, 4, 6, 8, 12, 16]
    assert formatting.fmt_widths([6, 8, 12], sweep) == "6-12"
    assert formatting.fmt_widths([12, 4, 8], sweep) == "4, 8-12"


def test_verdict_needs_every_peak_within_noise_to_agree():
    """96 % of the resamples peak at width 4 (lazy peak there too, never within 25 %: partly),
    4 % at width 8, two sweep widths away (no). The share alone would decide "partly", but width
    8 is within noise of the peak, so the verdict is undetermined and says which verdicts the
    plausible peaks allow."""
    widths = (2, 4, 6, 8, 16, 32)
    net = np.tile([1.0, 2.0, 1.5, 1.85, 1.3, 1.0], (8, 1))
    net[:, 3] += 0.3 * np.array([1, -1] * 4)
    final = analysis.final_rows(_seeded(net, [1.3, 5.0, 2.0, 1.5, 1.2, 1.1], widths=widths))
    d = analysis.verdict_details(final, "transformer")
    assert d["point"] == "partly" and d["shares"]["partly"] >= analysis.AGREEMENT
    assert analysis.compare(final, "transformer")["network"]["peak_widths"] == [4, 8]
    assert d["implied"] == ["partly", "no"] and d["category"] == "undetermined"
    assert "the peaks within noise allow partly or no" in d["verdict"]
    net[:, 3] = 1.6                                           # width 8 clearly below the peak
    final = analysis.final_rows(_seeded(net, [1.3, 5.0, 2.0, 1.5, 1.2, 1.1], widths=widths))
    assert analysis.verdict(final, "transformer") == "partly"


# --------------------------------------------------------------------------- infinite width


@pytest.fixture(scope="module")
def tiny_run():
    """Every point of a tiny config (two ntk-transformer widths), as the results table."""
    config = make_config(STUDY, "quick", {**TINY, "ntk_widths": "4,32"})
    rows = []
    for p in ndd.points(config):
        rows += [{**p, **r} for r in ndd.run_point(config, p, Progress())]
    return config, pd.DataFrame(rows)


def _last(df, model, width):
    part = df[(df["model"] == model) & (df["width"] == width) & df["view"].isna()]
    return part.sort_values("step").iloc[-1]


def _by_hand(k, k_star, k_ss, th, th_star, y, yt):
    """The converged ensemble of Lee et al. (2019) eq. 15-16 with pseudo-inverses: the mean
    Theta_* Theta^+ y and the covariance's trace, written out here."""
    a = torch.linalg.pinv(th, hermitian=True)
    mu = th_star @ a @ y
    cov = k_ss + th_star @ a @ k @ a @ th_star.T - (th_star @ a @ k_star.T + k_star @ a @ th_star.T)
    nngp = k_star @ torch.linalg.pinv(k, hermitian=True) @ y
    m = yt.shape[0]
    return {"infinite_ntk_test_mse": float((mu - yt).pow(2).mean()),
            "infinite_ntk_test_error": float(((mu > 0) != (yt > 0)).double().mean()),
            "infinite_nngp_test_mse": float((nngp - yt).pow(2).mean()),
            "infinite_nngp_test_error": float(((nngp > 0) != (yt > 0)).double().mean()),
            "infinite_ntk_draw_test_mse": float((mu - yt).pow(2).mean() + cov.trace() / m)}


def test_mlp_limit_columns_are_kernel_regression_with_the_infinite_ntk(tiny_run):
    """The MLP row's limit, recomputed by an independent path: telescope.infinite.infinite_ntk
    (the fully-connected shortcut) on the flattened inputs, telescope.kernel_regression for the
    mean, pseudo-inverses for the covariance."""
    config, df = tiny_run
    last = _last(df, "mlp", 8)
    ds = ndd.load_task(config, 0)
    x, xt = ds.x_train.flatten(1).double(), ds.x_test.flatten(1).double()
    y, yt = ds.y_train.double(), ds.y_test.double()
    k = telescope.infinite.infinite_ntk(x, depth=1, activation="relu")
    kst = telescope.infinite.infinite_ntk(xt, x, depth=1, activation="relu")
    kss = telescope.infinite.infinite_ntk(xt, depth=1, activation="relu")
    mu = telescope.kernel_regression(k["ntk"], kst["ntk"], y)
    assert last["infinite_ntk_test_mse"] == pytest.approx(float((mu - yt).pow(2).mean()),
                                                          rel=1e-9)
    want = _by_hand(k["nngp"], kst["nngp"], kss["nngp"], k["ntk"], kst["ntk"], y, yt)
    for col, value in want.items():
        assert last[col] == pytest.approx(value, rel=1e-7, abs=1e-12), col
    # the limit does not depend on the width: the same numbers at every width of the row
    assert _last(df, "mlp", 2)["infinite_ntk_test_mse"] == last["infinite_ntk_test_mse"]
    assert last["infinite_ntk_rank"] == int(torch.linalg.matrix_rank(k["ntk"])) == 24
    assert last["infinite_ridge"] == 0.0


def test_ntk_transformer_limit_is_its_own_family_with_positions(tiny_run):
    config, df = tiny_run
    last = _last(df, "ntk-transformer", 32)
    ds = ndd.load_task(config, 0)
    arch = telescope.infinite.transformer(1, n_layers=config.n_layers, mlp_ratio=config.mlp_ratio)
    x = telescope.infinite.with_positions(ds.x_train.double(), config.positions)
    xt = telescope.infinite.with_positions(ds.x_test.double(), config.positions)
    k, kst, kss = arch.kernel(x), arch.kernel(xt, x), arch.kernel(xt)
    want = _by_hand(k["nngp"], kst["nngp"], kss["nngp"], k["ntk"], kst["ntk"],
                    ds.y_train.double(), ds.y_test.double())
    for col, value in want.items():
        assert last[col] == pytest.approx(value, rel=1e-7, abs=1e-12), col


def test_distance_to_ntk_theory_for_its_own_init_shrinks_with_the_width(tiny_run):
    """Gradient descent (warmup 2, lr 0.5, 6 steps): kernel-regression time t = 2 * 0.5 *
    (0.5 + 5) = 5.5. NTK theory's prediction for the network's own initial function at that
    time is much closer to the width-32 network than the converged ensemble mean is, and closer
    than to the width-4 network."""
    config, df = tiny_run
    wide, narrow = _last(df, "ntk-transformer", 32), _last(df, "ntk-transformer", 4)
    assert ndd.flow_time(config, "ntk-transformer") == pytest.approx(5.5)
    assert wide["infinite_time"] == pytest.approx(5.5)
    assert wide["infinite_init_gap"] < 0.5 * narrow["infinite_init_gap"]
    assert wide["infinite_init_gap"] < 0.25 * wide["infinite_gap"]
    assert 0 < wide["infinite_gap_floor"] < 1
    assert math.isfinite(wide["infinite_ntk_t_test_mse"])


def test_sample_wise_view_is_the_limit_on_the_first_n_points(tiny_run):
    """Limit rows: one per n, no width; at n = n_train they equal the width sweep's limit
    columns (same seed, same targets), at n = 8 a regression on the first 8 points. Network rows:
    one per trained n and width, with the distances to the limit on the same points."""
    config, df = tiny_run
    view = analysis.sample_rows(df)
    assert set(view["model"]) == {"ntk-transformer", "mlp"}
    mlp = view[view["model"] == "mlp"]
    limit = mlp[mlp["width"].isna()].set_index("sample_size")
    assert list(limit.index) == [8, 16, 24]
    assert (limit["infinite_ntk_rank"] == limit.index).all()      # full rank at every n
    sweep = _last(df, "mlp", 8)
    for col in ("infinite_ntk_test_mse", "infinite_nngp_test_error"):
        assert limit.loc[24, col] == pytest.approx(sweep[col], rel=1e-12)
    ds = ndd.load_task(config, 0)
    x, xt = ds.x_train.flatten(1).double()[:8], ds.x_test.flatten(1).double()
    k = telescope.infinite.infinite_ntk(x, depth=1)["ntk"]
    kst = telescope.infinite.infinite_ntk(xt, x, depth=1)["ntk"]
    mu = telescope.kernel_regression(k, kst, ds.y_train.double()[:8])
    assert limit.loc[8, "infinite_ntk_test_mse"] == pytest.approx(
        float((mu - ds.y_test.double()).pow(2).mean()), rel=1e-9)
    nets = view[view["width"].notna()]
    assert sorted(zip(nets["model"], nets["sample_size"], nets["width"], strict=True)) == [
        ("mlp", 16, 4), ("ntk-transformer", 16, 4)]
    assert nets["infinite_init_gap"].notna().all() and nets["test_mse"].notna().all()
    assert (nets["params_per_example"] == nets["n_params"] / 16).all()
    # the width sweep's analysis never sees the sample-wise rows
    assert analysis.final_rows(df)["width"].dtype == np.int64
    assert len(analysis.final_rows(df)) == 6


def test_headline_and_figures_report_the_limit(tiny_run, tmp_path):
    config, df = tiny_run
    h = ndd.headline(df, config)
    assert h["transformer: infinite-width limit"].startswith("none in closed form")
    for kind in ("ntk-transformer", "mlp"):
        for key in ("infinite-width NTK (converged, ridgeless): test MSE",
                    "infinite-width NNGP (readout only): test MSE",
                    "relative distance of the trained network to NTK theory for its own "
                    "initialization, by width",
                    "sample-wise view, infinite-width NTK",
                    "does the network's peak width have a counterpart in the limit?"):
            assert f"{kind}: {key}" in h, (kind, key)
    assert "NTK theory itself for the NTK-parametrized transformer" in h["answer"]
    assert "no width-wise peak" in h["answer"]
    names = [p.name for p in ndd.figures(df, config, tmp_path)]
    assert names == ["ntk_double_descent.png", "ntk_double_descent_steps.png",
                     "ntk_double_descent_samples.png"]


def test_sample_config_is_checked():
    with pytest.raises(ValueError, match="sample_sizes must lie in 1..data.n_train=24"):
        make_config(STUDY, "quick", {**TINY, "sample_sizes": "8,30"})
    off = make_config(STUDY, "quick", {**TINY, "sample_sizes": ""})
    assert all("view" not in p for p in ndd.points(off))
    few = make_config(STUDY, "quick", {**TINY, "seeds": "6", "ntk_seeds": "2"})
    assert sum(p["model"] == "ntk-transformer" and "view" not in p
               for p in ndd.points(few)) == 2


def _samples(curves, kind="mlp", sizes=(10, 20, 40, 80, 160)):
    """Sample-wise limit rows: one test-MSE curve over n per seed."""
    return pd.DataFrame([{"model": kind, "view": "samples", "seed": seed, "sample_size": n,
                          "infinite_ntk_test_mse": v}
                         for seed, curve in enumerate(curves)
                         for n, v in zip(sizes, curve, strict=True)])


def test_sample_wise_rise_finds_a_resolved_peak_and_its_absence():
    rng = np.random.default_rng(0)
    bump = np.array([1.0, 0.9, 1.4, 1.0, 0.8]) + rng.normal(0, 0.02, size=(6, 5))
    rise = limit.SampleBootstrap(_samples(bump), "mlp").rise()
    assert (rise["valley_n"], rise["peak_n"]) == (20, 40) and rise["peaked"]
    assert rise["ratio"] == pytest.approx(bump[:, 2].mean() / bump[:, 1].mean())
    lo, hi = rise["ratio_ci"]
    assert 1.4 < lo < rise["ratio"] < hi < 1.7
    falling = np.array([1.2, 1.1, 1.0, 0.9, 0.8]) + rng.normal(0, 0.01, size=(6, 5))
    falling.sort(axis=1)
    assert limit.SampleBootstrap(_samples(falling[:, ::-1]), "mlp").rise() is None
    noisy = np.array([1.0, 0.98, 1.0, 0.97, 0.95]) + rng.normal(0, 0.2, size=(6, 5))
    r = limit.SampleBootstrap(_samples(noisy), "mlp").rise()
    assert r is None or not r["peaked"]


def test_limit_value_is_the_mean_over_seeds_with_its_interval():
    final = pd.DataFrame([{"model": "mlp", "width": w, "seed": s, "infinite_ntk_test_mse": v}
                          for s, v in enumerate([0.6, 0.7, 0.8, 0.9]) for w in (2, 8)])
    mean, (lo, hi) = limit.limit_value(final, "mlp", "infinite_ntk_test_mse")
    assert mean == pytest.approx(0.75) and 0.6 <= lo < mean < hi <= 0.9
    assert limit.limit_value(final, "transformer", "infinite_ntk_test_mse") is None
