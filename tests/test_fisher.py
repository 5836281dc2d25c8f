"""The Neural Fisher Kernel (telescope.kernels.fisher) against its dense formula built from
per-example scores by an explicit torch.autograd.grad loop; the low-rank features against the
dense kernel and the oracle's own eigendecomposition of F; the model-Fisher identity E[g] = 0;
and the VAE of telescope.models.vae against torch.distributions and quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from torch import nn

from telescope.errors import UsageError
from telescope.kernels import fisher_information, fisher_kernel, lowrank_fisher_kernel
from telescope.kernels.fisher import logsumexp_log_likelihood
from telescope.models.vae import VAE, EncoderMean, NoisyELBO

D64 = torch.float64


def _mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(D64)


def _oracle_scores(model: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    """Independent oracle: one torch.autograd.grad call per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        val = fn(model, x[n:n + 1]).reshape(())
        grads = torch.autograd.grad(val, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def _oracle_fisher(gf: torch.Tensor, weights: torch.Tensor | None, center: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.full((gf.shape[0],), 1.0 / gf.shape[0], dtype=D64) if weights is None \
        else weights / weights.sum()
    c = (w[:, None] * gf).sum(0) if center else torch.zeros(gf.shape[1], dtype=D64)
    f = sum(w[m] * torch.outer(gf[m] - c, gf[m] - c) for m in range(gf.shape[0]))
    return f, c


def _oracle_kernel(model, fn, x1, x2, xf, lam, weights=None, center=False) -> torch.Tensor:
    g1, g2, gf = (_oracle_scores(model, fn, x) for x in (x1, x2, xf))
    f, c = _oracle_fisher(gf, weights, center)
    eye = torch.eye(f.shape[0], dtype=D64)
    return (g1 - c) @ torch.linalg.solve(f + lam * eye, (g2 - c).T)


def _lse(model, x):
    return torch.logsumexp(model(x), 1)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("m_fisher", [60, 12])          # P = 31: primal (P <= M), dual (P > M)
@pytest.mark.parametrize("center", [False, True])
def test_dense_matches_oracle(m_fisher, center):
    model = _mlp((3, 4, 3))
    assert _n_params(model) == 31
    gen = torch.Generator().manual_seed(1)
    xf = torch.randn(m_fisher, 3, generator=gen, dtype=D64)
    x1 = torch.randn(7, 3, generator=gen, dtype=D64)
    x2 = torch.randn(5, 3, generator=gen, dtype=D64)
    w = torch.rand(m_fisher, generator=gen, dtype=D64)
    for weights in (None, w):
        k = fisher_kernel(model, x1, x2, damping=0.05, log_likelihood=_lse, fisher_x=xf,
                          fisher_weights=weights, center=center)
        want = _oracle_kernel(model, _lse, x1, x2, xf, 0.05, weights, center)
        assert k.shape == (7, 5) and k.dtype == D64
        torch.testing.assert_close(k, want, rtol=1e-8, atol=1e-9 * want.abs().max().item())


def test_dense_default_fisher_x_and_symmetry():
    model = _mlp((3, 4, 1))
    x = torch.randn(40, 3, dtype=D64)
    k = fisher_kernel(model, x, damping=1e-2)                 # model(x) is the log-likelihood
    want = _oracle_kernel(model, lambda m, v: m(v)[:, 0], x, x, x, 1e-2)
    torch.testing.assert_close(k, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(k, k.T, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(k).min() > -1e-8


def test_relative_damping_scales_with_top_eigenvalue():
    model = _mlp((3, 4, 3))
    x = torch.randn(50, 3, dtype=D64)
    gf = _oracle_scores(model, _lse, x)
    f, _ = _oracle_fisher(gf, None, True)
    top = float(torch.linalg.eigvalsh(f)[-1])
    for m in (50, 10):    # primal and dual path
        k = fisher_kernel(model, x[:7], damping=1e-3, damping_convention="relative",
                          log_likelihood=_lse, fisher_x=x[:m], center=True)
        gm = _oracle_scores(model, _lse, x[:m])
        fm, _ = _oracle_fisher(gm, None, True)
        top_m = float(torch.linalg.eigvalsh(fm)[-1])
        want = _oracle_kernel(model, _lse, x[:7], x[:7], x[:m], 1e-3 * top_m, center=True)
        torch.testing.assert_close(k, want, rtol=1e-7, atol=1e-9 * want.abs().max().item())
    assert top > 0


def test_damping_zero_needs_an_invertible_fisher():
    model = _mlp((3, 4, 3))
    x = torch.randn(60, 3, dtype=D64)
    # uncentered, M > P: F is invertible and damping=0 is the plain inverse
    k = fisher_kernel(model, x[:5], damping=0.0, log_likelihood=_lse, fisher_x=x)
    want = _oracle_kernel(model, _lse, x[:5], x[:5], x, 0.0)
    torch.testing.assert_close(k, want, rtol=1e-6, atol=1e-8 * want.abs().max().item())
    # centered logsumexp: shifting every logit's bias by t moves logsumexp by t everywhere, an
    # exact null direction of the centered F
    with pytest.raises(UsageError, match="invertible Fisher"):
        fisher_kernel(model, x[:5], damping=0.0, log_likelihood=_lse, fisher_x=x, center=True)
    with pytest.raises(UsageError, match="P=31 > M=10"):
        fisher_kernel(model, x[:5], damping=0.0, log_likelihood=_lse, fisher_x=x[:10])


# --------------------------------------------------------------------------- low rank


def test_lowrank_reproduces_dense_at_full_rank_invertible_fisher():
    """P <= M, uncentered: F is invertible, so rank P reproduces the kernel everywhere. (Its
    condition number is ~1e12 here, so damping=0 would measure round-off, not the method.)"""
    model = _mlp((3, 4, 3))
    gen = torch.Generator().manual_seed(2)
    xf = torch.randn(80, 3, generator=gen, dtype=D64)
    x = torch.randn(9, 3, generator=gen, dtype=D64)       # not Fisher samples
    p = _n_params(model)
    for lam in (1e-4, 0.03):
        phi = lowrank_fisher_kernel(model, x, p, damping=lam, log_likelihood=_lse, fisher_x=xf,
                                    n_iter=3)
        want = _oracle_kernel(model, _lse, x, x, xf, lam)
        assert phi.shape == (9, p)
        torch.testing.assert_close(phi @ phi.T, want, rtol=1e-6,
                                   atol=1e-8 * want.abs().max().item())


def test_lowrank_centered_null_direction():
    """Centered logsumexp has one exact null direction that every centered score is orthogonal
    to, so rank P - 1 reproduces the damped dense kernel; rank P is refused."""
    model = _mlp((3, 4, 3))
    gen = torch.Generator().manual_seed(3)
    xf = torch.randn(80, 3, generator=gen, dtype=D64)
    x = torch.randn(6, 3, generator=gen, dtype=D64)
    p = _n_params(model)
    phi = lowrank_fisher_kernel(model, x, p - 1, damping=0.1, log_likelihood=_lse, fisher_x=xf,
                                center=True, n_iter=3)
    want = _oracle_kernel(model, _lse, x, x, xf, 0.1, center=True)
    torch.testing.assert_close(phi @ phi.T, want, rtol=1e-6, atol=1e-8 * want.abs().max().item())
    with pytest.raises(UsageError, match="numerical rank"):
        lowrank_fisher_kernel(model, x, p, damping=0.1, log_likelihood=_lse, fisher_x=xf,
                              center=True, n_iter=3)


def test_lowrank_more_parameters_than_fisher_samples():
    """P > M: at rank M the features reproduce the kernel on the Fisher samples; elsewhere the
    dense kernel holds in addition lambda^-1 g^T (I - V V^T) g' (V from the oracle's eigh)."""
    model = _mlp((3, 6, 3))
    gen = torch.Generator().manual_seed(4)
    m = 15
    xf = torch.randn(m, 3, generator=gen, dtype=D64)
    x = torch.randn(5, 3, generator=gen, dtype=D64)
    lam = 0.02
    both = torch.cat([xf, x])
    phi = lowrank_fisher_kernel(model, both, m, damping=lam, log_likelihood=_lse, fisher_x=xf,
                                oversample=0, n_iter=0)
    dense = fisher_kernel(model, both, damping=lam, log_likelihood=_lse, fisher_x=xf)
    torch.testing.assert_close((phi @ phi.T)[:m, :m], dense[:m, :m], rtol=1e-7,
                               atol=1e-9 * dense.abs().max().item())
    g = _oracle_scores(model, _lse, both)
    f, _ = _oracle_fisher(g[:m], None, False)
    evals, evecs = torch.linalg.eigh(f)
    v = evecs[:, -m:]                                       # the range of F
    outside = (g @ g.T - (g @ v) @ (g @ v).T) / lam
    torch.testing.assert_close(dense - phi @ phi.T, outside, rtol=1e-6,
                               atol=1e-8 * outside.abs().max().item())
    assert outside[m:, m:].diagonal().min() > 0


def test_lowrank_truncation_matches_oracle_eigenpairs():
    model = _mlp((3, 5, 3))
    gen = torch.Generator().manual_seed(5)
    xf = torch.randn(70, 3, generator=gen, dtype=D64)
    x = torch.randn(8, 3, generator=gen, dtype=D64)
    lam = 1e-3
    gf, gx = _oracle_scores(model, _lse, xf), _oracle_scores(model, _lse, x)
    f, c = _oracle_fisher(gf, None, True)
    evals, evecs = torch.linalg.eigh(f)
    evals, evecs = evals.flip(0), evecs.flip(1)
    errors = []
    dense = fisher_kernel(model, xf, damping=lam, log_likelihood=_lse, center=True)
    for k in (2, 5, 10):
        phi, spec, lam_abs = lowrank_fisher_kernel(
            model, torch.cat([x, xf]), k, damping=lam, log_likelihood=_lse, fisher_x=xf,
            center=True, oversample=10, n_iter=25, return_spectrum=True)
        assert lam_abs == lam
        torch.testing.assert_close(spec, evals[:k], rtol=1e-8, atol=0)
        vk = evecs[:, :k]
        want = ((gx - c) @ vk) / (evals[:k] + lam) @ ((gx - c) @ vk).T
        torch.testing.assert_close(phi[:8] @ phi[:8].T, want, rtol=1e-6,
                                   atol=1e-8 * want.abs().max().item())
        errors.append(float(torch.linalg.norm(dense - phi[8:] @ phi[8:].T)))
    assert errors[0] > errors[1] > errors[2]


def test_features_are_white_on_the_fisher_samples_and_damping_rescales():
    model = _mlp((4, 6, 3))
    x = torch.randn(50, 4, dtype=D64)
    m = x.shape[0]
    phi0, spec, _ = lowrank_fisher_kernel(model, x, 8, damping=0.0, log_likelihood=_lse,
                                          center=True, return_spectrum=True)
    torch.testing.assert_close(phi0.T @ phi0 / m, torch.eye(8, dtype=D64), rtol=0, atol=1e-8)
    torch.testing.assert_close(phi0.mean(0), torch.zeros(8, dtype=D64), rtol=0, atol=1e-8)
    phi1, _, lam = lowrank_fisher_kernel(model, x, 8, damping=0.1, damping_convention="relative",
                                         log_likelihood=_lse, center=True, return_spectrum=True)
    assert lam == pytest.approx(0.1 * float(spec[0]))
    torch.testing.assert_close(phi1, phi0 * (spec / (spec + lam)).sqrt(), rtol=1e-8, atol=1e-10)


def test_lowrank_params_subset_deterministic_and_model_untouched():
    model = _mlp((3, 5, 3))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(40, 3, dtype=D64)
    a = lowrank_fisher_kernel(model, x, 6, damping=0.01, log_likelihood=_lse, params="0.*",
                              seed=3)
    b = lowrank_fisher_kernel(model, x, 6, damping=0.01, log_likelihood=_lse, params="0.*",
                              seed=3)
    assert torch.equal(a, b)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad
    # the first layer's kernel: the oracle restricted to those parameters
    first = [p for n, p in model.named_parameters() if n.startswith("0.")]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_lse(model, x[i:i + 1])[0], first)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    evals, evecs = torch.linalg.eigh(g.T @ g / x.shape[0])
    vk, lk = evecs[:, -6:], evals[-6:]
    want = (g @ vk) / (lk + 0.01) @ (g @ vk).T
    torch.testing.assert_close(a @ a.T, want, rtol=1e-5, atol=1e-7 * want.abs().max().item())


def test_float32_model_returns_float32():
    model = _mlp((3, 5, 3)).float()
    x = torch.randn(30, 3)
    phi = lowrank_fisher_kernel(model, x, 4, damping=0.0, log_likelihood=_lse)
    assert phi.dtype == torch.float32 and phi.shape == (30, 4)
    dense = fisher_kernel(model.double(), x.double(), damping=1e-6, damping_convention="relative",
                          log_likelihood=_lse)
    assert torch.isfinite(dense).all()


# --------------------------------------------------------------------------- E[g] = 0


def _categorical():
    """A classifier whose examples are (x, y) with y in the last column; its normalized
    log-likelihood log p(y|x) and an unnormalized one (the raw logit)."""
    net = _mlp((3, 5, 4), seed=7)

    class Joint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, xy):
            logits = self.net(xy[:, :3])
            idx = xy[:, 3].long()[:, None]
            return torch.log_softmax(logits, 1).gather(1, idx)[:, 0]

    def raw_logit(model, xy):
        return model.net(xy[:, :3]).gather(1, xy[:, 3].long()[:, None])[:, 0]

    return Joint(), net, raw_logit


def test_model_fisher_mean_score_is_zero_and_matches_closed_form():
    joint, net, raw_logit = _categorical()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 3, generator=gen, dtype=D64)
    c = 4
    xy = torch.cat([x.repeat_interleave(c, 0),
                    torch.arange(c, dtype=D64).repeat(20)[:, None]], 1)
    with torch.no_grad():
        probs = torch.softmax(net(x), 1).reshape(-1)
    fisher, mean = fisher_information(joint, xy, weights=probs)
    assert mean.abs().max() < 1e-12 * fisher.diagonal().max().sqrt()
    # closed form of the softmax Fisher: mean over x of J^T (diag p - p p^T) J
    params = list(net.parameters())
    want = torch.zeros_like(fisher)
    for i in range(20):
        logits = net(x[i:i + 1])[0]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in
                                      torch.autograd.grad(logits[o], params, retain_graph=True)])
                           for o in range(c)])
        p = torch.softmax(logits.detach(), 0)
        want += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / 20
    torch.testing.assert_close(fisher, want, rtol=1e-9, atol=1e-12)
    # the unnormalized log-likelihood does not have a zero mean score
    _, mean_raw = fisher_information(joint, xy, log_likelihood=raw_logit, weights=probs)
    assert mean_raw.norm() > 0.1 * fisher.diagonal().sum().sqrt()


def test_model_fisher_mean_score_monte_carlo():
    joint, net, raw_logit = _categorical()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3000, 3, generator=gen, dtype=D64)
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(net(x), 1), 1, generator=gen)
    xy = torch.cat([x, y.to(D64)], 1)
    for fn, zero in ((None, True), (raw_logit, False)):
        fisher, mean = fisher_information(joint, xy, log_likelihood=fn, center=True)
        z = mean / (fisher.diagonal() / xy.shape[0]).sqrt()     # standard errors
        if zero:
            assert z.abs().max() < 5.0
        else:
            assert z.abs().max() > 20.0


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    model = _mlp((3, 4, 3))
    x = torch.randn(20, 3, dtype=D64)
    for bad in (-1.0, math.nan, math.inf, True, "0.1", None):
        with pytest.raises(UsageError, match="damping"):
            fisher_kernel(model, x, damping=bad, log_likelihood=_lse)
        with pytest.raises(UsageError, match="damping"):
            lowrank_fisher_kernel(model, x, 2, damping=bad, log_likelihood=_lse)
    with pytest.raises(UsageError, match="damping_convention"):
        fisher_kernel(model, x, damping=0.1, damping_convention="trace", log_likelihood=_lse)
    for rank in (0, 21, True, 2.0):
        with pytest.raises(UsageError, match="rank must be an int"):
            lowrank_fisher_kernel(model, x, rank, damping=0.1, log_likelihood=_lse)
    with pytest.raises(UsageError, match="minus one for centering"):
        lowrank_fisher_kernel(model, x, 20, damping=0.1, log_likelihood=_lse, center=True)
    with pytest.raises(UsageError, match="one log-likelihood per example"):
        fisher_kernel(model, x, damping=0.1)                   # 3 outputs, no log_likelihood
    with pytest.raises(UsageError, match="one log-likelihood per example"):
        lowrank_fisher_kernel(model, x, 2, damping=0.1)
    with pytest.raises(UsageError, match="fisher_weights"):
        fisher_kernel(model, x, damping=0.1, log_likelihood=_lse,
                      fisher_weights=torch.ones(3, dtype=D64))
    with pytest.raises(UsageError, match="fisher_weights"):
        fisher_kernel(model, x, damping=0.1, log_likelihood=_lse,
                      fisher_weights=-torch.ones(20, dtype=D64))
    with pytest.raises(UsageError, match="center=True needs"):
        lowrank_fisher_kernel(model, x, 1, damping=0.1, log_likelihood=_lse, center=True,
                              fisher_weights=torch.eye(20, dtype=D64)[0])
    with pytest.raises(UsageError, match="per-example shape"):
        fisher_kernel(model, x, damping=0.1, log_likelihood=_lse,
                      fisher_x=torch.randn(5, 4, dtype=D64))
    with pytest.raises(UsageError, match="lowrank_fisher_kernel"):
        fisher_kernel(model, x, damping=0.1, log_likelihood=_lse, max_memory_gb=1e-9)
    with pytest.raises(UsageError, match="rcond"):
        fisher_kernel(model, x, damping=0.0, log_likelihood=_lse, rcond=2.0)
    with pytest.raises(UsageError, match="log_likelihood must be a function"):
        fisher_kernel(model, x, damping=0.1, log_likelihood="lse")
    with pytest.raises(UsageError, match="logits of shape"):
        logsumexp_log_likelihood(lambda t: t.sum(1), x)


def test_logsumexp_log_likelihood_is_the_energy_reading():
    model = _mlp((3, 4, 5))
    x = torch.randn(6, 3, dtype=D64)
    torch.testing.assert_close(logsumexp_log_likelihood(model, x),
                               torch.log(torch.exp(model(x)).sum(1)))


# --------------------------------------------------------------------------- the VAE


def test_vae_pieces_against_torch_distributions():
    torch.manual_seed(0)
    for likelihood in ("bernoulli", "gaussian"):
        vae = VAE(5, [7], 3, likelihood=likelihood).to(D64)
        if likelihood == "gaussian":
            with torch.no_grad():
                vae.log_scale.copy_(torch.linspace(-0.5, 0.5, 5))
        x = (torch.rand(4, 5, dtype=D64) > 0.5).to(D64) if likelihood == "bernoulli" \
            else torch.randn(4, 5, dtype=D64)
        z = torch.randn(4, 3, dtype=D64)
        out = vae.decoder(z)
        if likelihood == "bernoulli":
            want = torch.distributions.Bernoulli(logits=out).log_prob(x).sum(1)
        else:
            want = torch.distributions.Normal(out, vae.log_scale.exp()).log_prob(x).sum(1)
        torch.testing.assert_close(vae.log_px_given_z(x, z), want)
        mu, logvar = vae.encode(x)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
        torch.testing.assert_close(VAE.kl(mu, logvar),
                                   torch.distributions.kl_divergence(q, prior).sum(1))
        eps = torch.randn(4, 6, 3, dtype=D64)
        rec = torch.stack([vae.log_px_given_z(x, mu + (0.5 * logvar).exp() * eps[:, s])
                           for s in range(6)], 1).mean(1)
        torch.testing.assert_close(vae.elbo(x, eps), rec - VAE.kl(mu, logvar))
        noisy = NoisyELBO(vae, 6)
        xe = torch.cat([x, eps.reshape(4, 18)], 1)
        torch.testing.assert_close(noisy(xe), vae.elbo(x, eps))
        torch.testing.assert_close(noisy(xe[1:3]), noisy(xe)[1:3])   # batch independent
        torch.testing.assert_close(EncoderMean(vae)(x), mu)
        vae.eval()
        torch.testing.assert_close(vae(x), vae.elbo(x))


def test_vae_marginal_is_normalized_and_elbo_is_a_bound():
    """A Bernoulli VAE with D=3 pixels and one latent: p(x) = int p(x|z) N(z) dz by quadrature
    sums to 1 over the 8 binary images, and the exact ELBO (its expectation over eps, also by
    quadrature) is below log p(x) for every x."""
    torch.manual_seed(1)
    vae = VAE(3, [6], 1).to(D64).eval()
    xs = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)], dtype=D64)
    nodes, weights = (torch.from_numpy(a).to(D64) for a in hermegauss(80))
    weights = weights / math.sqrt(2 * math.pi)                   # quadrature against N(0, 1)
    with torch.no_grad():
        logp = torch.stack([vae.log_px_given_z(xs, torch.full((8, 1), float(z), dtype=D64))
                            for z in nodes], 1)
        px = (logp.exp() * weights).sum(1)
        assert float(px.sum()) == pytest.approx(1.0, abs=1e-10)
        eps = nodes.reshape(1, -1, 1).expand(8, -1, 1)
        mu, logvar = vae.encode(xs)
        z = mu[:, None] + (0.5 * logvar).exp()[:, None] * eps
        elbo = (vae.log_px_given_z(xs, z) * weights).sum(1) - VAE.kl(mu, logvar)
        assert torch.all(elbo <= px.log() + 1e-12)
        # sample() draws from that marginal
        gen = torch.Generator().manual_seed(2)
        draws = vae.sample(40000, gen)
        codes = (draws * torch.tensor([1.0, 2.0, 4.0], dtype=D64)).sum(1).long()
        freq = torch.bincount(codes, minlength=8).to(D64) / 40000
        se = (px * (1 - px) / 40000).sqrt()
        assert ((freq - px).abs() / se).max() < 5.0


def test_decoder_score_has_zero_mean_under_the_model():
    """E_{x ~ p(x|z)}[d log p(x|z) / d theta] = 0, by enumerating the 2^4 binary images with
    their model probabilities as Fisher weights (the decoder alone is a normalized model)."""
    torch.manual_seed(3)
    vae = VAE(4, [5], 2).to(D64).eval()
    z = torch.randn(1, 2, dtype=D64)
    xs = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=D64)

    def ll(model, x):
        return model.log_px_given_z(x, z.expand(x.shape[0], 2))

    with torch.no_grad():
        probs = ll(vae, xs).exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    fisher, mean = fisher_information(vae, xs, log_likelihood=ll, weights=probs,
                                      params="decoder.*")
    assert mean.abs().max() < 1e-12 * fisher.diagonal().max().sqrt()


def test_marginal_score_is_zero_under_the_model_but_not_the_elbo_score():
    """With one latent, log p(x) by Gauss-Hermite quadrature is a normalized log-likelihood of the
    8 binary images: its score has mean 0 under p(x); the ELBO (a surrogate) does not."""
    torch.manual_seed(4)
    vae = VAE(3, [6], 1).to(D64).eval()
    xs = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)], dtype=D64)
    nodes, weights = (torch.from_numpy(a).to(D64) for a in hermegauss(60))
    logw = weights.log() - 0.5 * math.log(2 * math.pi)

    def log_marginal(model, x):
        z = nodes.reshape(1, -1, 1).expand(x.shape[0], -1, 1)
        return torch.logsumexp(model.log_px_given_z(x, z) + logw, dim=1)

    with torch.no_grad():
        px = log_marginal(vae, xs).exp()
    assert float(px.sum()) == pytest.approx(1.0, abs=1e-10)
    fisher, mean = fisher_information(vae, xs, log_likelihood=log_marginal, weights=px,
                                      params="decoder.*")
    scale = fisher.diagonal().max().sqrt()
    assert mean.abs().max() < 1e-10 * scale
    _, mean_elbo = fisher_information(vae, xs, weights=px, params="decoder.*")
    assert mean_elbo.abs().max() > 1e-3 * scale


def test_vae_errors():
    with pytest.raises(UsageError, match="likelihood"):
        VAE(4, [5], 2, likelihood="poisson")
    with pytest.raises(UsageError, match="hidden"):
        VAE(4, [], 2)
    vae = VAE(4, [5], 2)
    with pytest.raises(UsageError, match="eps must be"):
        vae.elbo(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(UsageError, match="samples must be"):
        NoisyELBO(vae, 0)
    with pytest.raises(UsageError, match=r"\[N, 8\]"):
        NoisyELBO(vae, 2)(torch.zeros(3, 4))
    with pytest.raises(UsageError, match="n must be"):
        vae.sample(0)
