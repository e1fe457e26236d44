"""FP8 attention error study (issue 17): the e4m3 quantisation variants of kernels/block_sparse_attn_fp8.py,
emulated in torch with the kernel's scaling, against float64 attention on the same block index.

    python -m tests.bench.fp8_error                           # CPU, < 3 min: random inputs + SmolLM2-135M activations
    python -m tests.bench.fp8_error --device cuda --lengths 8K,32K,128K --kernel   # the GPU: also the real kernel

Inputs: (a) random, as tests/bench/prefill.py makes them (q, k, v ~ N(0, 1), v times exp(N(0, 1)) per
token) on Stem's index; (b) real activations: Q, K, V of a few sparse layers of SmolLM2-135M on a RULER
needle prompt, captured through the attention hook (the model runs SDPA), each on the index Stem selects
for that layer. Each variant's output is compared with float64 attention over the bf16-rounded inputs (what the
kernel is given): ||o8 - o|| / ||o|| over all rows and heads, and the worst row's. The row "bf16" is the bf16
kernel itself (bf16 operands, P rounded to bf16), the floor the FP8 variants are measured against.

Emulation: e4m3 by torch's float8_e4m3fn cast (round to nearest even, as the GPU's conversion), scales in
float32 as the quantiser computes them, products of the e4m3 values accumulated in float64 (the kernel: fp32);
P from the row's final max (the kernel rounds P against the running max of its online softmax: the same
relative rounding, a slightly different subnormal threshold). --kernel runs the kernel itself on the same inputs
(on the CPU under TRITON_INTERPRET=1 only at small lengths: minutes per 1K).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from stem_cli.config import StemConfig
from stem_cli.index import BlockIndex
from stem_cli.units import format_length, parse_lengths

E4M3_MAX = 448.0
MODEL = "smollm2-135m"
RULER_TASK = "niah_single_2"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of rounding the kernel's operands (see kernels/block_sparse_attn_fp8.py for the kernel's math)."""

    name: str
    q_rows: int | None = None  # rows per Q scale: None = the index block; 1 = one scale per token
    k_rows: int | None = None  # rows per K scale, the same
    k_smooth: bool = False  # quantise K - mean_n K (softmax is invariant to the per-row constant q . kbar)
    q_smooth: bool = False  # quantise Q - mean_m Q, add the exact per-key term qbar . k_n to every logit
    v_smooth: bool = False  # quantise V - mean_n V, add mean_n V to the output (the weights sum to 1)
    v_channel: bool = False  # V's scale per (key block, channel) instead of per key block
    pv: str = "fp8"  # "fp8": P and V in e4m3; "bf16": P and V in bf16 (attn_fp8_qk); "fp32": exact P and V
    p_scale: float = 256.0  # P enters the dot as e4m3(p_scale p)
    bf16: bool = False  # the bf16 kernel: Q, K, V as given (bf16), P rounded to bf16
    rotate: bool = False  # quantise Q H and K H, H a random-sign Hadamard matrix (orthogonal: the logits are
    #                       unchanged; it spreads a channel's outliers over all d, FA3's incoherent processing)


VARIANTS = {v.name: v for v in [
    Variant("bf16", bf16=True),
    Variant("fp8 (per block)"),
    Variant("qk only: PV bf16", pv="bf16"),
    Variant("QK only: PV exact", pv="fp32"),
    Variant("Q per token", q_rows=1),
    Variant("K per 16 rows", k_rows=16),
    Variant("V per channel", v_channel=True),
    Variant("P scale 448", p_scale=E4M3_MAX),
    Variant("Q smooth (attn_dtype=fp8)", q_smooth=True),
    Variant("Q+V smooth", q_smooth=True, v_smooth=True),
    Variant("Q+K smooth", q_smooth=True, k_smooth=True),
    Variant("K smooth", k_smooth=True),
    Variant("K+V smooth", k_smooth=True, v_smooth=True),
    Variant("K+V smooth + Q per token", k_smooth=True, v_smooth=True, q_rows=1),
    Variant("Q+K+V smooth", q_smooth=True, k_smooth=True, v_smooth=True),
    Variant("K smooth + PV bf16", k_smooth=True, pv="bf16"),
    Variant("Hadamard", rotate=True),
    Variant("Q smooth + Hadamard", q_smooth=True, rotate=True),
    Variant("Q smooth + Hadamard + PV bf16", q_smooth=True, rotate=True, pv="bf16"),
]}


def hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """(d, d) float64 orthogonal: Sylvester's Hadamard matrix over sqrt(d), its rows times random signs."""
    if d & (d - 1):
        raise ValueError(f"head dim {d} is not a power of two: no Sylvester Hadamard matrix")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs[:, None] * h / math.sqrt(d)


def bf16_inputs(*xs: torch.Tensor) -> list[torch.Tensor]:
    """What the kernel is given: the tensors in bf16, as float64."""
    return [x.to(torch.bfloat16).double() for x in xs]


def quantize(x: torch.Tensor, rows: int, per_channel: bool = False) -> torch.Tensor:
    """x (B, H, N, d) float64 -> its e4m3 round trip s * e4m3(x / s), float64; s = amax / 448 in float32 per
    group of `rows` tokens (and per channel with per_channel), 1 for an all-zero group."""
    b, h, n, d = x.shape
    p = math.ceil(n / rows)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, p * rows - n)).view(b, h, p, rows, d)
    amax = xf.abs().amax(dim=3 if per_channel else (3, 4), keepdim=True)
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (xf / s).to(torch.float8_e4m3fn)
    return (x8.double() * s.double()).view(b, h, p * rows, d)[:, :, :n]


def round_p(p: torch.Tensor, p_scale: float) -> torch.Tensor:
    return (p.float() * p_scale).to(torch.float8_e4m3fn).double() / p_scale


def token_mask(index: BlockIndex, r0: int, r1: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H_index, r1 - r0, r1) bool for query rows [r0, r1) (r0 a multiple of the block): the index's blocks,
    causal, valid keys."""
    bs = index.block_size
    blocks = index.rows(r0 // bs, math.ceil(r1 / bs))  # (B, H, blocks of the rows, P)
    mask = blocks.repeat_interleave(bs, dim=-2)[..., : r1 - r0, :].repeat_interleave(bs, dim=-1)[..., :r1]
    pos = torch.arange(r1)
    mask = mask & (pos[None, :] <= pos[r0:r1, None])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :r1]
    return mask


def attention(q, k, v, index: BlockIndex, scale: float, variant: Variant | None = None, key_valid=None,
              chunk: int = 512) -> torch.Tensor:
    """Block-sparse causal attention (B, Hq, N, d) in float64 over float64 q, k, v; with a variant, over its
    rounded operands (the emulated kernel), without one exact (the reference)."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = index.block_size
    bias = None
    out_shift = 0.0
    if variant is not None and variant.bf16:
        q, k, v = (x.to(torch.bfloat16).double() for x in (q, k, v))
    elif variant is not None:
        if variant.k_smooth:
            k = k - k.float().mean(dim=2, keepdim=True).double()  # float32 mean, as torch.mean(k, dtype=float32)
        if variant.q_smooth:
            qbar = q.float().mean(dim=2, keepdim=True).double()
            q = q - qbar
            # The per-key term qbar . k_n (float32 in the kernel), one row per query head.
            bias = scale * (qbar @ k.repeat_interleave(group, dim=1).transpose(-1, -2)).float().double()  # (B, Hq, 1, N)
        if variant.v_smooth:
            vbar = v.float().mean(dim=2, keepdim=True).double()
            v = v - vbar
            out_shift = vbar.repeat_interleave(group, dim=1)
        if variant.rotate:  # (q H)(k H)^T = q k^T; the bias above used the unrotated q-bar and k (also invariant)
            rot = hadamard(d)
            q, k = q @ rot, k @ rot
        q = quantize(q, variant.q_rows or bs)
        k = quantize(k, variant.k_rows or bs)
        if variant.pv == "fp8":
            v = quantize(v, bs, per_channel=variant.v_channel)
        elif variant.pv == "bf16":
            v = v.to(torch.bfloat16).double()
    per_index_head = hq // index.num_heads
    out = torch.zeros(batch, hq, n, v.shape[-1], dtype=torch.float64)
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    chunk = max(bs, chunk // bs * bs)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        s = scale * (q[:, :, r0:r1] @ kr[:, :, :r1].transpose(-1, -2))
        if bias is not None:
            s = s + bias[..., :r1]
        mask = token_mask(index, r0, r1, key_valid)
        s = s.masked_fill(~mask.repeat_interleave(per_index_head, dim=1), -math.inf)
        top = s.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        p = torch.exp(s - top)
        l = p.sum(-1, keepdim=True)
        if variant is not None and variant.bf16:
            p = p.float().to(torch.bfloat16).double()
        elif variant is not None and variant.pv == "fp8":
            p = round_p(p, variant.p_scale)
        elif variant is not None and variant.pv == "bf16":
            p = p.float().to(torch.bfloat16).double()
        out[:, :, r0:r1] = torch.where(l > 0, (p @ vr[:, :, :r1]) / l.clamp_min(1e-300), 0.0)
    return out + out_shift


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got - want|| / ||want||, max over rows of ||got_m - want_m|| / ||want_m||)."""
    rel = float((got - want).norm() / want.norm())
    per_row = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-300)
    return rel, float(per_row.max())


# --------------------------------------------------------------------------- inputs


def random_case(n: int, shape: tuple[int, int, int], seed: int, config: StemConfig, device: str):
    """q, k, v as tests/bench/prefill.py makes them, and Stem's index on them."""
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed + n)
    q = torch.randn(1, hq, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g) * torch.randn(1, hkv, n, 1, generator=g).exp()
    return {"q": q, "k": k, "v": v, "index": stem_index(q, k, v, config, d**-0.5, device), "scale": d**-0.5,
            "key_valid": None}


def stem_index(q, k, v, config: StemConfig, scale: float, device: str) -> BlockIndex:
    from stem_cli.methods import stem

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    index = stem.select(*(x.to(device, dt) for x in (q, k, v)), layer=2, config=config, scale=scale, key_valid=None)
    return BlockIndex(index.counts.cpu(), index.indices.cpu(), index.block_size, index.seq_len)


class Capture:
    """Hook handler: keeps Q, K, V of `layers` of one pre-fill and Stem's index for each; SDPA does the attention."""

    def __init__(self, runtime, layers):
        self.runtime, self.layers, self.cases = runtime, set(layers), {}

    def attend(self, call):
        if call.kind == "prefill" and call.layer in self.layers:
            q, k, v = (x.detach().float().cpu() for x in (call.query, call.key, call.value))
            index = self.runtime.method.select(call.query, call.key, call.value, layer=call.layer, config=self.runtime.config,
                                               scale=call.scale, key_valid=call.key_valid)
            self.cases[call.layer] = {"q": q, "k": k, "v": v, "scale": call.scale, "key_valid": call.key_valid,
                                      "index": BlockIndex(index.counts.cpu(), index.indices.cpu(), index.block_size,
                                                          index.seq_len)}
        return None


def real_cases(n: int, layers, config: StemConfig, device: str) -> tuple[dict, dict]:
    """SmolLM2-135M's Q, K, V of `layers` on a RULER needle prompt of about n tokens: ({layer: case}, prompt info)."""
    from stem_cli.hook import handling
    from stem_cli.integration import build_runtime
    from stem_cli.models import load_model
    from stem_cli.tasks import ruler

    loaded = load_model(MODEL, device=device, dtype="fp32" if device == "cpu" else "bf16")
    model, tokenizer = loaded.model, loaded.tokenizer
    sample = ruler.build_sample(RULER_TASK, tokenizer, n, seed=0, index=0)
    runtime = build_runtime(model, "stem", config)
    capture = Capture(runtime, layers)
    ids = torch.tensor([sample.input_ids], device=next(model.parameters()).device)
    with handling(model, capture), torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return capture.cases, {"model": MODEL, "task": RULER_TASK, "tokens": len(sample.input_ids)}


# --------------------------------------------------------------------------- the study


def study(case: dict, variants) -> dict:
    q, k, v = bf16_inputs(case["q"], case["k"], case["v"])
    want = attention(q, k, v, case["index"], case["scale"], key_valid=case["key_valid"])
    return {name: errors(attention(q, k, v, case["index"], case["scale"], variant, case["key_valid"]), want)
            for name, variant in variants.items()}


def kernel_errors(case: dict, device: str) -> dict:
    """The real FP8 kernel (attn_dtype=fp8's default, other centrings, pv_fp8=False) against float64 attention."""
    from stem_cli.kernels import block_sparse_attn_fp8 as fp8

    q, k, v = bf16_inputs(case["q"], case["k"], case["v"])
    want = attention(q, k, v, case["index"], case["scale"], key_valid=case["key_valid"])
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    index = BlockIndex(case["index"].counts.to(device), case["index"].indices.to(device), case["index"].block_size,
                       case["index"].seq_len)
    got = {}
    for name, pv_fp8, smooth in (("kernel: attn_dtype=fp8 (smooth q)", True, "q"), ("kernel: smooth qkv", True, "qkv"),
                                 ("kernel: plain per block", True, ""), ("kernel: smooth q, pv_fp8=False", False, "q")):
        out = fp8.block_sparse_attention(*(x.to(device, dt) for x in (q, k, v)), index, scale=case["scale"], pv_fp8=pv_fp8,
                                         smooth=smooth)
        got[name] = errors(out.double().cpu(), want)
    return got


def merge(results: list[dict]) -> dict:
    """Per variant over several cases (layers): the root-mean-square relative error and the worst row."""
    names = results[0].keys()
    return {name: (math.sqrt(sum(r[name][0] ** 2 for r in results) / len(results)), max(r[name][1] for r in results))
            for name in names}


def print_table(columns: dict[str, dict]) -> None:
    names = list(next(iter(columns.values())).keys())
    width = max(map(len, names)) + 2
    print("variant".ljust(width) + "".join(f"{c:>26}" for c in columns))
    print(" " * width + "".join(f"{'rel err / worst row':>26}" for _ in columns))
    for name in names:
        cells = "".join(f"{f'{c[name][0]:.2%} / {c[name][1]:.2%}':>26}" if name in c else f"{'-':>26}"
                        for c in columns.values())
        print(name.ljust(width) + cells)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fp8_error", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4K", help="random-input lengths, e.g. 4K,32K (default 4K)")
    parser.add_argument("--real-length", default="4K", help="prompt tokens for the SmolLM2 activations (default 4K; 0: none)")
    parser.add_argument("--layers", default="2,8,15,22,29", help="SmolLM2 layers to capture (sparse ones: >= 2)")
    parser.add_argument("--shape", default="32/8/128", help="random inputs: query heads/KV heads/head dim")
    parser.add_argument("--variants", default="all", help="comma-separated variant names (the table's rows), or all")
    parser.add_argument("--kernel", action="store_true", help="also run the real FP8 kernel (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model and the index run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON of the table (default: profiles/fp8-error-<date>.json)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hq, hkv, d = (int(x) for x in args.shape.split("/"))
        lengths = parse_lengths(args.lengths) if args.lengths else []
        real_length = parse_lengths(args.real_length)[0] if args.real_length not in ("", "0") else 0
        layers = [int(x) for x in args.layers.split(",")]
        variants = VARIANTS if args.variants == "all" else {name: VARIANTS[name] for name in args.variants.split(",")}
    except (ValueError, KeyError) as exc:
        print(f"fp8_error: bad argument: {exc} (variants: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    if args.kernel and args.device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("fp8_error: --kernel on the CPU needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    config = StemConfig()
    columns, info = {}, {}
    t0 = time.perf_counter()
    for n in lengths:
        case = random_case(n, (hq, hkv, d), args.seed, config, args.device)
        result = study(case, variants)
        if args.kernel:
            result |= kernel_errors(case, args.device)
        columns[f"random {format_length(n)} {args.shape}"] = result
        print(f"random {format_length(n)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if real_length:
        cases, info = real_cases(real_length, layers, config, args.device)
        results = []
        for layer in layers:
            result = study(cases[layer], variants)
            if args.kernel:
                result |= kernel_errors(cases[layer], args.device)
            results.append(result)
            columns[f"{MODEL} L{layer}"] = result
        columns[f"{MODEL} {len(layers)} layers"] = merge(results)
        print(f"{MODEL} at {info['tokens']} tokens: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_table(columns)
    output = args.output or Path("profiles") / f"fp8-error-{time.strftime('%Y%m%d-%H%M%S')}-{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"argv": sys.argv, "prompt": info, "columns": columns}, indent=1))
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
