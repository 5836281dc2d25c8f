"""``telescope.ntk(..., out=PATH, executor="ray")``: the blocks of a kernel computed on Ray.

The kernel's example-pair blocks (the upper triangle for ``x2=None``) are independent: each Ray
task gets the model (``ray.put`` once), its two input blocks and the options, computes its block
with the same code the local path runs (``telescope.ntk`` on the two blocks, in the worker), and
returns it. At most twice as many tasks as the cluster has CPU slots are in flight (so the object
store, and the driver that maps it, hold a bounded number of blocks). The driver writes every
block into the ``.npy`` as it arrives and records it in ``PATH.progress.json`` (the
:class:`~telescope.kernels._blocks.KernelFile` of the local out-of-core path), so a killed run
loses only the blocks in flight, and running the same call again computes only the missing
blocks. Writing on the driver (not in the tasks) keeps one writer per file and needs no
filesystem shared with the workers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from telescope._threads import available_cpus
from telescope.errors import UsageError
from telescope.kernels._blocks import KernelFile, _progress, _transpose_block

__all__ = ["ray_blocked_kernel", "RAY_BLOCK_SIZE", "import_ray", "ray_session"]

#: examples per block when ``executor="ray"`` is given no ``block_size``
RAY_BLOCK_SIZE = 512


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise UsageError("executor='ray' needs Ray: pip install 'telescope[ray]'") from error
    return ray


def _block_task(compute: Callable[..., Tensor], model: nn.Module, xa: Tensor, xb: Tensor | None,
                method: str, output: str, max_memory_gb: float | None,
                threads: int) -> np.ndarray:
    """One block, in a Ray worker (module level, so workers import it by name); ``compute`` is
    ``telescope.ntk`` (passed by reference: this module does not import the front door)."""
    torch.set_num_threads(threads)
    block = compute(model, xa, xb, method=method, output=output, max_memory_gb=max_memory_gb)
    return block.detach().cpu().numpy()


def ray_blocked_kernel(compute: Callable[..., Tensor], model: nn.Module, x1: Tensor,
                       x2: Tensor | None, *, method: str,
                       output: str, block_size: int, max_memory_gb: float | None,
                       sink: KernelFile, progress: bool, address: str | None = None,
                       cpus_per_task: int = 1) -> np.ndarray:
    """Fill ``sink`` with the kernel's blocks computed as Ray tasks (see the module
    docstring); returns the finished memory-mapped kernel."""
    ray = import_ray()
    symmetric = x2 is None
    xb_all = x1 if x2 is None else x2
    starts1 = range(0, x1.shape[0], block_size)
    starts2 = list(range(0, xb_all.shape[0], block_size))
    pairs = [(a, b) for a in starts1 for b in starts2 if not symmetric or b >= a]
    todo = [pair for pair in pairs if not sink.done(*pair)]
    if not todo:
        return sink.result()
    bar = _progress(len(todo), progress)
    cpus = max(available_cpus(), cpus_per_task)
    try:
        with ray_session(ray, address=address, num_cpus=cpus) as refs:
            task = ray.remote(num_cpus=cpus_per_task, max_retries=1)(_block_task)
            model_ref = ray.put(model.cpu() if _on_cpu(model) else model)
            # at most `window` blocks in flight: the object store (which the driver maps, so its
            # touched pages count in the driver's memory) holds a bounded number of results
            slots = int(ray.cluster_resources().get("CPU", cpus)) // cpus_per_task
            window = max(4, 2 * slots)
            queue = iter(todo)

            def submit() -> bool:
                pair = next(queue, None)
                if pair is None:
                    return False
                a, b = pair
                # copies, not views: a view would send its whole parent tensor's storage
                xa = x1[a:a + block_size].cpu().clone()
                xb = (None if symmetric and a == b
                      else xb_all[b:b + block_size].cpu().clone())
                refs[task.remote(compute, model_ref, xa, xb, method, output, max_memory_gb,
                                 cpus_per_task)] = (a, b)
                return True

            while len(refs) < window and submit():
                pass
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    a, b = refs.pop(ref)
                    block = torch.from_numpy(np.array(ray.get(ref)))   # Ray's are read-only
                    del ref
                    mirror = _transpose_block(block, output) if symmetric and b > a else None
                    sink.write(a, b, block, mirror)
                    bar.update()
                    submit()
    finally:
        bar.close()
    return sink.result()


@contextlib.contextmanager
def ray_session(ray: Any, *, address: str | None = None, num_cpus: int | None = None,
                **init_kwargs: Any) -> Iterator[dict[Any, Any]]:
    """A Ray instance for the ``with`` block (``ray.init`` unless one is running: the cluster at
    ``address``, else a local one with ``num_cpus``), shut down afterwards if it started here,
    with this process's SIGTERM/SIGINT handlers put back (``ray.init`` installs its own).
    Yields a dict for the caller's pending task refs: an exception cancels those left."""
    handlers = ({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                  **init_kwargs}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
        started = True
    refs: dict[Any, Any] = {}
    try:
        yield refs
    except BaseException:
        for ref in list(refs):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())
