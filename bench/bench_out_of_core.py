"""A kernel larger than you would hold in memory: the trace NTK of MLP 40-512-512-10 on N MNIST-1D
points written to disk block by block, killed and resumed, on Ray, and solved by conjugate
gradients streaming it from disk.

    .venv/bin/python bench/bench_out_of_core.py                    # N = 20,000 (~10 min, 2 cores)
    .venv/bin/python bench/bench_out_of_core.py --n 4000 --n-test 500   # a quick look
    .venv/bin/python bench/bench_out_of_core.py --phases local,solve

Every phase runs in a fresh worker process, so its peak resident set (``VmHWM`` of the worker;
for Ray the driver's) is its own:

- ``local``: ``telescope.ntk(model, x, output="trace", out=K.npy)``, timed, with the seconds per
  block pair;
- ``kill``: the same into another file, killed with SIGKILL at a random moment (uniform over the
  middle 60 % of the local run's time), then rerun: the blocks recorded before the kill are kept,
  and the finished file must equal the local one bit for bit;
- ``ray``: ``executor="ray"`` on a local instance with 2 worker CPUs, compared with the local file;
- ``solve``: the test kernel ``K(x_test, X)`` (also on disk), then kernel ridge regression on the
  centred one-hot labels, ``K(x_test, X) (K + ridge I)^{-1} Y`` with
  ``telescope.kernels.solve_kernel_system`` (Nyström-preconditioned CG, one pass over the file
  per iteration; what ``kernel_regression(..., solver="cg")`` runs) and ``kernel_matmul``, with
  the iterations, the final relative residual and the test accuracy.

The last lines project the time for N = 60,000: the block pairs grow as N^2, so the measured
seconds per pair times the pair count, divided among k Ray machines (each with this machine's
rate, ``--cores-per-machine`` workers), and on a GPU from the FLOPs the contraction needs at an
assumed sustained rate (``--gpu-tflops``; not measured here: no GPU was available).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _memory import peak_rss_gb

LAYERS = (512, 512, 10)   # hidden widths and outputs of the MLP
IN_FEATURES = 40


def _model_and_data(n: int, n_test: int):
    import torch

    from telescope.data import load_mnist1d
    from telescope.models import MLP

    torch.manual_seed(0)
    model = MLP(IN_FEATURES, list(LAYERS[:-1]), LAYERS[-1], activation="relu")
    data = load_mnist1d(n_train=n, n_test=n_test, cache_dir=os.environ.get("MNIST1D_CACHE"))
    return model, data


def worker(phase: str, args: dict) -> dict:
    import numpy as np
    import torch

    import telescope

    torch.set_num_threads(args["threads"])
    model, data = _model_and_data(args["n"], args["n_test"])
    directory = Path(args["dir"])
    block = args["block"]
    record: dict = {"phase": phase, "n": args["n"], "block": block, "threads": args["threads"]}
    start = time.perf_counter()
    if phase in ("local", "kill", "rerun"):
        name = "K_local.npy" if phase == "local" else "K_kill.npy"
        telescope.ntk(model, data.x_train, output="trace", out=directory / name,
                      block_size=block, progress=args["progress"])
    elif phase == "ray":
        import ray

        ray.init(num_cpus=args["ray_cpus"], include_dashboard=False, logging_level="ERROR")
        record["ray_init_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        telescope.ntk(model, data.x_train, output="trace", out=directory / "K_ray.npy",
                      block_size=block, executor="ray", progress=args["progress"])
        record["ray_cpus"] = args["ray_cpus"]
    elif phase == "solve":
        kt = telescope.ntk(model, data.x_test, data.x_train, output="trace",
                           out=directory / "K_test.npy", block_size=block)
        record["test_kernel_seconds"] = time.perf_counter() - start
        k = np.load(directory / "K_local.npy", mmap_mode="r")
        y = torch.nn.functional.one_hot(data.y_train, 10).double()
        y = y - y.mean(dim=0)
        mean_diag = float(telescope.kernels.kernel_diagonal(k).mean())
        ridge = args["ridge"] * mean_diag
        t0 = time.perf_counter()
        solved = telescope.kernels.solve_kernel_system(k, y, ridge=ridge, tol=args["tol"],
                                                       rank=args["rank"],
                                                       progress=args["progress"])
        pred = telescope.kernels.kernel_matmul(kt, solved.solution)
        record["solve_seconds"] = time.perf_counter() - t0
        record["iterations"] = solved.iterations
        record["relative_residual"] = float(solved.residuals.max())
        record["ridge_relative_to_mean_diagonal"] = args["ridge"]
        record["rank"] = args["rank"]
        record["test_accuracy"] = float((pred.argmax(1) == data.y_test).double().mean())
        record["n_test"] = args["n_test"]
    record["seconds"] = time.perf_counter() - start
    record["peak_rss_gb"] = peak_rss_gb()
    return record


def _spawn(phase: str, spec: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    return subprocess.Popen([sys.executable, __file__, "--worker", phase, json.dumps(spec)],
                            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"worker failed with exit code {proc.returncode}")
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _recorded(path: Path) -> int:
    try:
        text = path.with_name(path.name + ".progress.json").read_text()
        return len(json.loads(text)["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def _same_file(a: Path, b: Path, rows: int = 1024) -> bool:
    import numpy as np

    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        return False
    return all(np.array_equal(x[i:i + rows], y[i:i + rows]) for i in range(0, x.shape[0], rows))


def _pairs(n: int, block: int) -> int:
    nb = -(-n // block)
    return nb * (nb + 1) // 2


def _trace_flops(n: int) -> float:
    """FLOPs of the symmetric trace kernel's Gram contractions per layer: deltas ``[N, O p]`` and
    inputs ``[N, q]`` (the upper triangle: half of ``2 N^2`` times the inner size)."""
    outs, widths = LAYERS[-1], (IN_FEATURES, *LAYERS[:-1])
    inner = sum(outs * p + q for p, q in zip(LAYERS, widths, strict=True))
    return n * n * inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--phases", default="local,kill,ray,solve")
    ap.add_argument("--dir", default="/tmp/telescope-out-of-core")
    ap.add_argument("--ridge", type=float, default=1e-3, help="times the mean diagonal of K")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--rank", type=int, default=1000, help="Nyström preconditioner rank")
    ap.add_argument("--seed", type=int, default=0, help="of the kill moment")
    ap.add_argument("--target-n", type=int, default=60_000)
    ap.add_argument("--cores-per-machine", type=int, default=2)
    ap.add_argument("--gpu-tflops", type=float, default=30.0,
                    help="assumed sustained FP32 matmul rate of one GPU, for the projection")
    ap.add_argument("--keep", action="store_true",
                    help="resume from the kernel files of an earlier run with the same N "
                         "instead of deleting them first")
    ap.add_argument("--save", help="also write the rows and the projection as a JSON record "
                                   "(tools/readme_bench.py)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))), flush=True)
        return
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    if not args.keep:   # kernels of an earlier run (another N) would be refused, not reused
        for old in directory.glob("K_*"):
            old.unlink()
    spec = dict(n=args.n, n_test=args.n_test, block=args.block, threads=args.threads,
                ray_cpus=args.ray_cpus, dir=str(directory), ridge=args.ridge, tol=args.tol,
                rank=args.rank, progress=False)
    phases = args.phases.split(",")
    rows: list[dict] = []
    pairs = _pairs(args.n, args.block)
    local = None
    if "local" in phases or "solve" in phases:
        local = _result(_spawn("local", spec))
        local["block_pairs"] = pairs
        local["seconds_per_pair"] = local["seconds"] / pairs
        local["gflops"] = _trace_flops(args.n) / local["seconds"] / 1e9
        rows.append(local)
        print(json.dumps(local), flush=True)
    if "kill" in phases:
        assert local is not None, "the kill phase compares with the local phase"
        rng = random.Random(args.seed)
        delay = local["seconds"] * rng.uniform(0.2, 0.8)
        proc = _spawn("kill", spec)
        progress = directory / "K_kill.npy.progress.json"
        while not progress.exists() and proc.poll() is None:   # the kernel has started
            time.sleep(0.01)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = _recorded(directory / "K_kill.npy")
        rerun = _result(_spawn("rerun", spec))
        rerun.update(killed_after_seconds=round(delay, 1), blocks_kept=kept, block_pairs=pairs,
                     equal_to_local=_same_file(directory / "K_kill.npy",
                                               directory / "K_local.npy"))
        rows.append(rerun)
        print(json.dumps(rerun), flush=True)
    if "ray" in phases:
        ray_row = _result(_spawn("ray", spec))
        ray_row["block_pairs"] = pairs
        if local is not None:
            ray_row["equal_to_local"] = _same_file(directory / "K_ray.npy",
                                                   directory / "K_local.npy")
            ray_row["speedup_vs_local"] = local["seconds"] / ray_row["seconds"]
        rows.append(ray_row)
        print(json.dumps(ray_row), flush=True)
    if "solve" in phases:
        solve = _result(_spawn("solve", spec))
        rows.append(solve)
        print(json.dumps(solve), flush=True)

    print("\nphase | N | seconds | peak RSS GB | notes")
    for r in rows:
        notes = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("phase", "n", "seconds", "peak_rss_gb", "threads", "block")}
        print(f"{r['phase']} | {r['n']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {notes}")
    projection = None
    if local is not None:
        one = local["seconds"] * (args.target_n / args.n) ** 2
        flops = _trace_flops(args.target_n)
        projection = {
            "n": args.target_n, "block_pairs": _pairs(args.target_n, args.block),
            "gigabytes": 4 * args.target_n**2 / 1e9, "this_machine_minutes": one / 60,
            "ray_minutes": {k: one / (k * args.cores_per_machine / args.threads) / 60
                            for k in (4, 16, 64)},
            "tflop": flops / 1e12, "gpu_tflops": args.gpu_tflops,
            "gpu_seconds": flops / (args.gpu_tflops * 1e12)}
        print(f"\nprojection: {json.dumps(projection)}")
    if args.save:
        from _records import save_record

        save_record(args.save, rows, projection=projection)


if __name__ == "__main__":
    main()
