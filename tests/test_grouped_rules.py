"""Structured-NTK rules of grouped layers (grouped convolutions, block-diagonal linear layers)
and the collegial-ensemble model built from them, against independent oracles: per-example
autograd loops (``_oracles.oracle_ntk``), ``method="jacobian"``, and the kernels of the groups
(members) computed as separate networks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UsageError
from telescope.kernels import explain, register_rule, rules
from telescope.kernels.rules import BlockDiagonalRule, ConvRule, rule_for
from telescope.kernels.structured import ntk_to_subset
from telescope.models import BlockDiagonalLinear, Ensemble, NTKLinear, collegial_ensemble
from telescope.models.ensemble import member_parameter_count, members_for_budget

F64 = torch.float64


def _close(k, ref, tol=1e-10):
    torch.testing.assert_close(k, ref, rtol=0, atol=tol * float(ref.abs().max()))


def _no_fallback(model, x):
    """The structured kernel uses no per-example Jacobian and warns about nothing."""
    df = explain(model, x)
    assert (df["rule"] != "per-example Jacobian").all(), df[["parameter", "rule", "reason"]]
    return df.set_index("parameter")


def _check_all_outputs(model, x, x2=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rule that failed its autograd check would warn
        for output in ("full", "trace", "diagonal"):
            k = telescope.ntk(model, x, x2, output=output, method="structured")
            _close(k, oracle_ntk(model, x, x2, output))
            _close(k, telescope.ntk(model, x, x2, output=output, method="jacobian"))


# --------------------------------------------------------------------------------------------
# grouped convolutions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, bias, padding_mode", [(2, True, "zeros"), (3, False, "zeros"),
                                                        (6, True, "circular")])
def test_grouped_conv1d_against_autograd(groups, bias, padding_mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(6, 6, 3, groups=groups, bias=bias, padding=1, padding_mode=padding_mode),
        nn.Tanh(),
        nn.Conv1d(6, 9, 2, stride=2, dilation=2, groups=3), nn.ReLU(), nn.Flatten(),
        nn.LazyLinear(2)).to(F64)
    x = torch.randn(5, 6, 9, dtype=F64)
    model(x)
    df = _no_fallback(model, x)
    assert df.loc["0.weight", "rule"] == f"convolution (groups={groups})"
    assert df.loc["2.weight", "rule"] == "convolution (groups=3)"
    _check_all_outputs(model, x, torch.randn(3, 6, 9, dtype=F64))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv2d_against_autograd(groups):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(4, 8, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1), groups=groups,
                  padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(8, 4, 1, groups=groups), nn.Flatten(), nn.LazyLinear(3)).to(F64)
    x = torch.randn(4, 4, 7, 6, dtype=F64)
    model(x)
    _no_fallback(model, x)
    _check_all_outputs(model, x)


def test_grouped_conv3d_and_float32():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv3d(4, 6, (2, 2, 1), groups=2, padding=(1, 0, 0)), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 4, 3, 4, 2)
    model(x)
    _no_fallback(model, x)
    k = telescope.ntk(model, x, output="full")
    ref = oracle_ntk(model, x, None, "full")
    torch.testing.assert_close(k, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


class GroupedConvNet(nn.Module):
    """``sum_g head_g(tanh(conv_g(x)))`` with one grouped convolution holding the ``conv_g``
    and one block-diagonal readout holding the ``head_g``."""

    def __init__(self, c_in: int, c_mid: int, groups: int, size: int) -> None:
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(c_in, c_mid, 2, groups=groups)
        self.n_feat = (c_mid // groups) * (size - 1) ** 2
        self.head = BlockDiagonalLinear(groups * self.n_feat, groups, groups, bias_std=0.5)

    def forward(self, x):
        h = torch.tanh(self.conv(x))                       # [N, G c, s, s], group-major
        h = h.reshape(x.shape[0], self.groups, -1).flatten(1)
        return self.head(h).sum(1, keepdim=True)

    def group_model(self, g: int) -> nn.Module:
        """Group ``g`` as a separate network on its own input channels (weights copied)."""
        c_in, c_mid = self.conv.in_channels // self.groups, self.conv.out_channels // self.groups
        conv = nn.Conv2d(c_in, c_mid, 2).to(F64)
        head = NTKLinear(self.n_feat, 1, bias_std=0.5).to(F64)
        with torch.no_grad():
            conv.weight.copy_(self.conv.weight[g * c_mid:(g + 1) * c_mid])
            conv.bias.copy_(self.conv.bias[g * c_mid:(g + 1) * c_mid])
            head.weight.copy_(self.head.weight[g:g + 1])
            head.bias.copy_(self.head.bias[g:g + 1])
        sl = slice(g * c_in, (g + 1) * c_in)
        return nn.Sequential(_Channels(sl), conv, nn.Tanh(), nn.Flatten(), head)


class _Channels(nn.Module):
    def __init__(self, sl: slice) -> None:
        super().__init__()
        self.sl = sl

    def forward(self, x):
        return x[:, self.sl]


def test_grouped_conv_kernel_is_the_sum_of_its_groups_kernels():
    """A grouped layer's kernel is the sum over groups of per-group kernels: the network of
    ``G`` groups against ``G`` separate networks, each computed by itself."""
    torch.manual_seed(3)
    model = GroupedConvNet(6, 6, 3, 4).to(F64)
    x = torch.randn(6, 6, 4, 4, dtype=F64)
    with torch.no_grad():
        parts = [model.group_model(g) for g in range(3)]
        torch.testing.assert_close(model(x), sum(p(x) for p in parts))
    _no_fallback(model, x)
    k = telescope.ntk(model, x, output="full")
    _close(k, sum(telescope.ntk(p, x, output="full", method="jacobian") for p in parts))


# --------------------------------------------------------------------------------------------
# block-diagonal linear layers
# --------------------------------------------------------------------------------------------


def test_block_diagonal_linear_is_a_grouped_kernel_size_one_conv():
    torch.manual_seed(4)
    layer = BlockDiagonalLinear(6, 9, 3, parametrization="standard", weight_std=1.3,
                                bias_std=0.4).to(F64)
    conv = nn.Conv1d(6, 9, 1, groups=3).to(F64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight.unsqueeze(-1))
        conv.bias.copy_(layer.bias)
    x = torch.randn(4, 5, 6, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x.transpose(1, 2)).transpose(1, 2))
    dense = torch.block_diag(*layer.weight.view(3, 3, 2))
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias)


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
def test_block_diagonal_linear_on_tokens_against_autograd(parametrization):
    """Inputs with a token axis ``[N, S, in]``: the kernel sums over token pairs per block."""
    torch.manual_seed(5)
    model = nn.Sequential(
        BlockDiagonalLinear(6, 8, 2, weight_std=1.4, bias_std=0.3,
                            parametrization=parametrization), nn.Tanh(),
        BlockDiagonalLinear(8, 4, 4, bias=False, parametrization=parametrization),
        nn.Flatten(), nn.Linear(12, 2)).to(F64)
    x = torch.randn(5, 3, 6, dtype=F64)
    df = _no_fallback(model, x)
    assert df.loc["0.weight", "rule"] == "block-diagonal linear (groups=2)"
    _check_all_outputs(model, x)


def test_block_diagonal_linear_with_one_group_is_ntk_linear():
    torch.manual_seed(6)
    block = BlockDiagonalLinear(5, 3, 1, weight_std=1.2, bias_std=0.2).to(F64)
    dense = NTKLinear(5, 3, weight_std=1.2, bias_std=0.2).to(F64)
    dense.load_state_dict(block.state_dict())
    x = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(block(x), dense(x))
    _close(telescope.ntk(block, x, output="full"), telescope.ntk(dense, x, output="full"))


def test_the_declared_rule():
    rule, name = rule_for(BlockDiagonalLinear(4, 6, 2))
    assert name == "block-diagonal linear (groups=2)"
    assert rule == BlockDiagonalRule(groups="groups", weight_scale="weight_scale",
                                     bias_scale="bias_scale")
    rule, name = rule_for(nn.Conv2d(4, 6, 3, groups=2))
    assert isinstance(rule, ConvRule) and name == "convolution (groups=2)"
    assert rule_for(nn.Conv1d(4, 6, 3))[1] == "convolution"


class MyBlocks(nn.Module):
    """A block-diagonal layer of another library: weight ``w [out, in / n_blocks]``, no bias,
    a constant factor 0.5."""

    def __init__(self, n_in: int, n_out: int, n_blocks: int) -> None:
        super().__init__()
        self.n_blocks = n_blocks
        self.w = nn.Parameter(torch.randn(n_out, n_in // n_blocks, dtype=F64))

    def forward(self, x):
        blocks = x.unflatten(-1, (self.n_blocks, -1))
        w = self.w.unflatten(0, (self.n_blocks, -1))
        return 0.5 * torch.einsum("...gi,goi->...go", blocks, w).flatten(-2)


def test_register_a_block_diagonal_rule_for_a_layer_of_ones_own():
    torch.manual_seed(14)
    model = nn.Sequential(MyBlocks(6, 9, 3), nn.Tanh(), nn.Linear(9, 2, dtype=F64))
    x = torch.randn(5, 6, dtype=F64)
    saved = dict(rules._REGISTRY)
    try:
        register_rule(MyBlocks, BlockDiagonalRule(weight="w", bias=None, groups="n_blocks",
                                                  weight_scale=0.5))
        df = _no_fallback(model, x)
        assert df.loc["0.w", "rule"] == "block-diagonal linear (groups=3)"
        _check_all_outputs(model, x)
    finally:
        rules._REGISTRY.clear()
        rules._REGISTRY.update(saved)
        rules._VERSION[0] += 1


class Shuffled(BlockDiagonalLinear):
    """Inherits the declared rule but feeds each block the *other* block's input."""

    def forward(self, x):
        return super().forward(x.flip(-1))


def test_a_layer_the_rule_does_not_fit_falls_back_exactly():
    """The autograd check catches a forward that is not the rule's map: per-example Jacobians,
    a warning, and still the exact kernel."""
    torch.manual_seed(7)
    model = nn.Sequential(Shuffled(4, 4, 2), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    with pytest.warns(UserWarning, match="rule failed the autograd check"):
        k = telescope.ntk(model, x, output="full")
    _close(k, oracle_ntk(model, x, None, "full"))
    df = explain(model, x).set_index("parameter")
    assert df.loc["0.weight", "rule"] == "per-example Jacobian"
    assert "does not reproduce autograd" in df.loc["0.weight", "reason"]


def test_kernel_to_subset_and_directional_derivative_of_grouped_layers():
    """The factors' ``dot`` (J v) and ``select`` paths read the groups' rows correctly: J v
    against a central finite difference."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                          BlockDiagonalLinear(24, 6, 3, bias_std=0.5)).to(F64)
    x = torch.randn(6, 4, 6, dtype=F64)
    idx = torch.tensor([3, 0])
    g = torch.Generator().manual_seed(9)
    v = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in model.named_parameters()}
    k, jv = ntk_to_subset(model, x, idx, output="full", tangent=v)
    _close(k, oracle_ntk(model, x, x[idx], "full"))
    eps = 1e-6
    params = dict(model.named_parameters())
    with torch.no_grad():
        plus = torch.func.functional_call(model, {n: p + eps * v[n] for n, p in params.items()},
                                          (x,))
        minus = torch.func.functional_call(model, {n: p - eps * v[n] for n, p in params.items()},
                                           (x,))
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_a_frozen_grouped_weight():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv1d(4, 4, 2, groups=2), nn.Tanh(), nn.Flatten(),
                          BlockDiagonalLinear(20, 2, 2)).to(F64)
    model[0].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    x = torch.randn(4, 4, 6, dtype=F64)
    _no_fallback(model, x)
    _close(telescope.ntk(model, x, output="full"), oracle_ntk(model, x, None, "full"))


def test_block_diagonal_linear_bad_arguments():
    with pytest.raises(UsageError, match="multiples of groups"):
        BlockDiagonalLinear(5, 4, 2)
    with pytest.raises(UsageError, match="groups must be a positive int"):
        BlockDiagonalLinear(4, 4, 0)
    with pytest.raises(UsageError, match="parametrization must be"):
        BlockDiagonalLinear(4, 4, 2, parametrization="mup")
    with pytest.raises(UsageError, match="weight_std"):
        BlockDiagonalLinear(4, 4, 2, weight_std=-1.0)
    with pytest.raises(UsageError, match=r"takes \[\.\.\., 4\] inputs"):
        BlockDiagonalLinear(4, 4, 2)(torch.randn(3, 5))


# --------------------------------------------------------------------------------------------
# the ensemble
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["sqrt", "mean"])
def test_ensemble_kernel_is_the_scaled_sum_of_its_members_kernels(normalization):
    """``Theta_ens = c_m^2 sum_k Theta_k`` with each member's kernel computed by itself (a
    separate MLP, by autograd loops), and the forward is ``c_m sum_k f_k``."""
    torch.manual_seed(11)
    m = 4
    model = collegial_ensemble(m, 5, 6, 2, depth=3, normalization=normalization,
                               weight_std=1.3, bias_std=0.2).to(F64)
    c = 1 / math.sqrt(m) if normalization == "sqrt" else 1 / m
    assert model.scale == pytest.approx(c)
    x = torch.randn(7, 6, dtype=F64)
    members = [model.member(k) for k in range(m)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), c * sum(f(x) for f in members))
    df = _no_fallback(model, x)
    assert df.loc["net.2.weight", "rule"] == f"block-diagonal linear (groups={m})"
    k = telescope.ntk(model, x, output="full")
    _close(k, c * c * sum(oracle_ntk(f, x, None, "full") for f in members))
    _close(k, telescope.ntk(model, x, output="full", method="jacobian"))


def test_ensemble_of_one_is_the_plain_ntk_mlp():
    torch.manual_seed(12)
    model = collegial_ensemble(1, 8, 5, 1, depth=2)
    x = torch.randn(6, 5)
    mlp = model.member(0)
    torch.testing.assert_close(model(x), mlp(x))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in mlp.parameters())


def test_members_are_independent_at_initialization():
    """Different members get different weights (one draw per wide layer, not one copy)."""
    torch.manual_seed(13)
    model = collegial_ensemble(3, 4, 2, 1, depth=2)
    w = [model.member(k).net[2].weight for k in range(3)]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


@pytest.mark.parametrize("depth, bias", [(1, True), (3, False)])
def test_parameter_count_and_budget(depth, bias):
    for m, width in ((1, 7), (5, 3)):
        model = Ensemble(9, width, 2, m, depth=depth, bias=bias)
        count = sum(p.numel() for p in model.parameters())
        assert count == m * member_parameter_count(width, 9, 2, depth=depth, bias=bias)
    per = member_parameter_count(4, 9, 2, depth=depth, bias=bias)
    assert members_for_budget(10 * per + per // 3, 4, 9, 2, depth=depth, bias=bias) == 10
    assert members_for_budget(1, 4, 9, 2, depth=depth, bias=bias) == 1


def test_ensemble_bad_arguments():
    with pytest.raises(UsageError, match="normalization must be one of"):
        collegial_ensemble(2, 4, 3, normalization="median")
    with pytest.raises(UsageError, match="members must be a positive int"):
        collegial_ensemble(0, 4, 3)
    with pytest.raises(UsageError, match="activation must be one of"):
        collegial_ensemble(2, 4, 3, activation="swish")
    with pytest.raises(UsageError, match=r"k must be an int in \[0, 2\)"):
        collegial_ensemble(2, 4, 3).member(2)
    with pytest.raises(UsageError, match="budget must be a positive int"):
        members_for_budget(0, 4, 3)
