"""The ``telescope`` command line (thin: the work is in :mod:`telescope.demo` and the library).

    telescope [--threads N] demo [--out DIR] [--n N] [--width W [W ...]] [--seed S]
    telescope [--threads N] ntk --model mlp|cnn|transformer [--data mnist1d|tokens] [--n N]
              [--method auto|jacobian|vector|structured] [--output trace|full|diagonal]
              [--out DIR] [--seed S]
    telescope [--threads N] lens [--out DIR] [--steps N] [--lr LR ...] [--adamw-lr LR ...]
              [--optimizer sgd|momentum|weight_decay|adamw ...] [--seed S]
    telescope [--threads N] study NAME [--preset quick|full] [--out DIR] [--set key=value ...]
              [--seeds N] [--executor local|ray] [--workers K] [--address ADDR]
              [--cpus-per-point C] [--force] [--no-report] [--no-progress]
    telescope study --list
    telescope report DIR

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


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

    demo = sub.add_parser(
        "demo", parents=[common],
        help="empirical vs infinite-width NTK of small MLPs on MNIST-1D (table + figure)",
        description="The empirical NTK of NTK-parametrized ReLU MLPs 40-W-W-10 on MNIST-1D at "
                    "several widths against the infinite-width NTK, and the kernel-regression "
                    "test accuracy of both. Writes kernels.png and results.csv into --out.")
    demo.add_argument("--out", default="out/demo", metavar="DIR",
                      help="output directory (default: out/demo)")
    demo.add_argument("--n", type=_positive_int, default=256, metavar="N",
                      help="training points in the kernel (default: 256)")
    demo.add_argument("--n-test", type=_positive_int, default=1000, metavar="N",
                      help="test points for kernel regression (default: 1000)")
    demo.add_argument("--width", type=_positive_int, nargs="+", default=[512], metavar="W",
                      help="hidden width; a single W also measures the widths 64 and 256 below "
                           "it, several values are used as given (default: 512)")
    demo.add_argument("--seed", type=int, default=0, help="data and initialization seed")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_cmd_demo)

    from telescope.demo import DATA_PRESETS, MODEL_PRESETS

    ntk = sub.add_parser(
        "ntk", parents=[common],
        help="the empirical NTK of a built-in model/data preset (kernel.pt + spectrum.png)",
        description="Compute the empirical NTK of a built-in preset and save it (kernel.pt, a "
                    "torch.save'd dict of tensors and plain values: the kernel, inputs, "
                    "eigenvalues and metadata; load it with torch.load(path, "
                    "weights_only=True)) with a plot of its eigen-spectrum (spectrum.png).")
    ntk.add_argument("--model", choices=MODEL_PRESETS, required=True,
                     help="mlp: MLP 40-512-512-10 (NTK param.); cnn: ConvNet1d; transformer: "
                          "2 layers, d_model 128, 4 heads, vocab 128, seq 16")
    ntk.add_argument("--data", choices=DATA_PRESETS, default=None,
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

    from telescope import lens_demo

    lens = sub.add_parser(
        "lens", parents=[common],
        help="telescoping vs linearized model: approximation error through training (figure)",
        description="Train an MLP 64-200-200-200-1 (ReLU) on sklearn's 8x8 digits, 3 vs 5, with "
                    "the squared loss, for several optimizers and learning rates, with a "
                    "Telescope attached; plot the mean absolute error of the telescoping model "
                    "(red) and of the model linearized around the initialization (gray) against "
                    "the actual network by step (Jeffares et al. 2024, Fig. 7). Writes "
                    "approximation.png and approximation.csv into --out.")
    lens.add_argument("--out", default="out/lens", metavar="DIR",
                      help="output directory (default: out/lens)")
    lens.add_argument("--steps", type=_positive_int, default=1000, metavar="N",
                      help="optimizer steps per run (default: 1000)")
    lens.add_argument("--lr", type=_positive_float, nargs="+",
                      default=list(lens_demo.DEFAULT_LRS), metavar="LR",
                      help="learning rates of the SGD-family optimizers (default: "
                           f"{' '.join(f'{v:g}' for v in lens_demo.DEFAULT_LRS)})")
    lens.add_argument("--adamw-lr", type=_positive_float, nargs="+",
                      default=list(lens_demo.DEFAULT_ADAMW_LRS), metavar="LR",
                      help="learning rates of AdamW (default: "
                           f"{' '.join(f'{v:g}' for v in lens_demo.DEFAULT_ADAMW_LRS)})")
    lens.add_argument("--optimizer", choices=lens_demo.OPTIMIZERS, nargs="+",
                      default=list(lens_demo.OPTIMIZERS), metavar="NAME",
                      help="optimizers: sgd, momentum (0.9), weight_decay "
                           f"({lens_demo.WEIGHT_DECAY:g}), adamw (default: all)")
    lens.add_argument("--n-train", type=_positive_int, default=250, metavar="N",
                      help="training points (default: 250; 3s and 5s hold 365 in all)")
    lens.add_argument("--n-test", type=_positive_int, default=115, metavar="N",
                      help="test points (default: 115)")
    lens.add_argument("--batch-size", type=_positive_int, default=200, metavar="B",
                      help="minibatch size (default: 200, or all training points if fewer)")
    lens.add_argument("--every", type=_positive_int, default=10, metavar="K",
                      help="record the errors every K steps (default: 10)")
    lens.add_argument("--float64", action="store_true", help="train in float64")
    lens.add_argument("--seed", type=int, default=0, help="data split and initialization seed")
    lens.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    lens.set_defaults(func=_cmd_lens)

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from telescope.demo import check_demo_memory, demo_widths, format_table, run_demo

    widths = demo_widths(args.width[0] if len(args.width) == 1 else args.width)
    check_demo_memory(args.n, args.n_test)
    _out_dir(args.out)
    print(f"telescope demo: MNIST-1D, {args.n} training / {args.n_test} test points, "
          f"MLP 40-W-W-10 (ReLU, NTK parametrization), widths {widths}, seed {args.seed}, "
          f"{_n_threads(args.threads_used)}", flush=True)
    rows = run_demo(args.out, n=args.n, widths=widths, seed=args.seed, n_test=args.n_test,
                    progress=not args.no_progress)
    print()
    print("empirical NTK (trace / outputs) vs infinite-width NTK on the training points;")
    print("test_accuracy: converged kernel regression on one-hot labels (ridge 1e-4 mean diag)")
    print(format_table(rows))
    widest, inf = rows[-2], rows[-1]
    print()
    print(f"kernel-regression test accuracy: infinite NTK {inf['test_accuracy']:.3f}, "
          f"width-{widest['width']} empirical NTK {widest['test_accuracy']:.3f}")
    out = Path(args.out).resolve()
    print(f"figure:  {out / 'kernels.png'}")
    print(f"results: {out / 'results.csv'}")
    return 0


def _cmd_ntk(args: argparse.Namespace) -> int:
    from telescope.demo import check_ntk_memory, check_preset, run_ntk_preset

    check_preset(args.model, args.data, args.n)
    check_ntk_memory(args.model, args.n, args.output)
    out = _out_dir(args.out or f"out/ntk-{args.model}")
    s = run_ntk_preset(args.model, args.data, n=args.n, method=args.method, output=args.output,
                       out=out, seed=args.seed, progress=args.progress)
    top = ", ".join(f"{v:.4g}" for v in s["eigenvalues"][:5].tolist())
    print(f"telescope ntk: {s['model']} on {s['data']}, N={s['n']}, "
          f"{s['n_params']:,} parameters, method {s['method']}, output {s['output']}, "
          f"{_n_threads(s['threads'])}")
    print(f"kernel {list(s['shape'])} in {s['seconds']:.3f} s")
    print(f"top eigenvalues (trace kernel): {top}")
    print(f"effective rank: {s['effective_rank']:.2f}")
    print(f"kernel:   {s['kernel_path']}")
    print(f"spectrum: {s['figure_path']}")
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    import time

    import torch

    from telescope.lens_demo import format_table, run_lens_demo, summarize

    _out_dir(args.out)
    print(f"telescope lens: digits 3 vs 5, {args.n_train} training / {args.n_test} test points, "
          f"MLP 64-200-200-200-1 (ReLU), {args.steps} steps, optimizers "
          f"{', '.join(args.optimizer)}, seed {args.seed}, {_n_threads(args.threads_used)}",
          flush=True)
    start = time.perf_counter()
    rows = run_lens_demo(args.out, steps=args.steps, lrs=args.lr, adamw_lrs=args.adamw_lr,
                         optimizers=args.optimizer, n_train=args.n_train, n_test=args.n_test,
                         batch_size=args.batch_size, seed=args.seed, every=args.every,
                         dtype=torch.float64 if args.float64 else torch.float32,
                         progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print()
    print("mean absolute error against the actual network on the test points at the last "
          "recorded step;")
    print("ratio: linearized / telescoping error; test_acc: the actual network")
    print(format_table(summarize(rows, "test")))
    out = Path(args.out).resolve()
    print()
    print(f"total {seconds:.1f} s")
    print(f"figure:  {out / 'approximation.png'}")
    print(f"results: {out / 'approximation.csv'}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from telescope.report.html import ReportError, headline_text, write_report
    from telescope.runs import RunStore, make_executor, run_sweep
    from telescope.runs.plan import plan_sweep
    from telescope.studies import get_study, list_studies, make_config
    from telescope.studies.base import config_to_dict, parse_overrides

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
