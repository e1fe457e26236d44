"""Block-sparse causal flash attention forward with FP8 (e4m3) operands: the FP8=True variant of
kernels/block_sparse_attn.py's kernel (one kernel, the dtype a constexpr), its math and its launcher.

The attention is the one of block_sparse_attn.py (see its docstring): for query row m
and its selected, causal, valid keys S(m), O[m] = sum_{n in S(m)} softmax_n(c q_m . k_n) v_n
with c the softmax scale. Only the operands of the two dots change.

Quantisation (kernels/fp8_quantize.py, run before this kernel): Q, K and V in e4m3 with one
float32 scale per (batch, head, index block t) of Bk rows (Bk = the index's block size, 128 by
default): s_t = amax_t |x| / 448, x ~= s_t x8, relative rounding <= 2^-4 for normal values.
Each BLOCK_M x BLOCK_N tile lies inside one query block i and one key
block j (tiles never cross an index block), so each tile has one scale per operand and the
scales leave the dots:

    logit(m, n) = c q_m . k_n ~= (c s^Q_i s^K_j) (q8_m . k8_n)     fp32 accumulation

one scalar multiply per tile, folded into the exponent's scale (base 2, log2 e included).
The online softmax then runs in fp32 exactly as in the bf16 kernel (running max, sum, rescale).

Centring (`smooth`, letters of "qkv"; attn_dtype=fp8 runs "q"): e4m3's error is relative to the value
rounded, and real queries and keys carry a large mean over tokens (SmolLM2-135M: the mean query and key
are 60-85% of a row's norm), so rounding q - qbar instead of q rounds far smaller numbers. With
qbar, kbar the (batch, head)'s channel means over the N tokens (float32; kbar = 0 unless "k"):

    c q_m . k_n = c (q_m - qbar) . (k_n - kbar) + c qbar . (k_n - kbar) + c q_m . kbar
                ~= (c s^Q_i s^K_j) (q~8_m . k~8_n) + b_n                      + (a constant of row m)

The first term is the tile's dot of the centred, quantised operands; b_n = c log2(e) qbar_h . (k_n - kbar)
(B, Hq, N) float32 from the unrounded K, computed once before the kernel, is added to the tile's logits
(KEY_BIAS: one BLOCK_N load and one add per logit); the row constant cancels in the softmax (the lse,
when returned, gets c q_m . kbar back). "v": V is quantised as V - vbar and, the weights summing to 1,
O = sum_n w_n (v_n - vbar) + vbar: the kernel adds l vbar to the accumulator before dividing by l.
All three keep the kernel one pass; what the study found (tests/bench/fp8_error.py): "q" halves the
error on SmolLM2's activations; "k" helps some layers and hurts others (RoPE rotates the keys, so their
mean is a poor centre for many); "v" changes nothing measurable; none helps on random inputs.

P and V (PV_FP8=True, what the executor runs): p = exp2(logit - running max) lies in [0, 1];
it enters the dot as e4m3 with the fixed scale 2^8 (a power of two, so the scaling itself is
exact: P 2^8 spans [0, 256], normals down to p = 2^-14, below that subnormals to 2^-17; smaller
weights round to 0, far under the output's resolution):

    acc += (s^V_j / 2^8) (rne_e4m3(2^8 p) . v8)     fp32 accumulation

and the running sum l takes the unrounded fp32 p (the normaliser carries no rounding error of
its own). V is stored transposed, (B, H, d, N), so both dots read their reduction dimension
contiguously, as Hopper's FP8 tensor-core instructions need. PV_FP8=False keeps P and V in
the input dtype (bf16) and quantises only Q and K: the benchmark times both.

Error (per element, relative, before accumulation): Q, K, V and P (centred or not) each carry <= 2^-4 rounding,
independent across elements, so the output's relative error is a few 2^-4 / sqrt(3) in RMS on
random data and smaller where few keys dominate (tests/bench/prefill.py measures it against
the bf16 kernel on the same index). Needs FP8 tensor cores: compute capability >= 8.9.
"""

from __future__ import annotations

import torch

from stem_cli.index import BlockIndex
from stem_cli.kernels.block_sparse_attn import INTERPRET, launch, launch_buffers
from stem_cli.kernels.fp8_quantize import channel_means, quantize_blocks

MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core dots: Ada (8.9) and Hopper (9.0) onward


def unsupported_reason(device: torch.device) -> str | None:
    """Why this kernel cannot run on `device` (no e4m3 tensor cores, or the CPU without the interpreter), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"FP8 attention needs e4m3 tensor cores (compute capability >= 8.9, e.g. Hopper's 9.0); "
                    f"this GPU has {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return f"FP8 attention runs on a CUDA GPU with compute capability >= 8.9 (or under TRITON_INTERPRET=1), not on {device.type}"


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    pv_fp8: bool = True,
    smooth: str = "q",
):
    """q (B, Hq, N, d), k/v (B, Hkv, N, d) bf16/fp16 -> (B, Hq, N, d) in q's dtype; index per query or KV head.

    Quantises Q, K (and V with pv_fp8) to e4m3 per (batch, head, index block), first centring the operands
    named in `smooth` on their channel means ("q", the default: Q, with the exact per-key term qbar.(k - kbar)
    added to the logits; "k", "v" likewise; "" the plain per-block variant), then runs the kernel;
    kv_start (B,) int: first valid key of each sequence (left padding).
    """
    n, d = q.shape[2:]
    reason = unsupported_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    if index.block_size < 32 and not INTERPRET:
        raise ValueError(f"block_size={index.block_size} is too small for FP8 dots: use a power of two >= 32")
    buffers = launch_buffers(q, index, scale, kv_start, return_lse, out)
    block = index.block_size
    if set(smooth) - set("qkv"):
        raise ValueError(f"smooth={smooth!r}: the operands to centre are letters of 'qkv' ('' for none)")
    k_mean = channel_means(k) if "k" in smooth else None
    q_mean = channel_means(q) if "q" in smooth else None
    key_bias = _key_bias(k, q_mean, k_mean, buffers[0]) if "q" in smooth else None
    q8, q_scales = quantize_blocks(q, block, mean=q_mean)
    k8, k_scales = quantize_blocks(k, block, mean=k_mean)
    v_mean = None
    if pv_fp8:
        smooth_v = "v" in smooth
        v_mean = channel_means(v) if smooth_v else torch.zeros(v.shape[0], v.shape[1], d, dtype=torch.float32, device=v.device)
        v_op, v_scales = quantize_blocks(v, block, transpose=True, mean=v_mean if smooth_v else None)
    else:
        v_op, v_scales = v, k_scales  # unused scales: any float32 (B, Hkv, P) tensor
    result = launch(q8, k8, v_op, (q_scales, k_scales, v_scales), index, buffers, n=n, d=d,
                    has_start=kv_start is not None, return_lse=return_lse, pv_fp8=pv_fp8, v_mean=v_mean,
                    key_bias=key_bias)
    if return_lse and k_mean is not None:  # the logits lost the row's constant c q_m . kbar
        _add_key_mean_logits(result[1], q, k_mean, buffers[0])
    return result


def _key_bias(k: torch.Tensor, q_mean: torch.Tensor, k_mean: torch.Tensor | None, scale: float) -> torch.Tensor:
    """(B, Hq, N) float32: c log2(e) qbar_h . (k_n - kbar), the logits' part that Q's centring takes out of the
    dot (kbar = K's centring mean, 0 when K is not centred; float32 from the unrounded K, one KV head at a time:
    a float32 copy of K is 0.5 GiB at 128K x 8 heads)."""
    batch, hkv, n, d = k.shape
    group = q_mean.shape[1] // hkv
    bias = torch.empty(batch, hkv, group, n, dtype=torch.float32, device=k.device)
    q_groups = q_mean.view(batch, hkv, group, d)
    for h in range(hkv):
        centred = k[:, h].float() if k_mean is None else k[:, h].float() - k_mean[:, h, None, :]
        bias[:, h] = torch.matmul(q_groups[:, h], centred.transpose(-1, -2))
    return bias.view(batch, hkv * group, n).mul_(scale * 1.4426950408889634)


def _add_key_mean_logits(lse: torch.Tensor, q: torch.Tensor, k_mean: torch.Tensor, scale: float) -> None:
    """lse (B, Hq, N) of the centred keys += c q_m . kbar: the lse of the keys as given (one head at a time:
    a float32 copy of all of q would be 2 GiB at 128K x 32 heads)."""
    group = q.shape[1] // k_mean.shape[1]
    for h in range(q.shape[1]):
        lse[:, h] += scale * (q[:, h].float() @ k_mean[:, h // group, :, None])[..., 0]
