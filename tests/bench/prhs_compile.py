"""Compile check of PrHS's fused top-k kernel (kernels/prhs_select.py _topk_tree, with and without the
re-anchoring rows' epilogue) and of the sparse decode kernel with its fused pass 2 (kernels/sparse_decode.py)
for sm_90, no GPU needed.

    PYTHONPATH=/path/to/triton-3.6/site python -m tests.bench.prhs_compile

Compiles the decode benchmark's shapes (Llama-3-8B: group 4, budget 1024 - 68 forced = width 956, so KEEP
1024, CHUNK 4096; inherited spans up to the width; the merge depth and the cache length are runtime
arguments, so one variant serves every length) ahead of time for compute capability 9.0 and prints the
shared memory each asks for (metadata.shared: must stay under the 227 KB an H100/H200 SM gives one block),
the cubin's size and the compile time on this machine. Exit code 1 when one fails to compile or needs more
than the limit.
"""

from __future__ import annotations

import argparse
import sys
import time

import triton

from stem_cli.kernels import prhs_select, sparse_decode
from tests.bench.sm90 import compile_sm90

LIMIT = 227 * 1024
POINTERS = {"Logits": "*fp32", "PartM": "*fp32", "PartS": "*fp32", "Lse": "*fp32", "Active": "*i8", "KeyValid": "*i8",
            "Start": "*i64", "SinkEnd": "*i64", "ExclEnd": "*i64", "KRows": "*i64", "Buf": "*i64", "Tickets": "*i32",
            "Ranked": "*i64", "Info": "*i64", "Prev": "*i64", "Index": "*i64", "Static": "*i64", "Scratch": "*i64",
            "Delta": "*fp32", "Flags": "*i32", "Counts": "*i32", "Accum": "*fp64"}
DECODE_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Idx": "*i64", "Counts": "*i32", "Acc": "*fp32", "M": "*fp32",
                   "L": "*fp32", "Out": "*bf16", "Lse": "*fp32", "Tickets": "*i32"}


def compile_tree(*, epilogue: bool, n_inherit: int, has_valid: bool, has_logits: bool, width: int = 956, r: int = 1):
    fn = prhs_select._topk_tree
    keep = triton.next_power_of_2(width)
    chunk = max(4 * keep, 2048)
    block_s = triton.next_power_of_2(max(n_inherit + (1 + 2 * r) * width, width, 2))
    constexprs = {"HAS_VALID": has_valid, "CHUNK": chunk, "KEEP": keep, "BLOCK_H": 4, "BLOCK_P": prhs_select.LSE_TILE,
                  "ANCHOR_ROWS": epilogue, "USE_TIME": epilogue, "HAS_PREV": epilogue and n_inherit > 0,
                  "HAS_LOGITS": epilogue and has_logits, "HAS_ACCUM": epilogue,
                  "BLOCK_PREV": triton.next_power_of_2(max(width + 68, 2)) if n_inherit else 2,
                  "BLOCK_A": triton.next_power_of_2(max(n_inherit + width, 2)) if epilogue else 2,
                  "BLOCK_S": block_s if epilogue else 2, "BLOCK_K": 64 if epilogue else 2, "SHARE_ITERS": r + 2, "BLOCK_R": 8}
    # padded logits rows and multiples of KEEP: specialised as divisible by 16, as at launch
    return compile_sm90(fn, constexprs, POINTERS, divisible=lambda name: name in ("s_logit", "buf_stride"), num_warps=8, num_stages=3)


def compile_decode(*, has_index: bool, fused: bool):
    const = {"group": 4, "BLOCK_H": 16, "BLOCK_N": 64, "HEAD_DIM": 128, "HAS_COUNTS": has_index, "HAS_INDEX": has_index, "FUSED_COMBINE": fused}
    return compile_sm90(sparse_decode._sparse_decode_partial, const, DECODE_POINTERS, divisible=lambda name: False,
                        floats=("qk_scale_log2",), num_warps=4, num_stages=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="compile only the variants whose label contains this text")
    only = parser.parse_args().only
    print(f"triton {triton.__version__}, sm_90, limit {LIMIT // 1024} KB shared")
    bad = 0
    variants = [(f"_topk_tree epilogue={e} inherit={i} valid={v} logits={lg}",
                 lambda e=e, i=i, v=v, lg=lg: compile_tree(epilogue=e, n_inherit=i, has_valid=v, has_logits=lg))
                for e, i, v, lg in ((False, 0, False, False), (True, 0, False, True), (True, 0, True, True), (True, 956, True, False))]
    variants += [(f"_sparse_decode_partial index={x} fused_combine={f}", lambda x=x, f=f: compile_decode(has_index=x, fused=f))
                 for x in (True, False) for f in (True, False)]
    for label, build in variants:
        if only not in label:
            continue
        started = time.perf_counter()
        try:
            k = build()
        except Exception as error:  # noqa: BLE001 - reported, and the exit code says so
            print(f"{label}: FAILED {type(error).__name__}: {str(error)[:300]}")
            bad += 1
            continue
        shared = k.metadata.shared
        ok = shared <= LIMIT
        bad += not ok
        print(f"{label}: shared {shared / 1024:.1f} KB{'' if ok else ' OVER THE LIMIT'}, cubin {len(k.asm['cubin']) / 2**20:.1f} MiB, "
              f"compiled in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
