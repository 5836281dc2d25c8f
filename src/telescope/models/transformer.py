"""A small pre-LN transformer you can read in one sitting.

Attention is written out (``softmax(Q K^T / sqrt(d_head) + mask) V``) instead of calling
``F.scaled_dot_product_attention``: forward-mode AD works on every backend, the attention
probabilities are available to lenses, and every parameter lives in an ``nn.Linear``,
``nn.Embedding`` or ``nn.LayerNorm``, so the structured NTK engine covers the whole model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output projections."""

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head, self.causal = n_heads, d_model // n_heads, causal
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.last_attention: Tensor | None = None  # [N, heads, S, S], kept only if record=True
        self.record = False

    def forward(self, x: Tensor) -> Tensor:
        n, s, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(n, s, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if self.causal:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        attn = scores.softmax(dim=-1)
        if self.record:
            self.last_attention = attn.detach()
        y = (attn @ v).transpose(1, 2).reshape(n, s, d)
        return self.out(y)


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, *,
                 causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Decoder (causal) or encoder transformer over integer tokens ``[N, S]``.

    ``readout``: ``"last"`` -> ``[N, out]`` logits of the last token, ``"mean"`` -> mean-pooled
    ``[N, out]``, ``"token"`` -> ``[N, S, out]``.
    """

    def __init__(self, vocab: int = 128, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 seq_len: int = 16, out_features: int | None = None, *, mlp_ratio: int = 4,
                 causal: bool = True, readout: str = "last") -> None:
        super().__init__()
        if readout not in ("last", "mean", "token"):
            raise ValueError(f"readout must be 'last', 'mean' or 'token', got {readout!r}")
        self.seq_len, self.readout = seq_len, readout
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, causal=causal) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab if out_features is None else out_features)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TinyTransformer takes integer tokens [N, S], got {tokens.dtype}")
        n, s = tokens.shape
        if s > self.seq_len:
            raise ValueError(f"sequence length {s} exceeds the model's seq_len {self.seq_len}")
        # positions expanded per example, so every module sees a batch dimension
        pos = torch.arange(s, device=tokens.device).expand(n, s)
        x = self.token_embedding(tokens) + self.position_embedding(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.readout == "last":
            x = x[:, -1]
        elif self.readout == "mean":
            x = x.mean(dim=1)
        return self.head(x)
