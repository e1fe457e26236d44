"""The FP8 block-sparse kernel (kernels/block_sparse_attn_fp8.py) against float64 references.

On the CPU it runs under TRITON_INTERPRET=1, whose e4m3 dots are exact products of the
e4m3 values accumulated in float32 (what the tensor cores compute), so the kernel itself is
tested, not an emulation. Tolerances follow from e4m3's precision (3 mantissa bits: relative
rounding <= 2^-4 for normals; absolute <= 2^-10 s below the smallest normal 2^-6 s).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref

pytest.importorskip("triton")
from stem_cli.kernels import block_sparse_attn_fp8 as fp8  # noqa: E402
from stem_cli.kernels.fp8_quantize import channel_means, quantize_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = fp8.unsupported_reason(torch.device(DEVICE)) is None
needs_kernel = pytest.mark.skipif(not RUNS_HERE, reason="FP8 dots need compute capability >= 8.9 or TRITON_INTERPRET=1")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
REL = 2.0**-4  # e4m3: relative rounding bound of a normal value
SUB = 2.0**-10  # e4m3: absolute rounding bound below the smallest normal, in units of the block scale


def element_bound(x: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """|x - dequant(x)| <= REL |x| + SUB s (either regime), per element, float64."""
    s = scales.double().repeat_interleave(block, dim=-1)[..., : x.shape[-2], None]
    return REL * x.double().abs() + SUB * s


def dequantize(x8: torch.Tensor, scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return (x8.double() * scales.double().repeat_interleave(block, dim=-1)[..., None])[..., :n, :]


@needs_kernel
@pytest.mark.parametrize("n,block,d,transpose,center", [(77, 16, 24, False, False), (128, 32, 24, True, False),
                                                        (33, 16, 24, True, True), (77, 16, 24, False, True),
                                                        (300, 128, 128, False, False), (300, 128, 128, True, True)])  # 128 x 128: two row chunks
def test_quantize_blocks_matches_float64_scales_and_round_trip_bound(n, block, d, transpose, center):
    """Scales, round trip and padding of the e4m3 quantiser; with `center`, of x minus its channel means
    (channel outliers: a mean of +-20 on a few channels, what K smoothing takes out)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(2, 3, n, d, generator=g) * torch.randn(2, 3, n, 1, generator=g).exp()
    x[0, 1, :block] = 0.0  # an all-zero block: scale 1, values 0, no NaN
    mean = None
    if center:
        x[..., :3] += 20.0 * torch.randn(2, 3, 1, 3, generator=g).sign()
        mean = channel_means(x.to(DEVICE))
        torch.testing.assert_close(mean.cpu().double(), x.double().mean(dim=2), rtol=0, atol=1e-5)
        x[0, 1, :block] = mean[0, 1].cpu()  # a block of rows equal to the mean: zeros once centred
    x8, scales = quantize_blocks(x.to(DEVICE), block, transpose=transpose, mean=mean)
    if center:
        x = x - mean.cpu()[:, :, None, :]  # what was rounded (the test of the mean itself is above)
    p = math.ceil(n / block)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == (2, 3, p * block, d) and scales.shape == (2, 3, p)
    if transpose:  # stored (B, H, d, Npad): the key dimension is contiguous
        assert x8.stride(-2) == 1
    padded = torch.nn.functional.pad(x.double(), (0, 0, 0, p * block - n)).view(2, 3, p, block, d)
    amax = padded.abs().amax(dim=(-1, -2))
    want = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    torch.testing.assert_close(scales.cpu().double(), want, rtol=1e-6, atol=0)
    back = dequantize(x8.cpu(), scales.cpu(), block, n)
    err = (back - x.double()).abs()
    assert (err <= element_bound(x, scales.cpu(), block) * (1 + 1e-6)).all(), float(err.max())
    assert (x8.cpu().float()[..., n:, :] == 0).all()  # the padding rows are zeros
    # Each nonzero block's largest element maps to e4m3's largest value (the full range is used).
    assert torch.equal(x8.cpu().float().reshape(2, 3, p, block, d).abs().amax(dim=(-1, -2))[amax > 0],
                       torch.full_like(amax[amax > 0], 448.0, dtype=torch.float32))


def make_index(batch, heads, n, block, budget, seed):
    """Per row: the diagonal plus budget-1 random earlier blocks ('all' = every causal block)."""
    g = torch.Generator().manual_seed(seed)
    p = math.ceil(n / block)
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    if budget == "all":
        mask = causal.expand(batch, heads, p, p).clone()
    else:
        scores = torch.rand(batch, heads, p, p, generator=g).masked_fill(~causal, -1.0)
        scores = scores + 2.0 * torch.eye(p)  # the diagonal ranks first
        top = scores.topk(min(budget, p), dim=-1).indices
        mask = torch.zeros(batch, heads, p, p, dtype=torch.bool).scatter_(-1, top, True) & causal
    return BlockIndex.from_mask(mask, block, n)


CASES = [
    # batch, hq, hkv, n, d, block, budget, padded, smooth (the operands centred: "q" the default)
    (1, 2, 2, 77, 32, 16, 1, False, "q"),  # GQA 1, odd length, one block per row
    (2, 4, 1, 77, 16, 16, 2, True, "qkv"),  # GQA 4, left padding
    (1, 4, 1, 100, 64, 32, "all", False, "q"),  # GQA 4, every causal block
    (2, 2, 2, 50, 32, 16, 3, True, "kv"),
]


def run_case(case, pv_fp8, seed, outliers=(0.0, 0.0, 0.0)):
    """`outliers` (Q's, K's, V's): a channel mean of +- that on a quarter of the channels (real Q's and K's pattern)."""
    batch, hq, hkv, n, d, block, budget, padded, smooth = case
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, h, n, d, generator=g) for h in (hq, hkv))
    v = torch.randn(batch, hkv, n, d, generator=g) * torch.randn(batch, hkv, n, 1, generator=g).exp()
    for x, size in zip((q, k, v), outliers):
        x[..., : d // 4] += size * torch.randn(batch, x.shape[1], 1, d // 4, generator=g).sign()
    index = make_index(batch, hq, n, block, budget, seed)
    start = valid = None
    if padded:
        start = torch.randint(0, n // 2, (batch,), generator=g)
        start[0] = 0
        valid = torch.arange(n)[None, :] >= start[:, None]
    dev = [x.to(DEVICE, DTYPE) for x in (q, k, v)]
    poison = torch.full_like(dev[0], float("nan"))
    out = fp8.block_sparse_attention(*dev, index, scale=d**-0.5, kv_start=None if start is None else start.to(DEVICE),
                                     out=poison, pv_fp8=pv_fp8, smooth=smooth)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    return [x.to(DTYPE).double() for x in (q, k, v)], index, valid, out.cpu().double()


def centred(x: torch.Tensor, on: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mu, mu) with mu the channel means the kernel subtracts (channel_means, itself tested against float64
    above) of the same tensor it is given, float64: the kernel's rounding is then reproduced exactly; mu = 0
    when not `on`."""
    mean = channel_means(x.to(DEVICE, DTYPE)).cpu().double()[:, :, None, :]
    return (x - mean, mean) if on else (x, torch.zeros_like(mean))


def logit_operands(q, k, block: int, smooth: str, group: int):
    """(q', k') with c q'.k' = the kernel's logits up to a per-row constant: the dequantised (centred) Q and K,
    and with "q" Q's mean beside them, times the unrounded K minus its centring mean (the per-key bias)."""
    n = q.shape[2]
    (qc, q_mean), (kc, _) = centred(q, "q" in smooth), centred(k, "k" in smooth)
    qd = dequantize(*quantize_blocks(qc, block), block, n)
    kd = dequantize(*quantize_blocks(kc, block), block, n)
    if "q" not in smooth:
        return qd, kd
    kc = kc.repeat_interleave(group, dim=1)  # the bias is per query head
    return torch.cat([qd, q_mean.expand_as(qd)], -1), torch.cat([kd.repeat_interleave(group, dim=1), kc], -1)


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_qk_fp8_is_exact_attention_over_the_dequantised_q_and_k(case):
    """pv_fp8=False: the only rounding is Q's and of the centred K's, so the kernel equals float64 attention on
    their dequantised values (K - mu instead of K: each row's logits move by the constant c q.mu, which the
    softmax takes out; interpreter: float32 V and P, float32 accumulation -> 1e-5)."""
    seed = int(torch.randint(0, 2**31, ()))
    (q, k, v), index, valid, out = run_case(case, False, seed, outliers=(3.0, 4.0, 2.0))
    block, group = index.block_size, q.shape[1] // k.shape[1]
    qd, kd = logit_operands(q, k, block, case[-1], group)
    vr = v.repeat_interleave(group, dim=1) if kd.shape[1] != k.shape[1] else v
    want = ref.block_sparse_attention(qd, kd, vr, index, scale=q.shape[-1] ** -0.5, key_valid=valid)
    tol = 1e-5 if DEVICE == "cpu" else 2e-2
    err = (out - want).norm() / want.norm()
    assert err < tol, float(err)


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_fp8_kernel_within_the_e4m3_bound_of_float64_attention(case):
    """The full FP8 path (Q, centred K and V, P in e4m3) against float64 attention on the original inputs, per element.

    With |dx| <= REL |x| + SUB s for Q, K - mu_K, V - mu_V (element_bound of what is rounded), every logit
    of row m moves (beyond the row's constant c q.mu_K) by at most D_m = c max_n sum_i (dq |k~| + |q| dk +
    dq dk), k~ = k - mu_K; the softmax weights then move by a factor within exp(+-2 D_m), so sum_n |w'_n - w_n|
    <= exp(2 D_m) - 1 times max|v~| (the weights sum to 1 on both sides, so mu_V cancels); V's rounding adds
    max|dv| and P's (relative 2^-4, absolute 2^-18 below e4m3's normals at the scale 2^8) 2^-4 + N 2^-18
    times max|v~'|."""
    seed = int(torch.randint(0, 2**31, ()))
    (q, k, v), index, valid, out = run_case(case, True, seed, outliers=(3.0, 4.0, 2.0))
    batch, hq, n, d = q.shape
    block, group, c, smooth = index.block_size, hq // k.shape[1], d**-0.5, case[-1]
    want = ref.block_sparse_attention(q, k, v, index, scale=c, key_valid=valid)
    # Q's centring leaves q.k exact (q~.k + qbar.k): the rounding is q~'s; K's and V's: a row constant, a shift.
    q, kc, vc = centred(q, "q" in smooth)[0], centred(k, "k" in smooth)[0], centred(v, "v" in smooth)[0]
    dq = element_bound(q, quantize_blocks(q, block)[1], block)
    dk = element_bound(kc, quantize_blocks(kc, block)[1], block).repeat_interleave(group, dim=1)
    dv = element_bound(vc, quantize_blocks(vc, block)[1], block)
    ka = kc.abs().repeat_interleave(group, dim=1)
    shift = c * (dq @ ka.transpose(-1, -2) + q.abs() @ dk.transpose(-1, -2) + dq @ dk.transpose(-1, -2))
    logit_bound = shift.amax(-1)  # (B, Hq, N): over all keys, a superset of each row's
    v_max = vc.abs().amax(dim=(-1, -2)).repeat_interleave(group, dim=1)[..., None]  # (B, Hq, 1)
    dv_max = dv.amax(dim=(-1, -2)).repeat_interleave(group, dim=1)[..., None]
    bound = (torch.expm1(2 * logit_bound) * v_max + dv_max + (REL + n * 2.0**-18) * (v_max + dv_max))[..., None]
    v_all = v.abs().amax(dim=(-1, -2)).repeat_interleave(group, dim=1)[..., None, None]
    fp32_slack = 1e-4 * v_all if DEVICE == "cpu" else 1e-2 * v_all
    err = (out - want).abs()
    assert (err <= bound + fp32_slack).all(), float((err - bound).max())
    # The bound is loose; the typical error is far under it (a few 2^-4 in relative norm on random data).
    assert (out - want).norm() / want.norm() < 0.15


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_p_rounding_is_the_only_error_over_dequantised_inputs(case):
    """Against float64 attention on the dequantised Q, K - mu_K and V - mu_V, plus mu_V, what remains is P's
    e4m3 rounding: per element |err| <= (2^-4 + N 2^-18) max|v~'| (a convex combination's weights each moved
    by <= 2^-4 relative or 2^-18 absolute), and, nearest-even rounding being unbiased, no bias: the
    least-squares slope of the output on the reference (mu_V taken out of both) is 1 within 1% (a wrong P
    or V scale is a bias; a V mean not added back, or added twice, fails the bound)."""
    seed = int(torch.randint(0, 2**31, ()))
    (q, k, v), index, valid, out = run_case(case, True, seed, outliers=(3.0, 4.0, 2.0))
    block, n, group = index.block_size, q.shape[2], q.shape[1] // k.shape[1]
    qd, kd = logit_operands(q, k, block, case[-1], group)
    vc, v_mean = centred(v, "v" in case[-1])
    vd = dequantize(*quantize_blocks(vc, block), block, n)
    v_max = vd.abs().amax(dim=(-1, -2)).repeat_interleave(group, dim=1)[..., None, None]
    if kd.shape[1] != k.shape[1]:  # per-query-head keys (Q's bias): values alike
        vd = vd.repeat_interleave(group, dim=1)
    want, lse = ref.block_sparse_attention(qd, kd, vd, index, scale=q.shape[-1] ** -0.5, key_valid=valid, return_lse=True)
    v_mean = torch.where(torch.isfinite(lse)[..., None], v_mean.repeat_interleave(group, dim=1), 0.0)  # rows with no key: 0
    want = want + v_mean
    slack = 1e-5 if DEVICE == "cpu" else 1e-2
    v_all = v.abs().amax(dim=(-1, -2)).repeat_interleave(group, dim=1)[..., None, None]
    assert ((out - want).abs() <= (REL + n * 2.0**-18) * v_max + slack * v_all).all()
    slope = float(((out - v_mean) * (want - v_mean)).sum() / (want - v_mean).square().sum())
    assert abs(slope - 1) < 0.01, slope


@needs_kernel
@pytest.mark.parametrize("smooth,outliers", [("k", (0.0, 24.0, 0.0))])
def test_smoothing_removes_the_error_of_channel_outliers(smooth, outliers):
    """K with a channel mean of +-24 on a quarter of its channels (real K's pattern: SmolLM2's mean key is
    50-80% of a key's norm): per-block e4m3 rounds those channels with an error of ~1 per element, which moves
    every logit by ~0.15 (c = 1/8) and the output by >= 11% (float64 emulation: 11-13% over 20 seeds); the
    centred K is rounded on its N(0, 1) part only: the random-input error of 4-5%. The bound between them.
    (Q outliers are no such test: qbar.k_n then spreads the logits so far that a few keys dominate and the
    plain variant's error stays at 6-8%; the SmolLM2 study, tests/bench/fp8_error.py, is Q smoothing's case.)"""
    seed = int(torch.randint(0, 2**31, ()))
    errors = {}
    for variant in ("", smooth):
        case = (1, 2, 1, 256, 64, 32, "all", False, variant)  # GQA 2, every causal block: 256 rows of a 64-wide head
        (q, k, v), index, valid, out = run_case(case, True, seed, outliers=outliers)
        want = ref.block_sparse_attention(q, k, v, index, scale=q.shape[-1] ** -0.5, key_valid=valid)
        errors[variant] = float((out - want).norm() / want.norm())
    assert errors[smooth] < 0.08 < errors[""], errors
