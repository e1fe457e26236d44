"""Compile check of the GQA-packed attention kernel's configs for sm_90, no GPU needed.

    PYTHONPATH=/path/to/triton-3.6/site python -m tests.bench.gqa_compile [--head-dims 64,128,256] [--json out.json]

Every autotune config of kernels/block_sparse_attn_gqa.py (and its longest-first and padded
variants; `warp_specialize` compiles the key loop as tl.range(..., warp_specialize=True), the
variant the kernel dropped, to show what this Triton does with it) is compiled ahead of time
for compute capability 9.0 with the installed Triton; per config it prints the shared memory
the kernel asks for (metadata.shared, must stay under the 227 KB an H100/H200 SM gives one
block, else the launch fails with OutOfResources), whether the autotuner's pruning keeps it,
and registers / spills from ptxas -v on its PTX. A config the pruning keeps that needs more
than the limit or fails to compile makes the exit code 1 (the warp_specialize probe only
reports). Specialisations as at a real launch: unit strides constant, the pointers and the
Q/K/V/O strides divisible by 16, N and the block-index strides unspecialised (LENGTH_ARGS).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

from stem_cli.kernels import block_sparse_attn_gqa as gqa
from stem_cli.kernels.block_sparse_attn import LENGTH_ARGS
from tests.bench.sm90 import compile_sm90

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "Counts": "*i32",
            "Indices": "*i32", "Start": "*i32", "Order": "*i32"}
UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sik")  # == 1 at a launch on contiguous tensors: specialised
FLOATS = ("qk_scale_log2",)
# small counts (not multiples of 16 in general), and the lengths the kernel leaves unspecialised (scp among them)
NOT_DIVISIBLE = ("n_kv_heads", "n_blocks") + LENGTH_ARGS


def compile_one(head_dim: int, group: int, tile_m: int, block_n: int, warps: int, stages: int, *, block: int = 128,
                has_start: bool = False, longest_first: bool = False, warp_specialize: bool = False):
    fn = warp_specialized_kernel() if warp_specialize else gqa._gqa_packed_fwd
    constexprs = {"BLOCK": block, "TILE_M": tile_m, "BLOCK_N": block_n, "HEAD_DIM": head_dim, "GROUP": group,
                  "STORE_LSE": False, "HAS_START": has_start, "LONGEST_FIRST": longest_first}
    constexprs.update(dict.fromkeys(UNIT_STRIDES, 1))
    return compile_sm90(fn, constexprs, POINTERS, divisible=lambda name: name not in NOT_DIVISIBLE, floats=FLOATS,
                        num_warps=warps, num_stages=stages)


def warp_specialized_kernel():
    """The kernel with its key loop as tl.range(..., warp_specialize=True): its source, edited."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(gqa._gqa_packed_fwd.fn))
    plain = "for step in range(0, n_plain * TILES):"
    assert plain in source, "the kernel's key loop changed: update this probe"
    source = source.replace(plain, "for step in tl.range(0, n_plain * TILES, warp_specialize=True):")
    with tempfile.NamedTemporaryFile("w", suffix="_gqa_ws.py", delete=False) as f:  # @jit reads its file
        f.write("import triton\nimport triton.language as tl\n"
                "from stem_cli.kernels.block_sparse_attn import LENGTH_ARGS, _online_softmax_step, _write_output\n\n" + source)
    spec = importlib.util.spec_from_file_location("_gqa_ws_probe", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._gqa_packed_fwd


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes per thread from the bundled ptxas -v (sm_90a)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    text = done.stderr + done.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None}


def kept_by_pruning(head_dim, group, tile_m, block_n, warps, stages, block=128) -> bool:
    config = triton.Config({"TILE_M": tile_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    kept = gqa._prune([config], {}, BLOCK=block, GROUP=group, HEAD_DIM=head_dim)
    return kept == [config]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.gqa_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--variants", default="plain,longest_first,padded,warp_specialize",
                        help="comma list of plain, longest_first, warp_specialize, padded")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    variants = {"plain": {}, "longest_first": {"longest_first": True}, "warp_specialize": {"warp_specialize": True},
                "padded": {"has_start": True}}
    rows, failures = [], []
    print(f"triton {triton.__version__}, sm_90, limit {gqa.SHARED_MEMORY_LIMIT} B")
    print("variant | head_dim | TILE_M | BLOCK_N | warps | stages | kept | shared_B | estimate_B | regs | spill_B | warps_run | "
          "partitions")
    for variant in args.variants.split(","):
        for d in map(int, args.head_dims.split(",")):
            for tm, bn, w, s in gqa.CONFIGS:
                row = {"variant": variant, "head_dim": d, "tile_m": tm, "block_n": bn, "num_warps": w, "num_stages": s,
                       "kept": kept_by_pruning(d, args.group, tm, bn, w, s),
                       "estimate_bytes": gqa.shared_memory_estimate(tm, bn, d, s)}
                try:
                    compiled = compile_one(d, args.group, tm, bn, w, s, **variants[variant])
                    row["shared_bytes"] = compiled.metadata.shared
                    row["warps_run"] = compiled.metadata.num_warps
                    row["warp_partitions"] = "ttg.warp_specialize" in compiled.asm.get("ttgir", "")
                    row.update(ptxas_usage(compiled.asm["ptx"]))
                except Exception as error:  # noqa: BLE001 - a failed compile is a result to report
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
                    if row["kept"] and variant != "warp_specialize":
                        failures.append(row)
                if "shared_bytes" in row and row["kept"] and row["shared_bytes"] > gqa.SHARED_MEMORY_LIMIT:
                    failures.append(row)
                rows.append(row)
                print(" | ".join(str(row.get(key, "-")) for key in (
                    "variant", "head_dim", "tile_m", "block_n", "num_warps", "num_stages", "kept", "shared_bytes",
                    "estimate_bytes", "registers", "spill_store_bytes", "warps_run", "warp_partitions"))
                    + (f" | {row['error']}" if "error" in row else ""),
                    flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    for row in failures:
        print("FAILED:", {key: value for key, value in row.items() if key != "error"}, row.get("error", ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
