"""`stem profile --decode`'s generation section (stem_cli/runs/generation_profile.py), on the tiny random Llama."""

import json

import pytest
import torch
from typer.testing import CliRunner

from stem_cli.cli import app

ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
QUICK = ["profile", "--decode", "--device", "cpu", "--model", "tiny-llama", "--warmup", "0", "--repeat", "1"]


def _run(args, tmp_path):
    result = CliRunner().invoke(app, [*QUICK, *args, "--output", str(tmp_path)], env=ENV)
    data = json.loads(next(tmp_path.glob("profile-decode-*.json")).read_text()) if result.exit_code == 0 else None
    return result, data


def _hf_greedy(ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The reference: a fresh tiny-llama (same seeded random weights) under transformers' own SDPA and generate()."""
    from stem_cli.models import load_model

    model = load_model("tiny-llama", device="cpu", dtype="fp32").model
    model.generation_config.eos_token_id = None  # no early stop, as the profile
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out[0, ids.shape[1]:].tolist()


def test_generation_rows_and_dense_decode_equals_hf_greedy(tmp_path):
    from stem_cli.runs.generation_profile import prompt_ids

    lengths, new = [160, 288], 6
    result, data = _run(["--seq-len", "160,288", "--methods", "dense,prhs", "--prefill-method", "dense",
                         "--new-tokens", str(new), "--set", "window_tokens=8", "--set", "budget=64"], tmp_path)
    assert result.exit_code == 0, result.output
    rows = data["generation"]
    assert [(r["seq_len"], r["decode_method"]) for r in rows] == [(n, m) for n in lengths for m in ("dense", "prhs")]
    for r in rows:
        assert r["status"] == "ok" and len(r["tokens"]) == new and r["decode_steps"] == new - 1
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0
        assert r["ms_per_token"] == pytest.approx(r["decode_ms"] / (new - 1))
        assert r["e2e_tokens_per_s"] == pytest.approx(new / ((r["prefill_ms"] + r["decode_ms"]) / 1e3))
        assert r["speedup"] == pytest.approx(next(d for d in rows if d["seq_len"] == r["seq_len"] and d["decode_method"] == "dense")["decode_ms"] / r["decode_ms"])
    # every decode loop ran with the fastest SDPA backend the attention section measured at its length
    fastest = {r["seq_len"]: r["sdpa_backend"] for r in data["rows"] if r["method"] == "dense"}
    assert all(fastest.values()) and all(r["decode_sdpa_backend"] == fastest[r["seq_len"]] for r in rows)
    sparse = [r for r in rows if r["decode_method"] == "prhs"]
    assert all(r["kept_fraction"] < 1 for r in sparse)  # 64 of 160-294 positions: the decode method really ran
    assert "generation" in result.output and "same as dense" in result.output
    vocab = 259
    for n in lengths:
        dense = next(r for r in rows if r["seq_len"] == n and r["decode_method"] == "dense")
        assert dense["tokens"] == _hf_greedy(prompt_ids(vocab, n, 1, 0), new)


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "1"], "--new-tokens 1"),
    (["--prefill-method", "nosuch"], "--prefill-method 'nosuch'"),
    (["--prefill-method", "stem+prhs"], "'stem+prhs' is a decode spec"),
    (["--methods", "prhs,stem+prhs"], "'prhs' and 'stem+prhs'"),
])
def test_bad_generation_options_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, [*QUICK, "--seq-len", "160", *args, "--output", str(tmp_path)], env=ENV)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not list(tmp_path.glob("*.json"))  # refused before anything ran


def test_generation_options_need_decode(tmp_path):
    result = CliRunner().invoke(app, ["profile", "--device", "cpu", "--model", "tiny-llama", "--new-tokens", "8"], env=ENV)
    assert result.exit_code == 2 and "apply to `stem profile --decode` only" in " ".join(result.output.split())


def test_no_generation_omits_the_section(tmp_path):
    result, data = _run(["--seq-len", "160", "--methods", "dense", "--no-generation"], tmp_path)
    assert result.exit_code == 0, result.output
    assert data["rows"] and "generation" not in data and "generation_parameters" not in data
    assert "same as dense" not in result.output


def test_skipped_with_reason_when_memory_would_not_fit(tmp_path, monkeypatch):
    from stem_cli.runs import generation_profile

    monkeypatch.setattr(generation_profile, "total_memory_bytes", lambda device: 2**20)  # a 1 MiB device
    result, data = _run(["--seq-len", "160", "--methods", "dense,quest", "--new-tokens", "4"], tmp_path)
    assert result.exit_code == 0, result.output
    rows = data["generation"]
    assert [r["decode_method"] for r in rows] == ["dense", "quest"]
    assert all(r["status"] == "skipped" and "of the device's 0.0 GiB" in r["reason"] and r["needed_gib"] > 0 for r in rows)
    assert "skipped" in result.output


def test_preallocated_cache_equals_dynamic_cache_without_copies():
    """The profile's cache against transformers' DynamicCache: the same logits at every step of a greedy
    run (fresh random prompt), every layer's buffer never reallocated, and needed_bytes' KV part equal to
    the buffers' bytes plus one layer's head room."""
    from transformers import DynamicCache

    from stem_cli.generation import with_cache
    from stem_cli.models import load_model
    from stem_cli.runs.generation_profile import needed_bytes, preallocated_cache

    model = load_model("tiny-llama", device="cpu", dtype="fp32").model
    n, new = 96, 5
    ids = torch.randint(0, 259, (1, n))
    ours, theirs = preallocated_cache(model, n + new), DynamicCache(config=model.config)
    pointers = None
    with torch.no_grad():
        token = ids
        for step in range(new + 1):
            a = model(input_ids=token, **with_cache(model, ours), use_cache=True).logits[:, -1]
            b = model(input_ids=token, **with_cache(model, theirs), use_cache=True).logits[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            now = [layer.key_buffer.data_ptr() for layer in ours.layers]
            assert pointers is None or now == pointers, f"a buffer was reallocated at step {step}"
            pointers = now
            token = a.argmax(-1, keepdim=True)
    assert ours.get_seq_length() == theirs.get_seq_length() == n + new
    held = sum(t.numel() * t.element_size() for layer in ours.layers for t in (layer.key_buffer, layer.value_buffer))
    layers = model.config.num_hidden_layers
    assert needed_bytes(model, n, new, 1)["kv_cache"] == held * (layers + 1) // layers  # n + new positions, plus one layer's head room
