"""The per-layer rules of the structured NTK, and how to add one for your own layer type.

The NTK is a sum over parameters, so it splits into one kernel per layer. For a layer that maps
its input ``a`` to ``y = W a + b`` at every token ``s`` (a linear layer on ``[N, S, in]``, a
convolution on unfolded patches), the gradient of output ``o`` with respect to ``W`` is
``sum_s delta_{o,s} a_s^T`` where ``delta_{o,s} = d f_o / d y_s``. Hence

    Theta_W(x, x')[o, o'] = sum_{s, s'} <a_s, a'_{s'}> <delta_{o,s}, delta'_{o',s'}>

and the bias adds the same sum with ``<a_s, a'_s'>`` replaced by 1 (a constant 1 is appended to
``a``). An embedding is a linear layer on one-hot inputs, so ``<a_s, a'_s'>`` becomes the
indicator ``[idx_s == idx'_{s'}]``. A grouped layer (a grouped convolution, a block-diagonal
linear layer: ``G`` blocks, block ``g`` maps its slice ``a_g`` of the input to its slice of the
output) has the sum over groups of these kernels, ``sum_g sum_{s,s'} <a_{g,s}, a'_{g,s'}>
<delta_{g,s}, delta'_{g,s'}>``, one factor per group. An elementwise affine layer ``y = w *
u(x) + b`` (LayerNorm, RMSNorm, BatchNorm in eval mode, GroupNorm, ...; ``u`` free of
parameters) has per-example gradients ``sum delta * u`` and ``sum delta`` over the axes ``w`` is
broadcast along.

A *rule* turns the inputs a module was called with and the output deltas of a block of examples
into *factors* (:class:`TokenFactor`, :class:`GradFactor`) that the structured engine contracts.
Rules are found by what a module is (``isinstance`` along its class's MRO, so subclasses inherit
their base's rule) and, for layer types of other libraries, by what it computes (Hugging Face's
``Conv1D`` ``y = x @ W + b``; norm layers with an elementwise weight). Every rule is checked
against autograd on the model before it is used, so a rule that does not fit (a subclass whose
forward computes something else, a weight also used outside the module) falls back to
per-example Jacobians, never to a wrong kernel.

Your own layer: ``register_rule(MyLinear, LinearRule(weight="w", bias="b"))`` for ``y = x @
W.T + b``-style layers (``transposed=True`` for ``y = x @ W + b``, ``weight_scale``/
``bias_scale`` for constant factors), ``register_rule(MyNorm, AffineRule(axis="last"))`` for
``y = w * u(x) + b``, ``register_rule(MyBlocks, BlockDiagonalRule(groups="n_blocks"))`` for a
linear layer whose ``[out, in / G]`` weight holds the ``G`` diagonal blocks.

A layer type can also declare its rule itself, without importing telescope (this is how
:class:`telescope.models.NTKLinear` declares its own, so ``kernels`` imports no model): a class
attribute ``ntk_rule``, a mapping with the rule's ``kind`` (``"linear"``: :class:`LinearRule`,
``"affine"``: :class:`AffineRule`, ``"conv"``: :class:`ConvRule`, as
:class:`telescope.models.NTKConv` declares it, ``"block_diagonal"``: :class:`BlockDiagonalRule`,
as :class:`telescope.models.BlockDiagonalLinear` does) and that rule's fields, e.g. ::

    class MyLinear(nn.Module):
        ntk_rule = {"kind": "linear", "weight": "w", "bias": "b", "weight_scale": "scale"}

(``ntk_rule`` may also be a rule itself, for a layer whose module imports telescope). Lookup
walks the class's MRO; at each class a rule given to :func:`register_rule` comes first, then an
``ntk_rule`` the class defines itself, so ``register_rule`` overrides a declared rule and
subclasses inherit both. A declared rule is checked against autograd like every other.

This module is the front door: the registry (:func:`register_rule`, :func:`rule_for`) and,
re-exported from the private modules they live in, the rule protocol and the factors
(``_rule_protocol.py``), the per-layer rules (``_layer_rules.py``) and the composite
:class:`AttentionRule` (``_attention_rule.py``).

References: Novak, Sohl-Dickstein & Schoenholz (2022), "Fast Finite Width Neural Tangent Kernel"
(structured derivatives); Littwin, Myara, Sabah, Susskind, Zhai & Golan (2020), "Collegial
Ensembles" (NeurIPS; ensembles as grouped / block-diagonal layers).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.kernels._attention_rule import AttentionRule
from telescope.kernels._layer_rules import (
    AffineRule,
    BlockDiagonalRule,
    ConvRule,
    EmbeddingRule,
    LinearRule,
)
from telescope.kernels._rule_protocol import (
    CompositeRule,
    GradFactor,
    Rule,
    RuleMismatch,
    TokenFactor,
)

__all__ = ["TokenFactor", "GradFactor", "LinearRule", "AffineRule", "EmbeddingRule", "ConvRule",
           "BlockDiagonalRule", "AttentionRule", "register_rule", "rule_for", "Rule",
           "CompositeRule", "RuleMismatch"]


_REGISTRY: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Embedding: EmbeddingRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.LayerNorm: AffineRule(axis="last", name="affine (norm)"),
    nn.RMSNorm: AffineRule(axis="last", bias=None, name="affine (norm)"),
    nn.GroupNorm: AffineRule(axis="channel", name="affine (norm)"),
    nn.modules.batchnorm._NormBase: AffineRule(axis="channel", name="affine (norm)"),
    nn.MultiheadAttention: AttentionRule(),
}
_VERSION = [0]


def register_rule(module_type: type, rule: Rule) -> None:
    """Use ``rule`` (a :class:`LinearRule`, :class:`AffineRule`, or any callable with the
    :data:`Rule` signature) for ``module_type`` and its subclasses. It is checked against
    autograd on every model before use, like the built-in rules; plans made before are
    rebuilt."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise UsageError(f"module_type must be a torch.nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise UsageError(f"rule must be a LinearRule, AffineRule or a callable, got {rule!r}")
    _REGISTRY[module_type] = rule
    _VERSION[0] += 1


def rules_version() -> int:
    """Increases with every :func:`register_rule` (plans depend on the registry)."""
    return _VERSION[0]


def rule_for(module: nn.Module) -> tuple[Rule | None, str]:
    """The rule for ``module`` and its name, or ``(None, why not)``."""
    if hasattr(module, "parametrizations"):
        return None, "its weight is parametrized (torch.nn.utils.parametrize): no rule"
    rule = next((r for r in map(_rule_of_class, type(module).__mro__) if r is not None), None)
    if rule is None:
        rule = _by_computation(module)
    if rule is None:
        return None, f"no rule for {type(module).__name__}"
    name = getattr(rule, "name", type(rule).__name__)
    groups = 1
    if isinstance(rule, ConvRule):
        groups = getattr(module, "groups", 1)
    elif isinstance(rule, BlockDiagonalRule):
        groups = rule.groups if isinstance(rule.groups, int) else getattr(module, rule.groups, 1)
    if isinstance(groups, int) and groups > 1:  # explain() shows how many blocks there are
        name = f"{name} (groups={groups})"
    return rule, name


_DECLARED_KINDS: dict[str, type] = {"linear": LinearRule, "affine": AffineRule, "conv": ConvRule,
                                     "block_diagonal": BlockDiagonalRule}
"""The rule types a layer's ``ntk_rule = {"kind": ..., **fields}`` may name."""


def _rule_of_class(cls: type) -> Rule | None:
    """The rule registered for ``cls`` itself, else the one ``cls`` itself declares
    (``ntk_rule``, see the module docstring), else ``None`` (inherited ones are not looked at:
    :func:`rule_for` walks the MRO)."""
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    spec = cls.__dict__.get("ntk_rule")
    if spec is None:
        return None
    if callable(spec):
        return spec
    if not isinstance(spec, Mapping) or spec.get("kind") not in _DECLARED_KINDS:
        raise UsageError(f"{cls.__qualname__}.ntk_rule must be a rule or a mapping with 'kind' "
                         f"one of {sorted(_DECLARED_KINDS)} and that rule's fields, got {spec!r}")
    fields = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return _DECLARED_KINDS[spec["kind"]](**fields)
    except TypeError as err:
        raise UsageError(f"{cls.__qualname__}.ntk_rule: {err}") from None


def _by_computation(module: nn.Module) -> Rule | None:
    """Rules for other libraries' layers, recognized by what they hold (verified like all)."""
    name = type(module).__name__
    w = module._parameters.get("weight")
    if name == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2 and hasattr(module, "nf"):
        return LinearRule(transposed=True, name="linear (Conv1D)")
    if "Norm" in name and isinstance(w, Tensor) and w.ndim == 1 and set(module._parameters) <= {
            "weight", "bias"}:
        return AffineRule(axis="auto", name="affine (norm)")
    return None
