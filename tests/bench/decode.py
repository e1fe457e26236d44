"""Decode benchmark: per-token decode attention against a dense baseline at the memory limit, in one GPU run.

    python -m tests.bench.decode                       # from the repository root: the default sweep on a CUDA GPU
    python -m tests.bench.decode --device cpu --smoke  # tiny sizes, PyTorch reference, no GPU
    python -m tests.bench.decode --lengths 2K,128K --batches 1,16 --steps 5 --warmup 2 \
        --skip dense-eager,prhs-eager,topk-decode-eager,quest-eager   # the quick subset: graphs only, < 2 min on an H200

A benchmark, not part of the package (it imports stem_cli, never the other way round).

What is timed: one decode step = every layer's attention of one new query per
sequence over a Llama-3-8B-shaped synthetic KV cache (32 layers, 32 query / 8 KV
heads, head dim 128, bf16, random values), at batch 1 and 16 and contexts 2K, 4K,
32K and 128K. Attention only: no projections, MLP or sampling. The cache is a
StaticCache (stem_cli/decode/graphs.py) filled to N positions and held at N, so
every step of a measurement runs at context N ("per-token latency at context N");
queries drift from step to step as in decode_profile.py (cosine ~0.98 between
steps), copied into a static buffer before each step (that copy is timed too).
When the caches of all layers would not fit in --mem-gib, layers share buffers
cyclically ("bufs" in the table): every layer still reads a whole cache from
memory (each is far larger than the L2 cache then), so the traffic is 32 layers'.

Variants (per token, median over --steps tokens, CUDA events around each step):
  dense-eager    SDPA per layer (FlashAttention / cuDNN decode), launched eagerly: what the profile called dense
  dense-graph    the same step captured in one CUDA graph and replayed
  splitk-graph   Triton flash-decoding split-K (kernels/sparse_decode.py, no index) in a CUDA graph
  prhs / topk-decode / quest, each -eager (DecodeRuntime.forward per layer) and -graph (the whole
                 step, selection + sparse attention of every layer, in one graph; PrHS has no host sync)
  prhs-old-graph PrHS with its selection in PyTorch (before kernels/prhs_select.py), in a graph
  splitk-fused-graph, prhs-fused-graph  the same with the sparse decode kernel's pass 2 in pass 1's launch
                 (sparse_decode.FUSED_COMBINE; off by default: it measured slower)
  splitk-nopdl-graph, prhs-nopdl-graph, splitk-pdl-graph, prhs-pdl-graph  the same without / with programmatic
                 dependent launch (kernels/launch.py) whatever the batch; the default variants use it on compute
                 capability 9.0 and newer for a step of few rows (launch.SMALL_ROWS_PER_SM)
The dense baseline for speed-ups is the fastest of dense-graph and the split-K graphs.
The memory limit is the KV bytes a dense step reads over the copy bandwidth
measured here (a large device-to-device copy: bytes read + written per second).

Selection apart from attention (graphs of the selection of every sparse layer):
topk-decode's exact top-k; PrHS on shared steps (the query repeated, so every
row shares) and on anchor steps (tau = 1: every row re-anchors).

Correctness first, on small shapes: the compiled kernels of kernels/prhs_select.py against
their PyTorch definitions (the CPU tests run them in the interpreter, with numpy's sort
in place of tl.sort); dense graph and split-K against the float64
reference; the device-side PrHS against the host-synchronising reference
(prhs_reference.py) step by step; graph replays against eager steps (outputs
and selections); and no host sync inside an eager PrHS step
(torch.cuda.set_sync_debug_mode('error')). A failed check makes the exit code 1.

The JSON (GPU, versions, command, every number) goes to profiles/decode-<date>-<gpu>.json,
the rich table last on the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import torch

from stem_cli.decode import prhs_reference
from stem_cli.decode.common import context_from
from stem_cli.decode.graphs import GraphStep, StaticCache, dense_decode_step
from stem_cli.decode.runtime import DecodeRuntime
from stem_cli.environment import error_text, is_oom, slug
from stem_cli.kernels import decode_reference as ref
from stem_cli.registry import get_decode_method
from stem_cli.timing import Interval
from stem_cli.units import format_length, parse_lengths
from tests.bench.kernels import Shape, is_num, json_safe, machine_info, na, parse_shapes, versions, write_json

DEFAULT_LENGTHS = "2K,4K,32K,128K"
DEFAULT_BATCHES = "1,16"
DEFAULT_SHAPE = "32/8/128"
SMOKE_LENGTHS = "256,512"
SMOKE_BATCHES = "1,2"
SMOKE_SHAPE = "4/2/32"
SMOKE_LAYERS = 4
SPARSE = ("prhs", "topk-decode", "quest")
DRIFT_SIGMA = 0.2
NO_GPU = "n/a (no GPU)"
DENSE_TOL = 2e-2  # bf16 kernels against the float64 reference (relative error)
SAME_SETS_MIN = 0.98  # bf16 on the GPU: a near-tie may flip a pick between the two PrHS versions

VARIANTS = (("dense-eager", "dense-graph", "splitk-graph") + tuple(f"{m}-{w}" for m in SPARSE for w in ("eager", "graph"))
            + ("prhs-old-graph", "splitk-fused-graph", "prhs-fused-graph", "splitk-nopdl-graph", "prhs-nopdl-graph",
                                                                  "splitk-pdl-graph", "prhs-pdl-graph"))
OLD = "-old"  # PrHS with its selection in PyTorch (prhs.TRITON_SELECT = False): the version before the Triton kernels
FUSED = "-fused"  # the sparse decode kernel with its pass 2 in pass 1's launch (sparse_decode.FUSED_COMBINE)
NO_PDL = "-nopdl"  # the decode kernels launched without programmatic dependent launch (launch.PDL = False)
WITH_PDL = "-pdl"  # ... and with it at any batch (launch.PDL = True; the default decides by rows per SM)
DENSE_GRAPHS = ("dense-graph", "splitk-graph", "splitk-fused-graph", "splitk-nopdl-graph", "splitk-pdl-graph")
SEED_CLAIMS = {  # the PrHS paper's figures (A100, batch 16, against its dense attention)
    "attention_latency_speedup_b16_2k": 9.9,
    "throughput_speedup_b16_4k": 2.8,
    "selection_overhead_vs_topk_max": 0.10,
}


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.decode",
        description="Time decode attention (dense eager / CUDA graph / split-K, PrHS, topk-decode, Quest) per token "
        "on a Llama-3-8B-shaped synthetic cache at batch 1 and 16; check correctness first; write a table and a JSON.",
    )
    parser.add_argument("--lengths", help=f"context lengths (default {DEFAULT_LENGTHS}; smoke {SMOKE_LENGTHS})")
    parser.add_argument("--batches", help=f"batch sizes (default {DEFAULT_BATCHES}; smoke {SMOKE_BATCHES})")
    parser.add_argument("--shape", help=f"QHEADS/KVHEADS/HEADDIM (default {DEFAULT_SHAPE}; smoke {SMOKE_SHAPE})")
    parser.add_argument("--layers", type=int, help=f"layers (default 32; smoke {SMOKE_LAYERS})")
    parser.add_argument("--mem-gib", type=float, default=64.0, help="KV-cache memory for one case; layers share buffers beyond it")
    parser.add_argument("--steps", type=int, help="timed tokens per variant (default 8; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed tokens per variant: compile, autotune, first anchors (default 3; smoke 1)")
    parser.add_argument("--skip", default="", help="comma list of variants to leave out, e.g. quest-eager,quest-graph")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="decode config field for every sparse method (budget=1024, window_tokens=64, ...)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (needs --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check of the whole code path")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the correctness checks (for a timing-only follow-up of a run whose checks passed; the JSON says so)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="profiles", help="folder for the JSON (default profiles/)")
    return parser


@dataclass
class Options:
    lengths: list[int]
    batches: list[int]
    shape: Shape
    layers: int
    mem_bytes: int
    steps: int
    warmup: int
    skip: frozenset
    overrides: dict
    device: str
    dtype: torch.dtype
    smoke: bool
    seed: int
    output: Path
    checks: bool = True


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(argv: list[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("the CPU runs only the smoke mode: add --smoke")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --smoke")
    try:
        lengths = parse_lengths(args.lengths or (SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS))
        batches = [int(x) for x in (args.batches or (SMOKE_BATCHES if args.smoke else DEFAULT_BATCHES)).split(",")]
        shape = parse_shapes(args.shape or (SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE))[0]
    except ValueError as error:
        parser.error(str(error))
    skip = frozenset(s.strip() for s in args.skip.split(",") if s.strip())
    if skip - {*VARIANTS, "selection"}:
        parser.error(f"--skip {args.skip!r}: use a comma list of {', '.join(VARIANTS)}, selection (the selection-only timings)")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: use KEY=VALUE")
        overrides[key.strip()] = _value(value.strip())
    if args.smoke:  # budgets that make the tiny contexts sparse
        overrides = {"budget": 64, "window_tokens": 16, "sink_tokens": 4, "dense_decode_layers": [0], **overrides}
    layers = args.layers or (SMOKE_LAYERS if args.smoke else 32)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if layers < 1 or args.steps < 1 or args.warmup < 0 or min(batches) < 1:
        parser.error("--layers, --steps and batches must be >= 1, --warmup >= 0")
    on_gpu = args.device == "cuda"
    return Options(lengths=lengths, batches=batches, shape=shape, layers=layers, mem_bytes=int(args.mem_gib * 2**30),
                   steps=args.steps, warmup=args.warmup, skip=skip, overrides=overrides, device=args.device,
                   dtype=torch.bfloat16 if on_gpu else torch.float32, smoke=args.smoke, seed=args.seed,
                   output=Path(args.output), checks=not args.no_checks)


def decode_config(method: str, opts: Options, **extra):
    m = get_decode_method(method)
    fields = {f.name for f in dataclasses.fields(m.defaults)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in opts.overrides.items() if k in fields}
    return dataclasses.replace(m.defaults, **{**values, **extra})


# --------------------------------------------------------------------------- inputs and timing


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drift(q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """q_{t+1} = |q_t| normalise(q_t + sigma xi) per head (as the decode profiler's queries)."""
    noise = torch.randn(q.shape, generator=generator, device=q.device, dtype=torch.float32)
    qf = q.float()
    nxt = qf + DRIFT_SIGMA * noise * qf.norm(dim=-1, keepdim=True) / q.shape[-1] ** 0.5
    return (nxt * (qf.norm(dim=-1, keepdim=True) / nxt.norm(dim=-1, keepdim=True))).to(q.dtype)


def query_stream(steps: int, layers: int, batch: int, shape: Shape, device, dtype, seed: int) -> torch.Tensor:
    """(steps, L, B, Hq, 1, d) drifting decode queries."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = [torch.randn(layers, batch, shape.hq, 1, shape.d, generator=gen, device=device, dtype=dtype)]
    for _ in range(steps - 1):
        q.append(drift(q[-1], gen))
    return torch.stack(q)


def time_steps(step: Callable[[int], None], steps: int, device: torch.device) -> dict:
    """step(s) for s in range(steps), two events around each (read after the loop): ms median / min / mean."""
    intervals = []
    with Interval(device) as whole:
        for s in range(steps):
            with Interval(device) as interval:
                step(s)
            intervals.append(interval)
    ms = [x.ms() for x in intervals]
    return {"median": statistics.median(ms), "min": min(ms), "mean": whole.ms() / steps}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, read + write counted (the memory system's rate)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    reps = 10 if device.type == "cuda" else 3
    with Interval(device) as t:
        for _ in range(reps):
            dst.copy_(src)
    seconds = t.ms() / 1e3 / reps
    del src, dst
    free_memory()
    return 2 * (nbytes // 2) * 2 / seconds


# --------------------------------------------------------------------------- one decode step per variant


class Case:
    """The inputs of one (batch, N) case: the static cache, the static query buffer, the query stream."""

    def __init__(self, batch: int, n: int, opts: Options, extra_steps: int):
        self.batch, self.n, self.opts = batch, n, opts
        self.device = torch.device(opts.device)
        shape = opts.shape
        per_layer = 2 * batch * shape.hkv * n * shape.d * torch.finfo(opts.dtype).bits // 8
        self.distinct = max(1, min(opts.layers, opts.mem_bytes // max(per_layer, 1)))
        gen = torch.Generator(device=self.device).manual_seed(opts.seed + n + 7 * batch)
        self.cache = StaticCache(opts.layers, batch, shape.hkv, shape.d, n, device=self.device, dtype=opts.dtype,
                                 distinct=self.distinct, generator=gen)
        self.cache.fill(n)
        self.stream = query_stream(extra_steps, opts.layers, batch, shape, self.device, opts.dtype, opts.seed + 13 * n + batch)
        self.q = self.stream[0].clone()  # the static query buffer every step reads
        self.scale = shape.d**-0.5
        self.layers = [SimpleNamespace(layer_idx=i) for i in range(opts.layers)]

    def set_query(self, s: int) -> None:
        self.q.copy_(self.stream[s % self.stream.shape[0]])

    def dense(self, kernel: str) -> Callable:
        return lambda: dense_decode_step(self.cache, self.q, self.scale, kernel)

    def sparse(self, runtime: DecodeRuntime) -> Callable:
        def step():
            return [runtime.forward(module, self.q[i], *self.cache.view(i), None, self.scale) for i, module in enumerate(self.layers)]

        return step

    def selection(self, method, config, states: dict) -> Callable:
        """The selection of every sparse layer (no attention), each layer with its own state."""
        sparse_layers = [i for i in range(self.opts.layers) if i not in config.dense_decode_layers]

        def step():
            out = []
            for i in sparse_layers:
                k, v = self.cache.view(i)
                ctx = context_from(i, self.opts.layers, self.q[i], k, v, None, self.scale,
                                   sinks=config.sink_tokens, window=config.window_tokens, step=1)
                out.append(method.select(ctx, config, states.setdefault(i, {"steps": 0})))
            return out

        return step


def measure(case: Case, make: Callable[[], Callable], graph: bool, opts: Options) -> dict:
    """Per-token ms of a step function: eager (warm-up tokens, then timed ones) or captured in a graph."""
    fn = make()
    s = [0]

    def advance():
        s[0] += 1
        case.set_query(s[0])

    if graph:
        runner = GraphStep(fn, case.device, warmup=max(1, opts.warmup))

        def call(_):
            advance()
            runner.replay()
    else:
        for _ in range(opts.warmup):
            advance()
            fn()

        def call(_):
            advance()
            fn()
    synchronize(case.device)
    timed = time_steps(call, opts.steps, case.device)
    del fn
    return {"per_token_ms": timed["median"], "per_token_min_ms": timed["min"], "per_token_mean_ms": timed["mean"],
            "tokens_per_s": case.batch * 1e3 / timed["median"]}


def run_variant(case: Case, variant: str, opts: Options) -> dict:
    """-old: PrHS selects in PyTorch; -fused: pass 2 in pass 1's launch; -nopdl / -pdl: dependent launches off / on."""
    from stem_cli.decode import prhs
    from stem_cli.kernels import launch, sparse_decode

    with (patch.object(prhs, "TRITON_SELECT", False if OLD in variant else None),
          patch.object(sparse_decode, "FUSED_COMBINE", FUSED in variant),
          patch.object(launch, "PDL", False if NO_PDL in variant else True if WITH_PDL in variant else None)):
        base = variant.replace(OLD, "").replace(FUSED, "").replace(NO_PDL, "").replace(WITH_PDL, "")
        return _run_variant(case, base, opts)


def _run_variant(case: Case, variant: str, opts: Options) -> dict:
    method, _, mode = variant.rpartition("-")
    graph = mode == "graph"
    if graph and case.device.type != "cuda":
        return {"status": NO_GPU}
    if method == "splitk" and case.device.type != "cuda":
        return {"status": NO_GPU}
    runtime = None
    if method in ("dense", "splitk"):
        make = lambda: case.dense("sdpa" if method == "dense" else "split-k")  # noqa: E731
    else:
        m = get_decode_method(method)
        runtime = DecodeRuntime(m, decode_config(method, opts), opts.layers)
        make = lambda: case.sparse(runtime)  # noqa: E731
    result = measure(case, make, graph, opts)
    if runtime is not None:
        stats = runtime.stats()
        result.update(kept_fraction_sparse_layers=stats["kept_fraction_sparse_layers"],
                      reanchor_fraction=stats["reanchor_fraction"])
    return {"status": "ok", **result}


def time_selection(case: Case, opts: Options, method: str, extra: dict, fixed: bool) -> tuple[float, float | None]:
    """(ms per token, anchor fraction) of one method's selection of every sparse layer: fixed, the anchor's
    own query again at every step (so every row shares), else the drifting stream."""
    graph = case.device.type == "cuda"
    m = get_decode_method(method)
    cfg = decode_config(method, opts, **extra)
    states: dict = {}
    fn = case.selection(m, cfg, states)
    case.set_query(0)
    fn()  # the anchors every later step compares with
    s = [0]

    def call():
        if not fixed:
            s[0] += 1
            case.set_query(s[0])

    runner = GraphStep(fn, case.device, warmup=1) if graph else None
    for _ in range(opts.warmup):
        call()
        runner.replay() if runner else fn()

    def timed(_):
        call()
        return runner.replay() if runner else fn()

    synchronize(case.device)
    ms_token = time_steps(timed, opts.steps, case.device)["median"]
    outputs = timed(0)  # one more step, its decisions read
    anchors = sum(float(sel.anchors) for sel in outputs)
    decisions = sum(float(sel.decisions) for sel in outputs)
    return ms_token, (anchors / decisions if decisions else None)


def run_selection(case: Case, opts: Options) -> dict:
    """ms per token of the selections alone: topk-decode's exact top-k, PrHS (Triton selection and the old
    PyTorch one) on shared steps and on anchor steps (tau = 1: every row re-anchors)."""
    from stem_cli.decode import prhs

    out: dict = {}
    for key, method, extra, fixed in (
        ("topk", "topk-decode", {}, False),
        ("prhs_shared", "prhs", {}, True),
        ("prhs_anchor", "prhs", {"tau": 1.0}, False),
        ("prhs_old_shared", "prhs", {}, True),
        ("prhs_old_anchor", "prhs", {"tau": 1.0}, False),
    ):
        if "old" in key and "prhs-old-graph" in opts.skip:  # its kernels' compiles are what a short run cannot spare
            continue
        with patch.object(prhs, "TRITON_SELECT", False if "old" in key else None):
            out[f"{key}_ms"], out[f"{key}_anchor_fraction"] = time_selection(case, opts, method, extra, fixed)
        free_memory()
    out["selection_mode"] = "CUDA graph" if case.device.type == "cuda" else "eager (CPU)"
    for key in ("prhs_shared", "prhs_old_shared"):
        if f"{key}_ms" not in out:
            continue
        out[f"{key}_over_topk"] = out[f"{key}_ms"] / out["topk_ms"] if out["topk_ms"] > 0 else None
    return out


# --------------------------------------------------------------------------- correctness checks (small shapes)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def check_dense(opts: Options) -> dict:
    """Dense SDPA in a graph and split-K against the float64 reference."""
    device = torch.device(opts.device)
    shape = opts.shape
    case = Case(2, 300, dataclasses.replace(opts, layers=2), extra_steps=2)
    want = [ref.dense_decode_attention(case.q[i].double(), *(x.double() for x in case.cache.view(i)), scale=case.scale) for i in range(2)]
    result = {}
    for key, kernel in (("dense_graph", "sdpa"), ("splitk_graph", "split-k")):
        if device.type != "cuda":
            result[key] = NO_GPU if kernel == "split-k" else None
            if kernel == "split-k":
                continue
        runner = GraphStep(case.dense(kernel), device, warmup=1)
        got = runner.replay()
        synchronize(device)
        err = max(relative_error(g, w) for g, w in zip(got, want))
        result[key] = {"rel_err": err, "ok": err < (DENSE_TOL if opts.dtype != torch.float32 else 1e-4)}
    del shape
    return result


def check_prhs_against_reference(opts: Options, steps: int = 10) -> dict:
    """Device-side PrHS vs the host-synchronising reference, step by step on a drifting stream (own runtimes)."""
    device = torch.device(opts.device)
    layers = 4
    case = Case(2, 400, dataclasses.replace(opts, layers=layers), extra_steps=steps + 1)
    cfg = decode_config("prhs", opts, budget=96, window_tokens=16, sink_tokens=4, dense_decode_layers=(0,), depth_start=0.0,
                        freeze_start=0.0, phi=0.5, psi=0.5)
    recorded = {"device": [], "reference": []}

    def recording(fn, key):
        def select(ctx, config, state):
            sel = fn(ctx, config, state)
            recorded[key].append(sel)
            return sel

        return select

    runtimes = [DecodeRuntime(SimpleNamespace(name=key, select=recording(fn, key)), cfg, layers)
                for key, fn in (("device", get_decode_method("prhs").select), ("reference", prhs_reference.select))]
    worst = 0.0
    for s in range(steps):
        case.set_query(s)
        outs = [case.sparse(rt)() for rt in runtimes]
        worst = max(worst, max(relative_error(a, b) for a, b in zip(*outs)))
    same = total = anchors_equal = 0
    for dev, want in zip(recorded["device"], recorded["reference"]):
        a, b = dev.indices.sort(-1).values, want.indices.sort(-1).values
        same += int((a == b).all(-1).sum())
        total += a.shape[0] * a.shape[1]
        anchors_equal += int(int(dev.anchors) == int(want.anchors))
    fraction = same / total if total else 1.0
    anchors_ok = anchors_equal == len(recorded["device"])
    synchronize(device)
    return {"rows_same_set": fraction, "anchor_counts_equal": anchors_ok, "output_rel_err": worst,
            "ok": fraction >= (SAME_SETS_MIN if device.type == "cuda" else 1.0) and anchors_ok}


def check_graph_replay(opts: Options, steps: int = 6) -> dict:
    """A graph of the whole PrHS decode step replays as eager steps run (outputs and anchor counts); the eager
    steps launch without dependent launches, so a race the graph's PDL launches allowed would show here."""
    from stem_cli.kernels import launch

    device = torch.device(opts.device)
    if device.type != "cuda":
        return {"status": NO_GPU}
    layers = 4
    case = Case(2, 400, dataclasses.replace(opts, layers=layers), extra_steps=steps + 2)
    cfg = decode_config("prhs", opts, budget=96, window_tokens=16, sink_tokens=4, dense_decode_layers=(0,))
    eager = DecodeRuntime(get_decode_method("prhs"), cfg, layers)
    graphed = DecodeRuntime(get_decode_method("prhs"), cfg, layers)
    case.set_query(0)
    with patch.object(launch, "PDL", False):
        for _ in range(2):
            case.sparse(eager)()
    runner = GraphStep(case.sparse(graphed), device, warmup=2)
    worst = 0.0
    for s in range(1, steps + 1):
        case.set_query(s)
        with patch.object(launch, "PDL", False):
            want = case.sparse(eager)()
        got = runner.replay()
        worst = max(worst, max(relative_error(a, b) for a, b in zip(got, want)))
    anchors = (eager.counter("anchors"), graphed.counter("anchors"))
    ok = worst < 1e-2
    return {"output_rel_err": worst, "anchors_eager_graph": anchors, "ok": ok}


def check_no_sync(opts: Options) -> dict:
    """An eager PrHS decode step (every layer) under torch.cuda.set_sync_debug_mode('error')."""
    device = torch.device(opts.device)
    if device.type != "cuda":
        return {"status": NO_GPU + "; tests/test_prhs.py counts host syncs on the CPU"}
    case = Case(2, 400, dataclasses.replace(opts, layers=4), extra_steps=4)
    runtime = DecodeRuntime(get_decode_method("prhs"), decode_config("prhs", opts, budget=96, window_tokens=16, dense_decode_layers=(0,)), 4)
    step = case.sparse(runtime)
    for s in range(2):  # warm-up: compiles, autotunes (which syncs), first anchors
        case.set_query(s)
        step()
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(2, 4):
            case.set_query(s)
            step()
        error = None
    except RuntimeError as e:
        error = error_text(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"ok": error is None, "error": error}


def check_select_kernels(opts: Options) -> dict:
    """kernels/prhs_select.py compiled: anchor_topk against softmax / mean / topk_rows over the same (bf16-rounded)
    logits, on shapes with one to three merge levels; sort_rows against compact / dedupe. The sets are compared
    by their scores (bf16 logits tie often, and ties may be broken differently): the kernel's picks must have
    exactly the scores of torch.topk's, rank for rank."""
    device = torch.device(opts.device)
    if device.type != "cuda":
        return {"status": NO_GPU + "; tests/test_prhs_select.py runs them in the interpreter"}
    from stem_cli.decode.common import NEG_INF, dedupe, softmax_rows, topk_rows
    from stem_cli.decode.prhs import compact
    from stem_cli.kernels import prhs_select

    gen = torch.Generator(device=device).manual_seed(opts.seed + 5)
    worst, cases = 0.0, []
    for b, hkv, g, d, t, lo, width in ((1, 8, 4, 128, 3000, 0, 956), (2, 8, 4, 128, 40000, 37, 956), (1, 2, 4, 64, 9000, 5, 60)):
        q = torch.randn(b, hkv, g, d, device=device, generator=gen).to(opts.dtype)
        k = torch.randn(b, hkv, t, d, device=device, generator=gen).to(opts.dtype)
        rows = b * hkv
        active = torch.rand(rows, device=device, generator=gen) < 0.7
        active[0] = True
        start = torch.zeros(b, dtype=torch.long, device=device)
        sink_end = torch.full((rows,), 4, dtype=torch.long, device=device)
        excl_end = sink_end + t // 7
        freeze_end = excl_end if lo > 0 else None
        k_rows = torch.full((rows,), width, dtype=torch.long, device=device)
        ws = t - 64
        got, _, _ = prhs_select.anchor_topk(q, k, active, lo=lo, scale=d**-0.5, key_valid=None, start=start, freeze_end=freeze_end,
                                            sink_end=sink_end, excl_end=excl_end, window_start=ws, sinks=4, k_rows=k_rows, width=width)
        logits = (torch.einsum("bhgd,bhtd->bhgt", q, k[:, :, lo:]).float() * d**-0.5).flatten(0, 1)
        pos = torch.arange(lo, t, device=device)
        if freeze_end is not None:
            logits = logits.masked_fill((pos < freeze_end[:, None])[:, None, :], NEG_INF)
        scores = softmax_rows(logits).mean(1)
        cand = (pos >= 4) & (pos < ws) & ~((pos[None, :] >= sink_end[:, None]) & (pos[None, :] < excl_end[:, None]))
        scores = scores.masked_fill(~cand, NEG_INF)
        want = topk_rows(scores, k_rows, width)
        used = want >= 0
        same_count = bool(torch.equal((got >= 0)[active], used[active]))
        a_s = scores.gather(1, (got - lo).clamp_min(0))[active][used[active]]
        w_s = scores.gather(1, want.clamp_min(0))[active][used[active]]
        err = float(((a_s - w_s).abs() / w_s.abs().clamp_min(1e-30)).max()) if same_count else float("inf")
        worst = max(worst, err)
        cases.append({"shape": [b, hkv, g, d, t, lo, width], "levels": len(prhs_select.topk_plan(t - lo, width)[2]),
                      "score_rel_err": err, "inactive_all_minus_one": bool((got[~active] == -1).all())})
    x = torch.randint(-1, 1500, (16, 3000), device=device, generator=gen)
    sorts_ok = bool(torch.equal(prhs_select.sort_rows(x, 956), compact(x, 956))
                    and torch.equal(prhs_select.sort_rows(x, 956, dedupe=True), compact(dedupe(x), 956)))
    ok = worst <= 1e-6 and sorts_ok and all(c["inactive_all_minus_one"] for c in cases)
    return {"anchor_topk": cases, "score_rel_err": worst, "sort_rows_equal": sorts_ok, "ok": ok}


def run_checks(opts: Options) -> dict:
    checks = {}
    for name, fn in (("select_kernels", check_select_kernels), ("dense", check_dense),
                     ("prhs_vs_reference", check_prhs_against_reference),
                     ("graph_replay", check_graph_replay), ("no_host_sync", check_no_sync)):
        try:
            checks[name] = fn(opts)
        except Exception as error:  # noqa: BLE001 - recorded, and the exit code says so
            traceback.print_exc()
            checks[name] = {"ok": False, "error": error_text(error)}
        free_memory()
    return checks


def check_failures(checks: dict) -> list[str]:
    found = []
    for name, result in checks.items():
        parts = result.values() if name == "dense" else [result]
        for part in parts:
            if isinstance(part, dict) and part.get("ok") is False:
                found.append(f"check {name} failed: {part}")
    return found


# --------------------------------------------------------------------------- the sweep


def run_case(batch: int, n: int, opts: Options, bandwidth: float) -> dict:
    row: dict = {"batch": batch, "n": n, "layers": opts.layers}
    extra = opts.warmup + opts.steps + 4
    try:
        case = Case(batch, n, opts, extra_steps=extra)
    except Exception as error:  # noqa: BLE001
        if not is_oom(error):
            raise
        free_memory()
        return {**row, "status": "OOM", "error": error_text(error)}
    row["distinct_buffers"] = case.distinct
    row["kv_bytes"] = case.cache.kv_bytes()
    row["memory_limit_ms"] = row["kv_bytes"] / bandwidth * 1e3
    for variant in VARIANTS:
        if variant in opts.skip:
            row[variant] = {"status": na("skipped by --skip")}
            continue
        try:
            row[variant] = run_variant(case, variant, opts)
        except Exception as error:  # noqa: BLE001 - one failing variant must not end the sweep
            row[variant] = {"status": "OOM" if is_oom(error) else f"error: {error_text(error)}"}
            if not is_oom(error):
                traceback.print_exc()
        free_memory()
    if "selection" in opts.skip:
        row["selection"] = {"status": na("skipped by --skip")}
    else:
        try:
            row["selection"] = run_selection(case, opts)
        except Exception as error:  # noqa: BLE001
            row["selection"] = {"status": "OOM" if is_oom(error) else f"error: {error_text(error)}"}
            if not is_oom(error):
                traceback.print_exc()
    del case
    free_memory()
    return finish_row(row)


def ms(row: dict, variant: str):
    part = row.get(variant)
    return part.get("per_token_ms") if isinstance(part, dict) else None


def finish_row(row: dict) -> dict:
    """The dense baseline (faster graph), its distance to the memory limit, speed-ups and throughput ratios."""
    graphs = [(ms(row, v), v) for v in DENSE_GRAPHS if is_num(ms(row, v))]
    if graphs:
        base, which = min(graphs)
    elif is_num(ms(row, "dense-eager")):
        base, which = ms(row, "dense-eager"), "dense-eager"
    else:
        base, which = None, None
    row["dense_baseline"], row["dense_baseline_ms"] = which, base
    row["dense_over_limit"] = base / row["memory_limit_ms"] if is_num(base) and row.get("memory_limit_ms") else None
    for variant in VARIANTS:
        t = ms(row, variant)
        if is_num(t) and is_num(base):
            row[variant]["speedup_vs_dense"] = base / t
    return row


def fmt(value, spec="{:.3g}") -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if is_num(value):
        return spec.format(value)
    if value is None:
        return "-"
    text = str(value)
    return "n/a" if text.startswith("n/a") else ("err" if text.startswith("error") else text)


def target_notes(rows: list[dict]) -> list[str]:
    by = {(r["batch"], r["n"]): r for r in rows}

    def get(batch, n):
        return by.get((batch, n))

    notes = []
    largest = max((r["n"] for r in rows if r["batch"] == 1), default=None)
    r = get(1, 128 * 1024) or (get(1, largest) if largest else None)
    if r is not None:
        where = f"batch 1 N={format_length(r['n'])}"
        x = r.get("dense_over_limit")
        notes.append(f"dense baseline ({r.get('dense_baseline')}) / memory limit at {where}: {fmt(x, '{:.2f}x')} "
                     f"(limit {fmt(r.get('memory_limit_ms'))} ms = {r.get('kv_bytes', 0) / 1e9:.3g} GB / copy bandwidth); "
                     f"target <= 1.5x: {'met' if is_num(x) and x <= 1.5 else 'MISSED'}")
        sp = r.get("prhs-graph", {}).get("speedup_vs_dense") if isinstance(r.get("prhs-graph"), dict) else None
        old = r.get("prhs-old-graph", {}).get("speedup_vs_dense") if isinstance(r.get("prhs-old-graph"), dict) else None
        notes.append(f"PrHS (graph) speed-up over the dense baseline at {where}: {fmt(sp, '{:.2f}x')} "
                     f"(PyTorch selection, before: {fmt(old, '{:.2f}x')}); target >= 5x: {'met' if is_num(sp) and sp >= 5 else 'MISSED'}")
        sel = r.get("selection", {})
        share = sel.get("prhs_shared_over_topk")
        notes.append(f"PrHS selection on shared steps / exact top-k's at {where}: {fmt(share, '{:.1%}')} "
                     f"({fmt(sel.get('prhs_shared_ms'))} vs {fmt(sel.get('topk_ms'))} ms, {sel.get('selection_mode')}; "
                     f"PyTorch selection, before: {fmt(sel.get('prhs_old_shared_over_topk'), '{:.1%}')}); "
                     f"target <= 10%: {'met' if is_num(share) and share <= 0.10 else 'MISSED'}")
    for n, claim, what in ((2048, 9.9, "attention latency"), (4096, 2.8, "throughput (seed: end to end; here attention only)")):
        big = max((b for b, m in by if m == n), default=None)
        r = get(big, n) if big else None
        if r is None or big == 1:
            continue
        eager = r.get("prhs-eager", {}).get("speedup_vs_dense") if isinstance(r.get("prhs-eager"), dict) else None
        graph = r.get("prhs-graph", {}).get("speedup_vs_dense") if isinstance(r.get("prhs-graph"), dict) else None
        notes.append(f"batch {big} N={format_length(n)} PrHS {what} over the dense baseline: graph {fmt(graph, '{:.2f}x')}, "
                     f"eager {fmt(eager, '{:.2f}x')}; the seed claims {claim}x (A100, vs its dense)")
    return notes


def seed_comparison(rows: list[dict]) -> dict:
    """The seed's claims beside ours (same keys): batch 16 attention latency at 2K, throughput at 4K, selection share."""
    by = {(r["batch"], r["n"]): r for r in rows}

    def speedup(batch, n, variant):
        part = by.get((batch, n), {}).get(variant)
        return part.get("speedup_vs_dense") if isinstance(part, dict) else None

    b1 = by.get((1, max((n for b, n in by if b == 1), default=0)), {})
    return {
        "seed": SEED_CLAIMS,
        "ours": {
            "attention_latency_speedup_b16_2k": {v: speedup(16, 2048, v) for v in ("prhs-graph", "prhs-old-graph", "prhs-eager")},
            "throughput_speedup_b16_4k": {v: speedup(16, 4096, v) for v in ("prhs-graph", "prhs-old-graph", "prhs-eager")},
            "selection_overhead_vs_topk": {k: (b1.get("selection") or {}).get(k) for k in ("prhs_shared_over_topk", "prhs_old_shared_over_topk")},
            "selection_overhead_at": {"batch": b1.get("batch"), "n": b1.get("n")},
        },
        "note": "seed: A100, end-to-end throughput, its dense; ours: H200 attention only, against a CUDA-graph dense at the memory limit",
    }


def print_tables(rows: list[dict], title: str, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=240)
    table = Table(title=title)
    heads = ["B", "N", "layers (bufs)", "KV GB", "limit ms", "dense eager", "dense graph", "split-K graph",
             "split-K fused graph", "split-K no-PDL graph", "split-K PDL graph", "base/limit", "prhs eager", "prhs graph", "prhs old graph",
             "prhs fused graph", "prhs no-PDL graph", "prhs PDL graph", "topk eager", "topk graph", "quest eager", "quest graph",
             "prhs/base", "tok/s base", "tok/s prhs"]
    for h in heads:
        table.add_column(h, justify="right")
    for r in rows:
        if r.get("status") == "OOM":
            table.add_row(str(r["batch"]), format_length(r["n"]), "OOM", *[""] * (len(heads) - 3))
            continue
        cells = [str(r["batch"]), format_length(r["n"]), f"{r['layers']} ({r['distinct_buffers']})", f"{r['kv_bytes'] / 1e9:.3g}",
                 fmt(r["memory_limit_ms"])]
        for v in ("dense-eager", *DENSE_GRAPHS):
            cells.append(fmt(ms(r, v) if is_num(ms(r, v)) else r[v].get("status")))
        cells.append(fmt(r.get("dense_over_limit"), "{:.2f}x"))
        for v in ("prhs-eager", "prhs-graph", "prhs-old-graph", "prhs-fused-graph", "prhs-nopdl-graph", "prhs-pdl-graph", "topk-decode-eager", "topk-decode-graph", "quest-eager", "quest-graph"):
            cells.append(fmt(ms(r, v) if is_num(ms(r, v)) else r[v].get("status")))
        prhs = r["prhs-graph"] if is_num(ms(r, "prhs-graph")) else r["prhs-eager"]
        cells.append(fmt(prhs.get("speedup_vs_dense"), "{:.2f}x"))
        base = r.get("dense_baseline")
        cells.append(fmt(r[base]["tokens_per_s"] if base else None, "{:.0f}"))
        cells.append(fmt(prhs.get("tokens_per_s"), "{:.0f}"))
        table.add_row(*cells)
    console.print(table)
    sel = Table(title="selection per token, apart from attention (all sparse layers)")
    for h in ("B", "N", "mode", "top-k ms", "PrHS shared ms", "shared/top-k", "PrHS anchor ms", "old shared ms",
              "old shared/top-k", "old anchor ms", "shared rows re-anchoring"):
        sel.add_column(h, justify="right")
    for r in rows:
        s = r.get("selection") or {}
        if "topk_ms" not in s:
            continue
        sel.add_row(str(r["batch"]), format_length(r["n"]), s["selection_mode"], fmt(s["topk_ms"]), fmt(s["prhs_shared_ms"]),
                    fmt(s["prhs_shared_over_topk"], "{:.1%}"), fmt(s["prhs_anchor_ms"]), fmt(s.get("prhs_old_shared_ms")),
                    fmt(s.get("prhs_old_shared_over_topk"), "{:.1%}"), fmt(s.get("prhs_old_anchor_ms")),
                    fmt(s["prhs_shared_anchor_fraction"], "{:.0%}"))
    console.print(sel)
    for note in notes:
        console.print(note)


def profile_path(folder: Path, gpu_name: str) -> Path:
    return folder / f"decode-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{slug(gpu_name)}.json"


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    device = torch.device(opts.device)
    machine = machine_info(opts.device)
    started = time.perf_counter()
    path = profile_path(opts.output, machine["name"])
    report = {
        "gpu": machine, "versions": versions(), "command": list(sys.argv),
        "argv": list(argv) if argv is not None else list(sys.argv[1:]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False, "elapsed_s": 0.0,
        "parameters": {
            "lengths": opts.lengths, "batches": opts.batches, "shape": opts.shape.label, "layers": opts.layers,
            "dtype": str(opts.dtype).removeprefix("torch."), "device": opts.device, "smoke": opts.smoke,
            "steps": opts.steps, "warmup": opts.warmup, "mem_gib": opts.mem_bytes / 2**30, "skip": sorted(opts.skip),
            "query_drift_sigma": DRIFT_SIGMA, "seed": opts.seed,
            "configs": {m: dataclasses.asdict(decode_config(m, opts)) for m in SPARSE},
        },
        "data": "synthetic KV cache (random values) held at N positions, drifting queries; attention only",
        "timing": "CUDA events per step, median over steps" if device.type == "cuda" else "host clock (CPU smoke)",
        "checks": {}, "copy_bandwidth_bytes_per_s": None, "rows": [], "targets": [], "failures": [],
    }
    print(f"{machine['name']}: checks first, then {len(opts.batches) * len(opts.lengths)} cases x {len(VARIANTS)} variants "
          f"({opts.layers} layers, shape {opts.shape.label})", flush=True)
    report["checks"] = run_checks(opts) if opts.checks else {"skipped": "--no-checks (timing only)"}
    print(f"[{time.perf_counter() - started:.0f}s] checks: "
          + ", ".join(f"{k} {v if isinstance(v, str) else 'ok' if not check_failures({k: v}) else 'FAILED'}"
                      for k, v in report["checks"].items()), flush=True)
    bw_bytes = 4 * 2**30 if device.type == "cuda" else 64 * 2**20
    report["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth(device, bw_bytes)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    write_json(report, path)
    for batch in opts.batches:
        for n in opts.lengths:
            row = run_case(batch, n, opts, bandwidth)
            report["rows"].append(row)
            report["elapsed_s"] = time.perf_counter() - started
            write_json(report, path)
            print(f"[{report['elapsed_s']:.0f}s] B={batch} N={format_length(n)}: base {fmt(row.get('dense_baseline_ms'))} ms "
                  f"(limit {fmt(row.get('memory_limit_ms'))}), prhs graph {fmt(ms(row, 'prhs-graph'))} ms "
                  f"(old {fmt(ms(row, 'prhs-old-graph'))}), "
                  f"topk graph {fmt(ms(row, 'topk-decode-graph'))} ms", flush=True)
    failures = check_failures(report["checks"])
    for row in report["rows"]:
        for variant in VARIANTS:
            status = row.get(variant, {}).get("status", "") if isinstance(row.get(variant), dict) else ""
            if isinstance(status, str) and status.startswith("error"):
                failures.append(f"B={row['batch']} N={format_length(row['n'])} {variant}: {status}")
        sel = row.get("selection", {})
        if isinstance(sel.get("status"), str) and sel["status"].startswith("error"):
            failures.append(f"B={row['batch']} N={format_length(row['n'])} selection: {sel['status']}")
    report.update(complete=True, targets=target_notes(report["rows"]), failures=failures, seed_comparison=seed_comparison(report["rows"]),
                  elapsed_s=time.perf_counter() - started)
    write_json(report, path)
    print_tables(report["rows"], f"decode attention per token on {machine['name']} ({report['parameters']['dtype']}, "
                 f"shape {opts.shape.label}, {opts.layers} layers; ms)", report["targets"])
    for problem in failures:
        print(f"FAILED: {problem}")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
