"""The mode-connectivity study: tiny end-to-end run through the CLI, checked against a plain
re-implementation of its protocol, and the full preset."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from telescope.cli import main
from telescope.data import load_mnist1d
from telescope.models import ConvNet1d
from telescope.studies import get_study, make_config
from telescope.train import Progress

TINY = ["--set", "data.n_train=60", "data.n_test=40", "channels=4", "spawn_steps=0,3",
        "k=4", "batch_size=16", "n_alpha=3", "seeds=1"]


def _replay(spawn: int, k: int, seed: int = 0) -> dict:
    """The study's protocol written out plainly for the TINY sizes: each child is trained from
    scratch along the parent's trajectory and then on its own data order, with one optimizer
    throughout (so its momentum carries over the spawn without any state copying); gradients via
    ``.backward()``; the path via parameter interpolation."""
    data = load_mnist1d(60, 40, seed=0)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test

    def start():
        torch.manual_seed(seed)
        net = ConvNet1d(length=x.shape[-1], channels=4, out_features=10)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1_000_003 * seed)
        return net, opt, gen

    def steps(net, opt, gen, n):
        for _ in range(n):
            idx = torch.randint(0, 60, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()

    def grads(net):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        return {n: p.grad.detach().clone() for n, p in net.named_parameters()}

    def acc(net):
        with torch.no_grad():
            return float((net(xt).argmax(1) == yt).double().mean())

    parent, opt, gen = start()
    steps(parent, opt, gen, spawn)
    g0 = grads(parent)
    children = []
    for c in (1, 2):
        net, opt, gen = start()
        steps(net, opt, gen, spawn)
        steps(net, opt, torch.Generator().manual_seed(1_000_003 * seed + 7919 * c), k)
        children.append(net)
    out = {}
    for layer in ("conv1", "conv2", "head", "all"):
        rel = []
        for child in children:
            g1 = grads(child)
            names = [n for n in g0 if layer == "all" or n.startswith(layer + ".")]
            new = torch.cat([g1[n].flatten() for n in names])
            ref = torch.cat([g0[n].flatten() for n in names])
            rel.append(float(torch.linalg.vector_norm(new - ref) / torch.linalg.vector_norm(ref)))
        out[f"grad_change_{layer}"] = sum(rel) / 2
    pa, pb = dict(children[0].named_parameters()), dict(children[1].named_parameters())
    mixed = ConvNet1d(length=x.shape[-1], channels=4, out_features=10)
    curve = {}
    for a in (0.0, 0.5, 1.0):
        with torch.no_grad():
            for n, p in mixed.named_parameters():
                p.copy_(a * pa[n] + (1 - a) * pb[n])
        curve[a] = acc(mixed)
    out.update(curve=curve, acc_a=acc(children[0]), acc_b=acc(children[1]),
               parent_acc=acc(parent))
    return out


def _check_against_replay(sub: pd.DataFrame, ref: dict) -> None:
    sub = sub.sort_values("alpha")
    assert sub["test_acc"].tolist() == pytest.approx(list(ref["curve"].values()), abs=1e-6)
    for col in ("acc_a", "acc_b", "parent_acc"):
        assert (sub[col] - ref[col]).abs().max() < 1e-6, col      # accuracies step by 1/40
    for layer in ("conv1", "conv2", "head", "all"):
        col = f"grad_change_{layer}"
        assert sub[col].to_numpy() == pytest.approx([ref[col]] * len(sub), rel=1e-5), col


def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "mc"
    assert main(["study", "mode-connectivity", "--preset", "quick", "--out", str(out), *TINY,
                 "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["spawn"].unique()) == [0, 3]
    assert len(df) == 2 * 3
    for _, sub in df.groupby("spawn"):
        sub = sub.sort_values("alpha")
        assert list(sub["alpha"]) == [0.0, 0.5, 1.0]
        # alpha = 1 is child a, alpha = 0 is child b; the drop is the documented mean of the
        # endpoints minus the path's minimum, recomputed from the rows
        acc = sub["test_acc"].to_numpy()
        assert (sub["acc_a"] == acc[-1]).all() and (sub["acc_b"] == acc[0]).all()
        assert sub["acc_drop"].to_numpy() == pytest.approx(
            [0.5 * (acc[0] + acc[-1]) - acc.min()] * 3, abs=1e-12)
    # spawn 0: the children start from the initialization (no optimizer state yet)
    _check_against_replay(df[df["spawn"] == 0], _replay(0, 4))
    assert (out / "mode_connectivity.png").stat().st_size > 0
    assert (out / "mode_connectivity.svg").exists()
    assert (out / "report.html").exists()


def test_children_start_from_the_parent_optimizer_state():
    study = get_study("mode_connectivity")
    config = make_config(study, "quick", dict(a.split("=") for a in TINY[1:]))
    rows = study.run_point(config, {"spawn": 3, "seed": 0}, Progress())
    _check_against_replay(pd.DataFrame(rows), _replay(3, 4))


def test_full_preset_config_builds():
    study = get_study("mode_connectivity")
    config = make_config(study, "full", {})
    assert config.k == 3000 and config.channels == 32 and config.seeds == 3
    assert len(study.points(config)) == 3 * len(config.spawn_steps)
    with pytest.raises(ValueError):
        make_config(study, "quick", {"n_alpha": "2"})
