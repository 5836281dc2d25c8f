"""The ``transformer-dynamics`` study: sweep, the four experiments on tiny sizes, the full
preset with tiny overrides, the CLI end to end, and the headline on a synthetic table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _first_order import FirstOrder

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import transformer_dynamics as td
from telescope.train import Progress

TINY = {"seeds": "1", "data.n_train": "48", "data.n_test": "24",
        "entropy.steps": "6", "entropy.evals": "3", "entropy.d_model": "16",
        "entropy.batch_size": "16",
        "rank.steps": "6", "rank.evals": "3", "rank.d_model": "16",
        "slingshot.steps": "40", "slingshot.every": "5", "slingshot.p": "7",
        "slingshot.d_model": "16",
        "lazy.steps": "6", "lazy.evals": "3", "lazy.d_model": "16", "lazy.n_train": "24",
        "lazy.n_probe": "8"}

SCHEMA = set(td._TEXT) | set(td._INT) | set(td._FLOAT) | set(td._BOOL)


def _config(preset: str = "quick", **extra: str):
    return make_config(get_study("transformer-dynamics"), preset, {**TINY, **extra})


def test_points_and_presets():
    study = get_study("transformer_dynamics")
    quick = make_config(study, "quick", {})
    pts = td.points(quick)
    assert len(pts) == 2 * (2 + 2 + 2 + 4)
    assert {p["experiment"] for p in pts} == set(td.EXPERIMENTS)
    assert all(isinstance(p["setting"], float) for p in pts)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.slingshot.steps > quick.slingshot.steps
    assert len(td.points(full)) == 3 * (2 + 4 + 3 + 8)
    only = make_config(study, "quick", {"experiments": "lazy", "lazy.alphas": "1,8",
                                        "seeds": "1"})
    assert td.points(only) == [{"experiment": "lazy", "setting": a, "seed": 0} for a in (1., 8.)]
    with pytest.raises(ValueError, match="experiments"):
        make_config(study, "quick", {"experiments": "nope"})
    with pytest.raises(ValueError, match="alphas"):
        make_config(study, "quick", {"lazy.alphas": "0,1"})


def test_step_grid_and_loss_spikes():
    assert td.step_grid(100, 1) == [100]
    grid = td.step_grid(100, 5)
    assert grid[0] == 1 and grid[-1] == 100 and grid == sorted(set(grid))
    steps = list(range(10))
    losses = [1.0, 0.5, 0.1, 0.01, 0.5, 0.9, 0.05, 0.001, 0.0005, 0.02]
    spikes = td.loss_spikes(steps, losses, factor=10.0)
    # 0.5 > 10 * 0.01: a spike from step 4 to 6 peaking at 5; then 0.02 > 10 * 0.0005 at the end
    assert [(s["start"], s["peak"], s["end"]) for s in spikes] == [(4, 5, 6), (9, 9, 9)]
    assert spikes[0]["height"] == pytest.approx(90.0)
    assert td.loss_spikes([0, 1, 2], [1.0, 0.9, 0.8]) == []
    assert td.loss_spikes([0, 1], [1.0, math.nan])[0]["peak"] == 1


@pytest.mark.parametrize("experiment", td.EXPERIMENTS)
def test_each_experiment_runs_tiny(experiment):
    config = _config(experiments=experiment)
    pts = td.points(config)
    rows = []
    for point in pts:
        rows += [{**point, **r} for r in td.run_point(config, point, Progress())]
    df = pd.DataFrame(rows)
    assert SCHEMA <= set(df.columns)
    for r in rows:  # the same columns and types in every row
        assert set(r) == SCHEMA | {"experiment", "setting", "seed"}
        assert isinstance(r["step"], int) and isinstance(r["head"], int)
        assert isinstance(r["lens"], str) and isinstance(r["diverged"], bool)
    assert df["seconds"].notna().sum() == len(pts)
    replay = {"entropy": _replay_entropy, "rank": _replay_rank, "slingshot": _replay_slingshot,
              "lazy": _replay_lazy}[experiment]
    if experiment == "entropy":
        ent = df[df["lens"] == "entropy"]
        assert sorted(ent["step"].unique()) == [0, *td.step_grid(6, 3)]
        # 2 layers x 4 heads per step
        assert len(ent) == 2 * 2 * 4 * (len(td.step_grid(6, 3)) + 1)
        assert set(ent["setting_name"]) == {"plain", "sigma-reparam"}
    elif experiment == "rank":
        rank = df[df["lens"] == "rank"]
        assert set(rank["kind"]) == {"weight", "qk", "vo"}
        assert set(rank.loc[rank["kind"] != "weight", "head"]) == {0, 1}
        assert set(rank.loc[rank["kind"] == "weight", "head"]) == {-1}
    elif experiment == "slingshot":
        train = df[df["lens"] == "train"]
        assert sorted(train["step"].unique()) == list(range(5, 45, 5))
        assert train["growth"].notna().sum() == 2 * 7
        assert set(df["lens"]) <= {"train", "cycle", "spike"}
    else:
        lazy = df[df["lens"] == "lazy"]
        assert len(lazy) == 4 * len(td.step_grid(6, 3))
        # the gap shrinks with alpha (about 1 / alpha) at the same step
        end = lazy[lazy["step"] == 6].set_index("setting")["gap_abs"]
        assert end.loc[64.0] < end.loc[4.0] < end.loc[1.0]
    # every logged value against a plain re-implementation of the experiment
    for point in pts:
        ref = pd.DataFrame(replay(config, point["setting"]))
        for key, empty in (("matrix", ""), ("layer", ""), ("head", -1)):   # the rows' blanks
            if key in ref:
                ref[key] = ref[key].fillna(empty)
        got = df[(df["setting"] == point["setting"]) & df["lens"].isin(set(ref["lens"]))]
        keys = ["lens", "step", "matrix", "layer", "head"]
        merged = ref.merge(got, on=[k for k in keys if k in ref], suffixes=("_ref", ""),
                           how="left", validate="one_to_one")
        assert len(got) == len(ref)
        for col in ref.columns.difference(keys):
            np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{experiment} {point['setting']} {col}")


# ---- plain re-implementations of the four experiments at the TINY sizes (seed 0) -------------


def _sequences(n_train: int, n_test: int):
    from telescope.data import sequence_task

    ds = sequence_task("digits-rows", n_train, n_test, seed=0)
    return ds, ds.x_train.float(), ds.y_train, ds.x_test.float(), ds.y_test


def _encoder(ds, d_model: int, n_heads: int, n_layers: int, **kw):
    from telescope.models import TinyTransformer

    torch.manual_seed(0)
    return TinyTransformer(1, d_model, n_heads, n_layers, 8, 10, input_dim=8, causal=False,
                           readout="mean", **kw)


def _eval(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x).double()
    model.train()
    loss = float(-out.log_softmax(1)[torch.arange(len(y)), y].mean())
    return loss, float((out.argmax(1) == y).double().mean())


def _replay_entropy(config, setting: float) -> list[dict]:
    """Minibatch Adam at lr 3e-2; normalized entropy ``mean -sum A log A / log S`` of every
    head (an encoder: every query sees all S = 8 tokens), on the test sequences."""
    ds, x, y, xt, yt = _sequences(48, 24)
    model = _encoder(ds, 16, 4, 2, sigma_reparam=bool(setting))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def measure(step):
        loss, acc = _eval(model, x, y)
        rows.append({"lens": "train", "step": step, "train_loss": loss, "train_acc": acc,
                     "test_acc": _eval(model, xt, yt)[1]})
        model.eval()
        for block in model.blocks:
            block.attn.record = True
        with torch.no_grad():
            model(xt)
        for b, block in enumerate(model.blocks):
            a = block.attn.last_attention.double()
            block.attn.record, block.attn.last_attention = False, None
            ent = -(a * a.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
            for h in range(4):
                rows.append({"lens": "entropy", "step": step, "layer": f"blocks.{b}.attn",
                             "head": h, "entropy": float(ent[h]),
                             "normalized_entropy": float(ent[h]) / math.log(8)})
        model.train()

    measure(0)
    for step in range(1, 7):
        idx = torch.randperm(48, generator=gen)[:16]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step in td.step_grid(6, 3):
            measure(step)
    return rows


def _replay_rank(config, setting: float) -> list[dict]:
    """Full-batch Adam at lr 1e-3 from weights scaled by alpha; SVD of every 2-D weight's update
    and of the per-head updates of ``W_Q[h]^T W_K[h]`` and ``W_O[:, h] W_V[h]``."""
    ds, x, y, xt, yt = _sequences(48, 24)
    model = _encoder(ds, 16, 2, 1, alpha=setting)
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
        if step not in td.step_grid(6, 3):
            continue
        loss, acc = _eval(model, x, y)
        rows.append({"lens": "train", "step": step, "train_loss": loss, "train_acc": acc,
                     "test_acc": _eval(model, xt, yt)[1]})
        for (name, head), m in matrices().items():
            sv = torch.linalg.svd(m - start[(name, head)])[1]
            rows.append({"lens": "rank", "step": step, "matrix": name, "head": head,
                         "delta_norm": float(sv.norm()), "sigma_max": float(sv[0]),
                         "stable_rank": float((sv ** 2).sum() / sv[0] ** 2),
                         "rank": float((sv > 0.05 * sv[0]).sum())})
    return rows


def _replay_slingshot(config, setting: float) -> list[dict]:
    """Full-batch Adam (eps = setting, betas 0.9 / 0.99) on a + b mod 7; every 5 steps the
    loss before the step, the head's L2 norm after it, its log-growth rate per step."""
    from telescope.data import modular_arithmetic
    from telescope.models import TinyTransformer

    ds = modular_arithmetic(7, op="add", train_fraction=0.5, seed=0, equals=True)
    torch.manual_seed(0)
    model = TinyTransformer(8, 16, 4, 1, 3, 7, causal=True, readout="last")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=setting, betas=(0.9, 0.99))
    rows, last = [], None
    for step in range(1, 41):
        loss = F.cross_entropy(model(ds.x_train), ds.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            norm = math.sqrt(sum(float((p.detach().double() ** 2).sum())
                                 for p in model.head.parameters()))
            rows.append({"lens": "train", "step": step, "train_loss": float(loss.detach()),
                         "norm": norm,
                         "growth": math.nan if last is None else math.log(norm / last) / 5,
                         "test_acc": _eval(model, ds.x_test, ds.y_test)[1]})
            last = norm
    return rows


def _replay_lazy(config, setting: float) -> list[dict]:
    """``h = alpha (f - f_0)`` trained by GD at lr 0.5 on ``MSE / alpha^2``; the gap to the
    linearization at the initialization from ``torch.func.jvp`` (:mod:`_first_order`)."""
    from telescope.models import LazyModel

    ds, x, y, xt, _ = _sequences(24, 8)
    targets = F.one_hot(y, 10).float()
    inner = _encoder(ds, 16, 2, 1)
    theta0 = [p.detach().double().clone() for p in inner.parameters()]
    model = LazyModel(inner, setting)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    fo = FirstOrder(model, {"probe": xt})
    rows = []
    for step in range(1, 7):
        opt.zero_grad()
        (F.mse_loss(model(x), targets) / setting ** 2).backward()
        opt.step()
        if step not in td.step_grid(6, 3):
            continue
        h, lin = fo.actual("probe").double(), fo.linearized("probe").double()
        gap, scale = float((h - lin).abs().mean()), float(h.abs().mean())
        with torch.no_grad():
            mse = float(((model(x) - targets) ** 2).mean())
        dist = math.sqrt(sum(float(((p.detach().double() - p0) ** 2).sum())
                             for p, p0 in zip(inner.parameters(), theta0, strict=True)))
        rows.append({"lens": "lazy", "step": step, "train_loss": mse, "gap_abs": gap,
                     "gap_rel": gap / scale, "output_scale": scale, "param_distance": dist})
    return rows


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"data.name": "digits-rows", "seeds": "1", "device": "cpu",
                                "slingshot.p": "7", "slingshot.d_model": "16",
                                "rank.n_heads": "2", "entropy.n_layers": "1"})
    assert config.slingshot.eps == (1e-8, 1e-6, 1e-4)
    for experiment in td.EXPERIMENTS:
        point = next(p for p in td.points(config) if p["experiment"] == experiment)
        rows = td.run_point(config, point, Progress())
        assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "td"
    args = ["study", "transformer-dynamics", "--preset", "quick", "--out", str(out),
            "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()],
            "lazy.alphas=1,16", "rank.alphas=0.01,1"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["experiment"]) == set(td.EXPERIMENTS)
    for name in td.EXPERIMENTS:
        assert (out / f"transformer_dynamics_{name}.png").stat().st_size > 0
        assert (out / f"transformer_dynamics_{name}.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "gap scaling exponent" in html and "final normalized entropy" in html


def _synthetic() -> pd.DataFrame:
    rows = []

    def add(experiment, setting, seed, name, step, lens, **kw):
        rows.append({"experiment": experiment, "setting": setting, "seed": seed,
                     **td._row(name, step, lens, **kw)})

    for seed in (0, 1):
        for setting, name, level in ((0.0, "plain", 0.1), (1.0, "sigma-reparam", 0.5)):
            for step in (1, 10):
                add("entropy", setting, seed, name, step, "train", train_loss=1.0 / step)
                for head, delta in enumerate((-0.05, 0.05)):
                    add("entropy", setting, seed, name, step, "entropy", layer="blocks.0.attn",
                        head=head, normalized_entropy=(level if step == 10 else 0.9) + delta)
        for setting in (0.01, 1.0):
            name = f"alpha={setting:g}"
            for step, r in ((1, 1), (5, 1), (20, 3), (100, 4)):
                r = r if setting < 1 else 12
                for head in (0, 1):
                    add("rank", setting, seed, name, step, "rank", matrix="blocks.0.attn.vo",
                        kind="vo", head=head, rank=r - head, stable_rank=1.5)
        for eps, n_cycles in ((1e-8, 2), (1e-4, 0)):
            name = f"eps={eps:g}"
            for step in (10, 20, 30):
                add("slingshot", eps, seed, name, step, "train", train_loss=0.1, norm=float(step))
            for k in range(n_cycles):
                add("slingshot", eps, seed, name, 10 * k + 15, "cycle", cycle_start=10 * k,
                    cycle_end=10 * k + 20, has_spike=k == 0)
                add("slingshot", eps, seed, name, 10 * k + 12, "spike", spike_height=50.0)
        for alpha in (1.0, 4.0, 16.0):
            for step in (10, 100):
                gap = 0.3 * step / alpha
                add("lazy", alpha, seed, f"alpha={alpha:g}", step, "lazy", gap_abs=gap,
                    gap_rel=gap / 0.5, output_scale=0.5)
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = td.headline(df, config)
    assert h["entropy: final normalized entropy, mean over heads (plain)"] == pytest.approx(0.1)
    assert h["entropy: final normalized entropy, lowest head (plain)"] == pytest.approx(0.05)
    assert h["entropy: final normalized entropy, mean over heads (sigma-reparam)"] == (
        pytest.approx(0.5))
    assert h["entropy: final train loss (plain)"] == pytest.approx(0.1)
    assert h["entropy: diverged runs (plain)"] == 0
    assert h["rank: final max rank, vo (alpha=0.01)"] == 4
    assert h["rank: final max rank, vo (alpha=1)"] == 12
    # mean over the two heads: 0.5, 0.5, 2.5, 3.5 at steps 1, 5, 20, 100
    assert h["rank: steps where vo rank increases (alpha=0.01)"] == [20, 100]
    assert h["rank: final mean rank, vo (alpha=0.01)"] == 3.5
    assert h["rank: steps where vo rank increases (alpha=1)"] == []
    assert h["slingshot: cycles per run (eps=1e-08)"] == 2
    assert h["slingshot: cycles per run (eps=0.0001)"] == 0
    assert h["slingshot: fraction of cycles with a loss spike (eps=1e-08)"] == 0.5
    assert h["slingshot: final last-layer norm (eps=1e-08)"] == 30
    assert h["lazy: step T of the gaps below"] == 100
    assert h["lazy: |h_T - h_lin| at T (alpha=4)"] == pytest.approx(7.5)
    assert h["lazy: gap scaling exponent in alpha (fit, theory -1)"] == pytest.approx(-1.0)
    assert h["lazy: gap scaling exponent, two largest alphas"] == pytest.approx(-1.0)
    assert h["seeds"] == 2
    # figures cope with the synthetic frame and with a single experiment
    paths = td.figures(df, config, tmp_path)
    assert [p.name for p in paths] == [f"transformer_dynamics_{e}.png" for e in td.EXPERIMENTS]
    only = df[df["experiment"] == "lazy"]
    assert [p.name for p in td.figures(only, config, tmp_path / "x")] == [
        "transformer_dynamics_lazy.png"]
    assert set(td.headline(only, config)) == {k for k in h if k.startswith("lazy")} | {"seeds"}
    assert np.isfinite(h["lazy: relative gap at T (alpha=16)"])
