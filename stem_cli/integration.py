"""Plug methods into Hugging Face models through transformers' AttentionInterface.

Each registry method gets an `attn_implementation` name ("stem", and "stem_<name>"
for every other method: "stem_uniform", "stem_xattention", "stem_elastic", ...),
registered with the attention interface and, for mask creation, with the mask
interface as SDPA's boolean mask.
No model class is touched: the model's own attention layer calls our function.

Per call, our function decides:
- pre-fill (as many queries as keys) on a full-attention layer not in the
  method's dense list: selector -> BlockIndex -> executor;
- dense layers: the executor with a full index (SDPA);
- decode steps on a governed layer: the decode method's runtime when one is
  attached (`stem+prhs`, stem_cli/decode), else transformers' SDPA;
- continued pre-fill against a cache and sliding-window layers (e.g. Gemma-3's
  local layers): transformers' own SDPA path, untouched.

Hooks for the tools around a run: `Runtime.probe` (the budget solver tries
selections on each layer's real q/k/v) and a method's `prepare(model, config)`,
called by `apply` (Elastic Attention hooks its router's pre-RoPE keys there).

Padding: the boolean mask's last row marks the valid keys of each sequence
(in a pre-fill every key is some query's position), so padded keys are never
attended and padded queries are left out of the budget.

Usage:
    import stem_cli
    runtime = stem_cli.apply(model, "stem", mu=0.6)   # or attn_implementation="stem" at load
    model.generate(...); print(runtime.recorder.bud)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from stem_cli.config import ConfigError, replace
from stem_cli.executor import attend
from stem_cli.index import BlockIndex, block_pair_counts, causal_pairs, computed_pairs
from stem_cli.methods import METHODS, Method, get_method
from stem_cli.timing import StageTimer


@dataclass
class BudgetRecorder:
    """Token pairs computed vs. dense causal pairs, per layer, since the last reset.
    (Timing lives in the profiler, with CUDA events; host clocks here would lie on a GPU.)"""

    # Per layer lists of 0-dim tensors, summed when read: no device sync inside the forward.
    computed: dict[int, list] = field(default_factory=dict)
    causal: dict[int, list] = field(default_factory=dict)
    calls: int = 0  # governed pre-fill attention calls

    def add(self, layer: int, computed, causal) -> None:
        self.computed.setdefault(layer, []).append(computed)
        self.causal.setdefault(layer, []).append(causal)
        self.calls += 1

    def _totals(self) -> dict[int, tuple[float, float]]:
        return {
            layer: (float(sum(float(x) for x in self.computed[layer])), float(sum(float(x) for x in self.causal[layer])))
            for layer in sorted(self.causal)
        }

    def reset(self) -> None:
        self.computed.clear()
        self.causal.clear()
        self.calls = 0

    @property
    def bud(self) -> float | None:
        """Computed / causal pairs over every governed layer and head (dense layers included)."""
        totals = self._totals().values()
        causal = sum(c for _, c in totals)
        return sum(done for done, _ in totals) / causal if causal else None

    def per_layer(self) -> dict[int, float]:
        return {layer: done / causal for layer, (done, causal) in self._totals().items() if causal}


@dataclass
class Runtime:
    """A method with its config, attached to a model's attention layers."""

    method: Method
    config: Any
    recorder: BudgetRecorder = field(default_factory=BudgetRecorder)
    timer: StageTimer | None = None  # set by the profiler: estimation / attention time per call
    # Set by the budget solver: called with each governed pre-fill call's (layer, q, k, v, scale,
    # key_valid) before the method runs, to try selections on the real activations.
    probe: Any = None
    # A decode method's runtime (stem_cli.decode.DecodeRuntime) for q_len == 1 steps, or None: dense decode.
    decode: Any = None
    # Every layer of one forward gets the same mask object: derive the valid keys and the
    # per-block pair counts once per (mask, length, block), not once per layer.
    _padding: tuple | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.method.name

    def padding(self, attention_mask, batch: int, n: int, block_size: int, device):
        """(key_valid or None, (B, P, P) valid causal pair counts) for this call's mask."""
        cached = self._padding
        if cached is not None and cached[0] is attention_mask and cached[1:5] == (batch, n, block_size, device):
            return cached[5], cached[6]
        key_valid = _key_valid(attention_mask, batch, n)
        pairs = block_pair_counts(key_valid, batch, n, block_size, device=device)
        self._padding = (attention_mask, batch, n, block_size, device, key_valid, pairs)  # holds the mask: its id stays unique
        return key_valid, pairs


_default_runtimes: dict[str, Runtime] = {}


def _runtime_for(module, method_name: str) -> Runtime:
    runtime = getattr(module, "stem_runtime", None)
    if runtime is not None and runtime.method.name == method_name:
        return runtime
    # Loaded with attn_implementation="stem..." and never apply()'d: the method's defaults.
    if method_name not in _default_runtimes:
        method = get_method(method_name)
        _default_runtimes[method_name] = Runtime(method, method.defaults)
    return _default_runtimes[method_name]


def _key_valid(attention_mask, batch: int, n: int) -> torch.Tensor | None:
    """(B, N) bool of valid keys from transformers' 4-D mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -n:]
    valid = last if last.dtype == torch.bool else last == 0
    valid = valid.expand(batch, n)
    return None if bool(valid.all()) else valid


def _governed(module, kwargs) -> bool:
    """Full-attention layers are the method's; sliding-window layers stay as the model made them."""
    return kwargs.get("sliding_window") is None and getattr(module, "sliding_window", None) is None


def _make_forward(method_name: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        governed = _governed(module, kwargs) and getattr(module, "is_causal", True)
        decode = _runtime_for(module, method_name).decode if governed else None
        if decode is not None and q_len == 1 and kv_len > 1:  # a decode step: the decode method's
            if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
                raise NotImplementedError("stem: decode methods do not support softcap / s_aux attention")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = decode.forward(module, query, key, value, _key_valid(attention_mask, query.shape[0], kv_len), scale)
            return out.transpose(1, 2).contiguous(), None
        if decode is not None and q_len > 1:  # a new pre-fill (or chunk): decode state starts over
            decode.new_prefill(getattr(module, "layer_idx", 0))
        if q_len != kv_len or q_len == 1 or not governed:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f"stem: attention with {unsupported} is not supported by the block-sparse executor; "
                    "load the model with attn_implementation='sdpa' or 'eager'"
                )
        runtime = _runtime_for(module, method_name)
        config = runtime.config
        batch, hq, n, d = query.shape
        scale = scaling if scaling is not None else d**-0.5
        layer = getattr(module, "layer_idx", 0)
        dense_layer = layer in getattr(config, "dense_layers", ())
        block_size = getattr(config, "block_size", 128)
        key_valid, pairs = runtime.padding(attention_mask, batch, n, block_size, query.device)

        if runtime.probe is not None:
            runtime.probe(layer, query, key, value, scale, key_valid)
        timer = runtime.timer
        with timer.stage("estimation") if timer else nullcontext():
            if dense_layer or runtime.method.name == "dense":
                index = BlockIndex.full_causal(batch, key.shape[1], n, block_size, device=query.device)
            else:
                index = runtime.method.select(query, key, value, layer=layer, config=config, scale=scale, key_valid=key_valid)
        with timer.stage("attention") if timer else nullcontext():
            out = attend(query, key, value, index, scale=scale, key_valid=key_valid)

        if index.block_size != block_size:  # a selector on its own block grid
            pairs = block_pair_counts(key_valid, batch, n, index.block_size, device=query.device)
        causal = causal_pairs(pairs, hq)
        done = causal if index.full else computed_pairs(index, pairs, hq)
        runtime.recorder.add(layer, done, causal)
        return out.transpose(1, 2).contiguous(), None

    forward.__name__ = f"{method_name}_attention_forward"
    return forward


_registered = False


def register() -> None:
    """Register every method's attn_implementation name with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for method in METHODS.values():
        AttentionInterface.register(method.attn_implementation, _make_forward(method.name))
        AttentionMaskInterface.register(method.attn_implementation, sdpa_mask)
    _registered = True


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention layers: modules that own a layer index and q/k/v projections."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    ]


def apply(model, method: str = "stem", config: Any = None, decode: str | None = None, **params) -> Runtime:
    """Switch `model`'s attention to `method` (registry name) with `config` or parameter overrides.

    Returns the Runtime whose recorder reports BUD and timings. Works on any
    model whose attention follows transformers' AttentionInterface.
    A decode method (decode="prhs", or a spec "stem+prhs") governs decode steps;
    its statistics are on runtime.decode (stats(), reset()).
    """
    from stem_cli.decode import attach

    register()
    if decode is not None:
        method = f"{method}+{decode}"
    m = get_method(method)
    cfg = config if config is not None else m.defaults
    if params:
        cfg = replace(cfg, params, method)
    modules = attention_modules(model)
    if not modules:
        raise ConfigError(f"{type(model).__name__} has no attention layers that stem knows (modules with q_proj/k_proj/v_proj)")
    m, cfg, decode_runtime = attach(m, cfg, model)
    if m.prepare is not None:  # the method's apply-time hook (stem_cli.methods)
        cfg = m.prepare(model, cfg)
    runtime = Runtime(m, cfg, decode=decode_runtime)
    for module in modules:
        module.stem_runtime = runtime
    model.set_attn_implementation(m.attn_implementation)
    return runtime
