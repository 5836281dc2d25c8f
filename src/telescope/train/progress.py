"""Progress of a long computation (training steps, kernel blocks): a counter that shows no bar
(:class:`Progress`, what a point gets in a worker process or a Ray task) or a tqdm bar
(:class:`TqdmProgress`). :func:`telescope.train.fit` reports to one; so do the sweep executors.
"""

from __future__ import annotations

import sys

__all__ = ["Progress", "TqdmProgress"]


class Progress:
    """Progress of one long point (e.g. training steps), as the study reports it.

    ``set(total)`` announces the number of steps, ``update(n=1)`` counts them, ``write(msg)``
    prints a line without breaking progress bars. This base class shows no bar (it is what a
    point gets in a worker process or a Ray task); :class:`TqdmProgress` shows one.
    """

    def __init__(self) -> None:
        self.n = 0
        self.total: int | None = None

    def set(self, total: int | None) -> None:
        """Announce the number of steps (``None``: unknown)."""
        self.total = None if total is None else int(total)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps."""
        self.n += n

    def write(self, msg: str) -> None:
        """Print a message (to stderr)."""
        print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish (hide the bar, if any)."""


class TqdmProgress(Progress):
    """A :class:`Progress` shown as a tqdm bar (created on the first ``set`` or ``update``)."""

    def __init__(self, desc: str = "", *, position: int = 1, leave: bool = False,
                 enabled: bool = True) -> None:
        super().__init__()
        self.desc = desc
        self.position = position
        self.leave = leave
        self.enabled = enabled
        self._bar = None

    def _ensure(self):
        if self._bar is None and self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, position=self.position,
                             leave=self.leave, file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.5)
        return self._bar

    def set(self, total: int | None) -> None:
        super().set(total)
        bar = self._ensure()
        if bar is not None:
            bar.total = self.total
            bar.refresh()

    def update(self, n: int = 1) -> None:
        super().update(n)
        bar = self._ensure()
        if bar is not None:
            bar.update(n)

    def write(self, msg: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
