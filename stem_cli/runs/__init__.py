"""The Python API for runs: what every `stem` command does, as plain functions.

    import stem_cli
    result = stem_cli.compare("smollm2-135m", ["stem", "uniform"], tasks=["niah"], lengths="4k", budget=0.3)
    for row in result.rows: print(row["method"], row["seq_len"], row["average"], row["bud"])

- `evaluate(model, tasks, methods, lengths, ...)` -> EvalRun (rows, averages, summary, paths)
- `compare(model, methods, tasks, lengths, budget=..., ...)` -> Comparison (the flat rows `stem compare` renders)
- `profile(model, methods, lengths, ...)`, `profile_decode(...)` -> the result JSON's content
- `generate(model, methods, needle=... | prompt=...)` -> Answers; `calibrate(...)`, `train_router(...)` (Elastic Attention)

Bad input raises `stem_cli.errors.UsageError`. Messages, spinners and progress go to `console`
(a rich Console; stderr by default). Results go to files exactly as the CLI writes them.
Modules: plan (checks, jobs, probe prompts), task_names, keys (what results are keyed by), store
(keyed JSONL), runner (Runner, summaries), budget (equal-budget solver), knobs (solved knobs,
stored), evaluation, comparison, profiling, prefill_profile,
decode_profile, answer, elastic. Importing this package is cheap: each name loads on first use.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it (imported on first access)
_LAZY = {
    "evaluate": "stem_cli.runs.evaluation",
    "EvalRun": "stem_cli.runs.evaluation",
    "Interrupted": "stem_cli.runs.evaluation",
    "compare": "stem_cli.runs.comparison",
    "Comparison": "stem_cli.runs.comparison",
    "profile": "stem_cli.runs.profiling",
    "profile_decode": "stem_cli.runs.profiling",
    "generate": "stem_cli.runs.answer",
    "Answers": "stem_cli.runs.answer",
    "calibrate": "stem_cli.runs.elastic",
    "train_router": "stem_cli.runs.elastic",
    "elastic_omega": "stem_cli.runs.elastic",
    "UsageError": "stem_cli.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stem_cli.runs' has no attribute {name!r}")


__all__ = list(_LAZY)
