"""lowrank_ntk against an exact NTK built with a per-example torch.autograd.grad loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from telescope.kernels._functional import UnsupportedModelError
from telescope.kernels.lowrank import lowrank_ntk


def _mlp(widths: tuple[int, ...], seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _exact_kernels(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent oracle: J row by row with torch.autograd.grad; returns (K_full, K_trace)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        out = model(x[n : n + 1]).reshape(-1)
        for o in range(out.numel()):
            grads = torch.autograd.grad(out[o], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).detach()
    n, n_out = x.shape[0], jac.shape[0] // x.shape[0]
    k_full = jac @ jac.T
    k_trace = k_full.reshape(n, n_out, n, n_out).diagonal(dim1=1, dim2=3).sum(-1)
    return k_full, k_trace


def _top_eig(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(k)
    return evals.flip(0), evecs.flip(1)


@pytest.fixture(scope="module")
def setup():
    model = _mlp((8, 32, 32, 3))
    torch.manual_seed(1)
    x = torch.randn(30, 8, dtype=torch.float64)
    k_full, k_trace = _exact_kernels(model, x)
    return model, x, {"full": k_full, "trace": k_trace}


@pytest.mark.parametrize("method", ["structured", "vector"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_exact_when_subspace_is_everything(setup, output, method):
    model, x, kernels = setup
    k = kernels[output]
    m = k.shape[0]
    u, s = lowrank_ntk(model, x, m, oversample=0, n_iter=0, output=output, method=method)
    assert u.shape == (m, m) and s.shape == (m,)
    assert u.dtype == torch.float64 and s.dtype == torch.float64
    evals, _ = _top_eig(k)
    torch.testing.assert_close(s, evals.clamp_min(0), rtol=1e-9, atol=1e-9 * evals[0].item())
    torch.testing.assert_close(u @ torch.diag(s) @ u.T, k, rtol=1e-8, atol=1e-9 * evals[0].item())
    torch.testing.assert_close(u.T @ u, torch.eye(m, dtype=u.dtype), rtol=0, atol=1e-10)
    assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("method", ["structured", "vector"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_top_eigenpairs_with_power_iterations(setup, output, method):
    model, x, kernels = setup
    evals, evecs = _top_eig(kernels[output])
    rank = 5
    u, s = lowrank_ntk(model, x, rank, oversample=5, n_iter=10, output=output, method=method)
    assert u.shape == (kernels[output].shape[0], rank)
    rel = (s - evals[:rank]).abs() / evals[:rank]
    assert rel.max() < 1e-6
    # eigenvalues here are well separated (ratio <= 0.93), so eigenvectors match up to sign
    dots = (u.T @ evecs[:, :rank]).diagonal().abs()
    assert torch.all((dots - 1).abs() < 1e-6)
    # sign convention: the entry of largest magnitude is positive
    assert torch.all(u[u.abs().argmax(0), torch.arange(rank)] > 0)


def test_exact_when_rank_at_least_true_rank():
    # P = 3*2 + 2 + 2*2 + 2 = 14 parameters: both kernels have rank <= 14 < N*O = 40
    model = _mlp((3, 2, 2), seed=3)
    torch.manual_seed(4)
    x = torch.randn(20, 3, dtype=torch.float64)
    k_full, k_trace = _exact_kernels(model, x)
    for output, k in (("full", k_full), ("trace", k_trace)):
        u, s = lowrank_ntk(model, x, 14, oversample=0, n_iter=0, output=output)
        evals, _ = _top_eig(k)
        scale = evals[0].item()
        torch.testing.assert_close(s, evals[:14].clamp_min(0), rtol=1e-6, atol=1e-10 * scale)
        torch.testing.assert_close(u @ torch.diag(s) @ u.T, k, rtol=0, atol=1e-9 * scale)


def test_scalar_output_trace_equals_full():
    model = _mlp((4, 16, 1), seed=5)
    x = torch.randn(10, 4, dtype=torch.float64)
    u1, s1 = lowrank_ntk(model, x, 4, output="trace")
    u2, s2 = lowrank_ntk(model, x, 4, output="full")
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(u1, u2)


def test_blocking_and_chunking_agree(setup):
    model, x, _ = setup
    x = x[:12]
    ref_u, ref_s = lowrank_ntk(model, x, 3, oversample=2, n_iter=1, output="trace")
    # a tiny memory budget forces one column per chunk; block_size=5 leaves a ragged last block
    u, s = lowrank_ntk(model, x, 3, oversample=2, n_iter=1, output="trace", block_size=5,
                       max_memory_gb=1e-6)
    torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=0)
    torch.testing.assert_close(u, ref_u, rtol=1e-8, atol=1e-10)
    u, s = lowrank_ntk(model, x[:4], 12, oversample=0, n_iter=0, output="full", block_size=3,
                       max_memory_gb=1e-6)
    small_full, _ = _exact_kernels(model, x[:4])
    torch.testing.assert_close(u @ torch.diag(s) @ u.T, small_full, rtol=1e-8, atol=1e-8)


def test_deterministic_by_seed(setup):
    model, x, _ = setup
    a = lowrank_ntk(model, x, 3, oversample=2, n_iter=0, seed=7)
    b = lowrank_ntk(model, x, 3, oversample=2, n_iter=0, seed=7)
    c = lowrank_ntk(model, x, 3, oversample=2, n_iter=0, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_model_left_unchanged():
    model = _mlp((8, 32, 32, 3), seed=2)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: (None if p.grad is None else p.grad.clone())
                    for n, p in model.named_parameters()}
    x = torch.randn(9, 8, dtype=torch.float64)
    with torch.no_grad():  # works under no_grad too
        u, s = lowrank_ntk(model, x, 4, output="full")
    assert not u.requires_grad and not s.requires_grad
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for n, p in model.named_parameters():
        if grads_before[n] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads_before[n])
    assert not model[2].bias.requires_grad and model[0].weight.requires_grad
    # frozen parameters are excluded from the kernel
    k_full, _ = _exact_kernels(model, x)
    u, s = lowrank_ntk(model, x, 27, oversample=0, n_iter=0, output="full")
    torch.testing.assert_close(u @ torch.diag(s) @ u.T, k_full, rtol=1e-8, atol=1e-8)


def test_float32_model():
    model = _mlp((8, 16, 2), seed=6, dtype=torch.float32)
    x = torch.randn(12, 8)
    u, s = lowrank_ntk(model, x, 3, n_iter=4)
    assert u.dtype == torch.float32 and s.dtype == torch.float32
    _, k_trace = _exact_kernels(model.double(), x.double())
    evals, _ = _top_eig(k_trace)
    torch.testing.assert_close(s.double(), evals[:3], rtol=1e-4, atol=0)


class _TinyAttention(nn.Module):
    """One attention head via F.scaled_dot_product_attention, mean-pooled to two outputs."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.mean(dim=1))


def test_attention_model():
    torch.manual_seed(7)
    model = _TinyAttention().double()
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    k_full, k_trace = _exact_kernels(model, x)
    for output, k in (("full", k_full), ("trace", k_trace)):
        m = k.shape[0]
        u, s = lowrank_ntk(model, x, m, oversample=0, n_iter=0, output=output)
        torch.testing.assert_close(u @ torch.diag(s) @ u.T, k, rtol=1e-8, atol=1e-8)


def test_bad_arguments(setup):
    model, x, _ = setup
    for rank in (0, -1, 31, 2.0, True, None):
        with pytest.raises(ValueError, match="rank"):
            lowrank_ntk(model, x, rank)
    with pytest.raises(ValueError, match="rank"):
        lowrank_ntk(model, x, 91, output="full")
    lowrank_ntk(model, x[:2], 6, output="full", n_iter=0)  # rank = N*O is allowed
    with pytest.raises(ValueError, match="output"):
        lowrank_ntk(model, x, 2, output="diagonal")
    with pytest.raises(ValueError, match="oversample"):
        lowrank_ntk(model, x, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter"):
        lowrank_ntk(model, x, 2, n_iter=-1)
    with pytest.raises(ValueError, match="block_size"):
        lowrank_ntk(model, x, 2, block_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        lowrank_ntk(model, x, 2, method="jacobian")
    with pytest.raises(ValueError):
        lowrank_ntk(model, torch.zeros(0, 8, dtype=torch.float64), 1)
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(UnsupportedModelError):
        lowrank_ntk(bn, x, 2)


def _models():
    from telescope.models import ConvNet1d, TinyTransformer

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    norm = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))
    return {
        "mlp+layernorm": (norm.double(), torch.randn(11, 5, generator=g, dtype=torch.float64)),
        "cnn": (ConvNet1d(in_channels=2, length=10, channels=4, out_features=3).double(),
                torch.randn(9, 2, 10, generator=g, dtype=torch.float64)),
        "transformer": (TinyTransformer(vocab=11, d_model=16, n_heads=2, n_layers=2, seq_len=6,
                                        out_features=4).double(),
                        torch.randint(0, 11, (7, 6), generator=g)),
    }


@pytest.mark.parametrize("case", ["mlp+layernorm", "cnn", "transformer"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_both_products_equal_the_oracle_kernel_times_omega(case, output):
    """``K Omega`` of the factor route (dense, conv patches, embedding tables, attention,
    LayerNorm's per-example gradients) and of the autograd route, blocks not dividing N,
    against the autograd-loop kernel."""
    from telescope.kernels.lowrank import _FactorOperator, _NTKOperator

    model, x = _models()[case]
    k_full, k_trace = _exact_kernels(model, x)
    k = k_full if output == "full" else k_trace
    n_out = k_full.shape[0] // x.shape[0]
    omega = torch.randn(k.shape[0], 6, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    ref = k @ omega
    for operator in (_FactorOperator, _NTKOperator):
        got = operator(model, x, n_out, output, 4, None, 6).matmul(omega)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_auto_takes_the_factor_route_only_when_every_parameter_has_a_rule(monkeypatch):
    from telescope.kernels import lowrank

    class Scale(nn.Module):   # a parameter used elementwise: no per-layer rule
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(6))

        def forward(self, h):
            return h * self.w

    built = []
    for name in ("_FactorOperator", "_NTKOperator"):
        cls = getattr(lowrank, name)

        def init(self, *args, cls=cls, name=name, **kwargs):
            built.append(name)
            cls.__init__(self, *args, **kwargs)

        monkeypatch.setattr(lowrank, name, type(name, (cls,), {"__init__": init}))
    x = torch.randn(8, 4, dtype=torch.float64)
    lowrank_ntk(_mlp((4, 6, 2)), x, 3)
    torch.manual_seed(0)
    ruled_out = nn.Sequential(nn.Linear(4, 6), Scale(), nn.Tanh(), nn.Linear(6, 2)).double()
    lowrank_ntk(ruled_out, x, 3)
    assert built == ["_FactorOperator", "_NTKOperator"]
