"""What a stored result depends on, as named key components; the key is their hash.

A result (one method on one sample) is keyed by everything that changes it and by nothing
that does not:

- `weights`: the model's content, never where it lies (moving the cache keeps every key):
  a pulled alias by its GGUF's sha256 from the registry; a `.gguf` path by its sha256; a
  local folder by its config and weight files' sha256s; a hub id by its cached snapshot's
  blob names (the hub names each blob by its hash, so nothing is read); random weights
  by the config they are built from, the fixed seed and the torch/transformers versions
  that draw them;
- `dtype`, `method`, `config` (the method's full config), `task`, `seq_len`, `sample`;
- `generator`: the version of the code that makes the task's prompts, references and
  scores (each task module's GENERATOR_VERSION; lm-eval's installed version), and for
  prompts drawn from Python's help texts a hash of that text (it varies by Python version);
- per task kind, what reaches it: `seed` (the generators that draw), `prompt_format`
  (chat template or plain; resolved, so "default" and the explicit choice it resolves to
  are one key), `max_new_tokens` (resolved; generation tasks only), `data` (the sha256
  of LongBench's `<subset>.jsonl`, not the folder's path), `prompt` (a hash of the token
  ids: a safety net for what the named components miss); lm-eval's aggregate also by
  `limit` and the `--include-path` YAMLs.

File hashes are remembered in the stem cache by (path, size, mtime), so each file is read
once per version; the key itself holds only content hashes. Content rather than names,
sizes and mtimes: a copy (cp, rsync, unzip) changes mtimes and would orphan the results,
and a fine-tuned checkpoint has the sizes of its base.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

SHORT = 24  # hex digits of a key

# The task modules whose code makes a kind's prompts (ruler and ppl draw on needle's haystack).
_GENERATORS = {"ruler": ("ruler", "needle"), "longbench": ("longbench",), "fidelity": ("fidelity", "ruler", "needle"),
               "ppl": ("ppl", "needle")}
_HAYSTACK = {"ruler", "fidelity", "ppl"}  # prose from pydoc_data, which varies with the Python version
_SEEDED = {"ruler", "fidelity", "ppl", "lm-eval"}  # longbench reads its records in order: no seed reaches it
_CHAT = {"ruler", "longbench", "fidelity"}  # ppl is plain text; the lm-eval bridge is run without a chat template
# Files of a model folder that do not change what it computes.
_NOT_MODEL = (".md", ".png", ".jpg", ".jpeg", ".gif", ".pdf")
_NOT_MODEL_NAMES = ("license", "notice", "use_policy", "readme")


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:SHORT]


def versionless(parts: dict[str, Any]) -> str:
    """The key without the generator version: equal for a result made by an older generator."""
    return key_of({k: v for k, v in parts.items() if k != "generator"})


def config_files(config) -> dict[str, str]:
    """sha256 of the files a method's config names (elastic's head_map, router): a result made with a file
    retrained in place is not reused. Empty for every config that names none (their keys stay as they were)."""
    out = {}
    for name in ("head_map", "router"):
        where = getattr(config, name, "")
        if where and Path(where).expanduser().is_file():
            out[name] = file_sha256(Path(where).expanduser())
    return out


def ids_digest(ids) -> str:
    """A short hash of token ids (a list, or a tensor's rows)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ task side


def family(task: str) -> str:
    """'ruler/vt' -> 'ruler', 'lm-eval/gsm8k' -> 'lm-eval', 'ppl' -> 'ppl'."""
    return task.split("/", 1)[0]


def generator(task: str) -> str:
    """'ruler 1, needle 1, haystack 3f2a...': the versions of what makes this task's prompts, references and scores."""
    import importlib

    kind = family(task)
    if kind == "lm-eval":
        from stem_cli.tasks import harness

        return harness.GENERATOR_VERSION
    versions = [f"{m} {importlib.import_module(f'stem_cli.tasks.{m}').GENERATOR_VERSION}" for m in _GENERATORS[kind]]
    if kind in _HAYSTACK:
        versions.append(f"haystack {_haystack_digest()}")
    return ", ".join(versions)


@functools.lru_cache(maxsize=1)
def _haystack_digest() -> str:
    from stem_cli.tasks.needle import haystack_sentences

    return hashlib.sha256("\n".join(haystack_sentences()).encode()).hexdigest()[:12]


def prompt_format(task: str, tokenizer, chat_template: bool | None) -> str | None:
    """'chat template' or 'plain' as the task will render it; None where the setting does not reach the task."""
    kind = family(task)
    if kind not in _CHAT:
        return None
    if chat_template is None:
        if kind == "longbench":
            from stem_cli.tasks import longbench

            if longbench.SUBSETS[task.split("/", 1)[1]].completion:
                return "plain"
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    return "chat template" if chat_template else "plain"


def data_digest(task: str, data_dir: Path | None) -> str | None:
    """sha256 of the data file a task reads (LongBench's <subset>.jsonl under --data-dir), None for generated tasks."""
    if family(task) != "longbench" or data_dir is None:
        return None
    path = Path(data_dir).expanduser() / f"{task.split('/', 1)[1]}.jsonl"
    return file_sha256(path) if path.is_file() else None


def folder_digest(folder: Path | None) -> str | None:
    """A hash of every file's relative name and content under `folder` (lm-eval's --include-path YAMLs)."""
    if folder is None:
        return None
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return _digest({str(p.relative_to(folder)): file_sha256(p) for p in files})


def task_components(task: str, *, tokenizer, seed: int, chat_template: bool | None, data_dir: Path | None) -> dict[str, Any]:
    """The components every result of `task` shares in a run (for the summary JSON and the parts)."""
    kind = family(task)
    out: dict[str, Any] = {"generator": generator(task)}
    if kind in _SEEDED:
        out["seed"] = seed
    fmt = prompt_format(task, tokenizer, chat_template)
    if fmt is not None:
        out["prompt_format"] = fmt
    if kind == "longbench":
        out["data"] = data_digest(task, data_dir)
    return out


# ------------------------------------------------------------------ model side


def weights_identity(loaded) -> dict[str, str]:
    """{"weights": content identity, "how": how it was found} of a models.LoadedModel."""
    from stem_cli.models import CONFIG_DIR, PYPI_WEIGHTS

    source, spec = loaded.source, loaded.spec
    kind, _, where = source.partition(":")
    if kind == "random-weights":
        import torch
        import transformers

        if spec is not None:  # a registry alias: its shipped config, as the file is
            config = file_sha256(CONFIG_DIR / spec.config_file, remember=False)
        else:
            config = _digest(_config_dict(loaded.model.config))
        return {"weights": f"random:{config[:16]}:seed0:torch {torch.__version__}:transformers {transformers.__version__}",
                "how": "random weights: sha256 of the config they are built from, the fixed seed 0, and the versions that draw them"}
    if kind == "gguf":
        if spec is not None and spec.source == "pypi":
            return {"weights": f"sha256:{PYPI_WEIGHTS[spec.alias].sha256}", "how": "the registry's sha256 of the pulled GGUF"}
        return {"weights": f"sha256:{file_sha256(Path(where))}", "how": "sha256 of the GGUF file"}
    if kind == "local":
        return {"weights": f"folder:{model_folder_digest(Path(where))}",
                "how": "sha256 over the folder's files (config, tokenizer, weights) by name and content"}
    if kind == "hub":
        snapshot = _hub_snapshot(where)
        if snapshot is not None:
            return {"weights": f"hub:{model_folder_digest(snapshot)}",
                    "how": "the cached hub snapshot's files by name and blob hash"}
        return {"weights": f"hub:{where}", "how": "the hub id only (no cached snapshot to read a revision from)"}
    return {"weights": source, "how": "the source as given"}


def model_folder_digest(folder: Path) -> str:
    """Name and content hash of each top-level file that can change what the model computes."""
    files = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if p.name.startswith(".") or not p.is_file() or name.endswith(_NOT_MODEL) or name.startswith(_NOT_MODEL_NAMES):
            continue
        files[p.name] = file_sha256(p)
    return _digest(files)


def _hub_snapshot(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - no cache, odd id: no snapshot to read
        return None
    return Path(config).parent if isinstance(config, str) else None


def _config_dict(config) -> dict:
    """A model config without what does not shape the weights (where it came from, versions, dtype)."""
    skip = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset")
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ file hashes, remembered


def file_sha256(path: Path, *, remember: bool = True) -> str:
    """sha256 of a file's bytes. A hub blob (a snapshot's symlink into blobs/) is named by its hash: that name, unread.
    Otherwise remembered in the stem cache by (path, size, mtime), so a file is read once per version."""
    from stem_cli.models import sha256_file

    path = Path(path)
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return target.name
    if not remember:
        return sha256_file(target)
    st = target.stat()
    memo = _memo()
    entry = memo.get(str(target))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(target)
    memo[str(target)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _save_memo(memo)
    return digest


def _memo_path() -> Path:
    from stem_cli.models import cache_dir

    return cache_dir() / "file-hashes.json"


def _memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old memo or the new one
    except OSError:  # a read-only cache costs a re-hash next time, not this run
        pass
