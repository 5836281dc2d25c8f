"""Time neural-tangents' empirical NTK (structured derivatives), for comparison with
``telescope.ntk``.

Not part of telescope (which never depends on JAX): run it only with the throwaway
environment described in ``tools/neural_tangents_refs.py``:

    /tmp/ntvenv/bin/python bench/_neural_tangents_empirical.py --threads 1 --inputs x.npz

The network is the MLP of ``bench/bench_ntk.py``: stax ``Dense(512), Relu, Dense(512), Relu,
Dense(10)`` on ``x`` ``[N, 40]`` (key ``x`` of ``--inputs``, float32 as in telescope's float32
model), with ``nt.empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES, vmap_axes=0)``:
``trace_axes=()`` for the full ``[N, N, 10, 10]`` kernel and ``trace_axes=(-1,)`` for the trace
kernel (neural-tangents' trace is the sum over outputs, as telescope's). Each kernel function is
jit-compiled and run once, then timed ``--repeat`` times (``block_until_ready``); one JSON object
per line: ``{"output": ..., "seconds": <best>, "median": ..., "n": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from _neural_tangents_infinite import _set_threads, timed_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inputs", required=True, help="npz with key x [N, 40]")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--outputs", default="full,trace")
    args = parser.parse_args()
    if args.repeat < 1:
        sys.exit("--repeat must be at least 1")
    _set_threads(args.threads)

    import jax
    import neural_tangents as nt
    import numpy as np
    from neural_tangents import stax

    with np.load(args.inputs) as data:
        x = jax.device_put(np.asarray(data["x"], dtype=np.float32))
    init_fn, apply_fn, _ = stax.serial(
        stax.Dense(512), stax.Relu(), stax.Dense(512), stax.Relu(), stax.Dense(10))
    _, params = init_fn(jax.random.PRNGKey(0), x.shape)
    impl = nt.NtkImplementation.STRUCTURED_DERIVATIVES
    for output in args.outputs.split(","):
        trace_axes = {"full": (), "trace": (-1,)}[output]
        fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=0,
                                         implementation=impl))

        def call(fn=fn):
            return jax.block_until_ready(fn(x, None, params))

        result, first, times = timed_calls(call, args.repeat)
        shape = result.shape
        print(json.dumps({"output": output, "seconds": min(times),
                          "median": sorted(times)[len(times) // 2], "n": int(x.shape[0]),
                          "shape": list(shape), "first_call_seconds": first,
                          "threads": args.threads, "library": "neural_tangents"}), flush=True)


if __name__ == "__main__":
    main()
