"""Per-step overhead of the telescoping lens, against the bare training step in the same process.

    .venv/bin/python bench/bench_telescope.py [--steps 50] [--threads 1]

DESIGN.md asks that the per-step telescoping prediction (one forward-mode JVP per probe set)
stays within a small factor of the training step. Cases:

- the paper's approximation setup: MLP 64-200x3-1, batch 200 of 1000 training points, SGD with
  momentum, probes = 1000 test points;
- the ntk-double-descent transformer (1-layer encoder, d_model 32, 10 tokens of 4), full batch
  of 200, Adam, probes = 100 and 400 test points.

Each case prints the bare step time, the step time with a ``Telescope`` attached
(``track_linearized=False``, history every 1000 steps) and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from telescope import Telescope
from telescope.models import MLP, TinyTransformer


def step_time(model, opt, x, y, batch: int, steps: int, probes=None) -> float:
    lens = (Telescope(model, opt, probes, every=1000, track_linearized=False)
            if probes else None)
    g = torch.Generator().manual_seed(0)
    n = x.shape[0]

    def one():
        idx = torch.randperm(n, generator=g)[:batch]
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()

    for _ in range(3):       # warm-up
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    seconds = (time.perf_counter() - start) / steps
    if lens is not None:
        lens.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", help="also write the rows as a JSON record "
                                       "(tools/readme_bench.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    cases = []
    x, xt = torch.randn(1000, 64, generator=g), torch.randn(1000, 64, generator=g)
    y = torch.sign(x[:, :1])

    def mlp():
        torch.manual_seed(0)
        m = MLP(64, [200, 200, 200], 1)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    cases.append(("MLP 64-200x3-1, batch 200, 1000 probes", mlp, x, y, 200, {"test": xt}))
    xs, xst = torch.randn(200, 10, 4, generator=g), torch.randn(400, 10, 4, generator=g)
    ys = torch.sign(xs[:, :1, 0])

    def transformer():
        torch.manual_seed(0)
        m = TinyTransformer(d_model=32, n_heads=1, n_layers=1, seq_len=10, out_features=1,
                            input_dim=4, causal=False, readout="mean")
        return m, torch.optim.Adam(m.parameters(), lr=1e-3)

    cases.append(("transformer d32, full batch 200, 100 probes", transformer, xs, ys, 200,
                  {"test": xst[:100]}))
    cases.append(("transformer d32, full batch 200, 400 probes", transformer, xs, ys, 200,
                  {"test": xst}))

    print(f"threads {args.threads}, {args.steps} steps per measurement")
    print(f"{'case':<46} {'bare ms':>9} {'+lens ms':>9} {'ratio':>6}")
    rows = []
    for name, make, xx, yy, batch, probes in cases:
        bare = step_time(*make(), xx, yy, batch, args.steps)
        lens = step_time(*make(), xx, yy, batch, args.steps, probes)
        print(f"{name:<46} {bare * 1e3:9.2f} {lens * 1e3:9.2f} {lens / bare:6.2f}")
        rows.append(dict(case=name, bare_ms=bare * 1e3, lens_ms=lens * 1e3, batch=batch,
                         probes=int(probes["test"].shape[0])))
    if args.save:
        from _records import save_record

        save_record(args.save, rows, threads=args.threads, steps=args.steps)


if __name__ == "__main__":
    main()
