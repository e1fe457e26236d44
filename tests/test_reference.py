"""The reference Stem against brute force written independently here (loops, float64),
and the rule that keeps it an oracle: no production module imports it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem_cli.index import BlockIndex, block_pair_counts, causal_pairs, computed_pairs
from stem_cli.kernels import reference as ref

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand_qkv(batch, hq, hkv, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, generator=g, dtype=dtype)
    # Value norms spread over orders of magnitude so the value term matters.
    v = torch.randn(batch, hkv, n, d, generator=g, dtype=dtype) * torch.exp(torch.randn(batch, hkv, n, 1, generator=g, dtype=dtype))
    return q, k, v


def left_padding(batch, n, seed):
    g = torch.Generator().manual_seed(seed + 1)
    pads = torch.randint(0, n // 2, (batch,), generator=g)
    pads[0] = 0  # one unpadded sequence, as a real batch has
    return torch.arange(n)[None, :] >= pads[:, None]


# ---------------------------------------------------------------- brute force


def brute_block_logits(q, k, v, block, stride, beta, scale, valid):
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    p = math.ceil(n / block)
    npad = p * block
    nt = npad // stride
    logits = torch.full((batch, hq, p, p), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        vb = torch.zeros(npad, dtype=torch.bool)
        vb[:n] = valid[b]
        tile_ok = [bool(vb[t * stride : (t + 1) * stride].any()) for t in range(nt)]
        for h in range(hq):
            kv = h // group
            # value term for this (batch, kv head)
            norms = []
            for t in range(nt):
                vals = [float(v[b, kv, j].norm()) if j < n else 0.0 for j in range(t * stride, (t + 1) * stride)]
                norms.append(math.log(max(vals) + 1e-6))
            ok = [norms[t] for t in range(nt) if tile_ok[t]]
            mean = sum(ok) / len(ok)
            std = math.sqrt(sum((x - mean) ** 2 for x in ok) / len(ok))
            bonus = [beta * max(0.0, (norms[t] - mean) / (std + 1e-6)) if tile_ok[t] else 0.0 for t in range(nt)]
            for i in range(p):
                for j in range(i + 1):
                    total, count = 0.0, 0
                    for a in range(i * block // stride, (i + 1) * block // stride):
                        for c in range(j * block // stride, (j + 1) * block // stride):
                            if not (tile_ok[a] and tile_ok[c]):
                                continue
                            s = 0.0
                            for t in range(stride):
                                qi, ki = a * stride + stride - 1 - t, c * stride + t
                                if qi < n and ki < n:
                                    s += float(q[b, h, qi] @ k[b, kv, ki])
                            total += s * scale / stride + bonus[c]
                            count += 1
                    if count:
                        logits[b, h, i, j] = total / count
    return logits


def brute_select(logits, budget, first, sinks, window, rule="inside"):
    """Per row. inside: forced blocks, then the best others, max(budget, forced) in all;
    code: the budget best blocks, then the forced ones added."""
    batch, heads, p, _ = logits.shape
    rows = {}
    for b in range(batch):
        for h in range(heads):
            for i in range(p):
                cands = [j for j in range(i + 1) if logits[b, h, i, j] > float("-inf")]
                forced = {j for j in cands if (first[b] <= j < first[b] + sinks) or j > i - window or j == i}
                if rule == "code":
                    best = sorted(cands, key=lambda j: -float(logits[b, h, i, j]))[: int(budget[b, i])]
                    rows[b, h, i] = sorted(forced | set(best))
                    continue
                count = min(max(int(budget[b, i]), len(forced)), len(cands))
                others = sorted((j for j in cands if j not in forced), key=lambda j: -float(logits[b, h, i, j]))
                rows[b, h, i] = sorted(forced | set(others[: count - len(forced)]))
    return rows


def brute_attention(q, k, v, token_mask, scale):
    """Softmax over allowed keys, float64, one row at a time; rows with no key are zeros."""
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, n, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            for i in range(n):
                allowed = token_mask[b, h, i].nonzero().flatten()
                if len(allowed) == 0:
                    continue
                s = (k[b, h // group, allowed].double() @ q[b, h, i].double()) * scale
                w = torch.softmax(s, dim=0)
                out[b, h, i] = w @ v[b, h // group, allowed].double()
    return out


def token_mask_from(index: BlockIndex, valid, hq):
    blocks = index.to_mask()  # (B, H, P, P)
    blocks = blocks.repeat_interleave(hq // blocks.shape[1], dim=1)
    bs, n = index.block_size, index.seq_len
    tm = blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[:, :, :n, :n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return tm & causal & valid[:, None, None, :]


# ---------------------------------------------------------------- tests


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    group=st.sampled_from([1, 2, 3]),
    n=st.integers(9, 70),
    stride=st.sampled_from([2, 4]),
    beta=st.sampled_from([0.0, 0.2, 1.5]),
    padded=st.booleans(),
)
def test_block_logits_match_brute_force(seed, group, n, stride, beta, padded):
    batch, hkv, d, block = 2, 1, 4, 8
    q, k, v = rand_qkv(batch, hkv * group, hkv, n, d, seed)
    valid = left_padding(batch, n, seed) if padded else torch.ones(batch, n, dtype=torch.bool)
    got = ref.block_logits(q, k, v, block_size=block, stride=stride, beta=beta, scale=0.3, key_valid=valid, chunk_blocks=2)
    want = brute_block_logits(q, k, v, block, stride, beta, 0.3, valid)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    p=st.integers(1, 24),
    heads=st.integers(1, 3),
    sinks=st.integers(0, 5),
    window=st.integers(0, 5),
    k_start=st.integers(1, 30),
    mu=st.floats(0.05, 1.0),
    tpd=st.booleans(),
    padded=st.booleans(),
)
def test_selection_matches_brute_force(seed, p, heads, sinks, window, k_start, mu, tpd, padded):
    g = torch.Generator().manual_seed(seed)
    batch = 2
    first = torch.tensor([0, int(torch.randint(0, p, (1,), generator=g))]) if padded else torch.zeros(batch, dtype=torch.long)
    logits = torch.randn(batch, heads, p, p, generator=g)
    ids = torch.arange(p)
    allowed = (ids[None, :] <= ids[:, None])[None] & (ids[None, None, :] >= first[:, None, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    lengths = (p - first) * 8
    budget = ref.row_budgets(p, lengths, first, schedule="code", mu=mu, tpd=tpd, k_start=min(k_start, p))
    forced = ref.forced_blocks(p, first, sinks, window)
    index = ref.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule="inside")
    want = brute_select(logits, budget, first, sinks, window)
    code = ref.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule="code")
    for (b, h, i), blocks in brute_select(logits, budget, first, sinks, window, rule="code").items():
        c = int(code.counts[b, h, i])
        assert code.indices[b, h, i, :c].tolist() == blocks and (code.indices[b, h, i, c:] == -1).all()
        cands = max(0, i - int(first[b]) + 1)
        n_forced = len([j for j in range(first[b], i + 1) if j < first[b] + sinks or j > i - window or j == i])
        assert min(int(budget[b, i]), cands) <= c <= min(int(budget[b, i]) + n_forced, cands)
    for (b, h, i), blocks in want.items():
        c = int(index.counts[b, h, i])
        got = index.indices[b, h, i, :c].tolist()
        assert got == blocks, (b, h, i)
        assert (index.indices[b, h, i, c:] == -1).all()
        # properties the issue names
        assert all(j <= i for j in got) and got == sorted(set(got))
        cands = max(0, i - int(first[b]) + 1)
        n_forced = len([j for j in blocks if (first[b] <= j < first[b] + sinks) or j > i - window or j == i])
        assert c == min(max(int(budget[b, i]), n_forced), cands)
        if i >= first[b]:
            assert i in got  # the diagonal is always kept


@pytest.mark.parametrize("schedule", ["code", "paper"])
@given(p=st.integers(1, 1200), mu=st.floats(0.01, 1.0), k_scale=st.sampled_from([0.5, 1.0, 2.0]))
@settings(max_examples=60, deadline=None)
def test_schedule_properties(schedule, p, mu, k_scale):
    ks = ref.k_start_for(p, p * 128, schedule, k_scale)
    assert 1 <= ks <= p
    budget = ref.tpd_budget(p, ks, mu)
    assert (budget[:ks] == ks).all()
    assert ((budget >= 1) & (budget <= ks)).all()
    assert (budget[1:] <= budget[:-1]).all()  # non-increasing
    assert budget[-1] >= max(1, math.floor(mu * ks)) if p > ks else True
    uniform = ref.tpd_budget(p, ks, mu, tpd=False)
    assert (uniform == max(1, math.floor(ks * (1 + mu) / 2))).all()


def test_forced_rule_hand_checked():
    """One row i = 9 of 10 blocks, budget 3, sinks 2 (blocks 0, 1), window 2 (blocks 8, 9).
    Logits favour blocks 5, 4, 1, 3 in that order. Released code (rule code): the best 3
    {5, 4, 1}, then the forced {0, 1, 8, 9} on top: 6 blocks. Rule inside: the 4 forced
    blocks fill the row past its budget of 3: 4 blocks, none chosen by the metric."""
    p, i = 10, 9
    logits = torch.full((1, 1, p, p), float("-inf"))
    logits[0, 0, i, : i + 1] = torch.tensor([0.1, 0.7, 0.0, 0.5, 0.8, 0.9, 0.2, 0.3, 0.05, 0.0])
    budget = torch.full((1, p), 3)
    forced = ref.forced_blocks(p, torch.zeros(1, dtype=torch.long), 2, 2)
    assert forced[0, i].nonzero().flatten().tolist() == [0, 1, 8, 9]
    code = ref.select_topk(logits, budget, forced, block_size=16, seq_len=p * 16, rule="code")
    inside = ref.select_topk(logits, budget, forced, block_size=16, seq_len=p * 16, rule="inside")
    assert code.indices[0, 0, i, : code.counts[0, 0, i]].tolist() == [0, 1, 4, 5, 8, 9]
    assert inside.indices[0, 0, i, : inside.counts[0, 0, i]].tolist() == [0, 1, 8, 9]
    budget[0, i] = 6  # rule inside: the 2 best non-forced (5, 4) join the 4 forced
    inside = ref.select_topk(logits, budget, forced, block_size=16, seq_len=p * 16, rule="inside")
    assert inside.indices[0, 0, i, : inside.counts[0, 0, i]].tolist() == [0, 1, 4, 5, 8, 9]


def test_schedule_hand_checked():
    # released-code rule
    assert ref.k_start_for(40, 40 * 128, "code") == 40  # P < 56: dense
    assert ref.k_start_for(64, 8192, "code") == 42  # floor(0.2 * 64 + 30)
    assert ref.k_start_for(256, 32768, "code") == 55  # floor(25.6) + 30
    assert ref.k_start_for(1024, 131072, "code") == 132  # floor(102.4) + 30
    # paper text
    assert ref.k_start_for(64, 8192, "paper") == 12
    assert ref.k_start_for(256, 32768, "paper") == 25
    assert ref.k_start_for(64, 8192, "code", k_scale=0.5) == 21
    assert ref.tpd_budget(10, 4, 0.5).tolist() == [4, 4, 4, 4, 4, 3, 3, 2, 2, 2]


def test_bud_hand_checked():
    # N = 8, block 4: causal pairs 36; diagonal blocks only: 10 + 10
    diag = BlockIndex(torch.tensor([[[1, 1]]], dtype=torch.int32), torch.tensor([[[[0], [1]]]], dtype=torch.int32), 4, 8)
    pairs = block_pair_counts(None, 1, 8, 4)
    assert causal_pairs(pairs, 1) == 36
    assert computed_pairs(diag, pairs, 1) == 20
    # two leading pad tokens: valid tokens 2..7 -> 21 causal pairs; diagonal blocks: 3 + 10
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    pairs = block_pair_counts(valid, 1, 8, 4)
    assert causal_pairs(pairs, 1) == 21
    assert computed_pairs(diag, pairs, 1) == 13
    # N = 6 (a partial last block), one KV head serving 3 query heads
    pairs = block_pair_counts(None, 1, 6, 4)
    assert causal_pairs(pairs, 3) == 21 * 3
    assert computed_pairs(diag, pairs, 3) == (10 + 3) * 3


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    group=st.sampled_from([1, 3, 4]),
    n=st.integers(5, 50),
    block=st.sampled_from([4, 8, 16]),
    padded=st.booleans(),
    density=st.floats(0.0, 1.0),
    per_kv=st.booleans(),
)
def test_block_sparse_attention_matches_brute_force(seed, group, n, block, padded, density, per_kv):
    batch, hkv, d = 2, 2, 8
    q, k, v = rand_qkv(batch, hkv * group, hkv, n, d, seed)
    valid = left_padding(batch, n, seed) if padded else torch.ones(batch, n, dtype=torch.bool)
    p = math.ceil(n / block)
    g = torch.Generator().manual_seed(seed + 7)
    heads = hkv if per_kv else hkv * group
    blocks = (torch.rand(batch, heads, p, p, generator=g) < density) & torch.ones(p, p, dtype=torch.bool).tril()
    index = BlockIndex.from_mask(blocks, block, n)
    out, lse = ref.block_sparse_attention(q, k, v, index, scale=0.4, key_valid=valid, return_lse=True, chunk_rows=block)
    tm = token_mask_from(index, valid, hkv * group)
    want = brute_attention(q, k, v, tm, 0.4)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert not torch.isnan(out).any()
    assert torch.isneginf(lse[~tm.any(-1)]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,n,block", [(1, 37, 8), (3, 64, 16), (4, 100, 32), (8, 129, 16)])
def test_full_budget_equals_dense(dtype, group, n, block):
    """A Stem selection that covers every block gives dense attention (float64 oracle)."""
    batch, hkv, d = 2, 1, 16
    q, k, v = rand_qkv(batch, hkv * group, hkv, n, d, seed=int(torch.randint(0, 2**31, ())), dtype=dtype)
    valid = left_padding(batch, n, seed=n)
    p = math.ceil(n / block)
    logits = ref.block_logits(q, k, v, block_size=block, stride=4, beta=0.2, key_valid=valid)
    first = ref.first_valid_block(valid, batch, block, q.device)
    budget = ref.row_budgets(p, valid.sum(-1), first, schedule="code", mu=0.7, tpd=True, k_start=p)
    index = ref.select_topk(logits, budget, ref.forced_blocks(p, first, 4, 4), block_size=block, seq_len=n)
    assert not index.full
    out = ref.block_sparse_attention(q, k, v, index, scale=d**-0.5, key_valid=valid)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    tm = (causal & valid[:, None, None, :]).expand(batch, hkv * group, n, n)
    want = brute_attention(q.double(), k.double(), v.double(), tm, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------- the oracle stays outside production

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "stem_cli.kernels.reference"
PRODUCTION = ("stem_cli", "kernels", "tasks")  # package folders whose modules may not import the oracle
ALLOWED = {"kernels/reference.py"}  # the oracle itself


def imported_modules(tree: ast.AST, package: str = "") -> set[str]:
    """Every module an import statement anywhere in the tree (functions included) names,
    `from package import name` counted as package.name too; relative imports resolved
    against `package` (the importing module's package)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_of(name: str) -> str:
    """The installed package of a repository file: kernels/x.py -> stem_cli.kernels."""
    parts = name.removesuffix(".py").split("/")[:-1]
    return ".".join(["stem_cli", *parts] if parts[0] == "kernels" else parts)


def test_no_production_module_imports_the_reference():
    offenders = []
    for folder in PRODUCTION:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), filename=name)
            if name not in ALLOWED and REFERENCE in imported_modules(tree, package_of(name)):
                offenders.append(name)
    assert offenders == []


def test_import_scan_sees_function_level_imports():
    tree = ast.parse("def f():\n    from stem_cli.kernels import reference as ref\n")
    assert REFERENCE in imported_modules(tree)
    assert REFERENCE in imported_modules(ast.parse("import stem_cli.kernels.reference"))
    assert REFERENCE in imported_modules(ast.parse("from .reference import NEG_INF"), "stem_cli.kernels")
    assert REFERENCE in imported_modules(ast.parse("from ..kernels import reference"), "stem_cli.methods")
    assert REFERENCE not in imported_modules(ast.parse("from stem_cli.kernels import score"))
    assert package_of("kernels/block_sparse_attn.py") == "stem_cli.kernels" and package_of("stem_cli/methods/x.py") == "stem_cli.methods"
