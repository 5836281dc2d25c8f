"""Infinite-width self-attention (Hron et al. 2020; neural-tangents' ``GlobalSelfAttention``):
``attention_covariances`` against explicit loops, exact expectations and Monte Carlo over the
finite ``NTKSelfAttention``, the finite layer against the formula, its structured NTK, errors, and
neural-tangents' stored numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import telescope
from telescope.errors import UsageError
from telescope.infinite._attention import attention_covariances, attention_weights
from telescope.kernels import explain
from telescope.models import NTKSelfAttention

MECHANISMS = ("softmax", "identity", "relu", "abs")
FIXTURES = Path(__file__).parent / "fixtures" / "neural_tangents"

# ----------------------------------------------------------------------------- helpers


def _x(n: int, t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64)


def _input_covariances(x1: torch.Tensor, x2: torch.Tensor | None = None):
    """``(nngp, var1, var2)`` of raw inputs: ``x_s . x'_s' / d`` per pair of tokens."""
    d = x1.shape[-1]
    x2_ = x1 if x2 is None else x2
    nngp = torch.einsum("isc,juc->ijsu", x1, x2_) / d
    var1 = torch.einsum("isc,iuc->isu", x1, x1) / d
    var2 = var1 if x2 is None else torch.einsum("isc,iuc->isu", x2, x2) / d
    return nngp, var1, var2


def _random_state(n1: int, n2: int, t: int, seed: int):
    """Covariances of a pair of batches as after some earlier layers (a random NTK too)."""
    x1, x2 = _x(n1, t, 4, seed), _x(n2, t, 4, seed + 1)
    nngp, var1, var2 = _input_covariances(x1, x2)
    y1, y2 = _x(n1, t, 3, seed + 2), _x(n2, t, 3, seed + 3)
    ntk = 0.7 * nngp + torch.einsum("isc,juc->ijsu", y1, y2) / 3
    return nngp, ntk, var1, var2


def _oracle_weights(var: list, qk: float, mechanism: str) -> list:
    """G[i][t][s] by hand."""
    out = []
    for vi in var:
        rows = []
        for row in vi:
            logits = [qk * v for v in row]
            if mechanism == "softmax":
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                rows.append([v / sum(e) for v in e])
            elif mechanism == "relu":
                rows.append([max(v, 0.0) for v in logits])
            elif mechanism == "abs":
                rows.append([abs(v) for v in logits])
            else:
                rows.append(logits)
        out.append(rows)
    return out


def _oracle_linear(nngp, ntk, var1, var2, *, qk, ov, b, mechanism):
    """Linear-scaling attention with explicit loops over (i, j, t, t', s, s')."""
    nngp, ntk, var1, var2 = (m.tolist() for m in (nngp, ntk, var1, var2))
    g1, g2 = _oracle_weights(var1, qk, mechanism), _oracle_weights(var2, qk, mechanism)
    n1, n2, t = len(nngp), len(nngp[0]), len(nngp[0][0])

    def sandwich(a, mat, c):
        return [[sum(a[u][s] * mat[s][r] * c[w][r] for s in range(t) for r in range(t))
                 for w in range(t)] for u in range(t)]

    out_nngp = np.zeros((n1, n2, t, t))
    out_ntk = np.zeros((n1, n2, t, t))
    for i in range(n1):
        for j in range(n2):
            k = np.array(sandwich(g1[i], nngp[i][j], g2[j]))
            th = np.array(sandwich(g1[i], ntk[i][j], g2[j]))
            out_nngp[i, j] = ov**2 * k + b**2
            out_ntk[i, j] = ov**2 * th + b**2 + 2 * (out_nngp[i, j] - b**2)
    own1 = np.array([ov**2 * np.array(sandwich(g1[i], var1[i], g1[i])) + b**2
                     for i in range(n1)])
    own2 = np.array([ov**2 * np.array(sandwich(g2[j], var2[j], g2[j])) + b**2
                     for j in range(n2)])
    return out_nngp, out_ntk, own1, own2


def _oracle_identity_sqrt(nngp, ntk, var1, var2, *, qk, ov, b):
    """Square-root-scaling identity attention with explicit loops."""
    nngp, ntk, var1, var2 = (m.tolist() for m in (nngp, ntk, var1, var2))
    n1, n2, t = len(nngp), len(nngp[0]), len(nngp[0][0])
    c = (qk * ov) ** 2
    out_nngp = np.zeros((n1, n2, t, t))
    out_ntk = np.zeros((n1, n2, t, t))
    for i in range(n1):
        for j in range(n2):
            kk = sum(nngp[i][j][s][r] ** 2 for s in range(t) for r in range(t))
            kt = sum(nngp[i][j][s][r] * ntk[i][j][s][r] for s in range(t) for r in range(t))
            for u in range(t):
                for w in range(t):
                    k, th = nngp[i][j][u][w], ntk[i][j][u][w]
                    out_nngp[i, j, u, w] = c * kk * k + b**2
                    out_ntk[i, j, u, w] = c * (2 * kt * k + kk * (th + 4 * k)) + b**2

    def own(var):
        res = np.zeros((len(var), t, t))
        for i, v in enumerate(var):
            vv = sum(v[s][r] ** 2 for s in range(t) for r in range(t))
            for u in range(t):
                for w in range(t):
                    res[i, u, w] = c * vv * v[u][w] + b**2
        return res

    return out_nngp, out_ntk, own(var1), own(var2)


def _nt_weights(m: NTKSelfAttention) -> dict[str, torch.Tensor | None]:
    """The module's parameters in neural-tangents' shapes."""
    h, k, v = m.n_heads, m.key_features, m.value_features

    def per_head(w: torch.Tensor, size: int) -> torch.Tensor:  # [h * size, d] -> [h, d, size]
        return w.detach().reshape(h, size, -1).transpose(1, 2)

    return {"K": per_head(m.keys.weight, k),
            "Q": None if m.queries is None else per_head(m.queries.weight, k),
            "V": per_head(m.values.weight, v),
            "W_out": m.out.weight.detach().T,  # [v * h, out], value-major rows
            "b": None if m.out.bias is None else m.out.bias.detach()}


def _reference_forward(m: NTKSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """neural-tangents' apply_fn written out, one head at a time."""
    w = _nt_weights(m)
    n, t, d = x.shape
    heads = []
    for h in range(m.n_heads):
        keys = x @ w["K"][h]
        queries = keys if w["Q"] is None else x @ w["Q"][h]
        logits = queries @ keys.transpose(1, 2)
        logits = logits * m.qk_std / (d * m.key_features ** (1 if m.linear_scaling else 0.5))
        if m.mechanism == "softmax":
            att = torch.softmax(logits, dim=-1)
        elif m.mechanism == "relu":
            att = torch.relu(logits)
        elif m.mechanism == "abs":
            att = logits.abs()
        else:
            att = logits
        heads.append(att @ (x @ w["V"][h]))  # [n, t, v]
    cat = torch.zeros(n, t, m.value_features * m.n_heads, dtype=x.dtype)
    for h in range(m.n_heads):
        for v in range(m.value_features):
            cat[..., v * m.n_heads + h] = heads[h][..., v]
    out = cat @ w["W_out"] * m.ov_std / math.sqrt(m.value_features * m.n_heads * d)
    if w["b"] is not None:
        out = out + m.b_std * w["b"]
    return out


# ----------------------------------------------------------------------------- (a) the formulas


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_linear_scaling_matches_loops(mechanism):
    nngp, ntk, var1, var2 = _random_state(2, 3, 3, seed=1)
    kw = {"qk_std": 1.3, "ov_std": 0.9, "b_std": 0.2}
    got = attention_covariances(nngp, ntk, var1, var2, mechanism=mechanism,
                                linear_scaling=True, **kw)
    want = _oracle_linear(nngp, ntk, var1, var2, qk=1.3, ov=0.9, b=0.2, mechanism=mechanism)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-12, atol=1e-12)


def test_identity_square_root_scaling_matches_loops():
    nngp, ntk, var1, var2 = _random_state(2, 3, 3, seed=2)
    got = attention_covariances(nngp, ntk, var1, var2, qk_std=1.1, ov_std=0.8, b_std=0.3,
                                mechanism="identity", linear_scaling=False)
    want = _oracle_identity_sqrt(nngp, ntk, var1, var2, qk=1.1, ov=0.8, b=0.3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism,linear", [(m, True) for m in MECHANISMS] +
                         [("identity", False)])
def test_symmetric_inputs(mechanism, linear):
    x = _x(3, 4, 5, seed=3)
    nngp, var1, var2 = _input_covariances(x)
    assert var2 is var1
    kw = {"qk_std": 0.9, "ov_std": 1.2, "b_std": 0.1, "mechanism": mechanism,
          "linear_scaling": linear}
    out = attention_covariances(nngp, 0.5 * nngp, var1, var1, **kw)
    assert out[3] is out[2]
    apart = attention_covariances(nngp, 0.5 * nngp, var1, var1.clone(), **kw)
    for a, b in zip(out, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # the diagonal blocks of the pair covariances are the own covariances
    diag = out[0].diagonal(dim1=0, dim2=1).movedim(-1, 0)
    torch.testing.assert_close(diag, out[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], out[0].permute(1, 0, 3, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linear", [True, False])
def test_several_spatial_axes_are_flattened_tokens(linear):
    """Interleaved pair axes [n1, n2, s1, s1', s2, s2'] = tokens s1 * 3 + s2 (neural-tangents
    flattens all spatial axes)."""
    x1, x2 = _x(2, 6, 4, seed=4), _x(3, 6, 4, seed=5)
    flat = _input_covariances(x1, x2)
    kw = {"qk_std": 1.0, "ov_std": 1.0, "b_std": 0.2, "mechanism": "softmax" if linear else
          "identity", "linear_scaling": linear}
    want = attention_covariances(flat[0], 2 * flat[0], flat[1], flat[2], **kw)

    def split(mat: torch.Tensor, batch: int) -> torch.Tensor:  # [.., 6, 6] -> [.., 2, 2, 3, 3]
        mat = mat.reshape(*mat.shape[:batch], 2, 3, 2, 3)
        return mat.permute(*range(batch), batch, batch + 2, batch + 1, batch + 3)

    nngp, var1, var2 = split(flat[0], 2), split(flat[1], 1), split(flat[2], 1)
    got = attention_covariances(nngp, 2 * nngp, var1, var2, **kw)
    for g, w, batch in zip(got, want, (2, 2, 1, 1), strict=True):
        torch.testing.assert_close(g, split(w, batch), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- (b) expectations


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_value_path_exact_expectation(mechanism):
    """With the attention matrix fixed to its limit G, the exact expectation over W_V, W_out
    and b of the finite layer's output covariance equals the NNGP formula on X X'^T / d.

    The output is bilinear in (W_V, W_out) plus b_std b, all independent standard normals, so
    E[y(x) y(x')] = sum over basis vectors (e_k, e_l) of y(x; e_k, e_l) y(x'; e_k, e_l)
    + b_std^2: evaluated here through the module itself."""
    d, t, heads, val, out = 3, 3, 2, 2, 2
    m = NTKSelfAttention(d, out, 4, val, heads, W_value_std=0.8, W_out_std=1.3, b_std=0.4,
                         W_key_std=1.1, W_query_std=0.9, mechanism=mechanism).double()
    x1, x2 = _x(2, t, d, seed=6), _x(3, t, d, seed=7)
    nngp, var1, var2 = _input_covariances(x1, x2)
    g1 = attention_weights(var1, qk_std=m.qk_std, mechanism=mechanism)[:, None]
    g2 = attention_weights(var2, qk_std=m.qk_std, mechanism=mechanism)[:, None]

    expect12 = torch.zeros(2, 3, t, t, out, out, dtype=torch.float64)
    expect11 = torch.zeros(2, t, t, out, out, dtype=torch.float64)
    wv, wo = m.values.weight, m.out.weight
    with torch.no_grad():
        m.out.bias.zero_()
        for k in range(wv.numel()):
            wv.zero_()
            wv.view(-1)[k] = 1.0
            for index in range(wo.numel()):
                wo.zero_()
                wo.view(-1)[index] = 1.0
                y1, y2 = m.mix(x1, g1), m.mix(x2, g2)  # [n, t, out]
                expect12 += torch.einsum("isa,jub->ijsuab", y1, y2)
                expect11 += torch.einsum("isa,iub->isuab", y1, y1)
    eye = torch.eye(out, dtype=torch.float64)
    expect12 += m.b_std**2 * eye
    expect11 += m.b_std**2 * eye

    k12, _, k11, _ = attention_covariances(nngp, nngp, var1, var2, qk_std=m.qk_std,
                                           ov_std=m.ov_std, b_std=m.b_std, mechanism=mechanism,
                                           linear_scaling=True)
    torch.testing.assert_close(expect12, k12[..., None, None] * eye, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expect11, k11[..., None, None] * eye, rtol=1e-12, atol=1e-12)


def test_attention_weights_concentrate():
    """The finite attention matrix of every head approaches G(x) as key_features grows."""
    x = _x(2, 4, 5, seed=8)
    _, var, _ = _input_covariances(x)
    m = NTKSelfAttention(5, 1, 40000, 1, 2, W_key_std=1.2, W_query_std=0.9).double()
    with torch.no_grad():
        finite = m.attention_weights(x)
    limit = attention_weights(var, qk_std=m.qk_std, mechanism="softmax")
    assert finite.shape == (2, 2, 4, 4)
    assert (finite - limit[:, None]).abs().max() < 0.02


def _monte_carlo(make, x1: torch.Tensor, x2: torch.Tensor, seeds: int, ntk_seeds: int = 0):
    """Mean and standard error over initializations of the per-channel output covariance
    ``mean_o y_o(x1)[t] y_o(x2)[t']`` (and, over the first ``ntk_seeds``, of the empirical NTK
    averaged over o = o')."""
    n1, n2 = x1.shape[0], x2.shape[0]
    samples, ntk_samples = [], []
    m = make().double()
    g = torch.Generator().manual_seed(0)
    for seed in range(seeds):
        with torch.no_grad():
            for p in m.parameters():  # a fresh initialization: every parameter i.i.d. N(0, 1)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            y1, y2 = m(x1), m(x2)
        samples.append(torch.einsum("isa,jua->ijsu", y1, y2) / y1.shape[-1])
        if seed < ntk_seeds:
            full = telescope.ntk(m, x1, x2, method="structured", output="full")
            t, o = y1.shape[1], y1.shape[2]
            full = full.reshape(n1, n2, t, o, t, o).diagonal(dim1=3, dim2=5).mean(-1)
            ntk_samples.append(full)

    def stats(s):
        s = torch.stack(s)
        return s.mean(0), s.std(0) / math.sqrt(len(s))

    return stats(samples), (stats(ntk_samples) if ntk_samples else None)


@pytest.mark.parametrize("mechanism,linear,seeds", [("softmax", True, 2000),
                                                    ("identity", False, 1500)])
def test_monte_carlo_output_covariance(mechanism, linear, seeds):
    """The output covariance of NTKSelfAttention over initializations approaches the kernel:
    within 5 Monte Carlo standard errors, plus (linear scaling) the O(qk^2 / key_features) bias
    of a finite key width. With square-root scaling and the identity, the expectation is exact
    at any width."""
    d, t, key = 6, 4, 512 if linear else 64
    x1, x2 = _x(2, t, d, seed=9), _x(2, t, d, seed=10)
    kw = {"W_key_std": 1.2, "W_query_std": 0.9, "W_value_std": 1.1, "W_out_std": 0.9,
          "b_std": 0.3}

    def make() -> NTKSelfAttention:
        return NTKSelfAttention(d, 16, key, 16, 4, linear_scaling=linear, mechanism=mechanism,
                                **kw)

    (mean, se), ntk_stats = _monte_carlo(make, x1, x2, seeds, 0 if linear else 200)
    nngp, var1, var2 = _input_covariances(x1, x2)
    k, theta, _, _ = attention_covariances(
        nngp, torch.zeros_like(nngp), var1, var2, qk_std=1.2 * 0.9, ov_std=1.1 * 0.9,
        b_std=0.3, mechanism=mechanism, linear_scaling=linear)
    bias = 2 * (1.2 * 0.9) ** 2 / key * k.abs().max() if linear else 0.0
    assert ((mean - k).abs() <= 5 * se + bias).all(), ((mean - k) / se).abs().max()
    if ntk_stats is not None:
        # the empirical NTK is also unbiased here: 4 <K, K> K from W_Q, W_K, W_V and W_out
        (ntk_mean, ntk_se) = ntk_stats
        assert ((ntk_mean - theta).abs() <= 5 * ntk_se).all(), ((ntk_mean - theta) /
                                                                 ntk_se).abs().max()


def test_wide_empirical_ntk_approaches_the_limit():
    """Linear scaling: one wide network's NTK (no seed average) is close to the limit. Split by
    parameter: the value and output weights give ov^2 G K G^T each (the ``2 (K' - b^2)``), the
    bias b^2, and the tied key weights' share is O(1 / key_features), gone in the limit."""
    d, t, out = 6, 4, 2
    x1, x2 = _x(2, t, d, seed=11), _x(2, t, d, seed=12)
    nngp, var1, var2 = _input_covariances(x1, x2)
    k, theta, _, _ = attention_covariances(nngp, torch.zeros_like(nngp), var1, var2,
                                           qk_std=1.0, ov_std=1.0, b_std=0.2,
                                           mechanism="softmax", linear_scaling=True)
    torch.manual_seed(0)
    m = NTKSelfAttention(d, out, 2048, 512, 8, b_std=0.2).double()

    def part(params: str | None) -> torch.Tensor:
        full = telescope.ntk(m, x1, x2, method="structured", output="full", params=params)
        return full.reshape(2, 2, t, out, t, out).diagonal(dim1=3, dim2=5).mean(-1)

    scale = theta.abs().max()
    assert (part(None) - theta).abs().max() < 0.03 * scale
    for name in ("values.weight", "out.weight"):
        assert (part(name) - (k - 0.2**2)).abs().max() < 0.03 * scale
    torch.testing.assert_close(part("out.bias"), torch.full_like(k, 0.2**2))
    assert part("keys.weight").abs().max() < 0.002 * scale


# ----------------------------------------------------------------------------- (c) the finite layer


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("linear", [True, False])
def test_forward_matches_per_head_formula(mechanism, linear):
    m = NTKSelfAttention(5, 3, 4, 2, 3, linear_scaling=linear, W_key_std=1.2, W_value_std=0.7,
                         W_query_std=0.8, W_out_std=1.5, b_std=0.25,
                         mechanism=mechanism).double()
    x = _x(4, 6, 5, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference_forward(m, x), rtol=1e-12, atol=1e-12)


def test_parameters_are_neural_tangents_ones():
    d, out, key, val, heads = 5, 3, 4, 2, 3
    tied = NTKSelfAttention(d, out, key, val, heads)
    assert tied.out.bias is None  # b_std = 0: no bias, as neural-tangents' b_std=None
    assert sum(p.numel() for p in tied.parameters()) == heads * d * (key + val) + val * heads * out
    free = NTKSelfAttention(d, out, key, val, heads, linear_scaling=False, b_std=0.1)
    assert sum(p.numel() for p in free.parameters()) == (
        heads * d * (2 * key + val) + val * heads * out + out)
    big = NTKSelfAttention(64, 64, 64, 64, 4, linear_scaling=False, b_std=1.0)
    for p in big.parameters():
        if p.numel() > 1000:  # every parameter is i.i.d. N(0, 1)
            assert abs(p.mean().item()) < 0.05 and abs(p.std().item() - 1) < 0.05


def test_batched_leading_axes_and_bad_inputs():
    m = NTKSelfAttention(5, 3, 4, 2, 3).double()
    x = _x(4, 6, 5, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(m(x[1]), m(x)[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(UsageError, match=r"\[N, T, 5\]"):
        m(torch.zeros(2, 6, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- (d) structured NTK


@pytest.mark.parametrize("linear,mechanism", [(True, "softmax"), (False, "softmax"),
                                              (True, "relu")])
def test_structured_ntk_equals_jacobian(linear, mechanism):
    m = NTKSelfAttention(4, 2, 3, 2, 2, linear_scaling=linear, b_std=0.3, W_out_std=1.2,
                         W_key_std=1.4, mechanism=mechanism).double()
    x = _x(3, 5, 4, seed=15)
    structured = telescope.ntk(m, x, method="structured", output="full")
    jacobian = telescope.ntk(m, x, method="jacobian", output="full")
    torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-10)
    plan = explain(m, x)
    assert (plan["rule"] != "per-example Jacobian").all(), plan
    assert plan["numel"].sum() == sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- (e) errors


@pytest.mark.parametrize("mechanism", ["softmax", "relu", "abs"])
def test_square_root_scaling_without_closed_form_raises(mechanism):
    nngp, ntk, var1, var2 = _random_state(2, 2, 3, seed=16)
    with pytest.raises(UsageError, match="linear_scaling=True") as err:
        attention_covariances(nngp, ntk, var1, var2, qk_std=1.0, ov_std=1.0, b_std=0.0,
                              mechanism=mechanism, linear_scaling=False)
    assert "mechanism='identity'" in str(err.value) and mechanism in str(err.value)


def test_bad_kernel_arguments_raise():
    nngp, ntk, var1, var2 = _random_state(2, 2, 3, seed=17)
    ok = {"qk_std": 1.0, "ov_std": 1.0, "b_std": 0.0, "mechanism": "softmax",
          "linear_scaling": True}
    for change, match in (({"mechanism": "tanh"}, "mechanism must be one of"),
                          ({"ov_std": -1.0}, "ov_std"), ({"b_std": float("nan")}, "b_std"),
                          ({"qk_std": "1"}, "qk_std"), ({"linear_scaling": 1}, "bool")):
        with pytest.raises(UsageError, match=match):
            attention_covariances(nngp, ntk, var1, var2, **{**ok, **change})
    with pytest.raises(UsageError, match="var2"):
        attention_covariances(nngp, ntk, var1, var2[:1], **ok)
    with pytest.raises(UsageError, match="token axes"):
        attention_covariances(nngp[..., 0, 0], ntk[..., 0, 0], var1[:, 0, 0], var2[:, 0, 0],
                              **ok)
    with pytest.raises(UsageError, match="var must be"):
        attention_weights(var1[0], qk_std=1.0, mechanism="softmax")


@pytest.mark.parametrize("change,match", [
    ({"n_heads": 0}, "n_heads"), ({"key_features": 2.5}, "key_features"),
    ({"mechanism": "tanh"}, "mechanism"), ({"W_key_std": -1.0}, "W_key_std"),
    ({"b_std": float("inf")}, "b_std"), ({"linear_scaling": "yes"}, "linear_scaling"),
])
def test_bad_module_arguments_raise(change, match):
    kw = {"in_features": 4, "out_features": 2, "key_features": 3, "value_features": 2,
          "n_heads": 2}
    with pytest.raises(UsageError, match=match):
        NTKSelfAttention(**{**kw, **change})


# ----------------------------------------------------------------------------- neural-tangents


@pytest.mark.parametrize("case,mechanism,linear", [
    ("attn_softmax", "softmax", True), ("attn_identity_linear", "identity", True),
    ("attn_relu_linear", "relu", True), ("attn_abs_linear", "abs", True),
    ("attn_identity_sqrt", "identity", False),
])
def test_neural_tangents_numbers(case, mechanism, linear):
    """Dense(64) -> GlobalSelfAttention(..., W_key_std=1.2, W_value_std=1.1, W_query_std=0.9,
    b_std=0.1) -> GlobalAvgPool -> Dense(1), the covariances carried by hand."""
    path = FIXTURES / f"{case}.npz"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    ref = np.load(path)
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    nngp, var1, var2 = _input_covariances(x1, x2)
    ntk = nngp.clone()  # Dense(64, 1, 0) on the inputs: K' = K, Theta' = K' + 0
    k, theta, _, _ = attention_covariances(nngp, ntk, var1, var2, qk_std=1.2 * 0.9,
                                           ov_std=1.1, b_std=0.1, mechanism=mechanism,
                                           linear_scaling=linear)
    k, theta = k.mean((-2, -1)), theta.mean((-2, -1))  # GlobalAvgPool
    np.testing.assert_allclose(k.numpy(), ref["nngp"], rtol=1e-12, atol=1e-13)  # Dense(1)
    np.testing.assert_allclose((k + theta).numpy(), ref["ntk"], rtol=1e-12, atol=1e-13)
