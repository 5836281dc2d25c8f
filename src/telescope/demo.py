"""The command line's built-in jobs: the kernel demo and the preset kernels of ``telescope ntk``.

The demo: the empirical NTK of small NTK-parametrized ReLU MLPs on MNIST-1D, at several widths,
against the infinite-width NTK they converge to (Jacot et al. 2018), and the test accuracy of
kernel regression (the NTK-theory prediction of a network trained to convergence with the MSE
loss) with both kernels. Everything here composes :mod:`telescope.kernels`; no kernel math lives
in this module.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import telescope
from telescope import kernels
from telescope._table import format_table as _format_table
from telescope.errors import UsageError

DEMO_WIDTHS = (64, 256)
"""Widths shown below the requested width in the demo (``--width 512`` -> 64, 256, 512)."""

RESULT_COLUMNS = ("width", "n_params", "rel_frobenius", "alignment", "effective_rank",
                  "ntk_seconds", "test_accuracy", "n_train", "n_test", "seed")
TABLE_COLUMNS = ("width", "n_params", "rel_frobenius", "alignment", "effective_rank",
                 "ntk_seconds", "test_accuracy")

MODEL_PRESETS = ("mlp", "cnn", "transformer")
DATA_PRESETS = ("mnist1d", "tokens")
DEFAULT_DATA = {"mlp": "mnist1d", "cnn": "mnist1d", "transformer": "tokens"}
TOKENS = {"vocab": 128, "seq_len": 16}
OUTPUTS = {"mlp": 10, "cnn": 10, "transformer": TOKENS["vocab"]}
"""Outputs per input of each preset (the ``O`` of a ``[N, N, O, O]`` kernel)."""


def check_memory(need: int, what: str, fix: str) -> None:
    """Refuse (:class:`~telescope.errors.UsageError`) a job whose arrays need more memory than
    this machine has, before it allocates them; ``what`` and ``fix`` make the message."""
    from telescope.runs.plan import format_bytes, total_memory

    limit = total_memory()
    if limit is not None and need > limit:
        raise UsageError(f"{what} needs about {format_bytes(need)}, more than the "
                         f"{format_bytes(limit)} of memory here: {fix}")


# ---------------------------------------------------------------------------------------------
# the kernel demo
# ---------------------------------------------------------------------------------------------

def check_demo_memory(n: int, n_test: int) -> None:
    """Refuse a demo whose kernels cannot fit in memory: float64 infinite and empirical
    ``[n, n]`` kernels (and copies) and ``[n_test, n]`` test-train kernels."""
    check_memory(8 * (4 * n * n + 2 * n_test * n), f"the demo with --n {n} --n-test {n_test}",
                 "lower --n or --n-test")


def demo_widths(width: int | Sequence[int]) -> list[int]:
    """The widths the demo measures: a list is used as given (sorted, without repeats); a single
    width ``W`` becomes the default small widths below it followed by ``W``."""
    if isinstance(width, int):
        widths = [w for w in DEMO_WIDTHS if w < width] + [width]
    else:
        widths = sorted(set(int(w) for w in width))
    if not widths or min(widths) < 1:
        raise UsageError(f"widths must be positive integers, got {width!r}")
    return widths


def _onehot(y: Tensor, n_classes: int) -> Tensor:
    return nn.functional.one_hot(y.long(), n_classes).to(torch.float64)


def _kr_accuracy(k_tt: Tensor, k_st: Tensor, y_train: Tensor, y_test: Tensor,
                 n_classes: int) -> float:
    """Test accuracy of converged kernel regression on one-hot targets (small relative ridge)."""
    ridge = 1e-4 * float(k_tt.diagonal().mean())
    pred = telescope.kernel_regression(k_tt, k_st, _onehot(y_train, n_classes), ridge=ridge)
    return float((pred.argmax(dim=1) == y_test.to(pred.device)).double().mean())


def _rel_frobenius(k: Tensor, k_ref: Tensor) -> float:
    return float(torch.linalg.matrix_norm(k - k_ref) / torch.linalg.matrix_norm(k_ref))


def run_demo(out: str | Path, n: int = 256, widths: Sequence[int] = (64, 256, 512),
             seed: int = 0, *, n_test: int = 1000, progress: bool = True) -> list[dict]:
    """Run the kernel demo, write ``kernels.png`` and ``results.csv`` into ``out``, return the rows.

    One row per width, then one for the infinite-width kernel (``width = inf``): relative
    Frobenius distance of the empirical NTK (trace over the outputs divided by their number, the
    single-output kernel) to the infinite NTK, their centered alignment, the effective rank, the
    time of the kernel call, and the test accuracy of converged kernel regression.
    """
    from tqdm.auto import tqdm

    from telescope.data import load_mnist1d
    from telescope.models import MLP

    widths = demo_widths(list(widths))
    if n < 2:
        raise UsageError(f"the demo needs at least 2 training points, got n={n}")
    check_demo_memory(n, n_test)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_mnist1d(n_train=n, n_test=n_test, seed=seed)
    x, y = data.x_train[:n], data.y_train[:n]
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    n_classes, d_in = int(data.n_classes), int(x.shape[1])
    n_train, n_test = int(x.shape[0]), int(x_test.shape[0])
    common = {"n_train": n_train, "n_test": n_test, "seed": seed}

    # the infinite-width NTK of the same architecture, in float64
    x64, x_test64 = x.to(torch.float64), x_test.to(torch.float64)
    start = time.perf_counter()
    k_inf = telescope.infinite_ntk(x64, depth=2, activation="relu")["ntk"]
    inf_seconds = time.perf_counter() - start
    k_inf_st = telescope.infinite_ntk(x_test64, x64, depth=2, activation="relu")["ntk"]
    inf_row = {
        "width": math.inf, "n_params": None, "rel_frobenius": 0.0, "alignment": 1.0,
        "effective_rank": float(kernels.effective_rank(k_inf)), "ntk_seconds": inf_seconds,
        "test_accuracy": _kr_accuracy(k_inf, k_inf_st, y, y_test, n_classes), **common,
    }

    rows: list[dict] = []
    spectra: dict[str, Tensor] = {}
    k_widest = None
    for width in tqdm(widths, desc="empirical NTK", unit="width", disable=not progress):
        torch.manual_seed(seed)
        model = MLP(d_in, [width, width], n_classes, activation="relu", parametrization="ntk")
        telescope.ntk(model, x[:2], output="trace")  # warm-up: lazy imports, first-call setup
        start = time.perf_counter()
        k = telescope.ntk(model, x, output="trace")
        seconds = time.perf_counter() - start
        k_emp = k.to(torch.float64) / n_classes
        k_st = telescope.ntk(model, x_test, x, output="trace").to(torch.float64) / n_classes
        rows.append({
            "width": width,
            "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rel_frobenius": _rel_frobenius(k_emp, k_inf),
            "alignment": float(kernels.alignment(k_emp, k_inf)),
            "effective_rank": float(kernels.effective_rank(k_emp)),
            "ntk_seconds": seconds,
            "test_accuracy": _kr_accuracy(k_emp, k_st, y, y_test, n_classes),
            **common,
        })
        spectra[f"width {width}"] = kernels.spectrum(k_emp)
        k_widest = k_emp
    rows.append(inf_row)
    spectra["infinite"] = kernels.spectrum(k_inf)

    write_csv(rows, out / "results.csv")
    plot_demo(k_widest, k_inf, y, spectra, rows, out / "kernels.png")
    return rows


def plot_demo(k_emp: Tensor, k_inf: Tensor, y: Tensor, spectra: dict[str, Tensor],
              rows: list[dict], path: Path) -> None:
    """Heatmaps of the widest empirical and the infinite kernel (points sorted by class) and the
    eigen-spectra of all kernels on a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = torch.argsort(y, stable=True)
    y_sorted = y[order]
    bounds = (torch.nonzero(y_sorted[1:] != y_sorted[:-1]).flatten() + 0.5).tolist()
    k_inf_s = k_inf[order][:, order].numpy()
    k_emp_s = k_emp[order][:, order].numpy()
    lo, hi = float(k_inf_s.min()), float(k_inf_s.max())
    widest = rows[-2]

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_emp, ax_inf, ax_spec = fig.subplots(1, 3)
    titles = (f"empirical NTK / outputs, width {widest['width']}\n"
              f"rel. distance {widest['rel_frobenius']:.3f}, "
              f"alignment {widest['alignment']:.4f}",
              "infinite-width NTK (float64)\n"
              f"kernel-regression test accuracy {rows[-1]['test_accuracy']:.3f}")
    for ax, k, title in ((ax_emp, k_emp_s, titles[0]), (ax_inf, k_inf_s, titles[1])):
        im = ax.imshow(k, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        for b in bounds:
            ax.axhline(b, color="white", lw=0.4, alpha=0.7)
            ax.axvline(b, color="white", lw=0.4, alpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training point (sorted by class)")
        ax.set_ylabel("training point (sorted by class)")
    fig.colorbar(im, ax=[ax_emp, ax_inf], shrink=0.85)

    for label, eig in spectra.items():
        eig = eig[eig > 0].numpy()
        style = {"color": "black", "ls": "--", "lw": 1.6} if label == "infinite" else {"lw": 1.2}
        ax_spec.semilogy(range(1, len(eig) + 1), eig, label=label, **style)
    ax_spec.set_title("eigen-spectra", fontsize=10)
    ax_spec.set_xlabel("index")
    ax_spec.set_ylabel("eigenvalue")
    ax_spec.legend(fontsize=8)
    ax_spec.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)


def write_csv(rows: list[dict], path: Path, columns: Sequence[str] = RESULT_COLUMNS) -> None:
    """A tidy CSV: one row per dict, the given columns (missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "width":
        return "inf" if value == math.inf else str(int(value))
    if key == "n_params":
        return str(int(value))
    if key == "ntk_seconds":
        return f"{value:.3f}"
    if key == "effective_rank":
        return f"{value:.1f}"
    return f"{value:.4f}"


def format_table(rows: list[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Right-aligned, whitespace-separated text table (one header line, no spaces in cells)."""
    return _format_table(rows, columns, _fmt)


# ---------------------------------------------------------------------------------------------
# preset kernels (`telescope ntk`)
# ---------------------------------------------------------------------------------------------

def check_preset(model_name: str, data_name: str | None, n: int) -> str:
    """Check a ``telescope ntk`` preset (model, data, number of points) before any work;
    returns the data set's name (the model's default when ``data_name`` is ``None``)."""
    if model_name not in MODEL_PRESETS:
        raise UsageError(f"model must be one of {MODEL_PRESETS}, got {model_name!r}")
    data_name = data_name or DEFAULT_DATA[model_name]
    if data_name not in DATA_PRESETS:
        raise UsageError(f"data must be one of {DATA_PRESETS}, got {data_name!r}")
    if data_name != DEFAULT_DATA[model_name]:
        raise UsageError(f"the {model_name} preset takes --data {DEFAULT_DATA[model_name]}, "
                         f"not {data_name}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be a positive number of points, got {n}")
    return data_name


def check_ntk_memory(model_name: str, n: int, output: str) -> None:
    """Refuse a ``telescope ntk`` kernel that cannot fit in memory, before anything is built:
    the float32 kernel (``[N, N]``, ``[N, N, O]`` or ``[N, N, O, O]``) and float64 copies of
    its trace for the spectrum."""
    outputs = OUTPUTS[model_name]
    per_pair = {"trace": 1, "diagonal": outputs, "full": outputs * outputs}[output]
    shape = {"trace": "[N, N]", "diagonal": "[N, N, O]", "full": "[N, N, O, O]"}[output]
    fix = "lower --n" + ("" if output == "trace" else " (or use --output trace)")
    check_memory(n * n * (4 * per_pair + 8 * 3), f"the {shape} kernel of --n {n} points", fix)


def build_preset(model_name: str, data_name: str | None, n: int, seed: int
                 ) -> tuple[nn.Module, Tensor, Tensor | None, str]:
    """A built-in model (in eval mode) and ``n`` inputs for it: ``(model, x, labels, data_name)``.

    ``mlp``: MLP 40-512-512-10 (ReLU, NTK parametrization) on MNIST-1D; ``cnn``:
    :class:`~telescope.models.ConvNet1d` on MNIST-1D as ``[N, 1, 40]``; ``transformer``: a
    2-layer :class:`~telescope.models.TinyTransformer` (d_model 128, 4 heads, vocab 128, seq 16,
    last-token logits) on random tokens.
    """
    from telescope.models import MLP, ConvNet1d, TinyTransformer

    data_name = check_preset(model_name, data_name, n)
    labels = None
    if data_name == "mnist1d":
        from telescope.data import load_mnist1d

        data = load_mnist1d(n_train=n, seed=seed)
        x, labels = data.x_train[:n], data.y_train[:n]
    else:
        from telescope.data.synthetic import random_tokens

        x = random_tokens(n, TOKENS["seq_len"], TOKENS["vocab"], seed=seed)

    torch.manual_seed(seed)
    if model_name == "mlp":
        model = MLP(x.shape[1], [512, 512], 10, activation="relu", parametrization="ntk")
    elif model_name == "cnn":
        model = ConvNet1d()
        x = x.reshape(x.shape[0], 1, -1)
    else:
        model = TinyTransformer(vocab=TOKENS["vocab"], d_model=128, n_heads=4, n_layers=2,
                                seq_len=TOKENS["seq_len"])
    model.eval()
    return model, x, labels, data_name


def trace_of(k: Tensor, output: str) -> Tensor:
    """The ``[N1, N2]`` trace kernel of a kernel returned with ``output=...``."""
    if output == "full":
        return k.diagonal(dim1=2, dim2=3).sum(-1)
    if output == "diagonal":
        return k.sum(-1)
    return k


def run_ntk_preset(model_name: str, data_name: str | None = None, *, n: int = 256,
                   method: str = "auto", output: str = "trace", out: str | Path = "out/ntk",
                   seed: int = 0, progress: bool = False) -> dict:
    """Compute the NTK of a preset, save ``kernel.pt`` and ``spectrum.png`` in ``out``.

    ``kernel.pt`` holds tensors (``kernel``, ``eigenvalues``, ``x``, ``labels``) and plain
    Python values only: ``torch.load(path, weights_only=True)`` reads it.

    Returns a summary dict (timing, shape, eigenvalues, effective rank, file paths).
    """
    check_preset(model_name, data_name, n)
    if output in ("trace", "diagonal", "full"):
        check_ntk_memory(model_name, n, output)
    model, x, labels, data_name = build_preset(model_name, data_name, n, seed)
    start = time.perf_counter()
    k = telescope.ntk(model, x, method=method, output=output, progress=progress)
    seconds = time.perf_counter() - start
    k_trace = trace_of(k, output)
    eig = kernels.spectrum(k_trace)
    eff_rank = float(kernels.effective_rank(k_trace))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # plain Python types and tensors only, so that torch.load(path, weights_only=True) works
    # (torch.__version__ is a TorchVersion, which the safe unpickler refuses)
    summary = {
        "model": str(model_name), "data": str(data_name), "n": int(x.shape[0]),
        "method": str(method), "output": str(output), "seed": int(seed),
        "seconds": float(seconds), "shape": tuple(int(d) for d in k.shape),
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "effective_rank": float(eff_rank), "threads": int(torch.get_num_threads()),
        "torch_version": str(torch.__version__), "telescope_version": str(telescope.__version__),
    }
    torch.save({**summary, "kernel": k.detach().cpu(), "eigenvalues": eig.detach().cpu(),
                "x": x.detach().cpu(), "labels": None if labels is None else labels.cpu()},
               out / "kernel.pt")
    _plot_spectrum(eig, f"{model_name} on {data_name}, N={x.shape[0]}, trace NTK",
                   out / "spectrum.png")
    summary.update(eigenvalues=eig, kernel_path=out / "kernel.pt",
                   figure_path=out / "spectrum.png")
    return summary


def _plot_spectrum(eig: Tensor, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pos = eig[eig > 0].numpy()
    ax.semilogy(range(1, len(pos) + 1), pos, lw=1.4)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)
