"""The lazy-training rescaling of a model (Chizat, Oyallon & Bach, 2019, "On Lazy Training in
Differentiable Programming", NeurIPS 2019).

For a model ``f(x; theta)`` initialized at ``theta_0`` and a scale ``alpha > 0`` the lazy model is

    h_alpha(x; theta) = alpha * (f(x; theta) - f(x; theta_0)),

trained on the loss ``L(h_alpha) / alpha^2``. Its output is 0 at initialization, its tangent kernel
is ``alpha^2`` times that of ``f``, and gradient flow moves ``theta`` by ``O(1 / alpha)``: as
``alpha -> infinity`` the trajectory of ``h_alpha`` approaches that of the linearized model
``x -> J(x) psi`` (``J = d f / d theta`` at ``theta_0``) trained by gradient flow on ``L`` from
``psi = 0`` (Chizat et al., 2019).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["LazyModel"]


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are all turned into (non-trainable) buffers."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        for name, p in list(module._parameters.items()):
            del module._parameters[name]
            if p is None:
                module.register_buffer(name, None)
            else:
                module.register_buffer(name, p.detach().clone())
    return ref


class LazyModel(nn.Module):
    r"""``h(x) = alpha * (f(x; theta) - f(x; theta_0))`` (Chizat, Oyallon & Bach, 2019).

    Parameters
    ----------
    model
        The network ``f(.; theta)``; it becomes the submodule ``model`` and its parameters are
        the only parameters of the wrapper (what optimizers and :func:`telescope.ntk` see).
    alpha
        The scale ``alpha > 0``. Train with :meth:`scale_loss` (``L / alpha^2``), which keeps the
        output's rate of change ``O(1)`` as ``alpha`` grows.

    Notes
    -----
    ``theta_0`` is a frozen copy of ``model`` taken at construction, the submodule
    ``reference``, whose parameters have been turned into buffers: it moves with ``.to()``, is
    saved in ``state_dict`` and follows the wrapper's train/eval mode, but has no parameters.
    Its output is computed under ``torch.no_grad()``. The empirical NTK of the wrapper is
    ``Theta_h(x, x') = alpha^2 Theta_f(x, x')`` at every ``theta``. Tools that walk the module
    tree (e.g. :func:`telescope.lens.attention_entropy`) also see the reference's modules,
    named ``reference.*``.
    """

    def __init__(self, model: nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        alpha = float(alpha)
        if not (alpha > 0 and alpha < float("inf")):
            raise UsageError(f"alpha must be a positive finite number, got {alpha}")
        self.alpha = alpha
        self.model = model
        self.reference = _frozen_copy(model)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f0 = self.reference(x)
        return self.alpha * (self.model(x) - f0)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss / alpha^2``: the objective of lazy training (Chizat et al., 2019).

        With it, a gradient step on ``theta`` changes the output ``h`` by ``O(1)`` for every
        ``alpha`` (the output's gradient is ``alpha J``), and the parameters by ``O(1/alpha)``.
        """
        return loss / self.alpha ** 2

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
