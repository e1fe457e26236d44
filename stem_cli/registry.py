"""Every method name: pre-fill methods, decode methods, "PREFILL+DECODE" specs, variants.

A pre-fill method is a selector module in stem_cli/methods (it exports `select`,
`DEFAULTS`, `DESCRIPTION`, and optionally `BUDGET_KNOB`, `estimate`/`choose`, `prepare`);
a decode method a module in stem_cli/decode (`select`, `DEFAULTS`, `DESCRIPTION`).
A variant is a known method with other defaults, declared as data below, so an
ablation is one line here and no module of its own. Entries are imported on first
use: listing names (`stem --help`, `stem methods` headers, error messages) imports
no method, torch or transformers.

Specs combine a pre-fill method with a decode method: "stem+prhs"; a bare decode
name ("prhs") means dense pre-fill + that decode. A combined method's config has
the fields of both configs (a decode field whose name a pre-fill field already uses
is renamed decode_<name>), so --set, TOML tables named after the spec and
apply(**params) work as for any method; `.prefill` and `.decode` give the two back.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from stem_cli.config import ConfigError, parse_overrides, read_toml, replace

# name -> selector module (imported on first use)
PREFILL_MODULES: dict[str, str] = {
    "dense": "stem_cli.methods.dense",
    "stem": "stem_cli.methods.stem",
    "streaming": "stem_cli.methods.streaming",
    "xattention": "stem_cli.methods.xattention",
    "flexprefill": "stem_cli.methods.flexprefill",
    "minference": "stem_cli.methods.minference",
    "elastic": "stem_cli.methods.elastic",
}

# name -> (base method, default overrides, description): the ablations of the paper's Table 4.
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "uniform": ("stem", {"tpd": False},
                "Stem's Output-Aware Metric with a uniform per-row budget k_start(1+mu)/2 (TPD off; equal total budget)"),
    # The paper's ablation baseline: neither TPD nor the Output-Aware Metric (uniform < +TPD < +TPD+OAM).
    "uniform-score": ("stem", {"tpd": False, "beta": 0.0},
                      "the paper's ablation baseline 'Uniform': a uniform per-row budget with the score-only metric (TPD off, beta = 0)"),
    "sam": ("stem", {"beta": 0.0},
            "Stem with the score-only metric (beta = 0): TPD on, Output-Aware Metric off"),
    # The paper's ablation step "+TPD": exactly sam under the ablation table's name, so rows can carry that label.
    "stem-tpd": ("stem", {"beta": 0.0},
                 "ablation name '+TPD': TPD budgets with the score-only metric (beta = 0); identical to sam"),
    # elastic under a second name, so a calibrated map (elastic.head_map=) and a trained router
    # (elastic-router.router=, required) are compared side by side in one run.
    "elastic-router": ("elastic", {},
                       "Elastic Attention with a trained router (needs --set elastic-router.router=FILE from `stem train-router`): "
                       "each KV head's mode chosen per input; reports Omega"),
}

ORDER = ("dense", "stem", "uniform", "uniform-score", "sam", "streaming", "stem-tpd", "xattention", "flexprefill", "minference",
         "elastic", "elastic-router")

DECODE_MODULES: dict[str, str] = {
    "prhs": "stem_cli.decode.prhs",
    "topk-decode": "stem_cli.decode.topk",
    "quest": "stem_cli.decode.quest",
}


@dataclass(frozen=True)
class Method:
    name: str
    select: Callable
    defaults: Any
    description: str
    knob: Any = None  # the budget knob an equal-budget solver bisects (methods/knob.py)
    # Optional split of `select` = choose(estimate(...)) where the knob only affects `choose`:
    # the budget solver then estimates once per layer and chooses for every knob value.
    estimate: Callable | None = None
    choose: Callable | None = None
    # prepare(model, config) -> run state, called by stem_cli.apply: checks against the model, hooks,
    # and the mutable state the selector then receives as `state=` (elastic's Omega counts, router keys).
    prepare: Callable | None = None
    notes: tuple = ()  # where the method departs from its authors' released code, and why (`stem methods`)

    @property
    def attn_implementation(self) -> str:
        return attn_implementation(self.name)


def attn_implementation(name: str) -> str:
    """The name a method is registered under in transformers' AttentionInterface."""
    return "stem" if name == "stem" else f"stem_{name}"


@dataclass(frozen=True)
class DecodeMethod:
    name: str
    select: Callable
    defaults: Any
    description: str


def _from_module(name: str, path: str) -> Method:
    module = importlib.import_module(path)
    return Method(name, module.select, module.DEFAULTS, module.DESCRIPTION, getattr(module, "BUDGET_KNOB", None),
                  getattr(module, "estimate", None), getattr(module, "choose", None), getattr(module, "prepare", None),
                  getattr(module, "NOTES", ()))


def _build_prefill(name: str) -> Method:
    if name in VARIANTS:
        base, overrides, description = VARIANTS[name]
        method = METHODS[base]
        return dataclasses.replace(method, name=name, defaults=dataclasses.replace(method.defaults, **overrides),
                                   description=description)
    return _from_module(name, PREFILL_MODULES[name])


def _build_decode(name: str) -> DecodeMethod:
    module = importlib.import_module(DECODE_MODULES[name])
    return DecodeMethod(name, module.select, module.DEFAULTS, module.DESCRIPTION)


class _LazyTable(Mapping):
    """name -> entry, built (and its module imported) on first access; names are known up front."""

    def __init__(self, names, build: Callable[[str], Any]):
        self._names = tuple(names)
        self._build = build
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


METHODS: Mapping[str, Method] = _LazyTable(ORDER, _build_prefill)
DECODE_METHODS: Mapping[str, DecodeMethod] = _LazyTable(DECODE_MODULES, _build_decode)
assert set(ORDER) == set(PREFILL_MODULES) | set(VARIANTS)


def get_decode_method(name: str) -> DecodeMethod:
    if name not in DECODE_METHODS:
        raise ConfigError(f"unknown decode method {name!r}; decode methods: {', '.join(DECODE_METHODS)}")
    return DECODE_METHODS[name]


def is_decode_spec(name: str) -> bool:
    """True for 'PREFILL+DECODE' specs and bare decode-method names."""
    return "+" in name or name in DECODE_METHODS


def split_spec(name: str) -> tuple[str, str | None]:
    """'stem+prhs' -> ('stem', 'prhs'); 'prhs' -> ('dense', 'prhs'); 'stem' -> ('stem', None)."""
    if "+" in name:
        prefill, _, decode = name.partition("+")
        prefill, decode = prefill.strip(), decode.strip()
        if not prefill or not decode or "+" in decode:
            raise ConfigError(f"method {name!r} is not allowed: use PREFILL+DECODE, e.g. stem+prhs ({', '.join(DECODE_METHODS)})")
        return prefill, decode
    if name in DECODE_METHODS:
        return "dense", name
    return name, None


def get_method(name: str) -> Method:
    """The Method for a pre-fill name, a variant, a 'PREFILL+DECODE' spec or a bare decode name."""
    if name in METHODS:
        return METHODS[name]
    if is_decode_spec(name):
        return combined_method(name)
    raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}")


# ------------------------------------------------------------------ combined configs

_COMBINED: dict[tuple[str, str], type] = {}


def _field_map(prefill_cls: type, decode_cls: type) -> dict[str, tuple[str, str]]:
    """combined field name -> ('prefill' | 'decode', the field's name there)."""
    out = {f.name: ("prefill", f.name) for f in dataclasses.fields(prefill_cls)}
    for f in dataclasses.fields(decode_cls):
        out[f.name if f.name not in out else f"decode_{f.name}"] = ("decode", f.name)
    return out


def combined_config_class(prefill_name: str, prefill_defaults, decode_name: str, decode_defaults) -> type:
    """A frozen dataclass with both configs' fields; defaults are the two methods' defaults.
    Construction validates through both classes; `.prefill` and `.decode` give them back."""
    key = (prefill_name, decode_name)
    if key in _COMBINED:
        return _COMBINED[key]
    pcls, dcls = type(prefill_defaults), type(decode_defaults)
    mapping = _field_map(pcls, dcls)
    sources = {"prefill": (pcls, prefill_defaults), "decode": (dcls, decode_defaults)}
    spec = []
    for name, (side, inner) in mapping.items():
        f = next(x for x in dataclasses.fields(sources[side][0]) if x.name == inner)
        spec.append((name, f.type, dataclasses.field(default=getattr(sources[side][1], inner), metadata=f.metadata)))

    def parts(self):
        values = {"prefill": {}, "decode": {}}
        for name, (side, inner) in mapping.items():
            values[side][inner] = getattr(self, name)
        return pcls(**values["prefill"]), dcls(**values["decode"])

    def __post_init__(self):
        p, d = parts(self)  # validation by the two classes (ConfigError names the value)
        object.__setattr__(self, "_parts", (p, d))
        for name, (side, inner) in mapping.items():  # normalised values back (sorted layer lists, ...)
            object.__setattr__(self, name, getattr(p if side == "prefill" else d, inner))

    cls = dataclasses.make_dataclass(
        f"{pcls.__name__}With{dcls.__name__}",
        spec,
        frozen=True,
        namespace={
            "__post_init__": __post_init__,
            "prefill": property(lambda self: self._parts[0]),
            "decode": property(lambda self: self._parts[1]),
            "__doc__": f"{prefill_name} pre-fill + {decode_name} decode: the fields of both configs.",
        },
    )
    _COMBINED[key] = cls
    return cls


def combine_configs(prefill_name: str, prefill_config, decode_name: str, decode_config):
    """The 'PREFILL+DECODE' config made of two configs already built (each with its own TOML table
    and overrides), field names as in combined_config_class."""
    p, d = METHODS[prefill_name], DECODE_METHODS[decode_name]
    cls = combined_config_class(p.name, p.defaults, d.name, d.defaults)
    values = {}
    for name, (side, inner) in _field_map(type(prefill_config), type(decode_config)).items():
        values[name] = getattr(prefill_config if side == "prefill" else decode_config, inner)
    return cls(**values)


def combined_method(name: str) -> Method:
    """The Method for a 'PREFILL+DECODE' spec or a bare decode name."""
    prefill_name, decode_name = split_spec(name)
    if prefill_name not in METHODS:
        raise ConfigError(f"unknown pre-fill method {prefill_name!r} in {name!r}; registered methods: {', '.join(METHODS)}")
    if decode_name not in DECODE_METHODS:
        raise ConfigError(f"unknown decode method {decode_name!r} in {name!r}; decode methods: {', '.join(DECODE_METHODS)}")
    p, d = METHODS[prefill_name], DECODE_METHODS[decode_name]
    cls = combined_config_class(p.name, p.defaults, d.name, d.defaults)
    return dataclasses.replace(p, name=name, defaults=cls(), description=f"{p.description}; decode: {d.description}")


def split_method(method: Method, config) -> tuple[Method, Any, DecodeMethod | None, Any]:
    """(pre-fill Method, its config, DecodeMethod or None, its config) of a possibly combined method."""
    prefill_name, decode_name = split_spec(method.name)
    if decode_name is None:
        return method, config, None, None
    prefill = get_method(prefill_name)
    decode = DECODE_METHODS[decode_name]
    if hasattr(config, "prefill") and hasattr(config, "decode"):
        return prefill, config.prefill, decode, config.decode
    if isinstance(config, type(prefill.defaults)):
        return prefill, config, decode, decode.defaults
    raise ConfigError(f"config {type(config).__name__} does not fit method {method.name!r}")


# ------------------------------------------------------------------ lists and configs of a run


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
