"""Method configurations: dataclasses with documented defaults, validation, TOML and CLI overrides.

Every field carries its meaning and where its default comes from:
"paper" (the published text), "code" (the authors' released code, which produced
their tables), "paper+code" (both agree) or "stem" (our choice, the reason given).
Bad values raise ConfigError naming the value and what is allowed; the CLI turns
that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stem_cli.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(UsageError, ValueError):
    """A bad method name, parameter or value; the message says what is allowed."""


def param(default, help: str, source: str):
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, "source": source})
    return field(default=default, metadata={"help": help, "source": source})


def _power_of_two(x: int) -> bool:
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class BlockConfig:
    """What every block-sparse method shares."""

    block_size: int = param(128, "tokens per query/key block (power of two, 16..1024)", "paper+code")
    dense_layers: tuple = param((0, 1), "layer indices that always run dense attention", "paper+code")

    def __post_init__(self):
        if not _power_of_two(self.block_size) or not 16 <= self.block_size <= 1024:
            raise ConfigError(f"block_size={self.block_size!r} is not allowed: use a power of two from 16 to 1024")
        layers = self.dense_layers
        if isinstance(layers, int) or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ConfigError(f"dense_layers={layers!r} is not allowed: use a list of layer indices >= 0, e.g. [0, 1]")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))


@dataclass(frozen=True)
class DenseConfig:
    """Dense attention has no parameters."""


ESTIMATE_IMPLS = ("auto", "triton", "torch")
ATTN_DTYPES = ("bf16", "fp8")


def estimate_impl_param(kernels: str):
    """The `estimate_impl` field every method with a fused estimate shares; `kernels` names its Triton kernels."""
    return param(
        "auto",
        f"the estimate's code path: 'auto' = Triton on a CUDA device ({kernels}), torch ops on the CPU; "
        "'triton' or 'torch' to force one (the same index up to exact ties, which triton gives to the lower block id)",
        "stem",
    )


def check_estimate_impl(value) -> None:
    if value not in ESTIMATE_IMPLS:
        raise ConfigError(f"estimate_impl={value!r} is not allowed: use {', '.join(map(repr, ESTIMATE_IMPLS))}")


@dataclass(frozen=True)
class StemConfig(BlockConfig):
    stride: int = param(8, "antidiagonal stride s of the block-score estimate (power of two, divides block_size)", "paper+code")
    beta: float = param(0.2, "weight of the value-norm term of the Output-Aware Metric (0 = score only)", "paper+code")
    mu: float = param(0.7, "TPD decay: the last query block keeps mu * k_start blocks, in (0, 1]", "paper+code")
    tpd: bool = param(True, "Token Position-Decay on; off = one uniform per-row budget k_start (1 + mu) / 2", "paper+code")
    schedule: str = param(
        "code",
        "k_start rule: 'code' = P if P<56, floor(0.2P+30) if P<160, floor(0.1P)+30 (released code); "
        "'paper' = floor(0.2P) up to 16K tokens, floor(0.1P) above (paper text)",
        "code",
    )
    k_start: int = param(0, "fixed k_start in blocks; 0 = from the schedule", "stem")
    k_scale: float = param(1.0, "multiplies k_start (budget knob for equal-budget comparisons)", "stem")
    sink_blocks: int = param(4, "first blocks always kept (attention sinks)", "code")
    window_blocks: int = param(4, "blocks ending at the diagonal always kept (local window; includes the diagonal)", "code")
    forced_rule: str = param(
        "code",
        "how the always-kept blocks meet the budget: 'code' = top-k(i) by the metric, then sinks/window/diagonal "
        "added on top (k(i) to k(i)+sink+window blocks; released code); 'inside' = ranked first, counted inside k(i)",
        "code",
    )
    gqa: str = param(
        "query",
        "'query' = select per query head; 'kv' = one selection per KV head from the group's mean block logits",
        "stem",
    )
    estimate_impl: str = param(
        "auto",
        "the estimate's code path: 'auto' = Triton on a CUDA device (kernels/block_scores.py causal GEMM, "
        "kernels/tpd_select.py top-k), torch ops on the CPU; 'triton' or 'torch' to force one "
        "(the same index on distinct logits; triton breaks ties to the lower block id, its TF32x3 logits agree to ~1e-6)",
        "stem",
    )
    attn_dtype: str = param(
        "bf16",
        "operands of the block-sparse attention kernel: 'bf16' = the model's dtype; 'fp8' = e4m3 Q, K, P and V with "
        "per-block scales, fp32 accumulation (kernels/block_sparse_attn_fp8.py; GPUs of compute capability >= 8.9, an "
        "error elsewhere). The dense layers and full indices stay bf16 dense SDPA; the selection never sees it",
        "stem",
    )

    def __post_init__(self):
        super().__post_init__()
        if not _power_of_two(self.stride) or self.stride > self.block_size:
            raise ConfigError(
                f"stride={self.stride!r} is not allowed: use a power of two that divides block_size ({self.block_size}), e.g. 8 or 16"
            )
        if not isinstance(self.mu, (int, float)) or not 0 < self.mu <= 1:
            raise ConfigError(f"mu={self.mu!r} is not allowed: mu must lie in (0, 1]")
        if not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ConfigError(f"beta={self.beta!r} is not allowed: beta must be >= 0")
        if self.schedule not in ("code", "paper"):
            raise ConfigError(f"schedule={self.schedule!r} is not allowed: use 'code' or 'paper'")
        if not isinstance(self.k_start, int) or self.k_start < 0:
            raise ConfigError(f"k_start={self.k_start!r} is not allowed: use 0 (schedule) or a block count >= 1")
        if not isinstance(self.k_scale, (int, float)) or self.k_scale <= 0:
            raise ConfigError(f"k_scale={self.k_scale!r} is not allowed: k_scale must be > 0")
        for name in ("sink_blocks", "window_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is not allowed: use a block count >= 0")
        if self.gqa not in ("query", "kv"):
            raise ConfigError(f"gqa={self.gqa!r} is not allowed: use 'query' or 'kv'")
        if self.forced_rule not in ("code", "inside"):
            raise ConfigError(f"forced_rule={self.forced_rule!r} is not allowed: use 'code' or 'inside'")
        if not isinstance(self.tpd, bool):
            raise ConfigError(f"tpd={self.tpd!r} is not allowed: use true or false")
        check_estimate_impl(self.estimate_impl)
        if self.attn_dtype not in ATTN_DTYPES:
            raise ConfigError(f"attn_dtype={self.attn_dtype!r} is not allowed: use {', '.join(map(repr, ATTN_DTYPES))}")


@dataclass(frozen=True)
class StreamingConfig(BlockConfig):
    dense_layers: tuple = param((0, 1), "layer indices that always run dense attention (Stem's layer schedule, so budgets compare)", "stem")
    sink_blocks: int = param(1, "first blocks kept (128 sink tokens at block 128, as MInference's A-shape)", "code")
    window_blocks: int = param(31, "blocks ending at the diagonal kept (3968 local tokens at block 128, as MInference)", "code")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ConfigError(f"sink_blocks={self.sink_blocks!r} is not allowed: use a block count >= 0")
        if not isinstance(self.window_blocks, int) or self.window_blocks < 1:
            raise ConfigError(f"window_blocks={self.window_blocks!r} is not allowed: use a block count >= 1 (the diagonal)")


def fields_of(config) -> list[dataclasses.Field]:
    return list(dataclasses.fields(config))


def replace(config, values: dict[str, Any], method: str):
    """A copy of `config` with `values` applied; unknown names and bad types are ConfigErrors."""
    known = {f.name: f for f in fields_of(config)}
    clean = {}
    for name, value in values.items():
        if name not in known:
            allowed = ", ".join(known) or "none"
            raise ConfigError(f"method {method!r} has no parameter {name!r}; its parameters: {allowed}")
        default = getattr(config, name)
        clean[name] = _coerce(value, default, name)
    return dataclasses.replace(config, **clean)


def _coerce(value, default, name):
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not allowed: use true or false")
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{name}={value!r} is not allowed: use a whole number")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r} is not allowed: use a number")
    if isinstance(default, tuple):
        if isinstance(value, int):
            return (value,)
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{name}={value!r} is not allowed: use a list such as [0, 1]")
    return value


def parse_value(text: str):
    """A CLI value as TOML would read it (numbers, booleans, lists), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> list[tuple[str | None, str, Any]]:
    """'mu=0.5' -> (None, 'mu', 0.5); 'stem.mu=0.5' -> ('stem', 'mu', 0.5)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not allowed: use NAME=VALUE or METHOD.NAME=VALUE, e.g. mu=0.5 or stem.beta=0")
        key, text = item.split("=", 1)
        method, _, name = key.strip().rpartition(".")
        out.append((method or None, name, parse_value(text.strip())))
    return out


def read_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A TOML file with one table per method: [stem] mu = 0.6."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"config file {str(path)!r}: top-level key {key!r} must be a table named after a method, e.g. [stem]")
    return data
