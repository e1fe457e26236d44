"""`stem calibrate`: a training-free head map from synthetic retrieval prompts (spec section 3).

For each prompt (a needle hidden in prose, the answer appended, teacher forced) one dense
forward runs with a scoring handler of stem_cli.hook's attention function. Every governed
layer, from the dense q/k/v of that forward (each layer sees the dense model's inputs):

- retrieval score of KV head h: the attention mass that the answer positions (the last
  prompt token and every answer token but the last: the positions that predict the answer)
  put on the needle sentence's tokens, averaged over those positions, h's query heads and
  the prompts (the retrieval-head criterion);
- fidelity of Stem and of streaming on h: ||O_mode - O_dense||_F / ||O_dense||_F over h's
  query heads, on evenly spaced query blocks (up to `fidelity_rows` tokens, the last block
  always), averaged over the prompts. The modes run with the elastic config given, so
  calibrate with the block size and budgets you will run with.

Assignment: the round((1 - target) * heads) heads with the highest retrieval score stay
dense (ties: lower layer, then lower head first); every other head streams when its
streaming error is at most max(streaming_threshold, its Stem error) (streaming is the
cheaper mode and then no worse than the threshold or than Stem), else runs Stem.
Deterministic for a seed: prompts are seeded, and the forward has no randomness.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from stem_cli.elastic.config import DENSE, MODES, STEM, STREAMING, ElasticConfig
from stem_cli.elastic.headmap import HeadMap
from stem_cli.elastic.modes import _stem_select, streaming_index
from stem_cli.executor import dense_attention
from stem_cli.hook import handling

STREAMING_THRESHOLD = 0.05  # default: streaming where its relative output error is at most 5% (or at most Stem's)
FIDELITY_ROWS = 512  # query tokens per layer and prompt on which the mode errors are measured
ANSWER_MARGIN = 16  # tokens left free for the appended answer


# ------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class CalibrationPrompt:
    input_ids: torch.LongTensor  # (1, N): prompt + answer tokens
    needle: tuple[int, int]  # token span [start, stop) of the needle sentence
    answer_start: int  # first answer token; positions answer_start-1 .. N-2 predict the answer
    source: str

    @property
    def query_positions(self) -> tuple[int, int]:
        return self.answer_start - 1, self.input_ids.shape[1] - 1  # [start, stop)


def default_source() -> str:
    """RULER's niah_single_2 (needle in prose, numbers) when tasks/ruler.py is there, else the built-in needle."""
    try:
        from stem_cli.tasks import ruler  # noqa: F401
    except ImportError:
        return "needle"
    return "ruler:niah_single_2"


def calibration_prompts(tokenizer, seq_len: int, samples: int, seed: int, source: str | None = None) -> list[CalibrationPrompt]:
    """The one place calibration (and router training) prompts come from.

    source: 'needle' (tasks/needle.py) or 'ruler:TASK' (a needle task of tasks/ruler.py).
    Each prompt takes at most seq_len tokens with its answer appended."""
    source = source or default_source()
    length = seq_len - ANSWER_MARGIN
    out = []
    if source == "needle":
        from stem_cli.tasks.needle import build_needle_prompt

        for i in range(samples):
            built = build_needle_prompt(tokenizer, length, seed=seed + i)
            out.append(_with_answer(tokenizer, built.input_ids[0].tolist(), built.answer, built.text, source))
    elif source.startswith("ruler:"):
        from stem_cli.tasks import ruler

        task = source.split(":", 1)[1]
        if not task.startswith("niah"):
            raise ValueError(f"calibration needs a needle task (niah_*), not {task!r}")
        for sample in ruler.build_samples(task, tokenizer, length, seed=seed, limit=samples):
            out.append(_with_answer(tokenizer, list(sample.input_ids), sample.references[0], None, source))
    else:
        raise ValueError(f"unknown calibration prompt source {source!r}: use 'needle' or 'ruler:TASK'")
    return out


def _with_answer(tokenizer, ids: list[int], answer: str, text: str | None, source: str) -> CalibrationPrompt:
    start, stop = _needle_span(tokenizer, ids, answer, text)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + answer_ids], dtype=torch.long)
    return CalibrationPrompt(full, (start, stop), len(ids), source)


def _needle_span(tokenizer, ids: list[int], answer: str, text: str | None) -> tuple[int, int]:
    """Token span of the sentence holding the answer ('One of the special magic ... is: ANSWER.')."""
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if enc["input_ids"] != ids:  # the chat template's own BOS, or a tokenizer that adds one
        shift = len(ids) - len(enc["input_ids"])
        if shift < 0 or ids[shift:] != enc["input_ids"]:
            return _answer_tokens(tokenizer, ids, answer)
        offsets = [(0, 0)] * shift + list(offsets)
    at = text.find(answer)
    if at < 0:
        return _answer_tokens(tokenizer, ids, answer)
    begin = text.rfind("One of the special magic", 0, at)
    begin = at if begin < 0 else begin
    end = text.find(".", at + len(answer))
    end = at + len(answer) if end < 0 else end + 1
    tokens = [i for i, (a, b) in enumerate(offsets) if b > begin and a < end and b > a]
    if not tokens:
        return _answer_tokens(tokenizer, ids, answer)
    return tokens[0], tokens[-1] + 1


def _answer_tokens(tokenizer, ids: list[int], answer: str) -> tuple[int, int]:
    for variant in (" " + answer, answer, ": " + answer):
        pattern = tokenizer(variant, add_special_tokens=False)["input_ids"]
        for trim in (0, 1):
            p = pattern[trim:]
            for i in range(len(ids) - len(p) + 1):
                if p and ids[i : i + len(p)] == p:
                    return i, i + len(p)
    raise ValueError(f"the answer {answer!r} is not found in the calibration prompt's tokens")


# ------------------------------------------------------------------ scoring attention (a stem_cli.hook handler)


def evenly_spaced_blocks(num_blocks: int, rows: int, block_size: int) -> torch.Tensor:
    """Query blocks on which errors are measured: evenly spaced, the last one always included."""
    want = max(1, min(num_blocks, rows // block_size))
    return torch.linspace(num_blocks - 1, 0, want).round().long().flip(0).unique()


def _token_mask(index, blocks: torch.Tensor, n: int, hq: int) -> torch.Tensor:
    """(B, Hq, R, N) bool: the index's keys for the query rows of `blocks`, causal."""
    bs = index.block_size
    p = index.num_blocks
    mask = index.to_mask()[:, :, blocks.to(index.indices.device)]  # (B, H, R/bs, P)
    mask = mask.repeat_interleave(hq // mask.shape[1], dim=1)
    mask = mask[:, :, :, None, :, None].expand(*mask.shape[:3], bs, p, bs).reshape(mask.shape[0], hq, len(blocks) * bs, p * bs)
    rows = (blocks[:, None] * bs + torch.arange(bs)).flatten().to(mask.device)
    causal = torch.arange(p * bs, device=mask.device)[None, :] <= rows[:, None]
    return (mask & causal)[..., :n][:, :, rows < n]


def _mode_outputs(q, k, v, row_ids: torch.Tensor, masks: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """Per token mask (B, Hq, R, N): the attention outputs (B, Hq, R, d) float32 of query rows `row_ids`."""
    g = q.shape[1] // k.shape[1]
    qr = q[:, :, row_ids].float()
    kf = k.float().repeat_interleave(g, 1)
    vf = v.float().repeat_interleave(g, 1)
    scores = torch.matmul(qr, kf.transpose(-1, -2)) * scale  # (B, Hq, R, N)
    outs = []
    for mask in masks:
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append(torch.matmul(probs, vf))
    return outs


class _Scorer:
    """Accumulates per (layer, KV head) scores over the prompts of one calibration."""

    def __init__(self, config: ElasticConfig, num_layers: int, num_kv_heads: int, fidelity_rows: int, on_layer=None):
        self.config = config
        self.fidelity_rows = fidelity_rows
        self.on_layer = on_layer
        self.retrieval = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self.errors = torch.zeros(2, num_layers, num_kv_heads, dtype=torch.float64)  # stem, streaming
        self.counts = torch.zeros(num_layers, dtype=torch.long)
        self.prompt: CalibrationPrompt | None = None

    def attend(self, call) -> torch.Tensor | None:
        """The hook handler: dense attention out, the layer's scores accumulated (prompts are unpadded)."""
        if call.kind != "prefill":
            return None
        out = dense_attention(call.query, call.key, call.value, scale=call.scale)
        with torch.no_grad():
            self._score(call.layer, call.query, call.key, call.value, out, call.scale)
        if self.on_layer is not None:
            self.on_layer()
        return out

    def _score(self, layer: int, q, k, v, dense_out, scale: float) -> None:
        batch, hq, n, _ = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        prompt = self.prompt
        # Retrieval: attention of the answer positions to the needle sentence.
        q0, q1 = prompt.query_positions
        s0, s1 = prompt.needle
        qa = q[:, :, q0:q1].float()
        scores = torch.matmul(qa, k.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale  # (B, Hq, R, N)
        causal = torch.arange(n, device=q.device)[None, :] <= torch.arange(q0, q1, device=q.device)[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        mass = probs[..., s0:s1].sum(-1).mean(-1)  # (B, Hq)
        self.retrieval[layer] += mass.view(batch, hkv, g).mean((0, 2)).double().cpu()

        # Fidelity: Stem and streaming against dense on evenly spaced query blocks.
        cfg = self.config
        bs = cfg.block_size
        p = -(-n // bs)
        blocks = evenly_spaced_blocks(p, self.fidelity_rows, bs)
        row_ids = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        row_ids = row_ids[row_ids < n].to(q.device)
        stem = _stem_select(q, k, v, cfg, scale, None)
        sink_b, window_b = cfg.streaming_blocks
        stream = streaming_index(batch, hkv, n, bs, sink_b, window_b, None, q.device)
        masks = [_token_mask(index, blocks, n, hq) for index in (stem, stream)]
        outs = _mode_outputs(q, k, v, row_ids, masks, scale)
        ref = dense_out[:, :, row_ids].float()
        denom = ref.pow(2).view(batch, hkv, g, -1).sum((0, 2, 3)).sqrt().clamp_min(1e-12)
        for i, o in enumerate(outs):
            err = (o - ref).pow(2).view(batch, hkv, g, -1).sum((0, 2, 3)).sqrt() / denom
            self.errors[i, layer] += err.double().cpu()
        self.counts[layer] += 1


# ------------------------------------------------------------------ calibration


def assign_modes(
    retrieval: torch.Tensor,
    stem_error: torch.Tensor,
    streaming_error: torch.Tensor,
    governed: list[int],
    target_sparsity: float,
    streaming_threshold: float = STREAMING_THRESHOLD,
) -> torch.Tensor:
    """(L, Hkv) mode ids: top (1 - target) of the governed heads by retrieval dense; the rest
    streaming where its error <= max(threshold, Stem's error), else stem. Ungoverned layers: dense."""
    layers, heads = retrieval.shape
    modes = torch.full((layers, heads), DENSE, dtype=torch.long)
    entries = [(l, h) for l in governed for h in range(heads)]
    n_dense = round((1 - target_sparsity) * len(entries))
    ranked = sorted(entries, key=lambda e: (-float(retrieval[e]), e[0], e[1]))
    for l, h in ranked[n_dense:]:
        cheap = float(streaming_error[l, h]) <= max(streaming_threshold, float(stem_error[l, h]))
        modes[l, h] = STREAMING if cheap else STEM
    return modes


def calibrate(
    model,
    tokenizer,
    *,
    model_name: str,
    config: ElasticConfig,
    target_sparsity: float = 0.7,
    seq_len: int = 4096,
    samples: int = 4,
    seed: int = 0,
    streaming_threshold: float = STREAMING_THRESHOLD,
    fidelity_rows: int = FIDELITY_ROWS,
    source: str | None = None,
    console=None,
) -> HeadMap:
    """Score every (layer, KV head) on `samples` retrieval prompts and assign modes (module docstring)."""
    if not 0 <= target_sparsity <= 1:
        raise ValueError(f"target_sparsity must lie in [0, 1], got {target_sparsity}")
    t0 = time.perf_counter()
    cfg = model.config
    num_layers, hkv, hq = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    source = source or default_source()
    prompts = calibration_prompts(tokenizer, seq_len, samples, seed, source)
    device = next(model.parameters()).device
    progress = _progress(console)
    with progress or contextlib.nullcontext():
        task = progress.add_task(f"calibrating {model_name}", total=samples * num_layers) if progress else None
        advance = (lambda: progress.advance(task)) if progress else None
        scorer = _Scorer(config, num_layers, hkv, fidelity_rows, on_layer=advance)
        with handling(model, scorer), torch.no_grad():
            for i, prompt in enumerate(prompts):
                scorer.prompt = prompt
                model(input_ids=prompt.input_ids.to(device), use_cache=False, logits_to_keep=1)
                if progress:  # ungoverned layers (sliding window) advance nothing: catch up
                    progress.update(task, completed=(i + 1) * num_layers)
    governed = [l for l in range(num_layers) if scorer.counts[l] > 0]
    if not governed:
        raise ValueError("no attention layer of this model is governed by stem (no full-attention pre-fill layer ran)")
    count = scorer.counts.clamp_min(1).double()[:, None]
    retrieval = scorer.retrieval / count
    stem_err, stream_err = scorer.errors[0] / count, scorer.errors[1] / count
    modes = assign_modes(retrieval, stem_err, stream_err, governed, target_sparsity, streaming_threshold)

    def table(x: torch.Tensor) -> list[list[float | None]]:
        return [[round(float(v), 6) if l in governed else None for v in row] for l, row in enumerate(x)]

    fields = ("block_size", "streaming_sink_tokens", "streaming_window_tokens", "stride", "beta", "mu", "tpd", "schedule",
              "k_start", "k_scale", "sink_blocks", "window_blocks", "gqa")
    return HeadMap(
        model=model_name,
        num_layers=num_layers,
        num_kv_heads=hkv,
        num_query_heads=hq,
        modes=[[MODES[m] for m in row] for row in modes.tolist()],
        target_sparsity=target_sparsity,
        calibration={
            "method": "retrieval score ranking + fidelity (stem_cli.elastic.calibrate)",
            "source": source,
            "seq_len": seq_len,
            "prompt_tokens": [int(p.input_ids.shape[1]) for p in prompts],
            "samples": samples,
            "seed": seed,
            "streaming_threshold": streaming_threshold,
            "fidelity_rows": fidelity_rows,
            "governed_layers": governed,
            "governed_sparsity": float((modes[governed] != DENSE).double().mean()),
            "elastic_config": {f: getattr(config, f) for f in fields},
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        scores={"retrieval": table(retrieval), "stem_error": table(stem_err), "streaming_error": table(stream_err)},
    )


def _progress(console, unit: str = "layers"):
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                    console=console, transient=False)
