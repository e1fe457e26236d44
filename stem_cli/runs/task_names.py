"""Task names, as `--task` and `tasks=` accept them, resolved to what the runner runs.

- `ruler` (every built-in RULER task), `niah` (its eight needle tasks), `ruler/NAME` (one task);
- `longbench` (every LongBench subset), `longbench/NAME`: from `--data-dir` JSONL files, or
  through lm-eval's longbench tasks when their data is reachable;
- `fidelity`, `ppl`: measurements against dense attention (output error, perplexity);
- anything else goes to lm-eval (`simple_evaluate` over the already patched model).

Names are checked before any model loads: built-in names exactly, other names against
lm-eval's task index (`check_lm_eval_tasks`); an unknown name is refused with the closest
known names.
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
                raise TaskError(f"unknown RULER task {sub!r}{did_you_mean(name, built_in_names())}; "
                                f"built-in RULER tasks: {', '.join(ruler.TASKS)}")
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
            raise TaskError(f"unknown LongBench subset {sub!r}{did_you_mean(name, built_in_names())}; "
                            f"subsets: {', '.join(longbench.ALL_SUBSETS)}")
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


def built_in_names() -> list[str]:
    """Every task name `--task` takes without lm-eval: groups, ruler/NAME, longbench/NAME, the measures."""
    from stem_cli.tasks import longbench, ruler

    return [*BUILT_IN, *(f"ruler/{t}" for t in ruler.TASKS), *(f"longbench/{s}" for s in longbench.ALL_SUBSETS)]


def close_names(name: str, known: Iterable[str], most: int = 3) -> list[str]:
    """The known names nearest to a mistyped one; a name is also matched by its part after '/' ('vt' -> 'ruler/vt')."""
    from rapidfuzz import fuzz

    scored = {}
    for k in known:
        score = max(fuzz.ratio(name, k), fuzz.ratio(name, k.rsplit("/", 1)[-1]))
        if score >= 70:
            scored[k] = score
    return sorted(scored, key=lambda k: -scored[k])[:most]


def did_you_mean(name: str, known: Iterable[str]) -> str:
    near = close_names(name, known)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def check_lm_eval_tasks(refs: list[TaskRef], include_path: Path | None = None, console=None) -> None:
    """Refuse, before any model loads, a task name that is neither built in nor known to lm-eval.

    Only names that are not built in are looked up, in lm-eval's task index (tasks, groups and
    tags, with `include_path`'s YAML files); indexing takes seconds to tens of seconds, and the
    run that follows reuses the index. LongBench's names were checked when resolved."""
    from stem_cli.tasks import harness

    asked = [r.sub for r in refs if r.kind == "lm-eval" and not r.sub.startswith("longbench")]
    if not asked:
        return
    built = built_in_names()
    try:
        if console is not None:
            with console.status(f"looking up {', '.join(asked)} in lm-eval's task index (once per run; can take a while)"):
                manager = harness.task_manager(include_path)
        else:
            manager = harness.task_manager(include_path)
    except TaskError as e:  # lm-eval missing or broken: the name can only be a typo of a built-in one, or need lm-eval
        name = asked[0]
        raise TaskError(f"unknown task {name!r}{did_you_mean(name, built)}: not a built-in task ({', '.join(BUILT_IN)}, "
                        f"ruler/NAME, longbench/NAME; `stem tasks` lists them), and other names are lm-eval tasks, "
                        f"but {e}") from None
    known = set(manager.all_tasks)
    for name in asked:
        if name not in known:
            raise TaskError(f"unknown task {name!r}{did_you_mean(name, [*built, *known])}: neither built in (`stem tasks` "
                            f"lists those) nor an lm-eval task, group or tag" +
                            (f" (lm-eval's own tasks and {include_path})" if include_path else ""))


def task_list() -> dict:
    """What `stem tasks` shows: every built-in task with its answer length and metric, and whether lm-eval is there."""
    from stem_cli.tasks import fidelity, harness, longbench, ppl, ruler

    rows = []
    for t in ruler.TASKS:
        group = "niah" if t in ruler.GROUPS["niah"] else None
        rows.append({"task": f"ruler/{t}", "groups": ["ruler", *([group] if group else [])], "source": "RULER, generated offline",
                     "answer_tokens": ruler.MAX_NEW_TOKENS[t.split("_")[0]], "metric": ruler.METRIC,
                     "lengths": "any --seq-len the task's fixed text fits in (built to fit the model's tokenizer)"})
    for name, sub in longbench.ALL_SUBSETS.items():
        rows.append({"task": f"longbench/{name}", "groups": ["longbench"] if name in longbench.SUBSETS else [],
                     "source": "LongBench v1: --data-dir JSONL files, else lm-eval", "answer_tokens": sub.max_new_tokens,
                     "metric": sub.metric, "lengths": "records longer than --seq-len lose their middle"})
    for module in (fidelity, ppl):
        rows.append({"task": module.TASK, "groups": [], "source": "measure against dense (no generation)", "answer_tokens": None,
                     "metric": {"fidelity": "rel_error", "ppl": "ppl"}[module.TASK] + " (lower is better)",
                     "lengths": "any --seq-len", "what": module.DESCRIPTION})
    version = harness.lm_eval_version()
    return {"tasks": rows, "groups": {"ruler": list(ruler.TASKS), "niah": list(ruler.GROUPS["niah"]),
                                      "longbench": list(longbench.SUBSETS)},
            "lm_eval": {"installed": version is not None, "version": version,
                        "how": "any other --task name is an lm-eval task (`lm-eval ls tasks` lists them)" if version
                        else f"not installed: {harness.INSTALL_HINT} for lm-eval task names"}}
