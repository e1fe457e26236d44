"""Long-context accuracy per task, length and method (`stem eval`, `stem_cli.evaluate`).

`run_tasks` is what evaluation and comparison share: load the model, check the plan,
solve budgets (or take stored ones), run every (job, task, sample) with progress bars,
summarise; the summary records every component results are keyed by. `evaluate`
adds the summary JSON beside the results file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from stem_cli.errors import UsageError
from stem_cli.runs.defaults import EVAL_CPU_MODEL, EVAL_GPU_MODEL

# 2: rows carry n and 95% intervals (ci_low, ci_high), averages the paired delta's interval and a verdict.
SCHEMA_VERSION = 2
STATISTICS = ("95% intervals: Wilson for pass/fail cells, a seeded percentile bootstrap (with two pseudo-values at the ends "
              "of the range) where every task has >= 20 samples, else a bounded-variable Wilson bound; deltas paired on "
              "the same samples, averages weight tasks equally (stem_cli/report/stats.py)")


class Interrupted(KeyboardInterrupt):
    """The user stopped a run; the `computed` new results are in the results file at `path`."""

    def __init__(self, computed: int, path: Path):
        super().__init__(f"{computed} new result(s) are saved in {path}")
        self.computed, self.path = computed, path


@dataclasses.dataclass
class EvalRun:
    """A finished run: the rows a report renders, their per-(method, length) averages, and the summary JSON's content."""

    loaded: Any  # models.Loaded: the model the run used, still patched with the last method
    model: str
    rows: list[dict]
    averages: dict
    summary: dict
    stamp: datetime.datetime
    jobs: list
    store: Any  # store.ResultStore
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)  # what was written: "results", "summary", ...
    primary: bool = True  # False on ranks other than 0 of a multi-process run: no rows, nothing written or printed
    records: list = dataclasses.field(default_factory=list)  # the run's per-sample results (paired deltas against any method)


def default_console():
    from rich.console import Console

    return Console(stderr=True)


def command_line() -> str:
    """The command as a user typed it, for the record."""
    return " ".join(["stem", *sys.argv[1:]])


@contextmanager
def progress_bars(console):
    """A `progress(what, done, total)` callback drawing one bar per (task, length) on `console`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as progress:
        def update(what: str, done: int, total: int) -> None:
            if what not in bars:
                bars[what] = progress.add_task(what, total=total)
            progress.update(bars[what], completed=done, total=total)

        yield update


def run_tasks(*, model: str | None, tasks: str | Iterable[str], methods: str | Iterable[str], lengths, limit: int,
              budget: float | None, output: str | Path, resume: bool, reuse_any: bool, seed: int, data_dir: str | Path | None,
              config, overrides: Iterable[str], device: str, dtype: str, random_weights: bool, max_new_tokens: int | None,
              chat_template: bool | None, kind: str, include_path: str | Path | None = None, console=None,
              command: str | None = None, margin: float | None = None, recompute: bool = False, batch_size: int = 1,
              device_map: str | None = None, tp: int = 1) -> EvalRun:
    """Load, plan, solve budgets, run with progress, summarise. `reuse_any`: take any stored result (compare's cache);
    else stored results of this run are an error unless `resume`. `recompute`: compute every result and solve every knob
    again even when stored (compare's --no-cache). Under a launcher (torchrun, accelerate) each process is a rank:
    samples split across ranks, or with `tp` > 1 the heads (stem_cli/runs/distributed.py); rank 0 returns the run."""
    from stem_cli.runs import distributed

    world = distributed.world_from_env(tp=tp)
    try:
        return _run_tasks(world, model=model, tasks=tasks, methods=methods, lengths=lengths, limit=limit, budget=budget,
                          output=output, resume=resume, reuse_any=reuse_any, seed=seed, data_dir=data_dir, config=config,
                          overrides=overrides, device=device, dtype=dtype, random_weights=random_weights,
                          max_new_tokens=max_new_tokens, chat_template=chat_template, kind=kind, include_path=include_path,
                          console=console, command=command, margin=margin, recompute=recompute, batch_size=batch_size,
                          device_map=device_map)
    except UsageError:
        if world.primary:
            raise
        raise distributed.FollowerExit(2) from None  # every rank checks the same input; rank 0 says what is wrong


def _run_tasks(world, *, model, tasks, methods, lengths, limit, budget, output, resume, reuse_any, seed, data_dir, config,
               overrides, device, dtype, random_weights, max_new_tokens, chat_template, kind, include_path, console, command,
               margin, recompute, batch_size, device_map) -> EvalRun:
    from rich.console import Console
    from rich.markup import escape

    from stem_cli.models import check_model_name, load_model, resolve_device
    from stem_cli.runs import distributed, plan
    from stem_cli.runs.knobs import Knobs
    from stem_cli.environment import environment, provenance, slug
    from stem_cli.runs.runner import EvalSettings, Runner, averages, summarize
    from stem_cli.runs.store import ResultStore, config_dict
    from stem_cli.runs.task_names import check_lm_eval_tasks, resolve_tasks

    console = console or default_console()
    if not world.primary:  # other ranks print nothing but their progress lines
        console = Console(stderr=True, quiet=True)
    names, configs = plan.methods_and_configs(methods, config, overrides)
    plan.check_budget(budget)
    output = plan.output_folder(output)
    data_dir = Path(data_dir) if data_dir is not None else None
    include_path = Path(include_path) if include_path is not None else None
    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {str(include_path)!r} is not a folder of lm-eval task YAML files")
    dev = resolve_device(device)
    if device_map is not None and world.parallel:
        raise UsageError(f"--device-map {device_map} places one model over all GPUs; with {world.size} processes each would do so: "
                         "use one process, or --tp, or data parallelism without --device-map")
    dev = distributed.start(world, dev)  # joins the process group: a tensor-parallel load needs it
    model = model or (EVAL_GPU_MODEL if dev.type == "cuda" else EVAL_CPU_MODEL)
    lengths = plan.parse_lengths(lengths)
    refs = resolve_tasks([tasks] if isinstance(tasks, str) else list(tasks), data_dir)
    check_model_name(model, random_weights)  # every name checked before anything loads: a typo costs no model load
    check_lm_eval_tasks(refs, include_path, console)
    loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=random_weights, console=console, device_map=device_map,
                        tp=world.tp)
    plan.check_context(loaded.model, lengths)
    model_dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    plan.check_batch_size(batch_size, names, refs, console)
    settings = EvalSettings(loaded.source, model_dtype, seed, limit, chat_template, data_dir, max_new_tokens, include_path, batch_size)
    store_path = output / f"results-{slug(model)}.jsonl"
    if world.primary:  # results of an earlier multi-process run, whatever its process count, join the store first
        folded = distributed.fold_shards(ResultStore(store_path))
        if folded:
            console.print(f"[dim]{folded} result(s) from the rank shards of an earlier run folded into {escape(str(store_path))}[/]")
    distributed.gather(world, None)  # every rank reads the store after the fold
    store = ResultStore(store_path, append_to=distributed.shard_path(store_path, world) if world.parallel else None)
    runner = Runner(loaded, store, settings, reuse=not recompute)
    knobs = Knobs(output / f"budgets-{slug(model)}.jsonl", runner.identity["weights"], model_dtype, reuse=not recompute)
    try:  # budgets are solved once, on rank 0, and the jobs given to every rank
        jobs = distributed.from_primary(world, lambda: plan.jobs(loaded.model, runner, names, configs, lengths, refs, budget, console,
                                                                 knobs))
    except KeyboardInterrupt:
        if budget is not None:  # each knob was stored as it was solved
            console.print(f"[yellow]interrupted while solving budgets:[/] {knobs.solved} newly solved knob(s) are saved in "
                          f"{escape(str(knobs.path))}; the same command reuses them")
        raise Interrupted(0, store.path) from None
    census = runner.census(jobs, refs)
    if not (resume or reuse_any) and census["stored"]:
        raise UsageError(f"{census['stored']} results of this run are already in {store.path}: pass --resume to continue from them, "
                         "or --output DIR for a fresh run")
    if census["older"]:
        console.print(f"[yellow]notice:[/] {census['older']} stored result(s) of this run were made by an older task generator "
                      "(or stored before results were keyed by it): recomputing them")
    console.print(f"[dim]{escape(loaded.source)} ({model_dtype}) on {dev}; {len(refs)} task(s) x {len(lengths)} length(s) x "
                  f"{len(names)} method(s), up to {limit} sample(s) each; results -> {escape(str(store.path))}[/]")
    console.print(f"[dim]{plan.plan_line(jobs, refs, limit)}[/]")
    planned, per_rank = plan.planned_generations(jobs, refs, limit), None
    if world.data_parallel:
        runner.mine, per_rank = distributed.assign(runner, jobs, refs, world)
        planned = per_rank[world.rank]
        console.print(f"[dim]{world.size} processes: new results per rank {', '.join(map(str, per_rank.values()))} (split by prompt "
                      f"length); each rank writes {escape(str(distributed.shard_path(store_path, world).name).replace('rank0', 'rankR'))}[/]")
        notice = distributed.lm_eval_notice(refs, world)
        if notice:
            console.print(f"[yellow]{escape(notice)}[/]")
    elif world.parallel:
        console.print(f"[dim]tensor parallel over {world.size} processes: each runs every sample on its shard of the heads[/]")
    try:
        with progress_bars(console) as progress:
            shown = distributed.rank_progress(world, runner, progress) if world.parallel else progress
            runner.progress = plan.Estimate(shown, runner, planned, len(names), console)
            total = distributed.TotalBar(progress, [distributed.shard_path(store_path, distributed.World(r, world.size))
                                                    for r in range(world.size)], sum(per_rank.values())) \
                if per_rank is not None and world.primary else contextlib.nullcontext()
            with total:
                records = runner.run(jobs, refs)
                counts = distributed.gather(world, {"computed": runner.computed, "older": runner.older})  # waits for every rank
    except KeyboardInterrupt:
        raise Interrupted(runner.computed, store.append_to) from None
    except distributed.FollowerExit:
        raise
    except Exception as e:
        if world.parallel:
            raise distributed.RankFailed(world, runner.computed, store.append_to, e) from e
        raise
    if world.parallel:
        if not world.primary:
            return EvalRun(loaded, model, [], {}, {}, datetime.datetime.now(datetime.timezone.utc), jobs, store, primary=False)
        store = ResultStore(store_path)
        distributed.fold_shards(store)
        runner.store, runner.mine, runner.reuse = store, (lambda ref, seq_len, sample: True), True
        runner.progress, runner.computed, runner.reused = (lambda what, done, total: None), 0, 0
        records = runner.run(jobs, refs)  # every result of the run, read back from the merged store in one process's order
        if runner.computed:
            raise RuntimeError(f"{runner.computed} result(s) were missing from the merged store {store_path} (a bug)")
        runner.computed = sum(c["computed"] for c in counts)
        runner.reused -= runner.computed
        runner.older = sum(c["older"] for c in counts)
    rows = summarize(records)
    plan.full_budget_notice(rows, console)
    avg = averages(rows, records, margin=margin)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    summary = {
        "schema_version": SCHEMA_VERSION,
        **provenance(),
        "command": command or command_line(),
        "timestamp": stamp.isoformat(),
        "kind": kind,
        "model": model,
        "model_source": loaded.source,
        "dtype": model_dtype,
        "environment": environment(dev, None),
        "settings": {"tasks": [r.name for r in refs], "lengths": lengths, "limit": limit, "seed": seed, "budget": budget,
                     "max_new_tokens": max_new_tokens, "margin": margin, "batch_size": batch_size},
        "statistics": STATISTICS,
        "jobs": [{"method": j.method, "seq_len": j.seq_len, "config": dataclasses.asdict(j.config), "knob": j.knob} for j in jobs],
        "key_components": {  # what every result of this run is keyed by; per-sample ones are in each record's key_parts
            "weights": runner.identity["weights"], "weights_how": runner.identity["how"], "dtype": model_dtype,
            "chat_template": chat_template, "max_new_tokens": max_new_tokens,
            "tasks": {r.name: runner.task_components(r) for r in refs},
            "jobs": [{"method": j.method, "seq_len": j.seq_len, "config": config_dict(j.config)} for j in jobs],
            "per_sample": ["sample", "prompt", "max_new_tokens (generation tasks: the task's own unless overridden)"],
        },
        "results_file": str(store.path),
        "computed": runner.computed,
        "reused": runner.reused,
        "older_recomputed": runner.older,
        "processes": world.size,
        "tensor_parallel": world.tp,
        "budgets_file": str(knobs.path) if budget is not None else None,
        "knobs_solved": knobs.solved,
        "knobs_reused": knobs.reused,
        "rows": rows,
        "averages": [{"method": m, "seq_len": n, **v} for (m, n), v in avg.items()],
    }
    return EvalRun(loaded, model, rows, avg, summary, stamp, jobs, store, {"results": store.path}, records=records)


def evaluate(model: str | None = None, tasks: str | Iterable[str] = ("ruler",), methods: str | Iterable[str] = "dense,stem",
             lengths="4k", *, limit: int = 5, budget: float | None = None, output: str | Path = "runs", resume: bool = False,
             seed: int = 0, data_dir: str | Path | None = None, include_path: str | Path | None = None,
             max_new_tokens: int | None = None, chat_template: bool | None = None, config: str | Path | None = None,
             overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto", random_weights: bool = False,
             console=None, command: str | None = None, margin: float | None = None, batch_size: int = 1, device_map: str | None = None,
             tp: int = 1) -> EvalRun:
    """Accuracy of each method on each task and length; results appended to OUTPUT/results-MODEL.jsonl as they are
    scored, the summary written to OUTPUT/eval-MODEL-TIME.json (`run.paths["summary"]`), the table beside it as .md
    and .csv (`run.paths["md"]`, `run.paths["csv"]`: compare's per-(method, length) rows).

    `overrides`: NAME=VALUE or METHOD.NAME=VALUE (as --set); `budget`: solve each method's knob to this BUD first.
    Raises UsageError for bad input (names, lengths, results of this run already stored without `resume`)."""
    from stem_cli.environment import slug

    run = run_tasks(model=model, tasks=tasks, methods=methods, lengths=lengths, limit=limit, budget=budget, output=output,
                    resume=resume, reuse_any=False, seed=seed, data_dir=data_dir, config=config, overrides=overrides, device=device,
                    dtype=dtype, random_weights=random_weights, max_new_tokens=max_new_tokens, chat_template=chat_template,
                    kind="eval", include_path=include_path, console=console, command=command, margin=margin,
                    batch_size=batch_size, device_map=device_map, tp=tp)
    if not run.primary:  # a rank other than 0: rank 0 writes and reports the whole run
        return run
    path = Path(output) / f"eval-{slug(run.model)}-{run.stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(run.summary, indent=2, default=str))
    run.paths["summary"] = path
    run.paths.update(write_tables(run, path.with_suffix("")))
    return run


def write_tables(run: EvalRun, base: Path) -> dict[str, Path]:
    """BASE.md and BASE.csv: one row per (method, length) with every task, as `stem compare` writes them."""
    from stem_cli.report.tables import compare_rows, render

    flat = compare_rows(run.rows, run.averages)
    paths = {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv")}
    paths["md"].write_text(f"`{run.summary['command']}`\n\n" + render(flat, "markdown"))
    paths["csv"].write_text(render(flat, "csv"))
    paths.update(fidelity_plot(run, base))
    return paths


def fidelity_plot(run: EvalRun, base: Path) -> dict[str, Path]:
    """BASE-fidelity.png when the run measured fidelity: error and dropped mass by query position."""
    rows = [r for r in run.rows if r["task"] == "fidelity" and r.get("position_rel_error")]
    if not rows:
        return {}
    from stem_cli.report.plots import plot_fidelity_positions

    path = base.with_name(base.name + "-fidelity.png")
    return {"fidelity_png": plot_fidelity_positions(rows, path, f"{run.model}: attention fidelity by query position")}
