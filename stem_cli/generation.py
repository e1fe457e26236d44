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


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int]) -> Generation:
    from transformers import DynamicCache

    device = input_ids.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    t0 = time.perf_counter()
    cached = with_cache(model, cache)
    out = model(input_ids=input_ids, **cached, use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    _sync(device)
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
    return Generation(tokens, t1 - t0, t2 - t1)


def stop_ids_of(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
