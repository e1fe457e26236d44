"""Decode-method configurations: dataclasses with documented defaults and validation.

Sources as in stem_cli.config: "paper" (the published method), "stem" (our choice;
the help text says why). PrHS's tau and r are the paper's (restated in
STEM_SPEC.md section 3); the spec leaves phi, alpha, psi, gamma and the start
layers open, so those are ours, chosen to be mild (from half depth on; the last
layer drops, or freezes, at most a quarter of the context) because without
max_delta they act with no check at all.

Every decode method keeps, per (sequence, KV head) and decode step, at most
`budget` cached positions: sinks + recent window + a salient set. The same three
budget fields exist in every decode config, so budgets compare across methods.
Parameter names are chosen not to collide with pre-fill parameters (a combined
method such as stem+prhs has the fields of both; a collision would be renamed
decode_<name>).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stem_cli.config import ConfigError, param

SELECTORS = ("time", "depth", "layer")
DELTA_CHECKS = ("auto", "bound", "anchor", "exact")


def _int_at_least(name: str, value, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is not allowed: use {what}")


def _number_in(name: str, value, low: float, high: float, what: str, *, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {what}")


@dataclass(frozen=True)
class DecodeConfig:
    """What every decode method shares: the kept-token budget and the layers it governs."""

    budget: int = param(
        1024,
        "kept cached tokens per (sequence, KV head) per decode step, sinks and window included; "
        "a context at or under it is attended densely (Quest's budgets run 256..4096; 1024 is their middle)",
        "stem",
    )
    budget_fraction: float = param(
        0.0, "if > 0: budget = ceil(budget_fraction * valid tokens) per sequence instead of `budget`", "stem"
    )
    sink_tokens: int = param(4, "first valid tokens always kept (attention sinks, as StreamingLLM's 4)", "stem")
    window_tokens: int = param(64, "most recent tokens always kept (local window; includes the current token)", "stem")
    dense_decode_layers: tuple = param(
        (0, 1), "layers whose decode steps stay dense (Quest leaves the first two layers dense; same here so budgets compare)", "paper"
    )
    audit: bool = param(False, "compute the exact dropped mass delta every step (one dense q.K scoring pass per layer)", "stem")

    def __post_init__(self):
        _int_at_least("budget", self.budget, 1, "a token count >= 1, e.g. 1024")
        _number_in("budget_fraction", self.budget_fraction, 0.0, 1.0, "use 0 (off) or a fraction in (0, 1]")
        _int_at_least("sink_tokens", self.sink_tokens, 0, "a token count >= 0")
        _int_at_least("window_tokens", self.window_tokens, 1, "a token count >= 1 (the current token)")
        layers = self.dense_decode_layers
        if isinstance(layers, int) or not isinstance(layers, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
        ):
            raise ConfigError(f"dense_decode_layers={layers!r} is not allowed: use a list of layer indices >= 0, e.g. [0, 1]")
        object.__setattr__(self, "dense_decode_layers", tuple(sorted(set(layers))))
        if not isinstance(self.audit, bool):
            raise ConfigError(f"audit={self.audit!r} is not allowed: use true or false")
        if self.budget_fraction == 0 and self.budget < self.sink_tokens + self.window_tokens:
            raise ConfigError(
                f"budget={self.budget} is not allowed: it must hold the sinks and the window "
                f"(sink_tokens + window_tokens = {self.sink_tokens + self.window_tokens})"
            )


@dataclass(frozen=True)
class TopkDecodeConfig(DecodeConfig):
    """Exact top-k every step: no parameters beyond the budget."""


@dataclass(frozen=True)
class QuestConfig(DecodeConfig):
    page_size: int = param(16, "tokens per page; each page keeps per-channel min/max keys", "paper")

    def __post_init__(self):
        super().__post_init__()
        _int_at_least("page_size", self.page_size, 1, "a token count >= 1, e.g. 16")


@dataclass(frozen=True)
class PrhsConfig(DecodeConfig):
    selectors: str = param(
        "time,depth,layer",
        "PrHS selectors on, comma-separated: time (index sharing), depth (progressive window), "
        "layer (early-token freezing); 'none' = exact top-k every step",
        "paper",
    )
    tau: float = param(0.8, "time: cosine similarity with the anchor's query above which a step reuses the anchor's set", "paper")
    r: int = param(1, "time: the shared set is dilated by +-r positions around the top third of the anchor's salient set", "paper")
    phi: float = param(0.75, "depth: layer l drops floor((1 - phi^(alpha (l - l_s)/(L - l_s))) t) oldest non-sink tokens", "stem")
    alpha: float = param(1.0, "depth: exponent scale of the progressive window (see phi)", "stem")
    depth_start: float = param(0.5, "depth: l_s = floor(depth_start * L), the first layer that drops tokens", "stem")
    psi: float = param(
        0.75,
        "layer: layer l freezes floor((1 - psi^(gamma (l - l_f)/(L - l_f))) t) early tokens (keeps there what the previous "
        "layer kept); defaults as the depth selector's, since psi = 0.5 from layer L/4 lost a 2k needle on SmolLM2",
        "stem",
    )
    gamma: float = param(1.0, "layer: exponent scale of the frozen prefix (see psi)", "stem")
    freeze_start: float = param(0.5, "layer: l_f = floor(freeze_start * L), the first layer that freezes", "stem")
    max_delta: float = param(
        0.0, "if > 0: a shared set whose estimated dropped mass exceeds it falls back to exact top-k (re-anchor)", "stem"
    )
    delta_check: str = param(
        "auto",
        "how max_delta estimates a shared set's delta: 'bound' (anchor's exact mass + a Lipschitz bound on the "
        "query drift: a guarantee, conservative), 'anchor' (the anchor query's mass on the set: cheap, no guarantee), "
        "'exact' (a dense scoring pass); 'auto' = exact when audit is on, else bound",
        "stem",
    )

    def __post_init__(self):
        super().__post_init__()
        chosen = self.selectors
        if isinstance(chosen, (list, tuple)):
            chosen = ",".join(str(x) for x in chosen)
        if not isinstance(chosen, str):
            raise ConfigError(f"selectors={self.selectors!r} is not allowed: use a comma-separated subset of {', '.join(SELECTORS)}, or 'none'")
        names = [x.strip() for x in chosen.split(",") if x.strip()]
        if names == ["none"]:
            names = []
        bad = [x for x in names if x not in SELECTORS]
        if bad:
            raise ConfigError(
                f"selectors={self.selectors!r} is not allowed: unknown selector {bad[0]!r}; "
                f"use a comma-separated subset of {', '.join(SELECTORS)}, or 'none'"
            )
        object.__setattr__(self, "selectors", ",".join(x for x in SELECTORS if x in names) or "none")
        _number_in("tau", self.tau, -1.0, 1.0, "tau is a cosine similarity threshold in [-1, 1]")
        _int_at_least("r", self.r, 0, "a dilation radius >= 0 positions")
        _number_in("phi", self.phi, 0.0, 1.0, "phi must lie in (0, 1]", low_open=True)
        _number_in("psi", self.psi, 0.0, 1.0, "psi must lie in (0, 1]", low_open=True)
        _number_in("alpha", self.alpha, 0.0, math.inf, "alpha must be >= 0")
        _number_in("gamma", self.gamma, 0.0, math.inf, "gamma must be >= 0")
        _number_in("depth_start", self.depth_start, 0.0, 1.0, "depth_start is a fraction of the depth in [0, 1)", high_open=True)
        _number_in("freeze_start", self.freeze_start, 0.0, 1.0, "freeze_start is a fraction of the depth in [0, 1)", high_open=True)
        _number_in("max_delta", self.max_delta, 0.0, 1.0, "use 0 (off) or a dropped-mass bound in (0, 1)", high_open=True)
        if self.delta_check not in DELTA_CHECKS:
            raise ConfigError(f"delta_check={self.delta_check!r} is not allowed: use one of {', '.join(DELTA_CHECKS)}")

    def uses(self, selector: str) -> bool:
        return selector in self.selectors.split(",")
