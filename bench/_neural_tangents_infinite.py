"""Time neural-tangents' infinite-width kernels, for comparison with ``telescope.infinite``.

Not part of telescope (which never depends on JAX): run it only with the throwaway
environment described in ``tools/neural_tangents_refs.py``:

    /tmp/ntvenv/bin/python bench/_neural_tangents_infinite.py --threads 1
    /tmp/ntvenv/bin/python bench/_neural_tangents_infinite.py --threads 1 --case fc \\
        --inputs inputs.npz

Cases (float64, ``kernel_fn(x, None, ("nngp", "ntk"))``, jit-compiled):

- ``cnn_gap``: Conv(64, (3, 3), SAME), Relu, Conv(64, (3, 3), SAME), Relu, GlobalAvgPool,
  Dense(1) on 24 images of 3 x 8 x 8;
- ``fc``: Dense(512), Relu, Dense(512), Relu, Dense(1) on 256 points of dimension 40.

``--inputs PATH.npz`` reads the exact inputs instead of drawing them: key ``cnn`` in PyTorch
layout [N, 3, 8, 8] (transposed here to channel-last) and key ``fc`` [N, 40]. Each case is
compiled and run once, then timed ``--repeat`` times (``block_until_ready``); one JSON object
per line is printed: ``{"case": ..., "seconds": <median>, "n": ...}`` plus the individual times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for XLA")
    parser.add_argument("--case", choices=("cnn_gap", "fc", "all"), default="all")
    parser.add_argument("--inputs", default=None, help="npz with keys cnn [N,3,8,8] and fc [N,40]")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after warm-up (>= 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawn inputs")
    return parser.parse_args()


def _set_threads(threads: int) -> None:
    """Limit the process to ``threads`` CPUs; must happen before jax is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    if hasattr(os, "sched_setaffinity"):  # XLA's own thread pool follows the CPU affinity
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:threads])


def timed_calls(call, repeat: int):
    """``(first result, seconds of the first call (compile + run), [seconds of each of
    repeat later calls])``."""
    start = time.perf_counter()
    first = call()
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, compile_seconds, times


def main() -> None:
    args = _parse()
    if args.repeat < 3:
        sys.exit("--repeat must be at least 3")
    _set_threads(args.threads)

    import jax
    import numpy as np
    from neural_tangents import stax

    jax.config.update("jax_enable_x64", True)

    if args.inputs is not None:
        with np.load(args.inputs) as data:
            given = {key: np.asarray(data[key], dtype=np.float64) for key in data.files}
    else:
        rng = np.random.default_rng(args.seed)
        given = {
            "cnn": rng.standard_normal((24, 3, 8, 8)),
            "fc": rng.standard_normal((256, 40)),
        }

    nets = {
        "cnn_gap": stax.serial(
            stax.Conv(64, (3, 3), padding="SAME"),
            stax.Relu(),
            stax.Conv(64, (3, 3), padding="SAME"),
            stax.Relu(),
            stax.GlobalAvgPool(),
            stax.Dense(1),
        ),
        "fc": stax.serial(
            stax.Dense(512), stax.Relu(), stax.Dense(512), stax.Relu(), stax.Dense(1)
        ),
    }
    inputs = {
        # PyTorch layout [N, C, H, W] -> neural-tangents' [N, H, W, C]
        "cnn_gap": np.moveaxis(given["cnn"], 1, -1) if "cnn" in given else None,
        "fc": given.get("fc"),
    }

    cases = ("cnn_gap", "fc") if args.case == "all" else (args.case,)
    for case in cases:
        x = inputs[case]
        if x is None:
            sys.exit(f"--inputs has no array for case {case}")
        x = jax.device_put(x)
        jitted = jax.jit(lambda x, kernel_fn=nets[case][2]: kernel_fn(x, None, ("nngp", "ntk")))

        def call(x=x, jitted=jitted):
            return jax.block_until_ready(jitted(x))

        _, compile_seconds, times = timed_calls(call, args.repeat)
        record = {
            "case": case,
            "seconds": statistics.median(times),
            "n": int(x.shape[0]),
            "times": times,
            "first_call_seconds": compile_seconds,
            "threads": args.threads,
            "library": "neural_tangents",
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
