"""Task names, as `--task` and `tasks=` accept them, resolved to what the runner runs.

- `ruler` (every built-in RULER task), `niah` (its eight needle tasks), `ruler/NAME` (one task);
- `longbench` (every LongBench subset), `longbench/NAME`: from `--data-dir` JSONL files, or
  through lm-eval's longbench tasks when their data is reachable;
- `fidelity`, `ppl`: measurements against dense attention (output error, perplexity);
- anything else goes to lm-eval (`simple_evaluate` over the already patched model).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from stem_cli.tasks.harness import TaskError  # one error type for every task source: unknown name, data unreachable, lm-eval failure

BUILT_IN = ("ruler", "niah", "longbench", "fidelity", "ppl")


@dataclass(frozen=True)
class TaskRef:
    name: str  # shown and stored: "ruler/vt", "longbench/hotpotqa", "fidelity", "lm-eval/gsm8k"
    kind: str  # "generate" | "measure" | "lm-eval"
    sub: str  # the name inside its source: "vt", "hotpotqa", "fidelity", "gsm8k"


def resolve_tasks(items: Iterable[str], data_dir: Path | None = None) -> list[TaskRef]:
    """'ruler,ppl' -> TaskRefs, expanded and checked, order kept, no repeats."""
    from stem_cli.tasks import ruler

    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise TaskError(f"no task given; built-in tasks: {', '.join(BUILT_IN)}, ruler/NAME, longbench/NAME; other names go to lm-eval")
    refs: list[TaskRef] = []
    for name in names:
        if name in ruler.GROUPS:
            refs += [TaskRef(f"ruler/{t}", "generate", t) for t in ruler.GROUPS[name]]
        elif name.startswith("ruler/"):
            sub = name.removeprefix("ruler/")
            if sub not in ruler.TASKS:
                raise TaskError(f"unknown RULER task {sub!r}; built-in RULER tasks: {', '.join(ruler.TASKS)}")
            refs.append(TaskRef(name, "generate", sub))
        elif name == "longbench" or name.startswith("longbench/"):
            refs += _longbench_refs(name, data_dir)
        elif name in ("fidelity", "ppl"):
            refs.append(TaskRef(name, "measure", name))
        else:
            refs.append(TaskRef(f"lm-eval/{name.removeprefix('lm-eval/')}", "lm-eval", name.removeprefix("lm-eval/")))
    return list(dict.fromkeys(refs))


def _longbench_refs(name: str, data_dir: Path | None) -> list[TaskRef]:
    from stem_cli.tasks import longbench

    subsets = list(longbench.SUBSETS) if name == "longbench" else [name.removeprefix("longbench/")]
    for sub in subsets:
        if sub not in longbench.ALL_SUBSETS:
            raise TaskError(f"unknown LongBench subset {sub!r}; subsets: {', '.join(longbench.ALL_SUBSETS)}")
    how = longbench.resolve(data_dir)
    if how == "local":
        if name == "longbench":  # the whole benchmark: the subsets whose files are there
            subsets = [s for s in subsets if (Path(data_dir) / f"{s}.jsonl").is_file()]
        return [TaskRef(f"longbench/{s}", "generate", s) for s in subsets]
    # lm-eval names the group "longbench" and its tasks "longbench_<subset>".
    sub = "longbench" if name == "longbench" else f"longbench_{subsets[0]}"
    return [TaskRef(f"lm-eval/{sub}", "lm-eval", sub)]


def measure_module(ref: TaskRef):
    return importlib.import_module(f"stem_cli.tasks.{ref.sub}")
