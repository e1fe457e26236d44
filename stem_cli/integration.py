"""A method attached to a model: the Runtime (the hook's handler for method runs) and apply().

Each registry method has an `attn_implementation` name ("stem", and "stem_<name>" for
every other method: "stem_uniform", "stem_xattention", "stem_elastic", ...) under which
stem_cli.hook's one attention function is registered (`register`). No model class is
touched: the model's own attention layer calls that function, which hands each governed
call to the layer's Runtime:
- pre-fill on a layer not in the method's dense list: selector -> BlockIndex -> executor;
- dense layers (and the `dense` method): the executor with a full index (SDPA);
- decode steps: the decode method's runtime when one is attached (`stem+prhs`,
  stem_cli/decode), else transformers' SDPA;
- continued pre-fill against a cache: SDPA (a decode runtime's state starts over).

Run state lives here, never in a config: the recorder (BUD per layer), the profiler's
timer, the budget solver's probe (tries selections on each layer's real q/k/v), the
decode runtime, and the method's own state made by its `prepare(model, config)` at
apply time (Elastic Attention: Omega counts, the router's hooked pre-RoPE keys).

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

from stem_cli import hook
from stem_cli.config import ConfigError, replace
from stem_cli.executor import attend
from stem_cli.hook import AttentionCall, attention_modules
from stem_cli.index import BlockIndex, block_pair_counts, causal_pairs, computed_pairs
from stem_cli.registry import METHODS, Method, attn_implementation, get_method, split_method
from stem_cli.timing import StageTimer


@dataclass
class BudgetRecorder:
    """Token pairs computed vs. dense causal pairs, per layer, since the last reset.
    (Timing lives in the profiler, with CUDA events; host clocks here would lie on a GPU.)"""

    # Per layer lists of 0-dim tensors, summed when read: no device sync inside the forward.
    computed: dict[int, list] = field(default_factory=dict)
    causal: dict[int, list] = field(default_factory=dict)
    calls: int = 0  # governed pre-fill attention calls
    # Tensor parallel: the process group whose ranks each compute a shard of the heads. Their counts are summed
    # (all_reduce) when read, so BUD is over all heads on every rank; every rank must read it alike.
    tp_group: Any = None

    def add(self, layer: int, computed, causal) -> None:
        self.computed.setdefault(layer, []).append(computed)
        self.causal.setdefault(layer, []).append(causal)
        self.calls += 1

    def _totals(self) -> dict[int, tuple[float, float]]:
        totals = {
            layer: (float(sum(float(x) for x in self.computed[layer])), float(sum(float(x) for x in self.causal[layer])))
            for layer in sorted(self.causal)
        }
        if self.tp_group is None:
            return totals
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(self.tp_group) == "nccl" else "cpu"  # nccl reduces device tensors only
        both = torch.tensor(list(totals.values()), dtype=torch.float64, device=device).reshape(-1, 2)
        dist.all_reduce(both, group=self.tp_group)  # the shards' layers are the same layers: sums per layer
        return {layer: (float(done), float(causal)) for layer, (done, causal) in zip(totals, both.tolist())}

    # Mode counts of an elastic run (stem_cli.elastic.modes.ElasticStats), set by apply; reset with the recorder.
    elastic: Any = None

    def reset(self) -> None:
        self.computed.clear()
        self.causal.clear()
        self.calls = 0
        if self.elastic is not None:
            self.elastic.reset()

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
    """A method with its config and run state, attached to a model's attention layers (a hook handler)."""

    method: Method
    config: Any
    recorder: BudgetRecorder = field(default_factory=BudgetRecorder)
    timer: StageTimer | None = None  # set by the profiler: estimation / attention time per call
    # Set by the budget solver: called with each governed pre-fill call's (layer, q, k, v, scale,
    # key_valid) before the method runs, to try selections on the real activations.
    probe: Any = None
    # A decode method's runtime (stem_cli.decode.runtime.DecodeRuntime) for decode steps, or None: dense decode.
    decode: Any = None
    # The method's run state from its prepare(model, config) (elastic: ElasticState), passed to its selector.
    state: Any = None
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
        key_valid = hook.key_valid(attention_mask, batch, n)
        pairs = block_pair_counts(key_valid, batch, n, block_size, device=device)
        self._padding = (attention_mask, batch, n, block_size, device, key_valid, pairs)  # holds the mask: its id stays unique
        return key_valid, pairs

    def select(self, query, key, value, *, layer: int, scale: float, key_valid) -> BlockIndex:
        """The layer's BlockIndex: full on dense layers and for `dense`, else the method's selector."""
        config = self.config
        if layer in getattr(config, "dense_layers", ()) or self.method.name == "dense":
            return BlockIndex.full_causal(query.shape[0], key.shape[1], query.shape[2], getattr(config, "block_size", 128),
                                          device=query.device)
        extra = {} if self.state is None else {"state": self.state}
        return self.method.select(query, key, value, layer=layer, config=config, scale=scale, key_valid=key_valid, **extra)

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """The hook's handler: (B, Hq, N, d), or None for SDPA."""
        decode = self.decode
        if call.kind == "decode":
            if decode is None:
                return None
            call.check_supported("stem decode")
            return decode.forward(call.module, call.query, call.key, call.value, call.key_valid, call.scale)
        if decode is not None:  # a new pre-fill (or chunk): decode state starts over
            decode.new_prefill(call.layer)
        if call.kind != "prefill":
            return None
        call.check_supported()
        query, key, value, layer, scale = call.query, call.key, call.value, call.layer, call.scale
        batch, hq, n, _ = query.shape
        block_size = getattr(self.config, "block_size", 128)
        key_valid, pairs = self.padding(call.attention_mask, batch, n, block_size, query.device)

        if self.probe is not None:
            self.probe(layer, query, key, value, scale, key_valid)
        timer = self.timer
        with timer.stage("estimation") if timer else nullcontext():
            index = self.select(query, key, value, layer=layer, scale=scale, key_valid=key_valid)
        with timer.stage("attention") if timer else nullcontext():
            out = attend(query, key, value, index, scale=scale, key_valid=key_valid,
                         attn_dtype=getattr(self.config, "attn_dtype", "bf16"))

        if index.block_size != block_size:  # a selector on its own block grid
            pairs = block_pair_counts(key_valid, batch, n, index.block_size, device=query.device)
        causal = causal_pairs(pairs, hq)
        done = causal if index.full else computed_pairs(index, pairs, hq)
        self.recorder.add(layer, done, causal)
        return out


def build_runtime(model, method: str | Method = "stem", config: Any = None, decode: str | None = None, **params) -> Runtime:
    """A Runtime for `method` on `model` (prepare run, nothing attached): apply() attaches it; the
    fidelity task measures with it. `config` or `params` override the method's defaults."""
    if isinstance(method, str):
        if decode is not None:
            method = f"{method}+{decode}"
        method = get_method(method)
    cfg = config if config is not None else method.defaults
    if params:
        cfg = replace(cfg, params, method.name)
    if not attention_modules(model):
        raise ConfigError(f"{type(model).__name__} has no attention layers that stem knows (modules with q_proj/k_proj/v_proj)")
    prefill, prefill_cfg, decode_method, decode_cfg = split_method(method, cfg)
    decode_runtime = None
    if decode_method is not None:
        from stem_cli.decode.runtime import DecodeRuntime

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        decode_runtime = DecodeRuntime(decode_method, decode_cfg, int(getattr(text, "num_hidden_layers", 0) or 0))
    state = prefill.prepare(model, prefill_cfg) if prefill.prepare is not None else None
    runtime = Runtime(prefill, prefill_cfg, decode=decode_runtime, state=state)
    runtime.recorder.elastic = getattr(state, "stats", None)
    runtime.recorder.tp_group = tensor_parallel_group(model)
    return runtime


def tensor_parallel_group(model):
    """The process group a tensor-parallel model (transformers' tp_plan) shards its heads over, else None."""
    if (getattr(model, "_tp_size", None) or 1) <= 1:
        return None
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_initialized() else None


def apply(model, method: str = "stem", config: Any = None, decode: str | None = None, **params) -> Runtime:
    """Switch `model`'s attention to `method` (registry name) with `config` or parameter overrides.

    Returns the Runtime whose recorder reports BUD. Works on any model whose attention
    follows transformers' AttentionInterface. A decode method (decode="prhs", or a spec
    "stem+prhs") governs decode steps; its statistics are on runtime.decode (stats(), reset()).
    """
    register()
    runtime = build_runtime(model, method, config, decode, **params)
    hook.attach(model, runtime, runtime.method.attn_implementation)
    return runtime


def register() -> None:
    """Make attn_implementation="stem", "stem_uniform", ... valid names for from_pretrained (idempotent).

    A model loaded under such a name and never apply()'d runs the method's defaults."""
    for name in METHODS:  # names only: a method's module loads when a model first runs it
        hook.install(attn_implementation(name), lambda name=name: Runtime(METHODS[name], METHODS[name].defaults))
