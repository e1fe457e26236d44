"""Decode-time methods: registry, "PREFILL+DECODE" specs, and attaching a decode runtime.

A decode method acts at each decode step (one query against a KV cache of T
tokens), per layer and (sequence, KV head): it attends only to a selected set of
cached positions (sinks + recent window + salient set) and reports the dropped
softmax mass delta. Methods:

    prhs         PrHS (pre-hoc selection: index sharing, progressive window, early-token freezing)
    topk-decode  exact top-k every step (the oracle PrHS approximates)
    quest        Quest (page-level top-k by a min/max upper bound)

Method specs combine a pre-fill method with a decode method: "stem+prhs",
"dense+topk-decode"; a bare decode name ("prhs") means dense pre-fill + that
decode. A combined method's config has the fields of both configs (a decode
field whose name a pre-fill field already uses is renamed decode_<name>), so
--set, TOML tables named after the spec and apply(**params) all work as for any
method:

    runtime = stem_cli.apply(model, "stem", decode="prhs", budget=512)   # or apply(model, "stem+prhs", ...)
    model.generate(...); print(runtime.decode.stats())
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stem_cli.config import ConfigError
from stem_cli.decode import prhs, quest, topk
from stem_cli.decode.runtime import DecodeMethod, DecodeRuntime


def _method(name, module) -> DecodeMethod:
    return DecodeMethod(name, module.select, module.DEFAULTS, module.DESCRIPTION)


DECODE_METHODS: dict[str, DecodeMethod] = {
    m.name: m for m in (_method("prhs", prhs), _method("topk-decode", topk), _method("quest", quest))
}


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


# ------------------------------------------------------------------ combined configs

_CLASSES: dict[tuple[str, str], type] = {}


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
    if key in _CLASSES:
        return _CLASSES[key]
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
    _CLASSES[key] = cls
    return cls


def combined_method(name: str):
    """The Method (stem_cli.methods.Method) for a 'PREFILL+DECODE' spec or a bare decode name."""
    from stem_cli.methods import METHODS

    prefill_name, decode_name = split_spec(name)
    if prefill_name not in METHODS:
        raise ConfigError(f"unknown pre-fill method {prefill_name!r} in {name!r}; registered methods: {', '.join(METHODS)}")
    if decode_name not in DECODE_METHODS:
        raise ConfigError(f"unknown decode method {decode_name!r} in {name!r}; decode methods: {', '.join(DECODE_METHODS)}")
    p, d = METHODS[prefill_name], DECODE_METHODS[decode_name]
    cls = combined_config_class(p.name, p.defaults, d.name, d.defaults)
    return dataclasses.replace(p, name=name, defaults=cls(), description=f"{p.description}; decode: {d.description}")


def attach(method, config, model) -> tuple[Any, Any, DecodeRuntime | None]:
    """For apply(): (pre-fill Method, pre-fill config, DecodeRuntime or None) from a possibly combined method."""
    from stem_cli.methods import get_method

    prefill_name, decode_name = split_spec(method.name)
    if decode_name is None:
        return method, config, None
    prefill = get_method(prefill_name)
    if hasattr(config, "prefill") and hasattr(config, "decode"):
        prefill_cfg, decode_cfg = config.prefill, config.decode
    elif isinstance(config, type(prefill.defaults)):
        prefill_cfg, decode_cfg = config, DECODE_METHODS[decode_name].defaults
    else:
        raise ConfigError(f"config {type(config).__name__} does not fit method {method.name!r}")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    return prefill, prefill_cfg, DecodeRuntime(DECODE_METHODS[decode_name], decode_cfg, num_layers)


__all__ = [
    "DECODE_METHODS", "DecodeMethod", "DecodeRuntime", "attach", "combined_method", "get_decode_method",
    "is_decode_spec", "split_spec",
]
