"""The Smoother against independent oracles: the trained network itself (exact for models that
are linear in their parameters), labels perturbed and retrained, closed forms, and the library's
second recursion."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from telescope.errors import UnsupportedModelError, UnsupportedOptimizerError, UsageError
from telescope.lens.smoother import Smoother


class RandomFeatures(nn.Module):
    """tanh(x W) with a fixed W: the model below is linear in its parameters."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(d, k, dtype=torch.float64) / d**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w)


def linear_model(d=4, k=12, o=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(RandomFeatures(d, k), nn.Linear(k, o)).double()


def data(n=10, m=6, d=4, o=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, o, generator=g, dtype=torch.float64)
    xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    return x, (y[:, 0] if o == 1 else y), xt


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True,
                                                 weight_decay=0.05),
    "sgd-wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1),
    "sgd-groups": lambda p: torch.optim.SGD(
        [{"params": p[:1], "lr": 0.05, "weight_decay": 0.1}, {"params": p[1:], "lr": 0.1}],
        momentum=0.5),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.02, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, betas=(0.8, 0.95)),
    # torch >= 2.6 spells AdamW as Adam(decoupled_weight_decay=True): decay must be decoupled
    "adam-decoupled": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1,
                                                 decoupled_weight_decay=True),
    # per group: decoupled decay on the first, L2 decay on the second, foreach, maximize off
    "adam-mixed-groups": lambda p: torch.optim.Adam(
        [{"params": p[:1], "weight_decay": 0.2, "decoupled_weight_decay": True},
         {"params": p[1:], "weight_decay": 0.05, "lr": 0.01}], lr=0.02, foreach=True),
}


def batches(n, steps, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:batch] for _ in range(steps)]


def train(model, x, y, opt_name, order, *, loss="mse", smoother=True, xt=None, lr_decay=None,
          **kw):
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, lr_decay) if lr_decay else None
    sm = Smoother(model, opt, x, y, probes={"test": xt}, loss=loss, **kw) if smoother else None
    lossf = F.mse_loss if loss == "mse" else F.cross_entropy
    for idx in order:
        opt.zero_grad()
        out = model(x[idx])
        out = out[:, 0] if (loss == "mse" and y.ndim == 1) else out
        lossf(out, y[idx]).backward()
        if sm is not None:
            sm.record(idx)
        opt.step()
        if sched:
            sched.step()
    return sm


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_linear_model_smoother_is_the_network(opt_name):
    x, y, xt = data()
    model = linear_model()
    sm = train(model, x, y, opt_name, batches(10, 25, 4), xt=xt, lr_decay=0.7)
    with torch.no_grad():
        torch.testing.assert_close(sm.predict("train"), model(x)[:, 0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(sm.predict("test"), model(xt)[:, 0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-momentum", "sgd-nesterov-wd", "sgd-groups"])
@pytest.mark.parametrize("o", [1, 2])
def test_weights_are_the_jacobian_of_predictions_wrt_labels(opt_name, o):
    """Training a linear model with SGD is affine in the labels: retrain with y = e_j."""
    x, y, xt = data(n=6, o=o)
    order = batches(6, 15, 3)
    sm = train(linear_model(o=o), x, y, opt_name, order, xt=xt)

    def final(labels):
        model = linear_model(o=o)
        train(model, x, labels, opt_name, order, smoother=False)
        with torch.no_grad():
            return model(xt).reshape(len(xt), -1)

    base = final(torch.zeros_like(y))
    cols = []
    for j in range(y.numel()):
        e = torch.zeros(y.numel(), dtype=y.dtype)
        e[j] = 1
        cols.append(final(e.view_as(y)) - base)
    jac = torch.stack(cols, dim=-1)  # [m, O, nO]
    w = sm.weights("test")
    torch.testing.assert_close(w.reshape(jac.shape), jac, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sm.offset("test").reshape(base.shape), base, rtol=1e-8,
                               atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_effective_parameters_of_converged_linear_regression_is_the_rank(bias):
    g = torch.Generator().manual_seed(0)
    n, d = 20, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=bias).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sm = Smoother(model, opt, x, y, probes={"test": x[:3]})
    idx = torch.arange(n)
    for _ in range(1500):
        opt.zero_grad()
        F.mse_loss(model(x)[:, 0], y).backward()
        sm.record(idx)
        opt.step()
    assert sm.effective_parameters("train") == pytest.approx(d + bias, abs=1e-6)
    # the smoother of converged least squares is the hat matrix
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) if bias else x
    hat = xa @ torch.linalg.pinv(xa)
    torch.testing.assert_close(sm.weights("train"), hat, rtol=1e-6, atol=1e-8)
    last = [r for r in sm.history if r["probe"] == "train"][-1]
    assert last["step"] == 1500
    assert last["effective_parameters"] == pytest.approx(d + bias, abs=1e-6)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1)).double()


def test_function_and_weight_space_recursions_agree_for_plain_sgd():
    x, y, xt = data(n=12)
    order = batches(12, 20, 4)
    a = train(_mlp(), x, y, "sgd", order, xt=xt, mode="function")
    b = train(_mlp(), x, y, "sgd", order, xt=xt, mode="weight")
    torch.testing.assert_close(a.weights("test"), b.weights("test"), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a.offset("test"), b.offset("test"), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("opt_name", ["sgd-nesterov-wd", "adamw"])
def test_nonlinear_network_error_is_first_order_in_the_learning_rate(opt_name):
    """For a nonlinear network the smoother is a first-order model: a 10x smaller learning
    rate over 10x more steps (about the same path) gives a much smaller error."""
    x, y, xt = data(n=12)
    errors, moved = [], []
    for scale in (1.0, 0.1):
        model = _mlp()
        with torch.no_grad():
            start = model(xt)[:, 0].clone()
        make = OPTIMIZERS[opt_name]

        def scaled(p, make=make, scale=scale):
            opt = make(p)
            for g in opt.param_groups:
                g["lr"] *= scale
            return opt

        OPTIMIZERS["scaled"] = scaled
        sm = train(model, x, y, "scaled", batches(12, int(30 / scale), 4), xt=xt)
        with torch.no_grad():
            actual = model(xt)[:, 0]
        moved.append(float((actual - start).abs().mean()))
        errors.append(float((sm.predict("test") - actual).abs().mean()))
    del OPTIMIZERS["scaled"]
    assert min(moved) > 0.05  # training changed the function
    assert errors[1] < errors[0] / 5
    assert errors[1] < 0.1 * moved[1]


def test_cross_entropy_linear_model_is_exact():
    x, _, xt = data(n=10)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    model = linear_model(o=3)
    sm = train(model, x, labels, "sgd-momentum", batches(10, 20, 5), xt=xt, loss="cross_entropy")
    with torch.no_grad():
        torch.testing.assert_close(sm.predict("test"), model(xt), rtol=1e-9, atol=1e-10)
    assert sm.weights("test").shape == (6, 3, 30)


def test_clear_errors():
    x, y, xt = data()
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reserved"):
        Smoother(model, opt, x, y, probes={"train": xt})
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        Smoother(model, torch.optim.RMSprop(model.parameters()), x, y)
    with pytest.raises(ValueError, match="not in the optimizer"):
        Smoother(model, torch.optim.SGD(model[1].bias.unsqueeze(0) and [model[1].bias], lr=1),
                 x, y)
    sm = Smoother(model, opt, x, y)
    opt.zero_grad()
    F.mse_loss(model(x)[:, 0], y).backward()
    with pytest.raises(UsageError, match="record"):
        opt.step()
    # a loss with the wrong reduction is caught at the first step
    opt.zero_grad()
    F.mse_loss(model(x)[:, 0], y, reduction="sum").backward()
    sm.record(torch.arange(10))
    with pytest.raises(ValueError, match="mean reduction"):
        opt.step()
    with pytest.raises(ValueError, match="batch indices"):
        sm.record([0, 99])


def test_decoupled_decay_differs_from_l2_decay():
    """The oracle test above would pass for both rules if they agreed: make sure they do not
    here, so that choosing the wrong one is caught."""
    x, y, _ = data()
    finals = []
    for name in ("adam-decoupled", "adam"):
        model = linear_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.1,
                               decoupled_weight_decay=name == "adam-decoupled")
        for idx in batches(10, 25, 4):
            opt.zero_grad()
            F.mse_loss(model(x[idx])[:, 0], y[idx]).backward()
            opt.step()
        with torch.no_grad():
            finals.append(model(x)[:, 0])
    assert float((finals[0] - finals[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("make, match", [
    (lambda p: torch.optim.Adagrad(p), "Adagrad is not one of them"),
    (lambda p: torch.optim.RMSprop(p), "RMSprop is not one of them"),
    (lambda p: torch.optim.NAdam(p), "NAdam is not one of them"),
    (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)), "tensor lr"),
    (lambda p: torch.optim.SGD(p, lr=0.1, differentiable=True), "differentiable"),
])
def test_optimizers_and_options_it_does_not_reproduce_are_refused(make, match):
    x, y, _ = data()
    model = linear_model()
    with pytest.raises(UnsupportedOptimizerError, match=match):
        Smoother(model, make(model.parameters()), x, y)


def test_optimizer_subclasses_are_judged_by_their_step():
    x, y, xt = data()

    class Renamed(torch.optim.SGD):  # same update: reproduced exactly
        pass

    class Clipped(torch.optim.SGD):  # a different update: refused
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.clamp_(-0.01, 0.01)
            return super().step(closure)

    model = linear_model()
    with pytest.raises(UnsupportedOptimizerError, match="overrides SGD.step"):
        Smoother(model, Clipped(model.parameters(), lr=0.1), x, y)
    opt = Renamed(model.parameters(), lr=0.1)
    sm = Smoother(model, opt, x, y, probes={"test": xt})
    for idx in batches(10, 10, 4):
        opt.zero_grad()
        F.mse_loss(model(x[idx])[:, 0], y[idx]).backward()
        sm.record(idx)
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(sm.predict("test"), model(xt)[:, 0], rtol=1e-9, atol=1e-10)


def _step(model, opt, sm, x, y, idx):
    opt.zero_grad()
    F.mse_loss(model(x[idx])[:, 0], y[idx]).backward()
    sm.record(idx)
    opt.step()


def test_record_accepts_indices_and_masks_and_refuses_the_rest():
    x, y, xt = data()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    results = []
    for batch in (torch.tensor([1, 4, 7]), [1, 4, 7], mask, mask.tolist()):
        model = linear_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sm = Smoother(model, opt, x, y, probes={"test": xt})
        opt.zero_grad()
        F.mse_loss(model(x[mask])[:, 0], y[mask]).backward()
        sm.record(batch)  # passes the gradient check only if it means examples 1, 4, 7
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(sm.predict("test"), model(xt)[:, 0], rtol=1e-9,
                                       atol=1e-10)
        results.append(sm.weights("test"))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=0)
    for bad, match in (([0.5, 1.7], "integers"), (torch.tensor([0.0, 1.0]), "integers"),
                       (torch.ones(20, dtype=torch.bool), "length n = 10"),
                       ([True] * 3, "length n = 10"), (torch.zeros(2, 2, dtype=torch.long),
                                                       "1-D"),
                       ([], "empty"), ([0, 10], r"\[0, 10\)"), ("abc", "integers")):
        with pytest.raises(UsageError, match=match):
            sm.record(bad)


def test_changes_outside_the_optimizer_are_refused_not_drifted_from():
    x, y, xt = data()
    # an in-place edit between steps
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sm = Smoother(model, opt, x, y, probes={"test": xt})
    _step(model, opt, sm, x, y, torch.arange(4))
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    with pytest.raises(UsageError, match="outside optimizer.step"):
        _step(model, opt, sm, x, y, torch.arange(4))
    # a layer replaced and added to the optimizer
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sm = Smoother(model, opt, x, y, probes={"test": xt})
    _step(model, opt, sm, x, y, torch.arange(4))
    model[1] = nn.Linear(12, 1).double()
    opt.add_param_group({"params": model[1].parameters()})
    with pytest.raises(UsageError, match="param groups changed"):
        _step(model, opt, sm, x, y, torch.arange(4))
    # a schedule that makes SGD's groups differ breaks the function-space recursion
    model = linear_model()
    opt = torch.optim.SGD([{"params": model[1].weight}, {"params": model[1].bias}], lr=0.1)
    sm = Smoother(model, opt, x, y)
    assert sm.mode == "function"
    _step(model, opt, sm, x, y, torch.arange(4))
    opt.param_groups[1]["lr"] = 0.05
    with pytest.raises(UsageError, match="mode='weight'"):
        _step(model, opt, sm, x, y, torch.arange(4))


class Centered(nn.Module):
    """Subtracts the batch mean of the hidden layer: examples are coupled by a plain op."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


def test_models_it_cannot_follow_get_a_clear_error():
    x, y, xt = data()
    torch.manual_seed(0)
    for layer, match in ((nn.BatchNorm1d(8), "BatchNorm1d.*train mode"),
                         (nn.Dropout(0.1), "Dropout.*train mode")):
        model = nn.Sequential(nn.Linear(4, 8), layer, nn.Tanh(), nn.Linear(8, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(UnsupportedModelError, match=f"Smoother.*{match}"):
            Smoother(model, opt, x, y)
        model.eval()  # trained in eval mode the smoother is fine...
        sm = Smoother(model, opt, x, y)
        model.train()  # ... but not if training then switches to train mode
        with pytest.raises(UnsupportedModelError, match=match):
            _step(model, opt, sm, x, y, torch.arange(4))
    model = Centered().double()
    with pytest.raises(UnsupportedModelError, match="depends on the other examples"):
        Smoother(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)


def test_non_finite_inputs_and_parameters_are_refused_at_construction():
    x, y, xt = data()
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(UsageError, match="x_train contains NaN"):
        Smoother(model, opt, bad, y)
    with pytest.raises(UsageError, match="probe 'test' contains NaN"):
        Smoother(model, opt, x, y, probes={"test": bad})
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    with pytest.raises(UsageError, match="NaN or infinite"):
        Smoother(model, opt, x, y)
