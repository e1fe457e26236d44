"""tasks/ppl.py: perplexity windows and the perplexity measure under a method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from stem_cli.tasks import ppl
from stem_cli.tasks.needle import haystack_sentences
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from stem_cli.config import replace
from stem_cli.hook import HANDLER_ATTR
from stem_cli.registry import get_method
from stem_cli.models import byte_tokenizer

COMMON = {
    "vocab_size": 300, "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 6,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    # soft-capped final logits and sliding-window layers: the chunked lm head must follow the model
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 1}, head_dim=32, sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32, final_logit_softcapping=0.3,
    ),
}
FULL = {"block_size": 16, "dense_layers": [], "k_start": 10_000, "mu": 1.0}
SPARSE = {"block_size": 16, "dense_layers": [], "k_start": 3, "sink_blocks": 1, "window_blocks": 1}


def tiny(family="llama"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").eval()


def cfg(method, **params):
    return replace(get_method(method).defaults, params, method)


class BosBytes:
    """The byte tokenizer, prepending BOS as Llama 3's tokenizer does."""

    bos_token_id = 256

    def __init__(self):
        self.inner = byte_tokenizer()

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


def hf_nll(model, ids):
    """Per-position cross-entropy from a plain forward, no stem involved."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_dense_ppl_equals_plain_forward(family):
    model = tiny(family)
    sample = ppl.build_samples(byte_tokenizer(), 250, seed=3, limit=1)[0]
    rec = ppl.measure(model, "dense", None, sample)
    nll = hf_nll(model, sample.input_ids)
    assert rec["tokens"] == 249
    assert rec["ppl"] == rec["score"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert rec["nll_sum"] == pytest.approx(float(nll.sum()), rel=1e-5)
    q = 3 * 250 // 4
    assert rec["tokens_last_quarter"] == 249 - q
    assert rec["nll_sum_last_quarter"] == pytest.approx(float(nll[q:].sum()), rel=1e-5)
    assert rec["bud"] == pytest.approx(1.0)
    if family == "llama":  # the loss HF computes itself, too
        with torch.no_grad():
            loss = model(torch.tensor([sample.input_ids]), labels=torch.tensor([sample.input_ids])).loss
        assert rec["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, HANDLER_ATTR) for m in model.modules())


def test_full_budget_sparse_equals_dense_and_real_budget_differs():
    model = tiny()
    sample = ppl.build_samples(byte_tokenizer(), 300, seed=0, limit=1)[0]
    dense = ppl.measure(model, "dense", None, sample)
    full = ppl.measure(model, "stem", cfg("stem", **FULL), sample)
    assert full["bud"] == pytest.approx(1.0)
    assert full["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    assert full["ppl_last_quarter"] == pytest.approx(dense["ppl_last_quarter"], rel=1e-5)
    sparse = ppl.measure(model, "stem", cfg("stem", **SPARSE), sample)
    assert 0 < sparse["bud"] < 0.9 and sparse["bud_per_layer"][0] < 1
    assert abs(sparse["nll_sum"] - dense["nll_sum"]) > 1e-4
    assert model.config._attn_implementation == "sdpa"


def test_windows_exact_length_deterministic_and_distinct():
    tok = byte_tokenizer()
    a = ppl.build_samples(tok, 400, seed=0, limit=3)
    assert [s.id for s in a] == ["ppl/400/0/0", "ppl/400/0/1", "ppl/400/0/2"]
    assert all(len(s.input_ids) == 400 for s in a)
    assert [s.input_ids for s in a] == [s.input_ids for s in ppl.build_samples(tok, 400, seed=0, limit=3)]
    assert len({tuple(s.input_ids) for s in a}) == 3
    other = ppl.build_samples(tok, 400, seed=1, limit=3)
    assert all(x.input_ids != y.input_ids for x, y in zip(a, other))
    for s in a:
        assert s.task == "ppl" and s.references == [] and s.metric == "" and s.max_new_tokens == 0
        # natural prose: the window is the text of consecutive pool sentences
        pool = haystack_sentences()
        start = s.meta["start_sentence"]
        text = " ".join(pool[start : start + 10])
        assert tok.decode(s.input_ids) == text[: len(tok.decode(s.input_ids))]


def test_window_wraps_around_the_pool_and_keeps_bos():
    pool = haystack_sentences()
    tok = BosBytes()
    ids = ppl.window_ids(tok, 300, len(pool) - 1)
    assert len(ids) == 300 and ids[0] == 256
    expected = tok(" ".join([pool[-1], pool[0], pool[1], pool[2]]), add_special_tokens=False)["input_ids"]
    assert ids[1:] == expected[:299]


def test_aggregate_pools_tokens():
    records = [
        {"nll_sum": 10.0, "tokens": 10, "nll_sum_last_quarter": 3.0, "tokens_last_quarter": 2,
         "pairs_computed": 50.0, "pairs_causal": 100.0, "seconds": 1.0},
        {"nll_sum": 60.0, "tokens": 30, "nll_sum_last_quarter": 9.0, "tokens_last_quarter": 8,
         "pairs_computed": 100.0, "pairs_causal": 100.0, "seconds": 2.0},
    ]
    agg = ppl.aggregate(records)
    assert agg["ppl"] == agg["score"] == pytest.approx(math.exp(70 / 40))
    assert agg["ppl_last_quarter"] == pytest.approx(math.exp(12 / 10))
    assert agg["bud"] == pytest.approx(0.75)
    assert agg["tokens"] == 40 and agg["samples"] == 2
    assert ppl.HIGHER_IS_BETTER is False and ppl.DESCRIPTION
