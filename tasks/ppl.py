"""Perplexity of long offline prose under a method's pre-fill attention (a measure task).

Text: the prose sentences of the help texts that ship with Python
(`stem_cli.tasks.needle.haystack_sentences()`, about 35K tokens for SmolLM2's
tokenizer), in their fixed document order (sorted topics, sentences in reading
order), joined by spaces and read as one cyclic stream. Sample i of seed s is the
window of exactly `seq_len` tokens that starts at sentence
(r_s + i * S // limit) mod S, S = number of sentences and r_s drawn from
random.Random(s): the windows of one seed start at evenly spread sentences, and
another seed rotates them. A window longer than the pool wraps around and repeats
text; from the repeat on, the model can copy from far back, which is exactly what
sparse attention may lose (so ppl at those lengths is lower than on fresh text,
and more sensitive to the method). The tokenizer's BOS is the first token when
the tokenizer adds one by itself (Llama 3 does, SmolLM2 does not); no chat template.

Measure: one forward of the whole window (the pre-fill path, so the method governs
every full-attention layer), teacher-forced next-token negative log-likelihood of
tokens 1..N-1 (N - 1 predictions), accumulated in float64 from float32 log-softmax,
lm head applied in chunks so the (N, vocab) logits never exist at once.

    ppl = exp(nll_sum / tokens)
    ppl_last_quarter: the same over the predictions of positions >= floor(3N/4)
    (far from the start, where a sparse row keeps the smallest share of its keys)

`aggregate` pools tokens, not perplexities: exp(sum of nll_sum / sum of tokens),
and BUD as computed pairs / causal pairs summed over samples.
"""

from __future__ import annotations


import math
import random
import time

import torch
from stem_cli.hook import handling
from stem_cli.integration import build_runtime
from stem_cli.tasks.base import Sample
from stem_cli.tasks.needle import haystack_sentences

TASK = "ppl"
HIGHER_IS_BETTER = False
DESCRIPTION = (
    "perplexity of long offline prose (Python's help texts) under the method's pre-fill attention; "
    "also ppl over the last quarter of positions"
)
CE_CHUNK = 1024  # positions per lm-head chunk
# Bump when a change alters the prompts, references or scoring this module makes: stored results
# are keyed by it, so older ones are recomputed (and the run says so) instead of reused.
GENERATOR_VERSION = 1


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer prepends one by itself, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def window_ids(tokenizer, seq_len: int, start_sentence: int) -> list[int]:
    """Exactly seq_len token ids: BOS (if the tokenizer adds one), then the cyclic sentence
    stream from start_sentence, cut at the token where the window is full."""
    pool = haystack_sentences()
    prefix = _bos(tokenizer)
    need = seq_len - len(prefix)
    if need < 1:
        raise ValueError(f"seq_len={seq_len} is too small for a perplexity window")
    chars_per_token = 3.0  # a low guess: usually one round of tokenizing is enough
    count = 0
    while True:
        target = int(need * chars_per_token) + 200
        sentences, chars = [], 0
        while chars < target:
            s = pool[(start_sentence + len(sentences)) % len(pool)]
            sentences.append(s)
            chars += len(s) + 1
        ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            return prefix + ids[:need]
        count += 1
        chars_per_token = chars_per_token * need / max(len(ids), 1) * 1.1
        if count > 20:  # pragma: no cover - a tokenizer that swallows text
            raise RuntimeError("could not build a perplexity window: the tokenizer yields too few tokens")


def build_samples(tokenizer, seq_len: int, *, seed: int = 0, limit: int = 4, use_chat_template=None) -> list[Sample]:
    """`limit` windows of exactly seq_len tokens (see the module docstring); use_chat_template
    is accepted for the runner's contract and ignored (perplexity is on plain text)."""
    pool = haystack_sentences()
    base = random.Random(seed).randrange(len(pool))
    samples = []
    for i in range(limit):
        start = (base + i * len(pool) // max(limit, 1)) % len(pool)
        ids = window_ids(tokenizer, seq_len, start)
        meta = {"start_sentence": start, "pool_sentences": len(pool), "bos": bool(_bos(tokenizer))}
        samples.append(Sample.measured(TASK, seq_len, seed, i, ids, meta))
    return samples


def token_nll(model, input_ids: torch.Tensor, chunk: int = CE_CHUNK) -> torch.Tensor:
    """Per-prediction NLL (N-1,) float64 of input_ids (1, N) under the model's current attention.

    The decoder's last hidden state is captured by a hook and the lm head applied in
    chunks (logits_to_keep=1 spares the full logits); models without logits_to_keep
    fall back to the full logits. Final-logit soft-capping (Gemma) is applied.
    """
    captured = {}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    handle = None
    if decoder is not None and head is not None and decoder is not model:

        def grab(_module, _inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = decoder.register_forward_hook(grab)
    try:
        with torch.no_grad():
            try:
                out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            except TypeError:
                captured.clear()
                out = model(input_ids=input_ids, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    targets = input_ids[0, 1:]
    n = targets.shape[0]
    nll = torch.empty(n, dtype=torch.float64)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    hidden = captured.get("h")
    with torch.no_grad():
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            if hidden is not None and hidden.shape[1] == input_ids.shape[1]:
                logits = head(hidden[0, c0:c1]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
            else:  # the full logits came back (or the hook saw something unexpected)
                logits = out.logits[0, c0:c1].float()
            lp = torch.log_softmax(logits, dim=-1)
            nll[c0:c1] = -lp.gather(-1, targets[c0:c1, None].to(lp.device))[:, 0].double().cpu()
    return nll


def pair_totals(recorder) -> tuple[float, float]:
    """(computed, causal) token pairs over every layer the recorder saw."""
    computed = sum(float(x) for xs in recorder.computed.values() for x in xs)
    causal = sum(float(x) for xs in recorder.causal.values() for x in xs)
    return computed, causal


def measure(model, method_name: str, config, sample: Sample) -> dict:
    """One teacher-forced forward of the sample's window under the method (module docstring)."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    runtime = build_runtime(model, method_name, config)
    t0 = time.perf_counter()
    with handling(model, runtime):  # the model's attention is restored afterwards
        nll = token_nll(model, ids)
    computed, causal = pair_totals(runtime.recorder)
    per_layer = runtime.recorder.per_layer()
    seconds = time.perf_counter() - t0
    n = ids.shape[1]
    quarter = nll[3 * n // 4 :]  # nll[j] is the prediction made at position j (of token j + 1)
    nll_sum, q_sum = float(nll.sum()), float(quarter.sum())
    return {
        "score": math.exp(nll_sum / len(nll)),
        "ppl": math.exp(nll_sum / len(nll)),
        "nll_sum": nll_sum,
        "tokens": len(nll),
        "ppl_last_quarter": math.exp(q_sum / len(quarter)),
        "nll_sum_last_quarter": q_sum,
        "tokens_last_quarter": len(quarter),
        "bud": computed / causal if causal else None,
        "pairs_computed": computed,
        "pairs_causal": causal,
        "bud_per_layer": [per_layer[k] for k in sorted(per_layer)],
        "n_tokens": n,
        "method": method_name,
        "seconds": seconds,
    }


def aggregate(records: list[dict]) -> dict:
    """Token-pooled perplexities and pair-pooled BUD over the samples."""
    if not records:
        return {}
    nll = sum(r["nll_sum"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    q_nll = sum(r["nll_sum_last_quarter"] for r in records)
    q_tokens = sum(r["tokens_last_quarter"] for r in records)
    causal = sum(r["pairs_causal"] for r in records)
    ppl = math.exp(nll / tokens)
    return {
        "score": ppl,
        "ppl": ppl,
        "nll_sum": nll,
        "tokens": tokens,
        "ppl_last_quarter": math.exp(q_nll / q_tokens),
        "nll_sum_last_quarter": q_nll,
        "tokens_last_quarter": q_tokens,
        "bud": sum(r["pairs_computed"] for r in records) / causal if causal else None,
        "pairs_computed": sum(r["pairs_computed"] for r in records),
        "pairs_causal": causal,
        "samples": len(records),
        "seconds": sum(r.get("seconds", 0.0) for r in records),
    }
