"""The Triton TPD top-k selection (kernels/tpd_select.py) against the torch selection and the oracle."""

from __future__ import annotations

import pytest
import torch

from stem_cli.config import ConfigError, StemConfig
from stem_cli.kernels import reference as ref
from stem_cli.methods import blocks, score
from stem_cli.methods import stem as stem_method

pytest.importorskip("triton")
from stem_cli.kernels import tpd_select  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_logits(batch, heads, p, first, gen, ties=False):
    """Block logits with -inf outside the causal, valid blocks; distinct values unless `ties`."""
    x = torch.randn(batch, heads, p, p, generator=gen)
    if ties:
        x = (x * 2).round() / 2  # a handful of values: many ties at the k-th
    ids = torch.arange(p)
    fb = first[:, None, None, None]
    ok = (ids[None, :] <= ids[:, None])[None, None] & (ids[None, None, None, :] >= fb) & (ids[None, None, :, None] >= fb)
    return x.masked_fill(~ok, float("-inf"))


CASES = [
    # batch, heads, P, first blocks, sinks, window
    (1, 3, 23, [0], 4, 4),
    (2, 2, 40, [0, 7], 4, 4),
    (2, 1, 17, [3, 0], 1, 1),
    (1, 2, 9, [0], 0, 0),
]


@pytest.mark.parametrize("rule", ["code", "inside"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_torch_selection_and_oracle(case, rule):
    batch, heads, p, firsts, sink, window = case
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    first = torch.tensor(firsts)
    logits = random_logits(batch, heads, p, first, gen)
    # Budgets from none to more than the row holds, one block and all among them.
    budget = torch.randint(0, p + 3, (batch, p), generator=gen)
    budget[0, :3] = torch.tensor([1, p, 0])
    forced = blocks.forced_blocks(p, first, sink, window)
    width = p  # any bound >= the largest count gives the same layout to both
    want = blocks.select_topk(logits, budget, forced, block_size=16, seq_len=16 * p, max_count=width, rule=rule)
    got = tpd_select.select(logits.to(DEVICE), budget.to(DEVICE), first.to(DEVICE), sink_blocks=sink, window_blocks=window,
                            width=width, block_size=16, seq_len=16 * p, rule=rule)
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.indices.cpu(), want.indices)
    oracle = ref.select_topk(logits, budget, forced, block_size=16, seq_len=16 * p, rule=rule)
    assert torch.equal(got.to_mask().cpu(), oracle.to_mask())


@pytest.mark.parametrize("rule", ["code", "inside"])
def test_ties_go_to_the_lower_block_id_as_in_the_oracle(rule):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, heads, p = 2, 2, 30
    first = torch.tensor([0, 4])
    logits = random_logits(batch, heads, p, first, gen, ties=True)
    budget = torch.randint(1, p, (batch, p), generator=gen)
    forced = blocks.forced_blocks(p, first, 2, 3)
    got = tpd_select.select(logits.to(DEVICE), budget.to(DEVICE), first.to(DEVICE), sink_blocks=2, window_blocks=3,
                            width=p, block_size=16, seq_len=16 * p, rule=rule)
    oracle = ref.select_topk(logits, budget, forced, block_size=16, seq_len=16 * p, rule=rule)  # stable sort: lower id first
    assert torch.equal(got.to_mask().cpu(), oracle.to_mask())
    assert torch.equal(got.counts.cpu(), oracle.counts)


def test_narrow_width_pads_and_truncates_like_the_torch_selection():
    """A host bound on the count (the selector's budget + forced) sets the index width; slots past a row's count are PAD."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    p = 33
    first = torch.tensor([0])
    logits = random_logits(1, 2, p, first, gen)
    budget = torch.full((1, p), 3)
    forced = blocks.forced_blocks(p, first, 1, 2)
    want = blocks.select_topk(logits, budget, forced, block_size=32, seq_len=32 * p - 5, max_count=6)
    got = tpd_select.select(logits.to(DEVICE), budget.to(DEVICE), first.to(DEVICE), sink_blocks=1, window_blocks=2, width=6,
                            block_size=32, seq_len=32 * p - 5)
    assert got.indices.shape[-1] == 6 and (got.indices.cpu() == -1).any()
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.counts.cpu(), want.counts)


@pytest.mark.parametrize("rule", ["code", "inside"])
def test_stem_selector_kernel_path_equals_torch_path_with_left_padding(rule):
    """The selector on real pooled logits (batch 2, left padding, odd length): estimate_impl triton == torch."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, hq, hkv, n, d = 2, 4, 2, 333, 16
    q, k, v = (torch.randn(batch, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :70] = False
    base = StemConfig(block_size=16, k_start=5, forced_rule=rule)
    logits = score.block_logits(q, k, v, block_size=16, stride=8, beta=0.2, key_valid=valid)
    via_torch = stem_method.select_from_logits(logits, n, StemConfig(**{**base.__dict__, "estimate_impl": "torch"}), valid)
    via_kernel = stem_method.select_from_logits(logits.to(DEVICE), n, StemConfig(**{**base.__dict__, "estimate_impl": "triton"}),
                                                valid.to(DEVICE))
    assert torch.equal(via_kernel.counts.cpu(), via_torch.counts)
    assert torch.equal(via_kernel.indices.cpu(), via_torch.indices)


def test_estimate_path_is_said_and_checked(monkeypatch):
    assert stem_method.estimate_path(StemConfig(), torch.device("cpu")) == "torch"  # auto on the CPU
    assert stem_method.estimate_path(StemConfig(estimate_impl="torch"), torch.device("cuda")) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="estimate_impl='triton' needs a CUDA device"):
        stem_method.estimate_path(StemConfig(estimate_impl="triton"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="estimate_impl='fast' is not allowed"):
        StemConfig(estimate_impl="fast")


SCORE_CASES = [
    # batch, hq, hkv, n, d, block, stride, beta, padded
    (1, 3, 1, 300, 16, 16, 8, 0.2, False),
    (2, 4, 1, 201, 32, 16, 4, 0.2, True),
    (1, 8, 1, 130, 64, 32, 8, 0.0, False),
    (2, 2, 2, 97, 16, 16, 8, 0.5, True),
]


@pytest.mark.parametrize("case", SCORE_CASES)
def test_fused_block_scores_match_the_float64_reference(case):
    """kernels/block_scores.py via score.block_logits(impl='triton') == the tile-by-tile oracle (float64 inputs)."""
    batch, hq, hkv, n, d, block, stride, beta, padded = case
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v = (torch.randn(batch, h, n, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    v = v * torch.randn(batch, hkv, n, 1, generator=gen, dtype=torch.float64).exp()  # value norms that vary
    valid = None
    if padded:
        valid = torch.ones(batch, n, dtype=torch.bool)
        valid[-1, : n // 3] = False
    args = dict(block_size=block, stride=stride, beta=beta, scale=0.7 / d**0.5, key_valid=valid)
    want = ref.block_logits(q, k, v, **args)
    got = score.block_logits(*(x.to(DEVICE) for x in (q, k, v)), **{**args, "key_valid": None if valid is None else valid.to(DEVICE)},
                             impl="triton").cpu()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) and not got.isnan().any()
    finite = torch.isfinite(want)
    assert (got[~finite] == float("-inf")).all()
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=1e-5, atol=1e-5)
