"""Head maps: one computation mode per (layer, KV head), as JSON.

    {
      "format": "stem-elastic-head-map", "version": 1,
      "model": "smollm2-135m",                 # what it was calibrated on (informative)
      "num_layers": 30, "num_kv_heads": 3, "num_query_heads": 9,
      "modes": [["dense", "stem", "streaming"], ...],   # num_layers lists of num_kv_heads modes
      "target_sparsity": 0.7,                  # asked-for fraction of heads not dense (null if hand-made)
      "sparsity": 0.7,                         # what the map holds: fraction of its heads not dense
      "calibration": {...},                    # settings and prompts of `stem calibrate` (free-form, JSON)
      "scores": {"retrieval": [[...]], "stem_error": [[...]], "streaming_error": [[...]]}
                                               # optional, each num_layers x num_kv_heads numbers or null
    }

Every malformed file is a ConfigError naming the file and what is wrong; a map whose
layer or KV-head counts differ from the model's is a ConfigError naming both counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stem_cli.config import ConfigError
from stem_cli.elastic.config import MODES

FORMAT = "stem-elastic-head-map"
VERSION = 1


@dataclass
class HeadMap:
    model: str
    num_layers: int
    num_kv_heads: int
    modes: list[list[str]]
    num_query_heads: int | None = None
    target_sparsity: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, list[list[float | None]]] = field(default_factory=dict)

    def __post_init__(self):
        validate(self.to_json(), "head map")

    @property
    def sparsity(self) -> float:
        """Fraction of the map's (layer, KV head) entries that are not dense (every KV head serves
        the same number of query heads, so this is also the fraction of query heads)."""
        return _sparsity(self.modes)

    def mode_ids(self) -> torch.Tensor:
        """(num_layers, num_kv_heads) int64 mode ids (0 dense, 1 stem, 2 streaming)."""
        return torch.tensor([[MODES.index(m) for m in layer] for layer in self.modes], dtype=torch.long)

    def check_model(self, num_layers: int | None, num_kv_heads: int | None, where: str = "head map") -> None:
        """ConfigError naming both counts when the map does not fit the model."""
        problems = []
        if num_layers is not None and num_layers != self.num_layers:
            problems.append(f"{self.num_layers} layers but the model has {num_layers}")
        if num_kv_heads is not None and num_kv_heads != self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads per layer but the model has {num_kv_heads}")
        if problems:
            raise ConfigError(
                f"{where} (calibrated on {self.model!r}) does not fit this model: it has {' and '.join(problems)}; "
                "calibrate one for this model with `stem calibrate --model ...`"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "num_query_heads": self.num_query_heads,
            "modes": self.modes,
            "target_sparsity": self.target_sparsity,
            "sparsity": _sparsity(self.modes),
            "calibration": self.calibration,
            "scores": self.scores,
        }

    @staticmethod
    def from_json(data: Any, where: str = "head map") -> HeadMap:
        validate(data, where)
        return HeadMap(
            model=data["model"],
            num_layers=data["num_layers"],
            num_kv_heads=data["num_kv_heads"],
            modes=[list(layer) for layer in data["modes"]],
            num_query_heads=data.get("num_query_heads"),
            target_sparsity=data.get("target_sparsity"),
            calibration=dict(data.get("calibration") or {}),
            scores={k: [list(r) for r in v] for k, v in (data.get("scores") or {}).items()},
        )

    @staticmethod
    def uniform(model: str, num_layers: int, num_kv_heads: int, mode: str = "stem", dense_layers=(), **extra) -> HeadMap:
        """Every head `mode`, the listed layers dense (a starting point for hand-made maps)."""
        modes = [["dense" if layer in dense_layers else mode] * num_kv_heads for layer in range(num_layers)]
        return HeadMap(model, num_layers, num_kv_heads, modes, **extra)


def _sparsity(modes) -> float | None:
    try:
        flat = [m for layer in modes for m in layer]
        return sum(m != "dense" for m in flat) / len(flat)
    except (TypeError, ZeroDivisionError):
        return None  # malformed: validate() says what is wrong


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def validate(data: Any, where: str = "head map") -> None:
    """ConfigError with the first thing wrong with a head-map JSON object."""

    def bad(message: str):
        raise ConfigError(f"{where}: {message}")

    if not isinstance(data, dict):
        bad("must be a JSON object")
    if data.get("format") != FORMAT:
        bad(f"'format' must be {FORMAT!r} (got {data.get('format')!r}): is this a file from `stem calibrate`?")
    if data.get("version") != VERSION:
        bad(f"'version' {data.get('version')!r} is not supported (this stem reads version {VERSION})")
    for key in ("model",):
        if not isinstance(data.get(key), str):
            bad(f"'{key}' must be a string")
    for key in ("num_layers", "num_kv_heads"):
        if not _is_count(data.get(key)):
            bad(f"'{key}' must be a whole number >= 1 (got {data.get(key)!r})")
    hq = data.get("num_query_heads")
    if hq is not None and (not _is_count(hq) or hq % data["num_kv_heads"]):
        bad(f"'num_query_heads' must be a multiple of num_kv_heads ({data['num_kv_heads']}) or null (got {hq!r})")
    layers, heads = data["num_layers"], data["num_kv_heads"]
    modes = data.get("modes")
    if not isinstance(modes, list) or len(modes) != layers:
        got = len(modes) if isinstance(modes, list) else type(modes).__name__
        bad(f"'modes' must list num_layers = {layers} layers (got {got})")
    for i, row in enumerate(modes):
        if not isinstance(row, list) or len(row) != heads:
            got = len(row) if isinstance(row, list) else type(row).__name__
            bad(f"'modes' layer {i} must list num_kv_heads = {heads} modes (got {got})")
        for h, m in enumerate(row):
            if m not in MODES:
                bad(f"'modes' layer {i} head {h}: {m!r} is not a mode; use one of {', '.join(MODES)}")
    target = data.get("target_sparsity")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1):
        bad(f"'target_sparsity' must lie in [0, 1] or be null (got {target!r})")
    if not isinstance(data.get("calibration", {}) or {}, dict):
        bad("'calibration' must be an object")
    scores = data.get("scores", {}) or {}
    if not isinstance(scores, dict):
        bad("'scores' must be an object of num_layers x num_kv_heads tables")
    for name, table in scores.items():
        if not isinstance(table, list) or len(table) != layers or any(not isinstance(r, list) or len(r) != heads for r in table):
            bad(f"'scores.{name}' must be a {layers} x {heads} table")
        for r in table:
            for x in r:
                if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
                    bad(f"'scores.{name}' holds {x!r}: use finite numbers or null")


def save_head_map(head_map: HeadMap, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(head_map.to_json(), indent=1) + "\n")
    return path


_cache: dict[tuple, HeadMap] = {}


def load_head_map(path: str | Path) -> HeadMap:
    """Read and validate a head map (cached per file version: configs are copied often)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"head map {str(path)!r} does not exist (make one with `stem calibrate --model ... --output FILE`)")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _cache:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"head map {str(path)!r} is not valid JSON: {e}") from None
        _cache[key] = HeadMap.from_json(data, where=f"head map {str(path)!r}")
    return _cache[key]
