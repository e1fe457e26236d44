"""Pre-fill benchmark for issue 17: Stem's estimate, old (torch) against new (Triton), beside the dense
and Flex baselines, in one GPU run (< 8 minutes on an H200 at the defaults).

    python -m tests.bench.prefill                          # 32K,128K,256K at 32/8/128, bf16, on the CUDA GPU
    python -m tests.bench.prefill --only peers --lengths 32K,128K   # the peers' estimates only (< 2 minutes on an H200)
    python -m tests.bench.prefill --lengths 8K,32K,128K --skip torch,fa2,flex   # FP8 vs bf16 Stem and cuDNN (< 2 min)
    python -m tests.bench.prefill --only attn --lengths 32K,128K --skip fa2,flash   # the attention variants (< 5 min)
    TRITON_INTERPRET=1 python -m tests.bench.prefill --device cpu --smoke   # tiny sizes on the CPU, kernels interpreted

First, at small shapes, every new kernel against its reference (a failed check makes the exit
code 1 and the timings are still taken):
- kernels/tpd_select.py against methods/blocks.select_topk: exact equality of counts and ids
  on random distinct logits (both forced-block rules, batch 2 with a shifted first block);
- kernels/block_scores.py (score.block_logits impl="triton") against the tile-by-tile
  float32 reference (relative error, same -inf pattern), and the index chosen from it
  against the reference's (identical rows, or differing through near-ties only).
Then per length, batch 1, random inputs (v scaled per token so value norms vary):
- scoring torch vs triton, selection torch vs triton (on the same logits; the two indices are
  compared), block-sparse attention on the new index, Stem total old and new with the
  estimate's share;
- FP8 attention (kernels/block_sparse_attn_fp8.py) on the same index: attn_fp8_ms (e4m3 Q, K, P, V,
  what attn_dtype=fp8 runs: Q centred on its channel means, its quantisation included; fp8_quantize_ms
  alone), attn_fp8_qk_ms (e4m3 Q and K only, bf16 P and V), attn_fp8_plain_ms (no centring: the variant
  before the error study, tests/bench/fp8_error.py), each output against the bf16 kernel's (relative error ||o8 - o|| / ||o||
  and the worst row's), stem_total_fp8_ms and cudnn_over_stem_fp8 (the target: >= 6.5 at 128K, error <= 3%);
- dense causal SDPA on cuDNN and FlashAttention-2, FlexAttention on the same index (the
  Triton backend; FLASH where the installed torch offers it, else the row says why not).
The peers' estimates (xattention, flexprefill, minference at their defaults): each selector's whole
estimate + choice, fused (estimate_impl=triton) against torch, their indices compared, in rows
<peer>_estimate_fused_ms / <peer>_estimate_torch_ms beside Stem's score + select, <peer>_estimate_only_fused_ms
the fused estimate without the choice (`--only peers` runs just these, with a fused-vs-torch index check at a
small shape first, and at every length, before the timing, check_<peer>_rows_identical: the fused index against
the torch one on that length's inputs, one untimed call each). `--skip torch` leaves out timing the old torch
estimate (Stem's and the peers'; the peers' check still runs it once), `--skip peer-check` that check, `--skip fp8`
the FP8 rows, `--skip peers` the peers.
The attention variants (`--skip gqa` leaves out all but the first; `--only attn` runs just Stem's triton estimate for
the indices, these, cuDNN, FA2 and Flex): the current kernel on the per-query-head index (attn_ms), the current kernel
on the per-KV-head index (gqa='kv': the group's mean logits, attn_kv_ms), the GQA-packed kernel
(kernels/block_sparse_attn_gqa.py) on that index in program order (attn_packed_ms) and longest rows first
(attn_packed_lf_ms), each with TFLOP/s on its computed blocks (<key>_tflops) and that over cuDNN's dense TFLOP/s
(<key>_tflops_over_cudnn, the issue's >= 0.95); FlexAttention on the per-KV-head index (flex_triton_kv_ms,
flex_kv_over_packed, the issue's >= 1.3). The packed outputs are checked against the current kernel's on the same
index first (check_packed*_rel_err <= 1e-2, else a failure). JSON with the GPU, versions and command goes to
profiles/prefill-<date>-<gpu>.json, a PNG of time per stage vs length beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from stem_cli.config import ConfigError, StemConfig
from stem_cli.environment import slug
from stem_cli.kernels import reference as ref
from stem_cli.methods import blocks, flexprefill, minference, score, xattention
from stem_cli.methods.stem import select_from_logits
from stem_cli.units import format_length, parse_lengths
from tests.bench import kernels as kb

DEFAULT_LENGTHS = "32K,128K,256K"
DEFAULT_SHAPE = "32/8/128"
SMOKE_LENGTHS = "512,1K"
SMOKE_SHAPE = "4/2/32"
SMOKE_BLOCK = 16
STAGES = ("score", "select", "attn")
PEERS = {"xattention": xattention, "flexprefill": flexprefill, "minference": minference}
ONLY = ("all", "peers", "attn")
SKIPPABLE = ("cudnn", "fa2", "flex", "flash", "torch", "fp8", "peers", "peer-check", "gqa")
ONLY_ATTN_SKIPS = frozenset({"torch", "fp8", "peers"})  # --only attn: no old estimate, FP8 or peers
PACKED_REL_TOL = 1e-2  # packed vs current kernel, both bf16 operands with float32 accumulation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", help=f"sequence lengths (default {DEFAULT_LENGTHS}; smoke {SMOKE_LENGTHS})")
    parser.add_argument("--shape", help=f"QHEADS/KVHEADS/HEADDIM (default {DEFAULT_SHAPE}; smoke {SMOKE_SHAPE})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole code path in seconds")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="do_bench timing budget per measurement (ms)")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up budget per measurement (ms)")
    parser.add_argument("--min-reps", type=int, default=2, help="timed calls at least when one call outlasts --rep-ms")
    parser.add_argument("--only", choices=ONLY, default="all",
                        help="'peers': only the peers' estimates (fused vs torch) beside Stem's, no attention or baselines; "
                             "'attn': Stem's triton estimate, then the attention variants, cuDNN, FA2, Flex (no small-shape checks)")
    parser.add_argument("--skip", default="", help=f"comma list to leave out: {', '.join(SKIPPABLE)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="profiles", help="folder for the JSON and PNG (default profiles/)")
    return parser


@dataclasses.dataclass
class Options:
    lengths: list[int]
    shape: kb.Shape
    config: StemConfig
    device: str
    dtype: torch.dtype
    smoke: bool
    only: str
    skip: frozenset
    seed: int
    output: Path
    timer: kb.Timer


def parse_options(argv) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("the CPU runs only the smoke mode: add --smoke")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("the CPU smoke run executes the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --smoke")
    skip = frozenset(s.strip() for s in args.skip.split(",") if s.strip())
    if skip - set(SKIPPABLE):
        parser.error(f"--skip {args.skip!r}: use a comma list of {', '.join(SKIPPABLE)}")
    try:
        lengths = parse_lengths(args.lengths or (SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS))
        shape = kb.parse_shapes(args.shape or (SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE))[0]
        config = StemConfig(block_size=SMOKE_BLOCK) if args.smoke else StemConfig()
    except (ValueError, ConfigError) as error:
        parser.error(str(error))
    if args.only == "attn":
        skip = skip | ONLY_ATTN_SKIPS
    on_gpu = args.device == "cuda"
    return Options(lengths, shape, config, args.device, torch.bfloat16 if on_gpu else torch.float32, args.smoke, args.only, skip,
                   args.seed, Path(args.output), kb.Timer(args.device, args.warmup_ms, args.rep_ms, args.min_reps))


def with_impl(config: StemConfig, impl: str) -> StemConfig:
    return dataclasses.replace(config, estimate_impl=impl)


# --------------------------------------------------------------------------- checks at small shapes


def check_selection_kernel(device: str, seed: int, smoke: bool) -> dict:
    """tpd_select against blocks.select_topk on random distinct logits: exact counts and ids."""
    from stem_cli.kernels import tpd_select

    gen = torch.Generator().manual_seed(seed)
    results = []
    cases = [(40, "code"), (67, "inside")] if smoke else [(64, "code"), (257, "inside"), (2048, "code"), (2048, "inside")]
    for p, rule in cases:
        first = torch.tensor([0, 5])
        logits = torch.randn(2, 3, p, p, generator=gen)
        ids = torch.arange(p)
        ok = (ids[None, :] <= ids[:, None]) & (ids[None, :] >= first[:, None, None]) & (ids[:, None] >= first[:, None, None])
        logits = logits.masked_fill(~ok[:, None], float("-inf"))
        budget = torch.randint(0, p + 2, (2, p), generator=gen)
        forced = blocks.forced_blocks(p, first, 4, 4)
        want = blocks.select_topk(logits.to(device), budget, forced.to(device), block_size=128, seq_len=128 * p,
                                  max_count=p, rule=rule)
        got = tpd_select.select(logits.to(device), budget.to(device), first.to(device), sink_blocks=4, window_blocks=4,
                                width=p, block_size=128, seq_len=128 * p, rule=rule)
        equal = torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
        results.append({"p": p, "rule": rule, "equal": bool(equal)})
    return {"cases": results, "ok": all(r["equal"] for r in results)}


def check_scoring_kernel(opts: Options) -> dict:
    """block_scores (impl triton) against the float32 tile reference, and the index chosen from each."""
    n = 512 if opts.smoke else 4096
    q, k, v = kb.make_inputs(opts.shape, n, opts)
    cfg = opts.config
    args = {"block_size": cfg.block_size, "stride": cfg.stride, "beta": cfg.beta, "scale": opts.shape.d**-0.5}
    got = score.block_logits(q, k, v, **args, impl="triton")
    want = ref.block_logits(q, k, v, **args)
    logits = kb.compare_logits(got, want)
    chosen = kb.compare_indices(got, want, select_from_logits(got, n, cfg, None), select_from_logits(want, n, cfg, None))
    return {"n": n, "logits_rel_err": logits["rel_err"], "inf_equal": logits["inf_equal"],
            "index_rows_identical": chosen["rows_identical"], "index_rows_tie_explained": chosen["rows_explained"],
            "ok": bool(logits["ok"] and chosen["ok"])}


def peer_config(peer: str, opts: Options, impl: str):
    """The peer's default configuration (the smoke run's block size), on the estimate path `impl`."""
    module = PEERS[peer]
    return dataclasses.replace(module.DEFAULTS, block_size=opts.config.block_size, estimate_impl=impl)


def rows_identical(a, b) -> float:
    """Fraction of (head, query block) rows that keep the same blocks in both indices."""
    return float((a.to_mask() == b.to_mask()).all(-1).float().mean())


def check_peer_estimates(opts: Options) -> dict:
    """Every peer's fused selector against its torch one at a small shape (batch 1, random inputs): the same index."""
    n = 160 if opts.smoke else 4096
    q, k, v = kb.make_inputs(opts.shape, n, opts)
    results = {}
    for peer, module in PEERS.items():
        picked = [module.select(q, k, v, layer=3, config=peer_config(peer, opts, impl), scale=opts.shape.d**-0.5,
                                key_valid=None) for impl in ("triton", "torch")]
        results[peer] = rows_identical(*picked)
    # Inputs without exact ties: any differing row comes from float32 rounding at a threshold or the last pick.
    return {"n": n, "rows_identical": results, "ok": all(x >= 0.999 for x in results.values())}


def run_peers(row: dict, q, k, v, opts: Options) -> None:
    """Each peer's estimate + choice, fused and torch. First, untimed, on this length's inputs: the fused index
    against the torch one (the share of (head, query block) rows that agree; `--skip peer-check` leaves it out at
    long lengths); then the fused select (estimate + choice), the fused estimate alone and the torch select."""
    scale = opts.shape.d**-0.5
    if "peers" in opts.skip:
        row.update({f"{peer}_estimate_{name}_ms": kb.na("skipped") for peer in PEERS for name in ("fused", "torch")})
        return
    for peer, module in PEERS.items():
        configs = {impl: peer_config(peer, opts, impl) for impl in ("triton", "torch")}
        select = {impl: partial(module.select, q, k, v, layer=3, config=cfg, scale=scale, key_valid=None)
                  for impl, cfg in configs.items()}
        check = f"check_{peer}_rows_identical"
        if "peer-check" in opts.skip:
            row[check] = kb.na("skipped")
        else:
            fused = kb.guarded(row, check, select["triton"], ours=True)
            want = kb.guarded(row, check, select["torch"], ours=True) if fused is not None else None
            if fused is not None and want is not None:
                row[check] = rows_identical(fused, want)
            del fused, want
            kb.free_memory()
        timed(row, f"{peer}_estimate_fused_ms", select["triton"], opts)
        kb.free_memory()
        estimate_only = partial(module.estimate, q, k, v, layer=3, config=configs["triton"], scale=scale, key_valid=None)
        timed(row, f"{peer}_estimate_only_fused_ms", estimate_only, opts)
        kb.free_memory()
        if "torch" in opts.skip:
            row[f"{peer}_estimate_torch_ms"] = row[f"{peer}_estimate_only_torch_ms"] = kb.na("skipped")
        else:
            timed(row, f"{peer}_estimate_torch_ms", select["torch"], opts)
            kb.free_memory()
            timed(row, f"{peer}_estimate_only_torch_ms",
                  partial(module.estimate, q, k, v, layer=3, config=configs["torch"], scale=scale, key_valid=None), opts)
            kb.free_memory()
        row[f"{peer}_over_stem_estimate"] = kb.ratio(row.get(f"{peer}_estimate_fused_ms"), row.get("stem_estimate_triton_ms"))
    flexprefill_parts(row, q, k, opts)


def flexprefill_parts(row: dict, q, k, opts: Options) -> None:
    """FlexPrefill's fused estimate by part, each beside its torch code (the fused estimate measured slower than
    the torch one on the H200 at 32K): the last block's column and diagonal sums (kernels/last_rows.py) and the
    pooled block softmax (kernels/pooled_block_softmax.py), on the estimate's own inputs."""
    from stem_cli.kernels import pooled_block_softmax

    config = peer_config("flexprefill", opts, "triton")
    scale, bs = opts.shape.d**-0.5, config.block_size
    batch, n = q.shape[0], q.shape[2]
    rows = min(bs, n)
    for impl, name in (("triton", "fused"), ("torch", "torch")):
        if impl == "torch" and "torch" in opts.skip:
            row[f"flexprefill_last_rows_{name}_ms"] = kb.na("skipped")
            continue
        timed(row, f"flexprefill_last_rows_{name}_ms", partial(blocks.last_rows_sums, q, k, rows, scale, None, impl=impl), opts)
        kb.free_memory()
    valid = torch.ones(batch, n, dtype=torch.bool, device=q.device)
    q_bar = flexprefill._block_mean(q, valid, bs, False)
    k_bar = flexprefill._block_mean(k, valid, bs, False)
    block_ok = flexprefill.block_valid(valid, bs)
    timed(row, "flexprefill_block_softmax_fused_ms", partial(pooled_block_softmax.block_softmax, q_bar, k_bar, block_ok, scale), opts)
    timed(row, "flexprefill_block_softmax_torch_ms", partial(flexprefill.block_softmax_torch, q_bar, k_bar, valid, bs, scale), opts)
    del q_bar, k_bar
    kb.free_memory()


# --------------------------------------------------------------------------- one length


def timed(row: dict, key: str, fn, opts: Options, *, ours: bool = True):
    """The result of a first (compiling, autotuning) call; the median ms of the later ones into row[key]."""
    got = kb.guarded(row, key, partial(kb.run_and_time, fn, opts.timer, opts.device), ours=ours)
    if got is None:
        return None
    row[key] = got[1]
    return got[0]


def run_length(n: int, opts: Options, attend) -> dict:
    shape, cfg = opts.shape, opts.config
    row = {"n": n, "shape": shape.label}
    q, k, v = kb.make_inputs(shape, n, opts)
    scale = shape.d**-0.5
    score_args = {"block_size": cfg.block_size, "stride": cfg.stride, "beta": cfg.beta, "scale": scale}

    new_logits = timed(row, "score_triton_ms", partial(score.block_logits, q, k, v, **score_args, impl="triton"), opts)
    old_logits = None
    if "torch" in opts.skip:
        row["score_torch_ms"] = row["select_torch_ms"] = kb.na("skipped")
    else:
        old_logits = timed(row, "score_torch_ms", partial(score.block_logits, q, k, v, **score_args, impl="torch"), opts)
    if new_logits is not None and old_logits is not None:
        row["check_logits"] = kb.compare_logits(new_logits, old_logits)
    del old_logits
    kb.free_memory()
    index = None
    if new_logits is not None:
        index = timed(row, "select_triton_ms", partial(select_from_logits, new_logits, n, with_impl(cfg, "triton"), None), opts)
        old_index = None
        if "torch" not in opts.skip:
            old_index = timed(row, "select_torch_ms", partial(select_from_logits, new_logits, n, with_impl(cfg, "torch"), None),
                              opts)
        if index is not None and old_index is not None:
            # Same logits on both sides: rows may differ only through exactly tied logits.
            same = kb.compare_indices(new_logits, new_logits, index, old_index)
            row["check_select_rows_identical"] = same["rows_identical"]
            row["check_select_rows_tie_explained"] = same["rows_explained"]
        del old_index
    kv_index = None
    if new_logits is not None and "gqa" not in opts.skip:
        # Stem's gqa='kv' selection (methods/stem.py): one index per KV head from the group's mean logits.
        kv_logits = new_logits.view(1, shape.hkv, shape.hq // shape.hkv, *new_logits.shape[-2:]).mean(2)
        kv_index = timed(row, "select_kv_triton_ms", partial(select_from_logits, kv_logits, n, with_impl(cfg, "triton"), None),
                         opts)
        del kv_logits
    del new_logits
    kb.free_memory()
    if kb.is_num(row.get("score_triton_ms")) and kb.is_num(row.get("select_triton_ms")):
        row["stem_estimate_triton_ms"] = row["score_triton_ms"] + row["select_triton_ms"]
    run_peers(row, q, k, v, opts)
    if opts.only == "peers":
        del q, k, v, index
        kb.free_memory()
        return row
    out = None
    if index is not None:
        kb.record_budget(row, index, n, shape, cfg, opts.device)
        out = timed(row, "attn_ms", partial(attend, q, k, v, index, scale=scale), opts)
    run_fp8(row, q, k, v, index, out, scale, opts)
    run_gqa(row, q, k, v, kv_index, scale, opts, attend)

    on_gpu = opts.device == "cuda"
    for name in ("cudnn", "fa2"):
        if not on_gpu or name in opts.skip:
            row[f"{name}_ms"] = kb.na("no GPU" if not on_gpu else "skipped")
            continue
        got = kb.guarded(row, f"{name}_ms", partial(kb.dense_sdpa, q, k, v, scale, name, opts.timer), ours=False)
        if got:
            row[f"{name}_ms"], row[f"{name}_note"] = got
        kb.free_memory()
    for backend in ("triton", "flash"):
        key = f"flex_{backend}_ms"
        if not on_gpu or "flex" in opts.skip or backend in opts.skip or index is None:
            row[key] = kb.na("no GPU" if not on_gpu else "skipped" if index is not None else "no index")
            continue
        kb.guarded(row, key, partial(run_flex, row, backend, q, k, v, out, index, scale, opts), ours=False)
        kb.free_memory()
    if on_gpu and "flex" not in opts.skip and kv_index is not None:
        kb.guarded(row, "flex_triton_kv_ms", partial(run_flex, row, "triton", q, k, v, None, per_query_heads(kv_index, shape.hq),
                                                     scale, opts, key="flex_triton_kv_ms"), ours=False)
        kb.free_memory()
    else:
        row["flex_triton_kv_ms"] = kb.na("no GPU" if not on_gpu else "skipped" if kv_index is not None else "no index")
    del q, k, v, out, index, kv_index
    kb.free_memory()
    return finish(row)


def run_fp8(row: dict, q, k, v, index, out, scale: float, opts: Options) -> None:
    """The FP8 kernel on the bf16 kernel's index: times, and its output against the bf16 output `out`."""
    keys = ("attn_fp8_ms", "attn_fp8_qk_ms", "attn_fp8_plain_ms", "fp8_quantize_ms")
    if "fp8" in opts.skip or index is None or out is None:
        row.update(dict.fromkeys(keys, kb.na("skipped" if "fp8" in opts.skip else "no index")))
        return
    from stem_cli.kernels import block_sparse_attn_fp8 as fp8

    reason = fp8.unsupported_reason(q.device)
    if reason is not None:
        row.update(dict.fromkeys(keys, kb.na(reason)))
        return
    block = index.block_size
    timed(row, "fp8_quantize_ms", lambda: [fp8.quantize_blocks(q, block, mean=fp8.channel_means(q)), fp8.quantize_blocks(k, block),
                                           fp8.quantize_blocks(v, block, transpose=True)], opts)
    kb.free_memory()
    # attn_dtype=fp8's default (Q centred), the same with bf16 P and V, and the plain per-block variant (no centring).
    for key, pv_fp8, smooth, name in (("attn_fp8_ms", True, "q", "fp8"), ("attn_fp8_qk_ms", False, "q", "fp8_qk"),
                                      ("attn_fp8_plain_ms", True, "", "fp8_plain")):
        got = timed(row, key, partial(fp8.block_sparse_attention, q, k, v, index, scale=scale, pv_fp8=pv_fp8, smooth=smooth),
                    opts)
        if got is not None:
            row[f"check_{name}_rel_err"], row[f"check_{name}_worst_row_rel_err"] = output_errors(got, out)
        del got
        kb.free_memory()


def output_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got - want|| / ||want||, max over rows of the same per row), one head at a time in float32."""
    worst = 0.0
    for h in range(got.shape[1]):
        x, y = got[:, h].float(), want[:, h].float()
        per_row = (x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)
        worst = max(worst, float(per_row.max()))
    return kb.relative_error(got, want), worst


GQA_VARIANTS = (("attn_packed_ms", "packed", {}), ("attn_packed_lf_ms", "packed_lf", {"longest_first": True}))


def run_gqa(row: dict, q, k, v, kv_index, scale: float, opts: Options, attend) -> None:
    """The per-KV-head index through the current kernel and the GQA-packed one (in program order and longest
    rows first): times, computed pairs, and each packed output against the current kernel's."""
    keys = ("attn_kv_ms",) + tuple(key for key, _, _ in GQA_VARIANTS)
    if kv_index is None:
        row.update(dict.fromkeys(keys, kb.na("skipped" if "gqa" in opts.skip else "no index")))
        return
    from stem_cli.kernels import block_sparse_attn_gqa as gqa

    budget = {}
    kb.record_budget(budget, kv_index, q.shape[2], opts.shape, opts.config, opts.device)
    row.update({f"kv_{key}": value for key, value in budget.items()})
    if opts.device == "cuda":
        from stem_cli.executor import sparse_kernel

        current = sparse_kernel(q, k, v, kv_index, packed=False).block_sparse_attention
    else:
        current = attend  # the CPU smoke: the reference stands in for the current kernel, as for attn_ms
    want = timed(row, "attn_kv_ms", partial(current, q, k, v, kv_index, scale=scale), opts)
    for key, name, flags in GQA_VARIANTS:
        got = timed(row, key, partial(gqa.block_sparse_attention, q, k, v, kv_index, scale=scale, **flags), opts)
        if opts.device == "cuda":  # the autotuner's pick for this variant (the last key it tuned)
            row[f"{name}_config"] = str(getattr(gqa._tuned, "best_config", None))
        if got is not None and want is not None:
            err, worst = output_errors(got, want)
            row[f"check_{name}_rel_err"], row[f"check_{name}_worst_row_rel_err"] = err, worst
            row[f"check_{name}_ok"] = err <= PACKED_REL_TOL
        del got
        kb.free_memory()
    del want
    kb.free_memory()


def per_query_heads(index, query_heads: int):
    """A per-KV-head index repeated over each group's query heads (FlexAttention's block mask takes H = Hq)."""
    group = query_heads // index.num_heads
    return dataclasses.replace(index, counts=index.counts.repeat_interleave(group, 1),
                               indices=index.indices.repeat_interleave(group, 1))


def run_flex(row, backend: str, q, k, v, out, index, scale, opts: Options, key: str | None = None) -> None:
    flex = kb.compiled_flex_attention()
    mask = kb.flex_block_mask(index, "split")
    options = {"BACKEND": "FLASH"} if backend == "flash" else None
    gqa = q.shape[1] != k.shape[1]

    def call():
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, kernel_options=options)

    expected = call()
    kb.synchronize(opts.device)
    if out is not None:
        row[f"check_attn_vs_flex_{backend}_rel_err"] = kb.relative_error(out, expected)
    del expected
    row[key or f"flex_{backend}_ms"] = opts.timer(call)


def finish(row: dict) -> dict:
    num = kb.is_num
    for which in ("torch", "triton"):
        parts = [row.get(f"score_{which}_ms"), row.get(f"select_{which}_ms"), row.get("attn_ms")]
        if all(num(x) for x in parts):
            row[f"stem_total_{which}_ms"] = sum(parts)
            row[f"estimate_share_{which}"] = (parts[0] + parts[1]) / sum(parts)
    if num(row.get("attn_ms")) and num(row.get("computed_pairs")):
        row["attn_tflops"] = kb.tflops(int(row["shape"].split("/")[2]), row["computed_pairs"], row["attn_ms"])
    for name in ("cudnn", "fa2"):
        if num(row.get(f"{name}_ms")) and num(row.get("causal_pairs")):
            row[f"{name}_tflops"] = kb.tflops(int(row["shape"].split("/")[2]), row["causal_pairs"], row[f"{name}_ms"])
    fp8_parts = [row.get("score_triton_ms"), row.get("select_triton_ms"), row.get("attn_fp8_ms")]
    if all(num(x) for x in fp8_parts):
        row["stem_total_fp8_ms"] = sum(fp8_parts)
    row["cudnn_over_stem_triton"] = kb.ratio(row.get("cudnn_ms"), row.get("stem_total_triton_ms"))
    row["cudnn_over_stem_fp8"] = kb.ratio(row.get("cudnn_ms"), row.get("stem_total_fp8_ms"))
    row["attn_over_attn_fp8"] = kb.ratio(row.get("attn_ms"), row.get("attn_fp8_ms"))
    row["flex_over_attn"] = kb.ratio(row.get("flex_triton_ms"), row.get("attn_ms"))
    d = int(row["shape"].split("/")[2])
    for key, pairs in (("attn", "computed_pairs"), ("attn_kv", "kv_computed_pairs"), ("attn_packed", "kv_computed_pairs"),
                       ("attn_packed_lf", "kv_computed_pairs")):
        if num(row.get(f"{key}_ms")) and num(row.get(pairs)):
            row[f"{key}_tflops"] = kb.tflops(d, row[pairs], row[f"{key}_ms"])
        row[f"{key}_tflops_over_cudnn"] = kb.ratio(row.get(f"{key}_tflops"), row.get("cudnn_tflops"))
    row["flex_kv_over_packed"] = kb.ratio(row.get("flex_triton_kv_ms"), row.get("attn_packed_ms"))
    row["flex_kv_over_packed_lf"] = kb.ratio(row.get("flex_triton_kv_ms"), row.get("attn_packed_lf_ms"))
    return row


# --------------------------------------------------------------------------- report


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["n"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    colors = {"score": "#4c72b0", "select": "#dd8452", "attn": "#55a868"}
    for shift, which, hatch in ((-width / 2, "torch", "//"), (width / 2, "triton", "")):
        bottom = [0.0] * len(rows)
        for stage in STAGES:
            key = "attn_ms" if stage == "attn" else f"{stage}_{which}_ms"
            heights = [r[key] if kb.is_num(r.get(key)) else 0.0 for r in rows]
            ax.bar([i + shift for i in x], heights, width, bottom=bottom, color=colors[stage], hatch=hatch,
                   edgecolor="white", label=f"{stage} ({which} estimate)")
            bottom = [b + h for b, h in zip(bottom, heights)]
    for key, style in (("cudnn_ms", "k-o"), ("flex_triton_ms", "r--s"), ("stem_total_fp8_ms", "m-^")):
        ys = [r[key] if kb.is_num(r.get(key)) else float("nan") for r in rows]
        ax.plot(list(x), ys, style, label=key.removesuffix("_ms"))
    ax.set_xticks(list(x), [format_length(n) for n in lengths])
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (log)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PEER_KEYS = ["n", "stem_estimate_triton_ms"] + [f"{p}_estimate_{w}_ms" for p in PEERS for w in ("fused", "only_fused", "torch")] + \
    [f"{p}_over_stem_estimate" for p in PEERS] + [f"check_{p}_rows_identical" for p in PEERS]


ATTN_KEYS = ["n", "bud", "kv_bud", "cudnn_ms", "cudnn_tflops"] + [
    f"{key}{suffix}" for key in ("attn", "attn_kv", "attn_packed", "attn_packed_lf")
    for suffix in ("_ms", "_tflops", "_tflops_over_cudnn")
] + ["flex_triton_ms", "flex_over_attn", "flex_triton_kv_ms", "flex_kv_over_packed", "flex_kv_over_packed_lf",
     "check_packed_rel_err", "check_packed_worst_row_rel_err", "check_packed_lf_rel_err", "packed_config", "packed_lf_config"]


def print_attention_variants(rows: list[dict]) -> None:
    """Issue 17's attention targets per length: TFLOP/s on computed blocks over cuDNN's (>= 0.95), Flex / ours (>= 1.3)."""
    print(" | ".join(ATTN_KEYS))
    for r in rows:
        print(" | ".join(format_length(r["n"]) if key == "n" else kb.cell(r.get(key, "n/a")) for key in ATTN_KEYS))


def print_rows(rows: list[dict], only: str = "all") -> None:
    if only == "peers":
        print(" | ".join(PEER_KEYS))
        for r in rows:
            print(" | ".join(format_length(r["n"]) if key == "n" else kb.cell(r.get(key, "n/a")) for key in PEER_KEYS))
        return
    if only == "attn":
        return  # its table is the attention variants' (print_attention_variants)
    keys = ["n", "score_torch_ms", "score_triton_ms", "select_torch_ms", "select_triton_ms", "attn_ms",
            "stem_total_torch_ms", "stem_total_triton_ms", "estimate_share_triton", "cudnn_ms", "fa2_ms",
            "flex_triton_ms", "flex_flash_ms", "cudnn_over_stem_triton", "flex_over_attn", "attn_tflops", "cudnn_tflops",
            "fp8_quantize_ms", "attn_fp8_qk_ms", "attn_fp8_ms", "attn_over_attn_fp8", "stem_total_fp8_ms", "cudnn_over_stem_fp8",
            "check_fp8_rel_err", "check_fp8_worst_row_rel_err", "check_fp8_qk_rel_err", "check_fp8_qk_worst_row_rel_err",
            "attn_fp8_plain_ms", "check_fp8_plain_rel_err", "check_fp8_plain_worst_row_rel_err"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(format_length(r["n"]) if key == "n" else kb.cell(r.get(key, "n/a")) for key in keys))


def print_fp8_target(rows: list[dict]) -> None:
    """Issue 17's FP8 target at the longest length: cuDNN bf16 dense / FP8 Stem total >= 6.5, error <= 3%."""
    last = rows[-1] if rows else {}
    ratio, err = last.get("cudnn_over_stem_fp8"), last.get("check_fp8_rel_err")
    if kb.is_num(ratio) and kb.is_num(err):
        met = ratio >= 6.5 and err <= 0.03
        print(f"FP8 target at {format_length(last['n'])}: cudnn / stem fp8 = {ratio:.2f} (>= 6.5), relative error "
              f"{err:.2%} (<= 3%), worst row {last['check_fp8_worst_row_rel_err']:.2%}: {'met' if met else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    machine = kb.machine_info(opts.device)
    attend = kb.load_kernels(opts.device).attn if opts.device == "cuda" else ref.block_sparse_attention
    started = time.perf_counter()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "prefill-peers" if opts.only == "peers" else "prefill"
    path = opts.output / f"{kind}-{stamp}-{slug(machine['name'])}.json"
    report = {
        "gpu": machine, "versions": kb.versions(), "command": list(sys.argv),
        "argv": list(argv) if argv is not None else list(sys.argv[1:]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": {"lengths": opts.lengths, "shape": opts.shape.label, "dtype": str(opts.dtype), "batch": 1,
                       "stem_config": dataclasses.asdict(opts.config), "smoke": opts.smoke, "skip": sorted(opts.skip),
                       "only": opts.only,
                       "peer_configs": {p: dataclasses.asdict(peer_config(p, opts, "auto")) for p in PEERS}},
        "checks": {}, "rows": [], "failures": [], "complete": False,
    }
    print(f"{machine['name']}: checks at small shapes", flush=True)
    checks = [("selection_kernel", partial(check_selection_kernel, opts.device, opts.seed, opts.smoke)),
              ("scoring_kernel", partial(check_scoring_kernel, opts)), ("peer_estimates", partial(check_peer_estimates, opts))]
    chosen = checks[2:] if opts.only == "peers" else [] if opts.only == "attn" else checks
    for name, fn in chosen:
        result = kb.guarded(report["checks"], name, fn, ours=True)
        if result is not None:
            report["checks"][name] = result
        ok = isinstance(report["checks"][name], dict) and report["checks"][name]["ok"]
        print(f"  {name}: {'ok' if ok else 'FAILED'} {report['checks'][name]}", flush=True)
        if not ok:
            report["failures"].append(f"check {name} failed")
    kb.write_json(report, path)
    for n in opts.lengths:
        row = run_length(n, opts, attend)
        report["rows"].append(row)
        report["elapsed_s"] = time.perf_counter() - started
        kb.write_json(report, path)
        print(f"[{report['elapsed_s']:.0f}s] N={format_length(n)} done", flush=True)
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("error"):
                report["failures"].append(f"N={format_length(n)} {key}: {value}")
        for peer in PEERS:
            agree = row.get(f"check_{peer}_rows_identical")
            if kb.is_num(agree) and agree < 0.999:
                report["failures"].append(f"N={format_length(n)}: {peer} fused and torch indices differ in {1 - agree:.4f} of rows")
        for _, name, _ in GQA_VARIANTS:
            if row.get(f"check_{name}_ok") is False:
                report["failures"].append(f"N={format_length(n)}: the {name} kernel differs from the current one on the "
                                          f"per-KV-head index by {row[f'check_{name}_rel_err']:.2e} > {PACKED_REL_TOL}")
        if row.get("check_select_rows_tie_explained", 1.0) != 1.0:
            report["failures"].append(f"N={format_length(n)}: triton and torch selections differ beyond ties on the same "
                                      f"logits ({row['check_select_rows_tie_explained']:.4f} of rows identical or tied)")
    report["complete"] = True
    full = opts.only != "peers"  # the peers-only run has no attention stages to plot and no FP8 rows
    if full:
        report["png"] = str(plot(report["rows"], path.with_suffix(".png"), f"Stem stages vs length, {opts.shape.label}, "
                                                                          f"{machine['name']}"))
    kb.write_json(report, path)
    print_rows(report["rows"], opts.only)
    if full:
        print_fp8_target(report["rows"])
        print_attention_variants(report["rows"])
    for problem in report["failures"]:
        print(f"FAILED: {problem}")
    print(f"wrote {path}" + (f" and {report['png']}" if full else ""))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
