"""SigmaReparamLinear, TinyTransformer(sigma_reparam=True), LazyModel and the named hook points
against oracles: torch.linalg.matrix_norm, finite differences, nn.Linear, alpha^2-scaled NTKs,
the linearized model and the transformer's computation written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import telescope
from telescope.errors import UsageError
from telescope.models import MLP, LazyModel, SigmaReparamLinear, TinyTransformer
from telescope.models.hooks import HookPoint, capture, hook_points, run_with_cache

# ------------------------------------------------------------------------------------------
# SigmaReparamLinear
# ------------------------------------------------------------------------------------------


def test_sigma_exact_at_init_and_same_function_as_linear():
    torch.manual_seed(3)
    plain = nn.Linear(7, 5)
    torch.manual_seed(3)
    layer = SigmaReparamLinear(7, 5)
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
    true = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)
    assert float(layer.sigma().detach()) == pytest.approx(float(true), rel=1e-6)
    assert float(layer.gamma.detach()) == pytest.approx(float(true), rel=1e-6)
    x = torch.randn(4, 3, 7)
    torch.testing.assert_close(layer(x), plain(x))
    assert {n for n, _ in layer.named_buffers()} == {"u", "v"}
    assert not layer.u.requires_grad and not layer.v.requires_grad


def test_gamma_init_one_gives_unit_spectral_norm():
    layer = SigmaReparamLinear(6, 9, gamma_init=1.0, bias=False)
    assert layer.bias is None
    w_hat = layer.effective_weight().detach().double()
    assert float(torch.linalg.matrix_norm(w_hat, 2)) == pytest.approx(1.0, rel=1e-5)


def test_power_iteration_tracks_spectral_norm_in_train_mode_only():
    torch.manual_seed(0)
    layer = SigmaReparamLinear(6, 4).double()
    q1, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.copy_(q1 @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2],
                                                        dtype=torch.float64)) @ q2.T)
    layer.reset_power_iteration()
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn(4, 6, dtype=torch.float64))
    x = torch.randn(2, 6, dtype=torch.float64)
    layer.eval()
    u0 = layer.u.clone()
    layer(x)
    assert torch.equal(layer.u, u0)  # eval mode: no update
    layer.train()
    for _ in range(12):
        layer(x)
    assert not torch.equal(layer.u, u0)
    true = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    assert float(layer.sigma().detach()) == pytest.approx(float(true), rel=1e-8)


def test_gradient_matches_finite_differences():
    torch.manual_seed(1)
    layer = SigmaReparamLinear(5, 3).double()
    layer.train()  # functional calls never update u, v, even in train mode
    x = torch.randn(4, 5, dtype=torch.float64)
    u0 = layer.u.clone()

    def f(w, b, g, xx):
        return functional_call(layer, {"weight": w, "bias": b, "gamma": g}, (xx,))

    inputs = tuple(t.detach().clone().requires_grad_(True)
                   for t in (layer.weight, layer.bias, layer.gamma, x))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.equal(layer.u, u0)


def test_sigma_gradient_is_spectral_norm_gradient():
    """d(u^T W v)/dW = u v^T equals the derivative of ||W||_2 at converged u, v."""
    torch.manual_seed(2)
    layer = SigmaReparamLinear(4, 3).double()
    (grad,) = torch.autograd.grad(layer.sigma(), layer.weight)
    w = layer.weight.detach()
    fd = torch.zeros_like(w)
    h = 1e-6
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = torch.zeros_like(w)
            e[i, j] = h
            fd[i, j] = (torch.linalg.matrix_norm(w + e, 2)
                        - torch.linalg.matrix_norm(w - e, 2)) / (2 * h)
    torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)


def test_training_step_updates_gamma_and_weight():
    layer = SigmaReparamLinear(5, 2)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(torch.randn(8, 5)).pow(2).sum()
    loss.backward()
    opt.step()
    for n, p in layer.named_parameters():
        assert not torch.equal(p, before[n]), n


# ------------------------------------------------------------------------------------------
# TinyTransformer(sigma_reparam=True)
# ------------------------------------------------------------------------------------------


def _tiny(seed: int = 0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab=9, d_model=8, n_heads=2, n_layers=2, seq_len=5,
                           out_features=3, mlp_ratio=2, **kw)


def test_sigma_reparam_transformer_structure_and_init():
    plain, sr = _tiny(), _tiny(sigma_reparam=True)
    for block in sr.blocks:
        for lin in (block.attn.query, block.attn.key, block.attn.value, block.attn.out,
                    block.mlp[0], block.mlp[2]):
            assert isinstance(lin, SigmaReparamLinear)
    assert type(sr.head) is nn.Linear
    assert not any(isinstance(m, SigmaReparamLinear) for m in plain.modules())
    x = torch.randint(0, 9, (4, 5))
    torch.testing.assert_close(sr(x), plain(x))
    # the initialization scale alpha gives W_hat = alpha W_0 as for the plain model
    torch.testing.assert_close(_tiny(alpha=0.5, sigma_reparam=True)(x), _tiny(alpha=0.5)(x))


@pytest.mark.parametrize("train", [False, True])
def test_sigma_reparam_transformer_ntk_structured_matches_jacobian(train):
    model = _tiny(sigma_reparam=True).double()
    model.train(train)
    x = torch.randint(0, 9, (5, 5))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    k_jac = telescope.ntk(model, x, method="jacobian", output="full")
    k_str = telescope.ntk(model, x, method="structured", output="full")
    torch.testing.assert_close(k_str, k_jac, rtol=1e-9, atol=1e-9)
    for n, b in model.named_buffers():  # the NTK left the power-iteration state alone
        assert torch.equal(b, buffers[n]), n


def test_sigma_reparam_transformer_trains():
    model = _tiny(sigma_reparam=True)
    x = torch.randint(0, 9, (16, 5))
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for m in model.modules():  # u^T W v <= ||W||_2 for unit u, v: the estimate lags from below
        if isinstance(m, SigmaReparamLinear):
            true = float(torch.linalg.matrix_norm(m.weight.detach(), 2))
            assert 0.5 * true < float(m.sigma().detach()) <= true * (1 + 1e-5)


# ------------------------------------------------------------------------------------------
# LazyModel
# ------------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(3, [16], 2, activation="tanh").double()


def test_lazy_zero_at_init_and_parameters():
    inner = _mlp()
    lazy = LazyModel(inner, alpha=7.0)
    x = torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(lazy(x), torch.zeros(6, 2, dtype=torch.float64))
    assert [n for n, _ in lazy.named_parameters()] == [f"model.{n}" for n, _ in
                                                      inner.named_parameters()]
    assert all(n.startswith("reference.") for n, _ in lazy.named_buffers())
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(0.01)
    out = lazy(x)
    ref = _mlp()  # the same initial parameters
    torch.testing.assert_close(out, 7.0 * (inner(x) - ref(x)))
    loss = out.pow(2).sum()
    assert lazy.scale_loss(loss).item() == pytest.approx(loss.item() / 49.0)
    with pytest.raises(ValueError, match="alpha"):
        LazyModel(inner, alpha=0.0)


def test_lazy_moves_with_to():
    torch.manual_seed(0)
    lazy = LazyModel(nn.Linear(3, 2), alpha=2.0).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert lazy(x).dtype == torch.float64
    assert torch.equal(lazy(x), torch.zeros(4, 2, dtype=torch.float64))
    assert set(lazy.state_dict()) == {"model.weight", "model.bias", "reference.weight",
                                      "reference.bias"}


@pytest.mark.parametrize("method", ["jacobian", "structured"])
def test_lazy_ntk_is_alpha_squared_inner_ntk(method):
    inner = _mlp()
    alpha = 3.0
    lazy = LazyModel(inner, alpha)
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(2):  # at initialization and away from it
        k_lazy = telescope.ntk(lazy, x, method=method, output="full")
        k_inner = telescope.ntk(inner, x, method="jacobian", output="full")
        torch.testing.assert_close(k_lazy, alpha ** 2 * k_inner, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            for p in inner.parameters():
                p.add_(0.1 * torch.randn_like(p))


def test_lazy_transformer_ntk_structured_matches_jacobian():
    lazy = LazyModel(_tiny().double(), alpha=2.0)
    x = torch.randint(0, 9, (4, 5))
    torch.testing.assert_close(telescope.ntk(lazy, x, method="structured"),
                               telescope.ntk(lazy, x, method="jacobian"), rtol=1e-9, atol=1e-9)


def _lazy_vs_linear(alpha: float, steps: int = 60, lr: float = 0.5) -> float:
    """Max gap between the lazy model and the linearized model ``J psi`` along gradient descent
    on the mean squared error (the lazy model on the loss scaled by 1/alpha^2)."""
    inner = _mlp(seed=4)
    lazy = LazyModel(inner, alpha)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    params = dict(inner.named_parameters())
    jac = jacrev(lambda p: functional_call(inner, p, (x,)))({n: t.detach()
                                                            for n, t in params.items()})
    j = torch.cat([jac[n].reshape(16, -1) for n in params], dim=1)  # [N O, P]
    psi = torch.zeros(j.shape[1], dtype=torch.float64)
    opt = torch.optim.SGD(lazy.parameters(), lr=lr)
    gap = 0.0
    for _ in range(steps):
        out = lazy(x)
        loss = lazy.scale_loss(0.5 * (out - y).pow(2).sum(1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        # linearized model: output J psi, gradient descent on the same (unscaled) loss
        resid = (j @ psi).view(8, 2) - y
        psi = psi - lr * j.T @ resid.reshape(-1) / 8
        with torch.no_grad():
            gap = max(gap, float((lazy(x) - (j @ psi).view(8, 2)).abs().max()))
    return gap


def test_lazy_training_approaches_linearized_model():
    gaps = [_lazy_vs_linear(a) for a in (1.0, 10.0, 100.0)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.2 * gaps[1] and gaps[2] < 1e-2


# ------------------------------------------------------------------------------------------
# Named hook points
# ------------------------------------------------------------------------------------------

_ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_pattern", "hook_z")
_BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                "hook_resid_post")


def test_hook_point_names_and_shapes():
    model = _tiny()
    expected = ["hook_embed", "hook_pos_embed"] + [
        f"blocks.{b}.{n}" for b in range(2)
        for n in [f"attn.{a}" for a in _ATTN_HOOKS] + list(_BLOCK_HOOKS)]
    assert sorted(hook_points(model)) == sorted(expected)
    x = torch.randint(0, 9, (3, 4))
    out, cache = run_with_cache(model, x)
    assert set(cache) == set(expected)
    for name, t in cache.items():
        last = name.rsplit(".", 1)[-1]
        if last in ("hook_q", "hook_k", "hook_v", "hook_z"):
            assert t.shape == (3, 2, 4, 4), name       # [N, heads, S, d_head]
        elif last in ("hook_scores", "hook_pattern"):
            assert t.shape == (3, 2, 4, 4), name       # [N, heads, S_q, S_k]
        else:
            assert t.shape == (3, 4, 8), name          # [N, S, d_model]
        assert not t.requires_grad
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    # the tensors are the model's own: written out by hand from the weights
    b0 = model.blocks[0]
    h = model.token_embedding.weight[x] + model.position_embedding.weight[:4]
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], h.detach())
    u = F.layer_norm(h, (8,), b0.ln1.weight, b0.ln1.bias)
    q = (u @ b0.attn.query.weight.T + b0.attn.query.bias).view(3, 4, 2, 4).transpose(1, 2)
    k = (u @ b0.attn.key.weight.T + b0.attn.key.bias).view(3, 4, 2, 4).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], q.detach())
    torch.testing.assert_close(cache["blocks.0.attn.hook_scores"], scores.detach())
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], scores.softmax(-1).detach())
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_mid"],
                               cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"])
    # the model keeps no state: no hooks left, no lens attributes
    assert all(not m._forward_hooks for m in model.modules())
    assert not any(hasattr(b.attn, "record") or hasattr(b.attn, "last_attention")
                   for b in model.blocks)


def test_capture_selects_and_removes_hooks_also_on_error():
    model = _tiny()
    x = torch.randint(0, 9, (2, 5))
    with capture(model, "blocks.1.attn.hook_pattern") as cache:
        model(x)
        assert model.blocks[1].attn.hook_pattern._forward_hooks
    assert list(cache) == ["blocks.1.attn.hook_pattern"]
    with capture(model, lambda n: n.endswith("hook_resid_post")) as cache:
        model(x[:1])
        model(x)                                          # the last call is kept
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert cache["blocks.0.hook_resid_post"].shape[0] == 2
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model) as cache:
            model(x)
            raise RuntimeError("boom")
    assert len(cache) == len(hook_points(model))
    with pytest.raises(UsageError, match="seq_len"):          # an error inside the forward pass
        with capture(model):
            model(torch.randint(0, 9, (2, 7)))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(UsageError, match="no hook point named 'blocks.2.attn.hook_pattern'"):
        with capture(model, ["blocks.0.attn.hook_pattern", "blocks.2.attn.hook_pattern"]):
            pass
    assert all(not m._forward_hooks for m in model.modules())
    # detach=False keeps the graph: gradients flow to the weights through the cached tensor
    _, cache = run_with_cache(model, x, names=["blocks.0.attn.hook_pattern"], detach=False)
    cache["blocks.0.attn.hook_pattern"].sum().backward()
    assert model.blocks[0].attn.query.weight.grad is not None


def test_hook_point_is_identity_under_vmap_and_functional_call():
    point = HookPoint()
    x = torch.randn(3, 4)
    assert point(x) is x
    model = _tiny().double()
    x = torch.randint(0, 9, (3, 5))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    batched = torch.func.vmap(one, in_dims=(None, 0))(params, x)
    torch.testing.assert_close(batched, model(x), rtol=1e-12, atol=1e-12)
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    assert set(jac) == set(params)


def test_head_weights_are_the_per_head_blocks_of_the_projections():
    for sigma_reparam in (False, True):
        attn = _tiny(sigma_reparam=sigma_reparam).blocks[0].attn
        wq, wk, wv, wo = attn.head_weights()
        assert wq.shape == wk.shape == wv.shape == (2, 4, 8) and wo.shape == (2, 8, 4)
        full = {n: (getattr(attn, n).effective_weight() if sigma_reparam
                    else getattr(attn, n).weight) for n in ("query", "key", "value", "out")}
        for h in range(2):
            rows = slice(4 * h, 4 * h + 4)
            torch.testing.assert_close(wq[h], full["query"][rows], rtol=0, atol=0)
            torch.testing.assert_close(wk[h], full["key"][rows], rtol=0, atol=0)
            torch.testing.assert_close(wv[h], full["value"][rows], rtol=0, atol=0)
            torch.testing.assert_close(wo[h], full["out"][:, rows], rtol=0, atol=0)
