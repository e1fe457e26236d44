"""Results on disk: JSON lines, one per (method, task, length, sample), keyed by what determines them.

Each record is written and flushed as soon as its sample is scored. Its key is hashed
from everything that determines it (model, dtype, method and its full config, task,
length, seed, sample id), so a resumed run skips what is already there and a comparison
reuses results across runs. A torn last line (the process killed mid-write) is dropped
when the file is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from stem_cli.tasks.harness import TaskError


def config_dict(config) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()} if dataclasses.is_dataclass(config) else {}


def record_key(*, model: str, dtype: str, method: str, config: dict, task: str, seq_len: int, seed: int, sample: str) -> str:
    """What determines a result, hashed: equal keys mean the same computation."""
    what = {"model": model, "dtype": dtype, "method": method, "config": config, "task": task, "seq_len": seq_len, "seed": seed, "sample": sample}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ResultStore:
    """Append-only JSONL of results, indexed by key. Each line is flushed and fsynced when added."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
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
            self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record
