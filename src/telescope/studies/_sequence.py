"""What the small-transformer studies share: the sequence task, the encoder, the checks of the
training settings, the tidy rows, and the helpers of their figures and headlines.

The studies ``entropy-collapse``, ``rank-growth``, ``slingshot`` and ``lazy-regime`` (one
module each) are four experiments on :class:`telescope.models.TinyTransformer`; a sweep point is
``(setting, seed)``, with ``setting`` a float (``sigma_reparam`` as 0 / 1, an initialization
scale ``alpha``, Adam's ``eps``, the lazy scale ``alpha``) and ``setting_name`` its label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from telescope.data import sequence_task
from telescope.data.synthetic import SEQUENCE_TASKS
from telescope.errors import UsageError
from telescope.kernels.functional import eval_mode
from telescope.models import TinyTransformer
from telescope.studies.base import check_device, resolve_device
from telescope.studies.constraints import PositiveInt, config_dataclass

__all__ = ["SequenceData", "Columns", "check_task", "check_training", "load_sequence", "encoder",
           "classification_metrics", "train_and_lens_rows", "loss_acc", "sweep", "settings",
           "per_seed_mean", "final_step"]


# --------------------------------------------------------------------------- the task


def check_task(key: str, name: str) -> None:
    """``name`` must be one of :data:`telescope.data.synthetic.SEQUENCE_TASKS`."""
    if name not in SEQUENCE_TASKS:
        raise UsageError(f"{key} must be one of {', '.join(SEQUENCE_TASKS)}, got {name!r}")


@config_dataclass
class SequenceData:
    """The sequence classification task (:func:`telescope.data.sequence_task`): scikit-learn's
    bundled 8x8 digits as 8 tokens of 8 pixels (``"digits-rows"``, 10 classes) or MNIST-1D in
    patches (``"mnist1d-patches"``)."""

    name: str = "digits-rows"          # or "mnist1d-patches"
    n_train: PositiveInt = 512
    n_test: PositiveInt = 256

    def __post_init__(self) -> None:
        check_task("data.name", self.name)


def load_sequence(name: str, n_train: int, n_test: int, seed: int, device: str, dtype: str):
    """The task drawn with ``seed``, and its ``(x, y, x_test, y_test)`` on ``device`` (inputs in
    ``dtype``)."""
    ds = sequence_task(name, n_train, n_test, seed=seed)
    dev, dt = resolve_device(device), getattr(torch, dtype)
    return ds, (ds.x_train.to(dev, dt), ds.y_train.to(dev),
                ds.x_test.to(dev, dt), ds.y_test.to(dev))


def encoder(ds, d_model: int, n_heads: int, n_layers: int, **kw: Any) -> TinyTransformer:
    """A non-causal :class:`~telescope.models.TinyTransformer` classifying the sequences of
    ``ds`` from the mean of its tokens (``kw``: ``sigma_reparam``, ``alpha``, ...)."""
    seq_len, features = ds.x_train.shape[1:]
    return TinyTransformer(1, d_model, n_heads, n_layers, int(seq_len), ds.n_classes,
                           input_dim=int(features), causal=False, readout="mean", **kw)


@torch.no_grad()
def loss_acc(model, x, y) -> tuple[float, float]:
    """Cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode (restored after)."""
    with eval_mode(model):
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


# --------------------------------------------------------------------------- config checks


def check_training(config: Any) -> None:
    """What every one of these configs checks beyond its fields' ranges (``steps``, ``lr``,
    the sizes: annotated on the fields): ``device``, and ``d_model`` a multiple of
    ``n_heads``."""
    check_device("device", config.device)
    if config.d_model % config.n_heads:
        raise UsageError(f"d_model ({config.d_model}) must be a multiple of n_heads "
                         f"({config.n_heads})")


# --------------------------------------------------------------------------- tidy rows


@dataclass(frozen=True)
class Columns:
    """The columns of a study's rows, by type. Every row has every column with one type across
    all points; a column a row does not use is blank (``""``, ``-1``, NaN or ``False``)."""

    text: tuple[str, ...] = ()
    ints: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    bools: tuple[str, ...] = ()

    @property
    def names(self) -> set[str]:
        return {*self.text, *self.ints, *self.floats, *self.bools}

    def row(self, **values: Any) -> dict:
        """A row: the blanks, then ``values`` converted to their column's type (an unknown
        column raises :class:`KeyError`)."""
        row: dict = {k: "" for k in self.text}
        row.update({k: -1 for k in self.ints})
        row.update({k: math.nan for k in self.floats})
        row.update({k: False for k in self.bools})
        for k, v in values.items():
            if k in self.floats:
                row[k] = float(v)
            elif k in self.ints:
                row[k] = int(v)
            elif k in self.bools:
                row[k] = bool(v)
            elif k in self.text:
                row[k] = str(v)
            else:
                raise KeyError(f"unknown column {k!r}")
        return row


def classification_metrics(x, y, x_test, y_test):
    """``fit``'s ``evaluate`` for a classifier: train cross-entropy and accuracy, test
    accuracy (:func:`loss_acc`)."""
    def metrics(model) -> dict:
        loss, acc = loss_acc(model, x, y)
        return {"train_loss": loss, "train_acc": acc,
                "test_acc": loss_acc(model, x_test, y_test)[1]}
    return metrics


def train_and_lens_rows(history, columns: Columns, name: str, lens: str, table: str,
                        fields: Any, model: Any, metrics: Any) -> list[dict]:
    """Tidy rows of one run: per measured step a ``train`` row (loss, accuracies) followed by
    the rows of the lens table ``table`` at that step (``lens`` rows, columns ``fields(row)``),
    and, if training diverged, a last ``train`` row of the model at that step, ``diverged``."""
    by_step = history.table_by_step(table)
    rows = []
    for r in history.rows:
        rows.append(columns.row(setting_name=name, step=r["step"], lens="train",
                                **{k: r[k] for k in ("train_loss", "train_acc", "test_acc")}))
        rows += [columns.row(setting_name=name, step=r["step"], lens=lens, **fields(e))
                 for e in by_step.get(r["step"], [])]
    if history.diverged_at is not None:   # the model as it was at the step that diverged
        rows.append(columns.row(setting_name=name, step=history.diverged_at, lens="train",
                                **metrics(model), diverged=True))
    return rows


# --------------------------------------------------------------------------- sweep, tables


def sweep(values, config: Any) -> list[dict]:
    """``setting x seed``: ``{"setting": float, "seed": int}`` for every value and seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"setting": float(v), "seed": int(s)} for v in values for s in seeds]


def settings(df: pd.DataFrame) -> list[tuple[float, str]]:
    """The ``(setting, setting_name)`` pairs of a table, by setting."""
    pairs = df[["setting", "setting_name"]].drop_duplicates().sort_values("setting")
    return [(float(s), str(n)) for s, n in pairs.itertuples(index=False)]


def per_seed_mean(df: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    """Mean of ``y`` over the rows sharing ``by + [seed, step]`` (e.g. over heads)."""
    return df.groupby([*by, "seed", "step"], as_index=False)[y].mean()


def final_step(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each ``(setting, seed)``'s last step."""
    last = df.groupby(["setting", "seed"])["step"].transform("max")
    return df[df["step"] == last]
