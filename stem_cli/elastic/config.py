"""ElasticConfig: the `elastic` method's parameters (spec section 3, Elastic Attention).

Every (layer, KV head) runs one of three modes, decided per input at pre-fill time:

- dense: every causal block;
- stem: Stem's block-sparse selection (TPD budget over Output-Aware block logits),
  with the Stem parameters below (same names and defaults as the `stem` method);
- streaming: attention sinks plus a local window (StreamingLLM / A-shape).

Who decides the modes, in order: a trained router (`router`, per input), a head map
from `stem calibrate` (`head_map`, fixed per model), else the calibration-free
default: the layers in `default_dense_layers` dense, every other head `default_mode`.
With that default (and default_mode = stem) elastic computes exactly what `stem` does.

There is deliberately no `dense_layers` parameter: the integration would then skip the
selector on those layers, and elastic must see every governed layer to count the
model sparsity ratio Omega (fraction of query heads not dense) next to BUD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from stem_cli.config import ConfigError, StemConfig, param

MODES = ("dense", "stem", "streaming")  # mode ids 0, 1, 2 everywhere (maps, router logits, tensors)
DENSE, STEM, STREAMING = 0, 1, 2
ROUTER_MODES = ("device", "host")


@dataclass(frozen=True)
class ElasticConfig:
    head_map: str = param("", "head map JSON from `stem calibrate` (modes per layer and KV head); '' = no map", "stem")
    router: str = param("", "router file from `stem train-router`: modes chosen per input (excludes head_map); '' = none", "stem")
    router_modes: str = param(
        "device", "with a router: 'device' = every mode's index part built for every head and picked per head on the "
        "device (no host sync); 'host' = the layer's modes copied to the host first (one sync per routed layer) and "
        "only the parts used built (a layer routed all dense runs dense SDPA). Same index either way", "stem")
    default_dense_layers: tuple = param(
        (0, 1), "without head_map or router: layers whose heads all run dense (Stem's layer schedule)", "stem"
    )
    default_mode: str = param("stem", "without head_map or router: the mode of every other head (dense, stem, streaming)", "stem")
    block_size: int = param(128, "tokens per query/key block (power of two, 16..1024), shared by all modes", "paper+code")
    streaming_sink_tokens: int = param(128, "streaming heads: first tokens kept (attention sinks), rounded up to whole blocks", "stem")
    streaming_window_tokens: int = param(
        1024, "streaming heads: tokens ending at the diagonal kept (local window), rounded up to whole blocks", "stem"
    )
    # Stem mode: the `stem` method's parameters, same meaning and defaults.
    stride: int = param(8, "stem heads: antidiagonal stride of the block-score estimate", "paper+code")
    beta: float = param(0.2, "stem heads: weight of the value-norm term (Output-Aware Metric)", "paper+code")
    mu: float = param(0.7, "stem heads: TPD decay, the last query block keeps mu * k_start blocks", "paper+code")
    tpd: bool = param(True, "stem heads: Token Position-Decay on (off = uniform budget)", "paper+code")
    schedule: str = param("code", "stem heads: k_start rule, 'code' or 'paper' (see the stem method)", "code")
    k_start: int = param(0, "stem heads: fixed k_start in blocks; 0 = from the schedule", "stem")
    k_scale: float = param(1.0, "stem heads: multiplies k_start", "stem")
    sink_blocks: int = param(4, "stem heads: first blocks always kept", "code")
    window_blocks: int = param(4, "stem heads: blocks ending at the diagonal always kept", "code")
    forced_rule: str = param("code", "stem heads: 'code' = forced blocks on top of top-k(i), 'inside' = counted in it", "code")
    gqa: str = param("query", "stem heads: 'query' = select per query head, 'kv' = per KV head", "stem")

    def __post_init__(self):
        # The Stem parameters (and block_size) are checked by StemConfig itself.
        object.__setattr__(self, "_stem", StemConfig(
            block_size=self.block_size, dense_layers=(), stride=self.stride, beta=self.beta, mu=self.mu, tpd=self.tpd,
            schedule=self.schedule, k_start=self.k_start, k_scale=self.k_scale, sink_blocks=self.sink_blocks,
            window_blocks=self.window_blocks, forced_rule=self.forced_rule, gqa=self.gqa,
        ))
        layers = self.default_dense_layers
        if isinstance(layers, int) or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ConfigError(f"default_dense_layers={layers!r} is not allowed: use a list of layer indices >= 0, e.g. [0, 1]")
        object.__setattr__(self, "default_dense_layers", tuple(sorted(set(layers))))
        if self.default_mode not in MODES:
            raise ConfigError(f"default_mode={self.default_mode!r} is not allowed: use one of {', '.join(MODES)}")
        if not isinstance(self.streaming_sink_tokens, int) or self.streaming_sink_tokens < 0:
            raise ConfigError(f"streaming_sink_tokens={self.streaming_sink_tokens!r} is not allowed: use a token count >= 0")
        if not isinstance(self.streaming_window_tokens, int) or self.streaming_window_tokens < 1:
            raise ConfigError(f"streaming_window_tokens={self.streaming_window_tokens!r} is not allowed: use a token count >= 1")
        for name in ("head_map", "router"):  # a bare number on the command line parses as one
            if isinstance(getattr(self, name), (int, float)) and not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, str(getattr(self, name)))
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: use a file path")
        if self.router_modes not in ROUTER_MODES:
            raise ConfigError(f"router_modes={self.router_modes!r} is not allowed: use one of {', '.join(ROUTER_MODES)}")
        if self.head_map and self.router:
            raise ConfigError("elastic: give head_map or router, not both (a router decides every head per input)")
        # A missing file fails here, before any model is loaded; the files are read (and checked
        # against the model) by the method's prepare at apply time.
        if self.head_map and not Path(self.head_map).expanduser().is_file():
            raise ConfigError(f"head map {self.head_map!r} does not exist (make one with `stem calibrate --model ... --output FILE`)")
        if self.router and not Path(self.router).expanduser().is_file():
            raise ConfigError(f"router file {self.router!r} does not exist (make one with `stem train-router`)")

    @property
    def stem(self) -> StemConfig:
        """The Stem configuration that stem-mode heads run with."""
        return self._stem

    @property
    def streaming_blocks(self) -> tuple[int, int]:
        """(sink blocks, window blocks) of streaming heads on this block grid (window includes the diagonal)."""
        return math.ceil(self.streaming_sink_tokens / self.block_size), max(1, math.ceil(self.streaming_window_tokens / self.block_size))
