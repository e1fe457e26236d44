"""Pooled block logits (methods/score.py) against the tile-by-tile reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem_cli.kernels import reference as ref
from stem_cli.methods import score

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.bfloat16] if DEVICE == "cuda" else [torch.float64, torch.float32]


def random_case(batch, hq, hkv, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=g) for h in (hq, hkv, hkv))
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


SCORE_CASES = [
    # batch, hq, hkv, n, d, block, stride, beta, padded
    (1, 2, 1, 64, 16, 16, 4, 0.2, False),
    (2, 3, 1, 77, 32, 16, 2, 0.5, True),
    (1, 4, 2, 130, 16, 32, 8, 0.0, False),
    (2, 8, 1, 96, 64, 32, 4, 0.2, True),
    (1, 1, 1, 200, 16, 64, 16, 1.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCORE_CASES)
def test_block_logits_kernel_matches_reference(case, dtype):
    batch, hq, hkv, n, d, block, stride, beta, padded = case
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = random_case(batch, hq, hkv, n, d, dtype, seed)
    v = v * torch.exp(torch.randn(batch, hkv, n, 1, device=DEVICE)).to(dtype)  # spread value norms
    valid = None
    if padded:
        start = torch.randint(0, n // 2, (batch,))
        start[0] = 0
        valid = (torch.arange(n)[None, :] >= start[:, None]).to(DEVICE)
    got = score.block_logits(q, k, v, block_size=block, stride=stride, beta=beta, scale=0.2, key_valid=valid)
    want = ref.block_logits(q.double(), k.double(), v.double(), block_size=block, stride=stride, beta=beta, scale=0.2, key_valid=valid)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert not torch.isnan(got).any()
    finite = torch.isfinite(want)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2  # the reference computes in float32
    err = (got[finite].double() - want[finite].double()).norm() / want[finite].double().norm()
    assert err < tol, err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31), group=st.sampled_from([1, 2, 4]), n=st.integers(17, 300),
    block=st.sampled_from([16, 32, 64]), stride=st.sampled_from([2, 4, 8, 16]), beta=st.sampled_from([0.0, 0.2, 2.0]),
    pad=st.integers(0, 100),
)
def test_pooled_equals_tiles_property(seed, group, n, block, stride, beta, pad):
    q, k, v = random_case(2, 2 * group, 2, n, 16, torch.float64, seed)
    valid = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
    valid[1, : min(pad, n - 1)] = False
    got = score.block_logits(q, k, v, block_size=block, stride=stride, beta=beta, scale=0.25, key_valid=valid)
    want = ref.block_logits(q, k, v, block_size=block, stride=stride, beta=beta, scale=0.25, key_valid=valid)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=1e-5, atol=1e-5)
