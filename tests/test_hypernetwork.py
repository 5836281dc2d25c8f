"""``telescope.models.HyperNetwork`` and ``telescope.infinite.hypernetwork.HyperMLP``.

Oracles: the forward against an explicit per-example primary network; ``telescope.ntk`` against
a per-example autograd loop; the hyperkernel against (i) the plain product of the two networks'
``telescope.infinite`` kernels where it must be exact (a linear primary; pairs of one task when
the generated weights have unit variance), (ii) a Monte Carlo oracle that never runs the
recursion (a wide primary whose weights are sampled jointly Gaussian across tasks with the
meta-network's NNGP as covariance, its weight gradients by autograd), and (iii) the empirical NTK
of finite hypernetworks, whose distance to it falls with the widths like ``width**-1/2``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import telescope
from telescope import infinite as inf
from telescope.errors import UsageError
from telescope.infinite.hypernetwork import HyperMLP
from telescope.kernels import explain
from telescope.models import MLP, HyperNetwork
from telescope.models.hypernetwork import primary_shapes


def _tasks(n_tasks: int, per_task: int, d_x: int = 1, d_z: int = 3, *, sphere: bool = True,
           seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tasks, d_z, generator=g, dtype=dtype)
    if sphere:
        z = z / z.norm(dim=1, keepdim=True) * math.sqrt(d_z)
    x = torch.randn(n_tasks * per_task, d_x, generator=g, dtype=dtype)
    return torch.cat([x, z.repeat_interleave(per_task, 0)], 1)


def _loop_ntk(model: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """``sum_o <d h_o(u_i)/dw, d h_o(u_j)/dw>`` from one autograd call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(u.shape[0]):
        out = model(u[i:i + 1]).reshape(-1)
        grads = []
        for o in range(out.shape[0]):
            g = torch.autograd.grad(out[o], params, retain_graph=True)
            grads.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(grads))          # [O, P]
    jac = torch.stack(rows)                      # [N, O, P]
    return torch.einsum("iop,jop->ij", jac, jac)


# --------------------------------------------------------------------------- the finite model


def test_primary_shapes_and_generated_layout():
    shapes = primary_shapes(2, (5, 3), 4)
    assert shapes == [("weight1", (5, 2)), ("bias1", (5,)), ("weight2", (3, 5)), ("bias2", (3,)),
                      ("weight3", (4, 3)), ("bias3", (4,))]
    assert primary_shapes(2, (), 1, bias=False) == [("weight1", (1, 2))]
    net = HyperNetwork.mlp(2, 3, [7], (5, 3), 4, bias_std=0.5)
    assert net.n_generated == 10 + 5 + 15 + 3 + 12 + 4
    z = torch.randn(6, 3)
    theta = net.meta(z)
    parts = net.generated(z)
    assert parts["weight2"].shape == (6, 3, 5)
    # the output vector is cut in the order of primary_shapes
    assert torch.equal(parts["bias1"], theta[:, 10:15])
    assert torch.equal(parts["weight2"][:, 1, :], theta[:, 15 + 5:15 + 10])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_forward_matches_an_explicit_primary_per_example(activation):
    torch.manual_seed(1)
    net = HyperNetwork.mlp(2, 3, [6], (4,), 2, activation=activation, weight_std=1.3,
                           bias_std=0.7).double()
    u = _tasks(3, 2, d_x=2)
    out = net(u)
    act = torch.relu if activation == "relu" else torch.tanh
    for i in range(u.shape[0]):
        x, z = u[i, :2], u[i, 2:]
        t = net.meta(z[None])[0]
        w1, b1 = t[:8].reshape(4, 2), t[8:12]
        w2, b2 = t[12:20].reshape(2, 4), t[20:22]
        h = act(1.3 / math.sqrt(2) * (w1 @ x) + 0.7 * b1)
        ref = 1.3 / math.sqrt(4) * (w2 @ h) + 0.7 * b2
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias_std,activation,out", [(0.0, "relu", 1), (0.5, "tanh", 2),
                                                     (1.0, "erf", 1)])
def test_ntk_equals_a_per_example_autograd_loop(bias_std, activation, out):
    torch.manual_seed(2)
    net = HyperNetwork.mlp(1, 3, [16, 8], (5,), out, activation=activation, bias_std=bias_std,
                           meta_bias_std=0.3).double()
    u = _tasks(4, 3)
    k = telescope.ntk(net, u)
    torch.testing.assert_close(k, _loop_ntk(net, u), rtol=1e-10, atol=1e-10)
    # between two batches, and by the per-example Jacobian
    k12 = telescope.ntk(net, u[:5], u[5:], method="jacobian")
    torch.testing.assert_close(k12, k[:5, 5:], rtol=1e-10, atol=1e-10)


def test_structured_rules_reach_the_meta_layers():
    net = HyperNetwork.mlp(1, 3, [8], (4,), bias_std=0.5, meta_bias_std=0.2)
    plan = explain(net, _tasks(2, 2, dtype=torch.float32))
    assert set(plan["rule"]) == {"linear"}
    assert set(plan["module_type"]) == {"NTKLinear"}


def test_join_split_and_errors():
    net = HyperNetwork.mlp(2, 3, [4], (3,))
    x, z = torch.randn(5, 2), torch.randn(3)
    u = HyperNetwork.join(x, z)
    assert u.shape == (5, 5) and torch.equal(u[:, 2:], z.expand(5, 3))
    assert [t.shape for t in net.split(u)] == [(5, 2), (5, 3)]
    with pytest.raises(UsageError, match=r"u = \[x, z\].*d_x = 2"):
        net(torch.randn(5, 2))
    with pytest.raises(UsageError, match="N = 5 rows"):
        HyperNetwork.join(x, torch.randn(4, 3))
    wrong = HyperNetwork(MLP(3, [4], 7, parametrization="ntk"), 2, (3,))
    with pytest.raises(UsageError, match=r"must output \[N, 9\]"):
        wrong(u)
    with pytest.raises(UsageError, match="activation must be one of"):
        HyperNetwork(MLP(3, [4], 13), 2, (3,), activation="swish")
    with pytest.raises(UsageError, match="meta must be an nn.Module"):
        HyperNetwork(lambda z: z, 2, (3,))   # type: ignore[arg-type]
    with pytest.raises(UsageError, match="primary_hidden"):
        HyperNetwork(MLP(3, [4], 13), 2, 3)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="bias_std"):
        HyperNetwork(MLP(3, [4], 13), 2, (3,), bias_std=-1.0)


# --------------------------------------------------------------------------- the hyperkernel


def _arch(n: int = 512, m: int = 256, **kw) -> HyperMLP:
    kw = {"W_std": math.sqrt(2), "b_std": 0.5, "meta_W_std": 1.0, **kw}
    return HyperMLP(inf.serial(inf.Dense(n, W_std=math.sqrt(2)), inf.Relu()), 1, (m,), **kw)


def test_linear_primary_is_exactly_the_hadamard_product():
    u = _tasks(4, 3, d_x=2, sphere=False)
    arch = HyperMLP(inf.serial(inf.Dense(64), inf.Erf()), 2, (), b_std=0.7, W_std=1.2,
                    meta_W_std=0.8, meta_b_std=0.3)
    k, had = arch.kernel(u), arch.hadamard(u)
    # the two factors, computed here from telescope.infinite directly
    meta = inf.serial(inf.Dense(64), inf.Erf(), inf.Dense(1, W_std=0.8, b_std=0.3)).kernel(u[:, 2:])
    lin = 1.2**2 * u[:, :2] @ u[:, :2].T / 2 + 0.7**2
    torch.testing.assert_close(k["ntk"], meta["ntk"] * lin, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k["nngp"], meta["nngp"] * lin, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(had["ntk"], k["ntk"], rtol=1e-12, atol=1e-12)


def test_plain_product_is_exact_within_a_task_and_not_across():
    # z on the sphere |z|^2 = 3, ReLU body with W_std = sqrt 2, readout 1: S(z, z) = 1
    u = _tasks(3, 4)
    arch = _arch()
    k, had = arch.kernel(u), arch.hadamard(u)
    s = arch.meta_network().kernel(u[:, 1:])["nngp"]
    torch.testing.assert_close(s.diagonal(), torch.ones(12, dtype=torch.float64))
    same = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(k[name][same], had[name][same], rtol=1e-12, atol=1e-12)
        rel = ((k[name] - had[name])[~same].abs() / had[name][~same].abs()).max()
        assert rel > 0.05


def test_cross_kernel_is_a_block_of_the_symmetric_one():
    u = _tasks(3, 3, sphere=False)
    arch = _arch(b_std=0.3)
    full = arch.kernel(u)
    cross = arch.kernel(u[:4], u[4:])
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(cross[name], full[name][:4, 4:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(full[name], full[name].T)


def test_hyperkernel_against_monte_carlo_over_correlated_primary_weights():
    """A wide primary (width m) run with weights W(z) drawn jointly Gaussian across the tasks,
    covariance S = the meta's NNGP, and its gradients by autograd: ``T * sum_p df/dp df'/dp``
    and ``E[f f']`` over the readout tend to the hyperkernel as ``m`` grows."""
    torch.manual_seed(3)
    n_tasks, per, m, w_std, b_std = 3, 4, 20000, math.sqrt(2), 0.5
    u = _tasks(n_tasks, per, sphere=False, seed=4)
    x = u[:, :1]
    arch = HyperMLP(inf.serial(inf.Dense(1, W_std=math.sqrt(2)), inf.Relu()), 1, (m,),
                    W_std=w_std, b_std=b_std, meta_W_std=1.0)
    tasks = u[::per, 1:]
    meta = arch.meta_network().kernel(tasks)
    root = torch.linalg.cholesky(meta["nngp"] + 1e-12 * torch.eye(n_tasks, dtype=torch.float64))

    def correlated(*shape):                       # [n_tasks, *shape], covariance S over tasks
        eps = torch.randn(n_tasks, *shape, dtype=torch.float64)
        return torch.einsum("st,t...->s...", root, eps).repeat_interleave(per, 0)

    w1, b1 = correlated(m, 1).requires_grad_(), correlated(m).requires_grad_()
    w2, b2 = correlated(1, m).requires_grad_(), correlated(1).requires_grad_()
    pre1 = w_std * torch.einsum("nmi,ni->nm", w1, x) + b_std * b1
    act = torch.relu(pre1)
    out = w_std / math.sqrt(m) * torch.einsum("nom,nm->no", w2, act) + b_std * b2
    grads = torch.autograd.grad(out.sum(), [w1, b1, w2, b2])   # example i's only in row i
    flat = torch.cat([g.reshape(len(u), -1) for g in grads], 1)
    q = flat @ flat.T
    t = meta["ntk"].repeat_interleave(per, 0).repeat_interleave(per, 1)
    s = meta["nngp"].repeat_interleave(per, 0).repeat_interleave(per, 1)
    # the NNGP given the hidden layer: the readout's weights averaged out exactly
    nngp = s * (w_std**2 * act.detach() @ act.detach().T / m + b_std**2)
    k = arch.kernel(u)
    assert float((t * q - k["ntk"]).norm() / k["ntk"].norm()) < 0.03
    assert float((nngp - k["nngp"]).norm() / k["nngp"].norm()) < 0.03


def test_empirical_ntk_converges_only_when_both_widen():
    u = _tasks(4, 4, dtype=torch.float32, seed=5)

    def distance(n: int, m: int, draws: int = 3) -> float:
        arch = _arch(n, m)
        k_inf = arch.kernel(u.double())["ntk"]
        out = []
        for seed in range(draws):
            torch.manual_seed(seed)
            k = telescope.ntk(arch.module(3), u).double()
            out.append(float((k - k_inf).norm() / k_inf.norm()))
        return sum(out) / draws

    small, large = distance(64, 16), distance(4096, 1024)
    assert large < 0.15
    # the fluctuations fall like width^-1/2: 64x the widths, about 1/8 the distance
    assert large < small / 3
    # a finite primary keeps the kernel random however wide the meta-network
    assert distance(4096, 8) > 2 * large


def test_module_is_the_finite_network_of_the_description():
    arch = HyperMLP(inf.serial(inf.Dense(32), inf.Erf()), 2, (6, 5), 3, activation=inf.Erf(),
                    W_std=1.1, b_std=0.2, meta_W_std=0.9, meta_b_std=0.1)
    net = arch.module(4)
    assert isinstance(net, HyperNetwork)
    assert net.n_generated == arch.n_generated == 2 * 6 + 6 + 6 * 5 + 5 + 5 * 3 + 3
    assert net(torch.randn(7, 6)).shape == (7, 3)
    z = torch.randn(2, 1)
    assert torch.equal(net.activation(z), torch.erf(z))
    assert arch.kernel(_tasks(2, 2, d_x=2, d_z=4))["ntk"].shape == (4, 4)


def test_hyperkernel_errors():
    with pytest.raises(UsageError, match="meta must be a telescope.infinite description"):
        HyperMLP(nn.Linear(3, 4), 1, (4,))   # type: ignore[arg-type]
    with pytest.raises(UsageError, match="activation must be an elementwise"):
        HyperMLP(inf.Dense(4), 1, (4,), activation=inf.Dense(3))   # type: ignore[arg-type]
    arch = _arch()
    with pytest.raises(UsageError, match=r"u1 must be u = \[x, z\]"):
        arch.kernel(torch.randn(4, 1))
    with pytest.raises(UsageError, match="same width"):
        arch.kernel(torch.randn(4, 4), torch.randn(4, 5))
