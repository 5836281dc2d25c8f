"""A layer type declares its own structured-NTK rule (``ntk_rule``), so the kernels import no
model class (issue 11, one-way layers)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UsageError
from telescope.kernels import LinearRule, explain, register_rule, rules
from telescope.models import MLP, NTKLinear

F64 = torch.float64


class Scaled(nn.Module):
    """``y = s * x @ W + b``, declaring its rule without importing telescope."""

    ntk_rule = {"kind": "linear", "weight": "w", "bias": "b", "transposed": True,
                "weight_scale": "s"}

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.s = 0.5
        self.w = nn.Parameter(torch.randn(n_in, n_out, dtype=F64))
        self.b = nn.Parameter(torch.randn(n_out, dtype=F64))

    def forward(self, x):
        return self.s * x @ self.w + self.b


class ScaledChild(Scaled):
    """Inherits the declared rule."""


def _close(k, ref):
    torch.testing.assert_close(k, ref, rtol=0, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("layer", [Scaled, ScaledChild])
def test_a_declared_rule_is_used_and_exact(layer):
    model = nn.Sequential(layer(5, 6), nn.Tanh(), nn.Linear(6, 3, dtype=F64))
    x = torch.randn(4, 5, dtype=F64)
    df = explain(model, x).set_index("parameter")
    assert df.loc["0.w", "rule"] == "linear" and df.loc["0.b", "rule"] == "linear"
    _close(telescope.ntk(model, x, output="full"), oracle_ntk(model, x, None, "full"))


def test_ntk_linear_declares_its_rule_and_the_kernels_import_no_model():
    assert not any(getattr(v, "__module__", "").startswith("telescope.models")
                   for v in vars(rules).values() if isinstance(v, type))
    rule, name = rules.rule_for(NTKLinear(3, 4, bias_std=0.3))
    assert name == "linear" and rule == LinearRule(weight_scale="weight_scale",
                                                   bias_scale="bias_std")
    model = MLP(3, [7], 2, parametrization="ntk", bias_std=0.3).double()
    x = torch.randn(5, 3, dtype=F64)
    assert set(explain(model, x)["rule"]) == {"linear"}
    _close(telescope.ntk(model, x, output="full"), oracle_ntk(model, x, None, "full"))


def test_register_rule_overrides_a_declared_one():
    model = nn.Sequential(Scaled(5, 6))
    x = torch.randn(4, 5, dtype=F64)
    saved = dict(rules._REGISTRY)
    try:
        register_rule(Scaled, LinearRule(weight="w", bias="b", name="mine"))   # wrong layout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = explain(model, x).set_index("parameter")
        assert df.loc["0.w", "rule"] == "per-example Jacobian"   # checked, not trusted
    finally:
        rules._REGISTRY.clear()
        rules._REGISTRY.update(saved)
        rules._VERSION[0] += 1


@pytest.mark.parametrize("spec, match", [
    ({"kind": "lstm"}, "kind' one of"),
    ("linear", "must be a rule or a mapping"),
    ({"kind": "linear", "wieght": "w"}, "unexpected keyword argument 'wieght'"),
])
def test_a_bad_declaration_is_a_clear_error(spec, match):
    layer = type("Bad", (nn.Module,), {"ntk_rule": spec})
    with pytest.raises(UsageError, match=match):
        rules.rule_for(layer())
