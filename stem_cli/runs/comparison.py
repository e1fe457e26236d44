"""Methods side by side on the same tasks, samples and lengths (`stem compare`, `stem_cli.compare`).

Dense is always in the comparison (the baseline of every delta and speed-up). Results are
shared with evaluation's results file and reused across runs: a comparison that adds a
method computes only that method. With `profile`, each job's pre-fill is timed too, and
those timings are stored beside the accuracy results, keyed by the device and the repeat
count as well, so a method already timed on this machine is not timed again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

from stem_cli.runs.evaluation import EvalRun, default_console, fidelity_plot, run_tasks


@dataclasses.dataclass
class Comparison:
    """`rows`: one flat row per (method, length), what every format renders (report.tables.compare_rows)."""

    run: EvalRun  # the accuracy run: per-task rows, averages, the summary JSON's content
    rows: list[dict]
    methods: list[str]
    budget: float | None
    timings: list[dict] | None  # pre-fill timing rows when profiled
    paths: dict[str, Path]  # "results", "json", "md", "csv", "png"

    @property
    def model(self) -> str:
        return self.run.model

    @property
    def summary(self) -> dict:
        return self.run.summary


def compare(model: str | None = None, methods: str | Iterable[str] = "dense,stem", tasks: str | Iterable[str] = ("niah",),
            lengths="4k", *, budget: float | None = None, limit: int = 3, profile: bool | None = None, repeat: int = 3,
            output: str | Path = "runs", cache: bool = True, seed: int = 0, data_dir: str | Path | None = None,
            max_new_tokens: int | None = None, config: str | Path | None = None, overrides: Iterable[str] = (),
            device: str = "auto", dtype: str = "auto", random_weights: bool = False, console=None,
            command: str | None = None, margin: float | None = None, batch_size: int = 1, device_map: str | None = None, tp: int = 1) -> Comparison:
    """Accuracy (and, with `profile`, pre-fill time) of each method against dense; writes OUTPUT/compare-MODEL-TIME
    .json/.md/.csv/.png and returns their rows.

    `budget`: solve each method's knob so its BUD is this fraction (equal-budget comparison); without it, published
    defaults. `profile`: time each job's pre-fill (default: on a GPU only). `cache=False` recomputes stored results."""
    from stem_cli.registry import parse_method_list
    from stem_cli.report.plots import plot_compare
    from stem_cli.report.tables import compare_rows, render
    from stem_cli.environment import slug

    console = console or default_console()
    names = parse_method_list([methods] if isinstance(methods, str) else list(methods))
    if "dense" not in names:
        console.print("[dim]dense added as the baseline of the comparison[/]")
        names = ["dense", *names]
    run = run_tasks(model=model, tasks=tasks, methods=names, lengths=lengths, limit=limit, budget=budget, output=output, resume=True,
                    reuse_any=cache, seed=seed, data_dir=data_dir, config=config, overrides=overrides, device=device, dtype=dtype,
                    random_weights=random_weights, max_new_tokens=max_new_tokens, chat_template=None, kind="compare",
                    console=console, command=command, margin=margin, recompute=not cache, batch_size=batch_size, device_map=device_map, tp=tp)
    if not run.primary:  # a rank other than 0: rank 0 writes and reports the whole comparison
        return Comparison(run, [], names, budget, None, {})
    summary = run.summary
    on_gpu = next(run.loaded.model.parameters()).is_cuda
    timings = None
    timed = profile if profile is not None else on_gpu
    if timed and tp > 1:
        console.print("[yellow]notice:[/] pre-fill timing under --tp is not supported yet (rank 0 would run a forward alone); not profiling")
        timed = False
    if timed:
        timings = time_jobs(run, repeat, reuse=cache, console=console)
        summary["profile"] = timings
    flat = compare_rows(run.rows, run.averages, timings)
    summary["table"] = flat
    base = Path(output) / f"compare-{slug(run.model)}-{run.stamp:%Y%m%d-%H%M%S}"
    paths = {"results": run.store.path, **{suffix: base.with_suffix(f".{suffix}") for suffix in ("json", "md", "csv", "png")}}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str))
    paths["md"].write_text(f"`{summary['command']}`\n\n" + render(flat, "markdown"))
    paths["csv"].write_text(render(flat, "csv"))
    paths.update(fidelity_plot(run, base))
    plot_compare(flat, paths["png"], f"{run.model}: " + ", ".join(names) + (f" at BUD {budget:.0%}" if budget else ""))
    run.paths.update(paths)
    return Comparison(run, flat, names, budget, timings, paths)


def time_jobs(run: EvalRun, repeat: int, reuse: bool, console) -> list[dict]:
    """Pre-fill timings of the compared jobs (each length's configs as solved); dense is the speed-up baseline."""
    from stem_cli.environment import environment
    from stem_cli.runs.prefill_profile import profile_prefill
    from stem_cli.runs.store import config_dict, record_key

    device = next(run.loaded.model.parameters()).device
    if device.type != "cuda":
        console.print("[yellow]notice:[/] profiling on the CPU: PyTorch reference executor timings, not GPU kernel speed")
    where = environment(device, None).get("gpu", "cpu")
    settings = run.summary
    rows = []
    with console.status("profiling") as status:
        for n in settings["settings"]["lengths"]:
            jobs = [j for j in run.jobs if j.seq_len == n]
            keys = {j.method: record_key(model=settings["key_components"]["weights"], dtype=settings["dtype"], method=j.method, config=config_dict(j.config),
                                         task="profile", seq_len=n, seed=0, sample=f"{where}|repeat={repeat}") for j in jobs}
            todo = [j for j in jobs if not (reuse and keys[j.method] in run.store)]
            fresh = profile_prefill(run.loaded.model, [j.method for j in todo], {j.method: j.config for j in todo}, [n],
                                    warmup=1, repeat=repeat, progress=lambda what: status.update(f"profiling {what}")) if todo else []
            for row in fresh:
                run.store.add({"key": keys[row["method"]], "task": "profile", "device": where, **row})
            at_length = [run.store.get(keys[j.method]) for j in jobs]
            dense = next((r for r in at_length if r["method"] == "dense" and r.get("status") == "ok"), None)
            for r in at_length:  # speed-up from this set of rows, cached or fresh
                r["speedup"] = dense["e2e_ms"] / r["e2e_ms"] if dense and r.get("status") == "ok" else None
            rows += at_length
    return rows
