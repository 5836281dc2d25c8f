"""Kernels of models from the field, method against method in one process (1 thread).

    .venv/bin/python bench/bench_zoo.py [--models gpt2 resnet18] [--resnet-n 16 64]
                                        [--threads 1] [--no-baseline]

- **GPT-2** (Hugging Face ``GPT2ForSequenceClassification``, d 128, 4 layers, 4 heads, vocab
  1000, sequences of 16 with a pad token configured as people do, 4 labels), N = 32, trace
  kernel, float32.
- **ResNet-18** (``telescope.models.ResNet18``, torchvision's architecture: 11.2M parameters,
  BatchNorm in eval mode, 10 classes) on 32x32 images, N = 16 and 64, trace kernel, float32.

Each model is timed with ``telescope.ntk(method="structured")`` (default memory budget),
``method="jacobian"`` (``--jacobian-memory-gb``, 12 by default: enough to keep every block's
Jacobians of ResNet-18 at N = 16, so each is computed once) and a
plain ``torch.func`` baseline (``vmap(jacrev)`` per block of 8 examples and the contraction
``J_a J_b^T``, every block's Jacobians computed once: the recipe of PyTorch's NTK tutorial),
after one warm-up call each; ``explain`` gives the share of parameters on per-layer rules; the
float32 relative error of each method is measured against the float64 structured kernel of the
same model (``max |K - K64| / max |K64|``).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import telescope
from telescope.kernels import explain
from telescope.models import ResNet18


def gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=16, n_embd=128, n_layer=4,
                                  n_head=4, num_labels=4, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    x = torch.randint(1, 1000, (32, 16), generator=torch.Generator().manual_seed(1))
    return model, x


def resnet18(n: int):
    torch.manual_seed(0)
    model = ResNet18(10).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x


def torch_func_baseline(model: nn.Module, x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Per-example Jacobians by ``vmap(jacrev)`` per block, each computed once, then
    ``K = sum_o J J^T`` block by block (the trace kernel)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        out = functional_call(model, {**p, **buffers}, (xi[None],))
        out = out.logits if hasattr(out, "logits") else out
        return out[0]

    jac = []
    for s in range(0, x.shape[0], block):
        j = vmap(jacrev(f), in_dims=(None, 0))(params, x[s:s + block])
        jac.append(torch.cat([v.reshape(v.shape[0], -1) for v in j.values()], dim=1))
        del j
    n = x.shape[0]
    k = torch.empty(n, n, dtype=x.dtype if x.is_floating_point() else torch.float32)
    for a, ja in enumerate(jac):
        for b, jb in enumerate(jac):
            k[a * block:(a + 1) * block, b * block:(b + 1) * block] = ja @ jb.T
    return k


def timed(fn, repeat: int = 1) -> tuple[float, torch.Tensor]:
    fn()  # warm-up (plans, allocator)
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(name: str, model: nn.Module, x: torch.Tensor, baseline: bool,
          jacobian_gb: float | None) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = explain(model, x)
        ref = telescope.ntk(copy.deepcopy(model).double(),
                            x.double() if x.is_floating_point() else x)
    on_rules = float(df.loc[df["rule"] != "per-example Jacobian", "share_of_params"].sum())
    n_params = int(df["numel"].sum())
    print(f"\n{name}: N = {x.shape[0]}, {n_params:,} parameters, {on_rules:.1%} on per-layer "
          f"rules")
    rows, failed = [], []
    methods = {"structured": lambda: telescope.ntk(model, x, method="structured")}
    if jacobian_gb:
        methods["jacobian"] = lambda: telescope.ntk(model, x, method="jacobian",
                                                    max_memory_gb=jacobian_gb)
    if baseline:
        methods["torch.func vmap(jacrev)"] = lambda: torch_func_baseline(model, x)
    for label, fn in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                seconds, k = timed(fn)
            except RuntimeError as err:  # e.g. vmap and a data-dependent pad-token check
                print(f"  {label:<26} fails: {str(err).splitlines()[0][:90]}")
                failed.append(dict(model=name, n=int(x.shape[0]), method=label,
                                   failed=str(err).splitlines()[0][:200]))
                continue
        err = float((k.double() - ref).abs().max() / ref.abs().max())
        rows.append((label, seconds, err))
    base = dict((r[0], r[1]) for r in rows)
    for label, seconds, err in rows:
        ratios = ", ".join(f"{base[other] / seconds:.1f}x faster than {other}"
                           for other in base if other != label and base[other] > seconds)
        print(f"  {label:<26} {seconds:8.2f} s   rel. error vs float64 {err:.1e}   {ratios}")
    return [dict(model=name, n=int(x.shape[0]), parameters=n_params, on_rules=on_rules,
                 method=label, seconds=seconds, relative_error=err)
            for label, seconds, err in rows] + failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "resnet18"],
                    choices=["gpt2", "resnet18"])
    ap.add_argument("--resnet-n", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the torch.func baseline (it needs N * 10 * 11M floats for ResNet)")
    ap.add_argument("--baseline-max-n", type=int, default=16,
                    help="run the torch.func baseline and the jacobian method only up to this N "
                         "(they hold N * O * P floats)")
    ap.add_argument("--jacobian-memory-gb", type=float, default=12.0,
                    help="max_memory_gb of the jacobian method (enough to keep every block's "
                         "Jacobians of ResNet-18 at N = 16: each computed once)")
    ap.add_argument("--save", help="also write the rows as a JSON record (tools/readme_bench.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if "gpt2" in args.models:
        rows += bench("GPT-2 (d 128, 4 layers, seq 16, pad token)", *gpt2(),
                      not args.no_baseline, args.jacobian_memory_gb)
    if "resnet18" in args.models:
        for n in args.resnet_n:
            small = n <= args.baseline_max_n
            rows += bench("ResNet-18 (32x32, BatchNorm in eval)", *resnet18(n),
                          not args.no_baseline and small,
                          args.jacobian_memory_gb if small else None)
    if args.save:
        from _records import save_record

        save_record(args.save, rows, threads=args.threads)


if __name__ == "__main__":
    main()
