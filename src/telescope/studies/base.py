"""What a study is, the registry of studies, and typed configs built from presets and ``--set``.

A study (see ``docs/studies-api.md``) is a config dataclass with presets plus four functions:
the sweep (:attr:`Study.points`), one point's measurement (:attr:`Study.run_point`), its
figures and its headline numbers. The machinery in :mod:`telescope.runs` and
:mod:`telescope.report` runs it; this module only describes it.

Configs are built in three layers, each overriding the previous one:

1. the config dataclass's own defaults,
2. the preset (``study.presets[name]``: Python values, dotted keys allowed, e.g.
   ``{"data.name": "digits", "widths": (4, 8, 16)}``),
3. the ``--set key=value`` overrides: strings parsed by the type annotation of the field they
   set (:func:`parse_value`).

Values are checked against the annotations (``int``, ``float``, ``bool``, ``str``, ``Path``,
``X | None``, ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict``,
nested dataclasses); unknown keys raise a :class:`ValueError` that lists the valid ones.

Every value given by a preset or ``--set`` is then checked generically, before the config
class's own ``__post_init__`` (:func:`check_generic`): no NaN, no infinity unless the field's
default holds one, no negative integer unless the default holds one (a field's
``metadata={"allow_negative": True}`` or ``{"allow_nonfinite": True}`` opts out), and
``1 <= seeds <= MAX_POINTS``. The study's ``__post_init__`` checks the rest (ranges, sizes >= 1,
combinations), with :func:`check_range` for one-line messages that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from telescope.errors import UsageError
from telescope.runs.plan import MAX_POINTS
from telescope.train.progress import Progress

__all__ = ["Study", "Progress", "REGISTRY", "register", "get_study", "list_studies",
           "make_config", "config_from_dict", "config_to_dict", "config_keys", "flatten_config",
           "parse_value", "parse_overrides", "resolve_device", "evenly_spaced_steps",
           "check_generic", "check_range", "check_device", "MAX_POINTS"]


@dataclass(frozen=True)
class Study:
    """One experiment: a config dataclass with presets and the functions the machinery calls.

    Attributes
    ----------
    name : str
        Command-line name, e.g. ``"double-descent"``.
    description : str
        One line, shown by ``telescope study --list`` and as the report's subtitle.
    config_cls : type
        A dataclass (fields may be nested dataclasses); it must have ``seeds: int`` (number of
        seeds) and ``seed: int`` (the first seed), and every field needs a default.
    presets : dict
        ``{"quick": {...}, "full": {...}}``: overrides of the defaults, dotted keys allowed.
    points : callable
        ``points(config) -> list[dict]``: the sweep, JSON-serializable dicts such as
        ``{"width": 8, "seed": 0}``; they must be distinct.
    run_point : callable
        ``run_point(config, point, progress) -> list[dict]``: runs one point and returns tidy
        rows (one per measurement step) carrying the point's keys; writes no files.
    figures : callable
        ``figures(df, config, out_dir) -> list[Path]``: writes PNG + SVG figures, returns the
        PNG paths. ``df`` may hold only some of the points (a partial or failed run).
    headline : callable
        ``headline(df, config) -> dict``: the few numbers the report leads with.
    guide : str
        A short reading guide (paragraphs, ``- `` bullets, ```code```, ``**bold**``).
    estimate_memory : callable or None
        Optional: ``estimate_memory(config, point) -> bytes | None``, about the peak memory
        one point needs. The largest is printed before a run starts, and a run whose largest
        point (times the points running at once) needs more than the machine has is refused.
    """

    name: str
    description: str
    config_cls: type
    presets: dict[str, dict]
    points: Callable[[Any], list[dict]]
    run_point: Callable[[Any, dict, Progress], list[dict]]
    figures: Callable[[Any, Any, Path], list[Path]]
    headline: Callable[[Any, Any], dict[str, Any]]
    guide: str
    estimate_memory: Callable[[Any, dict], int | float | None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a study needs a non-empty name, got {self.name!r}")
        if not (isinstance(self.config_cls, type) and dataclasses.is_dataclass(self.config_cls)):
            raise TypeError(f"study {self.name!r}: config_cls must be a dataclass type, "
                            f"got {self.config_cls!r}")
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        missing = {"seeds", "seed"} - names
        if missing:
            raise TypeError(f"study {self.name!r}: config_cls {self.config_cls.__name__} needs "
                            f"the fields {sorted(missing)} (seeds: number of seeds, seed: first)")
        for fn in ("points", "run_point", "figures", "headline"):
            if not callable(getattr(self, fn)):
                raise TypeError(f"study {self.name!r}: {fn} must be callable")
        if self.estimate_memory is not None and not callable(self.estimate_memory):
            raise TypeError(f"study {self.name!r}: estimate_memory must be callable or None")
        if not isinstance(self.presets, Mapping):
            raise TypeError(f"study {self.name!r}: presets must be a dict of dicts")


class _Registry(dict):
    """A dict of studies by name that first registers the module-level studies of every
    imported ``telescope.studies.*`` module, so that a study module only needs importing."""

    _collecting = False

    def _sync(self) -> None:
        if not _Registry._collecting:
            _Registry._collecting = True
            try:
                _collect()
            finally:
                _Registry._collecting = False

    def __getitem__(self, key):
        self._sync()
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._sync()
        return super().__contains__(key)

    def __iter__(self):
        self._sync()
        return super().__iter__()

    def __len__(self) -> int:
        self._sync()
        return super().__len__()

    def get(self, key, default=None):
        self._sync()
        return super().get(key, default)

    def keys(self):
        self._sync()
        return super().keys()

    def values(self):
        self._sync()
        return super().values()

    def items(self):
        self._sync()
        return super().items()


REGISTRY: dict[str, Study] = _Registry()
"""Every known study by name (lower case, ``-`` separated): the module-level studies of the
imported ``telescope.studies.*`` modules, and any passed to :func:`register`."""


def _normalize_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(study: Study) -> Study:
    """Add ``study`` to :data:`REGISTRY` and return it (idempotent)."""
    if not isinstance(study, Study):
        raise TypeError(f"register() expects a Study, got {type(study).__name__}")
    key = _normalize_name(study.name)
    known = dict.get(REGISTRY, key)
    if known is not None and known is not study:
        # the same study re-created by a module reload is replaced; another one is an error
        if (known.config_cls.__module__, known.config_cls.__qualname__) != (
                study.config_cls.__module__, study.config_cls.__qualname__):
            raise ValueError(f"two different studies are named {study.name!r}")
    dict.__setitem__(REGISTRY, key, study)
    return study


def _collect() -> None:
    """Register the module-level :class:`Study` objects of the imported ``telescope.studies.*``
    modules whose names are not registered yet (an explicit :func:`register`, or a test's
    replacement, wins)."""
    import sys

    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("telescope.studies.") or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Study) and not dict.__contains__(
                    REGISTRY, _normalize_name(value.name)):
                register(value)


def list_studies() -> list[Study]:
    """All registered studies, sorted by name."""
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def get_study(name: str) -> Study:
    """The study called ``name`` (``_`` and ``-`` are interchangeable); a clear error otherwise."""
    study = REGISTRY.get(_normalize_name(str(name)))
    if study is None:
        known = ", ".join(sorted(REGISTRY)) or "(none)"
        close = difflib.get_close_matches(_normalize_name(str(name)), list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown study {name!r}{hint}; known studies: {known}")
    return study


# --------------------------------------------------------------------------- config fields


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as err:  # pragma: no cover - broken annotations are a study bug
        raise TypeError(f"cannot resolve the type annotations of {cls.__name__}: {err}") from err


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_keys(config_cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key of ``config_cls`` (dotted for nested dataclasses) -> its type."""
    out: dict[str, Any] = {}
    hints = _hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        key = prefix + f.name
        if _is_dataclass_type(tp):
            out.update(config_keys(tp, key + "."))
        else:
            out[key] = tp
    return out


def _field_type(config_cls: type, key: str, study_name: str = "") -> Any:
    """The annotation of the (dotted) ``key``; a ValueError listing the valid keys otherwise."""
    cls: Any = config_cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            _unknown_key(config_cls, key, study_name)
        tp = hints.get(part, Any)
        if i < len(parts) - 1:
            if not _is_dataclass_type(tp):
                _unknown_key(config_cls, key, study_name)
            cls = tp
        else:
            return tp
    raise AssertionError("unreachable")  # pragma: no cover


def _unknown_key(config_cls: type, key: str, study_name: str) -> typing.NoReturn:
    valid = list(config_keys(config_cls))
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f" of study {study_name!r}" if study_name else f" of {config_cls.__name__}"
    raise UsageError(f"unknown config key {key!r}{where}{hint}; valid keys: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- parsing strings

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}
_NONE = {"none", "null", "~"}


def _split_items(text: str) -> list[str]:
    """``"1,2,3"``, ``"[1, 2, 3]"``, ``"(1,2)"``, ``"a b"`` -> items; ``""`` / ``"[]"`` -> []."""
    s = text.strip()
    if len(s) >= 2 and s[0] + s[-1] in ("[]", "()"):
        s = s[1:-1].strip()
    if not s:
        return []
    items = s.split(",") if "," in s else s.split()
    items = [item.strip() for item in items]
    if items and items[-1] == "":  # a trailing comma: "8," is a one-element tuple
        items = items[:-1]
    if any(item == "" for item in items):
        raise UsageError(f"empty item in {text!r}")
    return [item.strip("'\"") for item in items]


def parse_value(text: str, tp: Any) -> Any:
    """Parse the command-line string ``text`` as a value of type ``tp``.

    - ``bool``: ``true/false``, ``yes/no``, ``on/off``, ``1/0``;
    - ``int``: ``12``, ``1_000``, ``1e3`` (when integral), ``0x10``; ``float``: ``1e-3``, ``inf``;
    - ``X | None``: ``none`` or ``null`` -> ``None``, else parsed as ``X``;
    - ``Literal["a", "b"]``: one of the choices;
    - ``tuple[X, ...]``, ``list[X]``, ``tuple[X, Y]``: ``8,16,32`` or ``[8, 16, 32]`` (JSON
      too); ``""`` or ``[]`` is empty;
    - ``dict``: JSON; ``str``/``Path``: the text as is; untyped (``Any``): JSON if it parses,
      else the text.

    Raises ValueError with the expected type when ``text`` does not fit.
    """
    if not isinstance(text, str):
        return coerce_value(text, tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    s = text.strip()

    if tp is Any or tp is object:
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return text
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and s.lower() in _NONE:
            return None
        for option in options:
            try:
                return parse_value(text, option)
            except (ValueError, TypeError):
                continue
        raise UsageError(f"expected {_type_name(tp)}, got {text!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == s or (isinstance(choice, str) and choice.lower() == s.lower()):
                return choice
        raise UsageError(f"expected one of {', '.join(map(repr, args))}, got {text!r}")
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise UsageError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")
    if tp is int:
        try:
            return int(s.replace("_", ""), 0)
        except ValueError:
            pass
        try:
            value = float(s)
        except ValueError:
            raise UsageError(f"expected an integer, got {text!r}") from None
        if value.is_integer():
            return int(value)
        raise UsageError(f"expected an integer, got {text!r}")
    if tp is float:
        try:
            return float(s.replace("_", ""))
        except ValueError:
            raise UsageError(f"expected a number, got {text!r}") from None
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path(s).expanduser()
    if _is_dataclass_type(tp):
        raise UsageError(f"{tp.__name__} is a group of settings: set its fields one by one "
                         f"(e.g. key.{dataclasses.fields(tp)[0].name}=...)")
    if origin in (tuple, list, set, frozenset) or tp in (tuple, list):
        if s.startswith("["):
            try:
                return coerce_value(json.loads(s), tp)
            except json.JSONDecodeError:
                pass
        items = _split_items(s)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise UsageError(f"expected {len(args)} comma-separated values "
                                 f"({_type_name(tp)}), got {text!r}")
            return tuple(parse_value(item, a) for item, a in zip(items, args, strict=True))
        elem = args[0] if args else Any
        values = [parse_value(item, elem) for item in items]
        return (origin or tp)(values)
    if origin is dict or tp is dict:
        try:
            value = json.loads(s)
        except json.JSONDecodeError:
            raise UsageError(f"expected a JSON object, got {text!r}") from None
        return coerce_value(value, tp)
    # any other annotation: JSON if it parses, then checked
    try:
        value = json.loads(s)
    except json.JSONDecodeError:
        value = text
    return coerce_value(value, tp)


def coerce_value(value: Any, tp: Any) -> Any:
    """Check a Python value (a preset's, or one read back from JSON) against ``tp``; convert
    JSON's lists to tuples, ints to floats and strings to paths where the annotation says so.
    Strings for non-string fields are parsed with :func:`parse_value`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if isinstance(value, str) and tp is not str and not (
            isinstance(tp, type) and issubclass(tp, Path)) and origin is not typing.Literal:
        if origin in (typing.Union, types.UnionType) and str in args:
            return value
        return parse_value(value, tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce_value(value, option)
            except (ValueError, TypeError):
                continue
        raise UsageError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"expected one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UsageError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"expected a string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return Path(value)
        raise UsageError(f"expected a path, got {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, _nest(tp, dict(value), ""), "")
        raise UsageError(f"expected the settings of {tp.__name__} (a dict), got {value!r}")
    if origin in (tuple, list, set, frozenset) or tp in (tuple, list):
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise UsageError(f"expected {_type_name(tp)}, got {value!r}")
        items = list(value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise UsageError(f"expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(coerce_value(v, a) for v, a in zip(items, args, strict=True))
        elem = args[0] if args else Any
        return (origin or tp)(coerce_value(v, elem) for v in items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"expected a dict, got {value!r}")
        if len(args) == 2:
            return {coerce_value(k, args[0]): coerce_value(v, args[1]) for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        try:
            return tp(value)
        except Exception as err:
            raise UsageError(f"expected {_type_name(tp)}, got {value!r}") from err
    return value


# --------------------------------------------------------------------------- building configs


def _nest(config_cls: type, flat: dict[str, Any], study_name: str) -> dict[str, Any]:
    """Dotted keys -> a nested dict, values coerced to their fields' types."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        tp = _field_type(config_cls, key, study_name)
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            # a whole group given as a dict ({"data": {"name": ...}}): its keys are dotted below
            sub = {f"{key}.{k}": v for k, v in value.items()}
            _merge(nested, _nest(config_cls, sub, study_name))
            continue
        try:
            coerced = coerce_value(value, tp)
        except (ValueError, TypeError) as err:
            raise UsageError(f"config key {key!r}: {err}") from None
        _set_path(nested, key.split("."), coerced)
    return nested


def _set_path(nested: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        nested = nested.setdefault(part, {})
    nested[parts[-1]] = value


def _merge(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _numbers(value: Any) -> list[int | float]:
    """The numbers in a value (itself, or the items of a list/tuple, recursively; no bools)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [n for item in value for n in _numbers(item)]
    return []


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check_generic(key: str, value: Any, default: Any = None,
                  metadata: Mapping[str, Any] | None = None, *, finite: bool = True,
                  signs: bool = True) -> None:
    """The checks every config value gets (``key``: its dotted name, for the message):

    - ``finite``: no NaN; no infinity unless ``default`` holds one (e.g. a list of training
      times ending in ``inf``) or ``metadata["allow_nonfinite"]``; ``seeds``:
      ``1 <= seeds <= MAX_POINTS``; a ``seed`` below ``2**63``;
    - ``signs``: no negative integer unless ``default`` holds one or
      ``metadata["allow_negative"]``.

    Config building runs the ``finite`` part before the config class's ``__post_init__`` (which
    then never compares NaN) and the ``signs`` part after it (so that a study's own, more
    precise message, e.g. ``data.n_train must be >= 1``, comes first).

    Raises :class:`~telescope.errors.UsageError` naming the key and the value.
    """
    metadata = metadata or {}
    name = key.rpartition(".")[2]
    defaults = _numbers(default)
    allow_inf = metadata.get("allow_nonfinite") or any(
        isinstance(d, float) and math.isinf(d) for d in defaults)
    allow_negative = metadata.get("allow_negative") or any(
        isinstance(d, int) and d < 0 for d in defaults)
    shown = f"{key}={_fmt_value(value)}"
    for n in _numbers(value):
        if finite and isinstance(n, float) and math.isnan(n):
            raise UsageError(f"{shown}: {key} must be a number, not NaN")
        if finite and isinstance(n, float) and math.isinf(n) and not allow_inf:
            raise UsageError(f"{shown}: {key} must be a finite number (a value like 1e999 "
                             f"overflows to inf)")
        if signs and isinstance(n, int) and n < 0 and not allow_negative:
            raise UsageError(f"{shown}: {key} must be >= 0")
    if not finite:
        return
    if name == "seeds" and "." not in key:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"seeds must be a positive integer, got {value!r}")
        if value > MAX_POINTS:
            raise UsageError(f"seeds={value}: a sweep may have at most {MAX_POINTS:,} points, so "
                             f"seeds must be <= {MAX_POINTS:,}; lower seeds")
    if name == "seed" and isinstance(value, int) and value >= 2 ** 63:
        raise UsageError(f"{shown}: {key} must be < 2**63")


def _fmt_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = ",".join(_fmt_value(v) for v in value)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def check_range(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, nonempty: bool = False,
                allow_none: bool = False) -> None:
    """Check that the number ``value`` (or every number of a list) lies in ``[low, high]``
    (``low_open`` / ``high_open``: excluded), for a config's ``__post_init__``; ``nonempty``:
    a list must have items; ``allow_none``: ``None`` passes. Raises
    :class:`~telescope.errors.UsageError` ``"key must be ..., got value"``.

    >>> check_range("data.n_train", 0, 1)
    Traceback (most recent call last):
    ...
    telescope.errors.UsageError: data.n_train must be >= 1, got 0
    """
    if value is None and allow_none:
        return
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    want = " and ".join(parts) or "a number"
    is_list = isinstance(value, (list, tuple))
    items = list(value) if is_list else [value]
    if is_list and nonempty and not items:
        raise UsageError(f"{key} must list at least one value ({want}), got none")
    for v in items:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            what = f"every value of {key}" if is_list else key
            got = _fmt_value(value)
            raise UsageError(f"{what} must be {want}, got {got}")


def _build(cls: type, values: dict[str, Any], study_name: str, prefix: str = "",
           checks: list | None = None) -> Any:
    """``cls(**values)``, nested dataclasses built from their dicts, every given value checked
    by :func:`check_generic`: its ``finite`` part before the classes' ``__post_init__``, its
    ``signs`` part after the outermost one (``checks`` collects them for nested calls)."""
    outermost = checks is None
    checks = [] if checks is None else checks
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in values:
            continue
        tp = hints.get(f.name, Any)
        value = values[f.name]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = _build(tp, value, study_name, f"{prefix}{f.name}.", checks)
        elif not dataclasses.is_dataclass(value):
            checks.append((prefix + f.name, value, _default(f), f.metadata))
            check_generic(*checks[-1], signs=False)
        kwargs[f.name] = value
    try:
        config = cls(**kwargs)
    except UsageError:
        raise                   # the class's own validation: its message is the message
    except TypeError as err:
        raise UsageError(f"cannot build {cls.__name__}: {err} (every config field needs a "
                         f"default, or a value in the preset)") from None
    if outermost:
        for args in checks:
            check_generic(*args, finite=False)
    return config


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``["a=1", "data.path=x.csv"]`` -> ``{"a": "1", "data.path": "x.csv"}`` (later wins)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def make_config(study: Study, preset: str | None, overrides: Mapping[str, Any] | None = None):
    """The config of ``study``: its defaults, then the preset, then the ``--set`` overrides.

    Parameters
    ----------
    study : Study
    preset : str or None
        A key of ``study.presets`` (``None``: the dataclass defaults only).
    overrides : dict
        Dotted key -> value; strings are parsed by the field's annotation (:func:`parse_value`),
        other values are checked as a preset's are.

    Raises
    ------
    ValueError
        For an unknown preset or key (listing the valid ones), a value that does not fit its
        field's type, or the config class's own validation.
    """
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in study.presets:
            raise UsageError(f"unknown preset {preset!r} for study {study.name!r}; presets: "
                             f"{', '.join(study.presets) or '(none)'}")
        _merge(values, _nest(study.config_cls, dict(study.presets[preset]), study.name))
    flat: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        tp = _field_type(study.config_cls, key, study.name)
        if isinstance(raw, str):
            try:
                flat[key] = parse_value(raw, tp)
            except (ValueError, TypeError) as err:
                raise UsageError(f"--set {key}={raw}: {err}") from None
        else:
            flat[key] = raw
    _merge(values, _nest(study.config_cls, flat, study.name))
    config = _build(study.config_cls, values, study.name)
    check_generic("seeds", getattr(config, "seeds", None))
    return config


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready nested dict (tuples -> lists, paths -> strings)."""
    return _jsonable(config)


def config_from_dict(config_cls: type, data: Mapping[str, Any], *, strict: bool = True):
    """Rebuild a config from :func:`config_to_dict`'s output (e.g. ``config.json``).

    With ``strict=False`` keys the class no longer has are dropped (a saved run read by newer
    code); missing keys take their defaults either way.
    """
    flat = _flatten_by_class(config_cls, data, "")
    if not strict:
        valid = config_keys(config_cls)
        flat = {k: v for k, v in flat.items() if k in valid}
    return _build(config_cls, _nest(config_cls, flat, ""), "")


def _flatten_by_class(cls: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Dotted keys for the nested dataclasses of ``cls`` only (dict-typed fields stay whole)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints.get(key) if key in names else None
        if tp is not None and _is_dataclass_type(tp) and isinstance(value, Mapping):
            out.update(_flatten_by_class(tp, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or its dict) as ``{"dotted.key": value}``, nested dataclasses flattened."""
    data = config_to_dict(config) if not isinstance(config, Mapping) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_device(name: str) -> torch.device:
    """The ``device`` field of a study config as a ``torch.device``: ``"auto"`` is CUDA when
    available, else the CPU; anything else is passed to ``torch.device`` (``"cpu"``,
    ``"cuda:1"``, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"device must be 'cpu', 'cuda', 'cuda:N', 'auto', ...; got {name!r}"
                         ) from exc


def check_device(key: str, name: str) -> None:
    """Check a ``device`` config value when the config is built: ``"auto"`` or a name
    ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``). Whether that
    device exists is checked where the point runs (a run may be configured on one machine and
    run on another)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{key}={name}: not a device; use cpu, cuda, cuda:N, mps or auto"
                         ) from None


def evenly_spaced_steps(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced measurement steps in ``[1, steps]``, the last being ``steps``
    (rounded, at least 1, deduplicated)."""
    return sorted({max(1, round(steps * k / count)) for k in range(1, count + 1)})
