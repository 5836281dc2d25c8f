"""The `telescope` command line, run in-process, and the thread-count default."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from _oracles import np_relu_ntk, oracle_jacobian

from telescope._threads import available_cpus, configure_threads
from telescope.cli import main

TABLE_HEADER = ["width", "n_params", "rel_frobenius", "alignment", "effective_rank",
                "ntk_seconds", "test_accuracy"]



def parse_table(text: str) -> list[dict[str, str]]:
    """The whitespace-separated table that starts at the line holding the header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == TABLE_HEADER)
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(TABLE_HEADER):
            break
        rows.append(dict(zip(TABLE_HEADER, cells, strict=True)))
    return rows


# ------------------------------------------------------------ numpy oracles for the demo's numbers


def np_alignment(a: np.ndarray, b: np.ndarray) -> float:
    h = np.eye(len(a)) - 1.0 / len(a)
    ac, bc = h @ a @ h, h @ b @ h
    return float((ac * bc).sum() / (np.linalg.norm(ac) * np.linalg.norm(bc)))


def np_effective_rank(k: np.ndarray) -> float:
    s = np.abs(np.linalg.eigvalsh((k + k.T) / 2))
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def np_kr_accuracy(k: np.ndarray, k_st: np.ndarray, y: np.ndarray, y_test: np.ndarray) -> float:
    """Converged kernel ridge regression on one-hot labels, ridge 1e-4 x the mean diagonal."""
    onehot = np.eye(10)[y]
    alpha = np.linalg.solve(k + 1e-4 * np.diag(k).mean() * np.eye(len(k)), onehot)
    return float(((k_st @ alpha).argmax(1) == y_test).mean())


def demo_oracle(n: int, n_test: int, width: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """The demo's numbers recomputed: the empirical NTK by per-example autograd (float64 copy
    of the width-``width`` MLP built as the demo builds it), the infinite one by numpy."""
    from telescope.data import load_mnist1d
    from telescope.models import MLP

    data = load_mnist1d(n_train=n, n_test=n_test, seed=seed)
    x, x_test = data.x_train[:n].double(), data.x_test[:n_test].double()
    y, y_test = data.y_train[:n].numpy(), data.y_test[:n_test].numpy()
    k_inf = np_relu_ntk(x.numpy(), None, depth=2)
    k_inf_st = np_relu_ntk(x_test.numpy(), x.numpy(), depth=2)

    torch.manual_seed(seed)
    model = MLP(x.shape[1], [width, width], 10, activation="relu", parametrization="ntk")
    model = model.double()
    j, j_test = oracle_jacobian(model, x).numpy(), oracle_jacobian(model, x_test).numpy()
    k = np.einsum("aop,bop->ab", j, j) / 10          # [N, O, P] Jacobians: trace over outputs
    k_st = np.einsum("aop,bop->ab", j_test, j) / 10
    return {
        str(width): {"rel_frobenius": np.linalg.norm(k - k_inf) / np.linalg.norm(k_inf),
                     "alignment": np_alignment(k, k_inf), "effective_rank": np_effective_rank(k),
                     "test_accuracy": np_kr_accuracy(k, k_st, y, y_test)},
        "inf": {"effective_rank": np_effective_rank(k_inf),
                "test_accuracy": np_kr_accuracy(k_inf, k_inf_st, y, y_test)},
    }


def test_demo_writes_table_figure_and_csv(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["--threads", "1", "demo", "--n", "32", "--n-test", "40", "--width", "64",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out

    rows = parse_table(printed)
    assert [r["width"] for r in rows] == ["64", "inf"]
    assert int(rows[0]["n_params"]) == 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10

    assert (out / "kernels.png").stat().st_size > 0
    assert str((out / "kernels.png").resolve()) in printed
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["width"]) for r in table] == [64.0, math.inf]
    assert all(r["n_train"] == "32" and r["n_test"] == "40" for r in table)

    # every number against the autograd / numpy recomputation: the CSV at full precision, the
    # printed table at its rounding (4 decimals; effective rank 1 decimal)
    oracle = demo_oracle(n=32, n_test=40, width=64)
    for row, saved in zip(rows, table, strict=True):
        for key, want in oracle[row["width"]].items():
            assert float(saved[key]) == pytest.approx(want, rel=1e-6, abs=1e-6), \
                (row["width"], key)
            shown = 0.051 if key == "effective_rank" else 6e-5
            assert float(row[key]) == pytest.approx(want, abs=shown), (row["width"], key)


def test_demo_width_list(tmp_path, capsys):
    code = main(["demo", "--n", "16", "--n-test", "16", "--width", "16", "32",
                 "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert code == 0
    rows = parse_table(capsys.readouterr().out)
    assert [r["width"] for r in rows] == ["16", "32", "inf"]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_ntk_mnist1d_presets(model, tmp_path, capsys):
    out = tmp_path / model
    assert main(["--threads", "1", "ntk", "--model", model, "--n", "16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "top eigenvalues" in printed
    saved = torch.load(out / "kernel.pt", weights_only=True)
    k = saved["kernel"]
    assert k.shape == (16, 16)
    assert torch.allclose(k, k.T, rtol=1e-4, atol=1e-5)
    assert saved["model"] == model and saved["data"] == "mnist1d" and saved["n"] == 16
    assert saved["eigenvalues"].shape == (16,)
    assert type(saved["torch_version"]) is str and saved["shape"] == (16, 16)
    assert (out / "spectrum.png").stat().st_size > 0


def test_ntk_transformer_preset_diagonal_output(tmp_path, capsys):
    out = tmp_path / "tf"
    assert main(["ntk", "--model", "transformer", "--n", "8", "--output", "diagonal",
                 "--out", str(out), "--threads", "1"]) == 0
    assert "kernel [8, 8, 128]" in capsys.readouterr().out
    saved = torch.load(out / "kernel.pt", weights_only=True)
    assert saved["kernel"].shape == (8, 8, 128)
    assert saved["data"] == "tokens"
    assert (out / "spectrum.png").exists()


@pytest.mark.parametrize("argv, needle", [
    (["ntk", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["demo", "--n", "zero"], "expected a positive integer"),
    (["--threads", "0", "demo"], "expected a positive integer"),
    (["ntk"], "--model"),
    ([], "COMMAND"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: telescope" in err and "error:" in err and needle in err


def test_value_errors_become_exit_2_without_traceback(tmp_path, capsys):
    # a valid command line whose combination the preset rejects: caught, no traceback
    with pytest.raises(SystemExit) as exc:
        main(["ntk", "--model", "transformer", "--data", "mnist1d", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("telescope: error:") and "Traceback" not in err
    assert "--data tokens" in err


def test_configure_threads_explicit_env_and_default(monkeypatch):
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert configure_threads() == 1 and torch.get_num_threads() == 1

    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(64)
    used = configure_threads()
    assert used == torch.get_num_threads()
    assert 1 <= used <= available_cpus()

    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")  # ignored, falls back to the default
    assert 1 <= configure_threads() <= available_cpus()

    with pytest.raises(ValueError):
        configure_threads(0)
