"""End-to-end generation profiling, the second section of `stem profile --decode` (profiling.py writes the JSON).

What is timed. The model itself (--model; on a GPU usually random weights built from its
config), not a synthetic cache. Per length n the prompt is n random token ids (the
generator seeded with seed + n, as the pre-fill profile's). Per (length, decode method),
one generation:
- the pre-fill: one forward pass of the prompt under the pre-fill method (--prefill-method,
  default stem) that fills a fresh cache (below), logits for the last position
  only; its argmax is the first new token. One pair of CUDA events around it.
- a host synchronisation, outside both timed regions (a real pre-fill's token is read
  before decoding goes on), so the decode loop starts with an empty launch queue and
  none of its launches hide behind the pre-fill.
- new_tokens - 1 greedy decode steps with the decode method (dense = transformers' own
  SDPA over the cache, the other methods through the hook's decode runtime), every method's
  with the same SDPA backend first in SDPA's priority (sdpa_backends: the fastest the
  attention section measured at that length; unforced SDPA picks cuDNN on an H200, 9-27x
  slower there than flash for decode; decode_profile.py), the pre-fill unforced. No stop at
  EOS, so every method makes exactly new_tokens tokens; the argmax stays on the device and
  nothing in the loop reads a value on the host. One pair of CUDA events around the whole
  loop (host clock on the CPU).
The cache is transformers' DynamicCache with its full-attention layers replaced by
PreallocatedLayer: buffers for n + new_tokens positions made at the pre-fill, each step's key
and value written in place, views of the filled prefix handed to attention. DynamicLayer
itself concatenates, a copy of the whole cache per step (about 34 GB of traffic per token for
Llama-3-8B at 128K, several ms on an H200), which would bury the attention methods'
differences under a cost a long-context user would not pay. Sliding-window layers keep their
own class. The numbers are the whole model (projections,
MLP, norms, logits), so attention is one part of them; the first section of --decode
(decode_profile.py) times attention alone.

Warmup. Per length, one untimed generation at that length: one pre-fill, then
WARMUP_TOKENS decode steps with each decode method in turn on the same cache. Kernels
compile and autotune there; it runs at the timed length because some Triton launch
parameters (power-of-two tile and chunk counts) follow the cache length. Those are the
same for every cache length in (n, n + 128] when n is a multiple of a large power of two
(32k, 128k); a length just below such a boundary could compile once inside a timed loop.

Per row: prefill_ms, decode_ms, decode_steps (new_tokens - 1), ms_per_token =
decode_ms / decode_steps, decode_tokens_per_s = batch x decode_steps / decode time,
e2e_tokens_per_s = batch x new_tokens / (pre-fill + decode time), speedup = dense decode's
decode_ms / this row's (same length, same run), e2e_speedup the same on pre-fill + decode,
tokens (the first sequence's new token ids), matches_dense (how many leading tokens equal
dense decode's), and the decode runtime's statistics (kept fraction, re-anchors).

Memory. Before a length runs, what it needs is estimated (`needed_bytes`: the tensors
already resident, the KV cache of n + new tokens, one layer's spare copy, the pre-fill's
activations) and compared with the device's total memory (the CUDA device properties; the
machine's physical memory on the CPU). A length that would not fit is recorded, per decode
method, with status "skipped" and the reason; an out-of-memory during a run as "OOM".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

import stem_cli
from stem_cli.environment import failed_allocation_gib, is_oom
from stem_cli.runs.decode_profile import sdpa_first
from stem_cli.timing import Interval

WARMUP_TOKENS = 16  # decode steps per method in the warmup: covers the cache length's residues mod 16 (Triton specialises on them)


def prompt_ids(vocab: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The prompt of length n: (batch, n) random token ids, generator seeded with seed + n (CPU, then moved)."""
    generator = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, vocab, (batch, n), generator=generator)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def total_memory_bytes(device: torch.device) -> int:
    """The device's memory: CUDA device properties on a GPU, physical memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def needed_bytes(model, n: int, new_tokens: int, batch: int) -> dict[str, int]:
    """What one generation of n + new_tokens tokens needs, by part (an estimate; the total under "total").

    resident: the tensors allocated now (the weights, on a GPU torch's allocated bytes);
    kv_cache: keys and values of every layer for n + new_tokens positions, plus one layer's
    copy (head room: the pre-fill writes a layer's keys before its buffer holds them); activations: the pre-fill's largest live set, about
    2 hidden + 3 MLP intermediate + 3 (q + k + v) head widths per token, and on the CPU one
    layer's (B, Hq, n, n) float32 scores (its SDPA materialises them)."""
    text = _text_config(model)
    param = next(model.parameters())
    device, elem = param.device, param.element_size()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = text.num_hidden_layers
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = sum(p.numel() * p.element_size() for p in model.parameters())
    per_layer_kv = 2 * batch * kv_heads * head_dim * (n + new_tokens) * elem
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    width = 2 * text.hidden_size + 3 * intermediate + 3 * (heads + 2 * kv_heads) * head_dim
    activations = batch * n * width * elem
    if device.type != "cuda":
        activations += batch * heads * n * n * 4
    parts = {"resident": resident, "kv_cache": (layers + 1) * per_layer_kv, "activations": activations}
    parts["total"] = sum(parts.values())
    return parts


def _forward_kwargs(model, cache) -> dict:
    from stem_cli.generation import with_cache

    return {**with_cache(model, cache), "use_cache": True}


def preallocated_cache(model, capacity: int):
    """A transformers DynamicCache whose full-attention layers are PreallocatedLayer(capacity)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """Keys and values in buffers of `capacity` positions, made at the first update (the pre-fill);
        later updates write in place and return views of the filled prefix (strided along T, which the
        decode kernels and SDPA read as they are): no copy of the cache per step."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.get_seq_length()
            end = start + key_states.shape[-2]
            if start == 0:
                size = max(capacity, end)
                self.key_buffer = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
                self.value_buffer = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
            if end > self.key_buffer.shape[-2]:
                raise ValueError(f"the generation cache holds {self.key_buffer.shape[-2]} positions; {end} asked for")
            self.key_buffer[..., start:end, :] = key_states
            self.value_buffer[..., start:end, :] = value_states
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, capacity: int):
    """(cache, first token (B, 1) on the device, the pre-fill's Interval)."""
    cache = preallocated_cache(model, capacity)
    with Interval(ids.device) as interval:
        out = model(input_ids=ids, **_forward_kwargs(model, cache), logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    return cache, token, interval


@torch.no_grad()
def _decode(model, cache, token: torch.Tensor, steps: int):
    """`steps` greedy steps from `token`: ((B, steps) new tokens, the loop's Interval). No host read inside."""
    kwargs = _forward_kwargs(model, cache)
    tokens = []
    with Interval(token.device) as interval:
        for _ in range(steps):
            out = model(input_ids=token, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return (torch.cat(tokens, dim=1) if tokens else token[:, :0]), interval


def generate_timed(model, ids: torch.Tensor, new_tokens: int, sdpa_backend: str | None = None) -> tuple[torch.Tensor, float, float]:
    """One timed generation: ((B, new_tokens) new token ids, pre-fill ms, decode ms); see the module docstring."""
    cache, first, prefill = _prefill(model, ids, ids.shape[1] + new_tokens)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)  # between the two timed regions: the decode loop starts with an empty queue
    with sdpa_first(sdpa_backend):
        rest, decode = _decode(model, cache, first, new_tokens - 1)
    tokens = torch.cat([first, rest], dim=1)
    return tokens, prefill.ms(), decode.ms()


def _spec(prefill_method: str, decode_method: str) -> str:
    return prefill_method if decode_method == "dense" else f"{prefill_method}+{decode_method}"


def time_generation(
    model,
    prefill_method: str,
    decode_methods: list[str],
    configs: dict[str, Any],
    lengths: list[int],
    *,
    new_tokens: int = 128,
    batch: int = 1,
    seed: int = 0,
    total_memory: int | None = None,
    sdpa_backends: dict[int, str | None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows, one per (length, decode method); configs maps each decode method ("dense" too) to its
    run config (the pre-fill method's config, combined with the decode method's for the others);
    sdpa_backends: per length, the SDPA backend the decode loops try first (None or absent: unforced)."""
    device = next(model.parameters()).device
    vocab = _text_config(model).vocab_size
    total_memory = total_memory if total_memory is not None else total_memory_bytes(device)
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        if on_row:
            on_row(row)

    for n in lengths:
        backend = (sdpa_backends or {}).get(n)
        base = {"seq_len": n, "batch": batch, "prefill_method": prefill_method, "new_tokens": new_tokens, "decode_sdpa_backend": backend}
        need = needed_bytes(model, n, max(new_tokens, len(decode_methods) * WARMUP_TOKENS), batch)
        if need["total"] > total_memory:
            reason = (f"needs about {need['total'] / 2**30:.1f} GiB (resident {need['resident'] / 2**30:.1f}, KV cache "
                      f"{need['kv_cache'] / 2**30:.1f}, pre-fill activations {need['activations'] / 2**30:.1f}) of the "
                      f"device's {total_memory / 2**30:.1f} GiB")
            for method in decode_methods:
                emit({**base, "decode_method": method, "method": _spec(prefill_method, method), "status": "skipped",
                      "reason": reason, "needed_gib": need["total"] / 2**30})
            continue
        ids = prompt_ids(vocab, n, batch, seed).to(device)
        failed = None
        try:
            if progress:
                progress(f"warmup at {n} tokens")
            _warmup(model, ids, prefill_method, decode_methods, configs, new_tokens, backend)
        except Exception as error:  # noqa: BLE001 - only OOM is recoverable; anything else is re-raised
            if not is_oom(error):
                raise
            failed = {"status": "OOM", "stage": "warmup", "failed_allocation_gib": failed_allocation_gib(error),
                      "error": str(error).splitlines()[0][:300]}
        if failed is not None:  # outside the except block: its traceback no longer holds the cache
            _free(device)
            for method in decode_methods:
                emit({**base, "decode_method": method, "method": _spec(prefill_method, method), **failed})
            continue
        by_method: dict[str, dict] = {}
        for method in decode_methods:
            if progress:
                progress(f"{_spec(prefill_method, method)} at {n} tokens, {new_tokens} new")
            runtime = stem_cli.apply(model, _spec(prefill_method, method), configs[method])
            runtime.recorder.reset()
            row: dict[str, Any] = {**base, "decode_method": method, "method": _spec(prefill_method, method)}
            try:
                tokens, prefill_ms, decode_ms = generate_timed(model, ids, new_tokens, backend)
                steps = new_tokens - 1
                row.update(
                    status="ok",
                    prefill_ms=prefill_ms,
                    decode_ms=decode_ms,
                    decode_steps=steps,
                    ms_per_token=decode_ms / steps,
                    decode_tokens_per_s=batch * steps / (decode_ms / 1e3),
                    e2e_ms=prefill_ms + decode_ms,
                    e2e_tokens_per_s=batch * new_tokens / ((prefill_ms + decode_ms) / 1e3),
                    bud=runtime.recorder.bud,
                    tokens=tokens[0].tolist(),
                )
                if runtime.decode is not None:
                    row["decode_stats"] = runtime.decode.stats()
                    row["kept_fraction"] = row["decode_stats"]["kept_fraction"]
                    row["reanchor_fraction"] = row["decode_stats"]["reanchor_fraction"]
                else:
                    row["kept_fraction"], row["reanchor_fraction"] = 1.0, None
            except Exception as error:  # noqa: BLE001 - as above
                if not is_oom(error):
                    raise
                row.update(status="OOM", failed_allocation_gib=failed_allocation_gib(error), error=str(error).splitlines()[0][:300])
            _free(device)
            by_method[method] = row
            emit(row)
        _compare_to_dense(by_method)
    return rows


def _warmup(model, ids, prefill_method, decode_methods, configs, new_tokens, sdpa_backend=None) -> None:
    """One untimed generation at this length: one pre-fill, then a few decode steps per decode method."""
    stem_cli.apply(model, _spec(prefill_method, decode_methods[0]), configs[decode_methods[0]])
    cache, token, _ = _prefill(model, ids, ids.shape[1] + len(decode_methods) * min(WARMUP_TOKENS, new_tokens))
    for method in decode_methods:
        stem_cli.apply(model, _spec(prefill_method, method), configs[method])  # a fresh decode state for this method
        with sdpa_first(sdpa_backend):
            _, _ = _decode(model, cache, token, min(WARMUP_TOKENS, new_tokens))
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    del cache
    _free(ids.device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare_to_dense(by_method: dict[str, dict]) -> None:
    """Speed-ups and token agreement against dense decode of the same length and run (None without one)."""
    dense = by_method.get("dense")
    dense_ok = dense is not None and dense.get("status") == "ok"
    for row in by_method.values():
        ok = dense_ok and row.get("status") == "ok"
        row["speedup"] = dense["decode_ms"] / row["decode_ms"] if ok else None
        row["e2e_speedup"] = dense["e2e_ms"] / row["e2e_ms"] if ok else None
        if ok:
            same = 0
            for a, b in zip(row["tokens"], dense["tokens"]):
                if a != b:
                    break
                same += 1
            row["matches_dense"] = same
        else:
            row["matches_dense"] = None
