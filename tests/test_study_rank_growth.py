"""The ``rank-growth`` study: sweep and presets, a tiny run against a plain re-implementation,
the full preset with tiny overrides, the CLI end to end, and the headline on a synthetic
table."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _sequence_replay import (
    check_against_replay,
    check_rows,
    encoder,
    evaluate,
    run_all,
    sequences,
    tiny_config,
)

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import rank_growth as rg
from telescope.train import Progress, log_spaced_steps

TINY = {"seeds": "1", "data.n_train": "48", "data.n_test": "24", "steps": "6", "evals": "3",
        "d_model": "16"}

SCHEMA = rg.COLUMNS.names


def _config(preset: str = "quick", **extra: str):
    return tiny_config("rank-growth", TINY, preset, **extra)


def test_points_and_presets():
    study = get_study("rank_growth")
    quick = make_config(study, "quick", {})
    pts = rg.points(quick)
    assert len(pts) == 2 * 2
    assert all(isinstance(p["setting"], float) for p in pts)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.steps > quick.steps
    assert len(rg.points(full)) == 3 * 4
    only = make_config(study, "quick", {"alphas": "0.1,1", "seeds": "1"})
    assert rg.points(only) == [{"setting": a, "seed": 0} for a in (0.1, 1.0)]
    with pytest.raises(ValueError, match="alphas"):
        make_config(study, "quick", {"alphas": "0,1"})
    with pytest.raises(ValueError, match="threshold"):
        make_config(study, "quick", {"threshold": "1"})


def test_runs_tiny():
    config = _config()
    pts, rows, df = run_all(rg, config)
    assert SCHEMA <= set(df.columns)
    check_rows(rows, SCHEMA)
    assert df["seconds"].notna().sum() == len(pts)
    rank = df[df["lens"] == "rank"]
    assert set(rank["kind"]) == {"weight", "qk", "vo"}
    assert set(rank.loc[rank["kind"] != "weight", "head"]) == {0, 1}
    assert set(rank.loc[rank["kind"] == "weight", "head"]) == {-1}
    check_against_replay(df, pts, config, _replay_rank, "rank")


def _replay_rank(config, setting: float) -> list[dict]:
    """Full-batch Adam at lr 1e-3 from weights scaled by alpha; SVD of every 2-D weight's update
    and of the per-head updates of ``W_Q[h]^T W_K[h]`` and ``W_O[:, h] W_V[h]``."""
    ds, x, y, xt, yt = sequences(48, 24)
    model = encoder(ds, 16, 2, 1, alpha=setting)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def matrices():
        out = {(n, -1): p.detach().double().clone() for n, p in model.named_parameters()
               if p.dim() == 2}
        attn = model.blocks[0].attn
        wq, wk, wv, wo = (m.weight.detach().double() for m in (attn.query, attn.key,
                                                                attn.value, attn.out))
        for h in range(2):
            r = slice(8 * h, 8 * h + 8)
            out[("blocks.0.attn.qk", h)] = wq[r].T @ wk[r]
            out[("blocks.0.attn.vo", h)] = wo[:, r] @ wv[r]
        return out

    start = matrices()
    rows = []
    for step in range(1, 7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step not in log_spaced_steps(6, 3):
            continue
        loss, acc = evaluate(model, x, y)
        rows.append({"lens": "train", "step": step, "train_loss": loss, "train_acc": acc,
                     "test_acc": evaluate(model, xt, yt)[1]})
        for (name, head), m in matrices().items():
            sv = torch.linalg.svd(m - start[(name, head)])[1]
            rows.append({"lens": "rank", "step": step, "matrix": name, "head": head,
                         "delta_norm": float(sv.norm()), "sigma_max": float(sv[0]),
                         "stable_rank": float((sv ** 2).sum() / sv[0] ** 2),
                         "rank": float((sv > 0.05 * sv[0]).sum())})
    return rows


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"data.name": "digits-rows", "seeds": "1", "device": "cpu",
                                "n_heads": "2"})
    rows = rg.run_point(config, rg.points(config)[0], Progress())
    assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "rg"
    args = ["study", "rank-growth", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", *[f"{k}={v}" for k, v in TINY.items()], "alphas=0.01,1"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["setting"]) == {0.01, 1.0}
    assert (out / "rank_growth.png").stat().st_size > 0
    assert (out / "rank_growth.svg").stat().st_size > 0
    assert "final max rank" in (out / "report.html").read_text()


def _synthetic() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for setting in (0.01, 1.0):
            name = f"alpha={setting:g}"
            for step, r in ((1, 1), (5, 1), (20, 3), (100, 4)):
                r = r if setting < 1 else 12
                for head in (0, 1):
                    rows.append({"setting": setting, "seed": seed, **rg.COLUMNS.row(
                        setting_name=name, step=step, lens="rank", matrix="blocks.0.attn.vo",
                        kind="vo", head=head, rank=r - head, stable_rank=1.5)})
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = rg.headline(df, config)
    assert h["final max rank, vo (alpha=0.01)"] == 4
    assert h["final max rank, vo (alpha=1)"] == 12
    # mean over the two heads: 0.5, 0.5, 2.5, 3.5 at steps 1, 5, 20, 100
    assert h["steps where vo rank increases (alpha=0.01)"] == [20, 100]
    assert h["final mean rank, vo (alpha=0.01)"] == 3.5
    assert h["steps where vo rank increases (alpha=1)"] == []
    assert h["seeds"] == 2
    assert [p.name for p in rg.figures(df, config, tmp_path)] == ["rank_growth.png"]
    assert rg.figures(df.iloc[0:0], config, tmp_path / "x") == []
