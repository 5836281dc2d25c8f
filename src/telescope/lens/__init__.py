"""Training-time instruments attached to an optimizer (the telescoping lens), and probes of what
training does to a network's kernel, weights and attention.

- :class:`Telescope` -- the telescoping model ``f~_T(x) = f_0(x) + sum_t grad f_{t-1}(x)^T
  (theta_t - theta_{t-1})`` of Jeffares, Curth & van der Schaar (NeurIPS 2024), the model
  linearized around the initialization, and their errors against the actual network.
- :class:`Smoother` -- the model as a linear smoother of the training labels,
  ``f~(x) = S(x) vec(Y) + c(x)``, and its effective parameters.
- :func:`attention_entropy` -- mean attention entropy per layer and head (Zhai et al., 2023);
  :class:`AttentionEntropy`, the same as a training callback.
- :class:`WeightRank` -- spectra and ranks of the weight updates ``W_t - W_0``, and of the
  per-head ``W_Q^T W_K`` and ``W_O W_V`` updates of attention layers.
- :class:`NormCycles`, :func:`detect_cycles` -- norm-growth cycles of the last layer (the
  Slingshot Mechanism, Thilak et al., 2022); :func:`loss_spikes`, the loss spikes beside them.
- :class:`KernelEvolution` -- distance of the empirical NTK from its initial value, target
  alignment, trace and effective rank (Fort et al., 2020).
"""

from telescope.lens.attention import AttentionEntropy, attention_entropy
from telescope.lens.code_rank import CodeRank, code_ranks, code_spectrum
from telescope.lens.kernel_evolution import KernelEvolution
from telescope.lens.norm_cycles import NormCycles, detect_cycles, loss_spikes
from telescope.lens.smoother import Smoother
from telescope.lens.telescope import Telescope
from telescope.lens.weight_rank import WeightRank

__all__ = ["Telescope", "Smoother", "attention_entropy", "AttentionEntropy", "WeightRank",
           "NormCycles", "detect_cycles", "loss_spikes", "KernelEvolution",
           "CodeRank", "code_spectrum", "code_ranks"]
