"""What a study is, the registry of studies, and the value checks a study's config uses.

A study (see ``docs/studies-api.md``) is a config dataclass with presets plus four functions:
the sweep (:attr:`Study.points`), one point's measurement (:attr:`Study.run_point`), its
figures and its headline numbers. The machinery in :mod:`telescope.runs` and
:mod:`telescope.report` runs it; this module only describes it. Configs are built from presets
and ``--set`` by :mod:`telescope.studies.config`, which checks the ranges declared on the
fields' annotations; a config class's ``__post_init__`` checks the rest, with
:func:`check_range` (a bound that depends on another field) and :func:`check_device`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from telescope.errors import UsageError
from telescope.train.progress import Progress

__all__ = ["Study", "Progress", "REGISTRY", "register", "get_study", "list_studies",
           "resolve_device", "check_range", "check_device"]


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


# --------------------------------------------------------------------------- value checks


def short_value(value: Any) -> str:
    """A config value as a short string for a message (lists comma-joined, cut at 60)."""
    if isinstance(value, (list, tuple)):
        text = ",".join(short_value(v) for v in value)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def check_range(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, nonempty: bool = False,
                allow_none: bool = False) -> None:
    """Check that the number ``value`` (or every number of a list) lies in ``[low, high]``
    (``low_open`` / ``high_open``: excluded); ``nonempty``: a list must have items;
    ``allow_none``: ``None`` passes. Raises :class:`~telescope.errors.UsageError` ``"key must
    be ..., got value"``: the message of a field's declared range too
    (:mod:`telescope.studies.config`), and of a config's ``__post_init__`` for a bound that
    depends on another field.

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
            got = short_value(value)
            raise UsageError(f"{what} must be {want}, got {got}")


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
