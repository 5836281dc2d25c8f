"""``neural-fisher-kernel``: low-rank Neural Fisher Kernel features as a representation.

Zhang, Zhai, Littwin & Susskind (ICLR 2022) define the Neural Fisher Kernel (NFK) of a network
with a log-likelihood ``ell_theta(x)``, ``K(x, x') = g(x)^T F^{-1} g(x')`` with the score
``g = d ell / d theta`` and the Fisher ``F``, for supervised and unsupervised models alike; they
find it low rank, compute its top eigen-directions matrix-free, and use the rank-``k`` feature
embedding ``phi(x) = Lambda_k^{-1/2} V_k^T g(x)`` as a compact representation that a linear
classifier reads well. This study asks whether that holds for small networks trained here.

One sweep point is (model, seed). The seed draws the data split, the initialization, the batches
and every random draw below.

- **classifier**: an MLP trained with cross-entropy. Its NFK is that of the energy-based reading
  of the classifier (the paper reads every model as an energy-based model; for a classifier
  that is the joint energy model of Grathwohl et al. 2020; our reconstruction):
  ``ell = logsumexp_y f_y(x)``, label-free, with ``center=True`` standing in for the intractable
  ``-d log Z / d theta`` by the training data's mean score; ``F`` is the *empirical* Fisher (the
  covariance of those scores over the training set), since sampling ``p_theta(x)`` of a
  classifier needs MCMC and the network was never trained as a density.
- **vae**: a VAE (:class:`telescope.models.vae.VAE`; Bernoulli pixels on the binarized digits,
  Gaussian on MNIST-1D) trained on the ELBO. Its NFK uses the ELBO as the log-likelihood
  surrogate: ``nfk`` with the reconstruction term at the posterior mean ``z = mu(x)`` (the
  zero-noise draw: deterministic, though no longer a bound; ``VAE.forward`` in eval mode) and
  the empirical Fisher; ``nfk_model`` the same with the *model* Fisher, its Fisher samples
  drawn from the VAE itself (``p_theta(x)`` can be sampled; this is the Fisher information
  proper); ``nfk_mc`` the Monte Carlo ELBO with ``vae.mc_samples`` fixed reparameterization
  draws per example (:class:`telescope.models.vae.NoisyELBO`).

Every representation is read by the same linear probe: scikit-learn's ``LogisticRegression``
(``C = probe_c``) on standardized features, fit on the training set and scored on the test set,
at every rank ``k`` of ``ranks`` (the first ``k`` columns):

- ``nfk*``: :func:`telescope.kernels.fisher.lowrank_fisher_kernel` at the largest rank
  (``damping`` relative to the top Fisher eigenvalue; the Fisher samples are the training set,
  for ``nfk_model`` as many draws from the VAE);
- ``entk``: the top-``k`` eigenvectors of the empirical NTK's trace kernel on the training set
  (the classifier's logits; the VAE's encoder mean ``mu(x)``), ``U sqrt(s)`` for the training
  points and the Nystrom extension ``K(x, X) U / sqrt(s)`` for the test points; the eigenpairs
  from :func:`telescope.lowrank_ntk` (``entk = "lowrank"``) or, exactly, from the dense kernel
  (``"dense"``, much faster for these sizes: the trace kernel's randomized solver needs one
  kernel product per output and column);
- ``own``: the network's own penultimate layer (the VAE's encoder's last hidden layer), in full
  (``rank`` = its width) and reduced to ``k`` dimensions by PCA (``own_pca``); ``latent``: the
  VAE's posterior mean, in full; ``pixels_pca``: the inputs reduced by PCA, the reference a
  representation has to beat.

Rows: ``kind = "probe"`` (``representation``, ``rank``, ``train_acc``, ``test_acc``),
``kind = "spectrum"`` (the top eigenvalues of each NFK's Fisher and of the eNTK: ``index`` 1 for
the largest, ``eigenvalue``, ``eigenvalue_rel`` = eigenvalue / the largest) and one
``kind = "network"`` row (the classifier's own test accuracy or the VAE's test ELBO, 16 draws;
``seconds`` for the point).

Under a standardized probe the Fisher's ``F^{-1}`` and the damping act on the low-rank NFK only
as a rescaling of each eigen-direction (they change no eigenvector), so what the NFK contributes
is its basis: the top eigen-directions of the score covariance. With the empirical Fisher on the
training set, those are the top eigenvectors of the score Gram matrix itself.

The ``quick`` preset (digits, two seeds, ranks 1 to 128) takes about 80 s on one CPU thread.
``full`` (MNIST-1D's 4000 / 1000 split, wider networks, ranks to 256, five seeds, the eNTK by
:func:`telescope.lowrank_ntk`) is meant for a GPU (``device="auto"``). The paper's own scale
(CIFAR-10, ResNets and GANs) is beyond this library's CPU budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from telescope import plotting as fg
from telescope.data import load_digits, load_mnist1d
from telescope.errors import UsageError
from telescope.kernels import lowrank_ntk, ntk
from telescope.kernels.fisher import logsumexp_log_likelihood, lowrank_fisher_kernel
from telescope.models import MLP
from telescope.models.vae import VAE, EncoderMean, NoisyELBO
from telescope.studies._sequence import Columns
from telescope.studies.base import Progress, Study, check_device, resolve_device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit

__all__ = ["NFKData", "ClassifierConfig", "VAEConfig", "NeuralFisherKernelConfig", "COLUMNS",
           "points", "run_point", "figures", "headline", "STUDY"]

MODELS = ("classifier", "vae")
_TEST_ELBO_DRAWS = 16


@config_dataclass
class NFKData:
    """The data set: scikit-learn's 8x8 digits (:func:`telescope.data.load_digits`, 64 pixels;
    standardized for the classifier, binarized at half intensity for the VAE's Bernoulli pixels)
    or MNIST-1D (:func:`telescope.data.load_mnist1d`, 40 standardized features; Gaussian VAE).
    ``None`` sizes: the whole split (digits: 1438 / 359; MNIST-1D: 4000 / 1000)."""

    name: Literal["digits", "mnist1d"] = "digits"
    n_train: PositiveInt | None = None
    n_test: PositiveInt | None = None


@config_dataclass
class ClassifierConfig:
    """The supervised MLP ``in -> hidden -> classes`` (ReLU), Adam on cross-entropy."""

    hidden: NonEmpty[PositiveInt] = (64, 64)
    steps: PositiveInt = 1000
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 128


@config_dataclass
class VAEConfig:
    """The VAE (encoder widths ``hidden``, latent size ``latent``), Adam on the negative ELBO
    (one reparameterization draw per example and step). ``mc_samples``: the draws per example of
    the ``nfk_mc`` variant (0 skips it); ``model_fisher``: also the ``nfk_model`` variant."""

    hidden: NonEmpty[PositiveInt] = (64,)
    latent: PositiveInt = 16
    steps: PositiveInt = 2000
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 128
    mc_samples: NonNegativeInt = 1
    model_fisher: bool = True


@config_dataclass
class NeuralFisherKernelConfig:
    """Config of ``neural-fisher-kernel``; e.g. ``--set ranks=4,16,64 models=classifier``."""

    data: NFKData = field(default_factory=NFKData)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    models: tuple[str, ...] = MODELS         # "classifier", "vae"
    ranks: NonEmpty[PositiveInt] = (1, 2, 4, 8, 16, 32, 64, 128)
    headline_rank: PositiveInt = 4           # the compact rank the headline compares at
    damping: NonNegativeFloat = 0.0          # relative to the largest Fisher eigenvalue
    oversample: NonNegativeInt = 10          # randomized eigensolvers
    n_iter: NonNegativeInt = 2
    entk: Literal["dense", "lowrank"] = "dense"
    probe_c: PositiveFloat = 1.0             # LogisticRegression's inverse regularization
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.ranks)) != len(self.ranks) or list(self.ranks) != sorted(self.ranks):
            raise UsageError(f"ranks must be increasing without repeats, got {self.ranks}")
        if not self.models or any(m not in MODELS for m in self.models):
            raise UsageError(f"models must be a non-empty list of {', '.join(MODELS)}, got "
                             f"{','.join(self.models) or '(none)'}")
        if len(set(self.models)) != len(self.models):
            raise UsageError(f"models must not repeat, got {self.models}")
        if self.headline_rank not in self.ranks:
            raise UsageError(f"headline_rank must be one of ranks {self.ranks}, got "
                             f"{self.headline_rank}")
        n_train = self.data.n_train
        if n_train is not None and max(self.ranks) > n_train - 1:
            raise UsageError(f"the largest of ranks ({max(self.ranks)}) must be <= data.n_train - "
                             f"1 = {n_train - 1} (the centered Fisher of n_train examples has "
                             "rank at most n_train - 1)")
        if self.data.n_train is not None and self.data.n_train < 10:
            raise UsageError(f"data.n_train must be >= 10 (a probe needs every class), got "
                             f"{self.data.n_train}")
        check_device("device", self.device)


PRESETS = {
    "quick": {},
    # the paper works with CIFAR-10-sized networks and data, out of reach of this CPU library;
    # "full" is the largest setting here: MNIST-1D's whole split, wider networks, ranks to 256
    "full": {"data.name": "mnist1d", "seeds": 5, "device": "auto", "entk": "lowrank",
             "classifier.hidden": (256, 256), "classifier.steps": 4000,
             "vae.hidden": (256,), "vae.latent": 32, "vae.steps": 8000, "vae.mc_samples": 4,
             "ranks": (1, 2, 4, 8, 16, 32, 64, 128, 256)},
}

COLUMNS = Columns(text=("kind", "representation"), ints=("rank", "index"),
                  floats=("train_acc", "test_acc", "eigenvalue", "eigenvalue_rel",
                          "network_test_acc", "test_elbo", "seconds"))


def points(config: NeuralFisherKernelConfig) -> list[dict]:
    """The sweep: every model for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"model": m, "seed": int(s)} for s in seeds for m in config.models]


def estimate_memory(config: NeuralFisherKernelConfig, point: dict) -> int:
    """About the peak bytes of one point: the dense trace eNTK and its test block (float64,
    with the eigendecomposition's copies) and the randomized solvers' default 2 GiB budget."""
    n_train = config.data.n_train or (1438 if config.data.name == "digits" else 4000)
    n_test = config.data.n_test or (359 if config.data.name == "digits" else 1000)
    return 8 * (4 * n_train * n_train + 2 * n_test * n_train) + 2 * 2**30


# --------------------------------------------------------------------------- data and probes


def _data(config: NeuralFisherKernelConfig, model: str, seed: int, dtype: torch.dtype):
    d = config.data
    if d.name == "digits":
        if model == "vae":
            data = load_digits(d.n_train, d.n_test, seed=seed, standardize=False, dtype=dtype)
            return ((data.x_train > 0.5).to(dtype), data.y_train, (data.x_test > 0.5).to(dtype),
                    data.y_test, "bernoulli")
        data = load_digits(d.n_train, d.n_test, seed=seed, dtype=dtype)
    else:
        data = load_mnist1d(d.n_train if d.n_train is not None else 4000,
                            d.n_test if d.n_test is not None else 1000, seed=seed, dtype=dtype)
    return data.x_train, data.y_train, data.x_test, data.y_test, "gaussian"


def _probe(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray,
           c: float) -> tuple[float, float]:
    """Train and test accuracy of a standardized multinomial logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(f_train, y_train)
    return float(clf.score(f_train, y_train)), float(clf.score(f_test, y_test))


def _pca(f_train: np.ndarray, f_test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    pca = PCA(k, svd_solver="full").fit(f_train)
    return pca.transform(f_train), pca.transform(f_test)


def _probe_rows(name: str, f_train: Tensor | np.ndarray, f_test: Tensor | np.ndarray,
                y_train: Tensor, y_test: Tensor, ranks: tuple[int, ...] | None, c: float,
                pca: bool = False) -> list[dict]:
    """One probe row per rank (the first ``k`` columns, or ``k`` PCA components with ``pca``);
    ``ranks=None``: one row for all the columns."""
    ftr = np.asarray(f_train.detach().cpu().double() if isinstance(f_train, Tensor) else f_train)
    fte = np.asarray(f_test.detach().cpu().double() if isinstance(f_test, Tensor) else f_test)
    ytr, yte = y_train.cpu().numpy(), y_test.cpu().numpy()
    if pca:
        ftr, fte = _pca(ftr, fte, min(max(ranks or (1,)), ftr.shape[1], ftr.shape[0]))
    rows = []
    for k in (ranks if ranks is not None else (ftr.shape[1],)):
        if k > ftr.shape[1]:
            continue
        train_acc, test_acc = _probe(ftr[:, :k], ytr, fte[:, :k], yte, c)
        rows.append(COLUMNS.row(kind="probe", representation=name, rank=k, train_acc=train_acc,
                                test_acc=test_acc))
    return rows


def _spectrum_rows(name: str, eigenvalues: Tensor) -> list[dict]:
    ev = eigenvalues.detach().cpu().double()
    top = float(ev[0]) if ev.numel() else math.nan
    return [COLUMNS.row(kind="spectrum", representation=name, index=i + 1, eigenvalue=float(v),
                        eigenvalue_rel=float(v) / top if top > 0 else math.nan)
            for i, v in enumerate(ev)]


def _entk_features(config: NeuralFisherKernelConfig, model: nn.Module, x: Tensor, x_test: Tensor,
                   rank: int, seed: int, params: list[str] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` eNTK (trace kernel) features: ``U sqrt(s)`` on ``x``, the Nystrom extension
    ``K(x_test, x) U / sqrt(s)`` on ``x_test``; and ``s``."""
    if config.entk == "lowrank":
        u, s = lowrank_ntk(model, x, rank, output="trace", oversample=config.oversample,
                           n_iter=config.n_iter, seed=seed, params=params)
        u, s = u.double(), s.double()
    else:
        k = ntk(model, x, output="trace", params=params).double()
        evals, evecs = torch.linalg.eigh(0.5 * (k + k.T))
        s, u = evals.flip(0)[:rank].clamp_min(0.0), evecs.flip(1)[:, :rank]
    keep = s > s[0] * 1e-12
    u, s = u[:, keep], s[keep]
    k_test = ntk(model, x_test, x, output="trace", params=params).double()
    return u * s.sqrt(), (k_test @ u) / s.sqrt(), s


# --------------------------------------------------------------------------- the two models


def _neg_elbo(out: Tensor, target: Tensor) -> Tensor:
    """The VAE's training loss: the negative per-example ELBO, averaged (``target`` unused)."""
    return -out.mean()


def _run_classifier(config: NeuralFisherKernelConfig, seed: int, device: torch.device,
                    dtype: torch.dtype, progress: Progress) -> list[dict]:
    x, y, x_test, y_test, _ = _data(config, "classifier", seed, dtype)
    x, x_test = x.to(device), x_test.to(device)
    c = config.classifier
    n_classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = MLP(x.shape[1], c.hidden, n_classes).to(device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)

    def evaluate(m: nn.Module) -> dict:
        return {"test_acc": float((m(x_test).argmax(1).cpu() == y_test).double().mean())}

    history = fit(model, opt, x, y.to(device), steps=c.steps, loss="cross_entropy",
                  batch_size=min(c.batch_size, x.shape[0]),
                  generator=torch.Generator().manual_seed(seed), eval_at=[c.steps],
                  evaluate=evaluate, progress=progress)
    model.eval()
    kmax, ranks = max(config.ranks), tuple(config.ranks)
    rows = [COLUMNS.row(kind="network", network_test_acc=history.rows[-1]["test_acc"])]
    with torch.no_grad():
        own, own_test = model.net[:-1](x), model.net[:-1](x_test)
    rows += _probe_rows("own", own, own_test, y, y_test, None, config.probe_c)
    rows += _probe_rows("own_pca", own, own_test, y, y_test, ranks, config.probe_c, pca=True)
    rows += _probe_rows("pixels_pca", x, x_test, y, y_test, ranks, config.probe_c, pca=True)
    phi, lam, _ = lowrank_fisher_kernel(
        model, torch.cat([x, x_test]), kmax, damping=config.damping,
        damping_convention="relative", log_likelihood=logsumexp_log_likelihood, fisher_x=x,
        center=True, oversample=config.oversample, n_iter=config.n_iter, seed=seed,
        return_spectrum=True)
    n = x.shape[0]
    rows += _probe_rows("nfk", phi[:n], phi[n:], y, y_test, ranks, config.probe_c)
    rows += _spectrum_rows("nfk", lam)
    progress.update()
    e_train, e_test, s = _entk_features(config, model, x, x_test, kmax, seed)
    rows += _probe_rows("entk", e_train, e_test, y, y_test, ranks, config.probe_c)
    rows += _spectrum_rows("entk", s)
    progress.update()
    return rows


def _run_vae(config: NeuralFisherKernelConfig, seed: int, device: torch.device,
             dtype: torch.dtype, progress: Progress) -> list[dict]:
    x, y, x_test, y_test, likelihood = _data(config, "vae", seed, dtype)
    x, x_test = x.to(device), x_test.to(device)
    v = config.vae
    torch.manual_seed(seed)
    vae = VAE(x.shape[1], v.hidden, v.latent, likelihood=likelihood).to(device, dtype)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=v.lr)
    fit(vae, opt, x, torch.zeros(x.shape[0], dtype=dtype, device=device), steps=v.steps,
        loss=_neg_elbo, batch_size=min(v.batch_size, x.shape[0]),
        generator=torch.Generator().manual_seed(seed), progress=progress)
    vae.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        test_elbo = NoisyELBO(vae, _TEST_ELBO_DRAWS)
        elbo = float(test_elbo(test_elbo.augment(x_test, gen)).mean())
        own, own_test = vae.hidden(x), vae.hidden(x_test)
        mu, mu_test = vae.encode(x)[0], vae.encode(x_test)[0]
    kmax, ranks, n = max(config.ranks), tuple(config.ranks), x.shape[0]
    rows = [COLUMNS.row(kind="network", test_elbo=elbo)]
    rows += _probe_rows("own", own, own_test, y, y_test, None, config.probe_c)
    rows += _probe_rows("own_pca", own, own_test, y, y_test, ranks, config.probe_c, pca=True)
    rows += _probe_rows("latent", mu, mu_test, y, y_test, None, config.probe_c)
    rows += _probe_rows("pixels_pca", x, x_test, y, y_test, ranks, config.probe_c, pca=True)
    both = torch.cat([x, x_test])
    common = {"damping": config.damping, "damping_convention": "relative",
              "oversample": config.oversample, "n_iter": config.n_iter, "seed": seed,
              "return_spectrum": True}
    variants: list[tuple[str, nn.Module, Tensor, Tensor]] = [("nfk", vae, both, x)]
    if v.model_fisher:
        variants.append(("nfk_model", vae, both, vae.sample(n, gen)))
    if v.mc_samples > 0:
        noisy = NoisyELBO(vae, v.mc_samples)
        both_aug = noisy.augment(both, gen)
        variants.append(("nfk_mc", noisy, both_aug, both_aug[:n]))
    for name, module, inputs, fisher_x in variants:
        phi, lam, _ = lowrank_fisher_kernel(module, inputs, kmax, fisher_x=fisher_x, **common)
        rows += _probe_rows(name, phi[:n], phi[n:], y, y_test, ranks, config.probe_c)
        rows += _spectrum_rows(name, lam)
        progress.update()
    encoder = ["vae.body.*", "vae.mu.*"]
    e_train, e_test, s = _entk_features(config, EncoderMean(vae), x, x_test,
                                        min(kmax, n), seed, params=encoder)
    rows += _probe_rows("entk", e_train, e_test, y, y_test, ranks, config.probe_c)
    rows += _spectrum_rows("entk", s)
    progress.update()
    return rows


def run_point(config: NeuralFisherKernelConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one model at one seed, then probe every representation at every rank."""
    start = time.perf_counter()
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    model, seed = point["model"], int(point["seed"])
    if model == "classifier":
        progress.set(config.classifier.steps + 2)
        rows = _run_classifier(config, seed, device, dtype, progress)
    else:
        stages = 2 + int(config.vae.model_fisher) + int(config.vae.mc_samples > 0)
        progress.set(config.vae.steps + stages)
        rows = _run_vae(config, seed, device, dtype, progress)
    seconds = time.perf_counter() - start
    for row in rows:
        if row["kind"] == "network":
            row["seconds"] = seconds
    return [{**point, **row} for row in rows]


# --------------------------------------------------------------------------- figures


_LABELS = {
    "nfk": "NFK (empirical Fisher)",
    "nfk_model": "NFK (model Fisher)",
    "nfk_mc": "NFK (Monte Carlo ELBO)",
    "entk": "eNTK",
    "own_pca": "own features, PCA",
    "pixels_pca": "inputs, PCA",
}
_COLORS = {"nfk": "#d62728", "nfk_model": "#ff7f0e", "nfk_mc": "#e377c2", "entk": "#1f77b4",
           "own_pca": "#222222", "pixels_pca": "#8c8c8c"}
_TITLES = {"classifier": "classifier (NFK of logsumexp f)", "vae": "VAE (NFK of the ELBO)"}


def _shared_legend(fig, axes, n: int) -> None:
    """One legend below the panels with every label drawn in any of them (first seen first)."""
    handles: dict[str, object] = {}
    for i in range(n):
        for h, label in zip(*axes[0, i].get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3)


def figures(df: pd.DataFrame, config: NeuralFisherKernelConfig, out_dir: Path) -> list[Path]:
    """Probe test accuracy against rank for every representation (one panel per model), and the
    eigenvalue spectra of the NFKs' Fisher matrices and of the eNTK."""
    models = [m for m in MODELS if m in set(df["model"])]
    n = max(len(models), 1)
    paths = []
    with fg.paper_style():
        fig, axes = fg.new_figure(1, n, sharey=True)
        for i, m in enumerate(models):
            ax = axes[0, i]
            sub = df[(df["model"] == m) & (df["kind"] == "probe")]
            for rep, label in _LABELS.items():
                cur = sub[sub["representation"] == rep]
                if len(cur):
                    fg.plot_mean_spread(ax, cur, "rank", "test_acc", label=label,
                                        color=_COLORS[rep])
            for rep, style, text in (("own", "--", "own features in full"),
                                     ("latent", ":", "VAE latent mean in full")):
                cur = sub[sub["representation"] == rep]
                if len(cur):
                    ax.axhline(float(cur["test_acc"].mean()), color="#222222", linestyle=style,
                               linewidth=1.0, label=text)
            fg.log_axis(ax, "x", base=2)
            ax.set_xlabel("rank k (feature dimensions)")
            if i == 0:
                ax.set_ylabel("linear-probe test accuracy")
            ax.set_title(_TITLES[m])
            fg.panel_label(ax, "ab"[i])
        _shared_legend(fig, axes, len(models))
        paths.append(fg.save_figure(fig, out_dir, "nfk_probe"))

        fig, axes = fg.new_figure(1, n, sharey=True)
        for i, m in enumerate(models):
            ax = axes[0, i]
            sub = df[(df["model"] == m) & (df["kind"] == "spectrum")]
            for rep in ("nfk", "nfk_model", "nfk_mc", "entk"):
                cur = sub[sub["representation"] == rep]
                if len(cur):
                    fg.plot_mean_spread(ax, cur, "index", "eigenvalue_rel", label=_LABELS[rep],
                                        color=_COLORS[rep], marker=None)
            fg.log_axis(ax, "x", base=2)
            fg.log_axis(ax, "y")
            ax.set_xlabel("eigenvalue index j")
            if i == 0:
                ax.set_ylabel("eigenvalue j / eigenvalue 1")
            ax.set_title(_TITLES[m])
            fg.panel_label(ax, "ab"[i])
        _shared_legend(fig, axes, len(models))
        paths.append(fg.save_figure(fig, out_dir, "nfk_spectrum"))
    return paths


# --------------------------------------------------------------------------- headline


def _acc(probe: pd.DataFrame, rep: str, rank: int | None = None) -> pd.Series:
    """Test accuracy per seed of one representation (at one rank, or its only row)."""
    cur = probe[probe["representation"] == rep]
    if rank is not None:
        cur = cur[cur["rank"] == rank]
    return cur.groupby("seed")["test_acc"].mean()


def _spread(s: pd.Series) -> float:
    return float(s.max() - s.min()) if len(s) else math.nan


def _mean(s: pd.Series) -> float:
    return float(s.mean()) if len(s) else math.nan


def _reach(probe: pd.DataFrame, rep: str, own: pd.Series) -> float:
    """The smallest measured rank by which ``rep`` has come within one point (0.01) of the own
    features' test accuracy in full in every seed (the largest over seeds of each seed's first
    such rank); NaN where some seed never gets there."""
    ranks = []
    for seed, s in probe[probe["representation"] == rep].groupby("seed"):
        if seed in own.index:
            good = s[s["test_acc"] >= own[seed] - 0.01]["rank"]
            ranks.append(float(good.min()) if len(good) else math.inf)
    return max(ranks) if ranks and math.isfinite(max(ranks)) else math.nan


def headline(df: pd.DataFrame, config: NeuralFisherKernelConfig) -> dict:
    """Per model: probe test accuracy of the NFK, the eNTK and the PCA of the network's own
    features at the compact rank ``headline_rank`` and at the largest rank (means over seeds,
    with the max - min spread at the compact rank), in how many seeds the NFK beats each there,
    the smallest rank at which each comes within one point of the own features in full (median
    in every seed), how far the Fisher and eNTK spectra fall by the largest rank; then an answer in
    words."""
    out: dict = {"seeds": int(df["seed"].nunique())}
    k, kmax = int(config.headline_rank), int(max(config.ranks))
    words = []
    for m in MODELS:
        sub = df[df["model"] == m]
        if not len(sub):
            continue
        probe = sub[sub["kind"] == "probe"]
        net = sub[sub["kind"] == "network"]
        own = _acc(probe, "own")
        out[f"{m}: own features test acc"] = _mean(own)
        if m == "classifier":
            out["classifier: network test acc"] = float(net["network_test_acc"].mean())
        else:
            out["vae: test ELBO (nats)"] = float(net["test_elbo"].mean())
            out["vae: latent mean test acc"] = _mean(_acc(probe, "latent"))
        at_k = {rep: _acc(probe, rep, k) for rep in ("nfk", "entk", "own_pca", "nfk_model",
                                                     "nfk_mc")}
        for rep, name in _NAMES.items():
            if not len(at_k[rep]):
                continue
            out[f"{m}: {name} test acc at rank {k}"] = _mean(at_k[rep])
            out[f"{m}: {name} test acc at rank {k}, spread"] = _spread(at_k[rep])
            top = _acc(probe, rep, kmax)
            if len(top):
                out[f"{m}: {name} test acc at rank {kmax}"] = _mean(top)
        for rep in ("entk", "own_pca"):
            both = pd.concat([at_k["nfk"], at_k[rep]], axis=1, keys=["a", "b"]).dropna()
            out[f"{m}: seeds where NFK > {_NAMES[rep]} at rank {k}"] = int(
                (both["a"] > both["b"]).sum())
        for rep in ("nfk", "entk", "own_pca"):
            out[f"{m}: rank where {_NAMES[rep]} is within 1 point of own features"] = _reach(
                probe, rep, own)
        spec = sub[(sub["kind"] == "spectrum") & (sub["index"] == kmax)]
        for rep in ("nfk", "entk"):
            cur = spec[spec["representation"] == rep]["eigenvalue_rel"]
            out[f"{m}: {_NAMES[rep]} eigenvalue {kmax} / eigenvalue 1"] = _mean(cur)
        words.append(_words(m, k, kmax, out))
    out["answer"] = " ".join(words)
    return out


_NAMES = {"nfk": "NFK", "entk": "eNTK", "own_pca": "own PCA", "nfk_model": "NFK model Fisher",
          "nfk_mc": "NFK Monte Carlo ELBO"}


def _words(m: str, k: int, kmax: int, h: dict) -> str:
    def g(key: str) -> float:
        return h.get(f"{m}: {key}", math.nan)

    def rank(rep: str) -> str:
        r = g(f"rank where {rep} is within 1 point of own features")
        return f"never (up to {kmax})" if math.isnan(r) else f"{r:g}"

    n = h["seeds"]
    who = "classifier" if m == "classifier" else "VAE"
    text = (f"{who}: at rank {k} the NFK features give {g(f'NFK test acc at rank {k}'):.3f} "
            f"linear-probe test accuracy, the eNTK's {g(f'eNTK test acc at rank {k}'):.3f} and "
            f"{k} PCA components of the network's own features "
            f"{g(f'own PCA test acc at rank {k}'):.3f} (NFK ahead of the eNTK in "
            f"{h[f'{m}: seeds where NFK > eNTK at rank {k}']} and of the PCA in "
            f"{h[f'{m}: seeds where NFK > own PCA at rank {k}']} of {n} seeds); at rank {kmax} "
            f"NFK {g(f'NFK test acc at rank {kmax}'):.3f}, eNTK "
            f"{g(f'eNTK test acc at rank {kmax}'):.3f}, own features in full "
            f"{g('own features test acc'):.3f}. Rank by which every seed has come within one "
            f"point of the own features: NFK {rank('NFK')}, eNTK {rank('eNTK')}, own PCA "
            f"{rank('own PCA')}.")
    if m == "vae" and not math.isnan(g(f"NFK model Fisher test acc at rank {kmax}")):
        text += (f" With the model Fisher (Fisher samples drawn from the VAE) the NFK gives "
                 f"{g(f'NFK model Fisher test acc at rank {kmax}'):.3f} at rank {kmax}")
        if not math.isnan(g(f"NFK Monte Carlo ELBO test acc at rank {kmax}")):
            text += (f", and of the Monte Carlo ELBO with fixed draws "
                     f"{g(f'NFK Monte Carlo ELBO test acc at rank {kmax}'):.3f}")
        text += "."
    return text


GUIDE = """
Linear-probe test accuracy of low-rank Neural Fisher Kernel features (Zhang et al., ICLR 2022)
against the eNTK's and the network's own features, for a classifier and a VAE trained here.

- **nfk_probe, panel a (classifier)**: the NFK of the classifier read as an energy-based model of
  x (score of logsumexp of the logits, centered by the training mean, empirical Fisher), its top-k
  features against the top-k eNTK eigenvectors (trace kernel of the logits, Nystrom extension to
  the test set), k PCA components of the penultimate layer and of the inputs; dashed: the
  penultimate layer in full. Lines are means over seeds, bands span min to max.
- **nfk_probe, panel b (VAE)**: the NFK of the ELBO at the posterior mean with the empirical
  Fisher (red), with the model Fisher from the VAE's own samples (orange) and of the Monte Carlo
  ELBO with fixed draws (pink); the eNTK is that of the encoder mean; dashed / dotted: the
  encoder's last hidden layer and the latent mean in full.
- **nfk_spectrum**: eigenvalue j / eigenvalue 1 of each NFK's Fisher and of the eNTK (log-log):
  the paper's low-rank structure is how fast these fall.

The probe standardizes every feature, so the NFK's F^-1 and damping (which only rescale its
eigen-directions) do not change its accuracy: what the NFK brings is its basis, the top
eigen-directions of the score covariance. With the empirical Fisher these are the top
eigenvectors of the score Gram matrix (the eNTK of the log-likelihood), rescaled to be white.

Everything is in `results.parquet`: `kind` = probe (representation, rank, accuracies), spectrum
(index, eigenvalue) and network (the network's own test accuracy or test ELBO, seconds).
"""

STUDY = Study(
    name="neural-fisher-kernel",
    description="low-rank Neural Fisher Kernel features of a classifier and a VAE vs eNTK and own "
                "features under a linear probe (Zhang et al. 2022)",
    config_cls=NeuralFisherKernelConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
