"""Decode profiling (`stem profile --decode`, runs/profiling.py writes the JSON): per-token decode attention latency per method and context length.

`stem profile --decode` has two sections. This module is the first ("rows" in the JSON):
attention alone, on a synthetic cache, described below. The second ("generation",
generation_profile.py; off with --no-generation) is generation end to end on the model
itself: per length and decode method one pre-fill of a random prompt under the pre-fill
method (CUDA events around it), a host sync outside the timed regions, then
new_tokens - 1 greedy decode steps (one pair of CUDA events around the whole loop, no host
read inside it, no stop at EOS), after one untimed warmup generation per length. It
reports pre-fill ms, decode ms, ms/token, decode and end-to-end tokens/s, and the speed-up
over dense decode; a length whose estimated memory exceeds the device's total is skipped
with the reason.

What is timed in this section. A synthetic KV cache with the attention shapes of the chosen model
(default llama3-8b: 32 layers, 32 query / 8 KV heads, head dim 128; random values
in the run's dtype, bf16 on a GPU), not a model: one decode step runs every
layer's attention over its cache, so the numbers are attention only (no
projections, MLP or sampling). This keeps 128K contexts inside a small device
budget. Each step appends one token to every layer's cache (a preallocated
buffer, sliced), so windows slide and PrHS's anchors age as in generation.

Queries drift like a decode stream's: per layer and head q_{t+1} = |q_t| normalise(q_t + sigma xi),
xi ~ N(0, I), sigma = 0.2 (consecutive cosine about 0.98; cosine with an anchor
falls under tau = 0.8 after about 14 steps), so PrHS's index sharing is exercised.
The random keys make attention nearly uniform: delta values here say nothing about
accuracy (use `stem generate` / evaluation for that); latency is what this measures.

Per (length, method): `warmup` untimed steps (kernel compilation, autotuning,
first anchors), then `repeat` timed steps with CUDA events around each whole step
(all layers; no per-layer event and no host sync inside the timed loop: events are
read after it; host clock on the CPU) and one pair around the whole loop
(per_token_mean_ms), then another `repeat` steps with per-stage events
(selection / attention / audit, summed over layers) for the breakdown, kept apart
so the per-stage events do not inflate the per-token latency. The per-stage sums
measure each stage's span on the GPU timeline, launch gaps included, so they can
add up to more than the per-token time. dense = SDPA over the cache for every
layer, as a user's model runs it (native GQA, the fastest backend: below), with no
runtime around it. The decode steps themselves do not synchronise with the host
(PrHS decides its re-anchors on the device). Dense in a CUDA graph, split-K and
batch 16: tests/bench/decode.py. Rows go into profiles/ as JSON.

The dense baseline is SDPA under the fastest backend at that length. Before the methods
run, a dense step is timed under each backend forced (sdpa_kernel: flash, cuDNN,
memory-efficient, math; BACKEND_PROBE_STEPS steps each after one untimed step, same
growing cache) and unforced; every method's steps at that length then run with the
fastest backend first in SDPA's priority order (the others behind it, for calls it
refuses), so the dense row is that backend and the methods' own SDPA calls use it too.
The row records the probe (sdpa_backends), the backend used (sdpa_backend), the unforced
time (per_token_unforced_ms) and which backend the unforced call matches. Why: on an H200
(torch 2.11) unforced SDPA picks cuDNN for these decode calls, which cost 42-45 ms/token
at 32K and 128K alike (a per-call cost that does not scale with the cache) against
flash's 1.7 and 4.6 ms (profiles/profile-decode-20261203-145905-nvidia-h200-llama3-8b.json):
a speed-up over the unforced call would be over a baseline no careful user runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch

from stem_cli.timing import Interval, StageTimer

GPU_DEFAULTS = ("llama3-8b", "32k,128k")
CPU_DEFAULTS = ("smollm2-135m", "2k,8k")
DECODE_METHODS_DEFAULT = "dense,topk-decode,prhs,quest"
DRIFT_SIGMA = 0.2
BACKEND_PROBE_STEPS = 3  # timed steps per forced SDPA backend in the dense row


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads, head_dim)


def _drift(q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(q.shape, generator=generator, device=q.device, dtype=torch.float32)
    qf = q.float()
    nxt = qf + DRIFT_SIGMA * noise * qf.norm(dim=-1, keepdim=True) / q.shape[-1] ** 0.5
    return (nxt * (qf.norm(dim=-1, keepdim=True) / nxt.norm(dim=-1, keepdim=True))).to(q.dtype)


def time_decode(
    methods: list[str],
    decode_configs: dict[str, Any],
    lengths: list[int],
    shape: Shape,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 1,
    warmup: int = 4,
    repeat: int = 32,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows, one per (length, method); decode_configs maps each non-dense method to its decode config."""
    from stem_cli.decode.runtime import DecodeRuntime, dense_decode
    from stem_cli.registry import get_decode_method, split_spec
    from stem_cli.environment import failed_allocation_gib, is_oom

    layers = [SimpleNamespace(layer_idx=i) for i in range(shape.layers)]
    scale = shape.head_dim**-0.5
    rows: list[dict] = []
    probe_steps = (len(_sdpa_backends()) + 1) * (1 + BACKEND_PROBE_STEPS) if "dense" in methods else 0  # + the unforced call
    for n in lengths:
        total = n + warmup + 2 * repeat + probe_steps
        gen = torch.Generator(device=device).manual_seed(seed + n)
        by_method: dict[str, dict] = {}
        caches = None
        try:
            # Each layer's decode queries for every step, drawn up front (same for every method, not timed).
            qgen = torch.Generator(device=device).manual_seed(seed + 7 * n)
            queries = []
            for _ in layers:
                q = [torch.randn(batch, shape.q_heads, 1, shape.head_dim, generator=qgen, device=device, dtype=dtype)]
                for _ in range(total - n - 1):
                    q.append(_drift(q[-1], qgen))
                queries.append(torch.stack(q))
            caches = [
                tuple(torch.randn(batch, shape.kv_heads, total, shape.head_dim, generator=gen, device=device, dtype=dtype) for _ in range(2))
                for _ in layers
            ]
        except Exception as error:
            if not is_oom(error):
                raise
            for method in methods:
                row = {"method": method, "seq_len": n, "batch": batch, "status": "OOM",
                       "failed_allocation_gib": failed_allocation_gib(error), "error": str(error).splitlines()[0][:300]}
                rows.append(row)
                if on_row:
                    on_row(row)
            continue
        def make_step(runtime, caches=caches, queries=queries, n=n):
            clock = [n]  # the cache length of the next step

            def step(timer=None):
                t = clock[0] = clock[0] + 1
                for i, module in enumerate(layers):
                    k, v, q = caches[i][0][:, :, :t], caches[i][1][:, :, :t], queries[i][t - 1 - n]
                    if runtime is None:
                        with timer.stage("attention") if timer else nullcontext():
                            dense_decode(q, k, v, None, scale)
                    else:
                        runtime.forward(module, q, k, v, None, scale)
            return step

        probe, unforced_ms, backend = None, None, None
        if "dense" in methods:
            if progress:
                progress(f"SDPA backends at {n} tokens")
            probe, unforced_ms = _probe_backends(make_step(None), device)
            backend = fastest_backend(probe)
        for method in methods:
            if progress:
                progress(f"{method} at {n} tokens")
            runtime = None
            if method != "dense":
                _, decode_name = split_spec(method)
                runtime = DecodeRuntime(get_decode_method(decode_name), decode_configs[method], shape.layers)
            row: dict[str, Any] = {"method": method, "seq_len": n, "batch": batch, "sdpa_backend": backend}
            step = make_step(runtime)
            try:
                with torch.no_grad(), sdpa_first(backend):
                    for _ in range(warmup):
                        step()
                    if runtime is not None:
                        runtime.reset_stats()  # statistics of the timed steps only; anchors carry over
                    if device.type == "cuda":
                        torch.cuda.synchronize()  # warm-up work is done before the first timed event
                    per_token = []
                    with Interval(device) as whole:  # the stream of tokens as a user sees it, no gaps between
                        for _ in range(repeat):
                            with Interval(device) as interval:  # two events per token, none per layer; no sync
                                step()
                            per_token.append(interval)
                    per_token_ms = [x.ms() for x in per_token]  # read after the loop (one sync)
                    mean_ms = whole.ms() / repeat
                    timer = StageTimer(device)
                    stages: list[dict] = []
                    if runtime is not None:
                        runtime.timer = timer
                    for _ in range(repeat):
                        step(timer)
                        stages.append(timer.collect())
                med = statistics.median(per_token_ms)
                row.update(
                    status="ok",
                    per_token_ms=med,
                    per_token_mean_ms=mean_ms,
                    per_token_min_ms=min(per_token_ms),
                    per_token_max_ms=max(per_token_ms),
                    tokens_per_s=batch * 1e3 / med,
                    selection_ms=statistics.median(s.get("selection", 0.0) for s in stages),
                    attention_ms=statistics.median(s.get("attention", 0.0) for s in stages),
                    audit_ms=statistics.median(s.get("audit", 0.0) for s in stages),
                    steps=repeat,
                )
                if runtime is None:
                    row.update(sdpa_backends=probe, per_token_unforced_ms=unforced_ms,
                               sdpa_default_matches=_closest_backend(probe, unforced_ms))
                if runtime is not None:
                    row["decode_stats"] = runtime.stats()
                    row["kept_fraction"] = row["decode_stats"]["kept_fraction"]
                    row["reanchor_fraction"] = row["decode_stats"]["reanchor_fraction"]
                else:
                    row["kept_fraction"], row["reanchor_fraction"] = 1.0, None
            except Exception as error:
                if not is_oom(error):
                    raise
                row.update(status="OOM", failed_allocation_gib=failed_allocation_gib(error), error=str(error).splitlines()[0][:300])
            finally:
                if runtime is not None:
                    runtime.timer = None
            by_method[method] = row
            rows.append(row)
            if on_row:
                on_row(row)
        caches = queries = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dense = by_method.get("dense")
        for row in by_method.values():
            ok = row.get("status") == "ok" and dense is not None and dense.get("status") == "ok"
            row["speedup"] = dense["per_token_ms"] / row["per_token_ms"] if ok else None
    return rows


def _sdpa_backends() -> dict:
    """Name -> torch SDPBackend of the backends a dense row is timed under (those this torch has)."""
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def sdpa_first(backend: str | None):
    """A context in which SDPA tries `backend` first, then the others (flash, cuDNN, memory-efficient, math: for
    calls it refuses); no change when backend is None."""
    if backend is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    backends = _sdpa_backends()
    return sdpa_kernel([backends[backend], *(b for name, b in backends.items() if name != backend)], set_priority=True)


def fastest_backend(times: dict | None) -> str | None:
    """The probed backend with the lowest per-token time, or None when none ran."""
    ran = [(t["per_token_ms"], name) for name, t in (times or {}).items() if "per_token_ms" in t]
    return min(ran)[1] if ran else None


def _timed_steps(step: Callable[[], None], device: torch.device) -> float:
    """Median ms of BACKEND_PROBE_STEPS steps after one untimed step."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(BACKEND_PROBE_STEPS):
        with Interval(device) as interval:
            step()
        times.append(interval)
    return statistics.median(x.ms() for x in times)


def _probe_backends(step: Callable[[], None], device: torch.device) -> tuple[dict, float]:
    """({backend: {"per_token_ms": ...}} under sdpa_kernel(backend), or {"status": "unsupported: ..."} where SDPA
    refuses the inputs under it; the unforced call's ms), each the median of BACKEND_PROBE_STEPS steps after one
    untimed step."""
    from torch.nn.attention import sdpa_kernel

    from stem_cli.environment import is_oom

    with torch.no_grad():
        unforced_ms = _timed_steps(step, device)
    out: dict = {}
    for name, backend in _sdpa_backends().items():
        caught: list = []
        try:
            with torch.no_grad(), sdpa_kernel([backend]), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # SDPA says why a backend refuses the inputs: kept in the status
                out[name] = {"per_token_ms": _timed_steps(step, device)}
        except RuntimeError as error:
            if is_oom(error):  # math materialises the expanded K/V: its OOM must not cost the dense row
                out[name] = {"status": "OOM"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if not any(m in str(error) for m in ("No available kernel", "No viable backend", "not supported")):
                raise
            why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught)) or str(error).splitlines()[0]
            out[name] = {"status": "unsupported: " + why[:400]}  # its steps unused: the buffer has room for them
    return out, unforced_ms


def _closest_backend(times: dict, default_ms: float) -> str | None:
    """The forced backend whose time is nearest the unforced call's (within 25%), or None."""
    best = min(((abs(t["per_token_ms"] - default_ms), name) for name, t in times.items() if "per_token_ms" in t), default=None)
    return best[1] if best and best[0] <= 0.25 * default_ms else None
