"""Training: one loop (:func:`fit`) with the lenses attached as callbacks, and its progress.

``fit(model, optimizer, x, y, steps=..., loss=..., batch_size=..., eval_at=..., evaluate=...,
callbacks=[...])`` owns the loop every study uses: batches from a seeded generator, the
non-finite-loss check, the learning-rate schedule, eval-mode measurement and tidy history rows.
The lenses (:mod:`telescope.lens`) are its callbacks and work as well in a loop of your own.
"""

from telescope.train.fit import LOSSES, SAMPLERS, Callback, FitState, History, fit
from telescope.train.progress import Progress, TqdmProgress
from telescope.train.steps import evenly_spaced_steps, log_spaced_steps

__all__ = ["fit", "FitState", "History", "Callback", "LOSSES", "SAMPLERS", "Progress",
           "TqdmProgress", "log_spaced_steps", "evenly_spaced_steps"]
