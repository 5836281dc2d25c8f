"""Typed study configs built from presets and ``--set``, and their JSON form (``config.json``).

Configs are built in three layers, each overriding the previous one:

1. the config dataclass's own defaults,
2. the preset (``study.presets[name]``: Python values, dotted keys allowed, e.g.
   ``{"data.name": "digits", "widths": (4, 8, 16)}``),
3. the ``--set key=value`` overrides: strings parsed by the type annotation of the field they
   set (:func:`parse_value`).

Values are converted and checked against the annotations (``int``, ``float``, ``bool``,
``str``, ``Path``, ``X | None``, ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``list[X]``, ``dict``, nested dataclasses) by pydantic, which also builds the nested
dataclasses (running their ``__post_init__``); unknown keys raise a :class:`ValueError` that
lists the valid ones.

A field's range is declared on its annotation, scikit-learn style, with ``typing.Annotated`` and
the ``annotated_types`` constraints pydantic checks (``Ge``, ``Gt``, ``Le``, ``Lt``, ``MinLen``)
or the aliases below: ``n_train: PositiveInt = 512``, ``momentum: Annotated[float, Ge(0),
Lt(1)] = 0.9``, ``widths: NonEmpty[PositiveInt] = (8, 16)`` (a non-empty tuple of integers
>= 1). A value out of range is refused with :func:`~telescope.studies.base.check_range`'s
one-line message (``data.n_train must be >= 1, got 0``, ``every value of widths must be >= 1,
got 4,0``). The config class's ``__post_init__`` checks what is not one field's range
(combinations such as ``d_model % n_heads``, names, devices), with :func:`check_range` where a
bound depends on another field. Config classes are declared with :func:`config_dataclass`
(a ``@dataclass`` that also checks the declared ranges when the class is called directly, with
the same messages); pydantic checks them when it builds a config (:func:`make_config`,
:func:`config_from_dict`).

Every value given by a preset or ``--set`` is also checked generically (:func:`check_generic`):
no NaN, no infinity unless the field's default holds one, no negative integer unless the default
holds one (a field's ``metadata={"allow_negative": True}`` or ``{"allow_nonfinite": True}``
opts out), and ``1 <= seeds <= MAX_POINTS``: NaN and infinity before the constraints and
``__post_init__`` (which then never compare NaN), signs after them (so that a field's own range,
``data.n_train must be >= 1``, is the message rather than ``must be >= 0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic

from telescope.errors import UsageError
from telescope.studies.base import Study, short_value
from telescope.studies.constraints import RANGE_ERRORS, check_declared_range

__all__ = ["make_config", "config_from_dict", "config_to_dict", "config_keys", "flatten_config",
           "parse_value", "parse_overrides", "check_generic", "MAX_POINTS"]

MAX_POINTS = 100_000
"""The most points a sweep may have (a typo such as ``seeds=100000000`` is refused): checked
on ``seeds`` here and on the whole sweep by :func:`telescope.runs.plan_sweep`."""


# --------------------------------------------------------------------------- config fields


def _hints(cls: type, extras: bool = False) -> dict[str, Any]:
    """The field annotations of ``cls``; ``extras``: with their ``Annotated`` constraints
    (pydantic checks those; parsing a value reads the plain type)."""
    try:
        return typing.get_type_hints(cls, include_extras=extras)
    except Exception as err:  # pragma: no cover - broken annotations are a study bug
        raise TypeError(f"cannot resolve the type annotations of {cls.__name__}: {err}") from err


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(config_cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every key of ``config_cls``, dotted into nested dataclasses (the groups themselves
    included) -> its (type, field)."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.init:
            key, tp = prefix + f.name, hints.get(f.name, Any)
            out[key] = (tp, f)
            if _is_dataclass_type(tp):
                out.update(_fields(tp, key + "."))
    return out


def config_keys(config_cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key of ``config_cls`` (dotted for nested dataclasses) -> its type."""
    return {key: tp for key, (tp, _) in _fields(config_cls, prefix).items()
            if not _is_dataclass_type(tp)}


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


# --------------------------------------------------------------------------- converting values

_NONE = {"none", "null", "~"}
_EXPECTED = {"int": "an integer", "finite": "an integer", "float": "a number",   # by error type
             "string": "a string", "bool": "a boolean (true/false, yes/no, 1/0)"}


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as a value of the annotation ``tp``, by pydantic's lax rules (JSON lists ->
    tuples, ints -> floats, ``"3"`` -> 3, ``"yes"`` -> True, dicts -> nested dataclasses);
    a :class:`~telescope.errors.UsageError` ``"expected ..., got ..."`` otherwise."""
    try:
        return _adapter(tp).validate_python(value)
    except pydantic.ValidationError as err:
        error = err.errors()[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        want = _type_name(tp)
    elif origin is tuple and Ellipsis not in args and error["type"] in ("missing", "too_long"):
        want = f"{len(args)} values ({_type_name(tp)})"
    elif error["type"] == "dataclass_type":
        want = f"the settings of {_type_name(tp)} (a dict)"
    elif error["type"] == "literal_error":  # ctx: "'sgd' or 'adamw'"
        want = "one of " + error["ctx"]["expected"].replace(" or ", ", ")
    else:
        want = _EXPECTED.get(error["type"].partition("_")[0], _type_name(tp))
    raise UsageError(f"expected {want}, got {error['input']!r}")


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
    - ``Literal["a", "b"]``: one of the choices (in any case);
    - ``tuple[X, ...]``, ``list[X]``, ``tuple[X, Y]``: ``8,16,32`` or ``[8, 16, 32]`` (JSON
      too); ``""`` or ``[]`` is empty;
    - ``dict``: JSON; ``str``/``Path``: the text as is (``~`` expanded); untyped (``Any``):
      JSON if it parses, else the text.

    :func:`_cli_spelling` reads what pydantic does not; pydantic converts and checks the rest.
    Raises :class:`~telescope.errors.UsageError` with the expected type when ``text`` does
    not fit.
    """
    return _convert(_cli_spelling(text, tp) if isinstance(text, str) else text, tp)


def _cli_spelling(text: str, tp: Any) -> Any:
    """``text`` with the command-line spellings of :func:`parse_value` that pydantic does not
    read itself turned into Python values; the rest is left to pydantic."""
    origin, args, s = typing.get_origin(tp), typing.get_args(tp), text.strip()
    if tp is str:
        return text
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and s.lower() in _NONE:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(UsageError):
                return parse_value(text, option)
        return text
    if origin is typing.Literal:
        return next((c for c in args if str(c).lower() == s.lower()), text)
    if tp is int:
        with contextlib.suppress(ValueError):
            return int(s.replace("_", ""), 0)       # 12, 1_000, 0x10
        with contextlib.suppress(ValueError):
            if float(s).is_integer():               # 1e3
                return int(float(s))
        return text
    if tp in (bool, float):
        return s
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path(s).expanduser()
    if _is_dataclass_type(tp):
        raise UsageError(f"{tp.__name__} is a group of settings: set its fields one by one "
                         f"(e.g. key.{dataclasses.fields(tp)[0].name}=...)")
    if origin in (tuple, list, set, frozenset) or tp in (tuple, list):
        if s.startswith("["):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(s)
        items = _split_items(s)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise UsageError(f"expected {len(args)} comma-separated values "
                                 f"({_type_name(tp)}), got {text!r}")
            return [_cli_spelling(item, a) for item, a in zip(items, args, strict=True)]
        return [_cli_spelling(item, args[0] if args else Any) for item in items]
    try:
        return json.loads(s)                        # dict, untyped: JSON if it parses
    except json.JSONDecodeError:
        return text


# --------------------------------------------------------------------------- building configs


def _flatten(config_cls: type, data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` with dotted keys, nested dataclasses given as dicts included
    (``{"data": {"name": "digits"}}`` -> ``{"data.name": "digits"}``)."""
    fields = _fields(config_cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = prefix + key
        if isinstance(value, Mapping) and key in fields and _is_dataclass_type(fields[key][0]):
            out.update(_flatten(config_cls, value, key + "."))
        else:
            out[key] = value
    return out


def _set_path(nested: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        if not isinstance(nested.get(part), dict):
            nested[part] = {}
        nested = nested[part]
    nested[parts[-1]] = value


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

    Config building runs the ``finite`` part before pydantic checks the fields' constraints and
    runs ``__post_init__`` (which then never compare NaN) and the ``signs`` part after them (so
    that a field's own, more precise range, e.g. ``data.n_train must be >= 1``, comes first).

    Raises :class:`~telescope.errors.UsageError` naming the key and the value.
    """
    metadata = metadata or {}
    name = key.rpartition(".")[2]
    defaults = _numbers(default)
    allow_inf = metadata.get("allow_nonfinite") or any(
        isinstance(d, float) and math.isinf(d) for d in defaults)
    allow_negative = metadata.get("allow_negative") or any(
        isinstance(d, int) and d < 0 for d in defaults)
    shown = f"{key}={short_value(value)}"
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


def _build(config_cls: type, flat: Mapping[str, Any], study_name: str,
           cli: Mapping[str, str] | None = None) -> Any:
    """The config from dotted keys -> values (``cli``: the ``--set`` strings, which win): every
    value converted to its field's type (strings as :func:`parse_value` reads them) and given
    the ``finite`` part of :func:`check_generic`, the nested dataclasses built by pydantic
    (which checks the fields' constraints and runs their ``__post_init__``), then every value
    given the ``signs`` part."""
    fields = _fields(config_cls)
    nested: dict[str, Any] = {}
    checks = []
    for key, value in {**flat, **(cli or {})}.items():
        if key not in fields:
            _unknown_key(config_cls, key, study_name)
        tp, f = fields[key]
        try:
            value = parse_value(value, tp)
        except UsageError as err:
            where = f"--set {key}={value}" if key in (cli or {}) else f"config key {key!r}"
            raise UsageError(f"{where}: {err}") from None
        if not dataclasses.is_dataclass(value):
            checks.append((key, value, _default(f), f.metadata))
            check_generic(*checks[-1], signs=False)
        _set_path(nested, key.split("."), value)
    config = _construct(config_cls, nested)
    for args in checks:
        check_generic(*args, finite=False)
    return config


def _construct(config_cls: type, nested: dict[str, Any]) -> Any:
    """``config_cls`` built by pydantic from the nested dict of converted values: it checks the
    constraints of the annotations (a value out of range: :func:`check_range`'s message) and
    runs every dataclass's ``__post_init__`` (what that raises comes out as it was raised)."""
    try:
        return _adapter(config_cls).validate_python(nested)
    except pydantic.ValidationError as err:
        error = err.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, BaseException):
        raise cause                      # the class's own validation: its message is the message
    key, tp, value = _field_at(config_cls, nested, error["loc"])
    if key and error["type"] in RANGE_ERRORS:
        check_declared_range(key, value, tp)         # raises check_range's message
    where = ".".join(map(str, error["loc"]))
    hint = (" (every config field needs a default, or a value in the preset)"
            if error["type"] == "missing" else "")
    raise UsageError(f"cannot build {config_cls.__name__}: {where}: {error['msg']}{hint}")


def _field_at(config_cls: type, nested: Mapping[str, Any], loc: tuple) -> tuple[str, Any, Any]:
    """The dotted key, the annotation (constraints included) and the given value of the field
    that a pydantic error's ``loc`` points to (for a tuple's item: the tuple)."""
    tp, value, names = config_cls, nested, []
    for part in loc:
        hints = _hints(tp, extras=True) if _is_dataclass_type(tp) else {}
        if part not in hints or not isinstance(value, Mapping):
            break
        tp, value = hints[part], value.get(part)
        names.append(part)
    return ".".join(names), tp, value


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
    flat: dict[str, Any] = {}
    if preset is not None:
        if preset not in study.presets:
            raise UsageError(f"unknown preset {preset!r} for study {study.name!r}; presets: "
                             f"{', '.join(study.presets) or '(none)'}")
        flat = _flatten(study.config_cls, study.presets[preset])
    overrides = dict(overrides or {})
    cli = {k: v for k, v in overrides.items() if isinstance(v, str)}
    flat.update(_flatten(study.config_cls, {k: v for k, v in overrides.items() if k not in cli}))
    config = _build(study.config_cls, flat, study.name, cli)
    check_generic("seeds", getattr(config, "seeds", None))
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready nested dict (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_from_dict(config_cls: type, data: Mapping[str, Any], *, strict: bool = True):
    """Rebuild a config from :func:`config_to_dict`'s output (e.g. ``config.json``).

    With ``strict=False`` keys the class no longer has are dropped (a saved run read by newer
    code); missing keys take their defaults either way.
    """
    flat = _flatten(config_cls, data)
    if not strict:
        valid = config_keys(config_cls)
        flat = {k: v for k, v in flat.items() if k in valid}
    return _build(config_cls, flat, "")


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
