"""``arch.module``: the finite networks of ``telescope.infinite`` descriptions, their
convergence to ``arch.kernel`` as widths grow, and the front door's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import telescope
from telescope import infinite as inf
from telescope.errors import UsageError


def _residual(*branch: inf.Layer) -> inf.Layer:
    return inf.serial(inf.FanOut(2), inf.parallel(inf.serial(*branch), inf.Identity()),
                      inf.FanInSum())


FAMILIES = {
    "fc": (lambda w: inf.serial(inf.Dense(w, 1.5, 0.1), inf.Relu(), inf.Dense(w, 1.5, 0.1),
                                inf.Relu(), inf.Dense(1, 1.5, 0.1)), (5,), (16, 1024)),
    "cnn": (lambda w: inf.serial(inf.Conv(w, (3, 3), padding="same", W_std=1.4, b_std=0.1),
                                 inf.Relu(), inf.Conv(w, (3, 3), padding="circular"), inf.Erf(),
                                 inf.GlobalAvgPool(), inf.Dense(1)), (3, 5, 5), (8, 256)),
    "transformer": (lambda w: inf.serial(
        inf.Dense(w, 1.0, 0.1), _residual(inf.LayerNorm(), inf.SelfAttention(w, w, w, 2)),
        _residual(inf.LayerNorm(), inf.Dense(w, 1.0, 0.1), inf.Relu(), inf.Dense(w, 1.0, 0.1)),
        inf.LayerNorm(), inf.GlobalAvgPool(), inf.Dense(1)), (5, 6), (8, 512)),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_empirical_ntk_converges_to_the_limit(family):
    """The empirical NTK of the finite network (telescope.ntk, structured) approaches the
    infinite-width NTK; its fluctuations shrink like width^-1/2 (measured slopes -0.35 to
    -0.5 over 3 seeds), so 32-64x the width must cut the mean error by well over half."""
    make, shape, (narrow, wide) = FAMILIES[family]
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = make(1).kernel(x)["ntk"]

    def mean_error(width: int) -> float:
        errors = []
        for seed in range(3):
            torch.manual_seed(seed)
            errors.append(_relative(telescope.ntk(make(width).module(shape).double(), x),
                                    target))
        return float(np.mean(errors))

    small, large = mean_error(narrow), mean_error(wide)
    assert large < 0.45 * small, (small, large)
    assert large < 0.15, large


def test_output_covariance_converges_to_the_nngp():
    """Outputs of independently initialized wide networks are samples of the NNGP: their
    covariance over seeds matches arch.kernel within Monte Carlo error."""
    make, shape, _ = FAMILIES["transformer"]
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = make(1).kernel(x)["nngp"]
    samples = 300
    outs = []
    for seed in range(samples):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(make(256).module(shape).double()(x)[:, 0])
    f = torch.stack(outs)                        # [samples, N]
    products = f[:, :, None] * f[:, None, :]     # per-sample outer products
    estimate, sem = products.mean(0), products.std(0) / samples**0.5
    assert torch.all((estimate - target).abs() < 4 * sem + 0.05 * target.abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_module_shapes_and_parametrization(family):
    make, shape, _ = FAMILIES[family]
    net = make(7).module(shape)
    assert net(torch.randn(3, *shape)).shape == (3, 1)
    for name, p in net.named_parameters():   # NTK parametrization: every parameter N(0, 1)
        assert p.dtype == torch.get_default_dtype(), name


def test_module_widths_as_given():
    net = inf.serial(inf.Dense(13), inf.Relu(), inf.Dense(3)).module(5)
    sizes = [tuple(p.shape) for p in net.parameters()]
    assert sizes == [(13, 5), (3, 13)]   # b_std = 0: no bias parameters


def test_identity_is_the_input_covariance_and_branches_add():
    x = torch.randn(4, 3, 5, dtype=torch.float64)      # [N, T, D]
    k = inf.serial(inf.Dense(1, 1.3, 0.4), inf.Identity(), inf.Flatten()).kernel(x)["nngp"]
    by_hand = 1.3**2 * torch.einsum("itd,jtd->ij", x, x) / 5 / 3 + 0.4**2   # mean over t = t'
    torch.testing.assert_close(k, by_hand, rtol=1e-13, atol=1e-14)
    two = inf.serial(inf.Dense(1), inf.FanOut(2), inf.parallel(inf.Dense(2, 1.1), inf.Dense(2)),
                     inf.FanInSum(), inf.Flatten()).kernel(x)
    base = torch.einsum("itd,jtd->ij", x, x) / 5 / 3
    torch.testing.assert_close(two["nngp"], (1.1**2 + 1) * base, rtol=1e-13, atol=1e-14)
    # ntk: 1 (first Dense) * (1.1^2 + 1) + the two branches' own nngp
    torch.testing.assert_close(two["ntk"], 2 * (1.1**2 + 1) * base, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("arch,x,match", [
    (inf.serial(inf.Conv(4, (3, 3)), inf.Dense(1)), torch.randn(2, 3, 5, 5), "last axis"),
    (inf.serial(inf.Dense(4), inf.Conv(4, (3,))), torch.randn(2, 5, 3), r"\[N, C, \*spatial\]"),
    (inf.serial(inf.Dense(4), inf.FanOut(2), inf.parallel(inf.Identity(), inf.Identity()),
                inf.FanInSum()), torch.randn(2, 3), "correlated"),
    (inf.serial(inf.Dense(4), inf.Relu(), inf.LayerNorm(), inf.Dense(1)), torch.randn(2, 3),
     "Gaussian"),
    (inf.serial(inf.Dense(4), inf.FanOut(3), inf.parallel(inf.Dense(1), inf.Dense(1))),
     torch.randn(2, 3), "FanOut"),
    (inf.serial(inf.Dense(4), inf.FanOut(2)), torch.randn(2, 3), "FanInSum"),
    (inf.serial(inf.Dense(4), inf.Relu()), torch.randn(2, 3), None),
    (inf.serial(inf.Relu(), inf.GlobalAvgPool()), torch.randn(2, 3, 4), "layout"),
    (inf.serial(inf.Conv(4, (3, 3)), inf.Relu()), torch.randn(2, 3, 2, 5), "kernel size"),
    (inf.serial(inf.Conv(4, (3, 3)), inf.Relu()), torch.randn(2, 3, 5), "spatial axes"),
    (inf.serial(inf.Dense(4), inf.SelfAttention(4, 4, 4, 1, linear_scaling=False)),
     torch.randn(2, 3, 4), "closed-form"),
])
def test_mistakes_are_refused_with_the_fix(arch, x, match):
    if match is None:   # a flat output of width 4 is fine: [N, N] per channel
        assert arch.kernel(x.double())["ntk"].shape == (2, 2)
        return
    with pytest.raises(UsageError, match=match):
        arch.kernel(x.double())


def test_bad_inputs_and_arguments():
    arch = inf.serial(inf.Dense(4), inf.Relu(), inf.Dense(1))
    with pytest.raises(UsageError, match="same shape"):
        arch.kernel(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(UsageError, match="NaN"):
        arch.kernel(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(UsageError, match="in_shape"):
        arch.module((3, -1))
    with pytest.raises(UsageError, match="block_size"):
        arch.kernel(torch.randn(2, 3), block_size=0)
    with pytest.raises(UsageError, match="not a telescope.infinite layer"):
        inf.serial(inf.Dense(4), torch.nn.ReLU())
    with pytest.raises(UsageError, match="kernel_size"):
        inf.Conv(4, 3)
    with pytest.raises(UsageError, match="W_std"):
        inf.Dense(4, W_std=-1.0)


def test_self_kernel_diagonal_is_exact():
    """On the diagonal of kernel(x) the angle between a point and itself is exactly 0, however
    the input covariances rounded: the ReLU NTK diagonal equals its closed form (a 1e-16
    mismatch between nngp[i, i] and var1[i] once became a 4e-9 error through the angle)."""
    g = torch.Generator().manual_seed(0)
    for n, d in ((40, 16), (7, 3), (64, 100)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        ntk = inf.serial(inf.Dense(1), inf.Relu(), inf.Dense(1)).kernel(x)["ntk"].diagonal()
        k = (x * x).sum(1) / d
        torch.testing.assert_close(ntk, k / 2 + 0.5 * k, rtol=1e-15, atol=0)
