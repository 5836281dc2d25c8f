"""Generate the neural-tangents reference numbers under ``tests/fixtures/neural_tangents/``.

This script is documentation of how those fixtures were made. It imports ``jax`` and
``neural_tangents``, which telescope never depends on, so it is run only with a throwaway
virtual environment outside the repository, never with the project's ``.venv``:

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install jax==0.4.25 jaxlib==0.4.25 "numpy<2" neural-tangents==0.6.5
    OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \\
        /tmp/ntvenv/bin/python tools/neural_tangents_refs.py

It writes one ``<case>.npz`` per architecture below (float64 arrays ``x1``, ``x2`` unless the
case is symmetric, ``nngp``, ``ntk`` of shape [N1, N2], and the string ``description``), the
predictions fixture ``predict_ensemble.npz``, and ``README.md`` listing all of them.

Each ``description`` is a Python expression over the names of ``neural_tangents.stax`` (plus
``jax`` and ``jnp``); it is evaluated to build the network, so the stored string is exactly the
architecture the numbers come from. Inputs are standard normal draws from
``np.random.default_rng(seed)`` (x1 first, then x2). They are stored in PyTorch layout:
images [N, C, *spatial], transposed to neural-tangents' channel-last [N, *spatial, C] before the
kernel is computed; flat [N, F] and sequence [N, T, D] inputs are the same in both layouts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

jax.config.update("jax_enable_x64", True)

OUT_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "neural_tangents"


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    x1_shape: tuple[int, ...]
    x2_shape: tuple[int, ...] | None  # None: symmetric case, kernel_fn(x1, None)
    seed: int
    layout: str  # "flat", "image" or "sequence"


def _fc(nonlinearity: str) -> str:
    return (
        f"serial(Dense(128, 1.5, 0.1), {nonlinearity}, Dense(128, 1.5, 0.1), {nonlinearity}, "
        "Dense(1, 1.5, 0.1))"
    )


def _attention(mechanism: str, linear_scaling: bool, head: str) -> str:
    return (
        "serial(Dense(64, 1.0, 0.0), "
        f"GlobalSelfAttention(64, 64, 64, 4, linear_scaling={linear_scaling}, W_key_std=1.2, "
        "W_value_std=1.1, W_query_std=0.9, W_out_std=1.0, b_std=0.1, "
        f'attention_mechanism="{mechanism}"), {head}, Dense(1, 1.0, 0.0))'
    )


_FC = ((6, 5), (4, 5))
_IMG = ((5, 3, 6, 6), (4, 3, 6, 6))
_SEQ = ((4, 5, 6), (3, 5, 6))

_CNN_SAME_GAP = (
    'serial(Conv(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), Relu(), '
    'Conv(64, (3, 3), padding="SAME", W_std=1.0, b_std=0.0), Relu(), GlobalAvgPool(), '
    "Dense(1, 1.0, 0.0))"
)
_TRANSFORMER = (
    "serial(Dense(64, 1.0, 0.1), FanOut(2), "
    "parallel(serial(LayerNorm(), GlobalSelfAttention(64, 64, 64, 2, linear_scaling=True, "
    "W_key_std=1.0, W_value_std=1.0, W_query_std=1.0, W_out_std=1.0, b_std=0.0, "
    'attention_mechanism="SOFTMAX")), Identity()), FanInSum(), FanOut(2), '
    "parallel(serial(LayerNorm(), Dense(64, 1.0, 0.1), Relu(), Dense(64, 1.0, 0.1)), "
    "Identity()), FanInSum(), LayerNorm(), GlobalAvgPool(), Dense(1, 1.0, 0.0))"
)

CASES: tuple[Case, ...] = (
    # fully connected
    Case("fc_relu", _fc("Relu()"), *_FC, 101, "flat"),
    Case("fc_relu_self", _fc("Relu()"), _FC[0], None, 102, "flat"),
    Case("fc_depth0", "serial(Dense(1, 1.3, 0.2))", *_FC, 103, "flat"),
    Case("fc_erf", _fc("Erf()"), *_FC, 104, "flat"),
    Case("fc_gelu", _fc("Gelu()"), *_FC, 105, "flat"),
    Case("fc_sin", _fc("Sin()"), *_FC, 106, "flat"),
    Case("fc_abs", _fc("Abs()"), *_FC, 107, "flat"),
    Case("fc_leaky_relu", _fc("LeakyRelu(0.1)"), *_FC, 108, "flat"),
    Case("fc_abrelu", _fc("ABRelu(-0.4, 1.2)"), *_FC, 109, "flat"),
    Case("fc_elementwise_tanh", _fc("ElementwiseNumerical(jnp.tanh, deg=25)"), *_FC, 110, "flat"),
    Case(
        "fc_elementwise_softplus",
        _fc("ElementwiseNumerical(jax.nn.softplus, deg=25)"),
        *_FC,
        111,
        "flat",
    ),
    Case("fc_elementwise_sin", _fc("ElementwiseNumerical(jnp.sin, deg=25)"), *_FC, 112, "flat"),
    Case(
        "fc_layernorm",
        "serial(Dense(128, 1.2, 0.3), LayerNorm(), Relu(), Dense(128, 1.0, 0.0), LayerNorm(), "
        "Dense(1, 1.0, 0.0))",
        *_FC,
        113,
        "flat",
    ),
    Case(
        "fc_residual",
        "serial(Dense(128, 1.0, 0.0), FanOut(2), "
        "parallel(serial(Relu(), Dense(128, 1.0, 0.2)), Identity()), FanInSum(), Relu(), "
        "Dense(1, 1.0, 0.0))",
        *_FC,
        114,
        "flat",
    ),
    # convolutions
    Case("cnn_same_gap", _CNN_SAME_GAP, *_IMG, 201, "image"),
    Case("cnn_same_gap_self", _CNN_SAME_GAP, _IMG[0], None, 202, "image"),
    Case(
        "cnn_valid_stride_flatten",
        'serial(Conv(32, (3, 3), strides=(2, 2), padding="VALID", W_std=1.3, b_std=0.2), Erf(), '
        "Flatten(), Dense(1, 1.0, 0.0))",
        *_IMG,
        203,
        "image",
    ),
    Case(
        "cnn_circular_gap",
        'serial(Conv(32, (3, 3), padding="CIRCULAR", W_std=1.0, b_std=0.0), Relu(), '
        'Conv(32, (3, 3), padding="CIRCULAR", W_std=1.0, b_std=0.0), Gelu(), GlobalAvgPool(), '
        "Dense(1, 1.0, 0.0))",
        *_IMG,
        204,
        "image",
    ),
    Case(
        "cnn_same_even_stride",
        'serial(Conv(32, (2, 3), strides=(2, 1), padding="SAME", W_std=1.0, b_std=0.0), Relu(), '
        "Flatten(), Dense(1, 1.0, 0.0))",
        (5, 2, 7, 6),
        (4, 2, 7, 6),
        205,
        "image",
    ),
    Case(
        "cnn_1d",
        'serial(Conv(32, (3,), padding="SAME", W_std=1.0, b_std=0.0), Relu(), '
        'Conv(32, (2,), strides=(2,), padding="VALID", W_std=1.0, b_std=0.0), Relu(), '
        "Flatten(), Dense(1, 1.0, 0.0))",
        (5, 3, 9),
        (4, 3, 9),
        206,
        "image",
    ),
    Case(
        "cnn_3d",
        'serial(Conv(16, (2, 2, 2), padding="VALID", W_std=1.0, b_std=0.0), Relu(), '
        "GlobalAvgPool(), Dense(1, 1.0, 0.0))",
        (3, 2, 4, 4, 3),
        (2, 2, 4, 4, 3),
        207,
        "image",
    ),
    Case(
        "cnn_residual_layernorm",
        'serial(Conv(32, (3, 3), padding="SAME", W_std=1.0, b_std=0.0), FanOut(2), '
        'parallel(serial(Relu(), Conv(32, (3, 3), padding="SAME", W_std=1.0, b_std=0.0)), '
        "Identity()), FanInSum(), LayerNorm(axis=-1), Relu(), GlobalAvgPool(), "
        "Dense(1, 1.0, 0.0))",
        *_IMG,
        208,
        "image",
    ),
    # attention
    Case("attn_softmax", _attention("SOFTMAX", True, "GlobalAvgPool()"), *_SEQ, 301, "sequence"),
    Case(
        "attn_identity_linear",
        _attention("IDENTITY", True, "GlobalAvgPool()"),
        *_SEQ,
        302,
        "sequence",
    ),
    Case("attn_relu_linear", _attention("RELU", True, "GlobalAvgPool()"), *_SEQ, 303, "sequence"),
    Case("attn_abs_linear", _attention("ABS", True, "GlobalAvgPool()"), *_SEQ, 304, "sequence"),
    Case(
        "attn_identity_sqrt",
        _attention("IDENTITY", False, "GlobalAvgPool()"),
        *_SEQ,
        305,
        "sequence",
    ),
    Case(
        "attn_softmax_flatten",
        _attention("SOFTMAX", True, "Relu(), Flatten()"),
        *_SEQ,
        306,
        "sequence",
    ),
    Case("transformer", _TRANSFORMER, *_SEQ, 307, "sequence"),
    Case("transformer_self", _TRANSFORMER, _SEQ[0], None, 308, "sequence"),
)

# The predictions fixture: the fc_relu architecture, absolute diag_reg, these times.
PREDICT_SEED = 401
PREDICT_DIAG_REGS = (0.0, 0.1)
PREDICT_TIMES = (0.5, 4.0, None)
PREDICT_LEARNING_RATE = 1.0


def build(description: str):
    """Evaluate a description string over stax's names; returns ``kernel_fn``."""
    namespace = {name: getattr(stax, name) for name in dir(stax) if not name.startswith("_")}
    namespace.update(jax=jax, jnp=jnp)
    _, _, kernel_fn = eval(description, namespace)  # the strings are this file's own
    return kernel_fn


def to_nt(x: np.ndarray | None, layout: str) -> np.ndarray | None:
    """PyTorch layout -> neural-tangents layout (channels last for images)."""
    if x is None or layout != "image":
        return x
    return np.moveaxis(x, 1, -1)


def draw(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(case.seed)
    x1 = rng.standard_normal(case.x1_shape)
    x2 = None if case.x2_shape is None else rng.standard_normal(case.x2_shape)
    return x1, x2


def kernels(kernel_fn, x1: np.ndarray, x2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    out = kernel_fn(x1, x2, ("nngp", "ntk"))
    return np.asarray(out.nngp, dtype=np.float64), np.asarray(out.ntk, dtype=np.float64)


def make_case(case: Case) -> dict[str, np.ndarray]:
    x1, x2 = draw(case)
    nngp, ntk = kernels(build(case.description), to_nt(x1, case.layout), to_nt(x2, case.layout))
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    if nngp.shape != (x1.shape[0], n2) or ntk.shape != nngp.shape:
        raise ValueError(f"{case.name}: kernel shapes {nngp.shape}, {ntk.shape}")
    if not (np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))):
        raise ValueError(f"{case.name}: non-finite kernel values")
    arrays = {"x1": x1, "nngp": nngp, "ntk": ntk, "description": np.array(case.description)}
    if x2 is not None:
        arrays["x2"] = x2
    return arrays


def make_predictions() -> dict[str, np.ndarray]:
    kernel_fn = build(_fc("Relu()"))
    rng = np.random.default_rng(PREDICT_SEED)
    x_train = rng.standard_normal((8, 5))
    x_test = rng.standard_normal((5, 5))
    y_train = rng.standard_normal((8, 1))
    out: dict[str, np.ndarray] = {"x_train": x_train, "x_test": x_test, "y_train": y_train}

    blocks = {
        "train_train": kernel_fn(x_train, None, ("nngp", "ntk")),
        "test_train": kernel_fn(x_test, x_train, ("nngp", "ntk")),
        "test_test": kernel_fn(x_test, None, ("nngp", "ntk")),
    }
    for block, k in blocks.items():
        out[f"k_{block}_nngp"] = np.asarray(k.nngp, dtype=np.float64)
        out[f"k_{block}_ntk"] = np.asarray(k.ntk, dtype=np.float64)

    for di, diag_reg in enumerate(PREDICT_DIAG_REGS):
        predict_fn = nt.predict.gradient_descent_mse_ensemble(
            kernel_fn,
            x_train,
            y_train,
            learning_rate=PREDICT_LEARNING_RATE,
            diag_reg=diag_reg,
            diag_reg_absolute_scale=True,
        )
        for ti, t in enumerate(PREDICT_TIMES):
            result = predict_fn(t=t, x_test=x_test, get=("nngp", "ntk"), compute_cov=True)
            for get in ("nngp", "ntk"):
                gaussian = getattr(result, get)
                out[f"mean_{get}_d{di}_t{ti}"] = np.asarray(gaussian.mean, dtype=np.float64)
                out[f"cov_{get}_d{di}_t{ti}"] = np.asarray(gaussian.covariance, dtype=np.float64)

        gp_fn = nt.predict.gp_inference(
            out["k_train_train_nngp"], y_train, diag_reg=diag_reg, diag_reg_absolute_scale=True
        )
        gp = gp_fn("nngp", out["k_test_train_nngp"], out["k_test_test_nngp"])
        out[f"gp_mean_d{di}"] = np.asarray(gp.mean, dtype=np.float64)
        out[f"gp_cov_d{di}"] = np.asarray(gp.covariance, dtype=np.float64)

    out["diag_regs"] = np.array(PREDICT_DIAG_REGS, dtype=np.float64)
    out["times"] = np.array([np.inf if t is None else t for t in PREDICT_TIMES], dtype=np.float64)
    out["learning_rate"] = np.array(PREDICT_LEARNING_RATE, dtype=np.float64)
    return out


def _shape(shape: tuple[int, ...] | None) -> str:
    return "None" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


README_HEAD = """\
# neural-tangents reference numbers

Infinite-width NNGP/NTK kernels computed with neural-tangents {nt_version} (jax {jax_version},
float64, CPU), stored as plain numpy arrays so that `telescope.infinite` can be checked against
them without depending on JAX. Generated by `tools/neural_tangents_refs.py`; regenerate with

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install jax==0.4.25 jaxlib==0.4.25 "numpy<2" neural-tangents==0.6.5
    OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \\
        /tmp/ntvenv/bin/python tools/neural_tangents_refs.py

## Kernel cases

Each `<case>.npz` holds float64 `x1`, `x2` (absent for symmetric cases, i.e.
`kernel_fn(x1, None)`), `nngp` and `ntk` of shape [N1, N2] (neural-tangents'
`kernel_fn(x1, x2, ("nngp", "ntk"))`, the per-output-channel kernel of the final `Dense(1)`),
and `description`, the stax expression the network was built from (names of
`neural_tangents.stax`; defaults `W_std=1.0`, `b_std=0.0` are written out). Inputs are standard
normal from `np.random.default_rng(seed)`, x1 drawn before x2, and stored in PyTorch layout:
images as [N, C, *spatial] (transposed to channel-last [N, *spatial, C] for neural-tangents),
flat inputs [N, F] and sequences [N, T, D] unchanged. Conv padding, strides and filter shapes
refer to the spatial axes in PyTorch order (H, W, ...), which are the same axes in both layouts.

| case | seed | x1 | x2 | description |
|---|---|---|---|---|
"""

README_NOTES = """
Notes on what neural-tangents 0.6.5 does for these layers (from its source and warnings):

- `GlobalSelfAttention(..., linear_scaling=True)`: logits scaled by `1 / n_chan_key` and key
  and query weights tied; `W_key_std` and `W_query_std` enter the kernel only through their
  product, `W_value_std` and `W_out_std` only through theirs. Its warning "query
  initialization ignored" concerns `init_fn` only: `kernel_fn` still uses
  `W_query_std * W_key_std`. `linear_scaling=False` (`1 / sqrt(n_chan_key)`, independent
  keys/queries) has a closed form only for `attention_mechanism="IDENTITY"`; other mechanisms
  raise `NotImplementedError` in `kernel_fn` (so no such case is requested here).
- `ElementwiseNumerical(fn, deg)`: Gauss-Hermite quadrature with `deg` points; the NTK uses
  the derivative of `fn` by JAX autodiff.
- `FanInSum` adds the branches' kernels, assuming the branches are independent (it warns);
  in every residual block here the non-identity branch ends in a Dense / Conv / attention
  output projection, which makes that exact in the infinite-width limit.
"""

README_PREDICT = """
## Predictions: `predict_ensemble.npz`

The `fc_relu` architecture's `kernel_fn`; `x_train` [8, 5], `x_test` [5, 5], `y_train` [8, 1]
standard normal from `np.random.default_rng({seed})` (in that order). Kernel blocks
`k_train_train_*` [8, 8], `k_test_train_*` [5, 8], `k_test_test_*` [5, 5] for `*` in `nngp`,
`ntk`. For `Di` indexing `diag_regs` = {diag_regs} and `Ti` indexing `times` = {times}
(`inf` stands for `t=None`), and scalar `learning_rate` = 1.0:

    predict_fn = nt.predict.gradient_descent_mse_ensemble(
        kernel_fn, x_train, y_train, learning_rate=1.0, diag_reg=D, diag_reg_absolute_scale=True)
    predict_fn(t=T, x_test=x_test, get=("nngp", "ntk"), compute_cov=True)

gives `mean_{{get}}_d{{Di}}_t{{Ti}}` [5, 1] and `cov_{{get}}_d{{Di}}_t{{Ti}}` [5, 5]; and

    gp_fn = nt.predict.gp_inference(
        k_train_train_nngp, y_train, diag_reg=D, diag_reg_absolute_scale=True)
    gp_fn("nngp", k_test_train_nngp, k_test_test_nngp)

gives `gp_mean_d{{Di}}` [5, 1] and `gp_cov_d{{Di}}` [5, 5].

Conventions of neural-tangents 0.6.5 (`neural_tangents/_src/predict.py`), with n =
`y_train.size` (= 8 here, N_train times the number of outputs), K = train-train kernel of the
`get` mode, K_td = test-train kernel, and (lambda_i, v_i) the eigenpairs of K + D I:

- Time: `t` is multiplied by `learning_rate` first; mode i then decays as
  `exp(-lambda_i * lr * t / n)`, i.e. gradient flow (time `lr * t`) on the loss
  `L = sum((f(x_train) - y_train)**2) / (2 n)`. Eigenvalues are clipped at 0
  (`max(lambda_i, 0)`) in the exponent.
- Mean at finite t: `K_td V diag((1 - exp(-lambda lr t / n)) / lambda) V^T y_train`.
  `t=None` (stored as `inf`) is computed by a Cholesky solve instead,
  `K_td (K + D I)^{{-1}} y_train`.
- `diag_reg`: with `diag_reg_absolute_scale=True` (used here) the train-train kernel is
  `K + D I`; with the default `False` it is `K + D * (trace(K) / N_train) I`. It is added to
  the train-train kernel used for the eigendecomposition / Cholesky only; K_td, the NNGP
  train-train block inside the NTK covariance, and the test-test block are not regularized.
- NNGP covariance: `K_tt - K_td V diag((1 - exp(-2 lambda lr t / n)) / lambda) V^T K_td^T`
  (note the factor 2 in the exponent).
- NTK covariance, with `A = V diag((1 - exp(-lambda lr t / n)) / lambda) V^T`
  (`A = (Theta + D I)^{{-1}}` at t=None), Theta the NTK and G the NNGP:
  `G_tt + Theta_td A G A Theta_td^T - (Theta_td A G_td^T + G_td A Theta_td^T)`.
- The `get="nngp"` time evolution uses the NNGP itself as the training kernel (evolution of
  a network whose readout layer alone is trained).
- `gp_inference` with the same `diag_reg` equals the `t=None` NNGP predictions.

These formulas, evaluated with numpy on the stored kernel blocks, reproduce every stored
mean and covariance to within 2e-14.
"""


def write_readme(done: list[Case], refused: dict[str, str]) -> None:
    lines = [README_HEAD.format(nt_version=nt.__version__, jax_version=jax.__version__)]
    for case in CASES:
        if case.name not in refused:
            lines.append(
                f"| `{case.name}` | {case.seed} | {_shape(case.x1_shape)} | "
                f"{_shape(case.x2_shape)} | `{case.description}` |\n"
            )
    if refused:
        lines.append("\n## Cases neural-tangents refused (no fixture written)\n\n")
        for case in CASES:
            if case.name in refused:
                lines.append(f"- `{case.name}`: `{case.description}` -- {refused[case.name]}\n")
    lines.append(README_NOTES)
    times = ", ".join("inf" if t is None else str(t) for t in PREDICT_TIMES)
    lines.append(
        README_PREDICT.format(
            seed=PREDICT_SEED,
            diag_regs="(" + ", ".join(str(d) for d in PREDICT_DIAG_REGS) + ")",
            times="(" + times + ")",
        )
    )
    (OUT_DIR / "README.md").write_text("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    done: list[Case] = []
    refused: dict[str, str] = {}
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        try:
            arrays = make_case(case)
        except Exception as error:  # recorded in the README, not silently dropped
            refused[case.name] = f"{type(error).__name__}: {error}".splitlines()[0]
            print(f"REFUSED {case.name}: {refused[case.name]}", flush=True)
            continue
        np.savez_compressed(OUT_DIR / f"{case.name}.npz", **arrays)
        done.append(case)
        print(f"{case.name}: nngp[0, 0]={arrays['nngp'][0, 0]:.6g}", flush=True)
    if not args.only:
        np.savez_compressed(OUT_DIR / "predict_ensemble.npz", **make_predictions())
        print("predict_ensemble written", flush=True)
        write_readme(done, refused)


if __name__ == "__main__":
    main()
