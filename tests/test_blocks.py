"""The selection helpers the methods share (methods/blocks.py) against the reference oracle
(kernels/reference.py, itself checked against brute force in test_reference.py) and
against loops written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem_cli.kernels import reference as ref
from stem_cli.methods import blocks

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rows_of(index):
    """{(b, h, i): kept ids} of a BlockIndex, checking the PAD tail on the way."""
    out = {}
    for b in range(index.counts.shape[0]):
        for h in range(index.counts.shape[1]):
            for i in range(index.counts.shape[2]):
                c = int(index.counts[b, h, i])
                assert (index.indices[b, h, i, c:] == -1).all()
                out[b, h, i] = index.indices[b, h, i, :c].tolist()
    return out


# ---------------------------------------------------------------- budgets, forced blocks, top-k


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
def test_selection_matches_reference(seed, p, heads, sinks, window, k_start, mu, tpd, padded):
    g = torch.Generator().manual_seed(seed)
    batch = 2
    first = torch.tensor([0, int(torch.randint(0, p, (1,), generator=g))]) if padded else torch.zeros(batch, dtype=torch.long)
    logits = torch.randn(batch, heads, p, p, generator=g)
    ids = torch.arange(p)
    allowed = (ids[None, :] <= ids[:, None])[None] & (ids[None, None, :] >= first[:, None, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    lengths = (p - first) * 8
    budget = blocks.row_budgets(p, lengths, first, schedule="code", mu=mu, tpd=tpd, k_start=min(k_start, p))
    assert torch.equal(budget, ref.row_budgets(p, lengths, first, schedule="code", mu=mu, tpd=tpd, k_start=min(k_start, p)))
    forced = blocks.forced_blocks(p, first, sinks, window)
    assert torch.equal(forced, ref.forced_blocks(p, first, sinks, window))
    most = int(budget.max()) + sinks + window + 1
    for rule in ("code", "inside"):  # the released rule against the oracle; the other is pinned below
        index = blocks.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule=rule)
        bounded = blocks.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, max_count=most, rule=rule)
        assert torch.equal(bounded.counts, index.counts)
        k = index.indices.shape[-1]
        assert torch.equal(bounded.indices[..., :k], index.indices) and (bounded.indices[..., k:] == -1).all()
        assert rows_of(index) == rows_of(ref.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule=rule))
    assert blocks.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8).counts.equal(
        blocks.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule="code").counts)  # code is the default
    index = blocks.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule="inside")
    want = rows_of(ref.select_topk(logits, budget, forced, block_size=8, seq_len=p * 8, rule="inside"))
    for (b, h, i), got in rows_of(index).items():
        assert got == want[b, h, i], (b, h, i)
        # properties the issue names
        c = len(got)
        assert all(j <= i for j in got) and got == sorted(set(got))
        cands = max(0, i - int(first[b]) + 1)
        n_forced = len([j for j in got if (first[b] <= j < first[b] + sinks) or j > i - window or j == i])
        assert c == min(max(int(budget[b, i]), n_forced), cands)
        if i >= first[b]:
            assert i in got  # the diagonal is always kept


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(1, 90), block=st.sampled_from([1, 4, 16]), batch=st.integers(1, 3))
def test_first_valid_block_matches_reference(seed, n, block, batch):
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, n + 1, (batch,), generator=g)  # n: a sequence that is all padding
    valid = torch.arange(n)[None, :] >= pads[:, None]
    assert torch.equal(blocks.first_valid_block(valid, batch, block, "cpu"), ref.first_valid_block(valid, batch, block, "cpu"))
    assert torch.equal(blocks.first_valid_block(None, batch, block, "cpu"), ref.first_valid_block(None, batch, block, "cpu"))


@pytest.mark.parametrize("schedule", ["code", "paper"])
@given(p=st.integers(1, 1200), mu=st.floats(0.01, 1.0), k_scale=st.sampled_from([0.5, 1.0, 2.0]))
@settings(max_examples=60, deadline=None)
def test_schedule_properties(schedule, p, mu, k_scale):
    ks = blocks.k_start_for(p, p * 128, schedule, k_scale)
    assert ks == ref.k_start_for(p, p * 128, schedule, k_scale)
    assert 1 <= ks <= p
    budget = blocks.tpd_budget(p, ks, mu)
    assert torch.equal(budget, ref.tpd_budget(p, ks, mu))
    assert (budget[:ks] == ks).all()
    assert ((budget >= 1) & (budget <= ks)).all()
    assert (budget[1:] <= budget[:-1]).all()  # non-increasing
    assert budget[-1] >= max(1, math.floor(mu * ks)) if p > ks else True
    uniform = blocks.tpd_budget(p, ks, mu, tpd=False)
    assert torch.equal(uniform, ref.tpd_budget(p, ks, mu, tpd=False))
    assert (uniform == max(1, math.floor(ks * (1 + mu) / 2))).all()


def test_schedule_hand_checked():
    # released-code rule
    assert blocks.k_start_for(40, 40 * 128, "code") == 40  # P < 56: dense
    assert blocks.k_start_for(64, 8192, "code") == 42  # floor(0.2 * 64 + 30)
    assert blocks.k_start_for(256, 32768, "code") == 55  # floor(25.6) + 30
    assert blocks.k_start_for(1024, 131072, "code") == 132  # floor(102.4) + 30
    # paper text
    assert blocks.k_start_for(64, 8192, "paper") == 12
    assert blocks.k_start_for(256, 32768, "paper") == 25
    assert blocks.k_start_for(64, 8192, "code", k_scale=0.5) == 21
    assert blocks.tpd_budget(10, 4, 0.5).tolist() == [4, 4, 4, 4, 4, 3, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="unknown schedule"):
        blocks.k_start_for(64, 8192, "linear")


# ---------------------------------------------------------------- coverage


def greedy(values: list, threshold: float, forced: set) -> set:
    """Forced entries first, then by decreasing value while the mass kept before is below threshold * total."""
    total = sum(values[j] for j in range(len(values)))
    kept = set(forced)
    mass = sum(values[j] for j in kept)
    for j in sorted((j for j in range(len(values)) if j not in kept), key=lambda j: -values[j]):
        if mass < threshold * total:
            kept.add(j)
            mass += values[j]
    return kept


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 40),
    threshold=st.sampled_from([0.0, 0.3, 0.77, 0.95, 1.0]),
    with_forced=st.booleans(),
)
def test_coverage_keeps_the_fewest_entries_reaching_the_threshold(seed, m, threshold, with_forced):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(3, 2, m, generator=g, dtype=torch.float64) ** 3
    allowed = torch.rand(3, 1, m, generator=g) < 0.8  # broadcast over the middle dim
    forced = (torch.rand(3, 1, m, generator=g) < 0.15) if with_forced else None
    keep = blocks.coverage(mass, threshold, allowed, forced)
    assert keep.shape == mass.shape and keep.dtype == torch.bool
    for a in range(3):
        for c in range(2):
            ok = [j for j in range(m) if allowed[a, 0, j]]
            values = [float(mass[a, c, j]) if allowed[a, 0, j] else 0.0 for j in range(m)]
            want_forced = {j for j in ok if forced is not None and forced[a, 0, j]}
            if threshold >= 1:
                want = set(ok)
            else:
                want = greedy([values[j] for j in ok], threshold, {ok.index(j) for j in want_forced})
                want = {ok[t] for t in want}
            got = set(keep[a, c].nonzero().flatten().tolist())
            assert got == want, (a, c)


def test_coverage_count_is_the_fewest_reaching_the_threshold():
    mass = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert blocks.coverage(mass, 0.7, everything).sum(-1).tolist() == [2]  # 0.4 + 0.3
    assert blocks.coverage(mass, 0.71, everything).sum(-1).tolist() == [3]
    assert blocks.coverage(mass, 0.0, everything).sum(-1).tolist() == [0]
    assert blocks.coverage(mass, 1.0, everything).sum(-1).tolist() == [4]
    forced = torch.tensor([[True, False, False, False]])
    assert blocks.coverage(mass, 0.5, everything, forced).tolist() == [[True, True, False, False]]  # 0.1 counts first


# ---------------------------------------------------------------- valid masks


def test_valid_masks_by_hand():
    valid = torch.tensor([[True] * 10, [False] * 5 + [True] * 5])
    assert blocks.block_valid(valid, 4).tolist() == [[True, True, True], [False, True, True]]
    allowed = blocks.choosable(valid, 4)
    assert allowed.shape == (2, 1, 3, 3)
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert allowed[1, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert blocks.reachable_offsets(valid).sum(-1).tolist() == [10, 5]  # offsets 0..9, 0..4
    assert torch.equal(blocks.valid_keys(None, 2, 10, "cpu"), torch.ones(2, 10, dtype=torch.bool))
    x = torch.ones(1, 3, 2)
    assert blocks.pad_to(x, 3) is x
    assert blocks.pad_to(x, 5).tolist() == [[[1, 1], [1, 1], [1, 1], [0, 0], [0, 0]]]
