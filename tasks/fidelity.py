"""Attention fidelity of a method against dense attention, per layer and head (a measure task).

What it reproduces: the spec's Output-Aware vs Score-Aware comparison (section 1,
"OAM vs SAM", a Table-1-style ablation). At an equal budget, the method whose
selection keeps each layer's attention output closer to dense attention wins;
run `stem` and `sam` (and `uniform`, TPD off) on the same prompts and compare.

How it runs: one forward of a real prompt with a handler of stem_cli.hook's attention
function (the model's attention is restored afterwards). Every governed attention call
(a pre-fill over a full-attention layer; the same calls that `stem_cli.apply`
governs) takes the layer's q, k, v and
  1. asks the method's selector for its BlockIndex, exactly as the integration
     does (dense layers of the config and the `dense` method get the full index);
  2. computes, from the same q, k, v in float32 (float64 for float64 inputs) and
     one chunk of query rows at a time, dense causal attention O_d and the
     method's block-sparse attention O_m (exact softmax over the index's blocks:
     the semantics of the executor, checked against `kernels.reference` in the
     tests; kernel rounding is not part of this measure);
  3. returns O_d to the model.
So every layer sees the dense residual stream: the numbers below are per-layer
errors of the selection, not errors compounded through earlier sparse layers.

Definitions, for one layer and one query head h, over the valid query rows t
(every token of an unpadded prompt), with p_t the dense causal softmax row of t,
S(i) the key blocks the method keeps for query block i (the block of t), and
c_i = |S(i)|:
- rel_error = ||O_m - O_d||_F / ||O_d||_F, Frobenius norms over (rows, head dim).
- delta = mean over rows t of the dense softmax mass outside the kept blocks,
  1 - sum_{j in S(i)} sum_{k in block j} p_t[k], computed as the dropped blocks'
  sum of exp(s - rowmax) over the row's total (no cancellation for tiny delta).
  delta is also the total variation distance between the dense row and the
  method's renormalised row.
- recall = mean over query blocks i (with a valid query) of
  |S(i) & T(i)| / c_i, where T(i) is the c_i key blocks with the largest dense
  block mass A[i, j] = sum_{t in block i} sum_{k in block j} p_t[k] (the mass
  the block's queries put on key block j); ties at the c_i-th value count in the
  method's favour. Rows that keep every causal block have recall 1 trivially.
- recall_sparse: the same pooled over the rows that drop at least one causal
  block only (None where no row does).
- delta_oracle = the smallest delta any selection with the same per-row counts
  c_i can reach (keep T(i)): 1 - mean_t sum_{j in T(i)} mass; delta - delta_oracle
  is what the method's ranking loses against the dense attention's own ranking.
- bud (per layer and overall) = computed / causal token pairs, as in the runtime
  recorder (stem_cli.index.computed_pairs); dense layers count fully.
- by query position: rel_error and delta over the rows t of each of POSITION_BINS
  equal slices of the prompt (bin floor(t * POSITION_BINS / N)), and over the last
  TAIL_ROWS rows, where a task's question sits (the row that decides the answer
  attends from there). Per (layer, head) as above, then the mean over (layer, head):
  `position_rel_error` and `position_delta`, POSITION_BINS + 1 values, the tail last.
  Sparse methods drop most mass in late rows (their budget is a falling fraction of a
  longer causal row), so a headline error can hide a large one where the question is.
Headlines: score = rel_error = mean over (layer, head); delta, delta_oracle and
recall the same means (every (layer, head) has the same rows); recall_sparse
pooled over all sparse rows; bud over all pairs.

Cost: one exp pass serves both outputs (O_m = the kept part of exp(s - rowmax)
times V over its own sum); rows whose kept mass fell below float32's range
relative to the row maximum are redone exactly by a masked log-sum-exp. Three
GEMMs per chunk (QK^T, two PV): about 3x one dense attention, plus the method's
selector. Memory: per chunk of R query rows (R a multiple of the block size) one
(Hq, R, N) float32 slab of about `chunk_bytes` (32 MiB) and a few smaller ones;
at least one block of rows, e.g. 16K tokens x 32 heads x 128 rows = 256 MiB. The
per-layer (Hq, P, P) block-mass map is float64 (P = N / block_size).

Rendering: `table_rows(records_by_method)` gives one flat row per method
(aggregated); the runner renders it.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from stem_cli.methods.blocks import NEG_INF, pad_to
from stem_cli.tasks.base import Sample

from stem_cli.index import BlockIndex, block_pair_counts, causal_pairs, computed_pairs

TASK = "fidelity"
HIGHER_IS_BETTER = False
DESCRIPTION = (
    "per-layer, per-head relative output error of the method's attention vs dense (dense residual stream), "
    "dropped softmax mass delta, recall of dense top blocks, BUD"
)
PROMPT_SOURCE = "auto"  # see prompts()
RULER_MIX = ("niah_single_2", "niah_multikey_2", "vt", "cwe")
CHUNK_BYTES = 32 << 20  # one (Hq, rows, N) float32 slab: cache-friendlier than big slabs on the CPU
# Bump when a change alters the measures this module makes (its prompts are ruler's and needle's,
# whose versions are keyed too): stored results are keyed by it, so older ones are recomputed
# (and the run says so) instead of reused.
GENERATOR_VERSION = 2  # 2: position-resolved error and dropped mass
POSITION_BINS = 16
TAIL_ROWS = 64


# --------------------------------------------------------------------------- prompts


def prompts(tokenizer, seq_len: int, *, seed: int, limit: int, use_chat_template=None, source: str | None = None) -> list[tuple[list[int], dict]]:
    """The prompt source, in one place: [(input_ids, meta)] of `limit` real prompts.

    "ruler": prompt i is tasks/ruler.py's sample i of task RULER_MIX[i % 4] (an essay
    needle, a multi-key needle, variable tracking, common words: different attention
    patterns); "ruler:<task>": that RULER task only; "needle": the offline needle prompt
    of tasks/needle.py, prompt i built with seed seed * 1000 + i. "auto" (the default,
    PROMPT_SOURCE): "ruler" when tasks/ruler.py is importable, else "needle".
    """
    source = source or PROMPT_SOURCE
    if source == "auto":
        source = "ruler" if importlib.util.find_spec("stem_cli.tasks.ruler") is not None else "needle"
    if source == "needle":
        from stem_cli.tasks.needle import build_needle_prompt

        out = []
        for i in range(limit):
            p = build_needle_prompt(tokenizer, seq_len, seed=seed * 1000 + i, use_chat_template=use_chat_template)
            out.append((p.input_ids[0].tolist(), {"source": "needle", "depth": p.depth, "key": p.key, "n_tokens": p.n_tokens}))
        return out
    if source == "ruler" or source.startswith("ruler:"):
        from stem_cli.tasks import ruler

        tasks = RULER_MIX if source == "ruler" else (source.split(":", 1)[1],)
        out = []
        for i in range(limit):
            s = ruler.build_sample(tasks[i % len(tasks)], tokenizer, seq_len, seed=seed, index=i, use_chat_template=use_chat_template)
            out.append((list(s.input_ids), {"source": "ruler", "prompt": s.id, "n_tokens": len(s.input_ids)}))
        return out
    raise ValueError(f"unknown prompt source {source!r}; use 'auto', 'needle', 'ruler' or 'ruler:<task>'")


def build_samples(tokenizer, seq_len: int, *, seed: int = 0, limit: int = 4, use_chat_template=None) -> list[Sample]:
    return [
        Sample.measured(TASK, seq_len, seed, i, ids, meta)
        for i, (ids, meta) in enumerate(prompts(tokenizer, seq_len, seed=seed, limit=limit, use_chat_template=use_chat_template))
    ]


# --------------------------------------------------------------------------- one layer


@dataclass
class LayerFidelity:
    """Sums for one attention call; per (batch, query head) unless said otherwise."""

    err_sq: torch.Tensor  # (B, Hq) sum over valid rows of ||o_m - o_d||^2
    ref_sq: torch.Tensor  # (B, Hq) sum over valid rows of ||o_d||^2
    delta_sum: torch.Tensor  # (B, Hq) sum over valid rows of the dropped dense mass
    rows: torch.Tensor  # (B,) valid query rows
    recall_sum: torch.Tensor  # (B, Hq) sum over valid query blocks of the row recall
    block_rows: torch.Tensor  # (B,) query blocks with a valid query
    recall_sparse_sum: torch.Tensor  # (B, Hq) the same over rows that drop a causal block
    sparse_rows: torch.Tensor  # (B, Hq)
    delta_oracle_sum: torch.Tensor  # (B, Hq)
    position_err_sq: torch.Tensor  # (B, Hq, POSITION_BINS + 1): err_sq per position bin, the last TAIL_ROWS rows last
    position_ref_sq: torch.Tensor  # (B, Hq, POSITION_BINS + 1)
    position_delta_sum: torch.Tensor  # (B, Hq, POSITION_BINS + 1)
    position_rows: torch.Tensor  # (B, Hq, POSITION_BINS + 1) valid rows per bin
    computed: float  # token pairs over all heads and the batch
    causal: float
    dense_out: torch.Tensor | None = None  # (B, Hq, N, dv) in the work dtype

    def per_head(self, b: int = 0) -> dict[str, list]:
        rows = float(self.rows[b])
        block_rows = float(self.block_rows[b])
        ref = self.ref_sq[b].double()
        rel = torch.where(ref > 0, (self.err_sq[b].double() / ref.clamp_min(1e-300)).sqrt(), self.err_sq[b].double().sqrt())
        sparse = self.sparse_rows[b].double()
        return {
            "rel_error": rel.tolist(),
            "delta": (self.delta_sum[b].double() / max(rows, 1)).tolist(),
            "delta_oracle": (self.delta_oracle_sum[b].double() / max(rows, 1)).tolist(),
            "recall": (self.recall_sum[b].double() / max(block_rows, 1)).tolist(),
            "recall_sparse": [
                float(s) / float(n) if n > 0 else None for s, n in zip(self.recall_sparse_sum[b].tolist(), sparse.tolist())
            ],
            "recall_sparse_sum": self.recall_sparse_sum[b].double().tolist(),
            "sparse_rows": sparse.tolist(),
            "position_rel_error": _ratio(self.position_err_sq[b], self.position_ref_sq[b], root=True),
            "position_delta": _ratio(self.position_delta_sum[b], self.position_rows[b]),
        }


def _ratio(num: torch.Tensor, den: torch.Tensor, root: bool = False) -> list:
    """num / den per head and bin (sqrt when `root`); None where the bin has no rows (den 0)."""
    r = num.double() / den.double().clamp_min(1e-300)
    r = r.sqrt() if root else r
    return [[float(x) if d > 0 else None for x, d in zip(rr.tolist(), dd.tolist())] for rr, dd in zip(r, den)]


_TINY = 1e-20  # relative kept mass below which exp(s - rowmax) may have underflowed


def _mask_causal_valid(s: torch.Tensor, r0: int, valid: torch.Tensor | None) -> None:
    """In place: -inf for keys after the row (only inside the chunk's own square) and padded keys."""
    rows = s.shape[-2]
    upper = torch.ones(rows, rows, dtype=torch.bool, device=s.device).triu(1)
    s[..., r0 : r0 + rows].masked_fill_(upper, NEG_INF)
    if valid is not None:
        s.masked_fill_(~valid[:, None, None, : s.shape[-1]], NEG_INF)


def _exact_sparse_rows(qc, kf, vf, r0, r1, scale, kept, valid, padded) -> torch.Tensor:
    """The chunk's block-sparse output by a masked log-sum-exp (no underflow), (B, Hq, rows, dv)."""
    batch, hkv, group, rows, _ = qc.shape
    hq, bs = hkv * group, rows // kept.shape[2]
    b1 = r1 // bs
    s = torch.matmul(qc, kf[:, :, None, :r1].transpose(-1, -2)).view(batch, hq, rows, r1).mul_(scale)
    _mask_causal_valid(s, r0, valid if padded else None)
    s.view(batch, hq, kept.shape[2], bs, b1, bs).masked_fill_(~kept[:, :, :, None, :, None], NEG_INF)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    pr = torch.exp(s - torch.where(lse > NEG_INF, lse, 0.0))
    return torch.matmul(pr.view(batch, hkv, group, rows, r1), vf[:, :, None, :r1]).view(batch, hq, rows, -1)


def layer_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    keep_output: bool = True,
) -> LayerFidelity:
    """Dense vs block-sparse attention of one causal pre-fill call (module docstring).

    q (B, Hq, N, d), k/v (B, Hkv, N, d); the index per query head or per KV head.
    """
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    dv = v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    bs = index.block_size
    p = index.num_blocks
    npad = p * bs
    dev = q.device
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(work)
    kf, vf = pad_to(k.to(work), npad), pad_to(v.to(work), npad)
    valid = torch.zeros(batch, npad, dtype=torch.bool, device=dev)
    valid[:, :n] = True if key_valid is None else key_valid.to(dev)
    per_index_head = hq // index.num_heads
    rows_per_chunk = max(bs, chunk_bytes // max(batch * hq * npad * 4, 1) // bs * bs)

    acc = torch.float64
    err_sq = torch.zeros(batch, hq, dtype=acc, device=dev)
    ref_sq = torch.zeros_like(err_sq)
    delta_sum = torch.zeros_like(err_sq)
    block_mass = torch.zeros(batch, hq, p, p, dtype=acc, device=dev)  # A[i, j], summed over the valid queries of block i
    out = torch.zeros(batch, hq, n, dv, dtype=work, device=dev) if keep_output else None
    slots = POSITION_BINS + 1
    position = torch.zeros(4, batch, hq, slots, dtype=acc, device=dev)  # err_sq, ref_sq, delta, rows per bin

    for r0 in range(0, npad, rows_per_chunk):
        r1 = min(npad, r0 + rows_per_chunk)
        rows, b0, b1 = r1 - r0, r0 // bs, r1 // bs
        qc = pad_to(qf[:, :, r0 : min(r1, n)], rows).view(batch, hkv, group, rows, d)
        s = torch.matmul(qc, kf[:, :, None, :r1].transpose(-1, -2)).view(batch, hq, rows, r1).mul_(scale)
        _mask_causal_valid(s, r0, valid if key_valid is not None else None)
        # Unnormalised dense probabilities e = exp(s - rowmax), in place; both outputs and
        # all masses are ratios of sums of e, so one exp serves dense and sparse alike.
        m = s.amax(-1, keepdim=True)
        e = s.sub_(torch.where(m > NEG_INF, m, 0.0)).exp_()
        bm = e.view(batch, hq, rows, b1, bs).sum(-1)  # (B, Hq, rows, b1): per-row key-block mass
        kept = index.rows(b0, b1)[..., :b1].to(dev).repeat_interleave(per_index_head, dim=1)  # (B, Hq, b1-b0, b1)
        bm_blocks = bm.view(batch, hq, b1 - b0, bs, b1)
        l_d = bm.sum(-1)  # (B, Hq, rows)
        l_m = (bm_blocks * kept[:, :, :, None, :]).sum(-1).view(batch, hq, rows)
        l_drop = (bm_blocks * ~kept[:, :, :, None, :]).sum(-1).view(batch, hq, rows)
        w = (valid[:, None, r0:r1] & (l_d > 0)).to(work)  # (B, Hq, rows): valid query rows
        o_d = torch.matmul(e.view(batch, hkv, group, rows, r1), vf[:, :, None, :r1]).view(batch, hq, rows, dv)
        o_d = o_d / torch.where(l_d > 0, l_d, 1.0)[..., None]
        block_mass[:, :, b0:b1, :b1] += (bm / torch.where(l_d > 0, l_d, 1.0)[..., None] * w[..., None]).view(
            batch, hq, b1 - b0, bs, b1
        ).sum(3, dtype=acc)
        e.view(batch, hq, b1 - b0, bs, b1, bs).mul_(kept[:, :, :, None, :, None])  # e is now the kept part
        o_m = torch.matmul(e.view(batch, hkv, group, rows, r1), vf[:, :, None, :r1]).view(batch, hq, rows, dv)
        o_m = torch.where(l_m[..., None] > 0, o_m / torch.where(l_m > 0, l_m, 1.0)[..., None], 0.0)
        del s, e
        # Kept mass so small that exp(s - rowmax) lost it to underflow: redo those rows exactly.
        tiny = (w > 0) & (l_m < _TINY * l_d)
        if bool(tiny.any()):
            o_m = torch.where(tiny[..., None], _exact_sparse_rows(qc, kf, vf, r0, r1, scale, kept, valid, key_valid is not None), o_m)
        dropped = torch.where(l_d > 0, l_drop / torch.where(l_d > 0, l_d, 1.0), 0.0)

        row_err = ((o_m - o_d) ** 2).sum(-1, dtype=acc) * w
        row_ref = (o_d**2).sum(-1, dtype=acc) * w
        row_delta = dropped.to(acc) * w
        err_sq += row_err.sum(-1)
        ref_sq += row_ref.sum(-1)
        delta_sum += row_delta.sum(-1)
        t = torch.arange(r0, r1, device=dev)
        bins = (t * POSITION_BINS // n).clamp_max(POSITION_BINS - 1)
        per_row = torch.stack([row_err, row_ref, row_delta, w.to(acc)])  # (4, B, Hq, rows)
        position.index_add_(-1, bins, per_row)
        tail = (t >= n - TAIL_ROWS) & (t < n)
        position[..., POSITION_BINS] += per_row[..., tail].sum(-1)
        if out is not None:
            stop = min(r1, n) - r0
            if stop > 0:
                out[:, :, r0 : r0 + stop] = o_d[:, :, :stop]

    # Recall of the dense top blocks, per query block, with ties in the method's favour.
    sel = index.to_mask().to(dev).repeat_interleave(per_index_head, dim=1)  # (B, Hq, P, P)
    c = sel.sum(-1)  # (B, Hq, P)
    row_recall, top_mass = top_block_recall(block_mass, sel)
    queries = valid.view(batch, p, bs).sum(-1)  # valid queries per block (B, P)
    row_valid = (queries > 0)[:, None, :] & (c > 0)
    has_key = valid.view(batch, p, bs).any(-1)
    choosable = (torch.ones(p, p, dtype=torch.bool, device=dev).tril()[None] & has_key[:, None, :]).sum(-1)  # (B, P)
    sparse_row = row_valid & (c < choosable[:, None, :])
    oracle_sum = torch.where(row_valid, queries[:, None, :].to(acc) - top_mass, 0.0).sum(-1).clamp_min(0.0)

    pairs = block_pair_counts(key_valid, batch, n, bs, device=dev)
    causal = causal_pairs(pairs, hq)
    computed = causal if index.full else computed_pairs(index, pairs, hq)
    return LayerFidelity(
        err_sq=err_sq.cpu(),
        ref_sq=ref_sq.cpu(),
        delta_sum=delta_sum.cpu(),
        rows=valid[:, :n].sum(-1).cpu(),
        recall_sum=torch.where(row_valid, row_recall, 0.0).sum(-1).cpu(),
        block_rows=(queries > 0).sum(-1).cpu(),
        recall_sparse_sum=torch.where(sparse_row, row_recall, 0.0).sum(-1).cpu(),
        sparse_rows=sparse_row.sum(-1).cpu(),
        delta_oracle_sum=oracle_sum.cpu(),
        position_err_sq=position[0].cpu(),
        position_ref_sq=position[1].cpu(),
        position_delta_sum=position[2].cpu(),
        position_rows=position[3].cpu(),
        computed=float(computed),
        causal=float(causal),
        dense_out=out,
    )


def top_block_recall(mass: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a block attention map: (recall, top mass), both (..., P) float64.

    mass (..., P) dense attention mass per key block; selected (..., P) bool, the
    method's c kept blocks. recall = |selected & top_c| / c, top_c the c blocks of
    largest mass, ties at the c-th value resolved in the selection's favour (so the
    recall is the best over tie-breaks); 0 where c = 0. top mass = the sum of the c
    largest masses (what the best selection of c blocks keeps).
    """
    c = selected.sum(-1)
    ranked = mass.sort(dim=-1, descending=True).values
    thr = ranked.gather(-1, (c - 1).clamp_min(0)[..., None].long())
    above, tie = mass > thr, mass == thr
    kept_top = (selected & above).sum(-1) + torch.minimum((selected & tie).sum(-1), c - above.sum(-1))
    recall = torch.where(c > 0, kept_top.double() / c.clamp_min(1).double(), 0.0)
    top_mass = torch.where(torch.arange(mass.shape[-1], device=mass.device) < c[..., None], ranked, 0).sum(-1).double()
    return recall, top_mass


# --------------------------------------------------------------------------- the model hook


@dataclass
class Probe:
    """The hook handler for one forward: the method's runtime selects, dense attention is returned."""

    runtime: Any  # stem_cli.integration.Runtime: the same selection path as a method run
    chunk_bytes: int = CHUNK_BYTES
    layers: dict[int, LayerFidelity] = field(default_factory=dict)
    capture_layers: tuple = ()  # layers whose (q, k, v, index, scale, key_valid) are kept (tests)
    captured: dict[int, dict] = field(default_factory=dict)
    on_call: Callable | None = None

    @property
    def method(self):
        return self.runtime.method

    @property
    def config(self):
        return self.runtime.config

    def attend(self, call) -> torch.Tensor | None:
        if call.kind != "prefill":
            return None
        call.check_supported("stem fidelity")
        query, key, value, layer, scale, key_valid = call.query, call.key, call.value, call.layer, call.scale, call.key_valid
        index = self.runtime.select(query, key, value, layer=layer, scale=scale, key_valid=key_valid)
        result = layer_fidelity(query, key, value, index, scale=scale, key_valid=key_valid, chunk_bytes=self.chunk_bytes)
        if layer in self.layers:  # pragma: no cover - one forward calls each layer once
            raise RuntimeError(f"stem fidelity: layer {layer} attended twice in one forward")
        self.layers[layer] = result
        if layer in self.capture_layers:
            self.captured[layer] = {"q": query.detach(), "k": key.detach(), "v": value.detach(), "index": index, "scale": scale,
                                    "key_valid": key_valid}
        out = result.dense_out.to(query.dtype)
        result.dense_out = None
        return out


def run_fidelity(
    model,
    method_name: str,
    config,
    input_ids,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    capture_layers=(),
) -> Probe:
    """One forward of input_ids (1, N) with the fidelity handler; the model's attention is restored."""
    from stem_cli.hook import handling
    from stem_cli.integration import build_runtime

    probe = Probe(build_runtime(model, method_name, config), chunk_bytes, capture_layers=tuple(capture_layers))
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    with handling(model, probe), torch.no_grad():
        try:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except TypeError:
            model(input_ids=ids, use_cache=False)
    return probe


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def summarize(probe: Probe) -> dict:
    """Per-layer-per-head lists and headline means of one forward (batch row 0)."""
    layers = sorted(probe.layers)
    heads = [probe.layers[layer].per_head(0) for layer in layers]
    flat = lambda key: [x for h in heads for x in h[key]]
    sparse_rows = sum(flat("sparse_rows"))
    computed = sum(probe.layers[layer].computed for layer in layers)
    causal = sum(probe.layers[layer].causal for layer in layers)
    rel = _mean(flat("rel_error"))
    return {
        "score": rel,
        "rel_error": rel,
        "delta": _mean(flat("delta")),
        "delta_oracle": _mean(flat("delta_oracle")),
        "recall": _mean(flat("recall")),
        "recall_sparse": sum(flat("recall_sparse_sum")) / sparse_rows if sparse_rows else None,
        "bud": computed / causal if causal else None,
        "pairs_computed": computed,
        "pairs_causal": causal,
        "rows": float(probe.layers[layers[0]].rows[0]) if layers else 0.0,
        "block_rows": float(probe.layers[layers[0]].block_rows[0]) if layers else 0.0,
        "sparse_rows": sparse_rows,
        "layers": layers,
        "dense_layers": [layer for layer in layers if layer in getattr(probe.config, "dense_layers", ())],
        "bud_per_layer": [probe.layers[layer].computed / probe.layers[layer].causal for layer in layers],
        "rel_error_per_head": [h["rel_error"] for h in heads],
        "delta_per_head": [h["delta"] for h in heads],
        "delta_oracle_per_head": [h["delta_oracle"] for h in heads],
        "recall_per_head": [h["recall"] for h in heads],
        "recall_sparse_per_head": [h["recall_sparse"] for h in heads],
        "position_bins": POSITION_BINS,
        "tail_rows": TAIL_ROWS,
        "position_rel_error": _bin_means([row for h in heads for row in h["position_rel_error"]]),
        "position_delta": _bin_means([row for h in heads for row in h["position_delta"]]),
    }


def _bin_means(curves: list[list]) -> list:
    """Elementwise mean of curves (one per (layer, head), or per sample), skipping None (an empty bin)."""
    return [_mean(column) for column in zip(*curves)] if curves else []


def measure(model, method_name: str, config, sample: Sample, *, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Fidelity of the method on the sample's prompt (module docstring for the definitions)."""
    t0 = time.perf_counter()
    probe = run_fidelity(model, method_name, config, sample.input_ids, chunk_bytes=chunk_bytes)
    record = summarize(probe)
    record.update(n_tokens=len(sample.input_ids), method=method_name, seconds=time.perf_counter() - t0)
    return record


HEADLINES = ("rel_error", "delta", "delta_oracle", "recall")


def aggregate(records: list[dict]) -> dict:
    """Over samples: rel_error the mean of the samples' (layer, head) means; delta and
    delta_oracle weighted by query rows, recall by query blocks, recall_sparse by sparse
    rows, bud by token pairs (i.e. pooled as if one long run); per-(layer, head) arrays
    averaged over samples when every sample has the same layers and heads."""
    if not records:
        return {}
    rows = sum(r["rows"] for r in records)
    block_rows = sum(r["block_rows"] for r in records)
    sparse_rows = sum(r["sparse_rows"] for r in records)
    causal = sum(r["pairs_causal"] for r in records)
    rel = _mean([r["rel_error"] for r in records])
    out = {
        "score": rel,
        "rel_error": rel,
        "delta": sum(r["delta"] * r["rows"] for r in records) / rows if rows else None,
        "delta_oracle": sum(r["delta_oracle"] * r["rows"] for r in records) / rows if rows else None,
        "recall": sum(r["recall"] * r["block_rows"] for r in records) / block_rows if block_rows else None,
        "recall_sparse": (
            sum(r["recall_sparse"] * r["sparse_rows"] for r in records if r["recall_sparse"] is not None) / sparse_rows
            if sparse_rows
            else None
        ),
        "bud": sum(r["pairs_computed"] for r in records) / causal if causal else None,
        "pairs_computed": sum(r["pairs_computed"] for r in records),
        "pairs_causal": causal,
        "samples": len(records),
        "seconds": sum(r.get("seconds", 0.0) for r in records),
    }
    curves = [r for r in records if r.get("position_rel_error")]
    if curves and len({len(r["position_rel_error"]) for r in curves}) == 1:  # mean over samples, bin by bin
        for key in ("position_rel_error", "position_delta"):
            out[key] = _bin_means([r[key] for r in curves])
        out["tail_rel_error"], out["tail_delta"] = out["position_rel_error"][-1], out["position_delta"][-1]
    shapes = {(tuple(r["layers"]), tuple(len(h) for h in r["rel_error_per_head"])) for r in records}
    if len(shapes) == 1:
        out["layers"] = records[0]["layers"]
        for key in ("rel_error", "delta", "delta_oracle", "recall"):
            grids = [torch.tensor(r[f"{key}_per_head"], dtype=torch.float64) for r in records]
            out[f"{key}_per_head"] = torch.stack(grids).mean(0).tolist()
        out["bud_per_layer"] = torch.tensor([r["bud_per_layer"] for r in records], dtype=torch.float64).mean(0).tolist()
    return out


def table_rows(records_by_method: dict[str, list[dict]]) -> list[dict]:
    """One flat row per method (aggregated over its samples), in the given order."""
    rows = []
    for method, records in records_by_method.items():
        agg = aggregate(records)
        rows.append(
            {
                "method": method,
                "samples": agg.get("samples", 0),
                "bud": agg.get("bud"),
                "rel_error": agg.get("rel_error"),
                "delta": agg.get("delta"),
                "delta_oracle": agg.get("delta_oracle"),
                "recall": agg.get("recall"),
                "recall_sparse": agg.get("recall_sparse"),
                "tail_rel_error": agg.get("tail_rel_error"),
                "tail_delta": agg.get("tail_delta"),
                "seconds": agg.get("seconds"),
            }
        )
    return rows
