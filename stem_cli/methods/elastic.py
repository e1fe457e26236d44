"""elastic: per-head computation modes (dense / stem / streaming) chosen per input (spec section 3).

The selector decides every KV head's mode for this input (a trained router, else a
calibrated head map, else the default: default_dense_layers dense, all other heads
default_mode), then builds ONE BlockIndex for the whole layer (stem_cli.elastic.modes:
dense rows, Stem's selection, sink + window rows) for the one executor call.
`prepare` (run by stem_cli.apply) checks the map / router against the model, hooks
the routed layers' pre-RoPE keys for the router, and returns the run state (ElasticState:
Omega counts, those keys) that the runtime keeps and passes back as `state`.

Omega, the model sparsity ratio (fraction of query heads not dense over the governed
layers, same calls as BUD), after a forward:

    runtime = stem_cli.apply(model, "elastic", head_map="map.json")
    model(ids)
    runtime.recorder.bud, runtime.recorder.elastic.omega      # or omega(runtime); runtime.state.stats
"""

from __future__ import annotations

import torch

from stem_cli.elastic.config import ElasticConfig
from stem_cli.elastic.modes import ElasticState, decide_modes, mixed_index
from stem_cli.elastic.modes import prepare as _prepare
from stem_cli.index import BlockIndex
from stem_cli.methods.knob import Knob


def prepare(model, config: ElasticConfig) -> ElasticState:
    """Apply time: check the head map / router against `model`; with a router, hook its pre-RoPE keys."""
    return _prepare(model, config)


def select(q, k, v, *, layer: int, config: ElasticConfig, scale: float, key_valid: torch.Tensor | None,
           state: ElasticState | None = None) -> BlockIndex:
    """`state` from prepare (a runtime passes it); without one (a direct call, the budget solver's
    probe) the modes are counted nowhere and a router sees post-RoPE keys."""
    modes = decide_modes(q, k, layer=layer, config=config, key_valid=key_valid, keys=state.keys if state else None)
    if state is not None:
        state.stats.record(layer, modes, q.shape[1] // k.shape[1])
    # A router's modes stay on the device and the index is built without reading them (mixed_index on_host=False: every
    # mode's part for every head), unless router_modes="host" has them read back first.
    on_host = not config.router or config.router_modes == "host"
    return mixed_index(q, k, v, modes, config, scale=scale, key_valid=key_valid, on_host=on_host)


def omega(runtime) -> float | None:
    """Model sparsity ratio of the elastic calls since the recorder's last reset (None otherwise)."""
    stats = getattr(runtime.recorder, "elastic", None)
    return None if stats is None else stats.omega


DEFAULTS = ElasticConfig()
DESCRIPTION = (
    "Elastic Attention: each (layer, KV head) runs dense, stem or streaming, chosen per input by a router "
    "(router=FILE from `stem train-router`) or a calibrated head map (head_map=FILE from `stem calibrate`); "
    "default: default_dense_layers dense, the rest default_mode; reports Omega = fraction of heads not dense"
)
# The budget of its Stem heads (dense and streaming heads are fixed by the map): equal-budget
# comparisons reach any BUD above the floor the dense and streaming heads set.
BUDGET_KNOB = Knob("k_scale", 0.01, 16.0, integer=False)
