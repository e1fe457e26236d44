"""The executor's CPU path (masked SDPA over the index's blocks) against the reference oracle."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stem_cli.executor import attend, masked_sdpa
from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1, 4, 4), (2, 6, 2), (1, 9, 3), (2, 8, 1)]),
    n=st.integers(1, 200),
    block=st.sampled_from([16, 32]),
    per_kv=st.booleans(),
    padded=st.booleans(),
    density=st.floats(0.0, 1.0),
    chunk=st.sampled_from([1, 4000, 1 << 26]),
)
def test_masked_sdpa_equals_reference(seed, shape, n, block, per_kv, padded, density, chunk):
    g = torch.Generator().manual_seed(seed)
    batch, hq, hkv = shape
    q, k, v = (torch.randn(batch, h, n, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    p = -(-n // block)
    mask = (torch.rand(batch, hkv if per_kv else hq, p, p, generator=g) < density) & torch.ones(p, p, dtype=torch.bool).tril()
    index = BlockIndex.from_mask(mask, block, n)  # rows may keep nothing: those give zeros
    key_valid = None
    if padded:
        key_valid = torch.ones(batch, n, dtype=torch.bool)
        key_valid[0, : int(torch.randint(0, n + 1, (1,), generator=g))] = False  # left padding, possibly all of it
    want = ref.block_sparse_attention(q, k, v, index, scale=0.35, key_valid=key_valid)
    got = masked_sdpa(q, k, v, index, scale=0.35, key_valid=key_valid, chunk_elements=chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attend(q, k, v, index, scale=0.35, key_valid=key_valid), want, rtol=1e-10, atol=1e-10)
