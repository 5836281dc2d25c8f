"""An autoencoder whose bottleneck holds a linear sub-network of depth ``L``.

Sun, Thilak, Littwin, Saremi & Susskind (2021), "Implicit greedy rank learning in autoencoders
via overparameterized linear networks" (ICML 2021 workshop on overparameterization,
arXiv:2107.01301), after Jing, Zbontar & LeCun (2020), "Implicit rank-minimizing autoencoder":
between the encoder ``E`` and the decoder ``D`` sit ``L`` square matrices without biases or
nonlinearities,

.. math::

    u = E(x), \\qquad z = W_L W_{L-1} \\cdots W_1\\, u = P u, \\qquad \\hat x = D(z),

so the latent code ``z`` is ``u`` times the product ``P`` (``P = I`` for ``L = 0``, a plain
autoencoder). Trained by gradient descent, the product of the factors is implicitly biased
towards low rank, and the codes' singular values are learned one at a time (greedily).

``nonlinear=False``: ``E`` and ``D`` are single bias-free linear maps, so the whole network is
the deep linear chain ``x_hat = D P E x`` (:meth:`end_to_end`), whose optimum under the squared
reconstruction error with a ``k``-dimensional code is the projection onto the top-``k``
principal subspace of the (uncentered) data (Baldi & Hornik, 1989).
``nonlinear=True``: ``E`` and ``D`` are MLPs (``hidden`` widths, ``activation``) around the
linear sub-network.

Hook points (:mod:`telescope.models.hooks`): ``hook_encoded`` (``u``, ``[N, code_dim]``) and
``hook_code`` (``z``, ``[N, code_dim]``, what the decoder reads; what
:class:`telescope.lens.CodeRank` measures by default).

Initialization
--------------
The ``L`` factors ``W_l`` (``init``, ``init_scale = s``):

- ``"gaussian"``: i.i.d. ``N(0, s^2 / code_dim)``;
- ``"orthogonal"``: ``s Q_l`` with ``Q_l`` Haar-random orthogonal, so ``P = s^L Q`` with ``Q``
  orthogonal: every direction of the code starts with the same gain, whatever ``L`` (the
  paper's proposal);
- ``"default"``: PyTorch's ``nn.Linear`` initialization (uniform, variance
  ``1 / (3 code_dim)``), times ``s``.

Under the Gaussian and default inits the singular values of ``P`` spread out as ``L`` grows (a
product of ``L`` Gaussian matrices has a few large and many small singular values) and, for
the default one, shrink like ``3^(-L/2)``. The encoder and decoder weights are Gaussian
``N(0, g^2 / fan_in)`` with zero biases; ``g = io_scale`` for the two layers next to the
bottleneck (the encoder's output layer and the decoder's input layer; in the linear case ``E``
and ``D`` themselves), the He gain (``sqrt 2`` for ReLU, 1 otherwise) for the other layers. A
small ``io_scale`` is the small-initialization regime in which learning is greedy.

The learning-rate adjustment
----------------------------
With ``G = dloss/dP``, the gradient of factor ``j`` is ``A_j^T G B_j^T`` with ``A_j = W_L ...
W_{j+1}``, ``B_j = W_{j-1} ... W_1``, so one gradient step with per-factor rates ``eta_j``
changes the product, to first order, by

.. math::

    \\Delta P = -\\sum_{j=1}^{L} \\eta_j\\, A_j A_j^T\\, G\\, B_j^T B_j.

At an orthogonal initialization of scale ``s`` the Gram factors are ``s^{2(L-j)} I`` and
``s^{2(j-1)} I``, so ``Delta P = -(sum_j eta_j) s^{2(L-1)} G``: a deeper sub-network moves
``L`` times faster than one matrix. :meth:`param_groups` gives each factor

.. math::

    \\eta_j = \\frac{\\eta}{L\\, s^{2(L-1)}}

(``s`` the factors' scale, ``init_scale / sqrt 3`` for the default init), which makes ``Delta
P = -eta G`` exactly at an orthogonal initialization (for Gaussian factors of the same scale
only on average over the factors at a fixed ``G``: ``E[A_j A_j^T] = s^{2(L-j)} I``): the whole
sub-network then takes the step a single matrix would, for every ``L``. This is our reading
of the paper's "principled learning rate adjustment", which its abstract names without a
formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.models.hooks import HookPoint

__all__ = ["LinearBottleneckAutoencoder", "AUTOENCODER_INITS"]

#: The initializations of the linear sub-network.
AUTOENCODER_INITS = ("gaussian", "orthogonal", "default")

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _gaussian_(w: Tensor, gain: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        w.normal_(0.0, gain / math.sqrt(w.shape[1]), generator=generator)


class LinearBottleneckAutoencoder(nn.Module):
    """``x -> E -> u -> W_1 ... W_L -> z -> D -> x_hat`` (see the module docstring).

    Parameters
    ----------
    d_in
        Input (and output) dimension.
    code_dim
        Width of the bottleneck: ``u``, ``z`` and every ``W_l`` are ``code_dim`` wide.
    depth
        ``L``, the number of linear factors (``0``: no linear sub-network).
    nonlinear
        ``False``: ``E`` and ``D`` are single linear maps (a deep linear network). ``True``:
        MLPs ``d_in -> hidden... -> code_dim`` and ``code_dim -> reversed(hidden)... -> d_in``.
    hidden, activation
        The MLPs' hidden widths and activation (``"relu"``, ``"tanh"``, ``"gelu"``); only with
        ``nonlinear=True``.
    init, init_scale
        Initialization of the factors (``"gaussian"``, ``"orthogonal"``, ``"default"``) and its
        scale ``s``.
    io_scale
        Gain of the encoder's output layer and the decoder's input layer.
    bias
        Biases in ``E`` and ``D`` (never in the factors); default ``nonlinear``.
    generator
        A ``torch.Generator`` for the initialization (default: torch's global one).
    """

    def __init__(self, d_in: int, code_dim: int, depth: int, *, nonlinear: bool = False,
                 hidden: Sequence[int] = (64,), activation: str = "relu",
                 init: str = "gaussian", init_scale: float = 1.0, io_scale: float = 1.0,
                 bias: bool | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        d_in = _positive_int("d_in", d_in)
        code_dim = _positive_int("code_dim", code_dim)
        depth = _positive_int("depth", depth, 0)
        if init not in AUTOENCODER_INITS:
            raise UsageError(f"init must be one of {AUTOENCODER_INITS}, got {init!r}")
        init_scale = _positive_float("init_scale", init_scale)
        io_scale = _positive_float("io_scale", io_scale)
        if activation not in _ACTIVATIONS:
            raise UsageError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                             f"{activation!r}")
        widths = [int(h) for h in hidden] if nonlinear else []
        if nonlinear and (not widths or min(widths) < 1):
            raise UsageError(f"hidden must be a non-empty list of widths >= 1 with "
                             f"nonlinear=True, got {list(hidden)!r}")
        use_bias = bool(nonlinear) if bias is None else bool(bias)
        self.d_in, self.code_dim, self.depth = d_in, code_dim, depth
        self.nonlinear, self.init, self.init_scale = bool(nonlinear), init, init_scale
        self.io_scale, self.activation = io_scale, activation
        he = math.sqrt(2.0) if activation == "relu" else 1.0

        def mlp(sizes: list[int], gains: list[float]) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                lin = nn.Linear(a, b, bias=use_bias)
                _gaussian_(lin.weight, gains[i], generator)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
                layers.append(lin)
                if i < len(sizes) - 2:
                    layers.append(_ACTIVATIONS[activation]())
            return nn.Sequential(*layers)

        enc_sizes = [d_in, *widths, code_dim]
        dec_sizes = [code_dim, *reversed(widths), d_in]
        self.encoder = mlp(enc_sizes, [he] * len(widths) + [io_scale])
        self.decoder = mlp(dec_sizes, [io_scale] + [he if i < len(widths) - 1 else 1.0
                                                    for i in range(len(widths))])
        self.hook_encoded = HookPoint()
        self.linear = nn.ModuleList(nn.Linear(code_dim, code_dim, bias=False)
                                    for _ in range(depth))
        for lin in self.linear:
            w = lin.weight
            if init == "gaussian":
                _gaussian_(w, init_scale, generator)
            elif init == "orthogonal":
                nn.init.orthogonal_(w, gain=init_scale, generator=generator)
            else:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                with torch.no_grad():
                    w.mul_(init_scale)
        self.hook_code = HookPoint()

    # ------------------------------------------------------------------ forward

    def encode(self, x: Tensor) -> Tensor:
        """The latent codes ``z = P E(x)``, ``[N, code_dim]``."""
        u = self.hook_encoded(self.encoder(x.flatten(1)))
        for lin in self.linear:
            u = lin(u)
        return self.hook_code(u)

    def decode(self, z: Tensor) -> Tensor:
        """The reconstruction ``D(z)``, ``[N, d_in]``."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ matrices

    @property
    def factor_scale(self) -> float:
        """The typical singular value ``s`` of one factor at initialization: ``init_scale``
        (``init_scale / sqrt 3`` for the default init, whose variance is ``1/(3 fan_in)``)."""
        return self.init_scale / (math.sqrt(3.0) if self.init == "default" else 1.0)

    def linear_product(self) -> Tensor:
        """``P = W_L ... W_1`` (``[code_dim, code_dim]``; the identity for ``depth = 0``)."""
        w0 = self.encoder[-1].weight
        p = torch.eye(self.code_dim, dtype=w0.dtype, device=w0.device)
        for lin in self.linear:
            p = lin.weight @ p
        return p

    def end_to_end(self) -> Tensor:
        """The linear network's reconstruction map ``D P E`` (``[d_in, d_in]``, ``x_hat = x @
        M^T``, plus the decoder bias if there is one); only for ``nonlinear=False``."""
        if self.nonlinear:
            raise UsageError("end_to_end() is the matrix of a linear autoencoder; this one has "
                             "nonlinear=True (read the codes through the hook points instead)")
        return self.decoder[0].weight @ self.linear_product() @ self.encoder[0].weight

    def param_groups(self, lr: float, *, adjust_lr: bool = True) -> list[dict]:
        """Optimizer parameter groups: encoder and decoder at ``lr``; the ``L`` factors at
        ``lr / (L s^(2(L-1)))`` with ``adjust_lr`` (the depth adjustment derived in the module
        docstring, ``s`` = :attr:`factor_scale`), else at ``lr``.

        ``torch.optim.SGD(model.param_groups(0.1))`` trains the sub-network as if it were one
        matrix at initialization."""
        lr = _positive_float("lr", lr)
        groups = [{"params": [*self.encoder.parameters(), *self.decoder.parameters()],
                   "lr": lr, "name": "encoder+decoder"}]
        if self.depth:
            factor = self.depth * self.factor_scale ** (2 * (self.depth - 1))
            groups.append({"params": list(self.linear.parameters()),
                           "lr": lr / factor if adjust_lr else lr, "name": "linear"})
        return groups

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, code_dim={self.code_dim}, depth={self.depth}, "
                f"nonlinear={self.nonlinear}, init={self.init!r}, init_scale={self.init_scale:g}"
                f", io_scale={self.io_scale:g}")
