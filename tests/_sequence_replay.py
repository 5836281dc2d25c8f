"""What the tests of the small-transformer studies (entropy-collapse, rank-growth, slingshot,
lazy-regime) share: the tiny sizes of their plain re-implementations (the digits sequences,
seed 0, the encoder, an eval-mode loss / accuracy), and the check of a study's rows against such
a re-implementation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from telescope.studies import get_study, make_config
from telescope.train import Progress


def tiny_config(study: str, tiny: dict, preset: str = "quick", **extra: str):
    return make_config(get_study(study), preset, {**tiny, **extra})


def run_all(module, config) -> tuple[list[dict], list[dict], pd.DataFrame]:
    """Every point of the sweep: ``(points, rows with the point's keys, DataFrame)``."""
    pts = module.points(config)
    rows = []
    for point in pts:
        rows += [{**point, **r} for r in module.run_point(config, point, Progress())]
    return pts, rows, pd.DataFrame(rows)


def check_rows(rows: list[dict], schema: set[str]) -> None:
    """The same columns and types in every row."""
    for r in rows:
        assert set(r) == schema | {"setting", "seed"}
        assert isinstance(r["step"], int)
        if "head" in schema:
            assert isinstance(r["head"], int)
        if "lens" in schema:
            assert isinstance(r["lens"], str)
        if "diverged" in schema:
            assert isinstance(r["diverged"], bool)


def check_against_replay(df: pd.DataFrame, pts: list[dict], config, replay, label: str) -> None:
    """Every logged value against a plain re-implementation of the experiment."""
    for point in pts:
        ref = pd.DataFrame(replay(config, point["setting"]))
        for key, empty in (("matrix", ""), ("layer", ""), ("head", -1)):   # the rows' blanks
            if key in ref:
                ref[key] = ref[key].fillna(empty)
        got = df[df["setting"] == point["setting"]]
        if "lens" in df:
            got = got[got["lens"].isin(set(ref["lens"]))]
        else:   # a study with one kind of row has no lens column
            ref = ref.drop(columns="lens")
        keys = ["lens", "step", "matrix", "layer", "head"]
        merged = ref.merge(got, on=[k for k in keys if k in ref], suffixes=("_ref", ""),
                           how="left", validate="one_to_one")
        assert len(got) == len(ref)
        for col in ref.columns.difference(keys):
            np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{label} {point['setting']} {col}")


# ---- the tiny sizes of the re-implementations (seed 0) --------------------------------------


def sequences(n_train: int, n_test: int):
    from telescope.data import sequence_task

    ds = sequence_task("digits-rows", n_train, n_test, seed=0)
    return ds, ds.x_train.float(), ds.y_train, ds.x_test.float(), ds.y_test


def encoder(ds, d_model: int, n_heads: int, n_layers: int, **kw):
    from telescope.models import TinyTransformer

    torch.manual_seed(0)
    return TinyTransformer(1, d_model, n_heads, n_layers, 8, 10, input_dim=8, causal=False,
                           readout="mean", **kw)


def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x).double()
    model.train()
    loss = float(-out.log_softmax(1)[torch.arange(len(y)), y].mean())
    return loss, float((out.argmax(1) == y).double().mean())
