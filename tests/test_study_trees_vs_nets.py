"""The trees-vs-nets study end to end (tiny overrides) and its full config."""

import numpy as np
import pandas as pd
import pytest
import torch
from _first_order import SmootherReference

from telescope.cli import main
from telescope.studies import get_study, make_config


def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "tvn"
    args = ["study", "trees-vs-nets", "--preset", "quick", "--out", str(out), "--no-progress",
            "--seeds", "1", "--set", "net.epochs=3", "--set", "net.hidden=16",
            "--set", "trees.n_estimators=5", "--set", "fractions=0,0.25,0.5",
            "--set", "data.n_pool=200", "--set", "data.n_test=40"]
    assert main(args) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["fraction"]) == [0.0, 0.25, 0.5]
    # the relative columns by their documented definitions, from the rows (at f = 0 they are
    # 1, 1 and 0 because the reference row is the f = 0 one)
    for model in ("net", "trees"):
        ratio = df[f"mse_{model}"] / df.loc[df["fraction"] == 0.0, f"mse_{model}"].iloc[0]
        assert (df[f"rel_err_{model}"] - ratio).abs().max() < 1e-12
    assert ((df["rel_err_net"] - df["rel_err_trees"]) == df["rel_increase"]).all()
    assert df["trees_smoother_err"].max() < 1e-10          # boosting smoother == sklearn
    # every model-based column against a plain recomputation
    ref = _replay().set_index("fraction")
    got = df.set_index("fraction").loc[ref.index]
    for col in ("n_irregular", "n_train"):
        assert (got[col] == ref[col]).all(), col
    for col in ref.columns.drop(["n_irregular", "n_train"]):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-7, atol=1e-12, err_msg=col)
    assert (out / "trees_vs_nets.png").exists() and (out / "trees_vs_nets_mse.svg").exists()
    assert (out / "report.html").exists()
    assert main(args) == 0                                 # resume: nothing left to run


def _replay() -> pd.DataFrame:
    """The tiny quick-preset point (seed 0) written out plainly: the same pool and split; the
    MLP trained by a plain minibatch loop with its smoother weights from explicit per-point
    Jacobians (:class:`_first_order.SmootherReference`, SGD with momentum); the trees fit by
    scikit-learn, their smoother from :func:`boosting_smoother` (tested against the leaves in
    test_boosting_smoother.py). Kernel weight norms, effective parameters and errors by their
    documented definitions."""
    from sklearn.ensemble import GradientBoostingRegressor

    from telescope.data import irregularity_split
    from telescope.lens.boosting import boosting_smoother
    from telescope.models import MLP
    from telescope.studies.trees_vs_nets import synthetic_table

    x, y = synthetic_table(1000, 8, 0.3, 0)
    keep = np.sort(np.random.default_rng(0).permutation(1000)[:200])
    x, y = x[keep], y[keep]
    split = irregularity_split(x, y, (0.0, 0.25, 0.5), n_test=40, seed=0)
    xtr, ytr = split.x_train.double(), split.y_train.double().reshape(-1)
    n = len(ytr)
    union = torch.unique(torch.cat(split.test_idx))
    pos = {int(r): i for i, r in enumerate(union)}
    xpr = torch.as_tensor(x[union.numpy()]).double()

    torch.manual_seed(0)
    net = MLP(8, [16], 1).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.003, momentum=0.9)
    ref = SmootherReference(net, xtr, {"test": xpr}, lr=0.003, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(n, generator=gen)
        for b in range(n // 64):
            idx = perm[64 * b:64 * (b + 1)]
            opt.zero_grad()
            ((net(xtr[idx])[:, 0] - ytr[idx]) ** 2).mean().backward()
            ref.step(idx)
            opt.step()
    with torch.no_grad():
        net_pred = net(xpr)[:, 0].numpy()
    net_norm = ref.weights("test").norm(dim=1).numpy()
    net_train_max = float(ref.weights("train").norm(dim=1).max())
    net_tel = ref.predict("test", ytr).numpy()

    gbt = GradientBoostingRegressor(n_estimators=5, max_depth=3, learning_rate=0.1,
                                    random_state=0).fit(xtr.numpy(), ytr.numpy())
    s_tr, _ = boosting_smoother(gbt, xtr.numpy(), ytr.numpy())
    s_pr, _ = boosting_smoother(gbt, xtr.numpy(), ytr.numpy(), xpr.numpy())
    gbt_pred = gbt.predict(xpr.numpy())
    gbt_norm = np.sqrt((s_pr ** 2).sum(1))
    gbt_train_max = np.sqrt((s_tr ** 2).sum(1)).max()

    rows = []
    for f, idx, m in zip(split.fractions, split.test_idx, split.n_irregular, strict=True):
        j = np.array([pos[int(r)] for r in idx])
        target = y[idx.numpy()]
        rows.append({"fraction": float(f), "n_irregular": int(m), "n_train": n,
                     "mse_net": np.mean((net_pred[j] - target) ** 2),
                     "mse_trees": np.mean((gbt_pred[j] - target) ** 2),
                     "kwn_net": net_norm[j].max() / net_train_max,
                     "kwn_trees": gbt_norm[j].max() / gbt_train_max,
                     "p_net": n * np.mean(net_norm[j] ** 2),
                     "p_trees": n * np.mean(gbt_norm[j] ** 2),
                     "telescoping_err": np.mean(np.abs(net_tel[j] - net_pred[j]))})
    out = pd.DataFrame(rows)
    out["rel_gap"] = (out["mse_net"] - out["mse_trees"]) / out["mse_trees"]
    return out


def test_synthetic_data_tiny(tmp_path):
    out = tmp_path / "syn"
    assert main(["study", "trees-vs-nets", "--out", str(out), "--no-progress", "--seeds", "1",
                 "--set", "data.name=synthetic", "--set", "data.synthetic_n=150",
                 "--set", "data.n_test=30", "--set", "net.epochs=2", "--set", "net.hidden=8",
                 "--set", "trees.n_estimators=3", "--set", "fractions=0,0.5",
                 "--no-report"]) == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 2


def test_full_config_builds_and_validation():
    st = get_study("trees-vs-nets")
    cfg = make_config(st, "full", {})
    assert cfg.data.name == "synthetic" and cfg.seeds == 5 and max(cfg.fractions) == 1.0
    assert len(st.points(cfg)) == 5
    cfg = make_config(st, "full", {"data.name": "openml", "data.path": "/x",
                                   "data.dataset": "houses"})
    assert cfg.data.dataset == "houses"
    with pytest.raises(ValueError):
        make_config(st, "quick", {"fractions": "0.1,0.5"})        # no reference fraction 0
    with pytest.raises(ValueError):
        make_config(st, "quick", {"data.name": "nope"})


def test_table_needs_path():
    st = get_study("trees-vs-nets")
    cfg = make_config(st, "quick", {"data.name": "table"})
    with pytest.raises(ValueError, match="data.path"):
        st.run_point(cfg, {"seed": 0}, None)


@pytest.mark.parametrize("kind", ["table", "openml"])
def test_file_tables(tmp_path, kind):
    """A CSV written here, read as a table (--set data.path=FILE) or as a plain OpenML folder
    (--set data.path=DIR --set data.dataset=houses), the way the Grinsztajn sets are read."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(150, 4)), columns=list("abcd"))
    frame["price"] = frame["a"] ** 2 + frame["b"] + 0.1 * rng.normal(size=150)
    folder = tmp_path / "cache"
    folder.mkdir()
    frame.to_csv(folder / "houses.csv", index=False)
    path = folder / "houses.csv" if kind == "table" else folder
    out = tmp_path / "out"
    assert main(["study", "trees-vs-nets", "--out", str(out), "--no-progress", "--seeds", "1",
                 "--set", f"data.name={kind}", "--set", f"data.path={path}",
                 "--set", "data.dataset=houses", "--set", "data.target=price",
                 "--set", "data.n_test=30", "--set", "net.epochs=2", "--set", "net.hidden=8",
                 "--set", "trees.n_estimators=3", "--set", "fractions=0,0.5",
                 "--no-report"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 and df["trees_smoother_err"].max() < 1e-10
