"""The convolution pieces of ``telescope.infinite``: the covariance map ``conv_covariance``
(against a loop oracle written from the definition, and against the exact expectation over the
weights of a finite :class:`NTKConv`), the finite layer itself (against ``F.pad`` + ``F.conv``),
its structured-NTK rule (against per-example Jacobians) and the argument checks."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UsageError
from telescope.infinite import _conv
from telescope.infinite._conv import conv_covariance, conv_output_size, same_padding
from telescope.kernels import explain, register_rule, rules
from telescope.kernels.rules import ConvRule
from telescope.models import NTKConv, NTKLinear

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# conv_covariance against the definition
# --------------------------------------------------------------------------------------------


def _oracle(cov: torch.Tensor, batch_ndim: int, ks: tuple[int, ...], st: tuple[int, ...],
            padding: str) -> torch.Tensor:
    """``out[o, o'] = (1/K) sum_delta cov_pad[o s + delta, o' s + delta]`` with explicit loops
    over output positions and filter offsets (pads by hand: XLA's SAME, zeros or wrapped)."""
    sizes = [cov.shape[batch_ndim + 2 * i] for i in range(len(ks))]
    outs, lows = [], []
    for n, k, s in zip(sizes, ks, st, strict=True):
        if padding == "valid":
            outs.append((n - k) // s + 1)
            lows.append(0)
        else:
            out = math.ceil(n / s)
            outs.append(out)
            lows.append(max((out - 1) * s + k - n, 0) // 2)
    lead = cov.shape[:batch_ndim]
    res = torch.zeros(*lead, *[o for o in outs for _ in (0, 1)], dtype=cov.dtype)
    positions = list(itertools.product(*[range(o) for o in outs]))
    for o1 in positions:
        for o2 in positions:
            total = torch.zeros(lead, dtype=cov.dtype)
            for delta in itertools.product(*[range(k) for k in ks]):
                idx: list[int] = []
                inside = True
                for d in range(len(ks)):
                    i = o1[d] * st[d] + delta[d] - lows[d]
                    j = o2[d] * st[d] + delta[d] - lows[d]
                    if padding == "circular":
                        i, j = i % sizes[d], j % sizes[d]
                    elif not (0 <= i < sizes[d] and 0 <= j < sizes[d]):
                        inside = False
                    idx += [i, j]
                if inside:
                    total += cov[(slice(None),) * batch_ndim + tuple(idx)]
            pos = tuple(p for pair in zip(o1, o2, strict=True) for p in pair)
            res[(slice(None),) * batch_ndim + pos] = total / math.prod(ks)
    return res


def _psd_cov(batch_ndim: int, sizes: tuple[int, ...], channels: int = 3) -> torch.Tensor:
    """``sum_c x_c[s] x'_c[s'] / C`` of random inputs: a PSD covariance in the pair layout."""
    n = 3 if batch_ndim == 1 else 2
    x1 = torch.randn(n, channels, *sizes, dtype=F64)
    x2 = x1 if batch_ndim == 1 else torch.randn(n + 1, channels, *sizes, dtype=F64)
    return _input_covariance(x1, x2, batch_ndim)


def _input_covariance(x1: torch.Tensor, x2: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """``[n1, n2, s1, s1', ...]`` (or ``[n, s1, s1', ...]`` of ``x1`` with itself)."""
    d = x1.ndim - 2
    letters = "defghi"[:d]
    primes = "uvwxyz"[:d]
    pairs = "".join(a + b for a, b in zip(letters, primes, strict=True))
    if batch_ndim == 1:
        return torch.einsum(f"nc{letters},nc{primes}->n{pairs}", x1, x1) / x1.shape[1]
    return torch.einsum(f"nc{letters},mc{primes}->nm{pairs}", x1, x2) / x1.shape[1]


CASES = [  # (sizes, kernel_size, stride): odd and even kernels, strides 1 and 2, 1-D/2-D/3-D
    ((7,), (3,), (1,)),
    ((7,), (4,), (2,)),
    ((6,), (2,), (1,)),
    ((3,), (5,), (1,)),            # kernel larger than the input (same/circular pad > size)
    ((5, 4), (3, 2), (1, 1)),
    ((5, 6), (2, 3), (2, 1)),
    ((6, 5), (3, 3), (2, 2)),
    ((4, 5), (2, 2), (1, 1)),      # an even kernel averaged in place (no pad before)
    ((3, 4, 3), (3, 2, 1), (1, 1, 1)),
    ((3, 2, 3), (2, 2, 3), (1, 1, 1)),
    ((4, 3, 3), (2, 3, 2), (2, 1, 2)),
]


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
@pytest.mark.parametrize("batch_ndim", [1, 2])
@pytest.mark.parametrize("padding", ["valid", "same", "circular"])
@pytest.mark.parametrize("sizes, kernel, stride", CASES)
def test_conv_covariance_matches_the_definition(sizes, kernel, stride, padding, batch_ndim,
                                                in_place, monkeypatch):
    if padding == "valid" and any(n < k for n, k in zip(sizes, kernel, strict=True)):
        pytest.skip("a valid convolution needs the input at least as large as the kernel")
    # in_place: every block counts as large, so the stride-1 same/circular axes after the
    # first are averaged in place (the path large blocks take)
    monkeypatch.setattr(_conv, "_IN_PLACE_NUMEL", 0 if in_place else 1 << 60)
    cov = _psd_cov(batch_ndim, sizes)
    before = cov.clone()
    got = conv_covariance(cov, batch_ndim, kernel, stride, padding)
    torch.testing.assert_close(got, _oracle(cov, batch_ndim, kernel, stride, padding),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, before, rtol=0, atol=0)  # the input is left alone
    expected = tuple(conv_output_size(n, k, s, padding)
                     for n, k, s in zip(sizes, kernel, stride, strict=True))
    assert got.shape[batch_ndim::2] == expected


def test_conv_covariance_is_differentiable():
    cov = _psd_cov(2, (5, 5)).requires_grad_(True)
    conv_covariance(cov, 2, (3, 3), 1, "circular").sum().backward()
    assert cov.grad is not None and torch.isfinite(cov.grad).all()
    # each output sums 9 of the 5*5 wrapped entries along a diagonal, each weighted 1/9; in all,
    # every input entry is read once per offset: the gradient of the sum is 1 everywhere
    torch.testing.assert_close(cov.grad, torch.ones_like(cov))


def test_identity_and_lax_same_padding():
    cov = _psd_cov(1, (4, 4))
    assert conv_covariance(cov, 1, (1, 1), 1, "same") is cov
    # lax.padtype_to_pads(SAME): the extra zero of an even total goes after
    assert same_padding(7, 4, 2) == (1, 2)
    assert same_padding(6, 2, 1) == (0, 1)
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(8, 1, 3) == (0, 0)
    assert same_padding(3, 7, 1) == (3, 3)
    assert [conv_output_size(7, 3, 2, p) for p in ("valid", "same", "circular")] == [3, 4, 4]


# --------------------------------------------------------------------------------------------
# the expectation identity: E_W[y(x) y(x')] of a finite NTKConv
# --------------------------------------------------------------------------------------------


def _exact_output_covariance(layer: NTKConv, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``E_theta[y(x1)_o y(x2)_o']`` for ``theta = (W, b) ~ N(0, I)``, output channel 0: ``y``
    is linear in ``theta``, so the expectation is ``sum_i y_{e_i}(x1) y_{e_i}(x2)`` over the
    standard basis ``e_i`` of the parameters (the layer's own forward, its own padding)."""
    params = list(layer.parameters())
    total = None
    with torch.no_grad():
        for p in params:
            for i in range(p[0].numel()):  # the parameters of output channel 0
                for q in params:
                    q.zero_()
                p[0].view(-1)[i] = 1.0
                y1, y2 = layer(x1)[:, 0], layer(x2)[:, 0]
                d = y1.ndim - 1
                outer = y1.reshape(y1.shape[0], 1, *y1.shape[1:], *([1] * d)) * y2.reshape(
                    1, y2.shape[0], *([1] * d), *y2.shape[1:])
                # [n1, n2, o1, o2, ..., o1', o2', ...] -> interleave the pair axes
                order = [0, 1] + [a for i in range(d) for a in (2 + i, 2 + d + i)]
                term = outer.permute(order)
                total = term if total is None else total + term
    assert total is not None
    return total


@pytest.mark.parametrize("padding", ["valid", "same", "circular"])
@pytest.mark.parametrize("sizes, kernel, stride", [((6,), (3,), (2,)), ((5, 4), (2, 3), (2, 1)),
                                                   ((3, 4, 3), (2, 3, 1), (1, 2, 1))])
def test_expectation_over_the_weights_of_a_finite_layer(sizes, kernel, stride, padding):
    w_std, b_std, channels = 1.7, 0.4, 3
    layer = NTKConv(channels, 2, kernel, stride, padding, weight_std=w_std,
                    bias_std=b_std).double()
    x1 = torch.randn(2, channels, *sizes, dtype=F64)
    x2 = torch.randn(3, channels, *sizes, dtype=F64)
    exact = _exact_output_covariance(layer, x1, x2)
    sigma = _input_covariance(x1, x2, 2)
    limit = w_std**2 * conv_covariance(sigma, 2, kernel, stride, padding) + b_std**2
    torch.testing.assert_close(exact, limit, rtol=1e-12, atol=1e-12)
    # a batch's own covariance (batch_ndim=1) is the diagonal of the pair kernel of x with x
    own = w_std**2 * conv_covariance(_input_covariance(x1, x1, 1), 1, kernel, stride,
                                     padding) + b_std**2
    torch.testing.assert_close(own, _exact_output_covariance(layer, x1, x1).diagonal(
        dim1=0, dim2=1).movedim(-1, 0), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# NTKConv: the finite layer
# --------------------------------------------------------------------------------------------


def _wrap(x: torch.Tensor, dim: int, low: int, high: int) -> torch.Tensor:
    n = x.shape[dim]
    idx = torch.tensor([(i - low) % n for i in range(n + low + high)])
    return x.index_select(dim, idx)


@pytest.mark.parametrize("padding", ["valid", "same", "circular"])
def test_ntkconv_2d_against_pad_and_conv2d(padding):
    w_std, b_std = 1.3, 0.7
    layer = NTKConv(3, 4, (4, 3), (2, 1), padding, weight_std=w_std, bias_std=b_std).double()
    x = torch.randn(2, 3, 7, 5, dtype=F64)
    # by hand: height 7, kernel 4, stride 2 -> out 4, total 3*2 + 4 - 7 = 3 -> (1, 2);
    # width 5, kernel 3, stride 1 -> out 5, total 2 -> (1, 1)
    if padding == "same":
        xp = F.pad(x, (1, 1, 1, 2))
    elif padding == "circular":
        xp = _wrap(_wrap(x, 2, 1, 2), 3, 1, 1)
    else:
        xp = x
    scale = w_std / math.sqrt(3 * 4 * 3)
    expected = scale * F.conv2d(xp, layer.weight, stride=(2, 1)) + b_std * layer.bias.view(
        1, -1, 1, 1)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert y.shape[2:] == layer.output_shape((7, 5)) == tuple(
        conv_output_size(n, k, s, padding) for n, k, s in ((7, 4, 2), (5, 3, 1)))
    assert y.shape[2:] == ((2, 3) if padding == "valid" else (4, 5))


def test_ntkconv_same_matches_torch_for_odd_kernels_and_1d_3d():
    x = torch.randn(2, 2, 6, 5, dtype=F64)
    layer = NTKConv(2, 3, (3, 5), padding="same", bias=False).double()
    torch.testing.assert_close(layer(x), layer.weight_scale * F.conv2d(
        x, layer.weight, padding="same"), rtol=1e-12, atol=1e-12)
    x1 = torch.randn(2, 2, 9, dtype=F64)
    conv1 = NTKConv(2, 3, (3,), 2, "valid", bias_std=0.5).double()
    torch.testing.assert_close(conv1(x1), conv1.weight_scale * F.conv1d(
        x1, conv1.weight, stride=2) + 0.5 * conv1.bias.view(1, -1, 1), rtol=1e-12, atol=1e-12)
    x3 = torch.randn(2, 2, 4, 3, 5, dtype=F64)
    conv3 = NTKConv(2, 2, (2, 3, 3), 1, "same", bias=False).double()
    # depth 4, kernel 2: pads (0, 1); height 3 and width 5, kernel 3: pads (1, 1)
    torch.testing.assert_close(conv3(x3), conv3.weight_scale * F.conv3d(
        F.pad(x3, (1, 1, 1, 1, 0, 1)), conv3.weight), rtol=1e-12, atol=1e-12)
    assert conv3(x3).shape == (2, 2, 4, 3, 5)


def test_ntkconv_parametrization():
    layer = NTKConv(5, 8, (3, 2), weight_std=2.0, bias_std=0.1)
    assert layer.weight.shape == (8, 5, 3, 2) and layer.bias.shape == (8,)
    assert layer.weight_scale == pytest.approx(2.0 / math.sqrt(5 * 3 * 2))
    assert NTKConv(5, 8, (3,), bias=False).bias is None
    torch.manual_seed(1)
    big = NTKConv(64, 64, (3, 3))
    assert abs(big.weight.std().item() - 1.0) < 0.02  # N(0, 1), not PyTorch's default init
    assert "padding='valid'" in repr(layer)


# --------------------------------------------------------------------------------------------
# the structured NTK: NTKConv's declared conv rule
# --------------------------------------------------------------------------------------------


def _check_structured(model: nn.Module, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rule that failed its autograd check would warn
        structured = telescope.ntk(model, x, output="full", method="structured")
        df = explain(model, x)
    jac = telescope.ntk(model, x, output="full", method="jacobian")
    torch.testing.assert_close(structured, jac, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(structured, oracle_ntk(model, x, None, "full"), rtol=1e-10,
                               atol=1e-10)
    conv_rows = df[df["module_type"] == "NTKConv"]
    assert len(conv_rows) > 0
    assert set(conv_rows["rule"]) == {"convolution"}, df[["parameter", "rule", "reason"]]


@pytest.mark.parametrize("padding", ["valid", "same", "circular"])
def test_structured_ntk_of_ntkconv_2d(padding):
    model = nn.Sequential(
        NTKConv(2, 3, (3, 2), 1, padding, weight_std=1.4, bias_std=0.3), nn.Tanh(),
        NTKConv(3, 2, (2, 3), (2, 1), padding, weight_std=1.2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 2, 6, 5, dtype=F64)
    model(x)  # materialize the lazy layer
    _check_structured(model, x)


@pytest.mark.parametrize("padding", ["valid", "same", "circular"])
def test_structured_ntk_of_ntkconv_1d(padding):
    length = 9
    conv1 = NTKConv(2, 4, (4,), 1, padding, bias_std=0.5)
    conv2 = NTKConv(4, 3, (3,), 2, padding, weight_std=1.5, bias_std=0.2)
    out = conv2.output_shape(conv1.output_shape((length,)))[0]
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.Tanh(), nn.Flatten(),
                          NTKLinear(3 * out, 2)).double()
    _check_structured(model, torch.randn(5, 2, length, dtype=F64))


def test_structured_ntk_of_ntkconv_3d():
    """3-D patches come from Tensor.unfold along each axis (F.unfold is 2-D only)."""
    model = nn.Sequential(NTKConv(2, 3, (2, 3, 2), (1, 2, 1), "same", bias_std=0.4), nn.Tanh(),
                          NTKConv(3, 2, (2, 2, 2), 1, "circular"), nn.Flatten(),
                          nn.LazyLinear(2)).double()
    x = torch.randn(3, 2, 4, 5, 3, dtype=F64)
    model(x)
    _check_structured(model, x)


def test_conv_rule_on_nn_conv3d_with_dilation():
    """ConvRule covers nn.Conv3d (with dilation and stride) once registered for it."""
    model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                                    dilation=(2, 1, 1), padding_mode="circular"), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, 2, 5, 6, 4, dtype=F64)
    model(x)
    saved = dict(rules._REGISTRY)
    try:
        register_rule(nn.Conv3d, ConvRule())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            k = telescope.ntk(model, x, output="full", method="structured")
            assert set(explain(model, x).set_index("parameter").loc[
                ["0.weight", "0.bias"], "rule"]) == {"convolution"}
        torch.testing.assert_close(k, oracle_ntk(model, x, None, "full"), rtol=1e-10,
                                   atol=1e-10)
    finally:
        rules._REGISTRY.clear()
        rules._REGISTRY.update(saved)
        rules._VERSION[0] += 1


def test_declared_conv_rule():
    rule, name = rules.rule_for(NTKConv(2, 3, (3,)))
    assert isinstance(rule, ConvRule) and name == "convolution"
    assert (rule.weight_scale, rule.bias_scale, rule.pad) == ("weight_scale", "bias_std",
                                                              "pad_input")


# --------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel_size": 3}, "kernel_size must be a tuple of positive ints"),
    ({"kernel_size": (3, 0)}, "kernel_size must be a tuple of positive ints"),
    ({"kernel_size": (3.0,)}, "kernel_size must be a tuple of positive ints"),
    ({"kernel_size": ()}, "kernel_size must be a tuple of positive ints"),
    ({"kernel_size": (2, 2, 2, 2)}, "1, 2 or 3 spatial dimensions"),
    ({"kernel_size": (3, 3), "padding": "full"}, "padding must be one of"),
    ({"kernel_size": (3, 3), "stride": (1, 2, 1)}, "stride .* tuple matching kernel_size"),
    ({"kernel_size": (3, 3), "stride": 0}, "stride"),
    ({"kernel_size": (3,), "stride": (True,)}, "stride"),
])
def test_ntkconv_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        NTKConv(2, 3, **kwargs)


def test_bad_arguments_elsewhere():
    with pytest.raises(UsageError, match="in_channels must be a positive int"):
        NTKConv(0, 3, (3,))
    with pytest.raises(UsageError, match="padding must be one of"):
        conv_output_size(5, 3, 1, "reflect")
    with pytest.raises(UsageError, match="'valid' convolution needs"):
        conv_output_size(2, 3, 1, "valid")
    with pytest.raises(UsageError, match=r"takes \[N, 2, 2 spatial axes\]"):
        NTKConv(2, 3, (3, 3))(torch.randn(1, 2, 5))
    cov = _psd_cov(2, (4, 4))
    with pytest.raises(UsageError, match="batch_ndim must be 1"):
        conv_covariance(cov, 3, (3, 3))
    with pytest.raises(UsageError, match=r"1-D convolution with batch_ndim=2 has 4 axes"):
        conv_covariance(cov, 2, (3,))
    with pytest.raises(UsageError, match="stride"):
        conv_covariance(cov, 2, (3, 3), (1,))
    with pytest.raises(UsageError, match="padding must be one of"):
        conv_covariance(cov, 2, (3, 3), 1, "zeros")
    with pytest.raises(UsageError, match="differ in size"):
        conv_covariance(torch.zeros(2, 2, 4, 3), 2, (3,))
    assert conv_covariance(cov, 2, [3, 3], 1, "SAME").shape == cov.shape  # lists, NT spelling
