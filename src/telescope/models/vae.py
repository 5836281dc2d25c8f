r"""A small variational autoencoder (Kingma & Welling 2014) whose ELBO is a per-example function.

``VAE`` has a Gaussian encoder ``q(z|x) = N(mu(x), diag(sigma^2(x)))`` (an MLP body, then linear
heads for ``mu`` and ``log sigma^2``), a standard normal prior ``p(z) = N(0, I)`` and an MLP
decoder with a Bernoulli likelihood (binary pixels; ``p(x|z) = prod_d Bern(x_d; sigmoid(l_d(z)))``)
or a Gaussian one (``N(x; m(z), diag(s^2))`` with a learned per-pixel ``log s``). Its evidence
lower bound, for one example and ``S`` reparameterization draws ``z_s = mu + sigma * eps_s``,

.. math::

    \mathrm{ELBO}(x) = \frac1S \sum_{s=1}^S \log p(x \mid z_s)
        - \mathrm{KL}\big(q(z|x) \,\|\, N(0, I)\big), \qquad
    \mathrm{KL} = \tfrac12 \sum_j (\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2),

is a lower bound on ``log p_theta(x)`` (its Monte Carlo estimate for the first term, the KL in
closed form). Both likelihoods are normalized densities of ``x`` given ``z`` (the Bernoulli one
on binary ``x``), so :meth:`VAE.sample` draws from the model's own ``p_theta(x)``.

``forward(x)`` is the per-example ELBO: with one fresh draw per example in train mode (the
training objective, ``loss = -elbo.mean()``), and with ``z = mu`` in eval mode (deterministic).
A kernel needs a deterministic per-example function whose noise belongs to its example:
:class:`NoisyELBO` takes inputs that carry their own draws, ``[x, eps_1, ..., eps_S]`` (built by
:meth:`NoisyELBO.augment`), and returns the ELBO estimate with exactly those draws (common random
numbers), the log-likelihood surrogate of the Neural Fisher Kernel of a VAE (Zhang et al. 2022,
:func:`telescope.kernels.fisher.lowrank_fisher_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.models.hooks import HookPoint
from telescope.models.mlp import MLP

__all__ = ["VAE", "NoisyELBO", "EncoderMean"]

_LIKELIHOODS = ("bernoulli", "gaussian")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class VAE(nn.Module):
    """Gaussian-latent VAE with MLP encoder and decoder.

    Parameters
    ----------
    in_features : int
        Input size ``D`` (inputs are flattened).
    hidden : sequence of int
        Encoder hidden widths (at least one); the decoder uses them reversed.
    latent : int
        Latent size ``L``.
    likelihood : {"bernoulli", "gaussian"}
        ``p(x|z)``: Bernoulli on binary pixels, or Gaussian with a learned per-pixel scale.
    activation : {"relu", "tanh", "gelu"}
    """

    def __init__(self, in_features: int, hidden: Sequence[int], latent: int, *,
                 likelihood: str = "bernoulli", activation: str = "relu") -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1 or int(in_features) < 1 or int(latent) < 1:
            raise UsageError(f"VAE needs in_features >= 1, at least one hidden width >= 1 and "
                             f"latent >= 1, got {in_features}, {hidden}, {latent}")
        if likelihood not in _LIKELIHOODS:
            raise UsageError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
        if activation not in _ACTIVATIONS:
            raise UsageError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                             f"{activation!r}")
        self.in_features, self.latent, self.likelihood = int(in_features), int(latent), likelihood
        layers: list[nn.Module] = []
        for n_in, n_out in zip([self.in_features, *hidden[:-1]], hidden, strict=True):
            layers += [nn.Linear(n_in, n_out), _ACTIVATIONS[activation]()]
        self.body = nn.Sequential(*layers)
        self.hook_hidden = HookPoint()
        self.mu = nn.Linear(hidden[-1], self.latent)
        self.logvar = nn.Linear(hidden[-1], self.latent)
        self.hook_mu = HookPoint()
        self.decoder = MLP(self.latent, hidden[::-1], self.in_features, activation=activation)
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(self.in_features))

    # -- pieces ---------------------------------------------------------------------------------
    def hidden(self, x: Tensor) -> Tensor:
        """The encoder's last hidden layer ``[N, hidden[-1]]``."""
        return self.hook_hidden(self.body(x.flatten(1)))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma^2)`` of ``q(z|x)``, each ``[N, L]``."""
        h = self.hidden(x)
        return self.hook_mu(self.mu(h)), self.logvar(h)

    def log_px_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z)`` summed over pixels; ``z`` is ``[N, L]`` or ``[N, S, L]`` -> ``[N]`` or
        ``[N, S]``."""
        x = x.flatten(1)
        out = self.decoder(z.reshape(-1, self.latent)).reshape(*z.shape[:-1], self.in_features)
        xb = x if z.ndim == 2 else x[:, None, :]
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, xb.expand_as(out),
                                                       reduction="none").sum(-1)
        var = torch.exp(2 * self.log_scale)
        return (-0.5 * (xb - out) ** 2 / var - self.log_scale
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def kl(mu: Tensor, logvar: Tensor) -> Tensor:
        """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per example ``[N]``."""
        return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)

    def elbo(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """The per-example ELBO ``[N]`` with the given standard normal draws ``eps`` (``[N, L]``
        or ``[N, S, L]``, averaged over ``S``), or with ``z = mu`` when ``eps`` is ``None``."""
        mu, logvar = self.encode(x)
        if eps is None:
            rec = self.log_px_given_z(x, mu)
        else:
            if (eps.ndim not in (2, 3) or eps.shape[0] != mu.shape[0]
                    or eps.shape[-1] != self.latent):
                raise UsageError(f"eps must be [N, L] or [N, S, L] with N={mu.shape[0]}, "
                                 f"L={self.latent}, got {tuple(eps.shape)}")
            std = (0.5 * logvar).exp()
            z = (mu + std * eps) if eps.ndim == 2 else (mu[:, None] + std[:, None] * eps)
            rec = self.log_px_given_z(x, z)
            rec = rec if rec.ndim == 1 else rec.mean(1)
        return rec - self.kl(mu, logvar)

    def forward(self, x: Tensor) -> Tensor:
        """Per-example ELBO ``[N]``: one fresh draw per example in train mode, ``z = mu`` in eval
        mode."""
        if self.training:
            n = x.shape[0]
            eps = torch.randn(n, self.latent, dtype=x.dtype, device=x.device)
            return self.elbo(x, eps)
        return self.elbo(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the model's ``p_theta(x)``: ``z ~ N(0, I)``, then ``x ~ p(x|z)``
        (binary pixels for the Bernoulli likelihood); ``[n, D]`` on the model's device."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"n must be an int >= 1, got {n!r}")
        p = next(self.parameters())
        z = torch.randn(n, self.latent, generator=generator, dtype=p.dtype).to(p.device)
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            u = torch.rand(out.shape, generator=generator, dtype=p.dtype).to(p.device)
            return (u < torch.sigmoid(out)).to(p.dtype)
        noise = torch.randn(out.shape, generator=generator, dtype=p.dtype).to(p.device)
        return out + torch.exp(self.log_scale) * noise


class NoisyELBO(nn.Module):
    """The ELBO of a :class:`VAE` on inputs that carry their own reparameterization draws.

    ``forward(xe)`` takes ``xe = [x, eps_1, ..., eps_S]`` of shape ``[N, D + S * L]`` (from
    :meth:`augment`) and returns ``VAE.elbo(x, eps)`` ``[N]``: deterministic, and each example's
    value depends on that example only, as a kernel needs.
    """

    def __init__(self, vae: VAE, samples: int) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise UsageError(f"samples must be an int >= 1, got {samples!r}")
        self.vae, self.samples = vae, samples

    @property
    def width(self) -> int:
        """``D + S * L``, the per-example width of the inputs :meth:`forward` takes."""
        return self.vae.in_features + self.samples * self.vae.latent

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[x, eps]`` with ``S`` fresh standard normal draws of size ``L`` per example."""
        x = x.flatten(1)
        if x.shape[1] != self.vae.in_features:
            raise UsageError(f"x must have {self.vae.in_features} features per example, got "
                             f"{x.shape[1]}")
        eps = torch.randn(x.shape[0], self.samples * self.vae.latent, generator=generator,
                          dtype=x.dtype).to(x.device)
        return torch.cat([x, eps], dim=1)

    def forward(self, xe: Tensor) -> Tensor:
        if xe.ndim != 2 or xe.shape[1] != self.width:
            raise UsageError(f"NoisyELBO takes [N, D + S*L] = [N, {self.width}] inputs (x and its "
                             f"draws, from augment), got {tuple(xe.shape)}")
        d = self.vae.in_features
        eps = xe[:, d:].reshape(xe.shape[0], self.samples, self.vae.latent)
        return self.vae.elbo(xe[:, :d], eps)


class EncoderMean(nn.Module):
    """``x -> mu(x)`` ``[N, L]``: a :class:`VAE`'s posterior mean (its representation) as a
    module of its own, e.g. for the tangent kernel of the encoder (:func:`telescope.ntk`)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> Tensor:
        return self.vae.encode(x)[0]
