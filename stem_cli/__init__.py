"""stem: Stem sparse pre-fill attention for Hugging Face causal LMs.

    import stem_cli
    runtime = stem_cli.apply(model, "uniform", k_scale=0.5)     # any registry method, any config
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="stem")   # after stem_cli.register()
    result = stem_cli.compare("smollm2-135m", ["stem"], tasks=["niah"], lengths="4k")   # stem_cli.runs: every command

`import stem_cli` is cheap: torch, transformers and the methods load on first use of a
name below, and the attention names are registered with transformers by `register()`
(which `apply` calls).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "apply": "stem_cli.integration",
    "register": "stem_cli.hook",
    "Runtime": "stem_cli.integration",
    "evaluate": "stem_cli.runs",
    "compare": "stem_cli.runs",
    "profile": "stem_cli.runs",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stem_cli' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
