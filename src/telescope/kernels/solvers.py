r"""Iterative solution of kernel systems ``(K + lambda I) X = B`` for kernels too large to
decompose: preconditioned conjugate gradients with ``K`` read, never copied whole, in row blocks.

The eigendecomposition behind :func:`telescope.kernel_regression` and
:func:`telescope.kernels.smoother_weights` costs ``O(n^3)`` time and several ``n x n`` float64
copies of the kernel; for ``n = 20,000`` the float32 trace kernel alone is 1.6 GB. Here ``K``
(symmetric positive semi-definite, ``[n, n]``) is only ever multiplied, one block of
``block_rows`` rows at a time:

.. math::

    (K + \lambda I) X = B, \qquad B \in \mathbb{R}^{n \times r},

is solved by conjugate gradients (Hestenes & Stiefel 1952), every column with its own step
sizes, all columns in one pass over ``K`` per iteration. A kernel given as a ``.npy`` path or a
``numpy.memmap`` (what ``telescope.ntk(..., out=PATH)`` returns) is read with plain file reads
into one reused block buffer, so the memory of the process stays at one block (plus the ``O(n
r)`` vectors of the iteration) however large ``n`` is; touching the pages of a memory map instead
would count the whole file in the process's resident memory. Each block is converted to float64
before it is multiplied, and every vector of the iteration is float64.

Preconditioners
---------------
CG needs about ``sqrt(cond)`` iterations, and a kernel's spectrum decays fast, so the condition
number of ``K + lambda I`` is about ``lambda_1 / lambda``. Three preconditioners ``P`` (applied as
``P^{-1}``):

- ``"nystrom"`` (default), the randomized Nyström preconditioner of Frangella, Tropp & Udell
  (2023). A sketch ``Y = K Omega`` with a random orthonormal ``Omega`` ``[n, rank]`` (one pass
  over ``K``) gives, by their Algorithm 2.1 (the shift ``nu = sqrt(n) eps ||Y||_2`` makes it
  stable in floating point; it is raised past the most negative eigenvalue of ``Omega^T K
  Omega`` when the rounding of a float16/float32 kernel has made ``K`` slightly indefinite),
  the rank-``rank`` Nyström approximation ``K ~ U diag(L) U^T``.
  With ``mu = lambda``:

  .. math::

      P^{-1} = (L_{rank} + \mu)\, U (\operatorname{diag}(L) + \mu I)^{-1} U^T + (I - U U^T),

  which flattens the top ``rank`` eigenvalues of ``K + mu I`` to about ``L_rank + mu``: the
  iterations then depend on ``(L_rank + mu) / mu`` instead of ``lambda_1 / mu``. With ``mu = 0``
  (``ridge=0``) ``L_rank + mu`` may be zero (a sketch of rank above the numerical rank of ``K``),
  so the denominators ``L_i + mu`` are floored at ``max(nu, 1e-10 L_1)``: ``P^{-1}`` stays
  positive definite with eigenvalues in ``[1e-10, 1]``, far enough above the float64 epsilon
  that applying it keeps its accuracy; directions of ``K`` below the floor are simply not
  flattened (a system that ill-conditioned is beyond float64 CG anyway). For ``mu`` above the
  floor (any practical ridge) the formula is the paper's exactly.
- ``"jacobi"``: ``P = diag(K) + lambda I``, the diagonal read from the kernel (``n`` reads of one
  entry for a file).
- ``None``: plain conjugate gradients.

Convergence
-----------
A column is done when its relative residual ``||(K + lambda I) x - b|| / ||b|| <= tol``. When
the recursive residual of every column has reached ``tol``, the true residual is computed with
one more pass over ``K``; a column whose true residual is above ``tol`` (round-off in the
recursion) is restarted from where it is. An unconverged solution is never returned: after
``max_iter`` iterations :class:`telescope.errors.NotConvergedError` says what was reached and what
to change.

Cost: one pass over ``K`` for the Nyström sketch, one per iteration, one for each true-residual
check (one, unless a restart was needed), each pass reading the whole kernel once.

References
----------
.. [1] Z. Frangella, J. A. Tropp, M. Udell. "Randomized Nyström Preconditioning". SIAM Journal
   on Matrix Analysis and Applications 44(2), 2023 (Algorithm 2.1, and the preconditioner of
   their Section 5).
"""

from __future__ import annotations

import math
import mmap
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from telescope.errors import NotConvergedError, UsageError

__all__ = ["KernelSolve", "solve_kernel_system", "kernel_matmul", "kernel_diagonal",
           "PRECONDITIONERS", "KernelLike", "CG_OPTIONS", "check_solver_options", "check_square",
           "check_real"]

PRECONDITIONERS = ("nystrom", "jacobi", None)
DEFAULT_RANK = 100
"""Nyström rank when ``rank=None``: ``min(n, DEFAULT_RANK)``."""
NYSTROM_FLOOR = 1e-10
"""The Nyström denominators ``L_i + mu`` are floored at this fraction of ``L_1`` (or the
sketch's shift ``nu``, if larger): what keeps ``ridge=0`` safe."""
DEFAULT_MEMORY_GB = 0.25
"""Memory for one block (the float64 block plus its copy in the file's dtype) when neither
``block_rows`` nor ``max_memory_gb`` is given."""

KernelLike = Tensor | np.ndarray | str | os.PathLike
"""A kernel as :func:`solve_kernel_system` takes it: a tensor, a numpy array, a ``numpy.memmap``
or the path of a ``.npy`` file."""

_FILE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TORCH_OF = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(np.float64): torch.float64}


# ------------------------------------------------------------------------------ kernel sources


class _Source:
    """A 2-D kernel read by row blocks as float64 tensors, ``block(a, b)`` = rows ``a:b``.

    The tensor ``block`` returns may alias a buffer that the next call overwrites: use it before
    asking for the next block."""

    name: str               # the argument, for the error messages
    rows: int
    cols: int
    dtype: torch.dtype      # the dtype of the stored values (what a result is cast back to)
    device: torch.device
    copy_bytes: int         # bytes per element a block costs (0: blocks are views)
    checked: bool           # finiteness checked up front (else checked on the products)

    def block(self, a: int, b: int) -> Tensor:
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (if any)."""

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TensorSource(_Source):
    def __init__(self, k: Tensor, name: str) -> None:
        if k.is_complex() or k.dtype == torch.bool:
            raise UsageError(f"{name} must be a real matrix, got dtype {k.dtype}")
        self.k, self.name = k.detach(), name
        self.rows, self.cols = k.shape
        self.dtype = k.dtype if k.dtype.is_floating_point else torch.float64
        self.device = k.device
        self.copy_bytes = 0 if k.dtype == torch.float64 else 8
        if not bool(torch.isfinite(self.k).all()):
            raise UsageError(f"{name} contains NaN or infinite values")
        self.checked = True

    def block(self, a: int, b: int) -> Tensor:
        return self.k[a:b].to(torch.float64)

    def diagonal(self) -> Tensor:
        return self.k.diagonal().to(torch.float64)


class _ArraySource(_Source):
    """An in-memory numpy array (also a memory map that cannot be read as a file)."""

    def __init__(self, k: np.ndarray, name: str, *, check: bool = True) -> None:
        if k.dtype.kind not in "fiu":
            raise UsageError(f"{name} must be a real numeric matrix, got dtype {k.dtype}")
        self.k, self.name = k, name
        self.rows, self.cols = k.shape
        self.dtype = (_TORCH_OF.get(np.dtype(k.dtype).newbyteorder("="), torch.float64)
                      if k.dtype.kind == "f" else torch.float64)
        self.device = torch.device("cpu")
        # a writable C-ordered float64 array is multiplied in place (its blocks are views)
        self.view = (k.dtype == np.dtype(np.float64) and k.flags.c_contiguous
                     and k.flags.writeable)
        self.copy_bytes = 0 if self.view else 8
        if check and not bool(np.isfinite(k).all()):
            raise UsageError(f"{name} contains NaN or infinite values")
        self.checked = check

    def block(self, a: int, b: int) -> Tensor:
        if self.view:
            return torch.from_numpy(self.k[a:b])
        return torch.from_numpy(np.array(self.k[a:b], dtype=np.float64, order="C"))

    def diagonal(self) -> Tensor:
        return torch.from_numpy(np.array(np.diagonal(self.k), dtype=np.float64))


class _FileSource(_Source):
    """A C-ordered ``[rows, cols]`` float array stored at byte ``offset`` of a file, read block by
    block with plain reads into one reused buffer (the memory map, if any, is never touched)."""

    def __init__(self, path: str | os.PathLike, offset: int, shape: tuple[int, int],
                 dtype: np.dtype, name: str) -> None:
        self.path, self.offset, self.name = str(path), offset, name
        self.file_dtype = dtype
        self.rows, self.cols = shape
        self.dtype = _TORCH_OF[dtype.newbyteorder("=")]
        self.device = torch.device("cpu")
        self.direct = dtype == np.dtype(np.float64)   # native float64: read straight into place
        self.copy_bytes = 8 if self.direct else 8 + dtype.itemsize
        self.checked = False
        self.file = open(self.path, "rb", buffering=0)  # closed by close()
        need = offset + self.rows * self.cols * dtype.itemsize
        size = os.fstat(self.file.fileno()).st_size
        if size < need:
            self.file.close()
            raise UsageError(f"{name}: {self.path} holds {size} bytes but a {shape} {dtype} array "
                             f"at byte {offset} needs {need}: the file is truncated (is the "
                             f"kernel still being written?)")
        self._raw: np.ndarray | None = None
        self._f64: np.ndarray | None = None

    def close(self) -> None:
        self.file.close()

    def _read(self, pos: int, out: np.ndarray) -> None:
        view = out.data.cast("B")
        self.file.seek(pos)
        done = 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise UsageError(f"{self.name}: {self.path} ended early (at byte "
                                 f"{pos + done}): the file is truncated")
            done += got

    def block(self, a: int, b: int) -> Tensor:
        rows = b - a
        if self._raw is None or self._raw.shape[0] < rows:
            self._raw = np.empty((rows, self.cols), dtype=self.file_dtype)
            self._f64 = None if self.direct else np.empty((rows, self.cols), np.float64)
        raw = self._raw[:rows]
        self._read(self.offset + a * self.cols * self.file_dtype.itemsize, raw)
        if self.direct:
            return torch.from_numpy(raw)
        assert self._f64 is not None  # allocated with _raw when a conversion is needed
        out = self._f64[:rows]
        np.copyto(out, raw, casting="safe")
        return torch.from_numpy(out)

    def diagonal(self) -> Tensor:
        item = self.file_dtype.itemsize
        one = np.empty(1, dtype=self.file_dtype)
        out = np.empty(self.rows, dtype=np.float64)
        for i in range(self.rows):
            self._read(self.offset + (i * self.cols + i) * item, one)
            out[i] = one[0]
        return torch.from_numpy(out)


def _memmap_offset(k: np.memmap) -> int | None:
    """The byte position in ``k.filename`` of ``k``'s first element, or ``None`` when it cannot
    be told (then the mapping is read instead). ``k.offset`` is the offset of the array that
    opened the file (a slice inherits it), so the position is found from the addresses of ``k``
    and of the ``mmap`` buffer, which ``numpy.memmap`` maps from ``offset`` rounded down to
    ``mmap.ALLOCATIONGRANULARITY``."""
    base: object = k
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or k.offset is None:
        return None
    try:
        start = np.frombuffer(base, dtype=np.uint8).ctypes.data  # the mapping's address
    except (TypeError, ValueError):
        return None
    mapped_from = k.offset - k.offset % mmap.ALLOCATIONGRANULARITY
    return mapped_from + (k.ctypes.data - start)


def _file_matches(source: _FileSource, k: np.ndarray) -> bool:
    """Whether the file reads give the first and last elements of ``k`` (two pages of ``k``)."""
    if k.size == 0:
        return True
    one = np.empty(1, dtype=source.file_dtype)
    item = source.file_dtype.itemsize
    for index, pos in ((0, 0), (k.size - 1, (k.size - 1) * item)):
        source._read(source.offset + pos, one)
        if one.tobytes() != k.reshape(-1)[index:index + 1].tobytes():
            return False
    return True


def _check_file_dtype(dtype: np.dtype, fortran: bool, name: str, where: str) -> None:
    if fortran:
        raise UsageError(f"{name}: {where} is stored in Fortran (column-major) order; it is read "
                         f"by rows, so store it C-ordered (np.save(path, np.ascontiguousarray(k)))"
                         f" or, for a symmetric kernel, save its transpose")
    if dtype.newbyteorder("=") not in _FILE_DTYPES:
        raise UsageError(f"{name}: {where} has dtype {dtype}; a kernel streamed from disk must be "
                         f"float16, float32 or float64")


def _read_npy_header(path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise UsageError(f"{name}: {path} is a .npy file of format version {version}; "
                                 f"only versions 1.0 and 2.0 (what np.save writes for a float "
                                 f"array) can be streamed")
            return shape, fortran, dtype, f.tell()
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file {str(path)!r} (give the path of a .npy kernel, "
                         f"e.g. the out= of telescope.ntk)") from None
    except (OSError, ValueError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{name}: {str(path)!r} is not a readable .npy file ({err})") from None


def _open(k: object, name: str) -> _Source:
    """The kernel ``k`` (any :data:`KernelLike`) as a block source, shape checked to be 2-D."""
    if isinstance(k, Tensor):
        if k.dim() != 2:
            raise UsageError(f"{name} must be a 2-D matrix, got shape {tuple(k.shape)}")
        return _TensorSource(k, name)
    if isinstance(k, (str, os.PathLike)):
        path = Path(k)
        shape, fortran, dtype, offset = _read_npy_header(path, name)
        if len(shape) != 2:
            raise UsageError(f"{name}: {path} holds an array of shape {shape}; a kernel must be "
                             f"2-D (a trace kernel, output='trace')")
        _check_file_dtype(dtype, fortran, name, str(path))
        return _FileSource(path, offset, (shape[0], shape[1]), dtype, name)
    if isinstance(k, np.ndarray):
        if k.ndim != 2:
            raise UsageError(f"{name} must be a 2-D matrix, got shape {k.shape}")
        if isinstance(k, np.memmap) and k.filename is not None and k.mode != "c":
            if not k.flags.c_contiguous:
                if k.flags.f_contiguous:
                    _check_file_dtype(k.dtype, True, name, f"the memmap of {k.filename}")
                raise UsageError(f"{name} is a non-contiguous view of a memmap (e.g. a column "
                                 f"slice), which cannot be read by rows from its file; pass the "
                                 f"whole memmap or its path, or np.ascontiguousarray({name})")
            _check_file_dtype(k.dtype, False, name, f"the memmap of {k.filename}")
            position = _memmap_offset(k)
            if position is not None:
                source = _FileSource(k.filename, position, (k.shape[0], k.shape[1]), k.dtype, name)
                if _file_matches(source, k):
                    return source
                source.close()
            return _ArraySource(k, name, check=False)  # read through the mapping
        return _ArraySource(k, name)
    raise UsageError(f"{name} must be a torch.Tensor, a numpy array, a numpy.memmap or the path "
                     f"of a .npy file, got {type(k).__name__}")


def check_square(shape: tuple[int, ...], name: str) -> int:
    """``n`` of a train kernel's shape ``[n, n]``; a :class:`UsageError` naming ``name`` for a
    shape that is not square or is empty."""
    if len(shape) != 2 or shape[0] != shape[1]:
        raise UsageError(f"{name} must be square [n, n] (the kernel between the n training "
                         f"points), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise UsageError(f"{name} is empty: need at least one training point")
    return shape[0]


def _open_square(k: object, name: str) -> _Source:
    source = _open(k, name)
    try:
        check_square((source.rows, source.cols), name)
    except UsageError:
        source.close()
        raise
    return source


# ------------------------------------------------------------------------------ argument checks


def check_real(value: object, name: str, *, low: float, low_ok: bool,
               high: float = math.inf) -> float:
    """``value`` as a float if it is a finite real (not a bool) ``>= low`` (``> low`` unless
    ``low_ok``) and ``< high``, else a :class:`UsageError` naming ``name`` and the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad_low = value < low or (value == low and not low_ok)
    if not math.isfinite(value) or bad_low or value >= high:
        bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf
                                                        else "")
        raise UsageError(f"{name} must be finite and {bound}, got {value}")
    return value


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise UsageError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _block_rows(source: _Source, block_rows: object, max_memory_gb: object) -> int:
    if block_rows is not None and max_memory_gb is not None:
        raise UsageError("give block_rows or max_memory_gb, not both (block_rows is chosen from "
                         "max_memory_gb when it is None)")
    if block_rows is not None:
        return min(_check_int(block_rows, "block_rows", 1), max(source.rows, 1))
    gb = DEFAULT_MEMORY_GB if max_memory_gb is None else check_real(
        max_memory_gb, "max_memory_gb", low=0.0, low_ok=False)
    per_row = source.cols * source.copy_bytes
    if per_row == 0:
        return max(source.rows, 1)
    return max(1, min(source.rows, int(gb * 2**30 // per_row)))


def _as_columns(x: object, name: str, rows: int, rows_name: str,
                device: torch.device) -> tuple[Tensor, bool]:
    """``x`` (``[rows]`` or ``[rows, r]``, a tensor or array) as float64 ``[rows, r]`` on
    ``device``, and whether it was a vector."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise UsageError(f"{name} must be real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(np.array(x, dtype=np.float64))
    if not isinstance(x, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor or a numpy array, got "
                         f"{type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise UsageError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.dim() not in (1, 2):
        raise UsageError(f"{name} must have shape [{rows_name}] or [{rows_name}, r], got shape "
                         f"{tuple(x.shape)}")
    if x.shape[0] != rows:
        raise UsageError(f"{name} has {x.shape[0]} rows (shape {tuple(x.shape)}) but the kernel "
                         f"has {rows_name} = {rows}")
    vector = x.dim() == 1
    x2 = (x.unsqueeze(1) if vector else x).detach().to(device=device, dtype=torch.float64)
    if x2.shape[1] == 0:
        raise UsageError(f"{name} has no columns (shape {tuple(x.shape)}): give at least one")
    if not bool(torch.isfinite(x2).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return x2, vector


# ------------------------------------------------------------------------------ streamed products


def _matmul(source: _Source, x: Tensor, block_rows: int) -> Tensor:
    """``K @ x`` (float64 ``[rows, r]``) in row blocks; non-finite products blame ``K``."""
    out = torch.empty(source.rows, x.shape[1], dtype=torch.float64, device=source.device)
    for a in range(0, source.rows, block_rows):
        b = min(source.rows, a + block_rows)
        out[a:b] = source.block(a, b) @ x
    if not source.checked and not bool(torch.isfinite(out).all()):
        raise UsageError(f"{source.name} contains NaN or infinite values (its product with a "
                         f"finite vector is not finite)")
    return out


def kernel_matmul(k: KernelLike, x: Tensor | np.ndarray, *, block_rows: int | None = None,
                  max_memory_gb: float | None = None) -> Tensor:
    """``K @ x`` for a kernel ``K`` ``[m, n]`` read in row blocks (never copied whole).

    Parameters
    ----------
    k : Tensor, numpy array, numpy.memmap, str or PathLike
        ``K`` ``[m, n]`` (need not be square). A memmap or a ``.npy`` path is read from its file
        with plain reads, one block at a time (C-ordered float16/32/64 only).
    x : Tensor or numpy array
        ``[n]`` or ``[n, r]``.
    block_rows : int, optional
        Rows of ``K`` per block; chosen from ``max_memory_gb`` (default 0.25 GiB for the float64
        block and its copy in the file's dtype) when ``None``.
    max_memory_gb : float, optional
        Memory for one block, when ``block_rows`` is not given.

    Returns
    -------
    Tensor
        Float64 ``[m]`` or ``[m, r]``, on the device of ``k`` (CPU for an array or a file),
        computed in float64.
    """
    with _open(k, "k") as source:
        rows = _block_rows(source, block_rows, max_memory_gb)
        x2, vector = _as_columns(x, "x", source.cols, "n (columns of k)", source.device)
        out = _matmul(source, x2, rows)
    return out.squeeze(1) if vector else out


def kernel_diagonal(k: KernelLike) -> Tensor:
    """The diagonal of a square kernel as float64 ``[n]``; a memmap or ``.npy`` path is read
    one entry at a time from its file (``n`` small reads, not a pass over the kernel)."""
    return diagonal_of(k, "k")


def diagonal_of(k: KernelLike, name: str) -> Tensor:
    """:func:`kernel_diagonal` with the errors naming ``name``."""
    with _open_square(k, name) as source:
        diag = source.diagonal()
        if not bool(torch.isfinite(diag).all()):
            raise UsageError(f"{name} contains NaN or infinite values on its diagonal")
    return diag


def dense_kernel(k: KernelLike, name: str, *, block_rows: int | None = None,
                 max_memory_gb: float | None = None) -> Tensor:
    """The whole kernel ``k`` as a float64 tensor, assembled from row blocks read as
    :func:`kernel_matmul` reads them (for a kernel as large as a result that is dense anyway)."""
    with _open(k, name) as source:
        rows = _block_rows(source, block_rows, max_memory_gb)
        out = torch.empty(source.rows, source.cols, dtype=torch.float64, device=source.device)
        for a in range(0, source.rows, rows):
            b = min(source.rows, a + rows)
            out[a:b] = source.block(a, b)
        if not source.checked and not bool(torch.isfinite(out).all()):
            raise UsageError(f"{name} contains NaN or infinite values")
    return out


def kernel_dtype(k: KernelLike, name: str) -> tuple[torch.dtype, tuple[int, int]]:
    """The torch dtype of ``k``'s values (``torch.int64`` standing for any integer array) and its
    shape, without reading the kernel (only a file's header)."""
    if isinstance(k, Tensor):
        if k.dim() != 2:
            raise UsageError(f"{name} must be a 2-D matrix, got shape {tuple(k.shape)}")
        return k.dtype, (k.shape[0], k.shape[1])
    if isinstance(k, np.ndarray) and not isinstance(k, np.memmap):
        if k.ndim != 2:
            raise UsageError(f"{name} must be a 2-D matrix, got shape {k.shape}")
        if k.dtype.kind not in "fiu":
            raise UsageError(f"{name} must be a real numeric matrix, got dtype {k.dtype}")
        dtype = (_TORCH_OF.get(np.dtype(k.dtype).newbyteorder("="), torch.float64)
                 if k.dtype.kind == "f" else torch.int64)
        return dtype, (k.shape[0], k.shape[1])
    with _open(k, name) as source:
        return source.dtype, (source.rows, source.cols)


# ------------------------------------------------------------------------------ the solver


@dataclass(frozen=True)
class KernelSolve:
    """The result of :func:`solve_kernel_system`.

    Attributes
    ----------
    solution : Tensor
        ``X`` with ``(K + lambda I) X = B``, float64 ``[n]`` or ``[n, r]`` like ``b``.
    iterations : int
        Conjugate-gradient iterations (each one pass over ``K``).
    residuals : Tensor
        Final true relative residuals ``||(K + lambda I) x - b|| / ||b||`` per column, float64
        ``[r]`` (``[1]`` for a vector ``b``); all ``<= tol``.
    history : list of float
        The largest relative residual over the columns after each iteration (the recursive
        residuals of the iteration; ``len(history) == iterations``).
    """

    solution: Tensor
    iterations: int
    residuals: Tensor
    history: list[float] = field(default_factory=list)


Operator = Callable[[Tensor], Tensor]


def _nystrom(source: _Source, rank: int, mu: float, seed: int, block_rows: int) -> Operator:
    """``v -> P^{-1} v`` of the randomized Nyström preconditioner (module docstring)."""
    n = source.rows
    gen = torch.Generator().manual_seed(seed)
    omega = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    omega = omega.to(source.device)
    y = _matmul(source, omega, block_rows)                       # the one pass over K
    y_norm = float(torch.linalg.matrix_norm(y, ord=2))
    if y_norm == 0.0:                       # K Omega = 0: nothing to precondition
        return _identity
    eps = torch.finfo(torch.float64).eps
    nu = math.sqrt(n) * eps * y_norm
    for _ in range(4):                      # the shift makes Omega^T Y_nu positive definite
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        core = 0.5 * (core + core.T)
        chol, info = torch.linalg.cholesky_ex(core)
        if int(info) == 0:
            break
        # K is slightly indefinite (the rounding of a float16/32 kernel): shift past the most
        # negative eigenvalue of the sketch (the preconditioner stays positive definite)
        low = float(torch.linalg.eigvalsh(core)[0])
        nu += 2.0 * max(-low, 0.0) + nu
    else:
        raise UsageError(
            "preconditioner='nystrom': no shift makes the sketch Omega^T K Omega positive "
            "definite; k must be a symmetric PSD kernel (or use preconditioner='jacobi' or None)")
    b = torch.linalg.solve_triangular(chol.T, y_nu, upper=True, left=False)  # Y_nu C^{-1}
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (sigma**2 - nu).clamp_min(0.0)
    floor = max(nu, NYSTROM_FLOOR * float(lam[0]))
    denom = (lam + mu).clamp_min(floor)     # safe at mu = 0 (module docstring)
    scale = (denom.min() / denom - 1.0).unsqueeze(1)             # (L_r + mu)/(L_i + mu) - 1

    def apply(v: Tensor) -> Tensor:
        return v + u @ (scale * (u.T @ v))

    return apply


def _identity(v: Tensor) -> Tensor:
    return v


def _jacobi(source: _Source, mu: float) -> Operator:
    diag = source.diagonal()
    if not bool(torch.isfinite(diag).all()):
        raise UsageError(f"{source.name} contains NaN or infinite values on its diagonal")
    shifted = (diag + mu).to(source.device)
    if bool((shifted <= 0).any()):
        worst = int(torch.argmin(shifted))
        raise UsageError(f"preconditioner='jacobi' needs diag(K) + ridge > 0, but entry {worst} "
                         f"is {float(shifted[worst]):.3g}: K is not PSD or has a zero row; use a "
                         f"ridge > 0, or preconditioner='nystrom' or None")
    inv = (1.0 / shifted).unsqueeze(1)
    return lambda v: v * inv


def _not_converged(rel: float, iterations: int, tol: float, ridge: float,
                   preconditioner: str | None, rank: int | None, columns: int,
                   why: str = "") -> NotConvergedError:
    if preconditioner == "nystrom":
        better = f"a larger Nyström rank (now rank={rank})"
    else:
        better = (f"preconditioner='nystrom' with a larger rank (now "
                  f"preconditioner={preconditioner!r})")
    of = f" (the worst of {columns} columns)" if columns > 1 else ""
    return NotConvergedError(
        f"solve_kernel_system: conjugate gradients did not converge{why}: after {iterations} "
        f"iteration(s) the relative residual ||(K + ridge I) x - b|| / ||b|| is {rel:.3g}"
        f"{of}, above tol={tol:g}. The system is too ill-conditioned for the budget; fixes: a "
        f"larger ridge (now {ridge:g}), {better}, more max_iter, or a looser tol")


def solve_kernel_system(
    k: KernelLike,
    b: Tensor | np.ndarray,
    *,
    ridge: float,
    tol: float = 1e-8,
    max_iter: int = 1000,
    preconditioner: str | None = "nystrom",
    rank: int | None = None,
    block_rows: int | None = None,
    max_memory_gb: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> KernelSolve:
    """Solve ``(K + ridge I) X = B`` by preconditioned conjugate gradients, reading ``K`` in row
    blocks (see the module docstring for the method and the preconditioners).

    Parameters
    ----------
    k : Tensor, numpy array, numpy.memmap, str or PathLike
        ``K`` ``[n, n]``, symmetric positive semi-definite (used as given: it is not symmetrized,
        and only its rows are read). A ``numpy.memmap`` (e.g. from ``telescope.ntk(...,
        out=PATH)``) or a ``.npy`` path is streamed from its file with plain reads, so the
        process holds one block of it at a time; such files must be C-ordered float16, float32
        or float64. A tensor is used on its device.
    b : Tensor or numpy array
        Right-hand sides ``[n]`` or ``[n, r]``; the ``r`` columns are solved together (one pass
        over ``K`` per iteration for all of them), each with its own step sizes, and a column
        stops moving once it has converged.
    ridge : float
        ``lambda >= 0`` (absolute; see :func:`telescope.kernels.absolute_ridge` for the
        conventions). ``ridge = 0`` needs a positive definite ``K``.
    tol : float
        Relative residual ``||(K + ridge I) x - b|| / ||b||`` every column must reach, in
        ``(0, 1)``; checked on the true residual (one extra pass) before returning.
    max_iter : int
        Iterations allowed (``>= 1``); beyond them :class:`telescope.errors.NotConvergedError`.
    preconditioner : {"nystrom", "jacobi", None}
        Randomized Nyström (one extra pass over ``K`` with ``rank`` columns), diagonal, or none.
    rank : int, optional
        Rank of the Nyström sketch, ``1 <= rank <= n`` (default ``min(n, 100)``): a larger rank
        captures more of the spectrum (fewer iterations) for ``O(n rank)`` memory and work.
        Only with ``preconditioner="nystrom"``.
    block_rows : int, optional
        Rows of ``K`` per block; chosen from ``max_memory_gb`` when ``None``.
    max_memory_gb : float, optional
        Memory for one block, the float64 block plus its copy in the file's dtype (default 0.25
        GiB). The iteration's vectors (about six ``[n, r]`` float64 arrays) and the sketch (two
        ``[n, rank]``) come on top.
    seed : int
        Seed of the Nyström sketch.
    progress : bool
        Show a tqdm bar over the iterations.

    Returns
    -------
    KernelSolve
        ``solution`` (float64, shaped like ``b``, on the device of ``k``: CPU for an array or a
        file), ``iterations``, the final true relative ``residuals`` per column and the
        ``history`` of the largest relative residual per iteration.

    Raises
    ------
    UsageError
        A kernel that is not a finite real square matrix (NaN in a file is found by the first
        product), ``b`` with the wrong number of rows, NaN values, a negative ridge, an unknown
        preconditioner, a bad ``rank``, ``tol``, ``max_iter``, ``block_rows``, ...
    NotConvergedError
        ``max_iter`` iterations did not reach ``tol`` (or ``K + ridge I`` is not positive
        definite along a search direction); the message gives the residual reached and the
        fixes.

    Notes
    -----
    Cost: one pass over ``K`` (all of its ``n^2`` entries, read from disk for a file) per
    iteration, one for the Nyström sketch and one for the final residual check, each ``O(n^2
    r)`` flops; CG needs about ``sqrt`` of the preconditioned condition number iterations.
    """
    ridge = check_real(ridge, "ridge", low=0.0, low_ok=True)
    tol = check_real(tol, "tol", low=0.0, low_ok=False, high=1.0)
    max_iter = _check_int(max_iter, "max_iter", 1)
    seed = _check_int(seed, "seed", 0)
    if not isinstance(progress, bool):
        raise UsageError(f"progress must be True or False, got {progress!r}")
    if not isinstance(preconditioner, (str, type(None))) or preconditioner not in PRECONDITIONERS:
        raise UsageError(f"preconditioner must be one of {PRECONDITIONERS} (randomized Nyström, "
                         f"diagonal, none), got {preconditioner!r}")
    if rank is not None and preconditioner != "nystrom":
        raise UsageError(f"rank is the rank of the Nyström sketch: it needs "
                         f"preconditioner='nystrom', got preconditioner={preconditioner!r}")
    with _open_square(k, "k") as source:
        n = source.rows
        if rank is not None:
            rank = _check_int(rank, "rank", 1)
            if rank > n:
                raise UsageError(f"rank must be <= n = {n} (the size of k), got {rank}")
        elif preconditioner == "nystrom":
            rank = min(n, DEFAULT_RANK)
        rows = _block_rows(source, block_rows, max_memory_gb)
        rhs, vector = _as_columns(b, "b", n, "n", source.device)
        bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_iter, desc="kernel cg", leave=False)
        try:
            x, iterations, rel, history = _pcg(source, rhs, ridge, tol, max_iter, preconditioner,
                                               rank, seed, rows, bar)
        finally:
            if bar is not None:
                bar.close()
    return KernelSolve(solution=x.squeeze(1) if vector else x, iterations=iterations,
                       residuals=rel, history=history)


def _pcg(source: _Source, rhs: Tensor, ridge: float, tol: float, max_iter: int,
         preconditioner: str | None, rank: int | None, seed: int, rows: int,
         bar: Any) -> tuple[Tensor, int, Tensor, list[float]]:
    """Conjugate gradients on every column of ``rhs``, restarted from the true residual of the
    columns whose recursion claimed convergence too early; ``(x, iterations, rel, history)``."""
    columns = rhs.shape[1]
    bnorm = rhs.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(rhs)
    rel = torch.where(bnorm > 0, torch.ones_like(bnorm), torch.zeros_like(bnorm))
    if not bool((rel > tol).any()):   # b = 0: x = 0 exactly
        return x, 0, rel, []

    def apply_a(v: Tensor) -> Tensor:
        return _matmul(source, v, rows) + ridge * v

    precondition: Operator
    if preconditioner == "nystrom":
        assert rank is not None  # set by the caller with the preconditioner
        precondition = _nystrom(source, rank, ridge, seed, rows)
    elif preconditioner == "jacobi":
        precondition = _jacobi(source, ridge)
    else:
        precondition = _identity

    history: list[float] = []
    iterations = 0
    resid = rhs.clone()                 # the true residual b - A x of every column
    while True:
        todo = (rel > tol).nonzero().squeeze(1)
        if todo.numel() == 0:
            return x, iterations, rel, history
        if iterations >= max_iter:
            raise _not_converged(float(rel.max()), iterations, tol, ridge, preconditioner,
                                 rank, columns)
        xs, rs = x[:, todo], resid[:, todo]
        norms = safe_bnorm[todo]
        live = torch.ones(todo.numel(), dtype=torch.bool, device=rhs.device)
        z = precondition(rs)
        p = z.clone()
        rz = (rs * z).sum(0)
        while iterations < max_iter:
            idx = live.nonzero().squeeze(1)
            every = idx.numel() == live.numel()
            pl = p if every else p[:, idx]
            q = apply_a(pl)
            pq = (pl * q).sum(0)
            if bool((pq <= 0).any()):
                raise _not_converged(
                    float(rel.max()), iterations, tol, ridge, preconditioner, rank, columns,
                    why=" (K + ridge I is not positive definite along a search direction: K "
                        "must be symmetric PSD, and positive definite when ridge=0)")
            alpha = rz[idx] / pq
            if every:
                xs += alpha * p
                rs -= alpha * q
                rel_now = rs.norm(dim=0) / norms
            else:
                xs[:, idx] += alpha * pl
                rs[:, idx] -= alpha * q
                rel_now = rs[:, idx].norm(dim=0) / norms[idx]
            iterations += 1
            rel[todo[idx]] = rel_now
            history.append(float(rel.max()))
            if bar is not None:
                bar.update()
                bar.set_postfix(residual=f"{history[-1]:.2e}")
            live[idx[rel_now <= tol]] = False
            if not bool(live.any()):
                break
            idx = live.nonzero().squeeze(1)
            r_live = rs[:, idx]
            z = precondition(r_live)
            rz_new = (r_live * z).sum(0)
            p[:, idx] = z + (rz_new / rz[idx]) * p[:, idx]
            rz[idx] = rz_new
        # the true residual of the columns just iterated (one pass), to confirm or restart
        x[:, todo] = xs
        true = rhs[:, todo] - apply_a(xs)
        resid[:, todo] = true
        rel[todo] = true.norm(dim=0) / norms


CG_OPTIONS = ("tol", "max_iter", "preconditioner", "rank", "block_rows", "max_memory_gb", "seed",
              "progress")
"""The keywords of :func:`solve_kernel_system` a caller's ``solver_options`` may set (``ridge``
is its own argument there)."""


def check_solver_options(options: object, where: str) -> dict[str, Any]:
    """``solver_options`` of ``where`` (e.g. ``"kernel_regression"``) as a dict, refusing
    anything but a mapping of :data:`CG_OPTIONS` (each value is checked by the solver)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}: solver_options must be a dict of solve_kernel_system options "
                         f"{CG_OPTIONS}, got {type(options).__name__}")
    unknown = sorted(str(key) for key in options if key not in CG_OPTIONS)
    if unknown:
        raise UsageError(f"{where}: unknown solver_options {unknown}; solver='cg' takes "
                         f"{list(CG_OPTIONS)} (the ridge is {where}'s own argument)")
    return dict(options)
