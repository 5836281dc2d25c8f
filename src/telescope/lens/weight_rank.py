"""The rank of what training adds to the weights: ``D = W_t - W_0``.

Small initialization and gradient descent on attention models learn incrementally low-rank
weight updates (Boix-Adsera, Littwin, Abbe, Bengio & Susskind, 2023, "Transformers learn
through gradual rank increase", NeurIPS 2023). This lens snapshots every weight matrix at
construction and measures the spectrum of ``D`` per matrix, and, for every attention module, per
head, of the updates of the two bilinear forms a head computes:

    scores_h(x_i, x_j) = x_i M_QK^h x_j^T / sqrt(d_head),   M_QK^h = W_Q[h]^T W_K[h],
    output_h(x)        = A_h x M_VO^h^T,                     M_VO^h = W_O[:, h] W_V[h],

(biases left out) where ``W_Q[h]``, ``W_K[h]``, ``W_V[h]`` are the ``d_head`` output rows of head
``h`` and ``W_O[:, h]`` the matching ``d_head`` input columns of the output projection. Both are
``d_model x d_model`` of rank at most ``d_head``. Their updates ``D = M_t - M_0`` are measured
like the weights. The lens reads the per-head matrices from the attention module's
``head_weights()`` method (see :class:`WeightRank`).

Per matrix, with singular values ``s_1 >= s_2 >= ...`` of ``D``:
``delta_norm = ||D||_F``, ``sigma_max = s_1``, the stable rank ``||D||_F^2 / ||D||_2^2``
(Rudelson & Vershynin, 2007) and the numerical rank ``#{k : s_k > threshold * s_1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["WeightRank"]

_KINDS = ("weight", "qk", "vo")


def _is_attention(module: nn.Module) -> bool:
    return callable(getattr(module, "head_weights", None))


def _head_forms(name: str, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``[(M_QK^h, M_VO^h) for h]`` of an attention module, float64, detached."""
    with torch.no_grad():
        # a method (_is_attention), which nn.Module's attribute type cannot say
        weights = cast(Callable[[], object], module.head_weights)()
        if not (isinstance(weights, tuple | list) and len(weights) == 4
                and all(isinstance(w, Tensor) and w.dim() == 3 for w in weights)):
            raise UsageError(f"WeightRank: {name or type(module).__name__}.head_weights() must "
                             f"return four tensors (W_Q, W_K, W_V [heads, d_head, d_model], "
                             f"W_O [heads, d_model, d_head])")
        wq, wk, wv, wo = (w.detach().to(torch.float64) for w in weights)
    return [(wq[h].T @ wk[h], wo[h] @ wv[h]) for h in range(wq.shape[0])]


def _row(name: str, kind: str, head: int, d: Tensor, threshold: float) -> dict:
    s = torch.linalg.svdvals(d)
    s_max = float(s[0]) if s.numel() else 0.0
    fro2 = float((s * s).sum())
    if s_max == 0.0:
        stable, rank = 0.0, 0
    else:
        stable, rank = fro2 / s_max ** 2, int((s > threshold * s_max).sum())
    return {"matrix": name, "kind": kind, "head": head, "delta_norm": fro2 ** 0.5,
            "sigma_max": s_max, "stable_rank": stable, "rank": rank}


class WeightRank:
    """Spectra of the weight updates ``D = W_t - W_0`` since construction.

    Parameters
    ----------
    model
        The network. At construction every 2-D parameter (by its ``named_parameters`` name) is
        copied as ``W_0``, and so are the per-head forms ``M_QK^h``, ``M_VO^h`` of every
        attention module: a submodule with a method ``head_weights()`` that returns the
        matrices its heads apply, ``(W_Q, W_K, W_V, W_O)`` with ``W_Q[h]``, ``W_K[h]``,
        ``W_V[h]`` of shape ``[d_head, d_model]`` and ``W_O[h]`` of shape ``[d_model, d_head]``
        (:meth:`telescope.models.transformer.SelfAttention.head_weights`; give your own
        attention module this method to have it measured).
    threshold
        Relative cut-off of the numerical rank: singular values ``> threshold * sigma_max``.

    The snapshots are float64 copies on the CPU (one copy of each matrix, plus two
    ``d_model x d_model`` matrices per head).
    """

    def __init__(self, model: nn.Module, *, threshold: float = 0.01) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (0.0 <= threshold < 1.0):
            raise UsageError(f"threshold must lie in [0, 1), got {threshold}")
        self.model, self.threshold = model, float(threshold)
        self._w0 = {n: self._snap(p) for n, p in model.named_parameters() if p.dim() == 2}
        self._attn = [(n, m) for n, m in model.named_modules() if _is_attention(m)]
        self._forms0 = {n: _head_forms(n, m) for n, m in self._attn}

    @staticmethod
    def _snap(p: Tensor) -> Tensor:
        return p.detach().to(device="cpu", dtype=torch.float64, copy=True)

    def _deltas(self) -> list[tuple[str, str, int, Tensor]]:
        params = dict(self.model.named_parameters())
        out = []
        for name, w0 in self._w0.items():
            if name not in params:
                raise RuntimeError(f"WeightRank: parameter {name!r} no longer exists in the model")
            out.append((name, "weight", -1, self._snap(params[name]) - w0))
        for mname, module in self._attn:
            prefix = f"{mname}." if mname else ""
            for h, ((qk, vo), (qk0, vo0)) in enumerate(
                    zip(_head_forms(mname, module), self._forms0[mname], strict=True)):
                out.append((prefix + "qk", "qk", h, qk.cpu() - qk0.cpu()))
                out.append((prefix + "vo", "vo", h, vo.cpu() - vo0.cpu()))
        return out

    def measure(self, state: object = None) -> list[dict]:
        """One row per matrix (as a :func:`telescope.train.fit` callback, the rows of its
        table ``"WeightRank"``; ``state`` is unused): ``{"matrix", "kind", "head",
        "delta_norm", "sigma_max", "stable_rank", "rank"}`` with ``D = W_t - W_0`` (kind
        ``"weight"``, ``head = -1``) or ``D = M_t - M_0`` per head (kinds ``"qk"``, ``"vo"``,
        matrix ``"<module>.qk"`` / ``"<module>.vo"``). ``stable_rank = ||D||_F^2 / ||D||_2^2``
        and ``rank`` are 0 when ``D = 0``."""
        return [_row(name, kind, head, d, self.threshold)
                for name, kind, head, d in self._deltas()]

    def spectrum(self, name: str, kind: str = "weight", head: int = -1) -> Tensor:
        """Singular values of ``D`` (descending, float64) for one matrix.

        ``name`` is a parameter name for ``kind="weight"``; for ``"qk"``/``"vo"`` the attention
        module's name, with or without the ``".qk"``/``".vo"`` suffix, and ``head`` selects the
        head.
        """
        if kind not in _KINDS:
            raise UsageError(f"kind must be one of {_KINDS}, got {kind!r}")
        if kind == "weight":
            if name not in self._w0:
                raise KeyError(f"WeightRank: no 2-D parameter named {name!r}; known: "
                               f"{sorted(self._w0)}")
            p = dict(self.model.named_parameters())[name]
            return torch.linalg.svdvals(self._snap(p) - self._w0[name])
        if name == kind:  # the model itself is the attention module
            mname = ""
        elif name.endswith(f".{kind}"):
            mname = name[: -len(kind) - 1]
        else:
            mname = name
        modules = dict(self._attn)
        if mname not in modules:
            raise KeyError(f"WeightRank: no attention module named {mname!r}; known: "
                           f"{sorted(modules)}")
        forms, forms0 = _head_forms(mname, modules[mname]), self._forms0[mname]
        if not 0 <= head < len(forms):
            raise IndexError(f"head must be in [0, {len(forms)}), got {head}")
        i = 0 if kind == "qk" else 1
        return torch.linalg.svdvals(forms[head][i].cpu() - forms0[head][i].cpu())
