"""`telescope lens`, run in-process with tiny sizes."""

from __future__ import annotations

import csv

import pytest
import torch
from _first_order import FirstOrder

from telescope.cli import main

HEADER = ["optimizer", "lr", "steps", "train_loss", "test_acc", "telescoping_mae",
          "linearized_mae", "ratio", "output_scale", "seconds"]
TINY = ["--threads", "1", "--steps", "12", "--every", "4", "--n-train", "40", "--n-test", "20",
        "--batch-size", "16", "--no-progress"]



def _table(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(HEADER):
            break
        rows.append(dict(zip(HEADER, cells, strict=True)))
    return rows


def test_lens_writes_figure_csv_and_summary(tmp_path, capsys):
    out = tmp_path / "lens"
    code = main(["lens", *TINY, "--lr", "0.01", "0.05", "--adamw-lr", "1e-4",
                 "--out", str(out), "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "digits 3 vs 5, 40 training / 20 test points" in printed

    table = _table(printed)
    runs = [("sgd", "0.01"), ("sgd", "0.05"), ("momentum", "0.01"), ("momentum", "0.05"),
            ("weight_decay", "0.01"), ("weight_decay", "0.05"), ("adamw", "0.0001")]
    assert [(r["optimizer"], r["lr"]) for r in table] == runs
    replays = {run: _replay(*run) for run in (("sgd", "0.05"), ("adamw", "0.0001"))}
    checked = 0
    for r in table:
        assert r["steps"] == "12"
        tele, lin = float(r["telescoping_mae"]), float(r["linearized_mae"])
        assert tele < lin  # the telescoping model is the better approximation
        ref = replays.get((r["optimizer"], r["lr"]))
        if ref is not None:
            assert float(r["test_acc"]) == pytest.approx(ref["test_acc"], abs=1e-3)
            checked += 1

    assert (out / "approximation.png").stat().st_size > 0
    assert str((out / "approximation.png").resolve()) in printed
    with open(out / "approximation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * 3 * 2  # steps 4, 8, 12; train and test probes
    assert {r["probe"] for r in rows} == {"train", "test"}
    assert sorted({int(r["step"]) for r in rows}) == [4, 8, 12]
    for r in rows:
        assert r["n_train"] == "40" and r["n_test"] == "20" and r["batch_size"] == "16"
        assert r["seed"] == "3"
        ref = replays.get((r["optimizer"], r["lr"]))
        if ref is not None:  # every recorded value against the plain replay
            expected = ref[(int(r["step"]), r["probe"])]
            for key, value in expected.items():
                assert float(r[key]) == pytest.approx(value, rel=1e-4, abs=1e-7), (r, key)
            checked += 1
    assert checked == 2 + 2 * 3 * 2  # two table rows, 2 runs x 3 steps x 2 probes


def _replay(optimizer: str, lr: str) -> dict:
    """One run of TINY (seed 3) written out plainly: the same split, initialization and batches,
    the preset's optimizer built by hand, first-order models from ``torch.func.jvp``
    (:mod:`_first_order`); ``train_loss`` is the minibatch loss before the recorded step."""
    from telescope.lens_demo import HIDDEN, load_digits_3v5
    from telescope.models import MLP

    x, y, xt, yt = load_digits_3v5(40, 20, 3)
    torch.manual_seed(3)
    model = MLP(64, HIDDEN, 1)
    opt = (torch.optim.SGD(model.parameters(), lr=float(lr)) if optimizer == "sgd" else
           torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=1e-2))
    gen = torch.Generator().manual_seed(4)
    fo = FirstOrder(model, {"train": x, "test": xt})
    out: dict = {}
    for step in range(1, 13):
        idx = torch.randperm(40, generator=gen)[:16]
        opt.zero_grad()
        loss = 0.5 * ((model(x[idx])[:, 0] - y[idx]) ** 2).mean()
        loss.backward()
        fo.before()
        opt.step()
        fo.after()
        if step % 4 == 0:
            for probe in ("train", "test"):
                out[(step, probe)] = {**fo.maes(probe), "train_loss": float(loss.detach())}
    out["test_acc"] = float(((fo.actual("test")[:, 0] > 0) == (yt > 0)).double().mean())
    return out


def test_lens_single_optimizer_float64(tmp_path, capsys):
    code = main(["lens", *TINY, "--optimizer", "adamw", "--adamw-lr", "1e-3", "--float64",
                 "--out", str(tmp_path)])
    assert code == 0
    assert [(r["optimizer"], r["lr"]) for r in _table(capsys.readouterr().out)] == [
        ("adamw", "0.001")]


@pytest.mark.parametrize("argv, needle", [
    (["lens", "--lr", "-1"], "expected a positive number"),
    (["lens", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["lens", "--steps", "0"], "expected a positive integer"),
])
def test_lens_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--n-train", "300", "--n-test", "100"], "too many"),
    (["--lr", "1e30", "--optimizer", "sgd"], "diverged"),
])
def test_lens_user_errors_exit_2_without_traceback(extra, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lens", *TINY, *extra, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("telescope: error:") and needle in err and "Traceback" not in err
