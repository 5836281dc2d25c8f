"""Per-step cost of the Smoother on the paper's approximation setup, against a naive
per-example-Jacobian implementation measured in the same process.

    .venv/bin/python bench/bench_smoother.py [--steps 20] [--threads 2]

Setup (Jeffares et al. 2024, Sec. 4.1): n = 1000 training points and 1000 test probes with 64
inputs, an MLP with 3 hidden layers of width 200 (ReLU) and one output, squared loss, SGD with
batch 200 (here with momentum 0.9 and weight decay, the most expensive SGD recursion). The paper
runs 5000 steps; the projected time is 5000 x the measured per-step cost of training plus the
smoother.

The naive baseline computes, at every step, the per-example Jacobians of all 2000 tracked points
(``[2000, P]``, P ~ 93k) and the kernel to the batch as ``J_all @ J_batch^T``, then the same
smoother update.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F

from telescope.lens.smoother import Smoother
from telescope.models import MLP


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1000, 64, generator=g)
    y = torch.sign(x[:, 0] + 0.5 * x[:, 1])
    xt = torch.randn(1000, 64, generator=g)
    torch.manual_seed(seed)
    model = MLP(64, [200, 200, 200], 1)
    return model, x, y, xt


def run(steps: int, smoother: bool) -> float:
    model, x, y, xt = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sm = Smoother(model, opt, x, y, probes={"test": xt}) if smoother else None
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(1000, generator=g)[:200]
        opt.zero_grad()
        F.mse_loss(model(x[idx])[:, 0], y[idx]).backward()
        if sm is not None:
            sm.record(idx)
        opt.step()
    return (time.perf_counter() - t0) / steps


def naive_kernel_step(model, x_all, idx) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    t0 = time.perf_counter()
    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x_all)
    j = torch.cat([v.reshape(x_all.shape[0], -1) for v in jac.values()], dim=1)  # [M, P]
    k = j @ j[idx].T
    del k
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", help="also write the figures as a JSON record "
                                   "(tools/readme_bench.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run(2, True)  # warm-up
    train = run(args.steps, False)
    with_sm = run(args.steps, True)
    model, x, _, xt = setup()
    x_all = torch.cat([x, xt])
    naive = min(naive_kernel_step(model, x_all, torch.arange(200)) for _ in range(2))
    update = with_sm - train
    print(f"threads {args.threads}, {args.steps} steps")
    print(f"training step alone           {train * 1e3:8.1f} ms")
    print(f"training + smoother per step  {with_sm * 1e3:8.1f} ms  "
          f"(smoother {update * 1e3:.1f} ms)")
    print(f"naive kernel alone per step   {naive * 1e3:8.1f} ms  "
          f"({naive / max(update, 1e-9):.1f}x the whole smoother update)")
    print(f"projected 5000 steps          {5000 * with_sm / 60:8.2f} min (target < 5 min); "
          f"naive kernel alone {5000 * naive / 60:.1f} min")
    if args.save:
        from _records import save_record

        save_record(args.save, [dict(train_ms=train * 1e3, with_smoother_ms=with_sm * 1e3,
                                     naive_kernel_ms=naive * 1e3)],
                    threads=args.threads, steps=args.steps)


if __name__ == "__main__":
    main()
