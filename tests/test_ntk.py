"""Every NTK method against an independent oracle: per-example autograd loops."""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UnsupportedModelError, UsageError
from telescope.kernels import explain
from telescope.models import MLP, ConvNet1d, TinyTransformer

METHODS = ["jacobian", "vector", "structured"]
OUTPUTS = ["trace", "full", "diagonal"]


def assert_close(k, ref):
    scale = ref.abs().max()
    torch.testing.assert_close(k, ref, rtol=0, atol=2e-5 * float(scale) + 1e-6)


def _mlp():
    torch.manual_seed(0)
    return MLP(12, [24, 16], 3, activation="tanh")


def _cnn():
    torch.manual_seed(1)
    return ConvNet1d(in_channels=2, length=12, channels=4, out_features=3)


def _transformer():
    torch.manual_seed(2)
    return TinyTransformer(vocab=11, d_model=16, n_heads=2, n_layers=2, seq_len=6,
                           out_features=4)


CASES = {
    "mlp": (_mlp, lambda g: torch.randn(7, 12, generator=g), lambda g: torch.randn(5, 12,
                                                                                 generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(6, 2, 12, generator=g),
            lambda g: torch.randn(4, 2, 12, generator=g)),
    "transformer": (_transformer, lambda g: torch.randint(0, 11, (6, 6), generator=g),
                    lambda g: torch.randint(0, 11, (5, 6), generator=g)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_methods_match_oracle(case, method, output):
    make, gen1, gen2 = CASES[case]
    model = make()
    g = torch.Generator().manual_seed(3)
    x1, x2 = gen1(g), gen2(g)
    ref = oracle_ntk(model, x1, x2, output)
    assert_close(telescope.ntk(model, x1, x2, method=method, output=output), ref)
    # symmetric path (x2=None) and a block size that forces several blocks
    ref_sym = oracle_ntk(model, x1, None, output)
    assert_close(telescope.ntk(model, x1, method=method, output=output, block_size=3), ref_sym)


def test_transformer_readouts_and_float64():
    torch.manual_seed(0)
    for readout in ("mean", "token"):
        model = TinyTransformer(vocab=7, d_model=8, n_heads=2, n_layers=1, seq_len=4,
                                out_features=2, readout=readout).double()
        x = torch.randint(0, 7, (4, 4))
        k = telescope.ntk(model, x, output="full", method="structured")
        assert k.dtype == torch.float64
        torch.testing.assert_close(k, oracle_ntk(model, x, None, "full"), rtol=1e-10,
                                   atol=1e-10)


class TiedLM(nn.Module):
    """Embedding weight reused functionally as the readout: the structured rule must notice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.ln = nn.LayerNorm(6)
        self.pos = nn.Parameter(torch.randn(5, 6))  # plain parameter: no rule, fallback

    def forward(self, tok):
        h = self.ln(self.emb(tok) + self.pos[: tok.shape[1]]).mean(1)
        return h @ self.emb.weight.T


def test_tied_weights_and_parameters_without_rules():
    torch.manual_seed(0)
    model = TiedLM().double()
    x = torch.randint(0, 9, (5, 5))
    with pytest.warns(UserWarning, match="does not reproduce"):
        k = telescope.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(k, oracle_ntk(model, x, None, "full"), rtol=1e-10, atol=1e-10)


def test_conv_variants_and_layers_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2)),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, padding="same", padding_mode="reflect", bias=False),
        nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    k = telescope.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(k, oracle_ntk(model, x, None, "full"), rtol=1e-10, atol=1e-10)


def test_frozen_parameters_are_excluded():
    model = _mlp()
    model.net[0].weight.requires_grad_(False)
    x = torch.randn(4, 12)
    for method in METHODS:
        assert_close(telescope.ntk(model, x, method=method), oracle_ntk(model, x, None, "trace"))


def test_model_left_exactly_as_it_was():
    model = _transformer()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 11, (3, 6))
    for method in METHODS:
        telescope.ntk(model, x, method=method)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model.eval()
    telescope.ntk(model, x)
    assert not model.training


def test_scalar_output_all_outputs_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))
    x = torch.randn(4, 3)
    t = telescope.ntk(model, x, output="trace")
    assert t.shape == (4, 4)
    torch.testing.assert_close(telescope.ntk(model, x, output="full")[..., 0, 0], t)
    torch.testing.assert_close(telescope.ntk(model, x, output="diagonal")[..., 0], t)


def test_linear_model_closed_form():
    """f(x) = W x + b has NTK (x.x' + 1) I exactly."""
    model = nn.Linear(5, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    expected = (x @ x.T + 1)[:, :, None, None] * torch.eye(3, dtype=torch.float64)
    for method in METHODS:
        torch.testing.assert_close(telescope.ntk(model, x, output="full", method=method),
                                   expected)


def test_clear_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError, match="model.eval"):
        telescope.ntk(model, torch.randn(4, 3))
    model.eval()
    telescope.ntk(model, torch.randn(4, 3))
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    with pytest.raises(UnsupportedModelError, match="random"):
        telescope.ntk(drop, torch.randn(4, 3))
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="method"):
        telescope.ntk(lin, torch.randn(4, 3), method="magic")
    with pytest.raises(ValueError, match="output"):
        telescope.ntk(lin, torch.randn(4, 3), output="sum")
    with pytest.raises(ValueError, match="same per-example shape"):
        telescope.ntk(lin, torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        telescope.ntk(lin, torch.full((2, 3), float("nan")))
    with pytest.raises(TypeError, match="Module"):
        telescope.ntk(lambda x: x, torch.randn(2, 3))


def test_sdpa_attention_model_all_methods():
    """Models using F.scaled_dot_product_attention work with forward-mode (vector) too."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(h[:, -1])

    torch.manual_seed(0)
    model = Attn()
    x = torch.randn(3, 5, 4)
    ref = oracle_ntk(model, x, None, "trace")
    for method in METHODS:
        assert_close(telescope.ntk(model, x, method=method), ref)


@pytest.mark.parametrize("output", OUTPUTS)
def test_tiny_memory_budget_forces_output_chunks_and_blocks(output):
    """A budget of a few KB splits outputs and examples; the kernel must not change."""
    make, gen1, gen2 = CASES["transformer"]
    model = make()
    g = torch.Generator().manual_seed(4)
    x1, x2 = gen1(g), gen2(g)
    for method in METHODS:
        k = telescope.ntk(model, x1, x2, method=method, output=output, max_memory_gb=2e-6)
        assert_close(k, oracle_ntk(model, x1, x2, output))
    k = telescope.ntk(model, x1, output=output, max_memory_gb=2e-6)
    assert_close(k, oracle_ntk(model, x1, None, output))


@pytest.mark.parametrize("case", ["mlp", "cnn", "transformer", "tied"])
def test_kernel_to_subset_and_directional_derivative(case):
    """ntk_to_subset equals the oracle kernel to the rows idx, and its J(x) v equals a central
    finite difference of the network along v (an independent oracle)."""
    from telescope.kernels.structured import ntk_to_subset

    if case == "tied":
        torch.manual_seed(0)
        model = TiedLM().double()
        x = torch.randint(0, 9, (6, 5))
    else:
        make, gen1, _ = CASES[case]
        model = make().double()
        x = gen1(torch.Generator().manual_seed(5))
        if x.is_floating_point():
            x = x.double()
    idx = torch.tensor([4, 0, 2])
    g = torch.Generator().manual_seed(6)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k, jv = ntk_to_subset(model, x, idx, output="full", tangent=v)
    torch.testing.assert_close(k, oracle_ntk(model, x, x[idx], "full"), rtol=1e-9, atol=1e-9)
    eps = 1e-6
    with torch.no_grad():
        params = dict(model.named_parameters())
        plus = torch.func.functional_call(model, {n: p + eps * v[n] for n, p in params.items()},
                                          (x,))
        minus = torch.func.functional_call(model, {n: p - eps * v[n] for n, p in params.items()},
                                           (x,))
    fd = ((plus - minus) / (2 * eps)).reshape(x.shape[0], -1)
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-7)


def test_rmsnorm_and_grouped_conv_rules():
    """RMSNorm (eps=None) and a grouped convolution both get a structured rule (ConvRule, one
    factor per group), with no per-example Jacobian and no warning; the kernel is the Jacobian
    method's and the oracle's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.RMSNorm(24), nn.Linear(24, 2)).double()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    plan = explain(model, x).set_index("parameter")["rule"]
    assert plan.to_dict() == {"0.weight": "convolution (groups=2)",
                              "0.bias": "convolution (groups=2)", "3.weight": "affine (norm)",
                              "4.weight": "linear", "4.bias": "linear"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rule that failed its autograd check would warn
        k = telescope.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(k, telescope.ntk(model, x, output="full", method="jacobian"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k, oracle_ntk(model, x, None, "full"), rtol=1e-10, atol=1e-10)


class BatchCentered(nn.Module):
    """Couples the examples of a batch through a plain tensor op (no BatchNorm to spot)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


@pytest.mark.parametrize("method", METHODS)
def test_models_that_couple_examples_are_refused(method):
    """Per example the kernel of ``h - h.mean(0)`` is 0; it must raise, not return zeros."""
    torch.manual_seed(0)
    model = BatchCentered()
    for x1, x2 in ((torch.randn(5, 3), None), (torch.randn(1, 3), None),
                   (torch.randn(1, 3), torch.randn(4, 3))):
        with pytest.raises(UnsupportedModelError, match="depends on the other examples"):
            telescope.ntk(model, x1, x2, method=method)
    with pytest.raises(UnsupportedModelError, match="depends on the other examples"):
        telescope.lowrank_ntk(model, torch.randn(6, 3), rank=2)


def test_parameters_without_values_are_refused():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 1] = float("nan")
    with pytest.raises(UsageError, match=r"'weight' holds NaN or infinite"):
        telescope.ntk(lin, torch.randn(4, 3))
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias[0] = float("-inf")
    with pytest.raises(UsageError, match=r"'bias' holds NaN or infinite"):
        telescope.ntk(lin, torch.randn(4, 3), method="jacobian")
    meta = nn.Linear(3, 2, device="meta")
    with pytest.raises(UsageError, match="meta device.*to_empty"):
        telescope.ntk(meta, torch.randn(4, 3))


@pytest.mark.parametrize("budget, match", [
    (float("inf"), "finite positive"), (float("nan"), "finite positive"), (0, "finite positive"),
    (-1.0, "finite positive"), ("1", "number of GiB"), (True, "number of GiB"),
])
def test_memory_budget_must_be_a_finite_positive_number(budget, match):
    with pytest.raises(UsageError, match=f"max_memory_gb must be a {match}"):
        telescope.ntk(nn.Linear(3, 2), torch.randn(4, 3), max_memory_gb=budget)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_the_model_does_not_take_name_the_argument(method):
    torch.manual_seed(0)
    mlp = MLP(12, [8], 2)
    with pytest.raises(UsageError, match=r"failed on x1 \(per-example shape \(11,\)"):
        telescope.ntk(mlp, torch.randn(4, 11), method=method)
    with pytest.raises(UsageError, match=r"failed on x1 .*torch.float64.*torch.float32"):
        telescope.ntk(mlp, torch.randn(4, 12, dtype=torch.float64), method=method)
    with pytest.raises(UsageError, match="same dtype"):
        telescope.ntk(mlp, torch.randn(4, 12), torch.randn(3, 12, dtype=torch.float64))
    tr = _transformer()  # vocab 11: token 11 is out of range, only in x2
    x1 = torch.randint(0, 11, (3, 6))
    with pytest.raises(UsageError, match="failed on x2"):
        telescope.ntk(tr, x1, torch.full((2, 6), 11), method=method)


def test_a_budget_that_forces_tiny_blocks_warns_with_a_better_budget():
    """MLP 40-512-512-10 on 600 points: 0.001 GiB allows blocks of a few examples whose
    factors are recomputed for every pair (the kernel takes many times longer than at the
    default); the warning names a budget that allows sensible blocks, and at that budget there
    is no warning."""
    import re

    torch.manual_seed(0)
    model = MLP(40, [512, 512], 10)
    x = torch.randn(600, 40)
    from telescope.kernels import structured

    engine, n_out = structured._plan(model, x[:2])
    with pytest.warns(RuntimeWarning, match="allows blocks of only") as record:
        structured._check_block_pairs(engine, 600, 0, n_out, "trace", int(0.001 * 2**30), 4,
                                      *structured._choose_blocks(engine, 600, 0, n_out, "trace",
                                                                 int(0.001 * 2**30), 4))
    suggested = float(re.search(r"; max_memory_gb=([0-9.e+-]+) allows", str(record[0].message))
                      .group(1))
    blocks = structured._choose_blocks(engine, 600, 0, n_out, "trace", int(suggested * 2**30), 4)
    assert blocks[1] > 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        structured._check_block_pairs(engine, 600, 0, n_out, "trace", int(suggested * 2**30), 4,
                                      *blocks)
        structured._check_block_pairs(engine, 600, 0, n_out, "trace", 2 * 2**30, 4,
                                      *structured._choose_blocks(engine, 600, 0, n_out, "trace",
                                                                 2 * 2**30, 4))
    # through telescope.ntk, for structured and jacobian (the warning comes before the work:
    # as an error it stops the call at once)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("structured", "jacobian"):
            with pytest.raises(RuntimeWarning, match="allows blocks of only"):
                telescope.ntk(model, x, method=method, max_memory_gb=0.001)


def test_low_precision_jacobian_contraction_is_accurate_over_millions_of_parameters():
    """A single float32 matmul over millions of parameters loses ~P * eps; the contraction is
    chunked and accumulated in float64 (oracle: the float64 product of the same Jacobians)."""
    from telescope.kernels._blocks import contract

    g = torch.Generator().manual_seed(0)
    j = (torch.randn(3, 2, 3_000_000, generator=g) + 0.5).float()  # same-sign-heavy sums
    ref = contract(j.double(), j.double(), "full")
    for output in ("trace", "full", "diagonal"):
        k = contract(j, j, output)
        r = ref if output == "full" else (
            ref.diagonal(dim1=2, dim2=3).sum(-1) if output == "trace"
            else ref.diagonal(dim1=2, dim2=3))
        assert k.dtype == torch.float32
        assert float((k.double() - r).abs().max() / r.abs().max()) < 1e-6


def test_x2_equal_to_x1_takes_the_symmetric_path(monkeypatch):
    """Passing the same points as x2 gives the same kernel through the symmetric path (each
    off-diagonal block computed once): checked by counting the blocks computed."""
    from telescope.kernels import _blocks

    torch.manual_seed(0)
    model = MLP(6, [8], 2)
    x = torch.randn(12, 6)
    calls = []
    original = _blocks.blocked_kernel

    def counting(block_kernel, x1, x2, *args, **kwargs):
        calls.append(x2 is None)
        return original(block_kernel, x1, x2, *args, **kwargs)

    monkeypatch.setattr("telescope.kernels.structured.blocked_kernel", counting)
    ref = telescope.ntk(model, x, block_size=4)
    for x2 in (x, x.clone()):
        torch.testing.assert_close(telescope.ntk(model, x, x2, block_size=4), ref, rtol=0,
                                   atol=0)
    assert calls == [True, True, True]
    telescope.ntk(model, x, x[:11], block_size=4)
    assert calls[-1] is False


@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_kernel_written_to_disk_block_by_block_and_resumed(tmp_path, method, output,
                                                           monkeypatch):
    """``out=PATH``: the same numbers as in memory, in a .npy numpy opens lazily; a computation
    killed after some blocks resumes with only the missing ones (each off-diagonal block of a
    symmetric kernel computed once); a file of another kernel is refused."""
    import numpy as np

    from telescope.kernels import _blocks

    torch.manual_seed(0)
    model = MLP(6, [8], 3).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    path = tmp_path / "k.npy"
    ref = telescope.ntk(model, x, method=method, output=output)
    written = []
    original = _blocks.KernelFile.write

    def dying(self, a, b, block, mirror):
        if len(written) == 3:
            raise KeyboardInterrupt  # killed after three blocks
        written.append((a, b))
        original(self, a, b, block, mirror)

    monkeypatch.setattr(_blocks.KernelFile, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        telescope.ntk(model, x, method=method, output=output, out=path, block_size=3)
    monkeypatch.setattr(_blocks.KernelFile, "write", original)
    blocks = [(a, b) for a in range(0, 10, 3) for b in range(0, 10, 3) if b >= a]
    assert len(blocks) == 10 and written == blocks[:3]
    computed = []
    monkeypatch.setattr(_blocks.KernelFile, "write",
                        lambda self, a, b, block, mirror: (computed.append((a, b)),
                                                           original(self, a, b, block, mirror)))
    k = telescope.ntk(model, x, method=method, output=output, out=path, block_size=3)
    assert computed == blocks[3:]
    assert isinstance(k, np.memmap) and not k.flags.writeable
    np.testing.assert_allclose(k, ref.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.load(path, mmap_mode="r"), ref.numpy(), rtol=0, atol=1e-12)
    # the same call again computes nothing
    computed.clear()
    telescope.ntk(model, x, method=method, output=output, out=path, block_size=3)
    assert computed == []
    # another kernel (other inputs) in the same file: refused, the file untouched
    with pytest.raises(telescope.errors.UsageError, match="already holds another kernel"):
        telescope.ntk(model, x + 1, method=method, output=output, out=path, block_size=3)
    np.testing.assert_allclose(np.load(path), ref.numpy(), rtol=0, atol=1e-12)
    # x2 given: every block pair
    x2 = torch.randn(4, 6, dtype=torch.float64)
    k2 = telescope.ntk(model, x, x2, method=method, output=output, out=tmp_path / "k2.npy",
                       block_size=3)
    np.testing.assert_allclose(k2, telescope.ntk(model, x, x2, method=method,
                                                 output=output).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("output", OUTPUTS)
def test_symmetric_blocks_of_several_chunks_match_the_oracle(case, output):
    """A symmetric block of 80 examples is accumulated on its upper triangle of example chunks
    (32, 32, 16) and mirrored once: every entry, below the diagonal too, against the
    per-example autograd oracle (float64, so any misplaced chunk shows)."""
    from telescope.kernels import _contractions

    make, draw, _ = CASES[case]
    model = make().double()
    g = torch.Generator().manual_seed(3)
    x = draw(g)
    x = torch.cat([draw(g) for _ in range(-(-80 // x.shape[0]))])[:80]
    x = x.double() if x.is_floating_point() else x
    assert len(_contractions._chunks(80)) == 3
    k = telescope.ntk(model, x, method="structured", output=output)
    ref = oracle_ntk(model, x, x, output)
    torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    assert torch.equal(k, k.transpose(0, 1) if output != "full" else k.permute(1, 0, 3, 2))


@pytest.mark.parametrize("route", ["token_gram", "per_example_gradients"])
@pytest.mark.parametrize("case", ["cnn", "transformer"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_both_contractions_of_token_layers_match_the_oracle(monkeypatch, route, case, output):
    """Layers with tokens (sequence positions, conv patches) take the cheaper of the token Gram
    and the per-example-gradient contraction; each route, forced through the cost model's
    write cost, against the per-example autograd oracle, symmetric and not."""
    from telescope.kernels import _contractions

    monkeypatch.setattr(_contractions, "WRITE_COST",
                        10**12 if route == "token_gram" else -10**12)
    from telescope.kernels._rule_protocol import TokenFactor

    make, draw1, draw2 = CASES[case]
    model = make().double()
    g = torch.Generator().manual_seed(5)
    x1, x2 = draw1(g), draw2(g)
    if x1.is_floating_point():
        x1, x2 = x1.double(), x2.double()
    telescope.ntk(model, x1[:2], method="structured")   # plan and autograd check, once
    used = []
    for owner, name in ((_contractions, "_token_gram"), (TokenFactor, "grads")):
        original = getattr(owner, name)

        def spy(*args, original=original, name=name, **kwargs):
            used.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    for b in (None, x2):
        k = telescope.ntk(model, x1, b, method="structured", output=output)
        ref = oracle_ntk(model, x1, x1 if b is None else b, output)
        torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    assert set(used) == {"_token_gram" if route == "token_gram" else "grads"}
