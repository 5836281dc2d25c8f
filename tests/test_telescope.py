"""The telescoping model (`telescope.lens.Telescope`) against independent oracles.

- Linear-in-parameters models: the first-order update of each step is exact, so the telescoping
  model (and the linearized model) must equal the trained network to round-off, for any optimizer.
- Nonlinear networks: the telescoping model tracks the network orders of magnitude better than
  the model linearized around the initialization, and its error grows with the learning rate.
- Each step's increment equals a central finite difference of the network along the step.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from telescope.errors import UsageError
from telescope.lens import Telescope
from telescope.lens.telescope import NonFiniteStepError
from telescope.models import TinyTransformer

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# models and a plain training loop
# ----------------------------------------------------------------------------------------------

class RandomFeatures(nn.Module):
    """``f(x) = W tanh(x A) + b`` with fixed random ``A`` (a buffer): linear in its parameters."""

    def __init__(self, d_in: int, n_features: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.randn(d_in, n_features, dtype=F64))
        self.readout = nn.Linear(n_features, d_out, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(x @ self.features))


def mlp(d_in: int = 5, width: int = 32, d_out: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out)).to(F64)


class SDPAModel(nn.Module):
    """One attention layer through ``F.scaled_dot_product_attention`` (the fused CPU kernel has
    no forward-mode derivative), mean-pooled to ``[N, O]``."""

    def __init__(self, d: int = 8, d_out: int = 2, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, dtype=dtype)
        self.out = nn.Linear(d, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, s, d).mean(dim=1))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int, batch: int | None = None, scheduler=None, seed: int = 0,
          after_step=None) -> None:
    """Minibatch training on the MSE loss (batches drawn with their own generator)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        idx = (torch.randperm(x.shape[0], generator=gen)[:batch] if batch
               else torch.arange(x.shape[0]))
        opt.zero_grad()
        out = model(x[idx])
        F.mse_loss(out.reshape(y[idx].shape), y[idx]).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(t + 1)


def regression_data(n: int = 48, d: int = 5, o: int = 1, n_test: int = 24):
    x = torch.randn(n, d, dtype=F64)
    y = torch.sin(x @ torch.randn(d, o, dtype=F64))
    return x, y, torch.randn(n_test, d, dtype=F64)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
}


# ----------------------------------------------------------------------------------------------
# (a) linear in the parameters: exact for every optimizer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_linear_in_parameters_model_is_exact_for_every_optimizer(name):
    x, y, x_test = regression_data(o=2)
    model = RandomFeatures(5, 40, 2)
    opt = OPTIMIZERS[name](model.parameters())
    f0 = model(x_test).detach()
    with Telescope(model, opt, {"train": x, "test": x_test}) as tel:
        train(model, opt, x, y, steps=50, batch=16)
    assert tel.step == 50 and tel.closed
    for probe in ("train", "test"):
        actual = tel.actual(probe)
        assert actual.shape == (x_test.shape[0] if probe == "test" else x.shape[0], 2)
        assert actual.dtype == F64
        # training really moved the function, so the comparison is not vacuous
        if probe == "test":
            assert (actual - f0).abs().max() > 0.05
        torch.testing.assert_close(tel.telescoping(probe), actual, rtol=0, atol=1e-10)
        torch.testing.assert_close(tel.linearized(probe), actual, rtol=0, atol=1e-10)
    rows = tel.history
    assert len(rows) == 2 * 50
    assert [r["step"] for r in rows] == [t for t in range(1, 51) for _ in range(2)]
    assert max(r["telescoping_mae"] for r in rows) < 1e-12
    assert max(r["linearized_mae"] for r in rows) < 1e-12
    for probe, xp in (("train", x), ("test", x_test)):  # the last rows, by hand
        last = [r for r in rows if r["probe"] == probe][-1]
        assert last["output_scale"] == pytest.approx(float(model(xp).detach().abs().mean()),
                                                     rel=1e-12)


def test_linear_model_exact_with_schedule_clipping_and_frozen_parameters():
    """Whatever produced the step (a schedule, clipping, frozen parameters in the optimizer)."""
    x, y, x_test = regression_data()
    model = RandomFeatures(5, 30, 1)
    frozen = nn.Linear(3, 3, dtype=F64).requires_grad_(False)
    model.extra = frozen  # unused frozen parameters, passed to the optimizer anyway
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)

    def clip(_t):
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)

    with Telescope(model, opt, {"test": x_test}) as tel:
        train(model, opt, x, y, steps=30, batch=8, scheduler=sched, after_step=clip)
    torch.testing.assert_close(tel.telescoping("test"), tel.actual("test"), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# (b) nonlinear networks: far better than the linearized model; error grows with the lr
# ----------------------------------------------------------------------------------------------

def _run_mlp(lr: float, steps: int, seed: int = 1) -> Telescope:
    torch.manual_seed(0)
    x, y, x_test = regression_data(n=64, n_test=32)
    torch.manual_seed(seed)
    model = mlp(width=48)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with Telescope(model, opt, {"test": x_test}, every=10) as tel:
        train(model, opt, x, y, steps=steps)
    return tel


def test_nonlinear_mlp_telescoping_beats_linearized_and_error_grows_with_lr():
    small = _run_mlp(lr=0.02, steps=600)
    last = small.history[-1]
    assert last["step"] == 600
    assert last["linearized_mae"] > 0.05 * last["output_scale"]  # training left the lazy regime
    assert last["telescoping_mae"] * 100 <= last["linearized_mae"]
    # the same training time at a 10x larger learning rate: a larger telescoping error
    large = _run_mlp(lr=0.2, steps=60)
    assert large.history[-1]["telescoping_mae"] > 3 * last["telescoping_mae"]
    # the error of the telescoping model is an accumulated second-order term: it grows in time
    errs = [r["telescoping_mae"] for r in small.history]
    assert errs[-1] > 1.5 * errs[0]


def test_history_rows_match_errors_computed_by_hand_every_step():
    """The lazily completed rows (actual network from the next step's JVP) equal direct
    evaluations right after each step, and every=k records steps k, 2k, ..."""
    x, y, x_test = regression_data()
    model = mlp(d_out=3)
    y = torch.randn(x.shape[0], 3, dtype=F64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tel = Telescope(model, opt, {"a": x_test, "b": x[:7]}, every=3)
    expected = []

    def check(t):
        if t % 3 == 0:
            for probe in ("a", "b"):
                act = tel.actual(probe)
                expected.append((t, probe, (tel.telescoping(probe) - act).abs().mean().item(),
                                 (tel.linearized(probe) - act).abs().mean().item(),
                                 act.abs().mean().item()))

    train(model, opt, x, y, steps=20, batch=16, after_step=check)
    tel.close()
    rows = tel.history
    assert [(r["step"], r["probe"]) for r in rows] == [(e[0], e[1]) for e in expected]
    for row, (_, _, tmae, lmae, scale) in zip(rows, expected, strict=True):
        assert row["telescoping_mae"] == pytest.approx(tmae, rel=1e-9, abs=1e-15)
        assert row["linearized_mae"] == pytest.approx(lmae, rel=1e-9)
        assert row["output_scale"] == pytest.approx(scale, rel=1e-12)
    frame = tel.history_frame()
    assert list(frame.columns) == ["step", "probe", "telescoping_mae", "linearized_mae",
                                   "output_scale"]
    assert len(frame) == len(rows)


def test_probe_groups_and_chunks_give_the_same_numbers():
    """Probe sets sharing an input shape share one JVP; chunking only bounds memory."""
    x, y, x_test = regression_data()

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(d_out=2)

        def forward(self, x):
            return self.net(x.flatten(1))

    probes = {"a": x_test, "c": x_test[:5, None, :], "b": x[:11]}  # groups {a, b} and {c}
    results = []
    for chunk in (None, 4):
        torch.manual_seed(5)
        model = Flat()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        with Telescope(model, opt, probes, every=2, chunk_size=chunk) as tel:
            train(model, opt, x, torch.randn(x.shape[0], 2, dtype=F64), steps=5)
        assert [r["probe"] for r in tel.history] == ["a", "c", "b"] * 2
        results.append(tel)
    one, chunked = results
    for name in probes:
        torch.testing.assert_close(one.telescoping(name), chunked.telescoping(name))
        torch.testing.assert_close(one.linearized(name), chunked.linearized(name))
    torch.testing.assert_close(one.telescoping("c"), one.telescoping("a")[:5])
    for r1, r2 in zip(one.history, chunked.history, strict=True):
        assert r1["telescoping_mae"] == pytest.approx(r2["telescoping_mae"], rel=1e-9, abs=1e-15)


def test_track_linearized_false_omits_the_column_but_linearized_still_works():
    x, y, x_test = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Telescope(model, opt, {"test": x_test}, track_linearized=False, every=2) as tel:
        train(model, opt, x, y, steps=5)
    assert [r["step"] for r in tel.history] == [2, 4]
    assert all("linearized_mae" not in r for r in tel.history)
    assert tel.linearized("test").shape == (x_test.shape[0], 1)


# ----------------------------------------------------------------------------------------------
# (c) each increment is the directional derivative along the step (finite differences)
# ----------------------------------------------------------------------------------------------

def test_increment_equals_central_finite_difference_along_the_step():
    x, _, x_test = regression_data()
    model = mlp(d_out=2)
    y = torch.randn(x.shape[0], 2, dtype=F64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.05)
    clone = copy.deepcopy(model)  # the oracle evaluates its own copy, never the Telescope's code
    names = [n for n, _ in model.named_parameters()]
    eps = 1e-4
    tel = Telescope(model, opt, {"test": x_test})
    for _ in range(6):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tel_before = tel.telescoping("test")
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        increment = tel.telescoping("test") - tel_before
        with torch.no_grad():
            plus = {n: before[n] + eps * (after[n] - before[n]) for n in names}
            minus = {n: before[n] - eps * (after[n] - before[n]) for n in names}
            fd = (functional_call(clone, plus, (x_test,))
                  - functional_call(clone, minus, (x_test,))) / (2 * eps)
            exact_change = model(x_test) - functional_call(clone, before, (x_test,))
        torch.testing.assert_close(increment, fd, rtol=1e-6, atol=1e-10)
        # ... and it is not simply the exact change (the model is nonlinear)
        assert (increment - exact_change).abs().max() > 1e-9
    tel.close()


# ----------------------------------------------------------------------------------------------
# (d) token inputs, transformers, F.scaled_dot_product_attention, eval-mode semantics
# ----------------------------------------------------------------------------------------------

def test_tiny_transformer_on_integer_tokens():
    model = TinyTransformer(vocab=11, d_model=16, n_heads=2, n_layers=1, seq_len=6,
                            out_features=3).to(F64)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (32, 6), generator=gen)
    probe = torch.randint(0, 11, (10, 6), generator=gen)
    y = torch.randn(32, 3, dtype=F64, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    f0 = model(probe).detach()
    with Telescope(model, opt, {"tokens": probe}) as tel:
        train(model, opt, tokens, y, steps=15, batch=8)
    actual = tel.actual("tokens")
    moved = (actual - f0).abs().mean()
    assert moved > 1e-3
    assert tel.telescoping("tokens").shape == (10, 3)
    # first-order per step: a tiny fraction of the change the network made
    assert (tel.telescoping("tokens") - actual).abs().mean() < 1e-2 * moved
    row = tel.history[-1]
    assert row["telescoping_mae"] < row["linearized_mae"]


def test_token_readout_keeps_the_model_output_shape():
    model = TinyTransformer(vocab=11, d_model=16, n_heads=2, n_layers=1, seq_len=6,
                            out_features=3, readout="token").to(F64)
    tokens = torch.randint(0, 11, (8, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Telescope(model, opt, {"t": tokens}) as tel:
        opt.zero_grad()
        model(tokens).pow(2).mean().backward()
        opt.step()
    assert tel.telescoping("t").shape == tel.actual("t").shape == (8, 6, 3)
    assert tel.linearized("t").shape == (8, 6, 3)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_scaled_dot_product_attention_works_with_forward_mode(dtype):
    model = SDPAModel(dtype=dtype)
    x = torch.randn(16, 5, 8, dtype=dtype)
    y = torch.randn(16, 2, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    f0 = model(x).detach()
    with Telescope(model, opt, {"x": x}) as tel:
        train(model, opt, x, y, steps=5)
    actual = tel.actual("x")
    assert tel.telescoping("x").dtype == dtype
    moved = (actual - f0).abs().mean()
    assert (tel.telescoping("x") - actual).abs().mean() < 1e-2 * moved


def test_probes_use_eval_mode_and_the_training_mode_is_restored():
    # momentum=0 keeps BatchNorm's running statistics fixed: buffer changes are not parameter
    # changes and are not part of the telescoping model
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16, momentum=0.0), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(16, 1)).to(F64)
    model.train()
    model[3].eval()  # a mixed mode must come back exactly as it was
    x, y, x_test = regression_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Telescope(model, opt, {"test": x_test}) as tel:
        train(model, opt, x, y, steps=3)
        assert model.training and model[1].training and not model[3].training
    model.eval()
    torch.testing.assert_close(tel.actual("test"), model(x_test).detach())
    assert tel.history[-1]["telescoping_mae"] < 1e-2 * tel.history[-1]["output_scale"]


def test_parameters_and_grads_are_never_touched():
    """Training with a Telescope gives bit-identical parameters and gradients to training
    without one."""
    x, y, x_test = regression_data()
    torch.manual_seed(3)
    plain = mlp()
    observed = copy.deepcopy(plain)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_obs = torch.optim.Adam(observed.parameters(), lr=0.01)
    train(plain, opt_plain, x, y, steps=10, batch=8)
    with Telescope(observed, opt_obs, {"test": x_test, "train": x}) as tel:
        train(observed, opt_obs, x, y, steps=10, batch=8)
        grads = [p.grad.clone() for p in observed.parameters()]
        tel.linearized("test"), tel.actual("test"), tel.history  # noqa: B018
        for g, p in zip(grads, observed.parameters(), strict=True):
            assert torch.equal(g, p.grad)
    for p, q in zip(plain.parameters(), observed.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


# ----------------------------------------------------------------------------------------------
# (e) hooks, context manager, errors
# ----------------------------------------------------------------------------------------------

def test_close_removes_the_hooks_and_is_idempotent():
    x, y, x_test = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tel = Telescope(model, opt, {"test": x_test})
    train(model, opt, x, y, steps=3)
    tel.close()
    tel.close()
    frozen_view = tel.telescoping("test")
    n_rows = len(tel.history)
    train(model, opt, x, y, steps=3)
    assert tel.step == 3 and len(tel.history) == n_rows == 3
    torch.testing.assert_close(tel.telescoping("test"), frozen_view, rtol=0, atol=0)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert "closed" in repr(tel)


def test_context_manager_closes_on_error():
    x, y, x_test = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="boom"), Telescope(model, opt, {"t": x_test}) as tel:
        train(model, opt, x, y, steps=2)
        raise RuntimeError("boom")
    assert tel.closed and tel.step == 2


def _setup():
    x, y, x_test = regression_data()
    model = mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, x_test


@pytest.mark.parametrize("probes, error, match", [
    ([torch.randn(3, 5, dtype=F64)], TypeError, "dict mapping names"),
    ({}, ValueError, "empty"),
    ({"a": [[1.0] * 5]}, TypeError, "probe 'a' must be a torch.Tensor"),
    ({1: torch.randn(3, 5, dtype=F64)}, TypeError, "names must be strings"),
    ({"a": torch.randn(0, 5, dtype=F64)}, ValueError, "N >= 1"),
    ({"a": torch.full((3, 5), float("nan"), dtype=F64)}, ValueError, "NaN"),
    ({"a": torch.randn(3, 7, dtype=F64)}, ValueError, "the model failed on probe 'a'"),
])
def test_bad_probes_raise_clear_errors(probes, error, match):
    model, opt, *_ = _setup()
    with pytest.raises(error, match=match):
        Telescope(model, opt, probes)
    assert not opt._optimizer_step_pre_hooks  # nothing left hooked after a failed construction


def test_output_batch_mismatch_is_reported():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2, dtype=F64)

        def forward(self, x):
            return self.lin(x).sum(dim=0, keepdim=True)  # [1, 2] whatever the batch

    model = Pooled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="probe 'p'.*shape \\(1, 2\\) for a batch of 4"):
        Telescope(model, opt, {"p": torch.randn(4, 5, dtype=F64)})


def test_optimizer_must_hold_exactly_the_trainable_parameters():
    model, _, _, _, x_test = _setup()
    last = model[4]
    partial = torch.optim.SGD(last.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"not in the optimizer.*0\.weight, 0\.bias, 2\.weight"):
        Telescope(model, partial, {"t": x_test})
    stranger = nn.Parameter(torch.zeros(7, 3))
    extra = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(ValueError, match=r"not parameters of the model \(group 0 shape \[7, 3\]"):
        Telescope(model, extra, {"t": x_test})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Telescope(model, object(), {"t": x_test})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        Telescope(model, opt, {"t": x_test}, every=0)


def test_nan_parameters_raise_naming_the_step():
    model, opt, x, y, x_test = _setup()
    with Telescope(model, opt, {"t": x_test}) as tel:
        train(model, opt, x, y, steps=2)
        before = tel.telescoping("t")
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        model[2].weight.grad[0, 0] = float("nan")
        with pytest.raises(NonFiniteStepError, match=r"step 3 .*2\.weight.*diverged"):
            opt.step()
    assert tel.step == 2
    torch.testing.assert_close(tel.telescoping("t"), before, rtol=0, atol=0)  # untouched
    assert issubclass(NonFiniteStepError, ValueError)


def test_unknown_probe_and_external_parameter_changes():
    model, opt, x, y, x_test = _setup()
    with Telescope(model, opt, {"t": x_test}) as tel:
        with pytest.raises(KeyError, match="unknown probe 'nope'"):
            tel.telescoping("nope")
        train(model, opt, x, y, steps=1)
        with torch.no_grad():
            model[0].bias.add_(0.1)
        with pytest.warns(RuntimeWarning, match=r"outside optimizer.step\(\) before step 2"):
            train(model, opt, x, y, steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            with torch.no_grad():
                model[0].bias.add_(0.1)
            train(model, opt, x, y, steps=1)


# ----------------------------------------------------------------------------------------------
# (f) memory does not grow with the number of steps
# ----------------------------------------------------------------------------------------------

def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy torch modules warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.numel() for t in tensors)


def test_memory_is_independent_of_the_number_of_steps():
    x, y, x_test = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tel = Telescope(model, opt, {"test": x_test, "train": x})
    train(model, opt, x, y, steps=5)
    tel.history  # noqa: B018 - settle the lazily completed row
    before = _live_tensors()
    train(model, opt, x, y, steps=40, seed=1)
    tel.history  # noqa: B018
    assert _live_tensors() == before
    assert len(tel.history) == 2 * 45  # only the tidy rows grow (python floats)
    assert all(not isinstance(v, torch.Tensor) for r in tel.history for v in r.values())
    tel.close()


def test_parameters_added_or_replaced_after_creation_are_refused():
    """``add_param_group`` with a replaced layer, or a frozen parameter unfrozen: the
    telescoping sum and ``actual`` would describe another network, so both refuse."""
    x, y, x_test = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tel = Telescope(model, opt, {"test": x_test})
    train(model, opt, x, y, steps=3)
    model[4] = nn.Linear(32, 1, dtype=F64)
    opt.add_param_group({"params": model[4].parameters()})
    with pytest.raises(UsageError, match=r"changed after step 3 .*replaced: 4.bias, 4.weight"):
        tel.actual("test")
    with pytest.raises(UsageError, match="param groups changed"):
        train(model, opt, x, y, steps=1)
    assert tel.step == 3

    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tel = Telescope(model, opt, {"test": x_test})
    train(model, opt, x, y, steps=2)
    model[0].requires_grad_(True)
    with pytest.raises(UsageError, match="new: 0.bias, 0.weight"):
        train(model, opt, x, y, steps=1)
