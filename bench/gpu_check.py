"""The GPU check: one short script to run whenever a CUDA machine is lent.

    .venv/bin/python bench/gpu_check.py                 # tests + benchmarks on cuda, a table
    .venv/bin/python bench/gpu_check.py --device cuda:0 --skip-bench

1. Runs the device-parametrized tests (``tests/test_devices.py``: structured NTK of an MLP and
   a transformer, infinite-width kernels, training with the telescoping lens) with
   ``TELESCOPE_TEST_DEVICES=<device>``: the same numbers on the device as on the CPU. A missing
   device fails them (it never passes by skipping).
2. Times, on the device and on the CPU in the same run (median of ``--repeat`` warm calls): the
   structured NTK of the MLP 40-512-512-10 (trace, N = 256), and the infinite-width CNN-GAP
   kernel of 24 and 256 images 3x8x8 (``telescope.infinite``, float64).
3. Prints one table (and ``--json PATH`` writes it) with the test result, the times and the
   speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tests(device: str) -> dict:
    env = dict(os.environ, TELESCOPE_TEST_DEVICES=device)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "-o", "addopts=", "tests/test_devices.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"check": f"tests/test_devices.py on {device}", "ok": proc.returncode == 0,
            "detail": tail[0], "seconds": round(time.perf_counter() - t0, 1)}


def _median_time(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_benchmarks(device: str, repeat: int) -> list[dict]:
    import torch

    import telescope
    from telescope import infinite as inf
    from telescope.models import MLP

    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.manual_seed(0)
    mlp = MLP(40, [512, 512], 10, activation="relu")
    x = torch.randn(256, 40)
    cnn = inf.serial(inf.Conv(64, (3, 3), padding="same"), inf.Relu(),
                     inf.Conv(64, (3, 3), padding="same"), inf.Relu(), inf.GlobalAvgPool(),
                     inf.Dense(1))
    images = {n: torch.randn(n, 3, 8, 8, dtype=torch.float64) for n in (24, 256)}
    def mlp_kernel(d):
        model, inputs = mlp.to(d), x.to(d)
        return lambda: telescope.ntk(model, inputs)

    def cnn_kernel(imgs):
        def make(d):
            inputs = imgs.to(d)
            return lambda: cnn.kernel(inputs)
        return make

    cases = [("structured NTK, MLP 40-512-512-10, trace, N=256", mlp_kernel)]
    cases += [(f"infinite CNN-GAP kernel, {n} images 3x8x8, float64", cnn_kernel(imgs))
              for n, imgs in images.items()]
    rows = []
    for name, make in cases:
        cpu = _median_time(make(torch.device("cpu")), repeat, lambda: None)
        on_device = _median_time(make(dev), repeat, sync)
        rows.append({"check": name, "ok": True, "cpu_s": round(cpu, 4),
                     "device_s": round(on_device, 4), "speedup": round(cpu / on_device, 1)})
    mlp.to("cpu")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    rows = [run_tests(args.device)]
    if not args.skip_bench:
        try:
            rows += run_benchmarks(args.device, args.repeat)
        except Exception as error:  # report it in the table, do not lose the test result
            rows.append({"check": "benchmarks", "ok": False, "detail": repr(error)})
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  ok     cpu_s    device_s  speedup  detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO':<5}  "
              f"{r.get('cpu_s', ''):>8}  {r.get('device_s', ''):>8}  {r.get('speedup', ''):>7}  "
              f"{r.get('detail', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
