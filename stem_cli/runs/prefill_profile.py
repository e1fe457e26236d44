"""Pre-fill profiling: end-to-end time against attention time, per method and length.

For each length and method: `warmup` untimed pre-fills, then `repeat` timed ones.
Each timed pre-fill is the forward pass that fills a fresh KV cache with logits for
the last position only, timed with CUDA events (host clock on the CPU). Inside it,
every governed attention call records two intervals, estimation (scoring +
selection) and attention (the executor), summed over layers; "other" is the rest
of the forward. After each pre-fill one decode step is timed. Medians and the
min-max spread are reported; speed-up is dense's median over the method's, both
from this run. NVML telemetry is sampled during the timed repeats.

An out-of-memory at one (method, length) is recorded as "OOM" with the allocation
that failed, and the sweep goes on.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

import stem_cli
from stem_cli.environment import failed_allocation_gib, is_oom
from stem_cli.nvml import NvmlSampler
from stem_cli.timing import Interval, StageTimer


@dataclass
class Sample:
    e2e_ms: float
    attention_ms: float
    estimation_ms: float
    decode_ms: float
    peak_bytes: int | None


def _prefill_and_decode(model, ids: torch.Tensor) -> tuple[float, float]:
    from transformers import DynamicCache

    from stem_cli.generation import with_cache

    device = ids.device
    cached = with_cache(model, DynamicCache(config=model.config))
    with Interval(device) as prefill:
        out = model(input_ids=ids, **cached, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    with Interval(device) as decode:
        model(input_ids=token, **cached, use_cache=True)
    return prefill.ms(), decode.ms()


def _measure(model, ids: torch.Tensor, timer: StageTimer) -> Sample:
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ids.device)
    e2e, decode = _prefill_and_decode(model, ids)
    stages = timer.collect()  # the decode step's attention is SDPA outside the governed path
    peak = torch.cuda.max_memory_allocated(ids.device) if cuda else None
    return Sample(e2e, stages.get("attention", 0.0), stages.get("estimation", 0.0), decode, peak)


def _summary(samples: list[Sample]) -> dict[str, Any]:
    def med(values):
        return statistics.median(values)

    e2e = [s.e2e_ms for s in samples]
    attention = med([s.attention_ms for s in samples])
    estimation = med([s.estimation_ms for s in samples])
    row = {
        "status": "ok",
        "e2e_ms": med(e2e),
        "e2e_min_ms": min(e2e),
        "e2e_max_ms": max(e2e),
        "attention_ms": attention,
        "estimation_ms": estimation,
        "other_ms": max(med(e2e) - attention - estimation, 0.0),
        "decode_ms": med([s.decode_ms for s in samples]),
        "repeats": len(samples),
    }
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    row["peak_gib"] = max(peaks) / 2**30 if peaks else None
    return row


def profile_prefill(
    model,
    methods: list[str],
    configs: dict[str, Any],
    lengths: list[int],
    *,
    batch: int = 1,
    warmup: int = 2,
    repeat: int = 5,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows of results, one per (length, method), in that order; see the module docstring."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    sampler = NvmlSampler(device.index or 0) if device.type == "cuda" else None
    rows: list[dict] = []
    for n in lengths:
        generator = torch.Generator().manual_seed(seed + n)
        ids = torch.randint(0, vocab, (batch, n), generator=generator).to(device)
        by_method: dict[str, dict] = {}
        for method in methods:
            if progress:
                progress(f"{method} at {n} tokens")
            runtime = stem_cli.apply(model, method, configs[method])
            runtime.timer = StageTimer(device)
            row: dict[str, Any] = {"method": method, "seq_len": n, "batch": batch}
            try:
                with torch.no_grad():
                    for _ in range(warmup):
                        _measure(model, ids, runtime.timer)
                    samples = []
                    runtime.recorder.reset()
                    with sampler if sampler else nullcontext():
                        for _ in range(repeat):
                            samples.append(_measure(model, ids, runtime.timer))
                row.update(_summary(samples))
                # Every repeat is the same pre-fill, so the budget of all of them is the budget of one.
                row["bud"] = runtime.recorder.bud
                row["tokens_per_s"] = batch * n / (row["e2e_ms"] / 1e3)
                row["nvml"] = sampler.summary() if sampler else None
            except Exception as error:  # noqa: BLE001 - only OOM is recoverable; anything else is re-raised
                if not is_oom(error):
                    raise
                row.update(status="OOM", failed_allocation_gib=failed_allocation_gib(error), error=str(error).splitlines()[0][:300])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                runtime.timer = None
            by_method[method] = row
            rows.append(row)
            if on_row:
                on_row(row)
        dense = by_method.get("dense")
        for row in by_method.values():
            ok = row.get("status") == "ok" and dense is not None and dense.get("status") == "ok"
            row["speedup"] = dense["e2e_ms"] / row["e2e_ms"] if ok else None
    return rows
