"""The one function registered with transformers' AttentionInterface.

transformers calls `attention(module, query, key, value, attention_mask, ...)` from the
model's own attention layer (no model class is touched). Once per call it decides what
the call is, computes the softmax scale and the valid keys, and hands an AttentionCall
to the module's handler:

    prefill   as many queries as keys (> 1), causal, on a full-attention layer
    decode    one query against a cache of several keys, same layers
    chunk     several queries against a longer cache (continued pre-fill), same layers
    (other)   sliding-window layers (e.g. Gemma-3's local layers), non-causal calls, a
              module without a handler: transformers' SDPA, untouched

A handler is any object with `attend(call) -> Tensor (B, Hq, N, d) | None`; None hands
the call back to SDPA. Handlers: the method runtime (stem_cli.integration.Runtime), the
fidelity measurement (tasks/fidelity.py), calibration and router training
(stem_cli/elastic). A module's handler is its `stem_handler` attribute; a model loaded
with attn_implementation="stem..." and never given one runs the default handler of
that name (registered with `install`).

Padding: the boolean mask's last row marks the valid keys of each sequence (in a
pre-fill every key is some query's position), so padded keys are never attended and
padded queries are left out of the budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

HANDLER_ATTR = "stem_handler"
HANDLED_NAME = "stem_handler"  # the attn_implementation `handling` switches a model to
UNSUPPORTED = ("softcap", "s_aux")  # attention variants the block-sparse path does not compute


@dataclass
class AttentionCall:
    """One governed attention call, as the handler sees it: q (B, Hq, N, d), k/v (B, Hkv, T, d)."""

    kind: str  # "prefill" | "decode" | "chunk"
    module: Any
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    attention_mask: Any = field(repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)
    _key_valid: Any = field(default=None, repr=False)

    @property
    def key_valid(self) -> torch.Tensor | None:
        """(B, T) bool of valid keys, or None when nothing is padded (computed once per call)."""
        if self._key_valid is None:
            self._key_valid = (key_valid(self.attention_mask, self.query.shape[0], self.key.shape[2]),)
        return self._key_valid[0]

    def check_supported(self, who: str = "stem") -> None:
        for name in UNSUPPORTED:
            if self.kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"{who}: attention with {name} is not supported by the block-sparse path; "
                    "load the model with attn_implementation='sdpa' or 'eager'"
                )


def key_valid(attention_mask, batch: int, n: int) -> torch.Tensor | None:
    """(B, N) bool of valid keys from transformers' 4-D mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -n:]
    valid = last if last.dtype == torch.bool else last == 0
    valid = valid.expand(batch, n)
    return None if bool(valid.all()) else valid


def governed(module, kwargs) -> bool:
    """Full-attention causal layers are the method's; sliding-window layers stay as the model made them."""
    return (
        kwargs.get("sliding_window") is None
        and getattr(module, "sliding_window", None) is None
        and getattr(module, "is_causal", True)
    )


def call_kind(module, query, key, kwargs) -> str | None:
    """'prefill', 'decode', 'chunk', or None for a call the handlers never see."""
    if not governed(module, kwargs):
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == kv_len:
        return "prefill" if q_len > 1 else None
    if q_len == 1:
        return "decode"
    return "chunk"


_installed: set[str] = set()
_default_handlers: dict[str, Callable[[], Any]] = {}  # attn_implementation name -> handler factory
_defaults_made: dict[str, Any] = {}


def handler_of(module) -> Any:
    handler = getattr(module, HANDLER_ATTR, None)
    if handler is not None:
        return handler
    config = getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if name not in _default_handlers:
        return None
    if name not in _defaults_made:  # loaded with attn_implementation="stem..." and never apply()'d
        _defaults_made[name] = _default_handlers[name]()
    return _defaults_made[name]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature -> (output (B, N, Hq, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kind = call_kind(module, query, key, kwargs)
    handler = handler_of(module) if kind is not None else None
    out = None
    if handler is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        call = AttentionCall(kind, module, getattr(module, "layer_idx", 0), query, key, value, scale, attention_mask, kwargs)
        out = handler.attend(call)
    if out is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return out.transpose(1, 2).contiguous(), None


def install(name: str, default_handler: Callable[[], Any] | None = None) -> None:
    """Register `attention` (and SDPA's boolean mask) under `name` with transformers (idempotent).

    `default_handler` makes the handler of modules that have none while the model runs `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if default_handler is not None:
        _default_handlers[name] = default_handler
    if name not in _installed:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, sdpa_mask)
        _installed.add(name)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention layers: modules that own a layer index and q/k/v projections."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    ]


def attach(model, handler, attn_implementation: str = HANDLED_NAME) -> list[torch.nn.Module]:
    """Give every attention layer of `model` `handler` and switch the model to the hook; the layers."""
    install(attn_implementation)
    modules = attention_modules(model)
    for module in modules:
        setattr(module, HANDLER_ATTR, handler)
    model.set_attn_implementation(attn_implementation)
    return modules


@contextmanager
def handling(model, handler):
    """Run `model` with `handler` on its attention layers, then put back what was there."""
    modules = attention_modules(model)
    before = [getattr(m, HANDLER_ATTR, None) for m in modules]
    previous = model.config._attn_implementation
    attach(model, handler)
    try:
        yield handler
    finally:
        for module, old in zip(modules, before):
            if old is None:
                if hasattr(module, HANDLER_ATTR):
                    delattr(module, HANDLER_ATTR)
            else:
                setattr(module, HANDLER_ATTR, old)
        model.set_attn_implementation(previous)
