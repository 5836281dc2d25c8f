"""The former `telescope lens` runs, now `telescope study approximation` (which the command
repeated): four optimizers at tiny sizes against a plain replay, its argument and user errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from _first_order import FirstOrder

from telescope.cli import main
from telescope.studies import approximation as ap
from telescope.studies import get_study, make_config

TINY = ["steps=12", "every=4", "data.n_train=40", "data.n_test=20", "batch_size=16",
        "seed=3", "data.seed=3"]
OPTS = ["--threads", "1", "--no-progress"]


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_lens_runs_through_the_approximation_study(tmp_path, capsys):
    out = tmp_path / "lens"
    settings = ["optimizers=sgd,momentum,weight_decay,adamw", "lrs=0.01,0.05", "adamw_lrs=1e-4",
                *TINY]
    assert main(["study", "approximation", "--out", str(out), "--set", *settings, *OPTS]) == 0
    printed = capsys.readouterr().out
    assert str((out / "report.html").resolve()) in printed
    for name in ("approximation_steps", "approximation_lr", "approximation_accuracy"):
        assert (out / f"{name}.png").stat().st_size > 0

    df = pd.read_parquet(out / "results.parquet")
    runs = [("sgd", 0.01), ("sgd", 0.05), ("momentum", 0.01), ("momentum", 0.05),
            ("weight_decay", 0.01), ("weight_decay", 0.05), ("adamw", 1e-4)]
    assert list(dict.fromkeys(zip(df["optimizer"], df["lr"], strict=True))) == runs
    assert len(df) == len(runs) * 3  # steps 4, 8, 12; both probe sets in each row
    assert sorted(df["step"].unique()) == [4, 8, 12]
    assert (df["n_train"] == 40).all() and (df["n_test"] == 20).all()
    assert (df["batch_size"] == 16).all() and (df["seed"] == 3).all()
    last = df[df["step"] == 12]
    # the telescoping model is the better approximation (at the last step, on the test points)
    assert (last["telescoping_mae_test"] < last["linearized_mae_test"]).all()

    config = make_config(get_study("approximation"), "quick",
                         dict(s.split("=", 1) for s in settings))
    checked = 0
    for run_key in (("sgd", 0.05), ("weight_decay", 0.01), ("adamw", 1e-4)):
        ref = _replay(config, *run_key)
        got = df[(df["optimizer"] == run_key[0]) & (df["lr"] == run_key[1])]
        # every recorded value against the plain replay
        for (_, row), want in zip(got.iterrows(), ref["rows"], strict=True):
            for key, value in want.items():
                assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (run_key, key)
                checked += 1
        assert got["acc_network"].iloc[-1] == pytest.approx(ref["test_acc"], abs=1e-3)
    assert checked == 3 * 3 * 7  # 3 runs x 3 steps x (train loss + 3 values x 2 probes)


def _replay(config: ap.ApproximationConfig, optimizer: str, lr: float) -> dict:
    """One run (seed 3) written out plainly: the same split, initialization and batches, the
    preset's optimizer built by hand, first-order models from ``torch.func.jvp``
    (:mod:`_first_order`); ``train_loss`` is the minibatch loss before the recorded step."""
    from telescope.models import MLP
    from telescope.studies._binary import load_binary_task

    ds = load_binary_task(config.data)
    x, y, xt, yt = ds.x_train.flatten(1), ds.y_train, ds.x_test.flatten(1), ds.y_test
    torch.manual_seed(3)
    model = MLP(64, (200, 200, 200), 1)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=lr),
           "weight_decay": lambda p: torch.optim.SGD(p, lr=lr, weight_decay=0.1),
           "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=1e-2)}[optimizer](
        model.parameters())
    gen = torch.Generator().manual_seed(4)
    fo = FirstOrder(model, {"train": x, "test": xt})
    rows = []
    for step in range(1, 13):
        idx = torch.randperm(40, generator=gen)[:16]
        opt.zero_grad()
        loss = 0.5 * ((model(x[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        fo.before()
        opt.step()
        fo.after()
        if step % 4 == 0:
            row = {"train_loss": float(loss.detach())}
            for probe in ("train", "test"):
                row.update({f"{k}_{probe}": v for k, v in fo.maes(probe).items()})
            rows.append(row)
    test_acc = float(((fo.actual("test").reshape(-1) > 0) == (yt.reshape(-1) > 0)).double().mean())
    return {"rows": rows, "test_acc": test_acc}


def test_lens_single_optimizer_float64(tmp_path):
    out = tmp_path / "adamw"
    assert main(["study", "approximation", "--out", str(out), "--no-report", "--set",
                 "optimizers=adamw", "adamw_lrs=1e-3", "dtype=float64", *TINY, *OPTS]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert list(dict.fromkeys(zip(df["optimizer"], df["lr"], strict=True))) == [
        ("adamw", 0.001)]


@pytest.mark.parametrize("setting, needle", [
    ("lrs=-1", "learning rates must be positive"),
    ("optimizers=lbfgs", "optimizers must be some of"),
    ("steps=0", "steps and every must be >= 1"),
])
def test_lens_bad_settings_exit_2(setting, needle, tmp_path, capsys):
    assert run(["study", "approximation", "--out", str(tmp_path / "x"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("telescope: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("settings, needle", [
    (["data.n_train=300", "data.n_test=100", "lrs=0.01"], "do not fit"),
    (["lrs=1e30"], "diverged"),
])
def test_lens_failing_runs_exit_1_and_say_why(settings, needle, tmp_path, capsys):
    # a point's error is not the whole command's: the point fails (exit 1), says why in run.json
    out = tmp_path / "fail"
    assert run(["study", "approximation", "--out", str(out), "--set", *TINY, "optimizers=sgd",
                *settings, *OPTS]) == 1
    err = capsys.readouterr().err
    assert "point(s) failed" in err and "Traceback" not in err
    failed = json.loads((out / "run.json").read_text())["failed"]
    assert len(failed) == 1 and needle in failed[0]["error"]
