"""The errors telescope raises on purpose, under one base class.

Every problem the caller can fix (a wrong argument, config value, input, model, optimizer or
run directory) raises a subclass of :class:`TelescopeError` whose message names the problem and
the fix. Anything else that escapes telescope (a plain ``ValueError`` from deep inside torch, an
``AssertionError``) is a bug and keeps its traceback: the command line prints ``telescope:
error: ...`` and exits with code 2 only for :class:`TelescopeError`.

:class:`UsageError` is also a ``ValueError`` and a ``TypeError`` (as numpy's ``AxisError`` is
both a ``ValueError`` and an ``IndexError``), so code written against the built-in exceptions
keeps catching it.
"""

from __future__ import annotations

__all__ = ["TelescopeError", "UsageError", "UnsupportedModelError", "UnsupportedOptimizerError",
           "DivergedError", "NotConvergedError", "check_positive_int", "check_std"]


class TelescopeError(Exception):
    """Base class of the errors telescope raises for problems the caller can fix."""


class UsageError(TelescopeError, ValueError, TypeError):
    """An argument, config value or input is invalid: the message says which and how to fix
    it."""


class UnsupportedModelError(UsageError):
    """The model cannot be given a per-example tangent kernel as it is (and how to fix it)."""


class UnsupportedOptimizerError(UsageError):
    """The optimizer, or one of its options, is not reproduced exactly by a lens that must be
    exact (the message names the option and what to use instead)."""


class DivergedError(TelescopeError, FloatingPointError):
    """Training produced NaN or infinite values (lower the learning rate)."""


class NotConvergedError(TelescopeError, RuntimeError):
    """An iterative solver did not reach its tolerance within its iteration budget (the message
    gives the residual reached and the fixes: a larger ridge, a better preconditioner, more
    iterations or a looser tolerance); no unconverged result is returned."""


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int if it is one and ``>= 1`` (not a bool), else a :class:`UsageError`
    naming ``name``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_std(value: object, name: str) -> float:
    """A standard deviation (or any scale): a finite real ``>= 0`` as a float, else a
    :class:`UsageError` naming ``name``."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be finite and >= 0, got {value}")
    return value


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside telescope (so the warning points
    at the user's line, however deep inside the library it is raised)."""
    import sys
    import warnings

    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn's caller, frame 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("telescope."):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
