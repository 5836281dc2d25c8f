"""The `telescope` command line, run in-process, and the thread-count default."""

from __future__ import annotations

import csv
import math

import pytest
import torch

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


def test_demo_writes_table_figure_and_csv(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["--threads", "1", "demo", "--n", "32", "--n-test", "40", "--width", "64",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out

    rows = parse_table(printed)
    assert [r["width"] for r in rows] == ["64", "inf"]
    for row in rows:
        dist, align = float(row["rel_frobenius"]), float(row["alignment"])
        assert math.isfinite(dist) and dist >= 0
        assert -1.0 <= align <= 1.0 + 1e-6
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["effective_rank"]) >= 1.0 - 1e-6
        assert float(row["ntk_seconds"]) >= 0
    assert rows[-1]["rel_frobenius"] == "0.0000"
    assert int(rows[0]["n_params"]) == 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10

    assert (out / "kernels.png").stat().st_size > 0
    assert str((out / "kernels.png").resolve()) in printed
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["width"]) for r in table] == [64.0, math.inf]
    assert {"width", "rel_frobenius", "alignment", "effective_rank", "ntk_seconds",
            "test_accuracy"} <= set(table[0])
    assert all(r["n_train"] == "32" and r["n_test"] == "40" for r in table)


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
