"""Accuracy sweep: `stem compare` runs (model x length x budget) in parallel processes on one GPU, then one table.

    python -m tests.bench.accuracy --run gemma3-270m:16k:0.25:20 --run smollm2-135m:8k:0.25:20 --output /tmp/sweep

A benchmark, not part of the package (it only starts `stem compare` and reads what it writes).

Why parallel processes: a 135M-270M model at 4K-32K leaves an H200 mostly idle (the time goes
to Python and kernel launches, most of it in decoding), so several compare runs on one GPU
finish about as fast as one. Each run gets its own --output folder (its own result store, so
nothing is shared between processes) and its own log; a run that fails is reported and the
others go on. Each run is `stem compare METHODS --model M --seq-len N --budget B --limit L
--task ruler --batch-size K`, block 128 unless `--set` says otherwise, with the run's own
extra `--set`s (e.g. block_size=32 for SmolLM2 at 4K, whose 32 blocks of 128 Stem keeps whole).

`--summarize FOLDER...` instead reads the result stores of runs that were stopped before the
end (each result is stored as it is scored) and writes the same compare JSON/MD/PNG over the
samples every method finished: a (task, sample) enters only when all methods have it, so every
delta stays paired and every task average is over the same prompts; the JSON names the tasks
kept and their n.

A run spec is MODEL:LENGTH:BUDGET:LIMIT[:SET[,SET...]]. At the end the verdict rows of every
finished run (average over tasks, n, 95% interval, paired delta vs dense and its interval,
verdict) are printed, and every run's compare JSON/PNG/MD is copied to --collect (if given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = "dense,stem,uniform,uniform-score,stem-tpd,xattention,flexprefill,minference,streaming,elastic"


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise SystemExit(f"--run {spec!r}: use MODEL:LENGTH:BUDGET:LIMIT[:SET,SET...]")
    model, length, budget, limit = parts[:4]
    sets = [s for s in parts[4].split(",") if s] if len(parts) == 5 else []
    name = f"{model}-{length}-bud{round(float(budget) * 100)}" + "".join("-" + "".join(c for c in s if c.isalnum()) for s in sets)
    return {"model": model, "length": length, "budget": float(budget), "limit": int(limit), "sets": sets, "name": name}


def command(run: dict, args) -> list[str]:
    cmd = [sys.executable, "-c", "from stem_cli.cli import main; main()", "compare", *args.methods.split(","), "--model", run["model"], "--seq-len", run["length"],
           "--budget", str(run["budget"]), "--limit", str(run["limit"]), "--task", args.task, "--batch-size", str(args.batch_size),
           "--output", str(Path(args.output) / run["name"]), "--format", "json", "--no-profile"]
    for s in [*args.set, *run["sets"]]:
        cmd += ["--set", s]
    return cmd


def verdict_rows(folder: Path) -> list[dict]:
    found = sorted(folder.glob("compare-*.json"))
    if not found:
        return []
    table = json.loads(found[-1].read_text()).get("table", [])
    return [r for r in table if r.get("average") is not None]


def complete_records(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The records of (task, length, sample) that every method in the store has, and n per kept task."""
    methods = {r["method"] for r in records}
    have: dict[tuple, set] = {}
    for r in records:
        have.setdefault((r["task"], r["seq_len"], str(r["sample"])), set()).add(r["method"])
    full = {k for k, m in have.items() if m == methods}
    kept = [r for r in records if (r["task"], r["seq_len"], str(r["sample"])) in full]
    counts: dict[str, int] = {}
    for task, _, _ in full:
        counts[task] = counts.get(task, 0) + 1
    return kept, dict(sorted(counts.items()))


def summarize_partial(folder: Path, collect: Path | None, margin: float) -> list[dict]:
    """compare rows (and JSON/MD/PNG beside the store, and in `collect`) over the complete samples of a stopped run."""
    from stem_cli.registry import ORDER
    from stem_cli.report.plots import plot_compare
    from stem_cli.report.tables import compare_rows, render
    from stem_cli.runs.runner import averages, summarize

    store = next(folder.glob("results-*.jsonl"))
    records = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    kept, counts = complete_records(records)
    rank = {m: i for i, m in enumerate(ORDER)}
    kept.sort(key=lambda r: rank.get(r["method"], len(rank)))
    rows = summarize(kept)
    flat = compare_rows(rows, averages(rows, kept, margin=margin))
    model = records[0]["model"] if records else "?"
    summary = {"source": str(store), "records": len(records), "complete_records": len(kept), "tasks_kept": counts,
               "note": "a stopped run: only (task, sample)s that every method finished", "rows": rows, "table": flat}
    base = folder / f"partial-{folder.name}"
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    base.with_suffix(".md").write_text(f"{len(kept)} of {len(records)} results (complete samples only); tasks: {counts}\n\n"
                                       + render(flat, "markdown"))
    methods = ", ".join(dict.fromkeys(r["method"] for r in kept))
    plot_compare(flat, base.with_suffix(".png"), f"{Path(model).name} {folder.name}: {methods} (complete samples of a stopped run)")
    if collect:
        collect.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md", ".png"):
            shutil.copy(base.with_suffix(suffix), collect / base.with_suffix(suffix).name)
    return flat


def print_rows(name: str, table: list[dict]) -> None:
    for r in table:
        if r.get("average") is None:
            continue
        ci = f"[{100 * r['ci_low']:.1f},{100 * r['ci_high']:.1f}]" if r.get("ci_low") is not None else "-"
        d = f"{100 * r['delta_vs_dense']:+.1f}" if r.get("delta_vs_dense") is not None else "-"
        dci = f"[{100 * r['delta_ci_low']:+.1f},{100 * r['delta_ci_high']:+.1f}]" if r.get("delta_ci_low") is not None else "-"
        bud = f"{100 * r['bud']:.0f}%" if r.get("bud") is not None else "-"
        print(f"{name:<34} {r['method']:<14} {bud:>5} {r.get('n', '-'):>4} {100 * r['average']:6.1f} {ci:>13} {d:>6} {dci:>15}  "
              f"{r.get('verdict') or ''}")


HEADER = f"\n{'run':<34} {'method':<14} {'BUD':>5} {'n':>4} {'avg':>6} {'95% CI':>13} {'Δ':>6} {'Δ 95% CI':>15}  verdict"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="MODEL:LENGTH:BUDGET:LIMIT[:SET,...] (repeat)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="FOLDER", help="stopped runs' folders: summarise them")
    parser.add_argument("--margin", type=float, default=2.0)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--task", default="ruler")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], help="--set for every run (e.g. elastic.head_map=FILE)")
    parser.add_argument("--output", default="sweep")
    parser.add_argument("--collect", default=None, help="folder to copy every run's compare JSON/PNG/MD into")
    args = parser.parse_args(argv)
    if args.summarize:
        print(HEADER)
        for folder in map(Path, args.summarize):
            print_rows(folder.name, summarize_partial(folder, Path(args.collect) if args.collect else None, args.margin))
        return 0
    if not args.run:
        parser.error("give --run specs (or --summarize FOLDER...)")
    runs = [parse_run(s) for s in args.run]
    Path(args.output).mkdir(parents=True, exist_ok=True)
    started = time.time()
    procs = []
    for run in runs:
        log = open(Path(args.output) / f"{run['name']}.log", "w")
        cmd = command(run, args)
        log.write(" ".join(cmd) + "\n")
        log.flush()
        procs.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"}), log))
        print("started", run["name"], flush=True)
    failed = 0
    for run, proc, log in procs:
        rc = proc.wait()
        log.close()
        run["rc"], run["seconds"] = rc, time.time() - started
        failed += rc != 0
        print(f"{run['name']}: exit {rc} after {run['seconds']:.0f} s", flush=True)
    print(HEADER)
    for run in runs:
        print_rows(run["name"], verdict_rows(Path(args.output) / run["name"]))
        if args.collect:
            Path(args.collect).mkdir(parents=True, exist_ok=True)
            for f in (Path(args.output) / run["name"]).glob("compare-*"):
                shutil.copy(f, Path(args.collect) / f"{run['name']}-{f.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
