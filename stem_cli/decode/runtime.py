"""The per-generation decode runtime: selector state, sparse decode attention, dropped-mass statistics.

integration.py calls `forward` for every decode step (one query against the KV
cache) on governed layers, and `new_prefill(layer)` whenever a layer runs a
pre-fill: the selector state of that layer (anchors, step counters, page
metadata) starts over, so each generation starts clean. Statistics accumulate
until `reset()`, so an evaluation runner calls reset() before a sample and
stats() after it.

Execution: on CUDA with bf16/fp16 the Triton sparse-decode kernel
(kernels/sparse_decode.py); elsewhere the PyTorch reference
(kernels/decode_reference.py), with a one-time notice when a GPU falls back.
Layers in dense_decode_layers, and contexts that fit the budget, attend
densely (SDPA over the cache).

No host synchronisation in a step: counts and sums that live on the device
(kept tokens, dropped mass, over-bound rows, PrHS's device-side counters) are
accumulated there (in place) and read only by stats(); PrHS decides which rows
re-anchor on the device (prhs.py). So a whole decode step (every layer) can be
captured in a CUDA graph and replayed (graphs.py); the dropped-mass samples of
replayed steps are not appended (the list is host-side), the counters are.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from stem_cli.decode.common import (
    Selection,
    context_from,
    dropped_from_probs,
    full_logits,
    softmax_rows,
    unpadded_bounds,
)
from stem_cli.executor import notice_once
from stem_cli.kernels import decode_reference as ref


def dense_decode(query, key, value, key_valid, scale: float) -> torch.Tensor:
    """(B, Hq, 1, d): one query over the valid cache (SDPA, native GQA)."""
    mask = None if key_valid is None else key_valid[:, None, None, :].to(query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1])


def _kernel_unsupported(q: torch.Tensor) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"the Triton decode kernel takes bfloat16/float16, not {q.dtype}"
    return None


def sparse_decode(query, key, value, indices, scale: float) -> torch.Tensor:
    """(B, Hq, 1, d) attention over the selected positions (indices (B, Hkv, K), -1 pads)."""
    if query.is_cuda:
        reason = _kernel_unsupported(query)
        if reason is None:
            from stem_cli.kernels import sparse_decode as kernel

            return kernel.sparse_decode_attention(query, key, value, indices, scale=scale)
        notice_once(
            f"decode-reference:{reason}",
            f"stem: {reason}; running the PyTorch reference for sparse decode on the GPU (exact but slow: do not read its timings as the method's speed)",
        )
    return ref.sparse_decode_attention(query, key, value, indices, scale=scale).to(query.dtype)


class DecodeRuntime:
    """One decode method with its config, attached to a model for a run of generations."""

    def __init__(self, method, config, num_layers: int):  # method: stem_cli.registry.DecodeMethod
        self.method = method
        self.config = config
        self.num_layers = num_layers
        self.timer = None  # a StageTimer (the decode profiler): selection / attention / audit per call
        self.dense_fast_path = True  # contexts within the budget attend densely (tests switch it off)
        self.reset()

    @property
    def name(self) -> str:
        return self.method.name

    def reset(self) -> None:
        """Forget selector state and statistics (call before each evaluated sample)."""
        self.states: dict[int, dict] = {}
        self._prev = None
        self._unpadded = None  # ((B, T, device), (start, n_valid)) of the last unpadded cache
        self.reset_stats()

    COUNTERS = ("kept", "valid", "kept_sparse", "valid_sparse", "decisions", "anchors", "cosine_reanchors", "fallbacks", "over_bound")

    def reset_stats(self) -> None:
        """Forget the statistics only (selector state carries on)."""
        self._deltas: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._host = dict.fromkeys(self.COUNTERS, 0)  # counts known on the host
        self._device: dict[str, torch.Tensor] = {}  # counts that live on the device (summed there, read in stats())
        self._vector: torch.Tensor | None = None  # the sum of Selection.device_counts (VECTOR names its slots)
        self._zero_delta: dict = {}
        self.steps: dict[int, int] = {}

    def _count(self, name: str, value) -> None:
        """Add a host int or a device tensor to a counter without a host sync."""
        if isinstance(value, torch.Tensor):
            cur = self._device.get(name)
            if cur is None:
                self._device[name] = value.detach().to(torch.float64, copy=True)
            else:  # in place: a CUDA graph of the step replays into the same counter
                cur.add_(value)
        else:
            self._host[name] += value

    VECTOR = {"anchors": 0, "cosine_reanchors": 1, "kept": 2, "kept_sparse": 2}  # Selection.device_counts' slots

    def _count_vector(self, counts: torch.Tensor) -> None:
        if self._vector is None:
            self._vector = counts.detach().to(torch.float64, copy=True)
        else:  # in place, as _count
            self._vector.add_(counts)

    def _vector_for(self, device) -> torch.Tensor:
        """The running device_counts (made as zeros once after reset_stats), for selectors to add into in place."""
        if self._vector is None:
            self._vector = torch.zeros(3, dtype=torch.float64, device=device)
        return self._vector

    def counter(self, name: str) -> float:
        """A counter's value (reads the device part: a sync; for stats() and tests, not the step)."""
        dev = self._device.get(name)
        value = self._host[name] + (float(dev) if dev is not None else 0)
        if self._vector is not None and name in self.VECTOR:
            value += float(self._vector[self.VECTOR[name]])
        return value

    def __getattr__(self, name):  # decisions, anchors, ... as before (read-only; syncs)
        if name in DecodeRuntime.COUNTERS and "_host" in self.__dict__:
            value = self.counter(name)
            return int(value) if float(value).is_integer() else value
        raise AttributeError(name)

    def new_prefill(self, layer: int) -> None:
        """A pre-fill on `layer`: a new sequence (or chunk); its selector state starts over."""
        self.states.pop(layer, None)
        self._prev = None

    def _stage(self, name: str):
        return self.timer.stage(name) if self.timer is not None else nullcontext()

    def forward(self, module, query, key, value, key_valid, scale: float) -> torch.Tensor:
        """query (B, Hq, 1, d), key/value (B, Hkv, T, d) the cache -> (B, Hq, 1, d)."""
        cfg = self.config
        layer = getattr(module, "layer_idx", 0)
        state = self.states.setdefault(layer, {"steps": 0})
        step = state["steps"]
        state["steps"] += 1
        self.steps[layer] = self.steps.get(layer, 0) + 1
        b, hkv, t = key.shape[0], key.shape[1], key.shape[2]
        valid = b * t if key_valid is None else key_valid.sum()  # valid cached tokens (no device sync)
        dense_layer = layer in cfg.dense_decode_layers
        fits = cfg.budget_fraction >= 1.0 or (cfg.budget_fraction == 0 and t <= cfg.budget)
        if dense_layer or (fits and self.dense_fast_path):
            with self._stage("attention"):
                out = dense_decode(query, key, value, key_valid, scale)
            self._count("kept", valid * hkv)
            self._count("valid", valid * hkv)
            if not dense_layer:  # a sparse layer whose budget covers the context: delta = 0 exactly
                self._count("kept_sparse", valid * hkv)
                self._count("valid_sparse", valid * hkv)
                g = query.shape[1] // hkv
                key_ = (b, hkv, g, key.device)
                if key_ not in self._zero_delta:  # one (never written) pair per shape, appended by reference
                    self._zero_delta[key_] = (torch.zeros(b, hkv, g, device=key.device), torch.ones(b, hkv, dtype=torch.bool, device=key.device))
                self._deltas.append(self._zero_delta[key_])
            return out

        unpadded = None
        if key_valid is None:  # made once per cache shape, not once per layer (two launches fewer per layer-step)
            shape = (b, t, key.device)
            if self._unpadded is None or self._unpadded[0] != shape:
                self._unpadded = (shape, unpadded_bounds(b, t, key.device))
            unpadded = self._unpadded[1]
        ctx = context_from(layer, self.num_layers, query, key, value, key_valid, scale,
                           sinks=cfg.sink_tokens, window=cfg.window_tokens, step=step, unpadded=unpadded)
        ctx.count_into = self._vector_for(key.device)
        prev = self._prev
        if prev is not None and prev[0] < layer and prev[1] == step and prev[2].shape[0] == b * hkv:
            ctx.prev_indices = prev[2]
        with self._stage("selection"):
            sel: Selection = self.method.select(ctx, cfg, state)
        with self._stage("attention"):
            out = sparse_decode(query, key, value, sel.indices, scale)
        delta, known = sel.delta, sel.known
        if cfg.audit:
            with self._stage("audit"):
                logits = sel.logits if sel.logits is not None else full_logits(ctx)
                delta = dropped_from_probs(softmax_rows(logits), sel.indices)
                known = torch.ones(b, hkv, dtype=torch.bool, device=key.device)
        if delta is not None:
            self._deltas.append((delta.float(), known))
            max_delta = getattr(cfg, "max_delta", 0.0)
            if max_delta > 0:
                self._count("over_bound", ((delta.amax(-1) > max_delta) & known).sum())
        for name in ("valid", "valid_sparse"):
            self._count(name, valid * hkv)
        if sel.device_counts is not None:  # anchors, cosine re-anchors and kept positions: one launch, or none
            if not sel.counted:  # (counted: the selector's kernel added them to ctx.count_into)
                self._count_vector(sel.device_counts)
            for name in ("decisions", "fallbacks"):
                self._count(name, getattr(sel, name))
        else:
            used = (sel.indices >= 0).sum()
            for name in ("kept", "kept_sparse"):
                self._count(name, used)
            for name in ("decisions", "anchors", "cosine_reanchors", "fallbacks"):
                self._count(name, getattr(sel, name))
        self._prev = (layer, step, sel.indices.flatten(0, 1))
        return out

    def stats(self) -> dict[str, Any]:
        """Per-run numbers an evaluation records next to accuracy (delta over sparse layers' query heads and steps)."""
        samples = [d[k] for d, k in self._deltas if k.any()]
        total = sum(int(k.numel()) * d.shape[-1] for d, k in self._deltas)
        values = torch.cat([x.flatten() for x in samples]).double() if samples else torch.zeros(0, dtype=torch.float64)
        n = int(values.numel())

        def ratio(a, b):
            num, den = self.counter(a), self.counter(b)
            return num / den if den else None

        decisions, anchors = self.decisions, self.anchors

        return {
            "method": self.name,
            "decode_steps": max(self.steps.values(), default=0),
            "delta_mean": float(values.mean()) if n else None,
            "delta_p95": float(torch.quantile(values, 0.95)) if n else None,
            "delta_max": float(values.max()) if n else None,
            "delta_samples": n,
            "delta_coverage": n / total if total else None,
            "delta_source": ("exact every step (audit)" if self.config.audit
                             else "exact where the selector scored every position (anchor / top-k steps; 0 where the budget covers the context)"),
            "reanchor_fraction": anchors / decisions if decisions else None,
            "reanchors": anchors,
            "cosine_reanchors": self.cosine_reanchors,
            "fallbacks": self.fallbacks,
            "over_max_delta": self.over_bound,
            "decisions": decisions,
            "kept_fraction": ratio("kept", "valid"),
            "kept_fraction_sparse_layers": ratio("kept_sparse", "valid_sparse"),
        }
