"""Speed and memory of the empirical NTK methods, side by side in one run.

    .venv/bin/python bench/bench_ntk.py                 # everything (several minutes)
    .venv/bin/python bench/bench_ntk.py --quick         # small N, seconds
    .venv/bin/python bench/bench_ntk.py --only mlp --threads 1

For each model and thread count every method runs in the same worker process (a fresh one per
model and thread count, so thread settings and memory peaks do not leak between them). Times are
the best of ``--repeat`` calls after a warm-up; peak memory is the largest resident-set growth
seen by a sampling thread during the call. Ratios are against the Jacobian method measured in
the same process. For the structured method the matmul FLOPs it performs are counted once by
``torch.utils.flop_counter.FlopCounterMode`` (every mm, bmm, addmm and einsum, the forward and
backward passes that make the factors as well as the Gram contractions); ``flop_limit_s`` is the
time those FLOPs take at this machine's single-matmul rate (a 2048^3 float32 matmul, measured at
the start of the worker) and ``x_flop_limit`` the measured time over it.

With ``--nt-python`` (the throwaway neural-tangents environment of
``tools/neural_tangents_refs.py``) the MLP's full and trace kernels are also timed with
neural-tangents' structured derivatives (``bench/_neural_tangents_empirical.py``, jit-compiled
and warm) on the same inputs with the same thread count, right after telescope's worker, and
``vs_neural_tangents`` is telescope's time over neural-tangents' (below 1: telescope is faster).

Models (the issue's benchmark): MLP 40-512-512-10 (ReLU) on MNIST-1D inputs, N1 = N2 = 256; and
a 2-layer transformer (d_model 128, 4 heads, seq 16, vocab 128, last-token logits) on random
tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import peak_during

MODELS = ("mlp", "mlp1", "transformer")


def measure(fn, repeat: int):
    """Best wall time over ``repeat`` calls and the peak RSS growth during them (bytes)."""
    fn()  # warm-up: plan, verification, allocator
    best, peak = float("inf"), 0
    for _ in range(repeat):
        _, dt, grown = peak_during(fn, interval=0.002)
        best, peak = min(best, dt), max(peak, grown)
    return best, peak


def matmul_peak() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / t / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def performed_flops(fn) -> int:
    """Matmul FLOPs of one call of ``fn``, as counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def worker(model_name: str, threads: int, n: int, methods: list[str], outputs: list[str],
           repeat: int, memory_gb: float, inputs: str | None = None) -> list[dict]:
    import numpy as np
    import torch

    import telescope
    from telescope.data import load_mnist1d
    from telescope.models import MLP, TinyTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_name.startswith("mlp"):
        out = 10 if model_name == "mlp" else 1
        model = MLP(40, [512, 512], out, activation="relu")
        x = load_mnist1d(n_train=max(n, 4), n_test=4).x_train[:n]
        if inputs is not None:
            np.savez(inputs, x=x.numpy())
    else:
        model = TinyTransformer(vocab=128, d_model=128, n_heads=4, n_layers=2, seq_len=16)
        x = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(0))
    peak = matmul_peak()
    rows = []
    for output in outputs:
        base = None
        for method in methods:
            def call(method=method, output=output):
                return telescope.ntk(model, x, method=method, output=output,
                                     max_memory_gb=memory_gb)

            t, mem = measure(call, repeat)
            if method == "jacobian":
                base = t
            row = dict(model=model_name, n=n, threads=threads, output=output, method=method,
                       seconds=round(t, 4), peak_mb=round(mem / 2**20, 1),
                       speedup_vs_jacobian=None if base is None else round(base / t, 1),
                       matmul_peak_gflops=round(peak, 1))
            if method == "structured":
                flops = performed_flops(call)
                row["gflop"] = round(flops / 1e9, 2)
                row["achieved_gflops"] = round(flops / t / 1e9, 1)
                row["flop_limit_s"] = round(flops / (peak * 1e9), 4)
                row["x_flop_limit"] = round(t / row["flop_limit_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _run_worker(spec: dict, env: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _neural_tangents(python: str, inputs: str, threads: int, repeat: int) -> dict[str, float]:
    """Best time of neural-tangents' structured derivatives per output, from its environment."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "_neural_tangents_empirical.py")
    proc = subprocess.run([python, script, "--threads", str(threads), "--inputs", inputs,
                           "--repeat", str(repeat)], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"neural-tangents timing failed ({python})")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["output"]: r["seconds"] for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 32, one repeat")
    ap.add_argument("--only", choices=MODELS, nargs="*", default=list(MODELS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-gb", type=float, default=4.0)
    ap.add_argument("--transformer-methods", default="jacobian,structured",
                    help="the Jacobian baseline on the transformer takes tens of minutes at "
                         "N = 256; pass 'structured' to skip it")
    ap.add_argument("--methods", default="jacobian,vector,structured",
                    help="methods for the MLPs (the Jacobian baseline takes about a minute)")
    ap.add_argument("--nt-python", default=os.environ.get("TELESCOPE_NT_PYTHON"),
                    help="python of a neural-tangents environment: also time its structured "
                         "derivatives on the MLP")
    ap.add_argument("--save", help="also write the rows as a JSON record (tools/readme_bench.py)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        worker(**spec)
        return
    n = 32 if args.quick else args.n
    repeat = 1 if args.quick else args.repeat
    rows = []
    for model_name in args.only:
        for threads in map(int, args.threads.split(",")):
            if model_name == "transformer":
                methods = args.transformer_methods.split(",")
                outputs, rep = ["trace"], 1
            else:
                methods = args.methods.split(",")
                outputs, rep = ["full", "trace"], repeat
            inputs = (f"/tmp/bench_ntk_{model_name}_{n}.npz"
                      if args.nt_python and model_name == "mlp" else None)
            spec = dict(model_name=model_name, threads=threads, n=n, methods=methods,
                        outputs=outputs, repeat=rep, memory_gb=args.memory_gb, inputs=inputs)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            new = _run_worker(spec, env)
            # Memory: a second pass with a fixed mmap threshold, so freed blocks go back to the
            # OS and each call's resident-set growth is its own peak, not hidden by memory an
            # earlier method left in the heap (this slows small allocations, so it is not timed).
            # The first method of the timing pass (the Jacobian baseline) is measured there.
            later = methods[1:]
            if later:
                mem_spec = {**spec, "methods": later, "repeat": 1}
                mem_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
                peaks = {(r["output"], r["method"]): r["peak_mb"]
                         for r in _run_worker(mem_spec, mem_env)}
                for r in new:
                    r["peak_mb"] = peaks.get((r["output"], r["method"]), r["peak_mb"])
            if inputs is not None:
                nt = _neural_tangents(args.nt_python, inputs, threads, max(repeat, 5))
                for r in new:
                    if r["method"] == "structured" and r["output"] in nt:
                        r["neural_tangents_s"] = round(nt[r["output"]], 4)
                        r["vs_neural_tangents"] = round(r["seconds"] / nt[r["output"]], 2)
            for r in new:
                print(json.dumps(r), flush=True)
            rows += new
    cols = ["model", "n", "threads", "output", "method", "seconds", "peak_mb",
            "speedup_vs_jacobian", "gflop", "achieved_gflops", "matmul_peak_gflops",
            "x_flop_limit", "neural_tangents_s", "vs_neural_tangents"]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.save:
        from _records import save_record

        save_record(args.save, rows)


if __name__ == "__main__":
    main()
