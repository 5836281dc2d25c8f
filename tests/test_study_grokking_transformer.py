"""The grokking-transformer study: mechanics on a tiny run, the full preset, the headline logic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from telescope.cli import main
from telescope.models.hooks import capture
from telescope.studies import get_study, make_config
from telescope.studies import grokking_transformer as gt
from telescope.train import log_spaced_steps

TINY = {"p": "7", "train_fraction": "0.5", "d_model": "8", "n_heads": "2", "mlp_ratio": "2",
        "steps": "6", "n_log": "3", "n_linear": "2", "n_kernel": "6", "n_probe": "5",
        "lr": "1e-2"}


def _set(overrides: dict) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in overrides.items())]


class _Progress:
    def __init__(self):
        self.total, self.done = None, 0

    def set(self, total):
        self.total = total

    def update(self, n=1):
        self.done += n

    def write(self, msg):
        pass


def _trace_ntk(model, xa, xb) -> torch.Tensor:
    """``K[i, j] = sum_o <df_o(xa_i)/dtheta, df_o(xb_j)/dtheta>`` from one backward per point
    and output."""
    params = list(model.parameters())

    def jac(x):
        rows = []
        for i in range(len(x)):
            out = model(x[i:i + 1])[0]
            rows.append(torch.stack([
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params,
                                                                       retain_graph=True)])
                for o in range(out.shape[0])]))
        return torch.stack(rows).double()                       # [N, O, P]

    ja = jac(xa)
    jb = ja if xb is xa else jac(xb)
    return torch.einsum("iop,jop->ij", ja, jb)


def _replay(config) -> list[dict]:
    """The TINY point written out plainly: full-batch AdamW from the seeded initialization;
    losses, accuracies and norms by hand, the trace NTK of the first ``n_kernel`` training pairs
    from explicit Jacobians, the kernel distance ``1 - <K_t, K_0>_F / (||K_t|| ||K_0||)``, the
    ridge smoother ``S = K_*x (K + lambda I)^-1`` by a linear solve, and the causal attention
    entropy from the attention probabilities at the hook point (query ``i`` sees ``i + 1`` keys)."""
    from telescope.data import modular_arithmetic
    from telescope.models import TinyTransformer

    data = modular_arithmetic(7, op="add", train_fraction=0.5, seed=0, equals=True)
    torch.manual_seed(0)
    model = TinyTransformer(8, 8, 2, 1, 3, 7, mlp_ratio=2, causal=True, readout="last")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=1.0)
    xk, xp = data.x_train[:6], data.x_test[:5]
    k0 = _trace_ntk(model, xk, xk)
    e0 = model.token_embedding.weight.detach().clone()
    out = []
    for step in range(7):
        if step:
            opt.zero_grad()
            F.cross_entropy(model(data.x_train), data.y_train).backward()
            opt.step()
        if step not in log_spaced_steps(6, 3, linear=2, zero=True):
            continue
        row = {"step": step}
        with torch.no_grad():
            for split, x, y in (("train", data.x_train, data.y_train),
                                ("test", data.x_test, data.y_test)):
                logits = model(x).double()
                row[f"{split}_loss"] = float(-logits.log_softmax(1)[torch.arange(len(y)), y]
                                             .mean())
                row[f"{split}_acc"] = float((logits.argmax(1) == y).double().mean())
        row["weight_norm"] = float(torch.sqrt(sum((p.detach().double() ** 2).sum()
                                                  for p in model.parameters())))
        row["dnorm_embed"] = float((model.token_embedding.weight.detach().double() - e0).norm())
        k = _trace_ntk(model, xk, xk)
        row["kernel_distance"] = float(1 - (k * k0).sum() / (k.norm() * k0.norm()))
        row["kernel_trace"] = float(k.trace())
        lam = 1e-2 * float(k.diagonal().mean())
        inv = torch.linalg.inv(k + lam * torch.eye(6, dtype=torch.float64))
        row["p_train_ntk"] = float(((k @ inv) ** 2).sum())            # n_k / n_k sum ||s||^2
        row["p_test_ntk"] = float(6 * ((_trace_ntk(model, xp, xk) @ inv) ** 2).sum() / 5)
        with torch.no_grad(), capture(model, "blocks.0.attn.hook_pattern") as cache:
            model(data.x_test)
        a = cache["blocks.0.attn.hook_pattern"].double()
        ent = -(a * a.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))     # per head
        max_ent = (math.log(1) + math.log(2) + math.log(3)) / 3
        for h in range(2):
            row[f"entropy_l0_h{h}"] = float(ent[h]) / max_ent
        out.append(row)
    return out


def test_run_point_mechanics():
    study = get_study("grokking_transformer")
    config = make_config(study, "quick", TINY)
    pts = study.points(config)
    assert pts == [{"weight_decay": 1.0, "seed": 0}]
    prog = _Progress()
    rows = study.run_point(config, pts[0], prog)
    assert prog.total == 6 and prog.done == 6
    df = pd.DataFrame(rows)
    assert list(df["step"]) == log_spaced_steps(6, 3, linear=2, zero=True) == [0, 1, 2, 3, 6]
    for col in ("kernel_target_alignment", "kernel_effective_rank", "srank_embed", "srank_qk",
                "srank_vo", "srank_mlp_in", "srank_unembed", "rank_qk_h0", "dnorm_vo_h1",
                "rank_wq"):
        assert df[col].notna().all(), col
    # every lens value against the plain replay (the same seed gives the same numbers)
    ref = pd.DataFrame(_replay(config))
    for col in ref.columns.drop("kernel_distance"):
        np.testing.assert_allclose(df[col], ref[col], rtol=1e-4, atol=1e-6, err_msg=col)
    # six small steps move the kernel by ~1e-6 to 2e-5: compare relatively
    np.testing.assert_allclose(df["kernel_distance"], ref["kernel_distance"], rtol=1e-3,
                               atol=1e-10)


def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "gt"
    assert main(["study", "grokking-transformer", "--preset", "quick", "--out", str(out),
                 *_set({**TINY, "weight_decays": "1,0"}), "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["weight_decay"]) == {1.0, 0.0}
    assert (out / "grokking_transformer_wd1.png").stat().st_size > 0
    assert (out / "grokking_transformer_wd0.svg").exists()
    assert (out / "report.html").exists()


def test_full_preset_smoke(tmp_path):
    study = get_study("grokking-transformer")
    full = make_config(study, "full", {})
    assert (full.p, full.d_model, full.n_heads, full.mlp_ratio) == (113, 128, 4, 4)
    assert full.lr == 1e-3 and full.betas == (0.9, 0.98) and full.train_fraction == 0.3
    assert full.weight_decays == (1.0, 0.0) and full.seeds == 3
    assert len(study.points(full)) == 6
    out = tmp_path / "full"
    assert main(["study", "grokking-transformer", "--preset", "full", "--out", str(out),
                 *_set({**TINY, "seeds": "1", "device": "cpu"}), "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 * len(log_spaced_steps(6, 3, linear=2, zero=True))


def test_config_validation():
    study = get_study("grokking-transformer")
    for bad in ({"d_model": "10", "n_heads": "4"}, {"train_fraction": "1.0"},
                {"weight_decays": "-1"}, {"smoother_ridge": "0"}, {"n_kernel": "1"}):
        with pytest.raises(ValueError):
            make_config(study, "quick", bad)


def test_log_steps():
    s = log_spaced_steps(1000, 10, linear=4, zero=True)
    assert s[0] == 0 and s[1] == 1 and s[-1] == 1000
    assert s == sorted(set(s))
    assert {250, 500, 750} <= set(s)
    assert log_spaced_steps(5, 3, linear=0, zero=True) == [0, 1, 2, 5]


def _synthetic(wd: float, seed: int, fit: int, grok: int | None) -> list[dict]:
    rows = []
    for step in (0, 10, 100, 200, 400, 800, 1600):
        test = 1.0 if grok is not None and step >= grok else 0.05
        rows.append({"weight_decay": wd, "seed": seed, "step": step,
                     "train_acc": 1.0 if step >= fit else 0.5, "test_acc": test,
                     "train_loss": 0.1, "test_loss": 1.0, "weight_norm": 50.0 - step / 100,
                     "kernel_distance": 0.8 if grok is not None and step >= grok else 0.1,
                     "kernel_target_alignment": 0.2, "kernel_effective_rank": 10.0,
                     "p_train_ntk": 5.0, "p_test_ntk": 3.0, "entropy_l0_h0": 0.5,
                     "entropy_l0_h1": 0.7, "srank_qk": 2.0, "srank_vo": 3.0,
                     "srank_embed": 4.0, "srank_mlp_in": 5.0})
    return rows


def test_headline_logic_and_figures(tmp_path):
    config = make_config(get_study("grokking-transformer"), "quick", {"seeds": "2"})
    df = pd.DataFrame(_synthetic(1.0, 0, 100, 400) + _synthetic(1.0, 1, 100, 800)
                      + _synthetic(0.0, 0, 10, None))
    h = gt.headline(df, config)
    assert h["wd=1: step train acc 99%"] == 100.0
    assert h["wd=1: step test acc 99% (grokking)"] == 600.0          # mean of 400 and 800
    assert h["wd=1: grokking delay (steps)"] == 500.0
    assert h["wd=1: grok step / fit step"] == 6.0
    assert h["wd=1: runs grokked"] == "2/2"
    assert h["wd=1: step of largest kernel-distance increase"] == 600.0
    assert h["wd=1: kernel distance at fit"] == pytest.approx(0.1)
    assert h["wd=1: kernel distance at grok"] == pytest.approx(0.8)
    assert h["wd=1: attention entropy (normalized, mean head) at end"] == pytest.approx(0.6)
    assert h["wd=1: weight norm at end"] == pytest.approx(34.0)
    assert h["wd=0: step train acc 99%"] == 10.0
    assert math.isnan(h["wd=0: step test acc 99% (grokking)"])
    assert h["wd=0: runs grokked"] == "0/1"
    assert h["wd=0: final test accuracy"] == pytest.approx(0.05)
    assert "wd=0: kernel distance at grok" not in h
    paths = gt.figures(df, config, tmp_path)
    assert [p.name for p in paths] == ["grokking_transformer_wd1.png",
                                       "grokking_transformer_wd0.png"]
    assert all(p.stat().st_size > 0 for p in paths)
