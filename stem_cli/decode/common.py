"""What every decode selector shares: the step's inputs, forced positions, budgets, top-k rows, schedules.

Conventions (one decode step of one layer):
- q (B, Hkv, g, d): the step's queries grouped by KV head (query head h = kv * g + i,
  as transformers' repeat_kv lays them out); k, v (B, Hkv, T, d): the cache,
  current token included at position T - 1.
- A selection is per (sequence, KV head), shared by the GQA group, so each
  selected K/V row is read once for the group. Salient positions are ranked by
  the group's mean softmax probability: for a fixed count that set maximises the
  group's mean kept mass, i.e. minimises the mean dropped mass delta.
- Selections are index rows (B, Hkv, K) of distinct positions with -1 pads.
- Valid positions: key_valid (B, T) from the attention mask (left padding =
  a valid suffix starting at start[b]); padded positions are never selected.
- Forced positions: sinks = the first sink_tokens valid positions,
  window = the last window_tokens positions (the current token included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass
class StepContext:
    layer: int
    num_layers: int
    q: torch.Tensor  # (B, Hkv, g, d), the model's dtype
    k: torch.Tensor  # (B, Hkv, T, d)
    v: torch.Tensor
    key_valid: torch.Tensor | None  # (B, T) bool or None (nothing padded)
    scale: float
    start: torch.Tensor  # (B,) first valid position
    n_valid: torch.Tensor  # (B,) valid positions
    sinks: int
    window: int
    step: int = 0  # decode steps this layer has run since the pre-fill
    prev_indices: torch.Tensor | None = None  # (B * Hkv, K) what the previous sparse layer kept at this step
    # (3,) float64 on the device, the runtime's running (anchors, cosine re-anchors, kept): a selector that counts
    # in a kernel adds its step's counts here in place (and says so: Selection.counted), saving the add's launch
    count_into: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def n_keys(self) -> int:
        return self.k.shape[2]

    @property
    def device(self):
        return self.k.device

    def positions(self) -> torch.Tensor:
        if "pos" not in self._cache:
            self._cache["pos"] = torch.arange(self.n_keys, device=self.device)
        return self._cache["pos"]

    def valid_mask(self) -> torch.Tensor:
        """(B, T) bool."""
        if self.key_valid is not None:
            return self.key_valid
        if "valid" not in self._cache:
            self._cache["valid"] = torch.ones(self.batch, self.n_keys, dtype=torch.bool, device=self.device)
        return self._cache["valid"]

    def forced_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions idx (B, ..., K) (>= 0 and < T) -> bool, True where forced_mask is: the same
        answer as forced_mask() gathered, in O(K) instead of building the (B, T) mask."""
        shape = (idx.shape[0],) + (1,) * (idx.dim() - 1)
        rank = idx - self.start.view(shape)
        forced = (idx >= self.window_start()) | ((rank >= 0) & (rank < self.sinks))
        if self.key_valid is not None:
            forced &= self.key_valid.gather(1, idx.reshape(idx.shape[0], -1)).view(idx.shape)
        return forced

    def valid_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions idx (B, ..., K) (>= 0 and < T) -> bool: valid (not padding), O(K)."""
        if self.key_valid is None:
            return torch.ones_like(idx, dtype=torch.bool)
        return self.key_valid.gather(1, idx.reshape(idx.shape[0], -1)).view(idx.shape)

    def sink_mask(self) -> torch.Tensor:
        """(B, T) bool: the first `sinks` valid positions."""
        rank = self.positions()[None, :] - self.start[:, None]
        return (rank >= 0) & (rank < self.sinks) & self.valid_mask()

    def window_start(self) -> int:
        return max(self.n_keys - self.window, 0)

    def forced_mask(self) -> torch.Tensor:
        """(B, T) bool: sinks and window (valid positions only)."""
        if "forced" not in self._cache:
            win = (self.positions() >= self.window_start())[None, :] & self.valid_mask()
            self._cache["forced"] = self.sink_mask() | win
        return self._cache["forced"]

    def forced_indices(self) -> torch.Tensor:
        """(B, sinks + window) distinct forced positions, -1 where a slot is unused or a duplicate."""
        if "forced_idx" not in self._cache:
            t, w0 = self.n_keys, self.window_start()
            sinks = self.start[:, None] + torch.arange(self.sinks, device=self.device)[None, :]
            sinks = torch.where(sinks < w0, sinks, torch.full_like(sinks, -1))  # past w0: the window has it
            win = torch.arange(t - self.window, t, device=self.device).expand(self.batch, self.window)
            win = torch.where(win >= self.start[:, None], win, torch.full_like(win, -1))
            idx = torch.cat([sinks, win], dim=1)
            if self.key_valid is not None:  # holes inside the valid suffix (not left padding)
                ok = self.key_valid.gather(1, idx.clamp_min(0)) & (idx >= 0)
                idx = torch.where(ok, idx, torch.full_like(idx, -1))
            self._cache["forced_idx"] = idx
        return self._cache["forced_idx"]

    def forced_count(self) -> torch.Tensor:
        return (self.forced_indices() >= 0).sum(-1)


def context_from(layer, num_layers, q, k, v, key_valid, scale, *, sinks: int, window: int, step: int = 0,
                 unpadded: tuple | None = None) -> StepContext:
    """q (B, Hq, 1, d) from the attention layer -> a StepContext. unpadded: (start, n_valid) made by
    unpadded_bounds for this (B, T), reused by every layer of a step when nothing is padded."""
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q[:, :, 0].reshape(b, hkv, hq // hkv, d)
    if key_valid is None:
        start, n_valid = unpadded if unpadded is not None else unpadded_bounds(b, t, k.device)
    else:
        key_valid = key_valid.to(k.device)
        start = torch.where(key_valid.any(-1), key_valid.to(torch.int8).argmax(-1), torch.full((b,), t, device=k.device)).long()
        n_valid = key_valid.sum(-1)
    return StepContext(layer, num_layers, qg, k, v, key_valid, scale, start, n_valid, sinks, window, step)


def unpadded_bounds(batch: int, n_keys: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, n_valid) (B,) of a cache with nothing padded: zeros and T."""
    return (torch.zeros(batch, dtype=torch.long, device=device),
            torch.full((batch,), n_keys, dtype=torch.long, device=device))


def row_budget(ctx: StepContext, budget: int, fraction: float) -> torch.Tensor:
    """(B,) kept positions per row: budget (or ceil(fraction * valid)), at least the forced ones."""
    if fraction > 0:
        b = torch.ceil(ctx.n_valid.double() * fraction).long()
    else:
        b = torch.full_like(ctx.n_valid, budget)
    return torch.maximum(b, ctx.forced_count())


def budget_width(ctx: StepContext, budget: int, fraction: float) -> int:
    """A host-side upper bound on row_budget (no device sync)."""
    bound = math.ceil(fraction * ctx.n_keys) if fraction > 0 else budget
    return min(max(bound, ctx.sinks + ctx.window), ctx.n_keys + ctx.sinks + ctx.window)


def full_logits(ctx: StepContext, lo: int = 0, rows: torch.Tensor | None = None, host_rows: list[int] | None = None) -> torch.Tensor:
    """scale * q.k over positions lo..T-1 (float32, or float64 for float64 inputs; -inf at invalid positions):
    (B, Hkv, g, T - lo), or (R, g, T - lo) for the flat (b * Hkv + h) rows given (a LongTensor `rows`;
    with `host_rows`, the same ids as host ints, each row's keys are read in place, one product per
    row, instead of gathering them into a copy)."""
    q, k = ctx.q, ctx.k[:, :, lo:]
    if rows is not None and host_rows is not None:
        flat_k = k.flatten(0, 1)  # a view for a cache whose (B, Hkv) dims merge (contiguous, or a slice along T)
        flat_q = q.flatten(0, 1)
        s = torch.stack([flat_q[r] @ flat_k[r].to(q.dtype).transpose(0, 1) for r in host_rows])
        valid = None if ctx.key_valid is None else ctx.key_valid.index_select(0, rows // ctx.kv_heads)[:, None, lo:]
    elif rows is None:
        s = torch.einsum("bhgd,bhtd->bhgt", q, k.to(q.dtype))
        valid = None if ctx.key_valid is None else ctx.key_valid[:, None, None, lo:]
    else:
        flat_k = k.reshape(-1, *k.shape[2:]) if k.is_contiguous() else k.flatten(0, 1)
        qr = q.reshape(-1, *q.shape[2:]).index_select(0, rows)
        s = torch.bmm(qr, flat_k.index_select(0, rows).to(q.dtype).transpose(1, 2))
        valid = None if ctx.key_valid is None else ctx.key_valid.index_select(0, rows // ctx.kv_heads)[:, None, lo:]
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * ctx.scale
    return s if valid is None else s.masked_fill(~valid, NEG_INF)  # nothing padded: nothing to mask


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; all -inf rows give zeros (not NaN)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))


def topk_rows(scores: torch.Tensor, k_rows: torch.Tensor, width: int) -> torch.Tensor:
    """(..., T) scores, (...) per-row counts -> (..., width) positions ranked by score, best first;
    -1 for ranks >= k_row and for -inf scores."""
    width = max(0, min(width, scores.shape[-1]))
    if width == 0:
        return torch.full((*scores.shape[:-1], 0), -1, dtype=torch.long, device=scores.device)
    values, idx = torch.topk(scores, width, dim=-1)
    rank = torch.arange(width, device=scores.device)
    ok = (rank < k_rows[..., None]) & (values > NEG_INF)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def dedupe(idx: torch.Tensor) -> torch.Tensor:
    """Sort each row and replace repeated positions (and negatives) by -1 (rows stay sorted, pads first)."""
    if idx.shape[-1] == 0:
        return idx
    s, _ = torch.sort(idx, dim=-1)
    repeat = torch.zeros_like(s, dtype=torch.bool)
    repeat[..., 1:] = s[..., 1:] == s[..., :-1]
    return torch.where(repeat | (s < 0), torch.full_like(s, -1), s)


def pad_to(idx: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - idx.shape[-1]
    if extra <= 0:
        return idx
    return torch.cat([idx, idx.new_full((*idx.shape[:-1], extra), -1)], dim=-1)


def keep_mask(idx: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(..., K) positions -> (..., T) bool."""
    mask = torch.zeros(*idx.shape[:-1], n_keys + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx >= 0, idx, torch.full_like(idx, n_keys)), True)
    return mask[..., :n_keys]


def dropped_from_probs(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Full-softmax probabilities p (..., g, T) and the kept positions (..., K) -> delta (..., g):
    the probability of every position not kept (summed directly: exact near 0)."""
    kept = keep_mask(idx, p.shape[-1])
    return (p * (~kept)[..., None, :]).sum(-1).clamp(0.0, 1.0)


# ------------------------------------------------------------------ PrHS schedules


def start_layer(fraction: float, num_layers: int) -> int:
    """l_s = floor(fraction * L)."""
    return math.floor(fraction * num_layers)


def schedule_fraction(layer: int, num_layers: int, *, base: float, exponent: float, first: int) -> float:
    """1 - base^(exponent (l - first) / (L - first)) for l >= first, else 0."""
    if layer < first or num_layers <= first:
        return 0.0
    return 1.0 - base ** (exponent * (layer - first) / (num_layers - first))


def schedule_count(fraction: float, t):
    """floor(fraction * t) for an int t or a tensor of them."""
    if isinstance(t, torch.Tensor):
        return torch.floor(t.double() * fraction + 1e-9).long()
    return max(0, math.floor(fraction * t + 1e-9))


def drop_fraction(layer: int, num_layers: int, *, phi: float, alpha: float, start: float) -> float:
    return schedule_fraction(layer, num_layers, base=phi, exponent=alpha, first=start_layer(start, num_layers))


def freeze_fraction(layer: int, num_layers: int, *, psi: float, gamma: float, start: float) -> float:
    return schedule_fraction(layer, num_layers, base=psi, exponent=gamma, first=start_layer(start, num_layers))


def progressive_drop(layer: int, num_layers: int, t, *, phi: float, alpha: float, start: float):
    """Depth selector: how many of the oldest non-sink tokens layer l drops from a context of t tokens."""
    return schedule_count(drop_fraction(layer, num_layers, phi=phi, alpha=alpha, start=start), t)


def freeze_prefix(layer: int, num_layers: int, t, *, psi: float, gamma: float, start: float):
    """Layer selector: how many early (non-sink) tokens layer l freezes in a context of t tokens."""
    return schedule_count(freeze_fraction(layer, num_layers, psi=psi, gamma=gamma, start=start), t)


# ------------------------------------------------------------------ what a selector returns


@dataclass
class Selection:
    """One decode step's choice for one layer.

    indices (B, Hkv, K): kept positions (-1 pads). delta (B, Hkv, g): exact dropped
    mass where `known` (B, Hkv) is True (selectors that scored every position know it
    for free). logits: full logits of every row when the selector computed them
    (an audit reuses them). Decision counts are per (sequence, KV head) row: host ints, or
    0-d device tensors where knowing them would need a host sync (the runtime sums those
    on the device and reads them only in stats()); a selector that has them in one device vector
    passes it as device_counts, which the runtime adds in one launch."""

    indices: torch.Tensor
    delta: torch.Tensor | None = None
    known: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    decisions: int | torch.Tensor = 0
    anchors: int | torch.Tensor = 0
    cosine_reanchors: int | torch.Tensor = 0
    fallbacks: int | torch.Tensor = 0
    over_bound: int | torch.Tensor = 0
    device_counts: torch.Tensor | None = None  # (anchors, cosine_reanchors, kept positions) in one vector: one add per step
    counted: bool = False  # device_counts were already added to StepContext.count_into (the runtime adds nothing)


def salient_width(ctx: StepContext, budget: int, fraction: float) -> int:
    """Host-side width of the salient part of an index row (the forced part has sinks + window slots)."""
    return max(budget_width(ctx, budget, fraction) - ctx.sinks - ctx.window, 0)


def with_forced(ctx: StepContext, salient: torch.Tensor) -> torch.Tensor:
    """Forced positions (B, F) in front of salient rows (B, Hkv, K) -> (B, Hkv, F + K)."""
    forced = ctx.forced_indices()[:, None, :].expand(ctx.batch, ctx.kv_heads, -1)
    return torch.cat([forced, salient], dim=-1)
