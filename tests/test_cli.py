"""The `telescope` command line, run in-process, and the thread-count default; the
``ntk-width`` study (the former `telescope demo`) against numpy / autograd oracles."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from _oracles import np_relu_ntk, oracle_jacobian

from telescope._threads import available_cpus, configure_threads
from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import ntk_width as nw

# ------------------------------------------------------- numpy oracles for the ntk-width numbers


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


def width_oracle(n: int, n_test: int, width: int, seed: int = 0) -> dict[float, dict]:
    """The study's numbers recomputed: the empirical NTK by per-example autograd (float64 copy
    of the width-``width`` MLP built as the study builds it), the infinite one by numpy; by
    width (``inf``: the infinite-width NTK), with the eigenvalues, largest first."""
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
        float(width): {"rel_frobenius": np.linalg.norm(k - k_inf) / np.linalg.norm(k_inf),
                       "alignment": np_alignment(k, k_inf),
                       "effective_rank": np_effective_rank(k),
                       "test_accuracy": np_kr_accuracy(k, k_st, y, y_test),
                       "eigenvalues": np.linalg.eigvalsh(k)[::-1]},
        math.inf: {"rel_frobenius": 0.0, "alignment": 1.0,
                   "effective_rank": np_effective_rank(k_inf),
                   "test_accuracy": np_kr_accuracy(k_inf, k_inf_st, y, y_test),
                   "eigenvalues": np.linalg.eigvalsh(k_inf)[::-1]},
    }


def printed_headline(text: str) -> dict[str, str]:
    """``quantity: value`` lines of the headline the CLI prints after a study."""
    return dict(m.groups() for m in re.finditer(r"^(.+?): (\S+)$", text, re.MULTILINE))


def test_ntk_width_study_writes_results_figures_report(tmp_path, capsys):
    out = tmp_path / "ntkw"
    code = main(["--threads", "1", "study", "ntk-width", "--set", "data.n_train=32",
                 "data.n_test=40", "widths=64", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out

    df = pd.read_parquet(out / "results.parquet")
    kern = df[df["kind"] == "kernel"].reset_index(drop=True)
    assert list(kern["width"]) == [64.0, math.inf]
    assert int(kern["n_params"][0]) == 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert math.isnan(kern["n_params"][1])  # the infinite-width kernel has no parameters
    assert (df["n_train"] == 32).all() and (df["n_test"] == 40).all()
    assert (df["seed"] == 0).all()
    for name in ("ntk_width", "ntk_width_spectra"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert (out / f"{name}.svg").stat().st_size > 0
    assert str((out / "report.html").resolve()) in printed

    # every number against the autograd / numpy recomputation: results.parquet at full
    # precision, the printed headline at its rounding (4 significant digits)
    oracle = width_oracle(n=32, n_test=40, width=64)
    for _, row in kern.iterrows():
        want = oracle[row["width"]]
        for key in ("rel_frobenius", "alignment", "effective_rank", "test_accuracy"):
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (row["width"], key)
        spec = df[(df["kind"] == "spectrum") & (df["width"] == row["width"])]
        assert list(spec["index"]) == list(range(1, 33))
        np.testing.assert_allclose(spec["eigenvalue"], want["eigenvalues"], rtol=1e-6,
                                   atol=1e-6 * want["eigenvalues"][0])
    shown = printed_headline(printed)
    for key, want in (("relative distance to the infinite NTK, width 64", "rel_frobenius"),
                      ("alignment with the infinite NTK, width 64", "alignment"),
                      ("kernel-regression test accuracy, width 64", "test_accuracy")):
        assert float(shown[key]) == pytest.approx(oracle[64.0][want], rel=6e-4), key
    assert float(shown["kernel-regression test accuracy, infinite NTK"]) == pytest.approx(
        oracle[math.inf]["test_accuracy"], rel=6e-4)


def test_ntk_width_width_list_presets_and_validation(tmp_path):
    out = tmp_path / "w"
    assert main(["study", "ntk-width", "--set", "data.n_train=16", "data.n_test=16",
                 "widths=32,16", "--out", str(out), "--no-progress", "--no-report",
                 "--threads", "1"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert list(df[df["kind"] == "kernel"]["width"]) == [16.0, 32.0, math.inf]

    study = get_study("ntk-width")
    quick = make_config(study, "quick", {})
    assert quick.widths == (64, 256, 512) and quick.data.n_train == 256
    assert quick.data.n_test == 1000 and quick.seeds == 1
    assert [p["width"] for p in nw.points(quick)] == [64.0, 256.0, 512.0, math.inf]
    full = make_config(study, "full", {})
    assert len(nw.points(full)) == (len(full.widths) + 1) * full.seeds
    for bad, needle in ((("widths", "0"), "widths"), (("widths", "8,8"), "repeat"),
                        (("data.n_train", "1"), "data.n_train"), (("ridge", "0"), "ridge"),
                        (("ntk_memory_gb", "0"), "ntk_memory_gb")):
        with pytest.raises(ValueError, match=needle):
            make_config(study, "quick", dict([bad]))


def test_ntk_width_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "ntk-width", "--set", "data.n_train=100000000", "data.n_test=2",
              "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("telescope: error:") and "Traceback" not in err
    assert "study 'ntk-width'" in err and "of memory here" in err
    assert not (tmp_path / "x").exists()


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
    (["ntk", "--model", "mlp", "--n", "zero"], "expected a positive integer"),
    (["--threads", "0", "ntk", "--model", "mlp"], "expected a positive integer"),
    (["demo"], "invalid choice: 'demo'"),   # now `telescope study ntk-width`
    (["lens"], "invalid choice: 'lens'"),   # now `telescope study approximation`
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
