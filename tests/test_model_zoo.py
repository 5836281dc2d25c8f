"""The kernels of the models people train, against per-example autograd oracles: Hugging Face
GPT-2 (Conv1D, tied embeddings, a pad token), BERT and Llama (RMSNorm, rotary) built from small
configs, ``torch.nn`` RNN/GRU/LSTM and TransformerEncoder (both ``batch_first``, eval mode with
its fused fast path), and a ResNet-style CNN with BatchNorm in eval mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UnsupportedModelError
from telescope.models import ResNet18

METHODS = ["structured", "jacobian", "vector"]
F64 = torch.float64


def close(k, ref, rtol=1e-10):
    scale = float(ref.abs().max())
    torch.testing.assert_close(k.to(ref.dtype), ref, rtol=0, atol=rtol * scale)


class Logits(nn.Module):
    """The logits of a Hugging Face model (for the oracle, which wants a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    v = 40
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_positions=12, n_embd=16, n_layer=2,
                                      n_head=2, num_labels=3, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=1)
        return transformers.GPT2ForSequenceClassification(cfg)
    if name == "gpt2-lm":  # tied input and output embeddings
        cfg = transformers.GPT2Config(vocab_size=v, n_positions=12, n_embd=16, n_layer=1,
                                      n_head=2, bos_token_id=1, eos_token_id=1)
        return transformers.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=12, num_labels=2)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=12,
                                   num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.LlamaForSequenceClassification(cfg)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face_models_match_the_oracle(name):
    """Every method on the raw model (its ``ModelOutput``'s logits), float64, tokens with a pad
    token present; one-example ``x1`` too (HF position ids are ``[1, S]``)."""
    model = _hf(name).double().eval()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randint(1, 40, (3, 6), generator=g)
    x1[0, -1] = 0  # a pad token
    x2 = torch.randint(1, 40, (2, 6), generator=g)
    ref = oracle_ntk(Logits(model), x1, x2, "full")
    # Llama's RMSNorm computes in float32 whatever the model's dtype: its kernel is accurate
    # to float32, for the oracle as for every method
    rtol = 1e-5 if name == "llama" else 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a vmap fallback is fine here
        for method in METHODS:
            close(telescope.ntk(model, x1, x2, method=method, output="full"), ref, rtol)
        # a one-example x1 first must not break the plan of later calls
        close(telescope.ntk(model, x1[:1], x2, output="full"), ref[:1], rtol)
        close(telescope.ntk(model, x1, x2, output="full"), ref, rtol)


def test_gpt2_tied_embeddings_language_model():
    model = _hf("gpt2-lm").double().eval()

    class LastLogits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits[:, -1, :5]

    wrapped = LastLogits(model)
    x = torch.randint(1, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    ref = oracle_ntk(wrapped, x, None, "trace")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in METHODS:
            close(telescope.ntk(wrapped, x, method=method), ref)


class Recurrent(nn.Module):
    def __init__(self, cell: type, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 8, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: [N, S, 3]
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_networks_match_the_oracle(cell, batch_first):
    torch.manual_seed(0)
    model = Recurrent(cell, batch_first).double()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(3, 5, 3, generator=g, dtype=F64), torch.randn(2, 5, 3, generator=g,
                                                                       dtype=F64)
    ref = oracle_ntk(model, x1, x2, "full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in METHODS:
            close(telescope.ntk(model, x1, x2, method=method, output="full"), ref)
    # the per-example path is announced once, naming the cause, never a raw functorch error
    vmap_warnings = [w for w in caught if "cannot run under torch.func.vmap" in str(w.message)]
    assert len(vmap_warnings) <= 1


class Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: [N, S, 8]
        h = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_in_eval_mode_all_methods_and_the_telescope(batch_first):
    """In eval mode ``TransformerEncoderLayer`` takes a fused fast path without forward-mode
    AD: the vector method and the Telescope (which evaluates in eval mode) must still work."""
    torch.manual_seed(0)
    model = Encoder(batch_first).double().eval()
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(3, 4, 8, generator=g, dtype=F64), torch.randn(2, 4, 8, generator=g,
                                                                       dtype=F64)
    ref = oracle_ntk(model, x1, x2, "trace")
    for method in METHODS:
        close(telescope.ntk(model, x1, x2, method=method), ref)
    model.train()
    with pytest.raises(UnsupportedModelError, match="Dropout"):
        telescope.ntk(model, x1)
    # the Telescope on the same model trained with dropout on: probes in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with telescope.Telescope(model, opt, {"test": x2}) as tel:
        for _ in range(3):
            opt.zero_grad()
            model(x1).pow(2).mean().backward()
            opt.step()
    assert tel.history[-1]["telescoping_mae"] < 1e-3 * tel.history[-1]["output_scale"]


def _resnet():
    torch.manual_seed(0)
    model = ResNet18(3, width=4, stem="cifar").double()
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_resnet_with_batchnorm_in_eval_mode():
    model = _resnet()
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(3, 3, 8, 8, generator=g, dtype=F64), torch.randn(2, 3, 8, 8,
                                                                          generator=g, dtype=F64)
    ref = oracle_ntk(model, x1, x2, "full")
    for method in METHODS:
        close(telescope.ntk(model, x1, x2, method=method, output="full"), ref)


def test_functional_dropout_in_train_mode_is_refused():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.b(nn.functional.dropout(self.a(x), 0.5, self.training))

    model = FunctionalDropout()
    for method in METHODS:
        with pytest.raises(UnsupportedModelError, match="random operation"):
            telescope.ntk(model, torch.randn(4, 3), method=method)
    model.eval()
    telescope.ntk(model, torch.randn(4, 3))


# ----------------------------------------------------------------------------------------------
# the plan: rules by what a module computes, explain, register_rule
# ----------------------------------------------------------------------------------------------


def _rule_share(df) -> float:
    return float(df.loc[df["rule"] != "per-example Jacobian", "share_of_params"].sum())


def test_explain_gpt2_uses_the_conv1d_rule():
    from telescope.kernels import explain

    model = _hf("gpt2").double().eval()
    x = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(6))
    df = explain(model, x)
    assert list(df["parameter"]) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert df["numel"].sum() == sum(p.numel() for p in model.parameters())
    assert df["share_of_params"].sum() == pytest.approx(1.0)
    assert df["cost_share"].sum() == pytest.approx(1.0)
    attn = df.set_index("parameter").loc["transformer.h.0.attn.c_attn.weight"]
    assert attn["rule"] == "linear (Conv1D)" and attn["module_type"] == "Conv1D"
    # position embeddings are called with ids [1, S] and broadcast to the batch: still a rule
    assert df.set_index("parameter").loc["transformer.wpe.weight", "rule"] == "embedding"
    assert _rule_share(df) == pytest.approx(1.0)


class MyLayerNorm(nn.LayerNorm):
    """A subclass with the same computation: inherits LayerNorm's rule."""


class DoubledLinear(nn.Linear):
    """A subclass whose forward computes something else: its inherited rule must fail the
    autograd check and fall back, the kernel staying exact."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class Custom(nn.Module):
    """``y = x @ W + b`` with its own parameter names."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.b = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.w + self.b


def _layers_model():
    torch.manual_seed(0)
    return nn.Sequential(Custom(5, 6), MyLayerNorm(6), nn.Tanh(), DoubledLinear(6, 6),
                         nn.Tanh(), nn.Unflatten(1, (2, 3)), nn.GroupNorm(1, 2), nn.Flatten(),
                         nn.Linear(6, 2)).double()


def test_rules_by_class_hierarchy_and_autograd_check():
    from telescope.kernels import explain

    model = _layers_model()
    x1 = torch.randn(4, 5, dtype=F64)
    ref = oracle_ntk(model, x1, None, "full")
    with pytest.warns(UserWarning, match=r"failed the autograd check \(3: its linear rule"):
        close(telescope.ntk(model, x1, output="full"), ref)
    df = explain(model, x1).set_index("parameter")  # the table says it, no second warning
    assert df.loc["1.weight", "rule"] == "affine (norm)"    # MyLayerNorm, by its base class
    assert df.loc["6.weight", "rule"] == "affine (norm)"    # GroupNorm on the channel axis
    assert df.loc["3.weight", "rule"] == "per-example Jacobian"
    assert "does not reproduce autograd's gradient" in df.loc["3.weight", "reason"]
    assert df.loc["0.w", "reason"] == "no rule for Custom"
    for method in METHODS:
        close(telescope.ntk(model, x1, method=method, output="full"), ref)


def test_register_rule_for_ones_own_layer():
    from telescope.kernels import LinearRule, explain, register_rule, rules

    model = _layers_model()
    x1 = torch.randn(4, 5, dtype=F64)
    saved = dict(rules._REGISTRY)
    try:
        register_rule(Custom, LinearRule(weight="w", bias="b", transposed=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = explain(model, x1).set_index("parameter")
        assert df.loc["0.w", "rule"] == "linear" and df.loc["0.b", "rule"] == "linear"
        close(telescope.ntk(model, x1, output="full"), oracle_ntk(model, x1, None, "full"))
        # a wrong rule (the weight read as [out, in]) is caught by the check, not used
        register_rule(Custom, LinearRule(weight="w", bias="b"))
        with pytest.warns(UserWarning, match=r"failed the autograd check \(0: its linear rule "
                                             "does not fit"):
            close(telescope.ntk(model, x1, output="full"), oracle_ntk(model, x1, None, "full"))
        df = explain(model, x1).set_index("parameter")
        assert df.loc["0.w", "rule"] == "per-example Jacobian"
        with pytest.raises(telescope.errors.UsageError, match="nn.Module subclass"):
            register_rule(int, LinearRule())
    finally:
        rules._REGISTRY.clear()
        rules._REGISTRY.update(saved)
        rules._VERSION[0] += 1


def test_mixed_and_low_precision_models_keep_their_rules():
    """Llama in float64 computes its RMSNorm in float32; a bfloat16 model computes in bfloat16:
    the rules are checked at that precision, so they are kept (no warning)."""
    from telescope.kernels import explain

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        df = explain(_hf("llama").double().eval(), torch.randint(1, 40, (3, 6)))
        assert _rule_share(df) == pytest.approx(1.0)
        torch.manual_seed(0)
        bf16 = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(),
                             nn.Linear(16, 3)).to(torch.bfloat16)
        df = explain(bf16, torch.randn(4, 8, dtype=torch.bfloat16))
        assert _rule_share(df) == pytest.approx(1.0)


def test_large_fallback_share_warns_once_and_points_to_explain():
    torch.manual_seed(0)
    model = Recurrent(nn.GRU, True).double()  # a GRU: no rule
    x = torch.randn(3, 4, 3, dtype=F64)
    with pytest.warns(UserWarning, match=r"of the parameters have no per-layer rule.*explain"):
        telescope.ntk(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        telescope.ntk(model, x)  # the plan is cached: once


# ----------------------------------------------------------------------------------------------
# kernels, lenses and low-rank kernels of parameter subsets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_kernels_of_parameter_subsets(method):
    model = _hf("gpt2").double().eval()
    x1 = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(7))
    flags = [p.requires_grad for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    biases = [n for n in names if n.endswith(".bias")]
    block = [n for n in names if n.startswith("transformer.h.1.")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for spec, chosen in (("*.bias", biases), (["transformer.h.1.*"], block),
                             (lambda n, p: n.startswith("score"), ["score.weight"]),
                             ("transformer.h.0.attn.c_attn.weight",
                              ["transformer.h.0.attn.c_attn.weight"])):
            ref = oracle_ntk(Logits(model), x1, None, "full", names=["model." + n for n in chosen])
            close(telescope.ntk(model, x1, method=method, output="full", params=spec), ref)
    assert [p.requires_grad for p in model.parameters()] == flags  # left as it was
    with pytest.raises(telescope.errors.UsageError, match="did you mean 'score.weight'"):
        telescope.ntk(model, x1, params="score.weights")
    with pytest.raises(telescope.errors.UsageError, match="selects no trainable parameter"):
        telescope.ntk(model, x1, params="*.lora_A")
    assert [p.requires_grad for p in model.parameters()] == flags


def test_lowrank_kernel_of_a_subset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(12, 5, dtype=F64)
    u, s = telescope.lowrank_ntk(model, x, rank=12, params="2.*", n_iter=4)
    ref = oracle_ntk(model, x, None, "trace", names=["2.weight", "2.bias"])
    close(u @ torch.diag(s) @ u.T, ref, 1e-8)


def _frozen_body_classifier():
    """BERT with only its classification head trained: linear in the trained parameters."""
    model = _hf("bert").double().eval()
    return model, [n for n, _ in model.named_parameters() if n.startswith("classifier.")]


def test_telescope_and_smoother_follow_a_trained_subset():
    """Only the head is trained (the rest keeps requires_grad=True, as after loading a model):
    without params= the lenses refuse (the optimizer does not train everything); with it, the
    model is linear in what is trained, so both lenses are exact."""
    from torch.nn import functional as F

    model, head = _frozen_body_classifier()
    g = torch.Generator().manual_seed(8)
    x = torch.randint(1, 40, (8, 6), generator=g)
    y = torch.randn(8, 2, generator=g, dtype=F64)
    xt = torch.randint(1, 40, (5, 6), generator=g)
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=0.05, weight_decay=0.1)
    with pytest.raises(telescope.errors.UsageError, match="not in the optimizer"):
        telescope.Telescope(model, opt, {"test": xt})
    tel = telescope.Telescope(model, opt, {"test": xt}, params="classifier.*")
    sm = telescope.Smoother(model, opt, x, y, probes={"test": xt}, params=head)
    for step in range(6):
        idx = torch.arange(step % 2, 8, 2)
        opt.zero_grad()
        F.mse_loss(model(x[idx]).logits, y[idx]).backward()
        sm.record(idx)
        opt.step()
    with torch.no_grad():
        actual = model(xt).logits
    close(tel.telescoping("test"), actual, 1e-9)
    close(sm.predict("test"), actual, 1e-9)
    assert sm.weights("test").shape == (5, 2, 16)
    # the optimizer trains a parameter the subset leaves out: refused
    opt2 = torch.optim.SGD(list(model.classifier.parameters())
                           + [model.bert.pooler.dense.bias], lr=0.1)
    with pytest.raises(telescope.errors.UsageError, match="leaves out"):
        telescope.Telescope(model, opt2, {"test": xt}, params="classifier.*")
    with pytest.raises(telescope.errors.UsageError, match="leaves out"):
        telescope.Smoother(model, opt2, x, y, params="classifier.*")


def test_kernel_evolution_measures_in_eval_mode_and_of_a_subset():
    from telescope.lens import KernelEvolution

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2))
    model = model.double().train()
    x = torch.randn(6, 4, dtype=F64)
    lens = KernelEvolution(model, x, params="3.*")  # dropout in train mode: measured in eval
    assert model.training
    model.eval()
    close(lens.kernel0, oracle_ntk(model, x, None, "trace", names=["3.weight", "3.bias"]))
    assert lens.measure()["kernel_distance"] == pytest.approx(0.0, abs=1e-12)


def test_batch_one_submodule_outputs():
    """A submodule called with a batch of one whose output is broadcast to the batch keeps its
    rule (each example its own delta); one whose output the model squeezes cannot be given
    per-example deltas and falls back; both kernels exact."""
    from telescope.kernels import explain

    class Positions(nn.Module):
        def __init__(self, squeeze: bool) -> None:
            super().__init__()
            self.squeeze = squeeze
            self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(5, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            p = self.pos(torch.arange(ids.shape[1])[None])  # [1, S, 4]
            p = p[0] if self.squeeze else p
            return self.head(torch.tanh(self.tok(ids) + p).mean(1))

    x = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(9))
    for squeeze, rule in ((False, "embedding"), (True, "per-example Jacobian")):
        torch.manual_seed(0)
        model = Positions(squeeze).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = explain(model, x).set_index("parameter")
            assert df.loc["pos.weight", "rule"] == rule
            for method in METHODS:
                close(telescope.ntk(model, x, method=method, output="full"),
                      oracle_ntk(model, x, None, "full"))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` called the ways people call it: a key padding mask and an
    attention mask (boolean or additive), cross-attention to a second sequence, and its
    averaged attention weights used downstream."""

    def __init__(self, batch_first: bool, mask: str) -> None:
        super().__init__()
        self.batch_first, self.mask = batch_first, mask
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8 + 5, 2)

    def forward(self, x):  # x: [N, S, 8] with S = 5
        n, s, _ = x.shape
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        attn_mask = causal if self.mask == "bool" else causal.to(x.dtype) * -1e4
        pad = torch.zeros(n, s, dtype=torch.bool)
        pad[:, -1] = x[:, -1, 0] > 0  # per example: its last token is padding when ...
        memory = torch.flip(x, dims=(1,))
        q, kv = (x, memory) if self.batch_first else (x.transpose(0, 1), memory.transpose(0, 1))
        out, weights = self.mha(q, kv, kv, key_padding_mask=pad, attn_mask=attn_mask,
                                need_weights=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(torch.cat([out.mean(1), weights[:, -1]], dim=1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_multihead_attention_projections_have_a_rule(batch_first, mask):
    from telescope.kernels import explain

    torch.manual_seed(0)
    model = Attention(batch_first, mask).double().eval()
    x1 = torch.randn(3, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(10))
    x2 = torch.randn(2, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(11))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="structured NTK")  # no rule failed
        df = explain(model, x1).set_index("parameter")
    assert set(df.loc[df["module"].str.startswith("mha"), "rule"]) == {
        "linear (attention projections)"}
    assert _rule_share(df) == pytest.approx(1.0)
    ref = oracle_ntk(model, x1, x2, "full")
    for method in METHODS:
        close(telescope.ntk(model, x1, x2, method=method, output="full"), ref)
    # the transformer encoder, in both layouts: every parameter on a rule now
    for bf in (True, False):
        df = explain(Encoder(bf).double().eval(), x1).set_index("parameter")
        assert _rule_share(df) == pytest.approx(1.0)


def test_attention_configurations_without_a_rule_fall_back_exactly():
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True,
                                             add_bias_kv=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.mha(x, x[..., :6], x[..., :6])[0].mean(1))

    model = Cross().double().eval()
    x = torch.randn(3, 5, 8, dtype=F64)
    from telescope.kernels import explain

    df = explain(model, x).set_index("parameter")
    assert "does not fit" in df.loc["mha.q_proj_weight", "reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(telescope.ntk(model, x, output="full"), oracle_ntk(model, x, None, "full"))


def test_sequence_first_layouts_keep_their_rules():
    """Layers that see ``[S, N, E]`` (the default layout of torch's transformer modules): the
    batch axis is found per call (the one that grows from 2 to 3 examples), inputs and deltas
    are put batch-first for the rule, and the kernel matches the oracle; a module whose input
    and output batch axes differ falls back."""
    from telescope.kernels import explain

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.lin = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 2)

        def forward(self, ids):  # [N, S]
            h = self.emb(ids.T)               # [S, N, 6]: batch on axis 1
            h = torch.tanh(self.norm(self.lin(h)))
            return self.head(h.mean(0))

    torch.manual_seed(0)
    model = SeqFirst().double()
    x = torch.randint(0, 11, (3, 2), generator=torch.Generator().manual_seed(12))  # S = 2
    df = explain(model, x)
    assert _rule_share(df) == pytest.approx(1.0)
    ref = oracle_ntk(model, x, None, "full")
    for method in METHODS:
        close(telescope.ntk(model, x, method=method, output="full"), ref)
    # a single example, and x2 given
    x2 = torch.randint(0, 11, (2, 2), generator=torch.Generator().manual_seed(13))
    close(telescope.ntk(model, x[:1], x2, output="full"), oracle_ntk(model, x[:1], x2, "full"))

    class Transposing(nn.Linear):  # output [S, N, E] from input [N, S, E]
        def forward(self, x):
            return super().forward(x).transpose(0, 1)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.head = nn.Embedding(11, 6), Transposing(6, 6), nn.Linear(6, 2)

        def forward(self, ids):
            return self.head(torch.tanh(self.lin(self.emb(ids))).mean(0))

    torch.manual_seed(0)
    model = Wrapped().double()
    df = explain(model, x).set_index("parameter")
    assert df.loc["lin.weight", "rule"] == "per-example Jacobian"
    assert "no axis of its output is the batch" in df.loc["lin.weight", "reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(telescope.ntk(model, x, output="full"), oracle_ntk(model, x, None, "full"))

