"""telescope.infinite.families: the transformer and MLP families are the descriptions written out
by hand, their finite modules build and run, with_positions appends the one-hot block it says, and
the finite transformer's empirical NTK approaches the family's infinite-width NTK as it widens."""

import pytest
import torch

import telescope
from telescope import infinite as inf
from telescope.errors import UsageError
from telescope.infinite import families


def _by_hand(width, n_heads, mlp_ratio, n_layers):
    def residual(*branch):
        return inf.serial(inf.FanOut(2), inf.parallel(inf.serial(*branch), inf.Identity()),
                          inf.FanInSum())

    head = width // n_heads
    blocks = []
    for _ in range(n_layers):
        blocks += [residual(inf.LayerNorm(), inf.SelfAttention(width, head, head, n_heads,
                                                               linear_scaling=True)),
                   residual(inf.LayerNorm(), inf.Dense(mlp_ratio * width), inf.Relu(),
                            inf.Dense(width))]
    return inf.serial(inf.Dense(width), *blocks, inf.LayerNorm(), inf.GlobalAvgPool(),
                      inf.Dense(1))


def _tokens(n, t=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n_layers, n_heads", [(1, 1), (2, 2)])
def test_transformer_kernel_is_the_description_written_by_hand(n_layers, n_heads):
    x1, x2 = families.with_positions(_tokens(4)), families.with_positions(_tokens(3, seed=1))
    fam = families.transformer(8, n_layers=n_layers, n_heads=n_heads, mlp_ratio=2)
    hand = _by_hand(8, n_heads, 2, n_layers)
    got, want = fam.kernel(x1, x2), hand.kernel(x1, x2)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # the limit does not depend on the width, heads or MLP ratio sizing the finite network
    other = families.transformer(64, n_layers=n_layers, n_heads=4, mlp_ratio=2).kernel(x1, x2)
    torch.testing.assert_close(other["ntk"], got["ntk"], rtol=1e-12, atol=1e-14)


def test_mlp_family_is_the_fully_connected_shortcut():
    x = torch.randn(6, 7, dtype=torch.float64)
    for depth, act in ((1, "relu"), (2, "erf")):
        got = families.mlp([16] * depth, activation=act, W_std=1.3, b_std=0.2).kernel(x)
        want = inf.infinite_ntk(x, depth=depth, activation=act, weight_std=1.3, bias_std=0.2)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)


def test_modules_build_and_run_with_the_right_shapes():
    torch.manual_seed(0)
    x = families.with_positions(_tokens(5, t=6, d=4).float())
    net = families.transformer(8, n_heads=2).module((6, 10))
    assert net(x).shape == (5, 1)
    count = sum(p.numel() for p in net.parameters())
    # embedding 10*8, attention keys/values/out 3 * 8*8, MLP 8*32 + 32*8, readout 8 (no biases)
    assert count == 10 * 8 + 3 * 64 + 2 * 8 * 32 + 8
    mlp = families.mlp([12, 5], out_features=3).module(7)
    assert mlp(torch.randn(4, 7)).shape == (4, 3)


def test_with_positions_appends_a_one_hot_block():
    x = _tokens(3, t=4, d=2)
    out = families.with_positions(x, scale=2.5)
    assert out.shape == (3, 4, 6) and out.dtype == x.dtype
    torch.testing.assert_close(out[..., :2], x)
    expected = 2.5 * torch.eye(4, dtype=x.dtype).expand(3, 4, 4)
    torch.testing.assert_close(out[..., 2:], expected)
    ints = families.with_positions(torch.ones(1, 2, 1, dtype=torch.int64))
    assert ints.dtype == torch.get_default_dtype()


def test_positions_break_the_permutation_invariance_of_the_limit():
    """Without positions the limit cannot tell a sequence from its permutation: the kernel
    between x and x with its tokens permuted equals that of x with itself. With the one-hot
    positions appended to both (the same position block, the contents moved) it can."""
    x = _tokens(3, t=5, d=3)
    perm = x[:, torch.tensor([4, 2, 0, 1, 3])]
    arch = families.transformer(8)
    both = arch.kernel(torch.cat([x, perm]))["ntk"]
    torch.testing.assert_close(both[:3, 3:], both[:3, :3], rtol=1e-8, atol=1e-10)
    pos = arch.kernel(families.with_positions(torch.cat([x, perm])))["ntk"]
    assert (pos[:3, 3:] - pos[:3, :3]).abs().max() > 1e-3 * pos.abs().max()


def test_bad_arguments_are_refused():
    with pytest.raises(UsageError, match="divisible by n_heads"):
        families.transformer(6, n_heads=4)
    with pytest.raises(UsageError, match="activation"):
        families.mlp([4], activation="swish")
    with pytest.raises(UsageError, match="sequence of widths"):
        families.mlp(4)
    with pytest.raises(UsageError, match=r"\[N, T, D\]"):
        families.with_positions(torch.zeros(3, 4))


def _relative_error(width, x, k_inf, seeds=3):
    errs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = families.transformer(width).module(tuple(x.shape[1:])).double()
        k = telescope.ntk(net, x)
        errs.append(float((k - k_inf).norm() / k_inf.norm()))
    return sum(errs) / len(errs)


def test_empirical_ntk_approaches_the_infinite_ntk_as_the_width_grows():
    """At width 256 the finite transformer's NTK at initialization is several times closer to
    the family's infinite-width NTK than at width 8 (Jacot et al. 2018; Hron et al. 2020): the
    relative Frobenius error of a finite-width NTK falls like 1/sqrt(width)."""
    x = families.with_positions(_tokens(6, t=4, d=3))
    k_inf = families.transformer(1).kernel(x)["ntk"]
    narrow, wide = _relative_error(8, x, k_inf), _relative_error(256, x, k_inf)
    assert wide < 0.3 and wide < narrow / 2.5, (narrow, wide)
