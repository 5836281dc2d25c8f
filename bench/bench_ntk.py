"""Speed and memory of the empirical NTK methods, side by side in one run.

    .venv/bin/python bench/bench_ntk.py                 # everything (several minutes)
    .venv/bin/python bench/bench_ntk.py --quick         # small N, seconds
    .venv/bin/python bench/bench_ntk.py --only mlp --threads 1

For each model and thread count every method runs in the same worker process (a fresh one per
model and thread count, so thread settings and memory peaks do not leak between them). Times are
the best of ``--repeat`` calls after a warm-up; peak memory is the largest resident-set growth
seen by a sampling thread during the call. Ratios are against the Jacobian method measured in
the same process. GFLOP/s compares the structured method's dominant Gram matmuls (the FLOPs
actually performed, counted analytically) with this machine's single-matmul rate, measured at
the start of the worker.

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
import threading
import time

MODELS = ("mlp", "mlp1", "transformer")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, repeat: int):
    """Best wall time over ``repeat`` calls and the peak RSS growth during them (bytes)."""
    fn()  # warm-up: plan, verification, allocator
    best, peak = float("inf"), 0
    for _ in range(repeat):
        base = _rss()
        top = [base]
        stop = threading.Event()

        def sample(top=top, stop=stop):
            while not stop.is_set():
                top[0] = max(top[0], _rss())
                time.sleep(0.002)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        top[0] = max(top[0], _rss())
        del out
        best, peak = min(best, dt), max(peak, top[0] - base)
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


def gram_flops(rows: int, inner: int) -> int:
    """FLOPs of ``telescope.kernels.structured.gram(x)`` for ``x [rows, inner]``: only the upper
    block triangle is multiplied (chunks of ``max(256, rows/8)`` rows)."""
    chunk = max(256, -(-rows // 8))
    if rows <= chunk:
        return 2 * rows * rows * inner
    starts = range(0, rows, chunk)
    return sum(2 * min(chunk, rows - i) * (rows - i) * inner for i in starts)


def worker(model_name: str, threads: int, n: int, methods: list[str], outputs: list[str],
           repeat: int, memory_gb: float) -> list[dict]:
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
        flops = {  # structured: Gram matmuls of deltas (the dominant contraction), per layer
            "trace": sum(gram_flops(n, out * p) for p in (512, 512, out)),
            "full": sum(gram_flops(n * out, p) for p in (512, 512, out)),
        }
    else:
        model = TinyTransformer(vocab=128, d_model=128, n_heads=4, n_layers=2, seq_len=16)
        x = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(0))
        flops = {}
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
            if method == "structured" and output in flops:
                row["gram_gflops"] = round(flops[output] / t / 1e9, 1)
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
                methods = ["jacobian", "vector", "structured"]
                outputs, rep = ["full", "trace"], repeat
            spec = dict(model_name=model_name, threads=threads, n=n, methods=methods,
                        outputs=outputs, repeat=rep, memory_gb=args.memory_gb)
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
            for r in new:
                print(json.dumps(r), flush=True)
            rows += new
    cols = ["model", "n", "threads", "output", "method", "seconds", "peak_mb",
            "speedup_vs_jacobian", "gram_gflops", "matmul_peak_gflops"]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


if __name__ == "__main__":
    main()
