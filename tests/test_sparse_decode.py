"""Sparse decode attention: the Triton kernel against the PyTorch reference, and the reference's delta."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stem_cli.kernels import decode_reference as ref

from stem_cli.decode.common import dropped_from_probs, softmax_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_selection(batch, hkv, t, width, seed, *, valid=None, empty_row=False):
    """Distinct positions per row in random order, -1 pads scattered, ragged counts."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((batch, hkv, width), -1, dtype=torch.long)
    counts = torch.zeros(batch, hkv, dtype=torch.long)
    for b in range(batch):
        pool = torch.arange(t) if valid is None else valid[b].nonzero().squeeze(1)
        for h in range(hkv):
            n = int(torch.randint(1, min(width, len(pool)) + 1, (1,), generator=g))
            chosen = pool[torch.randperm(len(pool), generator=g)[:n]]
            slots = torch.randperm(width, generator=g)[:n].sort().values
            idx[b, h, slots] = chosen
            if float(torch.rand(1, generator=g)) < 0.5:  # ragged: entries past the count hold garbage to ignore
                counts[b, h] = int(slots.max()) + 1
                idx[b, h, counts[b, h]:] = torch.randint(0, t, (width - int(counts[b, h]),), generator=g)
            else:
                counts[b, h] = width
    if empty_row:
        idx[0, 0] = -1
    return idx, counts


# batch, hq, hkv, t, d, width, splits
KERNEL_CASES = [
    (1, 4, 1, 50, 16, 24, None),
    (2, 6, 2, 97, 32, 40, 3),  # GQA 3, batch 2, several splits (second pass combines them)
    (2, 8, 8, 33, 64, 33, 2),  # no GQA
    (1, 2, 1, 130, 48, 128, None),  # head dim not a power of two
    (1, 8, 2, 400, 32, 300, 40),  # more splits than one pass-2 tile (COMBINE_TILE): tiles folded, some empty
]


@pytest.mark.parametrize("fused", [True, False])  # pass 2 in pass 1's launch (tickets), or its own launch
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_decode_kernel_matches_reference(case, fused, monkeypatch):
    pytest.importorskip("triton")
    from stem_cli.kernels import sparse_decode as kernel

    monkeypatch.setattr(kernel, "FUSED_COMBINE", fused)

    batch, hq, hkv, t, d, width, splits = case
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(batch, hq, 1, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(batch, hkv, t, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    idx, counts = random_selection(batch, hkv, t, width, seed, empty_row=(batch == 2))
    out, lse = kernel.sparse_decode_attention(q, k, v, idx.to(DEVICE), counts.to(DEVICE), scale=0.3, return_lse=True, splits=splits)
    want, want_lse = ref.sparse_decode_attention(q.double(), k.double(), v.double(), idx.to(DEVICE), counts.to(DEVICE), scale=0.3, return_lse=True)
    assert out.shape == q.shape and not torch.isnan(out).any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    has = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), has)
    torch.testing.assert_close(lse[has].double(), want_lse[has], rtol=tol, atol=tol)
    if batch == 2:  # the emptied row: zeros for its whole GQA group
        assert (out[0, : hq // hkv] == 0).all()
    if fused:  # every launch leaves its counters at zero (a CUDA graph replays them)
        assert (kernel._tickets(torch.device(DEVICE), batch * hkv) == 0).all()


def test_kernel_reads_a_strided_cache_view():
    """The cache is a slice of a preallocated buffer (as in the decode profiler)."""
    pytest.importorskip("triton")
    from stem_cli.kernels import sparse_decode as kernel

    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    buf_k, buf_v = (torch.randn(1, 2, 80, 16, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = buf_k[:, :, :61], buf_v[:, :, :61]
    q = torch.randn(1, 4, 1, 16, generator=g).to(DEVICE, dtype)
    idx = torch.tensor([[[0, 5, 60, -1, 33], [59, 58, -1, -1, 1]]], device=DEVICE)
    out = kernel.sparse_decode_attention(q, k, v, idx, scale=0.25)
    want = ref.sparse_decode_attention(q.double(), k.double(), v.double(), idx, scale=0.25)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), t=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.1, 8.0), padded=st.booleans(),
)
def test_delta_is_total_variation_distance(batch, hkv, group, t, seed, temperature, padded):
    """delta (mass of the dropped positions) == TV(renormalised sparse, dense) for any selection."""
    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(batch, hkv * group, d, generator=g, dtype=torch.float64) * temperature
    k = torch.randn(batch, hkv, t, d, generator=g, dtype=torch.float64)
    valid = None
    if padded:
        start = torch.randint(0, t - 1, (batch,), generator=g)
        valid = torch.arange(t)[None, :] >= start[:, None]
    idx, counts = random_selection(batch, hkv, t, t, seed, valid=valid)
    delta = ref.dropped_mass(q, k, idx, counts, valid, scale=0.5)
    tv = ref.total_variation(q, k, idx, counts, valid, scale=0.5)
    torch.testing.assert_close(delta, tv, rtol=1e-9, atol=1e-12)
    assert ((delta >= 0) & (delta <= 1)).all()
    # The selectors' own delta (summed probabilities of the dropped positions) agrees.
    used = ref.used_entries(idx, counts, t)
    p = softmax_rows(ref.full_logits(q, k, valid, scale=0.5))
    mine = dropped_from_probs(p, torch.where(used, idx, torch.full_like(idx, -1))).reshape(batch, -1)
    torch.testing.assert_close(mine, delta, rtol=1e-9, atol=1e-12)


def test_dense_reference_equals_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 16, generator=g, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    out = ref.dense_decode_attention(q, k, v, valid, scale=0.2)
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    s = (q @ kr.transpose(-1, -2)) * 0.2
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ vr)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kernel_without_counts_reads_whole_rows_of_either_index_dtype(index_dtype):
    """counts=None (what the decode runtime passes): every entry of a row, -1 pads skipped; the
    selectors' int64 rows are read as they are, with no conversion per call."""
    pytest.importorskip("triton")
    from stem_cli.kernels import sparse_decode as kernel

    g = torch.Generator().manual_seed(21)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(2, 6, 1, 32, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(2, 2, 120, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    idx = torch.stack([torch.randperm(120, generator=g)[:70] for _ in range(4)]).view(2, 2, 70)
    idx[0, 1, ::3] = -1
    idx[1, 0] = -1  # an empty row
    out = kernel.sparse_decode_attention(q, k, v, idx.to(DEVICE, index_dtype), scale=0.2, splits=2)
    want = ref.sparse_decode_attention(q.double(), k.double(), v.double(), idx.to(DEVICE), scale=0.2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert (out[1, :3] == 0).all()


@pytest.mark.parametrize("splits", [None, 3])
def test_kernel_without_indices_is_dense_split_k(splits):
    """indices=None: every cached position (flash-decoding split-K, the decode benchmark's dense kernel)."""
    pytest.importorskip("triton")
    from stem_cli.kernels import sparse_decode as kernel

    g = torch.Generator().manual_seed(22)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(2, 8, 1, 32, generator=g).to(DEVICE, dtype)
    buf_k, buf_v = (torch.randn(2, 2, 160, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = buf_k[:, :, :137], buf_v[:, :, :137]  # a strided view of a static cache
    out = kernel.sparse_decode_attention(q, k, v, None, scale=0.2, splits=splits)
    want = ref.dense_decode_attention(q.double(), k.double(), v.double(), scale=0.2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
