"""The ``approximation`` study: end to end through the CLI with tiny sizes, its presets, the
sigmoid-output variant and its headline."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _first_order import FirstOrder

from telescope.cli import main
from telescope.studies import approximation as ap
from telescope.studies import get_study, make_config
from telescope.train import Progress

PROBE_COLUMNS = {f"{kind}_{probe}" for kind in ("telescoping_mae", "linearized_mae",
                                                "output_scale") for probe in ("train", "test")}
COLUMNS = {"optimizer", "lr", "seed", "step", "train_loss", "acc_network", "acc_telescoping",
           "acc_linearized", "n_train", "n_test", "batch_size", "seconds"} | PROBE_COLUMNS
TINY = ["--set", "hidden=32,32", "lrs=0.01", "adamw_lrs=1e-3", "sigmoid_lrs=0.1", "steps=20",
        "every=10", "data.n_train=40", "data.n_test=20", "batch_size=16", "--no-progress"]



def test_quick_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "approx"
    assert main(["study", "approximation", "--preset", "quick", "--out", str(out), *TINY]) == 0
    assert "report:" in capsys.readouterr().out

    df = pd.read_parquet(out / "results.parquet")
    assert COLUMNS <= set(df.columns)
    assert set(df["optimizer"]) == set(ap.VARIANTS)  # the quick preset runs all five
    assert len(df) == 5 * 2  # one learning rate each, rows at steps 10 and 20
    assert sorted(df["step"].unique()) == [10, 20]
    assert dict(df.groupby("optimizer")["lr"].first()) == {
        "sgd": 0.01, "momentum": 0.01, "weight_decay": 0.01, "adamw": 1e-3, "sigmoid": 0.1}
    assert (df["n_train"] == 40).all() and (df["batch_size"] == 16).all()
    # (the values, the sigmoid variant's included, are checked against a plain replay in
    # test_full_preset_builds_and_runs_with_tiny_overrides)
    # the telescoping model is the better approximation, on both probe sets
    for probe in ("train", "test"):
        assert (df[f"telescoping_mae_{probe}"] < df[f"linearized_mae_{probe}"]).all()

    for name in ("approximation_steps", "approximation_lr", "approximation_accuracy"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert (out / f"{name}.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "telescoping | linearized error" in html


def test_full_preset_builds_and_runs_with_tiny_overrides():
    study = get_study("approximation")
    full = make_config(study, "full", {})
    assert full.data.name == "mnist" and full.data.size == 8 and full.data.classes == (3, 5)
    assert full.data.n_train == 1000 and full.seeds == 3 and full.device == "auto"
    assert full.hidden == (200, 200, 200)
    n_lrs = len(full.lrs) * 3 + len(full.adamw_lrs) + len(full.sigmoid_lrs)
    with pytest.raises(ValueError, match="data.path"):
        ap.points(full)
    located = make_config(study, "full", {"data.path": "/data/mnist"})
    assert len(ap.points(located)) == n_lrs * full.seeds

    tiny = make_config(study, "full", {
        "data.name": "digits", "data.n_train": "30", "data.n_test": "20",
        "hidden": "16", "optimizers": "momentum", "lrs": "0.01", "steps": "8", "every": "4",
        "seeds": "1", "device": "cpu", "dtype": "float64"})
    for point in (*ap.points(tiny), {"optimizer": "sigmoid", "lr": 0.1, "seed": 2}):
        rows = ap.run_point(tiny, point, Progress())
        assert [r["step"] for r in rows] == [4, 8]
        assert COLUMNS - {"optimizer", "lr", "seed"} <= set(rows[-1])
        for row, ref in zip(rows, _replay(tiny, point), strict=True):
            for col, value in ref.items():
                assert row[col] == pytest.approx(value, rel=1e-8, abs=1e-12), (point, col)


def _replay(config: ap.ApproximationConfig, point: dict) -> list[dict]:
    """One sweep point written out plainly: the same initialization, batches and SGD (with
    momentum 0.9 for ``momentum``), first-order models from ``torch.func.jvp``
    (:mod:`_first_order`), accuracies as signs against the targets (``sigmoid``: the output
    against 0.5, targets 1 / 0)."""
    from torch import nn

    from telescope.models import MLP
    from telescope.studies._binary import load_binary_task

    ds = load_binary_task(config.data, dtype=torch.float64)
    x, y, xt, yt = ds.x_train.flatten(1), ds.y_train, ds.x_test.flatten(1), ds.y_test
    sigmoid = point["optimizer"] == "sigmoid"
    torch.manual_seed(point["seed"])
    model = MLP(x.shape[1], config.hidden, 1)
    if sigmoid:
        model, y = nn.Sequential(model, nn.Sigmoid()), (y + 1) / 2
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=point["lr"],
                          momentum=0.0 if sigmoid else 0.9)
    gen = torch.Generator().manual_seed(point["seed"] + 1)
    fo = FirstOrder(model, {"train": x, "test": xt})
    positive = (yt > 0).reshape(-1)

    def acc(pred):
        return float(((pred.reshape(-1) > (0.5 if sigmoid else 0.0)) == positive).double().mean())

    out = []
    for step in range(1, config.steps + 1):
        idx = torch.randperm(x.shape[0], generator=gen)[:config.batch_size]
        opt.zero_grad()
        loss = 0.5 * ((model(x[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        fo.before()
        opt.step()
        fo.after()
        if step % config.every == 0:
            row = {"train_loss": float(loss.detach()), "acc_network": acc(fo.actual("test")),
                   "acc_telescoping": acc(fo.telescoping("test")),
                   "acc_linearized": acc(fo.linearized("test"))}
            for probe in ("train", "test"):
                row.update({f"{k}_{probe}": v for k, v in fo.maes(probe).items()})
            out.append(row)
    return out


def test_quick_preset_defaults_and_validation():
    study = get_study("approximation")
    quick = make_config(study, "quick", {})
    assert quick.data.name == "digits" and (quick.data.n_train, quick.data.n_test) == (250, 115)
    # a nested override keeps the study's own data defaults
    c = make_config(study, "quick", {"data.n_train": "100"})
    assert c.data.name == "digits" and c.data.n_test == 115
    assert len(ap.points(quick)) == 5 * 4
    with pytest.raises(ValueError, match="optimizers"):
        make_config(study, "quick", {"optimizers": "sgd,lbfgs"})
    with pytest.raises(ValueError, match="learning rates"):
        make_config(study, "quick", {"lrs": "0.01,-1"})


def test_headline_per_optimizer():
    rows = []
    for name, lr, tele, lin in (("sgd", 0.01, 1e-3, 1e-1), ("sgd", 0.1, 1e-2, 5e-1),
                                ("adamw", 1e-4, 2e-2, 4e-1)):
        for step in (10, 20):
            rows.append({"optimizer": name, "lr": lr, "seed": 0, "step": step,
                         "telescoping_mae_test": tele * step / 20,
                         "linearized_mae_test": lin * step / 20, "acc_network": 0.9,
                         "acc_telescoping": 0.9, "acc_linearized": 0.8})
    h = ap.headline(pd.DataFrame(rows), ap.ApproximationConfig())
    assert h["sgd (lr 0.1): telescoping | linearized error"] == pytest.approx((1e-2, 5e-1))
    assert h["adamw (lr 0.0001): accuracy network | telescoping | linearized"] == \
        pytest.approx((0.9, 0.9, 0.8))
    assert h["median linearized / telescoping error, all runs"] == pytest.approx(50.0)
    assert h["seeds"] == 1
