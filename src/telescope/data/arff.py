"""ARFF files (Weka's format, and OpenML's), read by :func:`scipy.io.arff.loadarff`.

:func:`read_arff` returns a pandas DataFrame (nominal attributes as ``Categorical`` columns with
the declared categories) that :func:`telescope.data.tables.table_dataset` turns into a
:class:`~telescope.data.Dataset`; :func:`telescope.data.openml.load_openml_cache` reads
``<name>.arff`` files this way.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import pandas as pd

from telescope.data import _util as U
from telescope.data._util import MissingDataError
from telescope.errors import UsageError

__all__ = ["read_arff"]


_RELATION = re.compile(r"^\s*@relation\s+(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def read_arff(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A dense ARFF file (plain or gzipped) as a DataFrame, read by :func:`scipy.io.arff.loadarff`.

    scipy reads ``numeric`` / ``real`` / ``integer`` attributes (float64 columns), nominal
    ``{a, b, ...}`` ones (here pandas ``Categorical`` columns with the declared categories, values
    decoded to ``str``) and ``date`` ones (``datetime64``); ``?`` is a missing value (NaN).
    ``string`` attributes and sparse rows (``{...}``) are not supported by scipy: convert such a
    file to CSV and use :func:`~telescope.data.tables.load_table`. A file scipy cannot read
    raises ``ValueError`` with scipy's reason.

    Returns
    -------
    frame : pandas.DataFrame
        One column per attribute, in file order.
    info : dict
        ``{"relation": str, "attributes": [(name, "numeric" | "date" | [categories])]}``.
    """
    from scipy.io import arff

    p = U.as_path(path, "read_arff")
    if not p.is_file():
        raise MissingDataError(f"ARFF file {p} does not exist")
    try:
        text = U.read_bytes(p).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{p} is not a UTF-8 text (ARFF) file: {err}") from err
    hints = {StopIteration: "no @attribute lines or no @data section: the file is truncated or "
                            "not ARFF",
             IndexError: "a @data row has fewer values than there are attributes"}
    try:
        data, meta = arff.loadarff(io.StringIO(text))
    except (ValueError, IndexError, StopIteration, NotImplementedError, arff.ArffError) as err:
        why = hints.get(type(err)) or f"{type(err).__name__}: {err}"
        raise UsageError(f"could not read {p} as ARFF ({why}). scipy.io.arff reads dense ARFF "
                         "with numeric, nominal and date attributes; convert other files to CSV "
                         "and use load_table") from err
    frame, attributes = {}, []
    for name in meta.names():
        kind, values = meta[name]
        column = data[name]
        if kind == "nominal":
            strings = [None if v == b"?" else v.decode("utf-8") for v in column.tolist()]
            frame[name] = pd.Categorical(strings, categories=list(values))
            attributes.append((name, list(values)))
        else:
            frame[name] = column
            attributes.append((name, kind))
    match = _RELATION.search(text)
    relation = match.group(1).strip("'\"") if match else meta.name
    return pd.DataFrame(frame), {"relation": relation, "attributes": attributes}
