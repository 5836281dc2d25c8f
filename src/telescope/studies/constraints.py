"""What a study config's field may hold: ranges declared on the annotations, scikit-learn style.

A field's range is declared with ``typing.Annotated`` and the ``annotated_types`` constraints
pydantic checks (``Ge``, ``Gt``, ``Le``, ``Lt``, ``MinLen``), or the aliases here:
``n_train: PositiveInt = 512``, ``momentum: Annotated[float, Ge(0), Lt(1)] = 0.9``, ``widths:
NonEmpty[PositiveInt] = (8, 16)``. Config classes are declared with :func:`config_dataclass`,
which checks those ranges when the class is called; :mod:`telescope.studies.config` turns
pydantic's range errors into the same messages (:func:`check_declared_range`, with
:func:`~telescope.studies.base.check_range`'s wording: ``data.n_train must be >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, TypeVar

from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt, MinLen

from telescope.studies.base import check_range

__all__ = ["config_dataclass", "check_declared_range", "RANGE_ERRORS", "PositiveInt",
           "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "NonEmpty"]

_T = TypeVar("_T")

PositiveInt = Annotated[int, Ge(1)]
"""An integer >= 1 (a size, a number of steps): ``n_train: PositiveInt = 512``."""
NonNegativeInt = Annotated[int, Ge(0)]
"""An integer >= 0."""
PositiveFloat = Annotated[float, Gt(0)]
"""A number > 0 (a learning rate, a ridge)."""
NonNegativeFloat = Annotated[float, Ge(0)]
"""A number >= 0 (a weight decay, a noise level)."""
NonEmpty = Annotated[tuple[_T, ...], MinLen(1)]
"""A tuple of at least one ``X``: ``widths: NonEmpty[PositiveInt] = (8, 16)``."""

RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                           "too_short"})
"""pydantic's error types of the range constraints (``annotated_types.Ge``, ..., ``MinLen``)."""


def _constraints(tp: Any) -> tuple[Any, list[Any]]:
    """``tp`` without its ``Annotated`` layers (and ``X | None`` as ``X``), and their
    constraints (``Interval(ge=0, lt=1)`` as ``Ge(0), Lt(1)``)."""
    found: list[Any] = []
    while True:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is Annotated:
            tp = args[0]
            for m in args[1:]:
                found.extend(m if isinstance(m, GroupedMetadata) else [m])   # Interval(...)
        elif (typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2
              and type(None) in args):
            tp = next(a for a in args if a is not type(None))
        else:
            return tp, found


def _declared(tp: Any) -> tuple[list[Any], list[Any]]:
    """The range constraints an annotation declares: ``(bounds, outer)``, the bounds of the
    value (of each item, for a tuple or list) and the constraints of the whole (``MinLen``)."""
    tp, outer = _constraints(tp)
    if typing.get_origin(tp) in (tuple, list) and typing.get_args(tp):
        return _constraints(typing.get_args(tp)[0])[1], outer
    return outer, outer


def check_declared_range(key: str, value: Any, tp: Any) -> None:
    """Raise :func:`check_range`'s message when ``value`` (a number, or a tuple or list of
    them) breaks the range declared on the annotation ``tp``."""
    bounds, outer = _declared(tp)
    kw: dict[str, Any] = {}
    for m in bounds:
        if isinstance(m, (Ge, Gt)):
            kw.update(low=m.ge if isinstance(m, Ge) else m.gt, low_open=isinstance(m, Gt))
        elif isinstance(m, (Le, Lt)):
            kw.update(high=m.le if isinstance(m, Le) else m.lt, high_open=isinstance(m, Lt))
    nonempty = any(isinstance(m, MinLen) and m.min_length == 1 for m in outer)
    check_range(key, value, **kw, nonempty=nonempty, allow_none=True)


@functools.cache
def _ranged_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(name, annotation)`` of the fields of ``cls`` that declare a range (resolved once per
    class)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        bounds, outer = _declared(hints[f.name])
        if any(isinstance(m, (Ge, Gt, Le, Lt, MinLen)) for m in [*bounds, *outer]):
            out.append((f.name, hints[f.name]))
    return tuple(out)


def config_dataclass(cls: type) -> type:
    """``@dataclass`` for a study's config classes: an instance checks the ranges declared on
    its fields' annotations (:func:`check_range`'s messages) before the class's own
    ``__post_init__`` runs, also when the class is called directly rather than built by
    :func:`~telescope.studies.config.make_config`."""
    own = getattr(cls, "__post_init__", None)

    def __post_init__(self) -> None:
        for name, tp in _ranged_fields(type(self)):
            check_declared_range(name, getattr(self, name), tp)
        if own is not None:
            own(self)

    __post_init__.__doc__ = getattr(own, "__doc__", None)
    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return dataclasses.dataclass(cls)
