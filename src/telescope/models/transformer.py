"""A small pre-LN transformer you can read in one sitting.

Attention is written out (``softmax(Q K^T / sqrt(d_head) + mask) V``) instead of calling
``F.scaled_dot_product_attention``: forward-mode AD works on every backend, the attention
probabilities are there to read, and every parameter lives in an ``nn.Linear``,
``nn.Embedding`` or ``nn.LayerNorm``, so the structured NTK engine covers the whole model.

Named hook points (identity :class:`~telescope.models.hooks.HookPoint` modules, in the spirit
of TransformerLens) mark the activations lenses read with
:func:`telescope.models.hooks.capture`; the model keeps no lens state. With ``N`` examples,
``S`` positions, ``H`` heads of size ``d_head`` (layer ``i``):

====================================  ===========================  ==============================
name                                  shape                        what
====================================  ===========================  ==============================
``hook_embed``                        ``[N, S, d_model]``          token (or input) embedding
``hook_pos_embed``                    ``[N, S, d_model]``          position embedding
``blocks.i.hook_resid_pre``           ``[N, S, d_model]``          residual stream into block i
``blocks.i.attn.hook_q/_k/_v``        ``[N, H, S, d_head]``        queries, keys, values
``blocks.i.attn.hook_scores``         ``[N, H, S_q, S_k]``         ``q k^T / sqrt(d_head)``,
                                                                   masked keys ``-inf``
``blocks.i.attn.hook_pattern``        ``[N, H, S_q, S_k]``         attention probabilities
``blocks.i.attn.hook_z``              ``[N, H, S, d_head]``        ``pattern @ v`` per head
``blocks.i.hook_attn_out``            ``[N, S, d_model]``          attention sublayer output
``blocks.i.hook_resid_mid``           ``[N, S, d_model]``          after the attention residual
``blocks.i.hook_mlp_out``             ``[N, S, d_model]``          MLP sublayer output
``blocks.i.hook_resid_post``          ``[N, S, d_model]``          residual stream out of block i
====================================  ===========================  ==============================

With ``sigma_reparam=True`` every linear layer of the attention and MLP sublayers is a
:class:`~telescope.models.SigmaReparamLinear` (Zhai et al., 2023, "Stabilizing Transformer
Training by Preventing Attention Entropy Collapse"); those layers use the per-example Jacobian
fallback of the structured NTK engine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.models.hooks import HookPoint
from telescope.models.sigma_reparam import SigmaReparamLinear


def _linear(d_in: int, d_out: int, sigma_reparam: bool) -> nn.Module:
    return SigmaReparamLinear(d_in, d_out) if sigma_reparam else nn.Linear(d_in, d_out)


def _applied_weight(module: nn.Module) -> Tensor:
    """The matrix a linear layer applies (``W_hat`` of a sigma-reparametrized one)."""
    if isinstance(module, SigmaReparamLinear):
        return module.effective_weight()
    return module.weight


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output projections.

    Head ``h`` uses the output rows ``h * d_head : (h + 1) * d_head`` of ``query``, ``key`` and
    ``value`` and the matching input columns of ``out`` (:meth:`head_weights`). Hook points
    ``hook_q``, ``hook_k``, ``hook_v``, ``hook_scores``, ``hook_pattern`` and ``hook_z`` (see
    the module docstring) expose the intermediate tensors.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = True,
                 sigma_reparam: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise UsageError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head, self.causal = n_heads, d_model // n_heads, causal
        self.query = _linear(d_model, d_model, sigma_reparam)
        self.key = _linear(d_model, d_model, sigma_reparam)
        self.value = _linear(d_model, d_model, sigma_reparam)
        self.out = _linear(d_model, d_model, sigma_reparam)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def head_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W_Q, W_K, W_V, W_O)`` per head: ``W_Q[h]``, ``W_K[h]``, ``W_V[h]`` are
        ``[d_head, d_model]`` (head ``h``'s output rows of the projection) and ``W_O[h]`` is
        ``[d_model, d_head]`` (its input columns of ``out``), so head ``h`` computes
        ``scores = x W_Q[h]^T (x W_K[h]^T)^T / sqrt(d_head)`` and adds
        ``pattern (x W_V[h]^T) W_O[h]^T`` to the output (biases aside). The matrices the layers
        apply (``W_hat`` of a :class:`~telescope.models.SigmaReparamLinear`), differentiable.
        :class:`telescope.lens.WeightRank` reads attention through this method."""
        h, d = self.n_heads, self.d_head
        wq, wk, wv, wo = (_applied_weight(m) for m in (self.query, self.key, self.value,
                                                        self.out))
        return (wq.reshape(h, d, -1), wk.reshape(h, d, -1), wv.reshape(h, d, -1),
                wo.reshape(-1, h, d).transpose(0, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, s, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(n, s, self.n_heads, self.d_head).transpose(1, 2)

        q = self.hook_q(heads(self.query(x)))
        k = self.hook_k(heads(self.key(x)))
        v = self.hook_v(heads(self.value(x)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if self.causal:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        attn = self.hook_pattern(self.hook_scores(scores).softmax(dim=-1))
        y = self.hook_z(attn @ v).transpose(1, 2).reshape(n, s, d)
        return self.out(y)


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, with hook points
    ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out`` and
    ``hook_resid_post``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, *,
                 causal: bool = True, sigma_reparam: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal, sigma_reparam=sigma_reparam)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(_linear(d_model, mlp_ratio * d_model, sigma_reparam), nn.GELU(),
                                 _linear(mlp_ratio * d_model, d_model, sigma_reparam))
        self.hook_resid_pre, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_resid_mid, self.hook_mlp_out = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Decoder (causal) or encoder transformer over integer tokens ``[N, S]`` or, with
    ``input_dim``, over sequences of vectors ``[N, S, input_dim]`` (e.g. MNIST-1D patches).

    Parameters
    ----------
    vocab, d_model, n_heads, n_layers, seq_len, mlp_ratio
        The usual sizes; ``d_model`` is the width knob of sweeps (``n_heads`` must divide it).
    out_features
        Outputs of the readout head (default ``vocab``).
    input_dim
        If set, inputs are float ``[N, S, input_dim]`` embedded by ``nn.Linear(input_dim,
        d_model)`` (``token_embedding`` is then that layer); otherwise integer tokens.
    causal
        ``True``: decoder (each token attends to itself and earlier ones); ``False``: encoder.
    readout
        ``"last"`` -> ``[N, out]`` from the last token, ``"mean"`` -> mean-pooled ``[N, out]``,
        ``"token"`` -> ``[N, S, out]``.
    alpha
        Initialization scale: the initial weights of every ``nn.Linear`` and ``nn.Embedding``
        (not the LayerNorm gains, not biases) are multiplied by ``alpha`` (Liu et al.,
        Omnigrok, 2023; small ``alpha`` is the small-initialization regime of incremental
        rank learning). PyTorch's default initialization otherwise. A
        :class:`~telescope.models.SigmaReparamLinear` has its ``W`` and ``gamma`` multiplied by
        ``alpha``, so its ``W_hat = alpha W_0`` as well.
    sigma_reparam
        Replace every ``nn.Linear`` of the attention (query, key, value, out) and MLP sublayers
        by a :class:`~telescope.models.SigmaReparamLinear`, ``W_hat = (gamma / sigma(W)) W``
        (Zhai et al., 2023), with ``gamma = sigma(W_0)``: the same function at initialization as
        the plain model built from the same seed. Embeddings and the readout head stay plain.
    """

    def __init__(self, vocab: int = 128, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 seq_len: int = 16, out_features: int | None = None, *, mlp_ratio: int = 4,
                 causal: bool = True, readout: str = "last", input_dim: int | None = None,
                 alpha: float = 1.0, sigma_reparam: bool = False) -> None:
        super().__init__()
        if readout not in ("last", "mean", "token"):
            raise UsageError(f"readout must be 'last', 'mean' or 'token', got {readout!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise UsageError(f"alpha (initialization scale) must be a positive number, got {alpha}")
        if input_dim is not None and input_dim < 1:
            raise UsageError(f"input_dim must be a positive integer or None, got {input_dim}")
        self.seq_len, self.readout, self.input_dim = seq_len, readout, input_dim
        self.token_embedding: nn.Module = (nn.Embedding(vocab, d_model) if input_dim is None
                                           else nn.Linear(input_dim, d_model))
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, causal=causal, sigma_reparam=sigma_reparam)
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab if out_features is None else out_features)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        if alpha != 1.0:
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, (nn.Linear, nn.Embedding)):
                        module.weight.mul_(alpha)
                    elif isinstance(module, SigmaReparamLinear):
                        module.weight.mul_(alpha)
                        module.gamma.mul_(alpha)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.input_dim is None:
            if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
                raise UsageError(f"TinyTransformer takes integer tokens [N, S], got "
                                f"{tokens.dtype} {list(tokens.shape)} (for float sequences "
                                f"[N, S, D] build it with input_dim=D)")
        elif tokens.dim() != 3 or tokens.shape[-1] != self.input_dim:
            raise UsageError(f"TinyTransformer(input_dim={self.input_dim}) takes float inputs "
                             f"[N, S, {self.input_dim}], got {list(tokens.shape)}")
        n, s = tokens.shape[:2]
        if s > self.seq_len:
            raise UsageError(f"sequence length {s} exceeds the model's seq_len {self.seq_len}")
        # positions expanded per example, so every module sees a batch dimension
        pos = torch.arange(s, device=tokens.device).expand(n, s)
        x = self.hook_embed(self.token_embedding(tokens)) + self.hook_pos_embed(
            self.position_embedding(pos))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.readout == "last":
            x = x[:, -1]
        elif self.readout == "mean":
            x = x.mean(dim=1)
        return self.head(x)
