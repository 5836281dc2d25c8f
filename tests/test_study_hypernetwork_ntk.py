"""The ``hypernetwork-ntk`` study: the sweep and its checks, a tiny run whose Taylor gap is
replayed with a plain GD loop and ``torch.func.jvp`` (tests/_first_order.py), the kernel rows
against the library kernels, figures and headline, and the CLI end to end. Its task family,
``telescope.data.sinusoid_tasks``, is tested in tests/test_data.py."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _first_order import FirstOrder

import telescope
from telescope.cli import main
from telescope.data import sinusoid_tasks
from telescope.studies import get_study, make_config
from telescope.studies import hypernetwork_ntk as hn
from telescope.train import Progress, log_spaced_steps

TINY = {"seeds": "1", "steps": "8", "evals": "3", "data.n_tasks": "3", "data.n_train": "4",
        "data.n_test": "3", "data.n_kernel": "2", "meta_widths": "16,64",
        "wide_meta_widths": "16", "kernel_primary_widths": "4,16", "kernel_meta_widths": "16,64",
        "kernel_fixed_meta": "16", "kernel_draws": "2"}


def _config(**extra: str):
    return make_config(get_study("hypernetwork-ntk"), "quick", {**TINY, **extra})


def test_points_presets_and_checks():
    study = get_study("hypernetwork_ntk")
    quick = make_config(study, "quick", {})
    pts = hn.points(quick)
    taylor = [p for p in pts if p["part"] == "taylor"]
    kernel = [p for p in pts if p["part"] == "kernel"]
    assert len(taylor) == 3 * (4 + 3 + 4) and len(kernel) == 3 * (4 + 5 + 4)
    wide = [p for p in taylor if p["model"] == "hyper-wide"]
    assert all(p["primary_width"] == p["meta_width"] // 8 for p in wide)
    both = [p for p in kernel if p["model"] == "both"]
    assert all(p["meta_width"] == 4 * p["primary_width"] for p in both)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 5 and full.steps > quick.steps
    assert max(full.meta_widths) > max(quick.meta_widths)
    for key, value, match in (("models", "hyper,hyper", "must not repeat"),
                              ("models", "lstm", "models"),
                              ("lr_fraction", "1.5", "lr_fraction"),
                              ("data.n_kernel", "40", "data.n_kernel"),
                              ("data.amplitude", "2,1", "amplitude"),
                              ("wide_meta_widths", "4,64", "wide_ratio"),
                              ("device", "gpu0", "device"),
                              ("kernel_draws", "0", "kernel_draws")):
        with pytest.raises(ValueError, match=match):
            make_config(study, "quick", {key: value})


def test_tiny_run_replayed_and_kernel_rows():
    config = _config()
    pts = hn.points(config)
    rows = []
    for point in pts:
        rows += [{**point, **r} for r in hn.run_point(config, point, Progress())]
    df = pd.DataFrame(rows)
    taylor = df[df["kind"] == "taylor"]
    assert len(taylor) == 5 * len(log_spaced_steps(8, 3))
    assert taylor["gap"].notna().all() and (taylor["gap"] > 0).all()
    for point in (p for p in pts if p["part"] == "taylor"):
        got = taylor[(taylor["model"] == point["model"])
                     & (taylor["meta_width"] == point["meta_width"])].sort_values("step")
        ref = _replay(config, point)
        assert list(got["step"]) == [r["step"] for r in ref]
        for col in ("gap", "telescoping_gap", "train_mse"):
            torch.testing.assert_close(torch.tensor(got[col].to_numpy()),
                                       torch.tensor([r[col] for r in ref], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-7)
    # kernel rows: the distances are those of telescope.ntk to HyperMLP.kernel / .hadamard
    dist = df[df["kind"] == "distance"]
    assert len(dist) == 2 * (2 + 2 + 2)
    point = next(p for p in pts if p["part"] == "kernel" and p["model"] == "both"
                 and p["meta_width"] == 64)
    row = dist[(dist["model"] == "both") & (dist["meta_width"] == 64) & (dist["draw"] == 1)]
    data = sinusoid_tasks(3, 4, 3, seed=0)
    u = data.x_train.reshape(3, 4, -1)[:, :2].reshape(6, -1)
    arch = hn._architecture(config, 64, 16)
    torch.manual_seed(hn._draw_seed(point["seed"], 1))
    k = telescope.ntk(arch.module(3), u).double()
    exact, naive = arch.kernel(u.double())["ntk"], arch.hadamard(u.double())["ntk"]
    assert float(row["dist_exact"].iloc[0]) == pytest.approx(
        float((k - exact).norm() / exact.norm()), rel=1e-6)
    assert float(row["dist_naive"].iloc[0]) == pytest.approx(
        float((k - naive).norm() / naive.norm()), rel=1e-6)
    slices = df[(df["kind"] == "slice") & (df["model"] == "both") & (df["meta_width"] == 64)]
    assert list(slices["j"]) == list(range(6))
    assert list(slices["same_task"]) == [True, True, False, False, False, False]

    out = hn.headline(df, config)
    assert out["seeds"] == 1 and out["step T of the Taylor gaps"] == 8
    assert {"Taylor gap (hyper, meta width 64)", "Taylor gap (mlp, meta width 16)",
            "hyperkernel convergence exponent (both widen, fit)",
            "distance to the hyperkernel (meta, largest width 64)"} <= set(out)
    assert out["answer"].startswith("(a) With a finite primary")


def _replay(config, point: dict) -> list[dict]:
    """Full-batch GD on the MSE at the study's learning rate, written out, the linearization
    and the telescoping model from tests/_first_order.py (``torch.func.jvp``)."""
    data = sinusoid_tasks(3, 4, 3, seed=point["seed"])
    if point["model"] == "mlp":
        arch = hn._plain_mlp(config, point["meta_width"])
        k = arch.kernel(data.x_train.double())["ntk"]
        torch.manual_seed(point["seed"])
        model = arch.module((4,))
    else:
        arch = hn._architecture(config, point["meta_width"], point["primary_width"])
        k = arch.kernel(data.x_train.double())["ntk"]
        torch.manual_seed(point["seed"])
        model = arch.module(3)
    lr = config.lr_fraction * 12 / float(torch.linalg.eigvalsh(k)[-1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref = FirstOrder(model, {"test": data.x_test})
    at = set(log_spaced_steps(config.steps, config.evals))
    rows = []
    for step in range(1, config.steps + 1):
        opt.zero_grad()
        F.mse_loss(model(data.x_train), data.y_train).backward()
        ref.before()
        opt.step()
        ref.after()
        if step in at:
            a, h0 = ref.actual("test").double(), ref.f0["test"].double()
            change = float((a - h0).pow(2).mean().sqrt())
            lin = float((a - ref.linearized("test").double()).pow(2).mean().sqrt())
            tele = float((a - ref.telescoping("test").double()).pow(2).mean().sqrt())
            with torch.no_grad():
                train = float(F.mse_loss(model(data.x_train), data.y_train))
            rows.append({"step": step, "gap": lin / change, "telescoping_gap": tele / change,
                         "train_mse": train})
    return rows


def test_headline_on_a_synthetic_table():
    rows = []
    for model, slope in (("hyper", 0.0), ("mlp", -0.5)):
        for w in (64, 256, 1024):
            for seed in (0, 1):
                rows.append({"part": "taylor", "kind": "taylor", "model": model,
                             "meta_width": w, "primary_width": 8, "seed": seed, "step": 100,
                             "gap": 0.3 * (w / 64) ** slope * (1 + 0.1 * seed)})
    for series, slope in (("both", -0.5), ("meta", 0.0)):
        for w in (64, 256, 1024):
            rows.append({"part": "kernel", "kind": "distance", "model": series,
                         "meta_width": w, "primary_width": w // 4, "seed": 0,
                         "dist_exact": 0.5 * (w / 64) ** slope, "dist_naive": 0.4,
                         "naive_vs_exact": 0.3})
    df = pd.DataFrame(rows)
    out = hn.headline(df, make_config(get_study("hypernetwork-ntk"), "quick", {}))
    assert out["Taylor gap slope in log meta width (mlp)"] == pytest.approx(-0.5)
    assert out["Taylor gap slope in log meta width (hyper)"] == pytest.approx(0.0, abs=1e-12)
    assert out["Taylor gap (hyper, meta width 1024)"] == pytest.approx(0.315)
    assert out["Taylor gap min-max over seeds (hyper, meta width 64)"] == "0.3-0.33"
    key = "smallest hypernetwork gap over seeds / largest MLP gap (meta width 1024)"
    assert out[key] == pytest.approx(0.3 / (0.3 * 16**-0.5 * 1.1))
    assert out["hyperkernel convergence exponent (both widen, fit)"] == pytest.approx(-0.5)
    assert out["distance to the hyperkernel (meta, largest width 1024)"] == pytest.approx(0.5)
    assert out["distance to the plain product (both, largest width 1024)"] == pytest.approx(0.4)
    assert "becomes linear again" not in out["answer"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["study", "hypernetwork-ntk", "--preset", "quick", "--out", str(out), "--threads",
            "1", "--no-progress"]
    for key, value in {**TINY, "models": "hyper,mlp", "kernel_primary_widths": "4",
                       "kernel_meta_widths": "16"}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert (out / "hypernetwork_taylor.png").exists()
    assert (out / "hypernetwork_kernel.png").exists()
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["kind"]) == {"taylor", "distance", "slice"}
