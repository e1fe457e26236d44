"""Elastic Attention (issue 8): per-head modes, head maps, calibration, router, Omega.

CPU only, tiny random models, fresh random inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from stem_cli.kernels import reference as ref
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

import stem_cli
from stem_cli.cli import app
from stem_cli.config import ConfigError, StreamingConfig
from stem_cli.elastic.calibrate import assign_modes, calibrate, calibration_prompts
from stem_cli.elastic.config import DENSE, STEM, STREAMING, ElasticConfig
from stem_cli.elastic.headmap import HeadMap, load_head_map, save_head_map
from stem_cli.elastic.modes import mixed_index
from stem_cli.elastic.router import ElasticRouter, load_router
from stem_cli.elastic.train import MixedAttention, new_router, router_loss, training_attention
from stem_cli.executor import attend, dense_attention, masked_sdpa
from stem_cli.hook import HANDLER_ATTR
from stem_cli.methods import stem as stem_method
from stem_cli.methods import streaming as streaming_method
from stem_cli.methods.elastic import omega
from stem_cli.models import load_model

SMALL = dict(block_size=16, k_start=3, sink_blocks=1, window_blocks=1, streaming_sink_tokens=16, streaming_window_tokens=32)


def small_config(**extra) -> ElasticConfig:
    return ElasticConfig(**{**SMALL, **extra})


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_cli(*args):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")  # 4 layers, 4 query / 2 KV heads, head dim 16, byte tokenizer


# ------------------------------------------------------------------ mixed-mode index and executor


def per_head_reference(q, k, v, modes, config: ElasticConfig, scale, key_valid):
    """Each head in its mode on its own: dense SDPA, the stem method, the streaming method."""
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    dense = dense_attention(q, k, v, scale=scale, key_valid=key_valid)
    stem_idx = stem_method.select(q, k, v, layer=0, config=config.stem, scale=scale, key_valid=key_valid)
    stem_out = ref.block_sparse_attention(q, k, v, stem_idx, scale=scale, key_valid=key_valid)
    sink_b, window_b = config.streaming_blocks
    s_cfg = StreamingConfig(block_size=config.block_size, dense_layers=(), sink_blocks=sink_b, window_blocks=window_b)
    stream_idx = streaming_method.select(q, k, v, layer=0, config=s_cfg, scale=scale, key_valid=key_valid)
    stream_out = ref.block_sparse_attention(q, k, v, stream_idx, scale=scale, key_valid=key_valid)
    out = torch.empty_like(dense)
    for b in range(q.shape[0]):
        for h in range(hkv):
            src = (dense, stem_out, stream_out)[int(modes[b, h])]
            out[b, h * g : (h + 1) * g] = src[b, h * g : (h + 1) * g]
    return out


@pytest.mark.parametrize("gqa", ["query", "kv"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("on_host", [True, False])  # False: a router's device modes, every part built, picked on the device
def test_mixed_executor_equals_per_head_reference(gqa, padded, on_host):
    torch.manual_seed(1)
    batch, hq, hkv, n, d = 2, 6, 3, 150, 16
    q, k, v = (torch.randn(batch, h, n, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    key_valid = None
    if padded:  # left padding on the second sequence
        key_valid = torch.ones(batch, n, dtype=torch.bool)
        key_valid[1, :37] = False
    config = small_config(gqa=gqa)
    modes = torch.tensor([[DENSE, STEM, STREAMING], [STREAMING, DENSE, STEM]])
    index = mixed_index(q, k, v, modes, config, scale=d**-0.5, key_valid=key_valid, on_host=on_host)
    assert index.num_heads == (hq if gqa == "query" else hkv) and not index.full
    out = attend(q, k, v, index, scale=d**-0.5, key_valid=key_valid)
    expected = per_head_reference(q, k, v, modes, config, d**-0.5, key_valid)
    if key_valid is not None:  # padded query rows are not part of any result
        out, expected = out * key_valid[:, None, :, None], expected * key_valid[:, None, :, None]
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_single_mode_layers_use_that_modes_own_index():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    config = small_config()
    assert mixed_index(q, k, v, torch.zeros(1, 2, dtype=torch.long), config, scale=0.25, key_valid=None).full
    stem_only = mixed_index(q, k, v, torch.ones(1, 2, dtype=torch.long), config, scale=0.25, key_valid=None)
    direct = stem_method.select(q, k, v, layer=0, config=config.stem, scale=0.25, key_valid=None)
    assert torch.equal(stem_only.indices, direct.indices) and torch.equal(stem_only.counts, direct.counts)
    # Stem selected on a subset of heads equals the full selection's rows for those heads.
    mixed = mixed_index(q, k, v, torch.tensor([[DENSE, STEM]]), config, scale=0.25, key_valid=None)
    kmax = direct.indices.shape[-1]
    assert torch.equal(mixed.counts[:, 2:], direct.counts[:, 2:])
    assert torch.equal(mixed.indices[:, 2:, :, :kmax], direct.indices[:, 2:])
    assert (mixed.indices[:, 2:, :, kmax:] == -1).all()
    assert torch.equal(mixed.counts[0, 0], torch.arange(1, 8, dtype=torch.int32))  # dense rows: every causal block


# ------------------------------------------------------------------ Omega and BUD, by hand


def two_layer_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_omega_and_bud_by_hand(tmp_path):
    model = two_layer_model()
    path = save_head_map(HeadMap("two-layer", 2, 2, [["dense", "streaming"], ["streaming", "streaming"]]), tmp_path / "map.json")
    # 64 tokens, block 16: 4 blocks. Streaming: sink 1 block + window 1 block (the diagonal).
    runtime = stem_cli.apply(model, "elastic", head_map=str(path), block_size=16, streaming_sink_tokens=16, streaming_window_tokens=16)
    ids = torch.randint(3, 300, (1, 64))
    with torch.no_grad():
        model(ids)
    # Omega: 3 of 4 KV heads not dense, 2 query heads each -> 6 of 8 query heads.
    assert runtime.recorder.elastic.omega == pytest.approx(0.75)
    assert omega(runtime) == runtime.state.stats.omega == pytest.approx(0.75)
    assert runtime.recorder.elastic.per_layer() == {0: 0.5, 1: 1.0}
    assert runtime.recorder.elastic.last_modes[0] == [["dense", "streaming"]]
    # BUD: per query head, dense = 4 diagonal blocks of 16*17/2 pairs + 6 full blocks of 256 = 2080;
    # streaming keeps rows {0}, {0,1}, {0,2}, {0,3}: 4 * 136 + 3 * 256 = 1312.
    assert runtime.recorder.bud == pytest.approx((2 * 2080 + 6 * 1312) / (8 * 2080))
    assert runtime.recorder.per_layer() == {0: pytest.approx((2080 + 1312) / (2 * 2080)), 1: pytest.approx(1312 / 2080)}
    # Stats follow the recorder: reset -> None, one more forward -> the same numbers, not doubled history.
    runtime.recorder.reset()
    assert runtime.recorder.elastic.omega is None
    with torch.no_grad():
        model(ids)
        model(ids)
    assert runtime.recorder.elastic.omega == pytest.approx(0.75)
    assert int(sum(c.sum() for c in runtime.recorder.elastic.heads.values())) == 2 * 2 * 4  # 2 forwards x 2 layers x 4 q heads


def test_default_without_map_is_stem(tiny):
    model = tiny.model
    ids = torch.randint(3, 250, (1, 200))
    with torch.no_grad():
        stem_rt = stem_cli.apply(model, "stem", block_size=16, k_start=3, dense_layers=[0, 1])
        expected = model(ids).logits
        rt = stem_cli.apply(model, "elastic", block_size=16, k_start=3)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert rt.recorder.bud == pytest.approx(stem_rt.recorder.bud)
    assert omega(rt) == pytest.approx(0.5)  # layers 0 and 1 dense, 2 and 3 stem


# ------------------------------------------------------------------ head maps


def test_head_map_round_trip_and_schema(tmp_path):
    hm = HeadMap("tiny-llama", 4, 2, [["dense", "stem"], ["stem", "streaming"], ["streaming", "streaming"], ["dense", "dense"]],
                 num_query_heads=4, target_sparsity=0.5, calibration={"seed": 3},
                 scores={"retrieval": [[0.1, 0.2], [0.3, None], [0.0, 1.0], [0.5, 0.5]]})
    path = save_head_map(hm, tmp_path / "m.json")
    back = load_head_map(path)
    assert back == hm
    assert back.sparsity == pytest.approx(5 / 8)
    assert json.loads(path.read_text())["sparsity"] == pytest.approx(5 / 8)
    assert back.mode_ids().tolist() == [[0, 1], [1, 2], [2, 2], [0, 0]]

    good = hm.to_json()
    for change, message in [
        ({"format": "other"}, "'format'"),
        ({"version": 9}, "version"),
        ({"num_layers": 0}, "num_layers"),
        ({"modes": good["modes"][:3]}, "num_layers = 4 layers (got 3)"),
        ({"modes": [["dense"]] * 4}, "num_kv_heads = 2 modes (got 1)"),
        ({"modes": [["dense", "sparse"]] * 4}, "'sparse' is not a mode"),
        ({"target_sparsity": 1.5}, "target_sparsity"),
        ({"scores": {"retrieval": [[0.1, 0.2]]}}, "4 x 2 table"),
        ({"num_query_heads": 3}, "multiple of num_kv_heads"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_head_map(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_head_map(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="does not exist"):
        ElasticConfig(head_map=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("layers,heads,message", [(3, 2, "3 layers but the model has 4"), (4, 3, "3 KV heads per layer but the model has 2"),
                                                  (6, 2, "6 layers but the model has 4")])
def test_head_map_that_does_not_fit_the_model(tiny, tmp_path, layers, heads, message):
    """Checked at stem_cli.apply time (the method's prepare), before any forward."""
    path = save_head_map(HeadMap.uniform("other", layers, heads), tmp_path / "wrong.json")
    before = getattr(tiny.model.model.layers[0].self_attn, HANDLER_ATTR, None)
    with pytest.raises(ConfigError, match=message):
        stem_cli.apply(tiny.model, "elastic", head_map=str(path), block_size=16)
    assert getattr(tiny.model.model.layers[0].self_attn, HANDLER_ATTR, None) is before  # nothing attached


def test_router_that_does_not_fit_the_model_fails_at_apply(tiny, tmp_path):
    path = ElasticRouter(3, 2, 16, model="other").save(tmp_path / "r.pt")
    with pytest.raises(ConfigError, match="3 layers but the model has 4"):
        stem_cli.apply(tiny.model, "elastic", router=str(path), block_size=16)
    path = ElasticRouter(4, 2, 32, model="other").save(tmp_path / "r2.pt")
    with pytest.raises(ConfigError, match="32 head dim but the model has 16"):
        stem_cli.apply(tiny.model, "elastic", router=str(path), block_size=16)


def test_cli_bad_head_map_exits_2(tmp_path):
    wrong = save_head_map(HeadMap.uniform("other", 3, 2), tmp_path / "wrong.json")
    result = run_cli("generate", "--model", "tiny-llama", "--needle", "600", "--method", "elastic", "--set", "block_size=16",
                     "--set", f"elastic.head_map={wrong}", "--max-new-tokens", "1")
    assert result.exit_code == 2, result.output
    assert "3 layers but the model has 4" in plain(result.output).replace("\n", " ")
    result = run_cli("generate", "--model", "tiny-llama", "--method", "elastic", "--set", f"head_map={tmp_path / 'none.json'}")
    assert result.exit_code == 2 and "does not exist" in plain(result.output)


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="default_mode"):
        ElasticConfig(default_mode="sparse")
    with pytest.raises(ConfigError, match="mu=2"):
        ElasticConfig(mu=2)
    path = save_head_map(HeadMap.uniform("x", 1, 1), tmp_path / "m.json")
    (tmp_path / "r.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="not both"):
        ElasticConfig(head_map=str(path), router=str(tmp_path / "r.pt"))
    assert ElasticConfig(block_size=32, streaming_window_tokens=100).streaming_blocks == (4, 4)


# ------------------------------------------------------------------ calibration


def test_calibration_is_deterministic_by_seed(tiny):
    config = small_config()
    kwargs = dict(model_name="tiny-llama", config=config, target_sparsity=0.5, seq_len=512, samples=1, source="needle")
    a = calibrate(tiny.model, tiny.tokenizer, seed=0, **kwargs)
    b = calibrate(tiny.model, tiny.tokenizer, seed=0, **kwargs)
    c = calibrate(tiny.model, tiny.tokenizer, seed=1, **kwargs)
    assert a.modes == b.modes and a.scores == b.scores
    assert a.scores["retrieval"] != c.scores["retrieval"]
    assert sum(m == "dense" for row in a.modes for m in row) == 4  # round((1 - 0.5) * 8)
    assert a.sparsity == pytest.approx(0.5) and a.num_layers == 4 and a.num_kv_heads == 2
    for name in ("retrieval", "stem_error", "streaming_error"):
        assert all(0 <= x <= (1 if name == "retrieval" else 10) for row in a.scores[name] for x in row)
    assert tiny.model.config._attn_implementation != "stem_elastic_calibrate"  # restored


def test_calibration_prompts_locate_needle_and_answer(tiny):
    (p,) = calibration_prompts(tiny.tokenizer, 512, 1, seed=4, source="needle")
    ids = p.input_ids[0].tolist()
    needle = tiny.tokenizer.decode(ids[p.needle[0] : p.needle[1]])
    assert needle.startswith("One of the special magic") and needle.endswith(".")
    answer = tiny.tokenizer.decode(ids[p.answer_start :]).strip()
    assert answer.isdigit() and answer in needle and len(ids) <= 512


def test_assign_modes_rule():
    retrieval = torch.tensor([[0.9, 0.1], [0.5, 0.2]])
    stem_err = torch.tensor([[0.3, 0.3], [0.3, 0.01]])
    stream_err = torch.tensor([[0.0, 0.04], [0.2, 0.02]])
    modes = assign_modes(retrieval, stem_err, stream_err, governed=[0, 1], target_sparsity=0.5, streaming_threshold=0.05)
    # dense: the two best retrieval heads (0,0), (1,0); (0,1) streams: 0.04 <= 0.05; (1,1) streams: 0.02 <= 0.05
    assert modes.tolist() == [[DENSE, STREAMING], [DENSE, STREAMING]]
    modes = assign_modes(retrieval, stem_err, stream_err, governed=[0, 1], target_sparsity=0.75, streaming_threshold=0.01)
    # one dense head; (1,0) streaming 0.2 <= stem 0.3 -> streaming; (1,1) 0.02 > max(0.01, 0.01) -> stem
    assert modes.tolist() == [[DENSE, STREAMING], [STREAMING, STEM]]


# ------------------------------------------------------------------ router


def test_router_shapes_and_parameter_count(tmp_path):
    router = ElasticRouter(32, 8, 128)  # Llama-3-8B shapes
    assert router.num_parameters(0) == 265_731  # ~0.27M per layer, as published
    r = ElasticRouter(4, 2, 16, dense_layers=[0], model="tiny", target_sparsity=0.6)
    r.init_prior(0.6)
    x = torch.randn(3, 2, 32)
    assert r.logits(1, x).shape == (3, 2, 3)
    assert r.modes(1, x).shape == (3, 2) and r.modes(0, x).eq(DENSE).all()
    probs = torch.softmax(r.logits(2, x), -1).mean((0, 1))
    assert probs[0].item() == pytest.approx(0.4, abs=0.05)  # the prior: P(dense) = 1 - target
    path = r.save(tmp_path / "router.pt")
    back = load_router(path)
    torch.testing.assert_close(back.logits(3, x), r.logits(3, x))
    assert back.dense_layers == (0,) and back.target_sparsity == 0.6
    with pytest.raises(ConfigError, match="4 layers but the model has 5"):
        back.check_model(5, 2, 16)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_router(tmp_path / "bad.pt")


def test_router_sees_pre_rope_keys_inside_the_model(tiny, tmp_path, monkeypatch):
    """The selector pools the pre-RoPE keys that prepare's hooks stored (an independent k_proj hook as the oracle)."""
    import stem_cli.elastic.modes as modes_mod

    model = tiny.model
    router = new_router(model, model_name="tiny-llama", config=small_config(), target_sparsity=0.5, dense_layers=[0])
    path = router.save(tmp_path / "r.pt")
    seen, hooked = [], {}
    original = modes_mod.pooled_keys

    def spy(pre_rope, k, key_valid, pool=100):
        assert pre_rope is not None  # captured by the hooks: no post-RoPE fallback
        feats = original(pre_rope, k, key_valid, pool)
        seen.append(feats)
        return feats

    monkeypatch.setattr(modes_mod, "pooled_keys", spy)
    def hook(module, inputs, output):
        hooked.setdefault(2, output.detach().clone())  # the layer's own call comes first; returns None

    handle = model.model.layers[2].self_attn.k_proj.register_forward_hook(hook)
    try:
        runtime = stem_cli.apply(model, "elastic", router=str(path), **SMALL)
        ids = torch.randint(3, 250, (1, 300))
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    assert len(seen) == 3  # layers 1, 2, 3; layer 0 is always dense: no routing there
    keys = hooked[2].view(1, 300, 2, 16)
    expected = torch.cat([keys[0, :100].mean(0), keys[0, -100:].mean(0)], -1)
    torch.testing.assert_close(seen[1][0], expected, rtol=1e-5, atol=1e-5)
    assert runtime.recorder.elastic.omega is not None and runtime.recorder.calls == 4
    assert runtime.state.keys.keys == {}  # nothing outlives the attention layer's call


def tiny_model(arch: str, layers: int = 3):
    """A random tiny Llama (k_proj only), Qwen3 (k_proj then k_norm) or Gemma3 (k_norm after the heads move
    forward: (B, Hkv, N, d)), 4 query / 2 KV heads, head dim 16."""
    from transformers import Gemma3TextConfig, Qwen3Config

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":  # every layer global (a sliding window would keep the layer out of elastic's routing)
        cfg = Gemma3TextConfig(**common, layer_types=["full_attention"] * layers)
    else:
        cfg = LlamaConfig(**common) if arch == "llama" else Qwen3Config(**common)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "k_norm"):
                layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)  # not the identity scale: k_norm must be applied
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_pooled_keys_through_hooks_equal_brute_force(arch, tmp_path, monkeypatch):
    """Pooled keys seen by the router == k_proj (+ k_norm) recomputed on each layer's input, with left padding."""
    import stem_cli.elastic.modes as modes_mod

    model = tiny_model(arch)
    attn = [layer.self_attn for layer in model.model.layers]
    assert hasattr(attn[0], "k_norm") == (arch != "llama")
    router = new_router(model, model_name=arch, config=small_config(), target_sparsity=0.5, dense_layers=[0])
    path = router.save(tmp_path / "r.pt")
    seen, inputs = [], {}
    original = modes_mod.pooled_keys

    def spy(pre_rope, k, key_valid, pool=100):
        assert pre_rope is not None
        seen.append(original(pre_rope, k, key_valid, pool))
        return seen[-1]

    def grab(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    monkeypatch.setattr(modes_mod, "pooled_keys", spy)
    grabs = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attn]
    try:
        stem_cli.apply(model, "elastic", router=str(path), **SMALL)
        n = 260
        ids = torch.randint(3, 300, (2, n))
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, :37] = 0  # left padding on the second sequence
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for g in grabs:
            g.remove()
    assert len(seen) == 2  # layers 1 and 2
    with torch.no_grad():
        for feats, layer in zip(seen, (1, 2)):
            a = attn[layer]
            keys = a.k_proj(inputs[layer]).view(2, n, 2, 16)
            if arch != "llama":  # per head, on (B, N, Hkv, d): the same values as Gemma3's k_norm on (B, Hkv, N, d)
                keys = a.k_norm(keys)
            for b, start in enumerate((0, 37)):
                valid = keys[b, start:].float()
                expected = torch.cat([valid[:100].mean(0), valid[-100:].mean(0)], -1)
                torch.testing.assert_close(feats[b], expected, rtol=1e-5, atol=1e-5)


def _elastic_hooks(model):
    """(hooks on each layer's key source, hooks on each attention layer) that are ours."""
    attn = [layer.self_attn for layer in model.model.layers]
    return [len(a.k_proj._forward_hooks) for a in attn], [len(a._forward_hooks) for a in attn]


def test_reapplying_elastic_keeps_one_hook_per_layer(tmp_path):
    model = tiny_model("qwen3", layers=3)
    path = new_router(model, model_name="q", config=small_config(), target_sparsity=0.5, dense_layers=[0]).save(tmp_path / "r.pt")
    first = stem_cli.apply(model, "elastic", router=str(path), **SMALL)
    second = stem_cli.apply(model, "elastic", router=str(path), **SMALL)
    assert _elastic_hooks(model) == ([0, 1, 1], [0, 1, 1])  # routed layers 1, 2 only; exactly one each
    assert first.state.keys.handles == [] and len(second.state.keys.handles) == 4
    stem_cli.apply(model, "stem", block_size=16, k_start=3)
    ids = torch.randint(3, 300, (1, 200))
    with torch.no_grad():
        model(ids)  # another method: the leftover hooks keep nothing after the layer's call
    assert second.state.keys.keys == {}
    third = stem_cli.apply(model, "elastic", router=str(path), **SMALL)
    assert _elastic_hooks(model) == ([0, 1, 1], [0, 1, 1])
    with torch.no_grad():
        model(ids)
    assert third.recorder.elastic.omega is not None and third.state.keys.keys == {}
    head_map = save_head_map(HeadMap.uniform("q", 3, 2), tmp_path / "m.json")
    stem_cli.apply(model, "elastic", head_map=str(head_map), block_size=16)
    assert _elastic_hooks(model) == ([0, 0, 0], [0, 0, 0])  # a head map needs no hooks: the router's are gone


def test_selector_without_prepare_falls_back_to_post_rope_keys(tmp_path):
    """Called directly (no stem_cli.apply, nothing hooked): pooled post-RoPE keys, with a one-time warning."""
    import stem_cli.elastic.modes as modes_mod
    from stem_cli.methods import elastic as elastic_method

    path = ElasticRouter(4, 2, 16, dense_layers=[0]).save(tmp_path / "r.pt")
    config = small_config(router=str(path))
    q, k, v = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    modes_mod._noticed.discard("elastic:post-rope")
    with pytest.warns(UserWarning, match="post-RoPE"):
        index = elastic_method.select(q, k, v, layer=1, config=config, scale=0.25, key_valid=None)
    assert index.num_blocks == 8
    feats = modes_mod.pooled_keys(None, k, None)
    torch.testing.assert_close(feats[0], torch.cat([k[0, :, :100].mean(1), k[0, :, -100:].mean(1)], -1))


def test_training_steps_reduce_the_loss(tiny):
    """Toy problem: soft (noise-free) mixture, target sparsity 0, a few Adam steps on one prompt."""
    model = tiny.model
    config = small_config(default_dense_layers=())
    (prompt,) = calibration_prompts(tiny.tokenizer, 320, 1, seed=0, source="needle")
    router = new_router(model, model_name="tiny-llama", config=config, target_sparsity=0.7, seed=0)
    mixed = MixedAttention(router, config, tau=1.0, hard=False, generator=None)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    model.requires_grad_(False)
    losses = []
    with training_attention(model, mixed):
        for _ in range(4):
            loss, *_ = router_loss(model, mixed, prompt, target_sparsity=0.0, sparsity_weight=10.0, task_loss="ce")
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        final, _, _, final_sparsity, _ = router_loss(model, mixed, prompt, target_sparsity=0.0, sparsity_weight=10.0, task_loss="ce")
    assert final.item() < losses[0] - 0.5
    assert final_sparsity.item() < 0.7 - 0.1
    assert all(p.grad is None for p in model.parameters())  # the backbone stays frozen


def test_masked_sdpa_matches_reference_and_has_gradients():
    """Router training runs its sparse modes through the executor's masked SDPA: it must be differentiable."""
    torch.manual_seed(3)
    q = torch.randn(1, 4, 70, 16, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(1, 2, 70, 16, dtype=torch.float64), torch.randn(1, 2, 70, 16, dtype=torch.float64)
    index = mixed_index(q.detach(), k, v, torch.tensor([[STEM, STREAMING]]), small_config(), scale=0.25, key_valid=None)
    out = masked_sdpa(q, k, v, index, scale=0.25)
    torch.testing.assert_close(out, ref.block_sparse_attention(q.detach(), k, v, index, scale=0.25))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------ CLI end to end


def test_cli_calibrate_train_and_generate(tmp_path):
    head_map = tmp_path / "map.json"
    result = run_cli("calibrate", "--model", "tiny-llama", "--seq-len", "512", "--samples", "1", "--target-sparsity", "0.5",
                     "--set", "block_size=16", "--set", "k_start=3", "--output", str(head_map))
    assert result.exit_code == 0, result.output
    hm = load_head_map(head_map)
    assert hm.sparsity == pytest.approx(0.5) and "Omega" in plain(result.output)
    router = tmp_path / "router.pt"
    result = run_cli("train-router", "--model", "tiny-llama", "--steps", "1", "--seq-len", "512", "--samples", "1", "--tasks", "needle",
                     "--set", "block_size=16", "--output", str(router))
    assert result.exit_code == 0, result.output
    assert load_router(router).num_layers == 4
    for setting in (f"elastic.head_map={head_map}", f"elastic.router={router}"):
        result = run_cli("generate", "--model", "tiny-llama", "--needle", "600", "--method", "elastic", "--set", "block_size=16",
                         "--set", setting, "--max-new-tokens", "2")
        assert result.exit_code == 0, result.output
