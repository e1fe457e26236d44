"""Results on disk: JSON lines, one per (method, task, length, sample), keyed by what determines them.

Each record is written and flushed as soon as its sample is scored. Its key is hashed
from everything that determines it (stem_cli/runs/keys.py: the weights' content, dtype,
method and its full config, task and its generator version, length, seed, sample, prompt
format, answer length, data file), and the record keeps those components as `key_parts`,
so a resumed run skips what is already there and a comparison reuses results across
runs. A record made by an older task generator is found by its key without the version
(`older`): it is recomputed, not reused. A torn last line (the process killed mid-write)
is dropped when the file is opened. Solved budget knobs are stored the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from stem_cli.runs.keys import key_of, versionless
from stem_cli.tasks.harness import TaskError


def config_dict(config) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()} if dataclasses.is_dataclass(config) else {}


# Fields that choose how a definition is computed, not what it computes: the torch and Triton
# estimates keep the same blocks (they may differ only where float order breaks an exact tie,
# as two runs of one GPU reduction can). A result made with either is the same result.
# elastic's router_modes (modes read on the host or kept on the device) builds the same index either way.
IMPLEMENTATION_ONLY = frozenset({"estimate_impl", "router_modes"})
# Fields added after results were stored, at the value every earlier result was made with:
# left out of the key at that value, so those results stay reusable.
LATER_FIELDS = {"attn_dtype": "bf16"}


def config_key(config) -> dict[str, Any]:
    """The config as it enters a result's key: config_dict without the implementation-only fields
    and without later fields at their earlier value."""
    return {k: v for k, v in config_dict(config).items()
            if k not in IMPLEMENTATION_ONLY and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def record_key(**parts: Any) -> str:
    """What determines a result, hashed: equal keys mean the same computation (components: stem_cli/runs/keys.py)."""
    return key_of(parts)


def _legacy(record: dict) -> tuple:
    """What a record keyed before key_parts existed was about, to tell that it is an older one of a result."""
    config = {k: v for k, v in (record.get("config") or {}).items() if k != "_max_new_tokens"}
    return (record.get("model"), record.get("method"), record.get("task"), record.get("seq_len"), record.get("seed"), record.get("sample"),
            record.get("dtype"), json.dumps(config, sort_keys=True, default=str))


class ResultStore:
    """Append-only JSONL of results, indexed by key. Each line is flushed and fsynced when added.

    `append_to`: where added records are written, when not this file: a rank's shard in a
    multi-process run (stem_cli/runs/distributed.py), which rank 0 folds into this file."""

    def __init__(self, path: Path, append_to: Path | None = None):
        self.path = Path(path)
        self.append_to = Path(append_to) if append_to is not None else self.path
        self.records: dict[str, dict] = {}
        self._versions: dict[str, set[str]] = {}  # key without the generator version -> generator versions stored
        self._legacy: set[tuple] = set()  # records from before key_parts
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: the process died mid-write; drop it
            with open(self.path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        for number, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise TaskError(f"{self.path}:{number} is not a JSON line; the results file is damaged (move it away or use another --output)") from None
            self._index(record)

    def _index(self, record: dict) -> None:
        self.records[record["key"]] = record
        parts = record.get("key_parts")
        if isinstance(parts, dict):
            self._versions.setdefault(versionless(parts), set()).add(str(parts.get("generator")))
        elif "method" in record:
            self._legacy.add(_legacy(record))

    def older(self, parts: dict, record: dict | None = None) -> bool:
        """Whether the store holds this result made by another (older) generator version, or keyed the old way."""
        if key_of(parts) in self.records:
            return False
        if self._versions.get(versionless(parts), set()) - {str(parts.get("generator"))}:
            return True
        return record is not None and _legacy(record) in self._legacy

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.append_to.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str) + "\n"
        with open(self.append_to, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._index(record)
