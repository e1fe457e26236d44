"""Greedy generation with the pre-fill timed apart from decoding.

transformers' `generate` hides where the time goes; the question here is
pre-fill time under each method, so the loop is written out: one pre-fill pass
that fills the KV cache (logits for the last position only), then one token
per step against the cache (decode steps take the dense path).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    new_tokens: list[int]
    prefill_seconds: float
    decode_seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_cache(model, cache) -> dict:
    """The forward keyword for a KV cache: `cache` where transformers has renamed it (its old name,
    `past_key_values`, then warns on every call), `past_key_values` on releases before the rename.
    The cache object is filled in place, so callers pass the same one to every step."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@dataclass
class Prefilled:
    """One prompt after its pre-fill: the filled cache, the first new token, the pre-fill time."""

    cache: object
    first_token: int
    length: int
    seconds: float


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> Prefilled:
    """One pre-fill pass (batch 1) that fills a fresh KV cache; logits for the last position only."""
    from transformers import DynamicCache

    device = input_ids.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    _sync(device)
    return Prefilled(cache, token, input_ids.shape[1], time.perf_counter() - t0)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int]) -> Generation:
    device = input_ids.device
    first = prefill(model, input_ids)
    cached = with_cache(model, first.cache)
    token = first.first_token
    t1 = time.perf_counter()
    tokens = [token]
    while len(tokens) < max_new_tokens and token not in stop_ids:
        step = torch.tensor([[token]], device=device)
        out = model(input_ids=step, **cached, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    _sync(device)
    t2 = time.perf_counter()
    if tokens[-1] in stop_ids:
        tokens.pop()
    return Generation(tokens, first.seconds, t2 - t1)


def stack_caches(prefilled: list[Prefilled]):
    """The caches of several pre-filled prompts as one left-padded batch cache, and its (B, T) mask.

    Each prompt was pre-filled alone, so its pre-fill (block grid, selection, budget) is exactly
    the unbatched one; only decoding is batched. Row b's cache is shifted right by
    T - length_b slots, masked out. A sliding-window layer keeps its last min(length, W - 1)
    keys and is padded on the left the same way; its token count (`cumulative_length`) becomes T,
    the shared slot count, so the window is measured in slots, which within a row are positions.
    Position ids are each row's own (length_b + step), passed with every decode step.
    The first prompt's cache object becomes the batch cache: the prompts' caches are used up.
    """
    batch_cache = prefilled[0].cache
    total = max(p.length for p in prefilled)
    for i, layer in enumerate(batch_cache.layers):
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise NotImplementedError(f"batched decoding stacks DynamicCache layers; this model's cache has a {type(layer).__name__}")
        rows = [p.cache.layers[i] for p in prefilled]
        width = max(r.keys.shape[-2] for r in rows)
        layer.keys = torch.cat([_left_pad(r.keys, width) for r in rows])
        layer.values = torch.cat([_left_pad(r.values, width) for r in rows])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = total
    device = batch_cache.layers[0].keys.device
    slots = torch.arange(total, device=device)
    lengths = torch.tensor([p.length for p in prefilled], device=device)
    mask = slots[None, :] >= (total - lengths)[:, None]
    return batch_cache, mask.long(), lengths


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))


@torch.no_grad()
def greedy_batch(model, prefilled: list[Prefilled], *, max_new_tokens: list[int], stop_ids: set[int]) -> tuple[list[list[int]], float]:
    """Greedy decoding of several pre-filled prompts together: each row's new tokens, and the decode time.

    A row that has stopped (a stop token, or its own token budget) keeps a slot in the batch
    but its tokens are no longer kept; the loop ends when every row has stopped.
    """
    device = prefilled[0].cache.layers[0].keys.device
    cache, mask, lengths = stack_caches(prefilled)
    cached = with_cache(model, cache)
    tokens = [[p.first_token] for p in prefilled]
    done = [t[-1] in stop_ids or len(t) >= cap for t, cap in zip(tokens, max_new_tokens)]
    step_token = torch.tensor([[p.first_token] for p in prefilled], device=device)
    _sync(device)
    t0 = time.perf_counter()
    step = 0
    while not all(done):
        mask = torch.cat([mask, mask.new_ones(len(prefilled), 1)], dim=1)
        positions = (lengths + step)[:, None]
        out = model(input_ids=step_token, attention_mask=mask, position_ids=positions, **cached, use_cache=True)
        step_token = out.logits[:, -1].argmax(-1, keepdim=True)
        step += 1
        for row, token in enumerate(step_token[:, 0].tolist()):
            if not done[row]:
                tokens[row].append(token)
                done[row] = token in stop_ids or len(tokens[row]) >= max_new_tokens[row]
    _sync(device)
    seconds = time.perf_counter() - t0
    for row in tokens:
        if row and row[-1] in stop_ids:
            row.pop()
    return tokens, seconds


def stop_ids_of(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
