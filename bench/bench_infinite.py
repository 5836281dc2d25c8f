"""Speed and memory of ``telescope.infinite`` kernels, against neural-tangents in the same run.

    .venv/bin/python bench/bench_infinite.py                      # 1 thread vs NT, then N = 1000
    .venv/bin/python bench/bench_infinite.py --quick              # small N for the large case
    .venv/bin/python bench/bench_infinite.py --nt-python /tmp/ntvenv/bin/python

Part 1 (one thread, float64, ``x2=None``, ``("nngp", "ntk")``): the issue's CNN-GAP, Conv(64,
3x3, SAME), ReLU, Conv(64, 3x3, SAME), ReLU, GlobalAvgPool, Dense(1) on 24 images 3x8x8, and an
FC net 40-512-512-1 (ReLU) on 256 points. telescope's time is the median of ``--repeat`` calls
after a warm-up; neural-tangents' (jit-compiled, warm, median) comes from
``bench/_neural_tangents_infinite.py`` run with ``--nt-python`` (a throwaway environment with
``jax==0.4.25 jaxlib==0.4.25 "numpy<2" neural-tangents==0.6.5``; telescope never depends on
JAX) on the very same inputs, passed through an ``.npz``. Without that interpreter the
neural-tangents column is empty.

Part 2 (``--threads`` threads, default 2): the CNN-GAP kernel of ``--n`` images (1000) with
``max_memory_gb``: wall time and peak resident-set growth. The full covariances would take
``N^2 * 8^4 * 8`` bytes (33 GB at N = 1000); blocking over example pairs keeps them bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import peak_during

HERE = Path(__file__).resolve().parent


def _architectures():
    from telescope import infinite as inf

    cnn = inf.serial(inf.Conv(64, (3, 3), padding="same"), inf.Relu(),
                     inf.Conv(64, (3, 3), padding="same"), inf.Relu(), inf.GlobalAvgPool(),
                     inf.Dense(1))
    fc = inf.serial(inf.Dense(512), inf.Relu(), inf.Dense(512), inf.Relu(), inf.Dense(1))
    return {"cnn_gap": cnn, "fc": fc}


def _neural_tangents(python: str | None, inputs: Path, repeat: int) -> dict[str, float]:
    if python is None or not shutil.which(python) and not Path(python).exists():
        return {}
    proc = subprocess.run(
        [python, str(HERE / "_neural_tangents_infinite.py"), "--threads", "1", "--inputs",
         str(inputs), "--repeat", str(repeat)],
        capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-2000:])
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            out[record["case"]] = float(record["seconds"])
    return out


def part_one(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    inputs = {"cnn_gap": torch.randn(24, 3, 8, 8, generator=g, dtype=torch.float64),
              "fc": torch.randn(256, 40, generator=g, dtype=torch.float64)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.npz"
        np.savez(path, cnn=inputs["cnn_gap"].numpy(), fc=inputs["fc"].numpy())
        nt = _neural_tangents(args.nt_python, path, args.repeat)
    for case, arch in _architectures().items():
        x = inputs[case]
        arch.kernel(x)   # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            arch.kernel(x)
            times.append(time.perf_counter() - t0)
        ours = statistics.median(times)
        theirs = nt.get(case)
        rows.append({"case": case, "n": x.shape[0], "threads": 1,
                     "telescope_s": round(ours, 4),
                     "neural_tangents_s": None if theirs is None else round(theirs, 4),
                     "nt_over_telescope": None if theirs is None else round(theirs / ours, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def part_two(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(args.n, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    arch = _architectures()["cnn_gap"]
    out, seconds, peak = peak_during(
        lambda: arch.kernel(x, max_memory_gb=args.max_memory_gb, progress=args.progress))
    dense_gb = args.n**2 * 8**4 * 8 / 2**30
    row = {"case": "cnn_gap_large", "n": args.n, "threads": args.threads,
           "max_memory_gb": args.max_memory_gb, "seconds": round(seconds, 1),
           "peak_rss_gb": round(peak / 2**30, 2), "unblocked_covariance_gb": round(dense_gb, 1),
           "finite": bool(torch.isfinite(out["ntk"]).all())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200 in part 2")
    parser.add_argument("--n", type=int, default=1000, help="images in part 2")
    parser.add_argument("--threads", type=int, default=2, help="threads in part 2")
    parser.add_argument("--max-memory-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--only", choices=("nt", "large"), default=None)
    parser.add_argument("--nt-python", default=os.environ.get(
        "TELESCOPE_NT_PYTHON", "/tmp/ntvenv/bin/python"),
        help="python of a throwaway neural-tangents environment (skipped if missing)")
    args = parser.parse_args()
    if args.quick:
        args.n = 200
    if args.only in (None, "nt"):
        part_one(args)
    if args.only in (None, "large"):
        part_two(args)


if __name__ == "__main__":
    main()
