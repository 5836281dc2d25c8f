"""Training: one loop (:func:`fit`) with the lenses attached as callbacks, and progress."""

from telescope.train.progress import Progress, TqdmProgress

__all__ = ["Progress", "TqdmProgress"]
