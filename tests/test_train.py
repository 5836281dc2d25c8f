"""telescope.train.fit: the loop against hand-written loops (bit for bit), its samplers,
non-finite losses, eval-mode measurement and the lenses as callbacks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from telescope.errors import DivergedError, UsageError
from telescope.lens import KernelEvolution, NormCycles, Telescope, WeightRank
from telescope.train import Progress, fit


def _data(n=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g)


def _net(seed=0, d=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1))


def _hand_loop(model, opt, x, y, steps, draw):
    for step in range(1, steps + 1):
        idx = draw(step)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()


@pytest.mark.parametrize("sampler", ["full", "random", "epochs", "replacement"])
def test_fit_takes_the_same_steps_as_a_hand_written_loop(sampler):
    x, y = _data()
    n, b, steps = x.shape[0], 5, 7
    a, ref = _net(), _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    perm: list[torch.Tensor] = []

    def draw(step):
        if sampler == "full":
            return torch.arange(n)
        if sampler == "random":
            return torch.randperm(n, generator=gen)[:b]
        if sampler == "replacement":
            return torch.randint(0, n, (b,), generator=gen)
        k = (step - 1) % (n // b)      # epochs: n // b batches per permutation
        if k == 0:
            perm[:] = [torch.randperm(n, generator=gen)]
        return perm[0][k * b:(k + 1) * b]

    _hand_loop(ref, opt_r, x, y, steps, draw)
    fit(a, opt_a, x, y, steps=steps, batch_size=None if sampler == "full" else b,
        sampler="random" if sampler == "full" else sampler,
        generator=torch.Generator().manual_seed(3))
    for p, q in zip(a.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_batches_each_sampler_draws():
    x, y = torch.arange(10.0).reshape(10, 1), torch.zeros(10, 1)
    seen: dict[str, list[list[int]]] = {}

    class Batches:
        def __init__(self, name):
            self.name = name

        def before_update(self, state):
            seen.setdefault(self.name, []).append(state.batch.tolist())

    for sampler in ("random", "epochs", "replacement"):
        model = nn.Linear(1, 1)
        fit(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, steps=6, batch_size=4,
            sampler=sampler, callbacks=[Batches(sampler)])
    # random: 4 distinct indices per step; epochs: 2 disjoint batches per permutation of 10
    assert all(len(set(b)) == 4 for b in seen["random"])
    for e in range(3):
        first, second = seen["epochs"][2 * e], seen["epochs"][2 * e + 1]
        assert not set(first) & set(second)
    assert all(len(b) == 4 and all(0 <= i < 10 for i in b) for b in seen["replacement"])
    # full batch: every index, in order, at every step
    model = nn.Linear(1, 1)
    full: list[list[int]] = []

    class Full:
        def before_update(self, state):
            full.append(state.batch.tolist())

    fit(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, steps=2, callbacks=[Full()])
    assert full == [list(range(10))] * 2


def test_rows_schedule_and_eval_mode():
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modes = []

    def evaluate(m):
        modes.append(m.training)
        assert not torch.is_grad_enabled()
        return {"mse": float(F.mse_loss(m(x), y))}

    hist = fit(model, opt, x, y, steps=4, eval_at=[0, 2, 4], evaluate=evaluate,
               schedule=lambda s: 0.5 ** s)
    assert [r["step"] for r in hist.rows] == [0, 2, 4]
    assert modes == [False, False, False] and model.training   # restored after each
    assert math.isnan(hist.rows[0]["loss"]) and hist.rows[1]["loss"] > 0
    # the schedule: lr after 4 steps is 0.1 * 0.5^4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)
    # evaluation without dropout: equal to a deterministic forward of the same weights
    with torch.no_grad():
        model.eval()
        assert hist.rows[-1]["mse"] == pytest.approx(float(F.mse_loss(model(x), y)), rel=1e-6)
    assert list(hist.frame().columns) == ["step", "loss", "mse"]


def test_non_finite_loss_raises_or_stops_before_the_update():
    x, y = _data()
    model = _net()
    with pytest.raises(DivergedError, match="step 1.*lower the learning rate"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y * math.inf, steps=3)

    class Bad(nn.Module):   # finite for two steps, then NaN
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(3, 1), 0

        def forward(self, x):
            self.calls += 1
            out = self.lin(x)
            return out * math.nan if self.calls == 3 else out

    bad = Bad()
    opt = torch.optim.SGD(bad.parameters(), lr=0.1)
    hist = fit(bad, opt, x, y, steps=5, on_nonfinite="stop", eval_at=[1, 2, 3])
    assert hist.diverged_at == 3 and math.isnan(hist.diverged_loss) and hist.steps_done == 2
    assert [r["step"] for r in hist.rows] == [1, 2]


def test_bad_arguments_get_usage_errors():
    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, match in [({"steps": -1}, "steps"), ({"steps": 2, "batch_size": 0}, "batch_size"),
                          ({"steps": 2, "batch_size": 5, "sampler": "bootstrap"}, "sampler"),
                          ({"steps": 2, "loss": "hinge"}, "loss"),
                          ({"steps": 2, "eval_at": [3]}, "eval_at"),
                          ({"steps": 2, "callbacks": [object()]}, "callback"),
                          ({"steps": 2, "on_nonfinite": "ignore"}, "on_nonfinite")]:
        with pytest.raises(UsageError, match=match):
            fit(model, opt, x, y, **kwargs)
    with pytest.raises(UsageError, match="same positive number"):
        fit(model, opt, x, y[:3], steps=1)
    with pytest.raises(UsageError, match="scalar"):
        fit(model, opt, x, y, steps=1, loss=lambda out, target: (out - target) ** 2)


def test_lenses_as_callbacks_match_their_use_by_hand():
    x, y = _data()
    steps, every = 6, 3
    runs = {}
    for how in ("fit", "hand"):
        model = _net(1)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ke = KernelEvolution(model, x[:5], y[:5])
        wr = WeightRank(model)
        norms = NormCycles(model[2], name="head")
        tel = Telescope(model, opt, {"test": x[:4]}, every=every)
        if how == "fit":
            hist = fit(model, opt, x, y, steps=steps, eval_at=[every, steps],
                       callbacks=[tel, ke, wr, norms])
            rows, ranks = hist.rows, hist.tables["WeightRank"]
            grouped = hist.table_by_step("WeightRank")
            assert sorted(grouped) == [every, steps]
            assert [r for s in sorted(grouped) for r in grouped[s]] == ranks
            assert hist.table_by_step("no such table") == {}
        else:
            rows, ranks = [], []
            for step in range(1, steps + 1):
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
                if step % every == 0:
                    norms.update(step)
                    rows.append({**ke.measure(), "head_norm": norms.norms[-1]})
                    ranks += [{"step": step, **r} for r in wr.measure()]
            rows = [{**r, **{f"{k}_test": v for k, v in t.items() if k not in ("step", "probe")}}
                    for r, t in zip(rows, tel.history, strict=True)]
        tel.close()
        runs[how] = (rows, ranks, [p.detach().clone() for p in model.parameters()])
    (rows_f, ranks_f, p_f), (rows_h, ranks_h, p_h) = runs["fit"], runs["hand"]
    assert all(torch.equal(a, b) for a, b in zip(p_f, p_h, strict=True))
    for rf, rh in zip(rows_f, rows_h, strict=True):
        for key, value in rh.items():
            assert rf[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert ranks_f == ranks_h


def test_progress_counts_steps():
    x, y = _data()
    model = _net()
    p = Progress()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, steps=5, progress=p)
    assert p.total == 5 and p.n == 5


def test_an_update_that_leaves_the_weights_non_finite_is_divergence_not_a_failed_measurement():
    """The loss before the update is finite, the update overflows the weights: at an
    evaluation step fit says that training diverged (or stops), instead of running the
    measurements on non-finite weights."""
    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=math.inf)   # the first update overflows
    seen = []
    with pytest.raises(DivergedError, match="parameters are not finite after the update of "
                                            "step 1.*lower the learning rate"):
        fit(model, opt, x, y, steps=3, eval_at=[1], evaluate=lambda m: seen.append(1) or {})
    assert seen == []
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=math.inf)
    hist = fit(model, opt, x, y, steps=3, eval_at=[1, 2], on_nonfinite="stop",
               evaluate=lambda m: {"w": float(next(m.parameters()).sum())})
    assert hist.diverged_at == 1 and math.isnan(hist.diverged_loss) and hist.steps_done == 1
    assert hist.rows == []
