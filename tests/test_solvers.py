"""telescope.kernels.solvers (conjugate gradients on ``(K + lambda I) X = B`` with the kernel read
in row blocks, from memory or streamed from a .npy file) against dense numpy solves and the
eigendecomposition path of kernel_regression / smoother_weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import telescope
from telescope.errors import NotConvergedError, TelescopeError, UsageError
from telescope.kernels import (
    KernelSolve,
    absolute_ridge,
    kernel_diagonal,
    kernel_matmul,
    kernel_regression,
    smoother_weights,
    solve_kernel_system,
)
from telescope.kernels.regression import KernelRegressor
from telescope.kernels.smoothing import RIDGE_CONVENTIONS
from telescope.kernels.solvers import _ArraySource, _FileSource, _open


def _psd(n: int, low: float, seed: int = 0, rank: int | None = None) -> np.ndarray:
    """A symmetric PSD matrix with eigenvalues ``logspace(0, low, n)`` (the last ``n - rank``
    set to zero) in a random basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(0, low, n)
    if rank is not None:
        ev[rank:] = 0.0
    k = (q * ev) @ q.T
    return 0.5 * (k + k.T)


def _rhs(n: int, r: int | None, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n if r is None else (n, r))


def _relres(k: np.ndarray, lam: float, x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``||(K + lam I) x - b|| / ||b||`` per column, in numpy."""
    x2, b2 = x.reshape(len(b), -1), b.reshape(len(b), -1)
    return np.linalg.norm(k @ x2 + lam * x2 - b2, axis=0) / np.linalg.norm(b2, axis=0)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ntk_kernels(tmp_path_factory):
    """The trace NTK of a small MLP on 90 training and 20 test points: in memory, and written
    by ``telescope.ntk(..., out=)`` in float64 and (from a float32 copy of the model) float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1)).double()
    x = torch.randn(90, 3, dtype=torch.float64)
    xt = torch.randn(20, 3, dtype=torch.float64)
    folder = tmp_path_factory.mktemp("ntk")
    k = telescope.ntk(model, x)
    k_file = telescope.ntk(model, x, out=folder / "k.npy")
    ks_file = telescope.ntk(model, xt, x, out=folder / "ks.npy")
    k32_file = telescope.ntk(copy.deepcopy(model).float(), x.float(), out=folder / "k32.npy")
    return {"k": k, "k_file": k_file, "ks_file": ks_file, "k32_file": k32_file,
            "folder": folder}


# ----------------------------------------------------------------------------- dense oracles


@pytest.mark.parametrize("preconditioner", ["nystrom", "jacobi", None])
@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("case", ["ridge", "ridge0"])
def test_matches_a_dense_solve(preconditioner, columns, case):
    """Every preconditioner, one and several right-hand sides, ``ridge > 0`` on a PSD kernel
    with a decaying spectrum (condition 1e4) and ``ridge = 0`` on a positive definite one."""
    n = 300
    k, lam = (_psd(n, -8), 1e-4) if case == "ridge" else (_psd(n, -3, seed=3), 0.0)
    b = _rhs(n, columns)
    tol = 1e-10
    res = solve_kernel_system(torch.from_numpy(k), torch.from_numpy(b), ridge=lam, tol=tol,
                              preconditioner=preconditioner)
    expected = np.linalg.solve(k + lam * np.eye(n), b)
    assert isinstance(res, KernelSolve)
    assert res.solution.dtype == torch.float64 and res.solution.shape == b.shape
    assert _rel_err(res.solution, expected) < 1e-6
    # the reported residuals are the true ones, and all within tol
    oracle = _relres(k, lam, res.solution.numpy(), b)
    assert res.residuals.shape == (1 if columns is None else columns,)
    assert float(res.residuals.max()) <= tol
    np.testing.assert_allclose(res.residuals.numpy(), oracle, rtol=0.5, atol=1e-12)
    assert len(res.history) == res.iterations >= 1
    assert res.history[-1] <= tol


def test_columns_are_solved_independently():
    """Columns of very different scale (and a zero column) give the per-column solutions; a
    zero right-hand side gives exactly zero."""
    n, lam = 200, 1e-3
    k = _psd(n, -6, seed=5)
    rng = np.random.default_rng(7)
    b = np.stack([rng.standard_normal(n), np.zeros(n), 1e6 * rng.standard_normal(n),
                  k @ rng.standard_normal(n)], axis=1)
    res = solve_kernel_system(k, b, ridge=lam, tol=1e-10, preconditioner="jacobi")
    for j in range(b.shape[1]):
        alone = solve_kernel_system(k, b[:, j], ridge=lam, tol=1e-10, preconditioner="jacobi")
        assert alone.solution.shape == (n,)
        if j == 1:
            assert bool((res.solution[:, j] == 0).all()) and float(res.residuals[j]) == 0.0
            assert alone.iterations == 0 and alone.history == []
            continue
        expected = np.linalg.solve(k + lam * np.eye(n), b[:, j])
        assert _rel_err(res.solution[:, j], expected) < 1e-6
        assert _rel_err(alone.solution, expected) < 1e-6
    assert res.iterations <= max(len(res.history), 1)


# ----------------------------------------------------------------------------- kernel sources


def test_every_source_gives_the_same_answer(ntk_kernels, tmp_path):
    """A tensor, a numpy array, the memmap ``telescope.ntk(out=)`` returns, its path as str and
    Path, with blocks smaller than n that do not divide it: all solve the same system."""
    k_file = ntk_kernels["k_file"]
    assert isinstance(k_file, np.memmap)
    dense = np.array(k_file)                         # the file's values
    np.testing.assert_allclose(dense, ntk_kernels["k"].numpy(), rtol=1e-12, atol=1e-12)
    n = dense.shape[0]
    lam = 1e-3 * float(np.diag(dense).mean())
    b = _rhs(n, 2)
    expected = np.linalg.solve(dense + lam * np.eye(n), b)
    path = ntk_kernels["folder"] / "k.npy"
    sources = {"tensor": torch.from_numpy(dense), "array": dense, "memmap": k_file,
               "str": str(path), "Path": Path(path)}
    solutions = {}
    for name, source in sources.items():
        for block_rows in (None, 7):                 # 90 = 12 * 7 + 6
            res = solve_kernel_system(source, torch.from_numpy(b), ridge=lam, tol=1e-10,
                                      block_rows=block_rows)
            assert _rel_err(res.solution, expected) < 1e-6, (name, block_rows)
            solutions[name, block_rows] = res.solution
    first = solutions["tensor", None]
    for key, sol in solutions.items():
        torch.testing.assert_close(sol, first, rtol=1e-9, atol=1e-12, msg=str(key))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_files(ntk_kernels, tmp_path, dtype):
    """float32 (written by telescope.ntk from a float32 model) and float16 files are read as
    the float64 values of their entries."""
    if dtype == np.float32:
        source = ntk_kernels["k32_file"]
        assert source.dtype == np.float32
    else:
        source = tmp_path / "k16.npy"
        np.save(source, np.array(ntk_kernels["k_file"]).astype(np.float16))
    path = str(getattr(source, "filename", source))
    values = np.load(path).astype(np.float64)
    n = values.shape[0]
    lam = 1e-2 * float(np.diag(values).mean())
    b = _rhs(n, None)
    expected = np.linalg.solve(values + lam * np.eye(n), b)
    res = solve_kernel_system(source, b, ridge=lam, tol=1e-10, block_rows=13)
    assert _rel_err(res.solution, expected) < 1e-6
    via_path = solve_kernel_system(path, b, ridge=lam, tol=1e-10, block_rows=13)
    torch.testing.assert_close(via_path.solution, res.solution, rtol=1e-9, atol=1e-12)


def test_memmap_is_read_from_its_file(ntk_kernels, tmp_path):
    """A memmap (whole, or a row slice, whose ``offset`` attribute is the parent's) is read with
    file reads at the right position; a copy-on-write memmap, whose values may differ from the
    file, is read through the mapping."""
    k_file = ntk_kernels["k_file"]
    dense = np.array(k_file)
    x = _rhs(dense.shape[1], 3)
    for view, values in ((k_file, dense), (k_file[10:57], dense[10:57]),
                         (k_file[57:][3:9], dense[60:66])):
        with _open(view, "k") as source:
            assert isinstance(source, _FileSource)
        out = kernel_matmul(view, x, block_rows=4)
        np.testing.assert_allclose(out.numpy(), values @ x, rtol=1e-13, atol=1e-12)
    cow = np.load(ntk_kernels["folder"] / "k.npy", mmap_mode="c")
    cow[0, :] = 0.0                                 # in memory only, not in the file
    with _open(cow, "k") as source:
        assert isinstance(source, _ArraySource)
    changed = dense.copy()
    changed[0, :] = 0.0
    np.testing.assert_allclose(kernel_matmul(cow, x).numpy(), changed @ x, rtol=1e-13,
                               atol=1e-12)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_streaming_keeps_the_mapping_untouched(tmp_path):
    """Multiplying by a 16 MiB memmap in small blocks does not grow the resident memory (the
    file is read, the mapping's pages are not touched), while touching the mapping does."""
    n, chunk = 2048, 256
    path = tmp_path / "big.npy"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False, "shape": (n, n)})
        for _ in range(0, n, chunk):
            f.write(rng.standard_normal((chunk, n)).astype(np.float32).tobytes())
    x = rng.standard_normal(n)
    small = tmp_path / "small.npy"
    np.save(small, np.eye(64, n, dtype=np.float32))
    kernel_matmul(np.load(small, mmap_mode="r"), x, block_rows=32)   # warm the code path up
    mm = np.load(path, mmap_mode="r")
    before = _rss_mb()
    out = kernel_matmul(mm, x, block_rows=32)
    grown = _rss_mb() - before
    assert grown < 4, f"resident memory grew by {grown:.1f} MiB reading a 16 MiB memmap"
    touched_before = _rss_mb()
    total = float(np.asarray(mm, dtype=np.float64).sum())      # touches every page
    assert _rss_mb() - touched_before > 12                     # the check can see a touch
    assert np.isfinite(total)
    del mm
    np.testing.assert_allclose(out.numpy(), np.load(path).astype(np.float64) @ x, rtol=1e-10,
                               atol=1e-9)


def test_kernel_matmul_and_diagonal(ntk_kernels):
    ks_file = ntk_kernels["ks_file"]                 # [20, 90], not square
    ks = np.array(ks_file)
    x = _rhs(ks.shape[1], None)
    for source in (ks_file, ntk_kernels["folder"] / "ks.npy", ks, torch.from_numpy(ks)):
        out = kernel_matmul(source, x, block_rows=3)
        assert out.shape == (20,) and out.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), ks @ x, rtol=1e-13, atol=1e-12)
    x2 = torch.from_numpy(_rhs(ks.shape[1], 4))
    np.testing.assert_allclose(kernel_matmul(ks_file, x2).numpy(), ks @ x2.numpy(),
                               rtol=1e-13, atol=1e-12)
    k = np.array(ntk_kernels["k_file"])
    for source in (ntk_kernels["k_file"], str(ntk_kernels["folder"] / "k.npy"), k,
                   torch.from_numpy(k)):
        diag = kernel_diagonal(source)
        assert diag.dtype == torch.float64
        np.testing.assert_array_equal(diag.numpy(), np.diag(k))
    k32 = ntk_kernels["k32_file"]
    np.testing.assert_array_equal(kernel_diagonal(k32).numpy(),
                                  np.diag(np.array(k32)).astype(np.float64))
    with pytest.raises(UsageError, match="square"):
        kernel_diagonal(ks_file)


# ----------------------------------------------------------------------------- preconditioning


def test_nystrom_needs_fewer_iterations_on_an_ill_conditioned_kernel():
    n = 300
    k = _psd(n, -10)                                 # condition 1e5 at ridge 1e-5
    b = _rhs(n, None)
    counts = {}
    for pc, rank in ((None, None), ("jacobi", None), ("nystrom", 100)):
        res = solve_kernel_system(k, b, ridge=1e-5, tol=1e-6, max_iter=5000,
                                  preconditioner=pc, rank=rank)
        assert _relres(k, 1e-5, res.solution.numpy(), b).max() <= 1e-6
        counts[pc] = res.iterations
    assert 3 * counts["nystrom"] < counts[None], counts
    # a larger rank captures more of the spectrum: fewer iterations still
    small = solve_kernel_system(k, b, ridge=1e-5, tol=1e-6, max_iter=5000, rank=10)
    assert counts["nystrom"] < small.iterations


def test_nystrom_rank_n_is_exact_preconditioning():
    """``rank = n`` captures the whole kernel: the preconditioned system is a multiple of the
    identity, solved in a couple of iterations (plain CG needs many)."""
    k = _psd(80, -12)
    res = solve_kernel_system(k, _rhs(80, None), ridge=1e-6, tol=1e-8, rank=80)
    assert res.iterations <= 3
    plain = solve_kernel_system(k, _rhs(80, None), ridge=1e-6, tol=1e-8, preconditioner=None)
    assert plain.iterations > 20


def test_ridge_zero_with_a_sketch_above_the_numerical_rank():
    """``ridge = 0`` and a rank-20 kernel sketched with rank 50: the sketch's zero eigenvalues
    are floored (no division by zero), and for targets in the range of ``K`` CG gives the
    minimum-norm interpolant's predictions, as the pseudo-inverse of the eigh path does."""
    n = 200
    k = _psd(n, -3, seed=11, rank=20)
    y = torch.from_numpy(k @ _rhs(n, None))
    kt = torch.from_numpy(k)
    res = solve_kernel_system(kt, y, ridge=0.0, rank=50, tol=1e-10)
    assert bool(torch.isfinite(res.solution).all()) and float(res.residuals.max()) <= 1e-10
    expected = kernel_regression(kt, kt[:30], y)                     # pseudo-inverse (eigh)
    got = kernel_regression(kt, kt[:30], y, solver="cg",
                            solver_options={"rank": 50, "tol": 1e-10})
    assert _rel_err(got, expected) < 1e-6


# ----------------------------------------------------------------------------- convergence


def test_not_converged_error_names_the_fixes():
    k = _psd(300, -10)
    with pytest.raises(NotConvergedError) as info:
        solve_kernel_system(k, _rhs(300, 2), ridge=1e-8, max_iter=2, preconditioner=None)
    message = str(info.value)
    assert isinstance(info.value, TelescopeError) and isinstance(info.value, RuntimeError)
    assert "after 2 iteration" in message and "relative residual" in message
    for fix in ("larger ridge", "rank", "max_iter", "looser tol"):
        assert fix in message, fix
    with pytest.raises(NotConvergedError, match="Nyström rank"):
        solve_kernel_system(k, _rhs(300, None), ridge=1e-8, max_iter=2, rank=5)
    # the same system with a usable ridge and budget converges
    res = solve_kernel_system(k, _rhs(300, 2), ridge=1e-3, max_iter=500)
    assert float(res.residuals.max()) <= 1e-8
    # kernel_regression passes the budget on, and raises rather than return a poor answer
    kt = torch.from_numpy(k)
    with pytest.raises(NotConvergedError):
        kernel_regression(kt, kt[:5], torch.from_numpy(_rhs(300, None)), ridge=1e-8,
                          solver="cg", solver_options={"max_iter": 2, "preconditioner": None})


def test_the_true_residual_is_checked():
    """On a system of condition 1e9 the recursive residual of CG reaches 1e-8 but the true
    residual cannot (float64 round-off): an error, not a solution that only claims tol; a
    reachable tol returns, with the true residuals."""
    k = _psd(80, -12)
    b = _rhs(80, None)
    with pytest.raises(NotConvergedError, match="after 50 iteration"):
        solve_kernel_system(k, b, ridge=1e-9, tol=1e-8, rank=80, max_iter=50)
    res = solve_kernel_system(k, b, ridge=1e-9, tol=1e-6, rank=80, max_iter=50)
    true = _relres(k, 1e-9, res.solution.numpy(), b)
    assert float(true[0]) <= 1e-6
    np.testing.assert_allclose(res.residuals.numpy(), true, rtol=0.2)


def test_progress_bar_gives_the_same_answer():
    k = _psd(100, -4)
    b = _rhs(100, None)
    quiet = solve_kernel_system(k, b, ridge=1e-3)
    shown = solve_kernel_system(k, b, ridge=1e-3, progress=True)
    torch.testing.assert_close(shown.solution, quiet.solution, rtol=0, atol=0)
    assert shown.iterations == quiet.iterations


# ----------------------------------------------------------------------------- integration


@pytest.mark.parametrize("outputs", [None, 2])
def test_kernel_regression_cg_matches_eigh(ntk_kernels, outputs):
    k = ntk_kernels["k"]
    ks = torch.from_numpy(np.array(ntk_kernels["ks_file"]))
    n, m = k.shape[0], ks.shape[0]
    g = torch.Generator().manual_seed(3)
    shape = (n,) if outputs is None else (n, outputs)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    f0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    f0_test = torch.randn(m, *shape[1:], generator=g, dtype=torch.float64)
    ridge = 1e-3 * float(k.diagonal().mean())
    kwargs = {"f0_train": f0, "f0_test": f0_test, "ridge": ridge, "return_train": True}
    test, train = kernel_regression(k, ks, y, **kwargs)
    options = {"tol": 1e-11, "block_rows": 16}
    folder = ntk_kernels["folder"]
    for kk, kks in ((k, ks), (ntk_kernels["k_file"], ntk_kernels["ks_file"]),
                    (str(folder / "k.npy"), folder / "ks.npy")):
        got_test, got_train = kernel_regression(kk, kks, y, solver="cg", t=None,
                                                solver_options=options, **kwargs)
        assert got_test.shape == test.shape and got_train.shape == train.shape
        assert got_test.dtype == torch.float64
        assert _rel_err(got_test, test) < 1e-6
        assert _rel_err(got_train, train) < 1e-6
    only_test = kernel_regression(k, ks, y, ridge=ridge, solver="cg", t=float("inf"))
    assert _rel_err(only_test, kernel_regression(k, ks, y, ridge=ridge)) < 1e-6


def test_eigh_path_is_unchanged(ntk_kernels):
    """solver='eigh' (the default) is the KernelRegressor computation, bit for bit."""
    k = ntk_kernels["k"]
    ks = torch.from_numpy(np.array(ntk_kernels["ks_file"]))
    y = torch.randn(k.shape[0], dtype=torch.float64)
    reg = KernelRegressor(k, y, ridge=0.1)
    assert torch.equal(kernel_regression(k, ks, y, ridge=0.1, t=[1.0, 5.0]),
                       reg.predict(ks, [1.0, 5.0]))
    assert torch.equal(kernel_regression(k, ks, y, ridge=0.1, solver="eigh"), reg.predict(ks))


@pytest.mark.parametrize("convention", RIDGE_CONVENTIONS)
def test_smoother_weights_cg_matches_eigh(ntk_kernels, convention):
    k_file, ks_file = ntk_kernels["k_file"], ntk_kernels["ks_file"]
    k, ks = torch.from_numpy(np.array(k_file)), torch.from_numpy(np.array(ks_file))
    n = k.shape[0]
    ridge = {"absolute": 1e-3 * float(k.diagonal().mean()),
             "per_example": 1e-3 * float(k.diagonal().mean()) / n,
             "relative_trace": 1e-3}[convention]
    # the streamed lambda is the in-memory one (relative_trace: the diagonal read from the file)
    lam = absolute_ridge(k, ridge, convention)
    assert absolute_ridge(k_file, ridge, convention) == pytest.approx(lam, rel=1e-14)
    assert absolute_ridge(ntk_kernels["folder"] / "k.npy", ridge, convention) == (
        pytest.approx(lam, rel=1e-14))
    expected = smoother_weights(k, ks, ridge=ridge, ridge_convention=convention)
    options = {"tol": 1e-11, "block_rows": 11}
    for kk, kks in ((k, ks), (k_file, ks_file), (ntk_kernels["folder"] / "k.npy", ks_file)):
        got = smoother_weights(kk, kks, ridge=ridge, ridge_convention=convention, solver="cg",
                               solver_options=options)
        assert got.shape == expected.shape == (ks.shape[0], n)
        assert got.dtype == expected.dtype
        assert _rel_err(got, expected) < 1e-6
    # a different convention gives a different answer (the convention is not ignored)
    other = smoother_weights(k, ks, ridge=ridge * 10, ridge_convention=convention,
                             solver="cg")
    assert _rel_err(other, expected) > 1e-3


def test_smoother_weights_cg_float32_file(ntk_kernels):
    """A float32 kernel file: the weights of the float64 solve with its values (the eigh path
    would cut eigenvalues below n * eps(float32)), returned in float32."""
    k32 = ntk_kernels["k32_file"]
    values = np.array(k32).astype(np.float64)
    n = values.shape[0]
    ks = values[:7]
    lam = 1e-2 * float(np.diag(values).mean())
    expected = np.linalg.solve(values + lam * np.eye(n), ks.T).T
    got = smoother_weights(k32, torch.from_numpy(ks), ridge=1e-2,
                           ridge_convention="relative_trace", solver="cg",
                           solver_options={"tol": 1e-11})
    assert got.dtype == torch.float32
    assert _rel_err(got, expected) < 1e-5


# ----------------------------------------------------------------------------- argument errors


def _fortran_file(folder: Path) -> Path:
    path = folder / "fortran.npy"
    if not path.exists():
        np.save(path, np.asfortranarray(_psd(6, -2) + np.triu(np.ones((6, 6)), 1)))
    return path


def test_argument_errors(tmp_path):
    k = _psd(6, -2)
    kt = torch.from_numpy(k)
    b = np.ones(6)
    np.save(tmp_path / "int.npy", np.eye(6, dtype=np.int64))
    np.save(tmp_path / "three.npy", np.ones((2, 3, 3)))
    np.save(tmp_path / "rect.npy", np.ones((4, 6)))
    nan_file = tmp_path / "nan.npy"
    np.save(nan_file, np.where(np.eye(6) > 0, np.nan, k))
    fortran = _fortran_file(tmp_path)
    cases = [
        ({"k": kt[:4]}, "k must be square"),
        ({"k": tmp_path / "rect.npy"}, "k must be square"),
        ({"k": kt[:0, :0]}, "k is empty"),
        ({"k": kt.unsqueeze(0)}, "2-D"),
        ({"k": tmp_path / "three.npy"}, "2-D"),
        ({"k": [[1.0]]}, "k must be a torch.Tensor, a numpy array"),
        ({"k": kt * float("nan")}, "k contains NaN"),
        ({"k": nan_file}, "NaN or infinite"),
        ({"k": tmp_path / "missing.npy"}, "no such file"),
        ({"k": tmp_path / "int.npy"}, "float16, float32 or float64"),
        ({"k": fortran}, "Fortran"),
        ({"k": np.load(fortran, mmap_mode="r")}, "Fortran"),
        ({"k": np.load(tmp_path / "rect.npy", mmap_mode="r")[:, :3]}, "non-contiguous"),
        ({"k": kt.to(torch.complex128)}, "real"),
        ({"b": np.ones(5)}, "b has 5 rows"),
        ({"b": np.ones((6, 0))}, "b has no columns"),
        ({"b": np.ones((6, 2, 1))}, r"b must have shape \[n\] or \[n, r\]"),
        ({"b": np.full(6, np.nan)}, "b contains NaN"),
        ({"b": "ones"}, "b must be a torch.Tensor or a numpy array"),
        ({"ridge": -1.0}, "ridge must be finite and >= 0"),
        ({"ridge": float("nan")}, "ridge must be finite"),
        ({"ridge": True}, "ridge must be a real number"),
        ({"preconditioner": "ilu"}, "preconditioner must be one of"),
        ({"preconditioner": "none"}, "preconditioner must be one of"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"rank": 7}, "rank must be <= n = 6"),
        ({"rank": 2.5}, "rank must be an int"),
        ({"rank": 3, "preconditioner": "jacobi"}, "rank is the rank of the Nyström sketch"),
        ({"tol": 0.0}, "tol must be finite and > 0 and < 1"),
        ({"tol": 1.0}, "tol must be finite and > 0 and < 1"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"max_iter": 10.0}, "max_iter must be an int"),
        ({"block_rows": 0}, "block_rows must be >= 1"),
        ({"max_memory_gb": 0.0}, "max_memory_gb must be finite and > 0"),
        ({"block_rows": 2, "max_memory_gb": 1.0}, "not both"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"progress": 1}, "progress must be True or False"),
    ]
    for change, match in cases:
        kwargs = {"k": kt, "b": b, "ridge": 0.1, **change}
        with pytest.raises(UsageError, match=match):
            solve_kernel_system(kwargs.pop("k"), kwargs.pop("b"), **kwargs)
    with pytest.raises(UsageError, match="diag"):      # a zero row and no ridge: no Jacobi
        zero = k.copy()
        zero[2, :] = zero[:, 2] = 0.0
        solve_kernel_system(zero, b, ridge=0.0, preconditioner="jacobi")
    with pytest.raises(UsageError, match="x has 5 rows"):
        kernel_matmul(kt, np.ones(5))


def test_solver_argument_errors(ntk_kernels):
    k, ks = ntk_kernels["k"], torch.from_numpy(np.array(ntk_kernels["ks_file"]))
    path = ntk_kernels["folder"] / "k.npy"
    y = torch.ones(k.shape[0])
    cases = [
        ({"solver": "lu"}, "solver must be one of"),
        ({"solver": "cg", "rcond": 1e-6}, "rcond .* does not|drop rcond"),
        ({"solver": "cg", "t": 10.0}, "converged predictions only"),
        ({"solver": "cg", "t": [1.0, float("inf")]}, "converged predictions only"),
        ({"solver": "cg", "solver_options": {"tolerance": 1e-3}}, "unknown solver_options"),
        ({"solver": "cg", "solver_options": {"ridge": 1.0}}, "unknown solver_options"),
        ({"solver": "cg", "solver_options": [("tol", 1e-3)]}, "must be a dict"),
        ({"solver": "cg", "solver_options": {"rank": 0}}, "rank must be >= 1"),
        ({"solver_options": {"tol": 1e-3}}, "options of solver='cg'"),
        ({"k": path}, "solver='cg'"),
        ({"k": ntk_kernels["k_file"]}, "solver='cg'"),
        ({"ks": ks[:, :5], "solver": "cg"}, "k_test_train has 5 columns"),
        ({"ks": ks[:, :5]}, "k_test_train has 5 columns"),
        ({"y": torch.ones(3), "solver": "cg"}, "y_train has 3 rows"),
    ]
    for change, match in cases:
        kwargs = {"k": k, "ks": ks, "y": y, "ridge": 0.1, **change}
        with pytest.raises(UsageError, match=match):
            kernel_regression(kwargs.pop("k"), kwargs.pop("ks"), kwargs.pop("y"), **kwargs)
    smoother_cases = [
        ({"k_test": None}, "needs k_test"),
        ({"return_train": True}, "return_train=True is not available with solver='cg'"),
        ({"rcond": 1e-6}, "drop rcond"),
        ({"solver_options": {"rcond": 1e-6}}, "unknown solver_options"),
        ({"k_test": ks[:, :5]}, "k_test has 5 columns"),
        ({"ridge_convention": "relative"}, "ridge_convention must be one of"),
    ]
    for change, match in smoother_cases:
        kwargs = {"k_test": ks, "ridge": 0.1, "ridge_convention": "absolute", "solver": "cg",
                  **change}
        with pytest.raises(UsageError, match=match):
            smoother_weights(path, **kwargs)
    with pytest.raises(UsageError, match="solver='cg'"):
        smoother_weights(path, ks, ridge=0.1, ridge_convention="absolute")
