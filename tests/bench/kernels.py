"""Kernel benchmark: Stem's stages against dense SDPA and FlexAttention, in one GPU run.

    python -m tests.bench.kernels                      # from the repository root: the default sweep on a CUDA GPU
    python -m tests.bench.kernels --device cpu --smoke # tiny sizes, PyTorch reference, no GPU

A benchmark, not part of the package: it lives under tests/ (not installed) and
imports stem_cli, never the other way round. GPU times are triton.testing.do_bench
medians; CPU times (smoke mode) and the machine description come from stem_cli's own
timing and environment modules, as for every other JSON the tool writes.

For every head shape (query heads / KV heads / head dim) and sequence length N,
batch 1, bf16, random inputs, it times:
- Stem's stages: scoring (pooled block logits, stem_cli/methods/score.py), selection (TPD budget, forced
  blocks, top-k on the GPU logits, as methods/stem.py does it), block-sparse
  attention (Triton) on that index, and their sum;
- dense causal SDPA with the cuDNN and the FlashAttention backends;
- FlexAttention (torch.compile) given the very same block index,
and checks, before timing, that the Triton attention agrees with FlexAttention
and (at small N) that the pooled logits and the index chosen from them agree with
the float32 reference. A rich table goes to the terminal and every number, with
the GPU, versions and command line, to profiles/kernels-<date>-<gpu>.json.

Values that could not be measured are strings: "n/a (reason)", "OOM", or
"error: ..." for a failure of Stem's own stages (which also makes the exit code 1,
as does a failed correctness check).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from stem_cli.config import ConfigError, StemConfig
from stem_cli.environment import error_text, gpu_properties, is_oom, slug, software
from stem_cli.index import BlockIndex, block_pair_counts, causal_pairs, computed_pairs
from stem_cli.kernels import reference as ref
from stem_cli.methods.stem import select_from_logits
from stem_cli.nvml import NvmlSampler
from stem_cli.timing import Interval
from stem_cli.units import format_length, parse_lengths

DEFAULT_LENGTHS = "8K,16K,32K,64K,128K"
DEFAULT_SHAPES = "32/8/128,9/3/64,4/1/256"
# Smoke mode: sizes the PyTorch reference runs in seconds on a laptop CPU. Block 16
# makes P = 32 and 64 blocks, so the larger length is really sparse (the "code"
# schedule keeps every block below P = 56).
SMOKE_LENGTHS = "512,1K"
SMOKE_SHAPES = "4/2/32,2/1/64"
SMOKE_BLOCK_SIZE = 16
TARGET_SHAPE = "32/8/128"

ATTN_REL_TOL = 2e-2  # Triton vs FlexAttention, both bf16 with fp32 accumulation
SCORE_REL_TOL = 1e-2  # pooled bf16 logits vs float32 tile reference logits
NO_GPU = "n/a (no GPU)"

# Every metric a row carries; each starts as "n/a (not reached)" and a stage overwrites it.
ROW_METRICS = (
    "score_ms", "select_ms", "attn_ms", "stem_total_ms",
    "density", "bud", "computed_pairs", "causal_pairs", "attn_tflops",
    "cudnn_ms", "cudnn_tflops", "cudnn_note", "fa2_ms", "fa2_tflops", "fa2_note",
    "flex_ms", "flex_compile_s",
    "speedup_cudnn_over_stem", "speedup_flex_over_attn", "score_select_share",
    "check_attn_rel_err", "check_attn_ok",
    "check_score_rel_err", "check_score_inf_equal", "check_score_ok",
    "check_index_rows_identical", "check_index_rows_tie_explained", "check_index_ok",
)


def na(reason: str) -> str:
    return f"n/a ({reason})"


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Shape:
    hq: int
    hkv: int
    d: int

    @property
    def label(self) -> str:
        return f"{self.hq}/{self.hkv}/{self.d}"


def parse_shapes(text: str) -> list[Shape]:
    """"32/8/128,9/3/64" -> [Shape(32, 8, 128), Shape(9, 3, 64)]."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape {item!r}: use QHEADS/KVHEADS/HEADDIM, e.g. 32/8/128")
        hq, hkv, d = map(int, parts)
        if hq % hkv:
            raise ValueError(f"bad shape {item!r}: query heads ({hq}) must be a multiple of KV heads ({hkv})")
        shapes.append(Shape(hq, hkv, d))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.kernels",
        description="Time Stem's kernels (scoring, selection, sparse attention) against cuDNN, FlashAttention-2 "
        "and FlexAttention on one GPU; write a table and a JSON profile.",
    )
    parser.add_argument("--lengths", help=f"sequence lengths (default {DEFAULT_LENGTHS}; smoke {SMOKE_LENGTHS})")
    parser.add_argument("--shapes", help=f"QHEADS/KVHEADS/HEADDIM list (default {DEFAULT_SHAPES}; smoke {SMOKE_SHAPES})")
    parser.add_argument("--block-size", type=int, help=f"Stem block size (default StemConfig's; smoke {SMOKE_BLOCK_SIZE})")
    parser.add_argument("--stride", type=int, help="Stem antidiagonal stride (default StemConfig's)")
    parser.add_argument("--mu", type=float, help="Stem TPD decay (default StemConfig's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (needs --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check of the whole code path")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="GPU input dtype (CPU smoke uses float32)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up budget per measurement (ms)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench timing budget per measurement (ms)")
    parser.add_argument("--min-reps", type=int, default=3, help="timed calls at least, when one call outlasts --rep-ms")
    parser.add_argument("--check-max-n", default="16K", help="largest N at which the logits and index are checked against the reference")
    parser.add_argument(
        "--flex-mask", choices=("split", "partial"), default="split",
        help="how FlexAttention gets the index: 'split' = off-diagonal blocks as full blocks (no mask_mod) and the "
        "diagonal as partial (what create_block_mask would build); 'partial' = every block partial, mask_mod everywhere",
    )
    parser.add_argument("--skip", default="", help="comma list of baselines to leave out: cudnn, fa2, flex")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="profiles", help="folder for the JSON profile (default profiles/)")
    return parser


@dataclass
class Options:
    lengths: list[int]
    shapes: list[Shape]
    config: StemConfig
    device: str
    dtype: torch.dtype
    smoke: bool
    warmup_ms: float
    rep_ms: float
    min_reps: int
    check_max_n: int
    flex_mask: str
    skip: frozenset
    seed: int
    output: Path


def parse_options(argv: list[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("the CPU runs only the smoke mode (the reference at full sizes takes hours): add --smoke")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --smoke")
    skip = frozenset(s.strip() for s in args.skip.split(",") if s.strip())
    if skip - {"cudnn", "fa2", "flex"}:
        parser.error(f"--skip {args.skip!r}: use a comma list of cudnn, fa2, flex")
    try:
        lengths = parse_lengths(args.lengths or (SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS))
        shapes = parse_shapes(args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES))
        check_max_n = parse_lengths(args.check_max_n)[0]
        overrides = {"block_size": args.block_size, "stride": args.stride, "mu": args.mu}
        if args.smoke and args.block_size is None:
            overrides["block_size"] = SMOKE_BLOCK_SIZE
        config = dataclasses.replace(StemConfig(), **{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, ConfigError) as error:
        parser.error(str(error))
    if args.min_reps < 1 or args.rep_ms <= 0 or args.warmup_ms < 0:
        parser.error("--min-reps must be >= 1, --rep-ms > 0 and --warmup-ms >= 0")
    on_gpu = args.device == "cuda"
    return Options(
        lengths=lengths, shapes=shapes, config=config, device=args.device,
        dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if on_gpu else torch.float32,
        smoke=args.smoke, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=args.min_reps,
        check_max_n=check_max_n, flex_mask=args.flex_mask, skip=skip, seed=args.seed, output=Path(args.output),
    )


# --------------------------------------------------------------------------- timing and memory


def free_memory() -> None:
    """Drop what the last stage left so the next one has the whole GPU (128K x 32 heads needs it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timer:
    """Median milliseconds of fn(): triton's do_bench on the GPU, min_reps timed calls on the CPU."""

    device: str
    warmup_ms: float
    rep_ms: float
    min_reps: int

    def __call__(self, fn: Callable) -> float:
        return self._gpu(fn) if self.device == "cuda" else self._cpu(fn)

    def _once(self, fn: Callable) -> float:
        with Interval(torch.device(self.device)) as call:
            fn()
        return call.ms()

    def _gpu(self, fn: Callable) -> float:
        from triton.testing import do_bench

        # do_bench repeats fn for rep ms; when one call is longer (dense 128K takes
        # ~0.3 s) it would time a single call, so stretch rep to min_reps calls.
        rep = max(self.rep_ms, self.min_reps * self._once(fn))
        return float(do_bench(fn, warmup=self.warmup_ms, rep=rep, return_mode="median"))

    def _cpu(self, fn: Callable) -> float:
        return statistics.median([self._once(fn) for _ in range(self.min_reps)])


def run_and_time(fn: Callable, timer: Timer, device: str):
    """(result of a first, warming call — compiles and autotunes — , median ms of the later ones)."""
    result = fn()
    synchronize(device)
    return result, timer(fn)


def guarded(row: dict, key: str, fn: Callable, *, ours: bool):
    """Run one stage. On failure record "OOM", "error: ..." (Stem's own stages: a bug to
    fix, the traceback printed) or "n/a (...)" (a baseline refused the shape) under key;
    return None so that the stages depending on it are left "n/a"."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - one failing stage must not end a 6-minute sweep
        if is_oom(error):
            row[key] = "OOM"
        elif ours:
            row[key] = f"error: {error_text(error)}"
            traceback.print_exc()
        else:
            row[key] = na(error_text(error))
    # Outside the except block: the traceback no longer holds the stage's tensors.
    free_memory()
    return None


# --------------------------------------------------------------------------- Stem's stages


SCORE_IMPL = "pooled block means + one GEMM per head (torch, stem_cli/methods/score.py)"


@dataclass
class Kernels:
    score: Callable
    score_impl: str
    attn: Callable
    attn_impl: str


def load_kernels(device: str) -> Kernels:
    if device == "cpu":
        # Triton on the CPU would need TRITON_INTERPRET=1 and time the interpreter: meaningless.
        return Kernels(ref.block_logits, "reference (CPU)", ref.block_sparse_attention, "reference (CPU)")
    from stem_cli.executor import sparse_kernel
    from stem_cli.methods import score

    def attend(q, k, v, index, **kwargs):  # the kernel the executor would run for these tensors
        return sparse_kernel(q, k, v, index).block_sparse_attention(q, k, v, index, **kwargs)

    return Kernels(score.block_logits, SCORE_IMPL, attend, "triton (tensor descriptors at head dim 256, pointers otherwise; "
                   "GQA-packed for per-KV-head indices)")


def select_index(logits: torch.Tensor, seq_len: int, config: StemConfig) -> BlockIndex:
    """Stem's selection from block logits: exactly what methods/stem.py runs (per query head, no padding)."""
    return select_from_logits(logits, seq_len, config, None)


def make_inputs(shape: Shape, n: int, opts: Options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v (1, H, N, d); v scaled by exp(randn) per token so value norms vary
    (the Output-Aware term has something to see; all-equal norms would zero it)."""
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed + 7919 * n + shape.hq * 131 + shape.d)
    kw = {"device": opts.device, "dtype": opts.dtype, "generator": gen}
    q = torch.randn(1, shape.hq, n, shape.d, **kw)
    k = torch.randn(1, shape.hkv, n, shape.d, **kw)
    v = torch.randn(1, shape.hkv, n, shape.d, **kw)
    v.mul_(torch.randn(1, shape.hkv, n, 1, **kw).exp())
    return q, k, v


# --------------------------------------------------------------------------- correctness checks


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32, one head at a time (a float32 copy of 128K x 32 heads is 2 GiB)."""
    num = den = 0.0
    for h in range(a.shape[1]):
        x, y = a[:, h].float(), b[:, h].float()
        num += float((x - y).square().sum())
        den += float(y.square().sum())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def compare_logits(test: torch.Tensor, reference: torch.Tensor) -> dict:
    """Same -inf positions (and no NaN / +inf), relative error of the finite entries."""
    ok_test, ok_ref = torch.isfinite(test), torch.isfinite(reference)
    inf_equal = bool(torch.equal(ok_test, ok_ref)) and bool((test[~ok_test] == -math.inf).all())
    both = ok_test & ok_ref
    a, b = test[both].double(), reference[both].double()
    den = float(b.norm())
    rel = float((a - b).norm()) / den if den > 0 else (0.0 if float((a - b).norm()) == 0 else math.inf)
    return {"rel_err": rel, "inf_equal": inf_equal, "ok": inf_equal and rel < SCORE_REL_TOL}


def compare_indices(test_logits, ref_logits, test_index: BlockIndex, ref_index: BlockIndex) -> dict:
    """Fraction of (head, query block) rows whose selected blocks are identical, and of rows
    identical or differing only through near-ties.

    If the reference keeps x but not y and the test keeps y but not x, then ref[x] >= ref[y]
    and test[y] >= test[x], so ref[x] - ref[y] <= 2 max|test - ref| over the row: a swap
    wider than twice the row's logit error cannot come from rounding, and fails the check.
    """
    kept_ref, kept_test = ref_index.to_mask(), test_index.to_mask()
    only_ref, only_test = kept_ref & ~kept_test, kept_test & ~kept_ref
    identical = ~(only_ref | only_test).any(-1)
    finite = torch.isfinite(test_logits) & torch.isfinite(ref_logits)
    err = torch.where(finite, (test_logits - ref_logits).abs(), 0.0).amax(-1)
    highest_dropped = torch.where(only_ref, ref_logits, -math.inf).amax(-1)
    lowest_added = torch.where(only_test, ref_logits, math.inf).amin(-1)
    gap = highest_dropped - lowest_added
    near_tie = (gap <= 2 * err + 1e-6) & (test_index.counts == ref_index.counts)
    explained = identical | near_tie
    rows_identical = float(identical.float().mean())
    rows_explained = float(explained.float().mean())
    return {"rows_identical": rows_identical, "rows_explained": rows_explained, "ok": rows_explained == 1.0}


# --------------------------------------------------------------------------- FlexAttention


def flex_kv_blocks(index: BlockIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Stem's index in FlexAttention's layout: kv_num_blocks (B, H, P) int32 unchanged and
    kv_indices (B, H, P, P) int32, the -1 padding replaced by 0 (Flex reads only the first
    kv_num_blocks entries) and the last dim padded out to P (Flex infers the key length
    from it)."""
    p = index.num_blocks
    indices = index.indices.clamp_min(0).to(torch.int32)
    extra = p - indices.shape[-1]
    if extra > 0:
        indices = torch.cat([indices, indices.new_zeros(*indices.shape[:-1], extra)], dim=-1)
    return index.counts.to(torch.int32).contiguous(), indices.contiguous()


def split_full_blocks(counts: torch.Tensor, indices: torch.Tensor):
    """(partial counts, partial indices, full counts, full indices) of one kv-block layout.

    A key block strictly below the diagonal is entirely causal for every query of the
    row, so Flex may skip mask_mod there ("full" block); the diagonal block (and, for
    an index that had any, blocks above it) stays partial and gets the causal mask_mod.
    """
    p = indices.shape[-1]
    slot = torch.arange(p, device=indices.device)
    listed = slot < counts[..., None]
    row = torch.arange(indices.shape[-2], device=indices.device)[:, None]
    below = listed & (indices < row)

    def compact(keep):
        # Kept ids first in ascending order, the rest pushed past every id and zeroed.
        order = torch.where(keep, indices, p + indices).sort(-1).values
        return keep.sum(-1, dtype=torch.int32), torch.where(order < p, order, 0).to(torch.int32).contiguous()

    partial_counts, partial_indices = compact(listed & ~below)
    full_counts, full_indices = compact(below)
    return partial_counts, partial_indices, full_counts, full_indices


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(index: BlockIndex, mode: str = "split"):
    """A FlexAttention BlockMask holding exactly Stem's index (per query head, H = Hq)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts, indices = flex_kv_blocks(index)
    if mode == "partial":
        return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=index.block_size, mask_mod=causal_mask)
    pc, pi, fc, fi = split_full_blocks(counts, indices)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=index.block_size, mask_mod=causal_mask)


_compiled_flex = None


def compiled_flex_attention():
    """torch.compile(flex_attention), static shapes: the fused kernel specialised per shape, as
    a user would run it. The recompile limit is raised so that 15 (shape, N) cases never
    fall back to the unfused eager path (which materialises N x N scores)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# --------------------------------------------------------------------------- dense SDPA


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    # "math" runs anywhere: the tests drive dense_sdpa with it on the CPU.
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name]


def dense_sdpa(q, k, v, scale: float, backend_name: str, timer: Timer) -> tuple[float, str]:
    """(median ms, note) of causal SDPA forced onto one backend.

    Native GQA first; if the backend refuses enable_gqa, K/V are expanded to the query
    heads outside the timed call (same FLOPs, a little more memory traffic) and the note
    says so. A backend that refuses the shape outright raises, with its reasons.
    """
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(backend_name)
    gqa = q.shape[1] != k.shape[1]

    def attempt(kk, vv, enable_gqa):
        def call():
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=enable_gqa)

        # The backend's reasons for refusing come as warnings; keep them for the n/a note.
        with sdpa_kernel(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
                synchronize(q.device.type)
            except RuntimeError as error:
                if is_oom(error):
                    raise
                reasons = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                message = " ".join(str(error).split())[:160]
                raise RuntimeError(f"{message} {reasons}".strip()[:400]) from None
            return timer(call)

    try:
        return attempt(k, v, gqa), "native GQA" if gqa else ""
    except RuntimeError as error:
        if not gqa or is_oom(error):
            raise
        refusal = str(error)
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    ms = attempt(kk, vv, False)
    return ms, f"K/V expanded to {q.shape[1]} heads (enable_gqa refused: {refusal[:160]})"


# --------------------------------------------------------------------------- one (shape, N) case


def new_row(shape: Shape, n: int) -> dict:
    row = {"shape": shape.label, "hq": shape.hq, "hkv": shape.hkv, "d": shape.d, "n": n}
    row.update({key: na("not reached") for key in ROW_METRICS})
    row["check_attn_against"] = None  # "flex" or "reference" once checked
    return row


def tflops(d: int, pairs, ms) -> float | str:
    """Effective TFLOP/s: 2 FLOPs per multiply-add, QK^T and PV, per computed (query, key) pair."""
    if not (is_num(pairs) and is_num(ms)) or ms <= 0:
        return na("not measured")
    return 4 * d * pairs / (ms * 1e-3) / 1e12


def ratio(a, b) -> float | str:
    return a / b if is_num(a) and is_num(b) and b > 0 else na("not measured")


def run_case(shape: Shape, n: int, opts: Options, kernels: Kernels, timer: Timer) -> dict:
    row = new_row(shape, n)
    row["score_impl"], row["attn_impl"] = kernels.score_impl, kernels.attn_impl
    config, device = opts.config, opts.device
    scale = shape.d**-0.5
    on_gpu = device == "cuda"
    q, k, v = make_inputs(shape, n, opts)
    score_args = {"block_size": config.block_size, "stride": config.stride, "beta": config.beta, "scale": scale}

    # 1. Scoring.
    # Stages get their tensors through partial, not closures, so that `del` below really frees them.
    scored = guarded(row, "score_ms", partial(run_and_time, partial(kernels.score, q, k, v, **score_args), timer, device), ours=True)
    if scored is None:
        return finish_row(row, shape)
    logits, row["score_ms"] = scored

    # 2. Check the logits and the index chosen from them against the float32 reference (cheap at small N).
    if kernels.score is ref.block_logits:
        reason = NO_GPU if not on_gpu else na("scoring ran the reference itself")
    elif n > opts.check_max_n:
        reason = na(f"N > --check-max-n {format_length(opts.check_max_n)}")
    else:
        reason = None
        guarded(row, "check_score_ok", partial(check_scoring, row, q, k, v, logits, n, score_args, config), ours=True)
    if reason:
        for key in ("check_score_rel_err", "check_score_inf_equal", "check_score_ok",
                    "check_index_rows_identical", "check_index_rows_tie_explained", "check_index_ok"):
            row[key] = reason

    # 3. Selection.
    selected = guarded(row, "select_ms", partial(run_and_time, partial(select_index, logits, n, config), timer, device), ours=True)
    del logits, scored
    free_memory()
    if selected is None:
        return finish_row(row, shape)
    index, row["select_ms"] = selected
    guarded(row, "bud", partial(record_budget, row, index, n, shape, config, device), ours=True)

    # 4. Sparse attention on that index.
    attended = guarded(row, "attn_ms", partial(run_and_time, partial(kernels.attn, q, k, v, index, scale=scale), timer, device), ours=True)
    out = attended[0] if attended else None
    if attended:
        row["attn_ms"] = attended[1]
    del attended

    # 5. FlexAttention on the same index: the correctness check of the Triton output, then its time.
    if not on_gpu:
        row["flex_ms"] = row["flex_compile_s"] = NO_GPU
    elif "flex" in opts.skip:
        row["flex_ms"] = row["flex_compile_s"] = na("skipped by --skip")
    elif n % config.block_size:
        row["flex_ms"] = row["flex_compile_s"] = na("N is not a multiple of the block size")
    else:
        guarded(row, "flex_ms", partial(run_flex, row, q, k, v, out, index, scale, opts, timer), ours=False)
    if kernels.attn is ref.block_sparse_attention:
        row["check_attn_rel_err"] = row["check_attn_ok"] = NO_GPU if not on_gpu else na("attention ran the reference itself")
    elif not is_num(row["check_attn_rel_err"]):
        # No Flex output to compare with: the reference instead, where that is affordable.
        guarded(row, "check_attn_ok", partial(check_attention_by_reference, row, q, k, v, out, index, scale, opts), ours=True)
    del out, index
    free_memory()

    # 6. Dense baselines.
    for name in ("cudnn", "fa2"):
        if not on_gpu:
            row[f"{name}_ms"], row[f"{name}_note"] = NO_GPU, ""
        elif name in opts.skip:
            row[f"{name}_ms"], row[f"{name}_note"] = na("skipped by --skip"), ""
        else:
            timed = guarded(row, f"{name}_ms", partial(dense_sdpa, q, k, v, scale, name, timer), ours=False)
            row[f"{name}_note"] = ""
            if timed:
                row[f"{name}_ms"], row[f"{name}_note"] = timed
            free_memory()
    del q, k, v
    free_memory()
    return finish_row(row, shape)


def check_scoring(row, q, k, v, logits, n, score_args, config) -> None:
    reference_logits = ref.block_logits(q, k, v, **score_args)  # upcasts to float32 inside
    scores = compare_logits(logits, reference_logits)
    row["check_score_rel_err"], row["check_score_inf_equal"], row["check_score_ok"] = (
        scores["rel_err"], scores["inf_equal"], scores["ok"])
    if not scores["inf_equal"]:
        row["check_index_rows_identical"] = row["check_index_rows_tie_explained"] = na("-inf pattern differs")
        row["check_index_ok"] = False
        return
    indices = compare_indices(logits, reference_logits, select_index(logits, n, config), select_index(reference_logits, n, config))
    row["check_index_rows_identical"] = indices["rows_identical"]
    row["check_index_rows_tie_explained"] = indices["rows_explained"]
    row["check_index_ok"] = indices["ok"]


def check_attention_by_reference(row, q, k, v, out, index, scale, opts: Options) -> None:
    if out is None:
        row["check_attn_rel_err"] = row["check_attn_ok"] = na("no sparse attention output")
    elif q.shape[2] > opts.check_max_n:
        row["check_attn_rel_err"] = row["check_attn_ok"] = na("FlexAttention unavailable and N > --check-max-n")
    else:
        expected = ref.block_sparse_attention(q, k, v, index, scale=scale)
        record_attention_check(row, out, expected, "reference")


def record_attention_check(row, out, expected, against: str) -> None:
    rel = relative_error(out, expected)
    row["check_attn_rel_err"] = rel
    row["check_attn_ok"] = bool(rel < ATTN_REL_TOL and not bool(out.isnan().any()))
    row["check_attn_against"] = against


def run_flex(row, q, k, v, out, index, scale, opts: Options, timer: Timer) -> float:
    flex = compiled_flex_attention()
    mask = flex_block_mask(index, opts.flex_mask)
    gqa = q.shape[1] != k.shape[1]

    def call():
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)

    t0 = time.perf_counter()
    expected = call()  # compiles on the first call of each shape: flex_compile_s is compile + one call
    synchronize(q.device.type)
    row["flex_compile_s"] = time.perf_counter() - t0
    if out is None:
        row["check_attn_rel_err"] = row["check_attn_ok"] = na("no sparse attention output")
    else:
        record_attention_check(row, out, expected, "flex")
    del expected
    free_memory()
    row["flex_ms"] = timer(call)
    return row["flex_ms"]


def record_budget(row, index: BlockIndex, n: int, shape: Shape, config: StemConfig, device: str) -> None:
    """Density = kept / causal blocks; BUD = computed / causal token pairs (query heads counted)."""
    p = index.num_blocks
    kept = float(index.counts.sum(dtype=torch.float64))
    row["density"] = kept / (index.counts.shape[0] * index.num_heads * p * (p + 1) / 2)
    pairs = block_pair_counts(None, 1, n, config.block_size, device=device)
    row["computed_pairs"] = float(computed_pairs(index, pairs, shape.hq))
    row["causal_pairs"] = float(causal_pairs(pairs, shape.hq))
    row["bud"] = row["computed_pairs"] / row["causal_pairs"]


def finish_row(row: dict, shape: Shape) -> dict:
    """Derived numbers: total, effective TFLOP/s and the speed-ups."""
    parts = [row["score_ms"], row["select_ms"], row["attn_ms"]]
    row["stem_total_ms"] = sum(parts) if all(is_num(x) for x in parts) else na("a stage was not measured")
    row["attn_tflops"] = tflops(shape.d, row["computed_pairs"], row["attn_ms"])
    for name in ("cudnn", "fa2"):
        row[f"{name}_tflops"] = tflops(shape.d, row["causal_pairs"], row[f"{name}_ms"])
    row["speedup_cudnn_over_stem"] = ratio(row["cudnn_ms"], row["stem_total_ms"])
    row["speedup_flex_over_attn"] = ratio(row["flex_ms"], row["attn_ms"])
    if is_num(row["score_ms"]) and is_num(row["select_ms"]) and is_num(row["stem_total_ms"]):
        row["score_select_share"] = (row["score_ms"] + row["select_ms"]) / row["stem_total_ms"]
    else:
        row["score_select_share"] = na("not measured")
    return row


# --------------------------------------------------------------------------- report


def machine_info(device: str) -> dict:
    """The report's "gpu" entry: the device's properties and NVML's driver (None where unknown)."""
    if device != "cuda":
        return {"name": platform.processor() or platform.machine() or "cpu", "device": "cpu", "sm_count": None,
                "capability": None, "total_memory_bytes": None, "driver": None}
    index = torch.cuda.current_device()
    nvml = NvmlSampler(index).static_info()  # None without NVML; the sampler's thread is never started
    return {"device": "cuda", **gpu_properties(torch.device("cuda", index)),
            "driver": nvml["driver_version"] if nvml else None}


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**software(), "cuda": torch.version.cuda, "cudnn": cudnn}


def parameters(opts: Options) -> dict:
    return {
        "lengths": opts.lengths, "shapes": [s.label for s in opts.shapes], "batch": 1,
        "dtype": str(opts.dtype).removeprefix("torch."), "device": opts.device, "smoke": opts.smoke,
        "stem_config": dataclasses.asdict(opts.config), "selection": "per query head (gqa='query')",
        "warmup_ms": opts.warmup_ms, "rep_ms": opts.rep_ms, "min_reps": opts.min_reps, "timer": "median",
        "check_max_n": opts.check_max_n, "flex_mask": opts.flex_mask, "skip": sorted(opts.skip), "seed": opts.seed,
        "tolerances": {"attn_rel_err": ATTN_REL_TOL, "score_rel_err": SCORE_REL_TOL},
    }


def json_safe(value):
    """Non-finite floats as strings: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def target_notes(rows: list[dict], opts: Options) -> list[str]:
    """One line per target, for the 32/8/128 shape (else the first shape, said so)."""
    label = TARGET_SHAPE if any(s.label == TARGET_SHAPE for s in opts.shapes) else opts.shapes[0].label
    prefix = "" if label == TARGET_SHAPE else f"(shape {TARGET_SHAPE} not run; shown for {label}) "
    by_n = {r["n"]: r for r in rows if r["shape"] == label}
    largest = max(by_n)

    def note(what, n, keys, goal, passed, fmt):
        """what = row[keys[0]] (/ row[keys[1]]) at N = n, judged against the goal."""
        where = f"{prefix}{what} at {label} N={format_length(n)}"
        row = by_n.get(n)
        if row is None:
            return f"{where}: not measured (N not in --lengths); target {goal}"
        missing = [f"{key} {row[key]}" for key in keys if not is_num(row[key])]
        if missing:
            return f"{where}: not measured ({'; '.join(missing)}); target {goal}"
        value = row[keys[0]] / row[keys[1]] if len(keys) == 2 else row[keys[0]]
        return f"{where}: {fmt(value)}; target {goal}: {'met' if passed(value) else 'MISSED'}"

    notes = [
        note("stem total / cuDNN", largest, ("stem_total_ms", "cudnn_ms"), "<= 0.25", lambda x: x <= 0.25, "{:.3f}".format),
        note("(score + select) / stem total", largest, ("score_select_share",), "<= 10%", lambda x: x <= 0.10,
             lambda x: f"{100 * x:.1f}%"),
        note("attn TFLOP/s / cuDNN TFLOP/s", largest, ("attn_tflops", "cudnn_tflops"), ">= 85%", lambda x: x >= 0.85,
             lambda x: f"{100 * x:.1f}%"),
    ]
    for n in (32 * 1024, 128 * 1024):
        notes.append(note("Flex / our attn", n, ("flex_ms", "attn_ms"), ">= 1.3x", lambda x: x >= 1.3, "{:.2f}x".format))
    return notes


def cell(value, fmt: str = "{:.3g}") -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if is_num(value):
        return fmt.format(value)
    text = str(value)
    if text.startswith("n/a"):
        return "n/a"
    return "err" if text.startswith("error") else text


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    columns = [
        ("shape", "shape", "{}"), ("N", "n", None), ("score ms", "score_ms", "{:.3g}"), ("select ms", "select_ms", "{:.3g}"),
        ("attn ms", "attn_ms", "{:.3g}"), ("stem ms", "stem_total_ms", "{:.3g}"), ("density", "density", "{:.3f}"),
        ("BUD", "bud", "{:.3f}"), ("attn TFLOP/s", "attn_tflops", "{:.3g}"), ("cuDNN ms", "cudnn_ms", "{:.3g}"),
        ("FA2 ms", "fa2_ms", "{:.3g}"), ("Flex ms", "flex_ms", "{:.3g}"),
        ("cuDNN/stem", "speedup_cudnn_over_stem", "{:.2f}x"), ("Flex/attn", "speedup_flex_over_attn", "{:.2f}x"),
        ("score+sel", "score_select_share", "{:.1%}"), ("check", None, None),
    ]
    for header, _, _ in columns:
        table.add_column(header, justify="left" if header in ("shape", "check") else "right")
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            if key == "n":
                cells.append(format_length(row["n"]))
            elif key is None:
                cells.append(check_summary(row))
            else:
                cells.append(cell(row[key], fmt))
        table.add_row(*cells)
    # Not a terminal (a log, a test): a fixed wide console, or rich folds the 16 columns.
    console = Console() if sys.stdout.isatty() else Console(width=220)
    console.print(table)


def check_summary(row: dict) -> str:
    results = [row[k] for k in ("check_attn_ok", "check_score_ok", "check_index_ok") if isinstance(row[k], bool)]
    if not results:
        return "n/a"
    return "ok" if all(results) else "FAILED"


def failures(rows: list[dict]) -> list[str]:
    """What makes the exit code 1: an error in Stem's own stages or a failed check."""
    found = []
    for row in rows:
        where = f"{row['shape']} N={format_length(row['n'])}"
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("error"):
                found.append(f"{where} {key}: {value}")
            elif key.startswith("check_") and key.endswith("_ok") and value is False:
                found.append(f"{where} {key} failed")
    return found


def profile_path(folder: Path, gpu_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return folder / f"kernels-{stamp}-{slug(gpu_name)}.json"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2) + "\n")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    machine = machine_info(opts.device)
    kernels = load_kernels(opts.device)
    timer = Timer(opts.device, opts.warmup_ms, opts.rep_ms, opts.min_reps)
    cases = [(shape, n) for shape in opts.shapes for n in opts.lengths]
    print(f"{machine['name']}: {len(cases)} cases, Stem block {opts.config.block_size}, stride {opts.config.stride}, "
          f"mu {opts.config.mu}; scoring = {kernels.score_impl}, attention = {kernels.attn_impl}", flush=True)
    started = time.perf_counter()
    path = profile_path(opts.output, machine["name"])
    report = {
        "gpu": machine,
        "versions": versions(),
        "command": list(sys.argv),
        "argv": list(argv) if argv is not None else list(sys.argv[1:]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "elapsed_s": 0.0,
        "parameters": parameters(opts),
        "implementations": {"score": kernels.score_impl, "attn": kernels.attn_impl},
        "rows": [],
        "targets": [],
        "failures": [],
    }
    rows = report["rows"]
    for i, (shape, n) in enumerate(cases, 1):
        row = run_case(shape, n, opts, kernels, timer)
        rows.append(row)
        free_memory()
        report["elapsed_s"] = time.perf_counter() - started
        write_json(report, path)  # after every case: a run cut short still leaves its rows
        print(f"[{i}/{len(cases)} {report['elapsed_s']:.0f}s] {shape.label} N={format_length(n)}: "
              f"score {cell(row['score_ms'])} ms, select {cell(row['select_ms'])} ms, attn {cell(row['attn_ms'])} ms, "
              f"cuDNN {cell(row['cudnn_ms'])} ms, FA2 {cell(row['fa2_ms'])} ms, Flex {cell(row['flex_ms'])} ms, "
              f"check {check_summary(row)}", flush=True)

    report.update(complete=True, targets=target_notes(rows, opts), failures=failures(rows))
    write_json(report, path)
    print_table(rows, f"Stem kernels on {machine['name']} ({str(opts.dtype).removeprefix('torch.')}, batch 1)")
    for note in report["targets"]:
        print(note)
    for problem in report["failures"]:
        print(f"FAILED: {problem}")
    print(f"wrote {path}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
