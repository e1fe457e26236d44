"""Methods inside real transformers models (tiny random configs of each supported family)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import stem_cli
from stem_cli.integration import attention_modules

COMMON = dict(
    vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 1}, head_dim=32, sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32,
    ),
}
SPARSE = dict(block_size=16, dense_layers=[], k_start=3, sink_blocks=1, window_blocks=1)


def tiny(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").eval()


def random_ids(batch=2, n=300):
    return torch.randint(3, 300, (batch, n))


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("method", ["stem", "uniform", "sam"])
def test_full_budget_logits_equal_dense(family, method):
    model = tiny(family)
    ids = random_ids()
    with torch.no_grad():
        dense = model(ids).logits
        # mu = 1: the uniform budget k_start (1 + mu) / 2 then covers every block too
        runtime = stem_cli.apply(model, method, block_size=16, dense_layers=[], k_start=10_000, mu=1.0)
        sparse = model(ids).logits
    assert runtime.recorder.bud == pytest.approx(1.0)
    assert runtime.recorder.calls > 0  # the method really ran
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_real_budget_differs_but_finite_and_generate_works(family):
    model = tiny(family)
    ids = random_ids()
    with torch.no_grad():
        dense = model(ids).logits
        runtime = stem_cli.apply(model, "stem", **SPARSE)
        sparse = model(ids).logits
        assert torch.isfinite(sparse).all()
        assert (sparse - dense).abs().max() > 1e-3
        assert 0 < runtime.recorder.bud < 0.9
        runtime.recorder.reset()
        out = model.generate(ids[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, ids.shape[1] + 6)
    governed = [layer for layer in runtime.recorder.per_layer()]
    if family == "gemma3":
        assert governed == [1, 3]  # sliding-window layers untouched
    else:
        assert governed == [0, 1, 2, 3]


def test_attn_implementation_name_and_defaults():
    config = CONFIGS["llama"]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="stem_streaming").eval()
    assert model.config._attn_implementation == "stem_streaming"
    ids = random_ids(1, 200)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()


def test_dense_layers_and_decode_stay_dense():
    model = tiny("llama")
    ids = random_ids(1, 320)
    runtime = stem_cli.apply(model, "stem", **{**SPARSE, "dense_layers": [0, 2]})
    with torch.no_grad():
        model(ids)
    per_layer = runtime.recorder.per_layer()
    assert per_layer[0] == 1.0 and per_layer[2] == 1.0
    assert per_layer[1] < 1.0 and per_layer[3] < 1.0


def test_left_padding_batch_matches_unpadded_sequences():
    """Batch 2 with left padding: each sequence's output equals running it alone
    (padded keys never attended), and padded queries do not count in BUD."""
    model = tiny("llama")
    long, short = random_ids(1, 300)[0], random_ids(1, 200)[0]
    pad = 100
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.stack([torch.ones(300, dtype=torch.long), torch.cat([torch.zeros(pad), torch.ones(200)]).long()])
    # A budget that covers everything: padding handling alone decides equality.
    runtime = stem_cli.apply(model, "stem", block_size=16, dense_layers=[], k_start=10_000)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        assert runtime.recorder.bud == pytest.approx(1.0)
        alone = model(short[None]).logits
    torch.testing.assert_close(batched[1, pad:], alone[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(batched).all()


def test_padded_keys_never_selected():
    from stem_cli.methods import stem as stem_method
    from stem_cli.config import StemConfig

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 200, 16), torch.randn(2, 2, 200, 16)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :70] = False  # blocks 0..3 of 16 tokens are all padding for sequence 1
    index = stem_method.select(
        q, k, v, layer=3, config=StemConfig(block_size=16, k_start=3, dense_layers=()), scale=0.25, key_valid=valid
    )
    chosen = index.to_mask()
    assert not chosen[1, :, :, :4].any()
    assert not chosen[1, :, :4].any()  # all-padding query rows keep nothing
    assert chosen[1, :, 4:, 4].all()  # the sequence's own first block is its sink


def test_apply_rejects_unknown_method_and_parameter():
    model = tiny("llama")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        stem_cli.apply(model, "nope")
    with pytest.raises(ValueError, match="mu=1.5"):
        stem_cli.apply(model, "stem", mu=1.5)
    with pytest.raises(ValueError, match="no parameter 'alpha'"):
        stem_cli.apply(model, "stem", alpha=1)
    assert len(attention_modules(model)) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gpu_bf16_full_budget_matches_dense_and_sparse_is_finite(family):
    model = tiny(family).to("cuda", torch.bfloat16)
    ids = random_ids(2, 1000).cuda()
    with torch.no_grad():
        dense = model(ids).logits.float()
        stem_cli.apply(model, "stem", block_size=16, dense_layers=[], k_start=10_000, mu=1.0)
        full = model(ids).logits.float()
        runtime = stem_cli.apply(model, "stem", **SPARSE)
        sparse = model(ids).logits.float()
    assert (full - dense).norm() / dense.norm() < 2e-2  # bf16 operands
    assert torch.isfinite(sparse).all() and 0 < runtime.recorder.bud < 0.5


def test_gqa_kv_selection_full_budget_and_same_bud():
    """One selection per KV head: full budget is still dense, and with the forced blocks counted
    inside the budget (forced_rule=inside) a row's count is data-independent, so BUD matches
    per-query-head selection exactly; with the released rule (forced on top) it is close."""
    model = tiny("llama")
    ids = random_ids()
    with torch.no_grad():
        dense = model(ids).logits
        stem_cli.apply(model, "stem", block_size=16, dense_layers=[], k_start=10_000, gqa="kv")
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-4)
        bud = {}
        for rule in ("inside", "code"):
            for mode in ("query", "kv"):
                runtime = stem_cli.apply(model, "stem", **SPARSE, gqa=mode, forced_rule=rule)
                model(ids)
                bud[rule, mode] = runtime.recorder.bud
    assert bud["inside", "kv"] == pytest.approx(bud["inside", "query"]) and bud["inside", "kv"] < 0.9
    assert bud["code", "kv"] == pytest.approx(bud["code", "query"], abs=0.02) and bud["code", "kv"] < 0.9
    assert bud["code", "query"] >= bud["inside", "query"]  # forced blocks on top keep at least as many
