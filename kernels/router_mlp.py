"""Elastic Attention's router for one layer in one launch (Triton): every KV head's mode from its pooled keys.

For sequence b (one program) and KV head h, from the pooled pre-RoPE keys x_h (2d values):

    u_h    = LN((x_h - mu_h) / sigma_h)                    LayerNorm without affine, eps 1e-5
    f_h    = W2 gelu(W1 u_h + b1) + b2 + e_h               gelu(t) = t / 2 (1 + erf(t / sqrt 2))
    c      = mean_h f_h
    z_h    = W4 gelu(W3 [f_h, c] + b3) + b4                (dense, stem, streaming) logits
    mode_h = argmax_m z_h,m                                 first maximum on ties, as torch.argmax

which is stem_cli/elastic/router.py's LayerRouter.forward, the PyTorch definition (and the
training path: it needs gradients). The heads are padded to 16 rows so that every matrix
product is a tl.dot, tiled BLOCK_O outputs x BLOCK_K inputs, in float32 with IEEE products
(TF32 would round the inputs to 10 bits and could flip a near-tied argmax). Between products
the rows (Hkv x H) go through the program's own scratch in global memory, behind a CTA
barrier: a register tile cannot be re-sliced along its inputs.

Why one launch: the module is about 15 small kernels per routed layer; on a GPU their launch
latency, not the arithmetic (0.2-4 MB of weights read per sequence), is the router's cost, the
seed's "about 0.2 ms per pre-fill" being a fused router's. One program per sequence is enough
work for that: the weights are read once per sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_MIN = 16  # tl.dot's smallest M
BLOCK_O = 64
BLOCK_K = 64
N_MODES = 3


@triton.jit
def _linear(In, s_in, W, Bias, Out, s_out, row_ok, n_in, n_out,
            GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out[r, :n_out] = act(In[r, :n_in] W^T + Bias) for the rows where row_ok; W (n_out, n_in) contiguous."""
    rows = tl.arange(0, ROWS)
    for o0 in range(0, n_out, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < n_out
        acc = tl.zeros([ROWS, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < n_in
            a = tl.load(In + rows[:, None] * s_in + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + offs_o[None, :] * n_in + offs_k[:, None], mask=o_ok[None, :] & k_ok[:, None], other=0.0)
            acc += tl.dot(a, w, input_precision="ieee")
        acc += tl.load(Bias + offs_o, mask=o_ok, other=0.0)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(Out + rows[:, None] * s_out + offs_o[None, :], acc, mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _router_modes(
    X, Mu, Sd, W1, B1, W2, B2, E, W3, B3, W4, B4, Scratch, Logits, Modes,
    n_heads, in_dim, hidden, scratch_size, eps,
    ROWS: tl.constexpr, IN_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, MODES_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_ok = rows < n_heads
    offs_i = tl.arange(0, IN_P)
    m2 = row_ok[:, None] & (offs_i < in_dim)[None, :]
    at = rows[:, None] * in_dim + offs_i[None, :]
    x = tl.load(X + b * n_heads * in_dim + at, mask=m2, other=0.0)
    mu = tl.load(Mu + at, mask=m2, other=0.0)
    sd = tl.load(Sd + at, mask=m2, other=1.0)
    u = tl.where(m2, (x - mu) / sd, 0.0)
    mean = tl.sum(u, 1) / in_dim
    centred = tl.where(m2, u - mean[:, None], 0.0)
    var = tl.sum(centred * centred, 1) / in_dim
    u = centred / tl.sqrt(var + eps)[:, None]

    two_h = 2 * hidden
    U = Scratch + b * scratch_size  # (ROWS, in_dim) | H1 (ROWS, H) | FC (ROWS, 2H) | G (ROWS, H)
    H1 = U + ROWS * in_dim
    FC = H1 + ROWS * hidden
    G = FC + ROWS * two_h
    tl.store(U + at, u, mask=m2)
    tl.debug_barrier()
    _linear(U, in_dim, W1, B1, H1, hidden, row_ok, in_dim, hidden, GELU=True, ROWS=ROWS, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K)
    tl.debug_barrier()
    _linear(H1, hidden, W2, B2, FC, two_h, row_ok, hidden, hidden, GELU=False, ROWS=ROWS, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K)
    tl.debug_barrier()
    for o0 in range(0, hidden, BLOCK_O):  # f += e_h; c = mean over heads, beside f: FC = [f, c]
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mo = row_ok[:, None] & (offs_o < hidden)[None, :]
        f = tl.load(FC + rows[:, None] * two_h + offs_o[None, :], mask=mo, other=0.0)
        f = tl.where(mo, f + tl.load(E + rows[:, None] * hidden + offs_o[None, :], mask=mo, other=0.0), 0.0)
        c = tl.sum(f, 0) / n_heads
        tl.store(FC + rows[:, None] * two_h + offs_o[None, :], f, mask=mo)
        tl.store(FC + rows[:, None] * two_h + hidden + offs_o[None, :], tl.broadcast_to(c[None, :], [ROWS, BLOCK_O]), mask=mo)
    tl.debug_barrier()
    _linear(FC, two_h, W3, B3, G, hidden, row_ok, two_h, hidden, GELU=True, ROWS=ROWS, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K)
    tl.debug_barrier()
    out = Logits + b * n_heads * 3
    _linear(G, hidden, W4, B4, out, 3, row_ok, hidden, 3, GELU=False, ROWS=ROWS, BLOCK_O=MODES_P, BLOCK_K=BLOCK_K)
    tl.debug_barrier()
    offs_m = tl.arange(0, 4)
    z = tl.load(out + rows[:, None] * 3 + offs_m[None, :], mask=row_ok[:, None] & (offs_m < 3)[None, :], other=float("-inf"))
    best = tl.max(z, 1)
    mode = tl.min(tl.where(z == best[:, None], offs_m[None, :], 4), 1)
    tl.store(Modes + b * n_heads + rows, mode.to(tl.int64), mask=row_ok)


def router_modes(layer_router, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_router: a stem_cli.elastic.router.LayerRouter (float32, on the features' device); features
    (B, Hkv, 2d) -> (modes (B, Hkv) int64, logits (B, Hkv, 3) float32), one launch."""
    lin1, lin2 = layer_router.feature[0], layer_router.feature[2]
    lin3, lin4 = layer_router.mode[0], layer_router.mode[2]
    batch, heads, in_dim = features.shape
    hidden = lin1.out_features
    if lin4.out_features != N_MODES or in_dim != lin1.in_features or heads != layer_router.head_embedding.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} do not fit the router (Hkv {layer_router.head_embedding.shape[0]}, "
                         f"2d {lin1.in_features}, {lin4.out_features} modes)")
    x = features.to(torch.float32).contiguous()
    rows = max(ROWS_MIN, triton.next_power_of_2(heads))
    scratch_size = rows * (in_dim + 4 * hidden)
    scratch = torch.empty(batch * scratch_size, dtype=torch.float32, device=x.device)
    logits = torch.empty(batch, heads, N_MODES, dtype=torch.float32, device=x.device)
    modes = torch.empty(batch, heads, dtype=torch.int64, device=x.device)
    params = [t.detach().to(torch.float32).contiguous() for t in (
        layer_router.feature_mean, layer_router.feature_std, lin1.weight, lin1.bias, lin2.weight, lin2.bias,
        layer_router.head_embedding, lin3.weight, lin3.bias, lin4.weight, lin4.bias)]
    _router_modes[(batch,)](
        x, *params, scratch, logits, modes, heads, in_dim, hidden, scratch_size, layer_router.norm.eps,
        ROWS=rows, IN_P=triton.next_power_of_2(in_dim), BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K, MODES_P=16, num_warps=4,
    )
    return modes, logits
