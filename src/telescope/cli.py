"""The ``telescope`` command line (thin: the work is in the studies and the library).

    telescope [--threads N] study NAME [--preset quick|full] [--out DIR] [--set key=value ...]
              [--seeds N] [--executor local|ray] [--workers K] [--address ADDR]
              [--cpus-per-point C] [--force] [--no-report] [--no-progress]
    telescope study --list
    telescope report DIR
    telescope [--threads N] ntk --model mlp|cnn|transformer [--data mnist1d|tokens] [--n N]
              [--method auto|jacobian|vector|structured] [--output trace|full|diagonal]
              [--out DIR] [--seed S]

``study`` runs an experiment (a sweep of points into ``results.parquet``, figures and
``report.html``); ``ntk`` is a utility: the kernel of one built-in model on its data, saved as a
tensor (``kernel.pt``) with a plot of its spectrum.

Exit codes: 0 success; 1 some points failed, or the report could not be made completely;
2 a mistake the user can fix (``telescope: error: ...``, no traceback); 130 interrupted
(Ctrl-C, SIGINT); 143 terminated (SIGTERM): a study run keeps its finished points, writes
``run.json`` and stops its workers in both cases. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from telescope._threads import configure_threads
from telescope.errors import TelescopeError, UsageError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ``telescope ntk``: built-in models, the data each takes, and their outputs per input (the ``O``
# of a ``[N, N, O, O]`` kernel)
NTK_MODELS = ("mlp", "cnn", "transformer")
NTK_DATA = {"mlp": "mnist1d", "cnn": "mnist1d", "transformer": "tokens"}
TOKENS = {"vocab": 128, "seq_len": 16}
NTK_OUTPUTS = {"mlp": 10, "cnn": 10, "transformer": TOKENS["vocab"]}


def build_parser() -> argparse.ArgumentParser:
    from telescope import __version__

    threads_help = ("CPU threads for torch (default: OMP_NUM_THREADS if set, else at most the "
                    "cores this process may use)")
    parser = argparse.ArgumentParser(
        prog="telescope",
        description="See how a neural network learns through its tangent kernels.",
    )
    parser.add_argument("--version", action="version", version=f"telescope {__version__}")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help=threads_help)
    # --threads is also accepted after the subcommand; SUPPRESS keeps the global value otherwise
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help=threads_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ntk = sub.add_parser(
        "ntk", parents=[common],
        help="the empirical NTK of a built-in model/data preset (kernel.pt + spectrum.png)",
        description="Compute the empirical NTK of a built-in preset and save it (kernel.pt, a "
                    "torch.save'd dict of tensors and plain values: the kernel, inputs, "
                    "eigenvalues and metadata; load it with torch.load(path, "
                    "weights_only=True)) with a plot of its eigen-spectrum (spectrum.png).")
    ntk.add_argument("--model", choices=NTK_MODELS, required=True,
                     help="mlp: MLP 40-512-512-10 (NTK param.); cnn: ConvNet1d; transformer: "
                          "2 layers, d_model 128, 4 heads, vocab 128, seq 16")
    ntk.add_argument("--data", choices=sorted(set(NTK_DATA.values())), default=None,
                     help="mnist1d (mlp, cnn) or tokens (transformer); default: the model's")
    ntk.add_argument("--n", type=_positive_int, default=256, metavar="N",
                     help="number of points (default: 256)")
    ntk.add_argument("--method", choices=("auto", "jacobian", "vector", "structured"),
                     default="auto", help="kernel method (default: auto)")
    ntk.add_argument("--output", choices=("trace", "full", "diagonal"), default="trace",
                     help="kernel over outputs: [N,N] trace, [N,N,O,O] full, [N,N,O] diagonal")
    ntk.add_argument("--out", default=None, metavar="DIR",
                     help="output directory (default: out/ntk-MODEL)")
    ntk.add_argument("--seed", type=int, default=0, help="data and initialization seed")
    ntk.add_argument("--progress", action="store_true", help="show a progress bar over blocks")
    ntk.set_defaults(func=_cmd_ntk)

    study = sub.add_parser(
        "study", parents=[common],
        help="run a study (an experiment of the paper): sweep, results, figures, report.html",
        description="Run the sweep of study NAME into --out: config.json, one Parquet file per "
                    "finished point, results.parquet (tidy rows), figures (PNG + SVG) and "
                    "report.html. Re-running the same command resumes, skipping finished "
                    "points. `telescope study --list` lists the studies.")
    study.add_argument("name", nargs="?", metavar="NAME", help="the study (see --list)")
    study.add_argument("--list", action="store_true", help="list the studies and exit")
    study.add_argument("--preset", default="quick", metavar="PRESET",
                       help="quick (minutes on a laptop CPU) or full (the paper's sizes) "
                            "(default: quick)")
    study.add_argument("--out", default=None, metavar="DIR",
                       help="run directory (default: out/NAME-PRESET)")
    study.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE",
                       help="override a config value, e.g. --set widths=4,8,16 data.n_train=500 "
                            "(dotted keys for nested settings; repeatable)")
    study.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                       help="number of seeds (same as --set seeds=N)")
    study.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local processes (default) or a Ray cluster")
    study.add_argument("--workers", type=_positive_int, default=1, metavar="K",
                       help="local: points in parallel on K worker processes, each with "
                            "max(1, cpus // K) torch threads (default: 1, in this process)")
    study.add_argument("--address", default=None, metavar="ADDR",
                       help="ray: cluster address ('auto', 'ray://host:10001'); default: start "
                            "a local Ray instance")
    study.add_argument("--cpus-per-point", type=_positive_int, default=None, metavar="C",
                       help="ray: CPUs reserved by each point's task (default: 1); local: torch "
                            "threads per worker")
    study.add_argument("--force", action="store_true",
                       help="--out holds results of another config or study: discard them, "
                            "start over (a directory that is not a telescope run is never "
                            "touched)")
    study.add_argument("--no-report", action="store_true",
                       help="skip the figures and report.html (make them later with "
                            "`telescope report DIR`)")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    study.set_defaults(func=_cmd_study)

    report = sub.add_parser(
        "report", parents=[common],
        help="make the figures and report.html of a run directory again",
        description="Make the figures and report.html of a study's run directory again from "
                    "its saved results and config.json; nothing is recomputed. "
                    "results.parquet is rebuilt from the point files only when that loses "
                    "nothing (every point file readable, no run writing the directory); "
                    "otherwise it is left as it is, and files that cannot be read are "
                    "named (exit code 1). Nothing is ever deleted.")
    report.add_argument("dir", metavar="DIR", help="the run directory (holds config.json)")
    report.set_defaults(func=_cmd_report)
    return parser


def _n_threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _out_dir(path: str | Path) -> Path:
    """``--out`` created and checked to be writable (one-line errors, exit code 2)."""
    from telescope.runs.store import ensure_writable_dir

    return ensure_writable_dir(Path(path).resolve())


# --------------------------------------------------------------------------- telescope ntk


def _check_ntk_memory(model_name: str, n: int, output: str) -> None:
    """Refuse a kernel that cannot fit in memory, before anything is built: the float32 kernel
    (``[N, N]``, ``[N, N, O]`` or ``[N, N, O, O]``) and float64 copies of its trace for the
    spectrum."""
    from telescope.runs.plan import format_bytes, total_memory

    per_pair = {"trace": 1, "diagonal": NTK_OUTPUTS[model_name],
                "full": NTK_OUTPUTS[model_name] ** 2}[output]
    shape = {"trace": "[N, N]", "diagonal": "[N, N, O]", "full": "[N, N, O, O]"}[output]
    need, limit = n * n * (4 * per_pair + 8 * 3), total_memory()
    if limit is not None and need > limit:
        fix = "lower --n" + ("" if output == "trace" else " (or use --output trace)")
        raise UsageError(f"the {shape} kernel of --n {n} points needs about "
                         f"{format_bytes(need)}, more than the {format_bytes(limit)} of memory "
                         f"here: {fix}")


def _ntk_preset(model_name: str, n: int, seed: int):
    """A built-in model (in eval mode) and ``n`` inputs for it: ``(model, x, labels)``.

    ``mlp``: MLP 40-512-512-10 (ReLU, NTK parametrization) on MNIST-1D; ``cnn``:
    :class:`~telescope.models.ConvNet1d` on MNIST-1D as ``[N, 1, 40]``; ``transformer``: a
    2-layer :class:`~telescope.models.TinyTransformer` (d_model 128, 4 heads, vocab 128, seq 16,
    last-token logits) on random tokens (no labels).
    """
    import torch

    from telescope.models import MLP, ConvNet1d, TinyTransformer

    labels = None
    if NTK_DATA[model_name] == "mnist1d":
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
        model, x = ConvNet1d(), x.reshape(x.shape[0], 1, -1)
    else:
        model = TinyTransformer(vocab=TOKENS["vocab"], d_model=128, n_heads=4, n_layers=2,
                                seq_len=TOKENS["seq_len"])
    return model.eval(), x, labels


def _cmd_ntk(args: argparse.Namespace) -> int:
    """The kernel of a built-in model with :func:`telescope.ntk`, saved as ``kernel.pt`` (tensors
    and plain Python values only: ``torch.load(path, weights_only=True)`` reads it) with a plot
    of the trace kernel's eigenvalues (``spectrum.png``)."""
    import time

    import torch

    import telescope
    from telescope import kernels

    data_name = args.data or NTK_DATA[args.model]
    if data_name != NTK_DATA[args.model]:
        raise UsageError(f"the {args.model} preset takes --data {NTK_DATA[args.model]}, "
                         f"not {data_name}")
    _check_ntk_memory(args.model, args.n, args.output)
    out = _out_dir(args.out or f"out/ntk-{args.model}")
    model, x, labels = _ntk_preset(args.model, args.n, args.seed)
    start = time.perf_counter()
    k = telescope.ntk(model, x, method=args.method, output=args.output, progress=args.progress)
    seconds = time.perf_counter() - start
    k_trace = (k.diagonal(dim1=2, dim2=3).sum(-1) if args.output == "full" else
               k.sum(-1) if args.output == "diagonal" else k)
    eig = kernels.spectrum(k_trace)
    # plain Python types and tensors only, so that torch.load(path, weights_only=True) works
    # (torch.__version__ is a TorchVersion, which the safe unpickler refuses)
    summary = {
        "model": str(args.model), "data": str(data_name), "n": int(x.shape[0]),
        "method": str(args.method), "output": str(args.output), "seed": int(args.seed),
        "seconds": float(seconds), "shape": tuple(int(d) for d in k.shape),
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "effective_rank": float(kernels.effective_rank(k_trace)),
        "threads": int(torch.get_num_threads()), "torch_version": str(torch.__version__),
        "telescope_version": str(telescope.__version__),
    }
    torch.save({**summary, "kernel": k.detach().cpu(), "eigenvalues": eig.detach().cpu(),
                "x": x.detach().cpu(), "labels": None if labels is None else labels.cpu()},
               out / "kernel.pt")
    _plot_spectrum(eig, f"{args.model} on {data_name}, N={x.shape[0]}, trace NTK",
                   out / "spectrum.png")

    top = ", ".join(f"{v:.4g}" for v in eig[:5].tolist())
    print(f"telescope ntk: {args.model} on {data_name}, N={summary['n']}, "
          f"{summary['n_params']:,} parameters, method {args.method}, output {args.output}, "
          f"{_n_threads(summary['threads'])}")
    print(f"kernel {list(summary['shape'])} in {seconds:.3f} s")
    print(f"top eigenvalues (trace kernel): {top}")
    print(f"effective rank: {summary['effective_rank']:.2f}")
    print(f"kernel:   {out / 'kernel.pt'}")
    print(f"spectrum: {out / 'spectrum.png'}")
    return 0


def _plot_spectrum(eig, title: str, path: Path) -> None:
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


def _cmd_study(args: argparse.Namespace) -> int:
    from telescope.report.html import ReportError, headline_text, write_report
    from telescope.runs import RunStore, make_executor, run_sweep
    from telescope.runs.plan import plan_sweep
    from telescope.studies import get_study, list_studies, make_config
    from telescope.studies.config import config_to_dict, parse_overrides

    if args.list:
        studies = list_studies()
        width = max((len(s.name) for s in studies), default=0)
        for s in studies:
            presets = "|".join(s.presets)
            print(f"{s.name:<{width}}  {s.description} [{presets}]")
        return 0
    if not args.name:
        raise UsageError("give a study NAME (telescope study --list shows them)")
    study = get_study(args.name)
    overrides = parse_overrides(args.overrides)
    if args.seeds is not None:
        overrides["seeds"] = str(args.seeds)
    config = make_config(study, args.preset, overrides)
    out = Path(args.out or f"out/{study.name}-{args.preset}").resolve()
    executor = make_executor(args.executor, workers=args.workers, address=args.address,
                             cpus_per_point=args.cpus_per_point,
                             threads=getattr(args, "threads", None),
                             progress=not args.no_progress)
    # the sweep's size (refused when absurd) and the directory, before anything is written
    plan = plan_sweep(study, config, workers=args.workers if args.executor == "local" else None)
    RunStore(out).check(study.name, config_to_dict(config), force=args.force)
    print(f"telescope study {study.name} ({args.preset}): {plan.describe()}, "
          f"{executor.describe()}; out {out}", flush=True)
    args.run_dir = out
    result = run_sweep(study, config, out, preset=args.preset, executor=executor,
                       force=args.force, progress=not args.no_progress)
    print(f"{result.done} of {result.total} points done ({result.computed} computed now, "
          f"{result.skipped} already done, {len(result.failed)} failed) in "
          f"{result.seconds:.1f} s")

    code = 0
    if result.done and args.no_report:
        print(f"results: {out / 'results.parquet'}")
        print(f"report:  not written (--no-report); make it with: telescope report {out}")
    elif result.done:
        df = RunStore(out).read_results()
        try:
            report_path = write_report(out, study, config, df)
        except ReportError as err:
            print(f"telescope: error: {err}", file=sys.stderr)
            code = 1
        else:
            try:
                headline = study.headline(df, config) or {}
            except Exception:  # noqa: BLE001 - write_report already raised ReportError for it
                headline = {}
            if headline:
                print("\n" + headline_text(headline) + "\n")
            print(f"results: {out / 'results.parquet'}")
            print(f"report:  {report_path}")
    if result.failed:
        print(f"telescope: {len(result.failed)} point(s) failed (tracebacks in "
              f"{out / 'run.json'}); re-run the same command to retry them", file=sys.stderr)
        code = 1
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from telescope.report.html import ReportError, rebuild_report

    def note(msg: str) -> None:
        print(f"telescope: {msg}", file=sys.stderr)

    try:
        path = rebuild_report(Path(args.dir), log=note)
    except ReportError as err:
        print(f"telescope: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (as ``timeout`` and job
    schedulers send): like KeyboardInterrupt, it unwinds the run cleanly."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise Terminated(signum)


def _stopped(args: argparse.Namespace, how: str) -> str:
    """The one line printed when a command is interrupted or terminated."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:
        return f"telescope: {how}"
    from telescope.runs import RunStore

    meta = RunStore(run_dir).read_meta()
    done, total = meta.get("points_done"), meta.get("points_total")
    saved = (f"{done} of {total} points are saved" if done is not None
             else "the finished points are kept")
    return f"telescope: {how}; {saved} in {run_dir}; re-run the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``telescope`` console script; returns the exit code (0 on success).

    Invalid arguments and every error the user can fix (a
    :class:`~telescope.errors.TelescopeError`) print ``telescope: error: ...`` and exit with
    code 2 instead of a traceback; anything else is a bug and keeps its traceback. SIGINT
    returns 130 and SIGTERM 143, each with one line saying what was saved.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():  # signals go to the main thread
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    try:
        args.threads_used = configure_threads(args.threads)
        return args.func(args)
    except TelescopeError as err:
        parser.exit(2, f"telescope: error: {err}\n")
    except KeyboardInterrupt:
        print(_stopped(args, "interrupted"), file=sys.stderr)
        return 130
    except Terminated:
        print(_stopped(args, "terminated (SIGTERM)"), file=sys.stderr)
        return 143
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
