"""attention_entropy, WeightRank, NormCycles/detect_cycles and KernelEvolution against oracles:
uniform and hand-computed attention, known low-rank updates, explicitly constructed per-head
forms, synthetic norm histories with known cycles, and kernels from telescope.ntk(jacobian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import telescope
from telescope.errors import UsageError
from telescope.kernels import effective_rank, kernel_distance, kernel_target_alignment
from telescope.lens import (
    KernelEvolution,
    NormCycles,
    WeightRank,
    attention_entropy,
    detect_cycles,
)
from telescope.models import MLP, TinyTransformer
from telescope.models.hooks import HookPoint, capture
from telescope.models.transformer import SelfAttention


def _tiny(causal: bool = True, **kw) -> TinyTransformer:
    return TinyTransformer(vocab=9, d_model=8, n_heads=2, n_layers=2, seq_len=5,
                           out_features=3, mlp_ratio=2, causal=causal, **kw)


# ------------------------------------------------------------------------------------------
# attention_entropy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_attention_has_max_entropy(causal):
    model = _tiny(causal=causal)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.query, block.attn.key):
                lin.weight.zero_()
                lin.bias.zero_()
    x = torch.randint(0, 9, (3, 5))
    rows = attention_entropy(model, x)
    assert [(r["layer"], r["head"]) for r in rows] == [
        ("blocks.0.attn", 0), ("blocks.0.attn", 1), ("blocks.1.attn", 0), ("blocks.1.attn", 1)]
    expected = (sum(math.log(i + 1) for i in range(5)) / 5) if causal else math.log(5)
    for r in rows:
        assert r["max_entropy"] == pytest.approx(expected, rel=1e-12)
        assert r["entropy"] == pytest.approx(expected, rel=1e-6)
        assert r["normalized"] == pytest.approx(1.0, rel=1e-6)


def test_hand_computed_single_head_attention():
    attn = SelfAttention(2, 1, causal=False)
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value, attn.out):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # one example, two tokens
    rows = attention_entropy(nn.Sequential(attn), x)
    # scores = x x^T / sqrt(2): [[1, 0], [0, 4]] / sqrt(2); rows softmaxed
    expected = 0.0
    for row in ([1.0, 0.0], [0.0, 4.0]):
        z = [math.exp(s / math.sqrt(2)) for s in row]
        p = [v / sum(z) for v in z]
        expected += -sum(q * math.log(q) for q in p) / 2
    assert len(rows) == 1
    assert rows[0]["layer"] == "0" and rows[0]["head"] == 0
    assert rows[0]["entropy"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["max_entropy"] == pytest.approx(math.log(2))


def test_attention_entropy_restores_state_and_errors():
    model = _tiny()
    model.train()
    x = torch.randint(0, 9, (2, 4))
    rows = attention_entropy(model, x)
    assert all(m.training for m in model.modules())
    # the model keeps no lens state: the temporary hooks are gone, no attributes were set
    assert all(not m._forward_hooks for m in model.modules())
    assert not any(hasattr(b.attn, "record") or hasattr(b.attn, "last_attention")
                   for b in model.blocks)
    # both blocks measured, heads in order; the values against a plain recomputation from the
    # attention probabilities of an eval-mode forward pass (causal: query i sees i + 1 keys)
    assert [(r["layer"], r["head"]) for r in rows] == [
        (f"blocks.{b}.attn", h) for b in range(2) for h in range(2)]
    model.eval()
    with torch.no_grad(), capture(model, lambda n: n.endswith("attn.hook_pattern")) as cache:
        model(x)
    max_ent = (math.log(1) + math.log(2) + math.log(3) + math.log(4)) / 4
    for b in range(2):
        a = cache[f"blocks.{b}.attn.hook_pattern"].double()
        ent = -(a * a.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
        for h in range(2):
            r = rows[2 * b + h]
            assert r["entropy"] == pytest.approx(float(ent[h]), rel=1e-9)
            assert r["max_entropy"] == pytest.approx(max_ent, rel=1e-12)
            assert r["normalized"] == pytest.approx(float(ent[h]) / max_ent, rel=1e-9)
    with pytest.raises(ValueError, match="hook_pattern"):
        attention_entropy(MLP(3, [4], 1), torch.randn(2, 3))
    # an error in the forward pass: hooks removed and train mode restored all the same
    model.train()
    with pytest.raises(UsageError, match="seq_len"):
        attention_entropy(model, torch.randint(0, 9, (2, 7)))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_attention_entropy_matches_softmax_from_the_weights():
    """Each layer's entropy from ``softmax(Q K^T / sqrt(d_head) + causal mask)`` written out
    from the weights (the first layer from the embeddings, the second from the first block's
    output as computed by hand)."""
    model = _tiny().double()
    x = torch.randint(0, 9, (3, 5))
    rows = attention_entropy(model, x)

    def block_by_hand(block, h):
        u = F.layer_norm(h, (8,), block.ln1.weight, block.ln1.bias)
        a = block.attn
        q, k, v = ((u @ lin.weight.T + lin.bias).view(3, 5, 2, 4).transpose(1, 2)
                   for lin in (a.query, a.key, a.value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(4)
        scores = scores + torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
        p = scores.softmax(-1)                                      # [N, heads, S, S]
        y = (p @ v).transpose(1, 2).reshape(3, 5, 8) @ a.out.weight.T + a.out.bias
        h = h + y
        w1, w2 = block.mlp[0], block.mlp[2]
        m = F.layer_norm(h, (8,), block.ln2.weight, block.ln2.bias) @ w1.weight.T + w1.bias
        return p, h + F.gelu(m) @ w2.weight.T + w2.bias

    with torch.no_grad():
        h = model.token_embedding.weight[x] + model.position_embedding.weight[:5]
        for b, block in enumerate(model.blocks):
            p, h = block_by_hand(block, h)
            ent = -(p * p.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
            for head in range(2):
                r = rows[2 * b + head]
                assert (r["layer"], r["head"]) == (f"blocks.{b}.attn", head)
                assert r["entropy"] == pytest.approx(float(ent[head]), rel=1e-10)
                assert r["max_entropy"] == pytest.approx(
                    sum(math.log(i + 1) for i in range(5)) / 5, rel=1e-12)


class _Mixer(nn.Module):
    """A user's own attention: one head, scores ``x x^T``, a per-example key padding mask
    (``pad[n, j]``: key ``j`` of example ``n`` masked), hook points by the convention."""

    def __init__(self, with_scores: bool) -> None:
        super().__init__()
        self.hook_pattern = HookPoint()
        self.hook_scores = HookPoint() if with_scores else None
        self.pad: torch.Tensor | None = None

    def forward(self, x):
        scores = (x @ x.transpose(-2, -1)).unsqueeze(1)             # [N, 1, S, S]
        if self.pad is not None:
            scores = scores.masked_fill(self.pad[:, None, None, :], float("-inf"))
        if self.hook_scores is not None:
            scores = self.hook_scores(scores)
        return self.hook_pattern(scores.softmax(-1)).squeeze(1) @ x


def test_attention_entropy_on_a_users_hook_points():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Identity(), _Mixer(with_scores=True))
    model[1].pad = torch.tensor([[False, False, True], [False, False, False]])
    rows = attention_entropy(model, x)
    assert [(r["layer"], r["head"]) for r in rows] == [("1", 0)]
    s = (x @ x.transpose(-2, -1)).masked_fill(model[1].pad[:, None, :], float("-inf"))
    p = s.softmax(-1)
    assert rows[0]["entropy"] == pytest.approx(
        float(-torch.special.xlogy(p, p).sum(-1).mean()), rel=1e-12)
    # m_i = 2 keys in example 0, 3 in example 1: mean over examples and queries of log m_i
    assert rows[0]["max_entropy"] == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-12)
    # without hook_scores every query counts all S_k = 3 keys
    plain = _Mixer(with_scores=False)
    rows = attention_entropy(plain, x)
    assert [(r["layer"], r["head"]) for r in rows] == [("", 0)]
    assert rows[0]["max_entropy"] == pytest.approx(math.log(3), rel=1e-12)


def test_causal_max_entropy_and_zero_entropy_one_token():
    model = _tiny()
    rows = attention_entropy(model, torch.randint(0, 9, (2, 1)))  # one token: log 1 = 0
    assert all(r["entropy"] == 0.0 and r["max_entropy"] == 0.0 for r in rows)
    assert all(math.isnan(r["normalized"]) for r in rows)


# ------------------------------------------------------------------------------------------
# WeightRank
# ------------------------------------------------------------------------------------------


def test_weight_rank_zero_at_construction():
    model = _tiny()
    lens = WeightRank(model)
    rows = lens.measure()
    n_weights = sum(1 for p in model.parameters() if p.dim() == 2)
    assert sum(r["kind"] == "weight" for r in rows) == n_weights
    assert sum(r["kind"] == "qk" for r in rows) == 4 and sum(r["kind"] == "vo" for r in rows) == 4
    for r in rows:
        assert r["delta_norm"] == 0.0 and r["stable_rank"] == 0.0 and r["rank"] == 0
        assert (r["head"] == -1) == (r["kind"] == "weight")


def test_rank_one_and_rank_two_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    lens = WeightRank(model)
    u, v = torch.randn(5), torch.randn(6)
    a, _ = torch.linalg.qr(torch.randn(4, 2))
    b, _ = torch.linalg.qr(torch.randn(5, 2))
    with torch.no_grad():
        model[0].weight.add_(torch.outer(u, v))
        model[2].weight.add_(3.0 * torch.outer(a[:, 0], b[:, 0]) + torch.outer(a[:, 1], b[:, 1]))
    rows = {r["matrix"]: r for r in lens.measure()}
    assert set(rows) == {"0.weight", "2.weight"}
    r1 = rows["0.weight"]
    assert r1["rank"] == 1
    assert r1["stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert r1["sigma_max"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    assert r1["delta_norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    r2 = rows["2.weight"]
    assert r2["rank"] == 2
    assert r2["sigma_max"] == pytest.approx(3.0, rel=1e-5)
    assert r2["stable_rank"] == pytest.approx(10.0 / 9.0, rel=1e-5)
    s = lens.spectrum("2.weight")
    torch.testing.assert_close(s[:2], torch.tensor([3.0, 1.0], dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert bool((s[2:].abs() < 1e-5).all())
    coarse = {r["matrix"]: r for r in WeightRank(model, threshold=0.5).measure()}
    assert coarse["2.weight"]["rank"] == 0  # no update since this lens was built


def _oracle_forms(attn: SelfAttention) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """M_QK^h, M_VO^h read off the module's own head layout by feeding the basis e_1..e_d."""
    d, heads = attn.query.weight.shape[0], attn.n_heads
    eye = torch.eye(d, dtype=torch.float64).unsqueeze(0)  # one example, d tokens e_i
    w = {n: getattr(attn, n).weight.detach().double() for n in ("query", "key", "value", "out")}

    def split(t):
        return t.view(1, d, heads, attn.d_head).transpose(1, 2)[0]  # [heads, d, d_head]

    q, k, v = (split(F.linear(eye, w[n])) for n in ("query", "key", "value"))
    forms = []
    for h in range(heads):
        m_qk = q[h] @ k[h].T  # [e_i M e_j^T]_{ij} = M
        y = torch.zeros(1, heads, d, attn.d_head, dtype=torch.float64)
        y[0, h] = v[h]  # only head h's values pass through the output projection
        r = F.linear(y.transpose(1, 2).reshape(1, d, d), w["out"])[0]  # rows e_i M_VO^T
        forms.append((m_qk, r.T))
    return forms


def test_qk_vo_forms_match_explicit_construction():
    torch.manual_seed(1)
    attn = SelfAttention(6, 3, causal=False)
    model = nn.Sequential(attn)
    before = _oracle_forms(attn)
    lens = WeightRank(model, threshold=1e-6)
    with torch.no_grad():
        for n in ("query", "key", "value", "out"):
            getattr(attn, n).weight.add_(0.3 * torch.randn(6, 6))
    after = _oracle_forms(attn)
    rows = [r for r in lens.measure() if r["kind"] != "weight"]
    assert len(rows) == 6
    for r in rows:
        assert r["matrix"] == f"0.{r['kind']}"
        i = 0 if r["kind"] == "qk" else 1
        d = after[r["head"]][i] - before[r["head"]][i]
        s = torch.linalg.svdvals(d)
        assert r["sigma_max"] == pytest.approx(float(s[0]), rel=1e-5)
        assert r["delta_norm"] == pytest.approx(float(d.norm()), rel=1e-5)
        # numerical rank from the oracle spectrum: generic updates reach rank 2 d_head = 4
        assert r["rank"] == int((s > 1e-6 * s[0]).sum()) == 4
        torch.testing.assert_close(lens.spectrum("0", r["kind"], r["head"]), s,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lens.spectrum(r["matrix"], r["kind"], r["head"]), s,
                                   rtol=1e-5, atol=1e-6)
    # a rank-one change of one head's query rows changes only that head's M_QK, by rank one
    lens = WeightRank(model)
    with torch.no_grad():
        attn.query.weight[2:4].add_(torch.outer(torch.randn(2), torch.randn(6)))
    qk = {r["head"]: r for r in lens.measure() if r["kind"] == "qk"}
    assert qk[0]["rank"] == 0 and qk[2]["rank"] == 0 and qk[1]["rank"] == 1
    with pytest.raises(KeyError):
        lens.spectrum("nope")


def test_weight_rank_on_sigma_reparam_transformer():
    model = _tiny(sigma_reparam=True)
    lens = WeightRank(model)
    assert all(r["delta_norm"] == 0.0 for r in lens.measure())
    attn = model.blocks[0].attn
    with torch.no_grad():
        wq, wk = (m.effective_weight().double() for m in (attn.query, attn.key))
        attn.key.gamma.mul_(2.0)  # W_hat_K doubles: M_QK -> 2 M_QK, so D = M_QK
    for r in lens.measure():
        if r["matrix"] == "blocks.0.attn.qk":     # ||W_hat_Q[h]^T W_hat_K[h]||_F, d_head = 4
            rows = slice(4 * r["head"], 4 * r["head"] + 4)
            expected = float((wq[rows].T @ wk[rows]).norm())
            assert r["delta_norm"] == pytest.approx(expected, rel=1e-5), r
            assert r["rank"] == 4
        else:  # nothing else moved: the raw weights (only gamma did), the VO forms, block 1
            assert r["delta_norm"] == 0.0, r


def test_weight_rank_reads_attention_through_head_weights():
    class Heads(nn.Module):  # a user's attention: declares its per-head matrices, nothing else
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3))     # W_Q, W_K, W_V [1, 2, 3], W_O

        def head_weights(self):
            wq, wk, wv, wo = self.w[:1], self.w[1:2], self.w[2:3], self.w[3:4].transpose(1, 2)
            return wq, wk, wv, wo

    model = nn.Sequential(Heads())
    lens = WeightRank(model)
    with torch.no_grad():
        model[0].w[0].mul_(2.0)                             # W_Q doubles: D_QK = M_QK
    qk = [r for r in lens.measure() if r["kind"] == "qk"]
    w = model[0].w.detach().double()
    assert [r["matrix"] for r in qk] == ["0.qk"]
    assert qk[0]["delta_norm"] == pytest.approx(float((w[0].T @ w[1]).norm() / 2), rel=1e-9)

    class Bad(nn.Module):
        def head_weights(self):
            return torch.zeros(2, 2)

    with pytest.raises(UsageError, match="head_weights"):
        WeightRank(nn.Sequential(Bad()))


# ------------------------------------------------------------------------------------------
# detect_cycles / NormCycles
# ------------------------------------------------------------------------------------------


def _staircase(n_cycles: int, grow: int = 10, flat: int = 10, rate: float = 0.02):
    logs, value = [0.0], 0.0
    for _ in range(n_cycles):
        for _ in range(grow):
            value += rate
            logs.append(value)
        logs.extend([value] * flat)
    return list(range(len(logs))), [math.exp(v) for v in logs]


def test_staircase_cycles_exact():
    steps, norms = _staircase(3)
    cycles = detect_cycles(steps, norms)
    assert [(c["start"], c["peak"], c["end"]) for c in cycles] == [
        (0, 10, 20), (20, 30, 40), (40, 50, 60)]
    for c in cycles:
        assert c["rise"] == pytest.approx(math.exp(0.2) - 1)
    assert detect_cycles(steps, norms, min_rise=0.25) == []


def test_sawtooth_and_noise():
    logs = []
    for _ in range(4):
        logs += [0.03 * k for k in range(10)] + [0.15, 0.0]  # rise to 0.27, drop, drop
    norms = [math.exp(v) for v in logs]
    assert len(detect_cycles(range(len(norms)), norms)) == 4
    gen = torch.Generator().manual_seed(0)
    steps, stairs = _staircase(3, rate=0.05)
    noise = torch.randn(len(stairs), generator=gen).tolist()
    noisy = [v * (1 + 1e-3 * e) for v, e in zip(stairs, noise, strict=True)]
    assert len(detect_cycles([10 * s for s in steps], noisy)) == 3


def test_monotone_is_one_open_phase():
    steps = list(range(100))
    assert detect_cycles(steps, [1.0 + math.sqrt(s) for s in steps]) == []
    # growth that then levels off completes exactly one cycle
    cycles = detect_cycles(steps, [1.0 + min(s, 50) for s in steps])
    assert [(c["start"], c["peak"], c["end"]) for c in cycles] == [(0, 50, 99)]


def test_smoothing_merges_a_dip():
    logs = [0.03 * k for k in range(11)]
    logs += [logs[-1] - 0.005] + [logs[-1] - 0.005 + 0.03 * k for k in range(1, 11)]
    logs += [logs[-1]] * 10
    norms = [math.exp(v) for v in logs]
    steps = list(range(len(norms)))
    assert len(detect_cycles(steps, norms)) == 2
    assert len(detect_cycles(steps, norms, smooth=5)) == 1


def test_detect_cycles_validation():
    with pytest.raises(ValueError, match="increasing"):
        detect_cycles([0, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        detect_cycles([0, 1], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        detect_cycles([0, 1], [1.0, -2.0])
    assert detect_cycles([0, 1, 2], [0.0, 1.0, 1.0]) == []


def test_norm_cycles_records_and_detects():
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    base = [p.detach().clone() for p in head.parameters()]
    norm0 = math.sqrt(sum(float(p.pow(2).sum()) for p in base))
    tracker = NormCycles(head, name="head")
    steps, norms = _staircase(2)
    for s, n in zip(steps, norms, strict=True):
        with torch.no_grad():
            for p, b in zip(head.parameters(), base, strict=True):
                p.copy_(b * n)
        tracker.update(5 * s)
    rows = tracker.rows()
    assert len(rows) == len(steps) and math.isnan(rows[0]["growth"])
    assert rows[1]["norm"] == pytest.approx(norm0 * math.exp(0.02), rel=1e-6)
    assert rows[1]["growth"] == pytest.approx(0.02 / 5, rel=1e-4)
    assert rows[15]["growth"] == pytest.approx(0.0, abs=1e-6)
    cycles = tracker.cycles()
    assert [(c["start"], c["peak"], c["end"]) for c in cycles] == [(0, 50, 100), (100, 150, 200)]
    assert tracker.cycles(min_rise=0.5) == []
    with pytest.raises(ValueError, match="after"):
        tracker.update(5)
    other = NormCycles([head.weight])
    other.update(0)
    assert other.rows()[0]["norm"] == pytest.approx(float(head.weight.detach().norm()), rel=1e-6)


# ------------------------------------------------------------------------------------------
# KernelEvolution
# ------------------------------------------------------------------------------------------


def test_kernel_evolution_against_jacobian_kernels():
    torch.manual_seed(0)
    model = _tiny().double()
    x = torch.randint(0, 9, (6, 5))
    y = F.one_hot(torch.randint(0, 3, (6,)), 3).double()
    lens = KernelEvolution(model, x, y)
    k0 = telescope.ntk(model, x, method="jacobian")
    first = lens.measure()
    assert first["kernel_distance"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    row = lens.measure()
    kt = telescope.ntk(model, x, method="jacobian")
    assert row["kernel_distance"] == pytest.approx(kernel_distance(kt, k0), rel=1e-8)
    assert row["kernel_distance"] > 1e-4
    assert row["kernel_target_alignment"] == pytest.approx(kernel_target_alignment(kt, y),
                                                           rel=1e-8)
    assert row["kernel_trace"] == pytest.approx(float(kt.trace()), rel=1e-9)
    assert row["kernel_effective_rank"] == pytest.approx(effective_rank(kt), rel=1e-8)
    torch.testing.assert_close(lens.kernel, kt, rtol=1e-9, atol=1e-9)
    assert math.isnan(KernelEvolution(model, x).measure()["kernel_target_alignment"])


@pytest.mark.parametrize("output", ["full", "diagonal"])
def test_kernel_evolution_multi_output(output):
    torch.manual_seed(0)
    model = MLP(3, [8], 2, activation="tanh").double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    lens = KernelEvolution(model, x, y, output=output, method="jacobian")
    assert lens.measure()["kernel_distance"] == pytest.approx(0.0, abs=1e-12)
    full0 = telescope.ntk(model, x, method="jacobian", output="full")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    row = lens.measure()
    full = telescope.ntk(model, x, method="jacobian", output="full")
    if output == "diagonal":  # keep only o == o'
        mask = torch.eye(2, dtype=torch.float64)
        full, full0 = full * mask, full0 * mask
    m, m0 = (k.permute(0, 2, 1, 3).reshape(10, 10) for k in (full, full0))
    assert row["kernel_distance"] == pytest.approx(kernel_distance(m, m0), rel=1e-8)
    assert row["kernel_trace"] == pytest.approx(float(m.trace()), rel=1e-9)
    assert row["kernel_target_alignment"] == pytest.approx(
        kernel_target_alignment(m, y.reshape(-1)), rel=1e-8)
