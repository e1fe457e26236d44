"""The method registry: name -> selector, default config, one-line description.

A selector maps (q, k, v, layer, config) to a BlockIndex; it never runs attention.
Adding a method means adding one module here and one line to METHODS.
A method module may also export `prepare(model, config) -> config`, which stem_cli.apply calls
once per apply, before the runtime is built (checks against the model, hooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from stem_cli.config import ConfigError, parse_overrides, read_toml, replace
from stem_cli.methods import dense, sam, stem, streaming, uniform
from stem_cli.methods import flexprefill, minference, stem_tpd, xattention
from stem_cli.methods import elastic
from stem_cli.methods.knob import Knob


@dataclass(frozen=True)
class Method:
    name: str
    select: Callable
    defaults: Any
    description: str
    knob: Knob | None = None  # the budget knob an equal-budget solver bisects (methods/knob.py)
    # Optional split of `select` = choose(estimate(...)) where the knob only affects `choose`:
    # the budget solver then estimates once per layer and chooses for every knob value.
    estimate: Callable | None = None
    choose: Callable | None = None
    prepare: Callable | None = None  # prepare(model, config) -> config, run by stem_cli.apply

    @property
    def attn_implementation(self) -> str:
        """The name registered in transformers' AttentionInterface."""
        return "stem" if self.name == "stem" else f"stem_{self.name}"


def _method(name: str, module: ModuleType) -> Method:
    return Method(name, module.select, module.DEFAULTS, module.DESCRIPTION, getattr(module, "BUDGET_KNOB", None),
                  getattr(module, "estimate", None), getattr(module, "choose", None), getattr(module, "prepare", None))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _method("dense", dense),
        _method("stem", stem),
        _method("uniform", uniform),
        _method("sam", sam),
        _method("streaming", streaming),
        _method("stem-tpd", stem_tpd),
        _method("xattention", xattention),
        _method("flexprefill", flexprefill),
        _method("minference", minference),
        _method("elastic", elastic),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        from stem_cli.decode import combined_method, is_decode_spec

        if is_decode_spec(name):  # "stem+prhs", or a bare decode method: dense pre-fill + it (stem_cli/decode)
            return combined_method(name)
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}")
    return METHODS[name]


def parse_method_list(items: list[str]) -> list[str]:
    """['dense,stem', 'uniform'] -> ['dense', 'stem', 'uniform'], each checked, order kept, no repeats.

    A name may also be a decode spec, kept as written: 'stem+prhs' (pre-fill + decode method)
    or a bare decode method 'prhs' (dense pre-fill); get_method resolves both."""
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"no method given; registered methods: {', '.join(METHODS)}")
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


def build_configs(names: list[str], toml_path: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Each method's config: its defaults, then the TOML table named after it, then --set overrides.

    A bare override (mu=0.5) applies to every listed method that has the parameter and
    must fit at least one; a qualified one (stem.mu=0.5) to that method alone.
    """
    configs = {name: get_method(name).defaults for name in names}
    if toml_path:
        for table, values in read_toml(toml_path).items():
            if table not in METHODS:
                raise ConfigError(f"config file table [{table}] names no method; registered methods: {', '.join(METHODS)}")
            if table in configs:
                configs[table] = replace(configs[table], values, table)
    for method, key, value in parse_overrides(list(overrides)):
        if method is not None:
            if method not in configs:
                raise ConfigError(f"--set {method}.{key}: method {method!r} is not among the methods run ({', '.join(names)})")
            configs[method] = replace(configs[method], {key: value}, method)
            continue
        targets = [n for n in names if key in {f for f in configs[n].__dataclass_fields__}]
        if not targets:
            raise ConfigError(f"--set {key}=...: none of the methods run ({', '.join(names)}) has a parameter {key!r}")
        for n in targets:
            configs[n] = replace(configs[n], {key: value}, n)
    return configs
