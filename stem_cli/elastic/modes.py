"""Per-head modes -> one BlockIndex; who decides the modes; Omega accounting.

Index construction (`mixed_index`): modes are per (batch, KV head). The combined index
is per query head when some head runs Stem with gqa='query' (Stem's rows differ within
a group), else per KV head. Its rows are
- dense heads: every causal block 0..i of query block i;
- streaming heads: sink blocks + the window ending at the diagonal (data-independent);
- stem heads: Stem's selection, run on the stem heads only (their q/k/v sliced out),
  so a layer with few stem heads pays scoring for those alone;
padded with -1 to the longest row. One layer, one index, one executor call. When every
head of a layer runs one mode the index is that mode's own (dense: the full index, which
the executor runs with SDPA; stem: exactly the `stem` method's index).

Omega (model sparsity ratio) = query heads not dense / query heads, over every governed
layer of every pre-fill call since the BudgetRecorder was last reset: the same window
and the same layers as BUD. The counts (ElasticStats) are run state: `prepare` makes them
with the rest of the ElasticState, stem_cli.apply puts them on the runtime's recorder,
and the recorder's reset() resets them. Read it after a forward as

    runtime.recorder.elastic.omega        # the same object as runtime.state.stats

(`stem_cli.methods.elastic.omega(runtime)` returns it or None.)

Apply time (`prepare`, called by stem_cli.apply): the head map / router is read and checked
against the model, and with a router each routed layer's key projection is hooked so the
selector can pool the pre-RoPE keys (PreRopeKeys). It returns the ElasticState the runtime
keeps. Re-applying replaces those hooks; they never accumulate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from stem_cli.config import ConfigError
from stem_cli.elastic.config import DENSE, MODES, STEM, STREAMING
from stem_cli.index import PAD, BlockIndex
from stem_cli.methods.blocks import first_valid_block, forced_blocks

# ------------------------------------------------------------------ index construction


def streaming_index(batch: int, heads: int, seq_len: int, block_size: int, sink_blocks: int, window_blocks: int,
                    key_valid: torch.Tensor | None, device) -> BlockIndex:
    """Sinks + local window per row, the same for every head: (B, heads, P, K), heads broadcast.
    Without padding it depends on the shapes only: built once per shape and device, then reused
    by every layer (about 40 small ops a layer saved)."""
    p = -(-seq_len // block_size)
    key = (batch, seq_len, block_size, sink_blocks, window_blocks, str(device)) if key_valid is None else None
    one = _streaming_rows.get(key) if key is not None else None
    if one is None:
        one = _streaming_one(batch, p, block_size, seq_len, sink_blocks, window_blocks, key_valid, device)
        if key is not None:
            if len(_streaming_rows) >= 16:
                _streaming_rows.clear()
            _streaming_rows[key] = one
    return BlockIndex(one.counts.expand(batch, heads, p), one.indices.expand(batch, heads, p, one.indices.shape[-1]), block_size, seq_len)


_streaming_rows: dict[tuple, BlockIndex] = {}  # (batch, N, block, sinks, window, device) -> one head's streaming rows


def _streaming_one(batch, p, block_size, seq_len, sink_blocks, window_blocks, key_valid, device) -> BlockIndex:
    first = first_valid_block(key_valid, batch, block_size, device)
    keep = forced_blocks(p, first, sink_blocks, window_blocks)  # (B, P, P)
    # A row keeps at most the sinks and the window: that width needs no host read of the counts.
    return BlockIndex.from_mask(keep[:, None], block_size, seq_len, width=min(p, sink_blocks + window_blocks))


def _stem_select(q, k, v, config, scale, key_valid) -> BlockIndex:
    from stem_cli.methods import stem as stem_method

    return stem_method.select(q, k, v, layer=-1, config=config.stem, scale=scale, key_valid=key_valid)


def mixed_index(q, k, v, modes: torch.Tensor, config, *, scale: float, key_valid: torch.Tensor | None,
                on_host: bool = True) -> BlockIndex:
    """One BlockIndex for a layer whose KV heads run `modes` (B, Hkv) int (0 dense, 1 stem, 2 streaming).

    on_host (a head map, the default modes: known before the call): the index is specialised to
    the modes present (one mode: that mode's own index; Stem scored on the Stem heads only).
    Not on_host (a router's modes, left on the device): every part is built for every head and
    picked per head by the modes on the device; nothing here reads them back, so the layer
    never waits for the device (the price: Stem scores all heads of a routed layer)."""
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = config.block_size
    p = -(-n // bs)
    sink_b, window_b = config.streaming_blocks
    if not on_host:
        return _mixed_on_device(q, k, v, modes.to(q.device, torch.long).expand(batch, hkv), config, scale, key_valid, p)
    modes = modes.to("cpu", torch.long).expand(batch, hkv)
    present = set(modes.unique().tolist())
    if present == {DENSE}:
        return BlockIndex.full_causal(batch, hkv, n, bs, device=q.device)
    if present == {STEM}:
        return _stem_select(q, k, v, config, scale, key_valid)
    if present == {STREAMING}:
        return streaming_index(batch, hkv, n, bs, sink_b, window_b, key_valid, q.device)

    per_query = STEM in present and config.stem.gqa == "query"
    heads = hq if per_query else hkv
    head_modes = (modes.repeat_interleave(group, dim=1) if per_query else modes).to(q.device)  # (B, heads)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # mode -> counts (B|1, heads|1, P), ids (B|1, heads|1, P, K)
    if DENSE in present:
        parts[DENSE] = _dense_rows(p, q.device)
    if STREAMING in present:
        s = streaming_index(batch, 1, n, bs, sink_b, window_b, key_valid, q.device)
        parts[STREAMING] = (s.counts, s.indices)
    if STEM in present:
        stem_kv = [h for h in range(hkv) if bool((modes[:, h] == STEM).any())]  # selected for any sequence that needs it
        if len(stem_kv) == hkv:
            sub = _stem_select(q, k, v, config, scale, key_valid)
            counts, ids = sub.counts, sub.indices
        else:
            kv_ids = torch.tensor(stem_kv, device=q.device)
            q_ids = (kv_ids[:, None] * group + torch.arange(group, device=q.device)).flatten()
            sub = _stem_select(q.index_select(1, q_ids), k.index_select(1, kv_ids), v.index_select(1, kv_ids), config, scale, key_valid)
            where = q_ids if per_query else kv_ids  # the sub-index's heads in the combined head order
            counts = sub.counts.new_zeros(batch, heads, p)
            ids = sub.indices.new_full((batch, heads, p, sub.indices.shape[-1]), PAD)
            counts[:, where], ids[:, where] = sub.counts, sub.indices
        parts[STEM] = (counts, ids)

    return _combine(parts, head_modes, batch, heads, p, config.block_size, n, q.device)


def _dense_rows(p: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (1, 1, P), ids (1, 1, P, P)): every causal block of each row."""
    ids = torch.arange(p, device=device, dtype=torch.int32)
    return (ids + 1)[None, None], torch.where(ids[None, :] <= ids[:, None], ids[None, :], PAD)[None, None]


def _mixed_on_device(q, k, v, modes: torch.Tensor, config, scale: float, key_valid, p: int) -> BlockIndex:
    """mixed_index for device modes: the three parts for every head, picked per head on the device."""
    batch, n, hkv = q.shape[0], q.shape[2], k.shape[1]
    stem = _stem_select(q, k, v, config, scale, key_valid)
    s = streaming_index(batch, 1, n, config.block_size, *config.streaming_blocks, key_valid, q.device)
    parts = {DENSE: _dense_rows(p, q.device), STEM: (stem.counts, stem.indices), STREAMING: (s.counts, s.indices)}
    heads = stem.num_heads  # hq when Stem selects per query head (gqa='query'), else hkv
    head_modes = modes.repeat_interleave(heads // hkv, dim=1) if heads != hkv else modes
    return _combine(parts, head_modes, batch, heads, p, config.block_size, n, q.device)


def _combine(parts: dict, head_modes: torch.Tensor, batch: int, heads: int, p: int, bs: int, n: int, device) -> BlockIndex:
    """Per head, the rows of its mode's part (parts: mode -> counts, ids broadcastable to (B, heads, P[, K]))."""
    width = max(ids.shape[-1] for _, ids in parts.values())
    counts = torch.zeros(batch, heads, p, dtype=torch.int32, device=device)
    indices = torch.full((batch, heads, p, width), PAD, dtype=torch.int32, device=device)
    for mode, (c, ids) in parts.items():
        if ids.shape[-1] < width:
            ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], width - ids.shape[-1]), PAD)], dim=-1)
        chosen = (head_modes == mode)[:, :, None]
        counts = torch.where(chosen, c.to(torch.int32), counts)
        indices = torch.where(chosen[..., None], ids.to(torch.int32), indices)
    return BlockIndex(counts.contiguous(), indices.contiguous(), bs, n)


# ------------------------------------------------------------------ pooled pre-RoPE keys


class PreRopeKeys:
    """The latest pre-RoPE keys per layer, (B, N, Hkv, d), written by forward hooks on the key projection.

    The selector gets q/k/v after RoPE only; the router wants the keys before RoPE. `prepare`
    (at stem_cli.apply time) hooks each routed attention layer's `k_proj`; the hook stores its
    output viewed per head and, where the layer has a `k_norm` (Qwen3, Gemma3), normalised by it
    here: the model applies k_norm before or after moving heads forward (Qwen3 on (B, N, Hkv, d),
    Gemma3 on (B, Hkv, N, d)), a per-vector norm that gives the same values either way, so one
    layout serves every model. A hook on the attention layer itself drops whatever is left when
    the layer's forward ends, so nothing outlives the layer's call.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}  # layer -> pre-RoPE keys (B, N, Hkv, d) of its current call
        self.handles: list = []  # torch RemovableHandles of the hooks writing here

    def take(self, layer: int) -> torch.Tensor | None:
        return self.keys.pop(layer, None)

    def remove_hooks(self, handles=None) -> None:
        """Remove `handles` (default: every hook writing here) and forget what they stored."""
        handles = list(self.handles if handles is None else handles)
        for handle in handles:
            handle.remove()
        gone = {id(h) for h in handles}
        self.handles = [h for h in self.handles if id(h) not in gone]
        self.keys.clear()


def pre_rope_keys(module: torch.nn.Module, k_proj_output: torch.Tensor) -> torch.Tensor:
    """An attention layer's pre-RoPE keys (B, N, Hkv, d) from its k_proj output (B, N, Hkv * d): viewed per
    head, then through the layer's k_norm where it has one (Qwen3, Gemma3; Llama has none)."""
    keys = k_proj_output.view(*k_proj_output.shape[:-1], -1, module.head_dim)
    norm = getattr(module, "k_norm", None)
    if isinstance(norm, torch.nn.Module):
        with torch.no_grad():  # the router's input only (pooled_keys detaches it too)
            keys = norm(keys)
    return keys


def hook_pre_rope_keys(modules, holder: PreRopeKeys) -> list:
    """Hook each attention layer in `modules` to store its pre-RoPE keys (B, N, Hkv, d) in `holder`; the handles."""
    handles = []
    for module in modules:
        layer = module.layer_idx

        def store(_source, _inputs, output, layer=layer, module=module):
            holder.keys[layer] = pre_rope_keys(module, output)

        def drop(_module, _inputs, _output, layer=layer):
            holder.keys.pop(layer, None)

        handles.append(module.k_proj.register_forward_hook(store))
        handles.append(module.register_forward_hook(drop))
    holder.handles.extend(handles)
    return handles


_HOOKS_ATTR = "_stem_elastic_key_hooks"  # on the model: (holder, handles) of the elastic hooks installed there


def remove_model_hooks(model) -> None:
    """Remove the pre-RoPE key hooks a previous elastic prepare installed on `model` (if any)."""
    installed = getattr(model, _HOOKS_ATTR, None)
    if installed is not None:
        holder, handles = installed
        holder.remove_hooks(handles)
        delattr(model, _HOOKS_ATTR)


def model_counts(modules) -> tuple[int | None, int | None, int | None]:
    """(layers, KV heads, head dim) of the model whose attention layers are `modules` (None: unknown)."""
    if not modules:
        return None, None, None
    module = modules[0]
    cfg = getattr(module, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or len(modules)
    hkv = getattr(cfg, "num_key_value_heads", None)
    head_dim = getattr(module, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and hkv and getattr(module.k_proj, "out_features", None):
        head_dim = module.k_proj.out_features // hkv
    return layers, hkv, head_dim


def prepare(model, config) -> "ElasticState":
    """The run state of an ElasticConfig on `model` (the method's apply-time hook, see stem_cli.registry).

    Checks the head map / router against the model's layers, KV heads and head dim
    (ConfigError naming both counts), removes the key hooks of any earlier elastic apply on
    this model, and with a router hooks the routed layers' pre-RoPE keys (PreRopeKeys).
    """
    from stem_cli.hook import attention_modules

    modules = attention_modules(model)
    num_layers, hkv, head_dim = model_counts(modules)
    router = None
    if config.router:
        from stem_cli.elastic.router import architecture, load_router

        router = load_router(config.router)
        arch = architecture(model) if hasattr(getattr(model, "config", None), "hidden_size") else None
        router.check_model(num_layers, hkv, head_dim, where=f"router {config.router!r}", arch=arch)
    if config.head_map:
        from stem_cli.elastic.headmap import load_head_map

        load_head_map(config.head_map).check_model(num_layers, hkv, where=f"head map {config.head_map!r}")
    state = ElasticState()
    remove_model_hooks(model)
    if router is not None:
        routed = [m for m in modules if router.routes(m.layer_idx) and getattr(m, "sliding_window", None) is None]
        setattr(model, _HOOKS_ATTR, (state.keys, hook_pre_rope_keys(routed, state.keys)))
    return state


def _pool_weights(n: int, key_valid: torch.Tensor, pool: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) float weights averaging the first and the last `pool` valid tokens of each sequence (all
    tokens for a sequence with none valid); computed on the device, no host read."""
    valid = key_valid.to(device)
    valid = valid | ~valid.any(-1, keepdim=True)
    rank = valid.cumsum(-1)
    total = rank[:, -1:]
    first = (valid & (rank <= pool)).float()
    last = (valid & (rank > total - pool)).float()
    return first / first.sum(-1, keepdim=True), last / last.sum(-1, keepdim=True)


def pooled_keys(pre_rope: torch.Tensor | None, k: torch.Tensor, key_valid: torch.Tensor | None, pool: int = 100) -> torch.Tensor:
    """(B, Hkv, 2d) float32: means of the pre-RoPE keys of the first and the last `pool` valid tokens.

    `pre_rope`: the layer's k_proj (then k_norm, where the model has one) output for this call,
    (B, N, Hkv * d) or (B, N, Hkv, d), as the hooks of `prepare` store it. Without it (a config
    that stem_cli.apply did not prepare, a selector called directly) the post-RoPE keys `k`
    stand in (notice once): an approximation a trained router was not trained on.
    Batched tensor ops only: nothing waits for the device.
    """
    batch, hkv, n, d = k.shape
    if pre_rope is None or tuple(pre_rope.shape[:2]) != (batch, n) or pre_rope.numel() != batch * n * hkv * d:
        why = ("no pre-RoPE keys were captured for this layer (the config was not prepared by stem_cli.apply)" if pre_rope is None
               else f"the captured pre-RoPE keys {tuple(pre_rope.shape)} do not match the layer's (B, N, Hkv, d) = {(batch, n, hkv, d)}")
        _notice("elastic:post-rope", f"stem elastic: {why}; the router sees pooled post-RoPE keys instead")
        keys = k.detach().transpose(1, 2)  # (B, N, Hkv, d)
    else:
        keys = pre_rope.detach().reshape(batch, n, hkv, d)
    if key_valid is None:
        first, last = keys[:, :pool].float().mean(1), keys[:, max(0, n - pool):].float().mean(1)
    else:
        w_first, w_last = _pool_weights(n, key_valid, pool, keys.device)
        flat = keys.float().flatten(2)  # (B, N, Hkv d)
        first = torch.bmm(w_first[:, None], flat).view(batch, hkv, d)
        last = torch.bmm(w_last[:, None], flat).view(batch, hkv, d)
    return torch.cat([first, last], -1)


_noticed: set[str] = set()


def _notice(key: str, message: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------ Omega accounting


class ElasticStats:
    """Query heads per mode, per governed layer, over the pre-fill calls since the last reset
    (the runtime's BudgetRecorder resets them with itself, so Omega and BUD cover the same calls)."""

    def __init__(self):
        self.heads: dict[int, torch.Tensor] = {}  # layer -> (3,) query heads per mode, summed over calls and batch
        self.last: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv) mode ids of the last call (where they were made)
        self.calls = 0

    def reset(self) -> None:
        self.heads.clear()
        self.last.clear()
        self.calls = 0

    def record(self, layer: int, modes: torch.Tensor, group: int) -> None:
        """Count on the modes' device (no host read per layer: the counts are read when Omega is)."""
        # A comparison, not one_hot / bincount: on a GPU those check their input on the host.
        per_mode = (modes.flatten()[:, None] == torch.arange(len(MODES), device=modes.device)).sum(0) * group
        previous = self.heads.get(layer)
        self.heads[layer] = per_mode if previous is None else previous + per_mode.to(previous.device)
        self.last[layer] = modes
        self.calls += 1

    def _totals(self) -> torch.Tensor:
        """(layers, 3) on the host: the one read of the counts."""
        return torch.stack([c.cpu() for c in self.heads.values()])

    @property
    def last_modes(self) -> dict[int, list[list[str]]]:
        """layer -> per sequence, per KV head mode name of the last call."""
        return {layer: [[MODES[m] for m in row] for row in modes.tolist()] for layer, modes in self.last.items()}

    @property
    def omega(self) -> float | None:
        """Fraction of query heads not dense, over governed layers and calls (None before any call)."""
        if not self.heads:
            return None
        total = self._totals().sum(0)
        return float(total[STEM] + total[STREAMING]) / float(total.sum())

    def mode_fractions(self) -> dict[str, float] | None:
        if not self.heads:
            return None
        total = self._totals().sum(0).double()
        return {m: float(total[i] / total.sum()) for i, m in enumerate(MODES)}

    def per_layer(self) -> dict[int, float]:
        return {layer: float(c[STEM] + c[STREAMING]) / float(c.sum()) for layer, c in sorted(zip(self.heads, self._totals()))}


# ------------------------------------------------------------------ who decides


@dataclass
class ElasticState:
    """The run state of the `elastic` method (its frozen config holds none): Omega counts, pre-RoPE keys."""

    stats: ElasticStats = field(default_factory=ElasticStats)
    keys: PreRopeKeys = field(default_factory=PreRopeKeys)


def decide_modes(q, k, *, layer: int, config, key_valid, keys: PreRopeKeys | None = None) -> torch.Tensor:
    """(B, Hkv) int64 mode ids of this layer for this input (router, else head map, else default).
    A router's modes stay on the device (nothing waits for them); a head map's and the default's are host data.

    The file's layer and KV-head counts were checked against the model by `prepare`; here only
    what the call itself shows (KV heads, head dim, the layer index) is checked again."""
    batch, hkv = k.shape[0], k.shape[1]
    if config.router:
        from stem_cli.elastic.router import load_router

        router = load_router(config.router)
        where = f"router {config.router!r}"
        router.check_model(layer + 1 if layer >= router.num_layers else None, hkv, k.shape[-1], where=where)
        # Peek, not take: a selector may run several times in one layer call (the budget solver's knob
        # grid); the hook on the attention layer drops the keys when the layer's forward ends.
        pre_rope = keys.keys.get(layer) if keys is not None else None
        if not router.routes(layer):
            return torch.zeros(batch, hkv, dtype=torch.long, device="cpu")
        feats = pooled_keys(pre_rope, k, key_valid)
        with torch.no_grad():
            return router.on(feats.device).modes(layer, feats)  # left on the device (read back only with router_modes="host")
    if config.head_map:
        from stem_cli.elastic.headmap import load_head_map

        head_map = load_head_map(config.head_map)
        where = f"head map {config.head_map!r}"
        head_map.check_model(None, hkv, where=where)
        if layer >= head_map.num_layers:
            raise ConfigError(f"{where} has {head_map.num_layers} layers but the model has at least {layer + 1}")
        return head_map.mode_ids()[layer].expand(batch, hkv)
    mode = DENSE if layer in config.default_dense_layers else MODES.index(config.default_mode)
    return torch.full((batch, hkv), mode, dtype=torch.long, device="cpu")  # modes are read on the host
