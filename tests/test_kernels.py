"""Triton kernels against the PyTorch reference (interpreter on CPU, native on GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref

pytest.importorskip("triton")
from stem_cli.kernels import block_sparse_attn as bsa  # noqa: E402
from stem_cli.kernels import block_sparse_attn_tma as bsa_tma  # noqa: E402
from stem_cli.kernels import block_sparse_attn_gqa as bsa_gqa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes in the input dtype on the CPU; float32 keeps the check tight there.
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]


def random_case(batch, hq, hkv, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=g) for h in (hq, hkv, hkv))
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def random_index(batch, heads, n, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    p = math.ceil(n / block)
    mask = torch.rand(batch, heads, p, p, generator=g) < density
    # Most rows keep their diagonal, as every selector does; some do not, as an index may.
    mask |= torch.eye(p, dtype=torch.bool) & (torch.rand(p, 1, generator=g) < 0.8)
    mask &= torch.ones(p, p, dtype=torch.bool).tril()
    if density == 0.0:
        mask[:] = False  # rows with no block at all: output must be zeros
    return BlockIndex.from_mask(mask, block, n)


CASES = [
    # batch, hq, hkv, n, d, block, density, padded
    (1, 2, 2, 64, 16, 16, 1.0, False),
    (2, 3, 1, 77, 32, 16, 0.5, True),
    (1, 4, 1, 100, 64, 32, 0.3, False),
    (2, 8, 1, 50, 16, 16, 0.7, True),
    (1, 2, 1, 40, 16, 16, 0.0, False),
    (1, 2, 2, 96, 128, 32, 0.6, False),
    (1, 1, 1, 33, 256, 16, 1.0, False) if DEVICE == "cuda" else (1, 1, 1, 33, 48, 16, 1.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_kv", [False, True])
@pytest.mark.parametrize("kernel", [bsa, bsa_tma], ids=["pointers", "descriptors"])
def test_block_sparse_attention_matches_reference(case, dtype, per_kv, kernel):
    batch, hq, hkv, n, d, block, density, padded = case
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = random_case(batch, hq, hkv, n, d, dtype, seed)
    index = random_index(batch, hkv if per_kv else hq, n, block, density, seed)
    start = None
    valid = None
    if padded:
        start = torch.randint(0, n // 2, (batch,))
        start[0] = 0
        valid = (torch.arange(n)[None, :] >= start[:, None]).to(DEVICE)
    poison = torch.full_like(q, float("nan"))
    if kernel is bsa_tma and not bsa_tma.supported(q, k, v):
        pytest.skip("tensor descriptors need a power-of-two head dim and compute capability >= 9")
    out, lse = kernel.block_sparse_attention(q, k, v, index, scale=0.3, kv_start=start, return_lse=True, out=poison)
    want, want_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index, scale=0.3, key_valid=valid, return_lse=True)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.float() - want).norm() / want.norm().clamp_min(1e-6)
    assert err < tol, err
    has = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), has)
    torch.testing.assert_close(lse[has], want_lse[has].float(), rtol=tol, atol=tol)
    assert (out[~has.unsqueeze(-1).expand_as(out)] == 0).all()  # masked rows are zeros



@pytest.mark.parametrize("kernel", [bsa, bsa_gqa], ids=["per-head", "gqa-packed"])
def test_prompts_of_many_lengths_compile_the_attention_kernel_once(kernel, kernel_variants):
    """An evaluation's prompts differ in length: N and the strides of the counts / block ids (from the block
    count p and the widest row K) change from prompt to prompt. The attention kernel's compiled variants over
    such prompts are its constexpr combinations only (block_sparse_attn.LENGTH_ARGS); specialising every int
    would have compiled several."""
    from tests.conftest import compiled_once_per_shape

    for n in (200, 208, 241, 256, 257, 290):
        q, k, v = random_case(1, 4, 2, n, 16, torch.float32, n)
        index = random_index(1, 2, n, 16, 0.5, n)
        kernel.block_sparse_attention(q, k, v, index, scale=0.3)
    name = "_block_sparse_attn_fwd" if kernel is bsa else "_gqa_packed_fwd"
    assert compiled_once_per_shape(kernel_variants, [name])
