"""The router bench's comparison stage (tests/bench/router.py, stage 3): does the router beat the calibrated map and
uniform Stem at equal cost?

Four methods on held-out RULER prompts (sample seed = training seed + stem_cli.runs.elastic.HELD_OUT_SEED) at the
training lengths, through `stem_cli.compare` itself (its result store, budget solver, intervals and paired deltas),
so nothing here scores, solves or resamples on its own:

- dense, stem, elastic (the head map calibrated at the router's own final Omega) and elastic-router;
- (a) matched Omega: every method at its published knobs; elastic and elastic-router have (about) the same fraction
  of heads not dense, so the question is only *which* heads: a fixed set, or one chosen per input;
- (b) matched BUD, one run per length: stem, elastic and the router solved to the BUD the router's run (a) reached at
  that length (stem_cli/runs/budget.py: each method's own knob). A method whose knob cannot reach that BUD (the map's
  dense heads set a floor) is dropped from (b) with the solver's message, never silently.

Every delta is paired over the same samples (stem_cli.runs.runner.averages with the other method as its baseline):
the router minus each other method, with its 95% interval, the keeps / loses verdict at the margin and the head-to-head
verdict (stem_cli.report.stats.head_to_head: better / worse / inconclusive). A few samples per task cannot carry a
verdict; the intervals say so ("inconclusive (n too small)").

Files: OUTPUT/compare/compare-NAME-matched-omega.{json,md,csv,png}, ...-matched-bud-LENGTH.{...} (compare's own
formats) and OUTPUT/compare/router-compare-NAME.json (both runs' rows and the router's deltas); the result store and
solved knobs in OUTPUT/compare/runs-NAME/ (a second bench run reuses every result with identical settings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METHODS = ("dense", "stem", "elastic", "elastic-router")
ROUTER = "elastic-router"
# Retrieval (single and multi-key needles), multi-hop tracing, aggregation: the three families of the adaptivity table.
TASKS = ("niah_single_2", "niah_multikey_1", "vt", "cwe", "fwe")
QUICK_TASKS = ("niah_single_2", "niah_multikey_1", "vt", "cwe")


def _value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def overrides(config, head_map: Path, router: Path) -> list[str]:
    """--set items: the bench's elastic knobs that differ from the defaults (bare: stem takes the ones it has, so its
    blocks are the elastic heads' blocks), the map for `elastic` and the router for `elastic-router`."""
    from stem_cli.elastic.config import ElasticConfig
    from stem_cli.elastic.train import config_fields

    defaults, mine = config_fields(ElasticConfig()), config_fields(config)
    bare = [f"{k}={_value(v)}" for k, v in mine.items() if k != "default_dense_layers" and v != defaults[k]]
    return [*bare, f"elastic.head_map={head_map}", f"elastic-router.router={router}"]


def for_methods(items: list[str], methods: list[str]) -> list[str]:
    """The --set items that apply to `methods`: a method-scoped item (elastic.head_map=...) of a method left out of the
    run would be refused by compare (it names a method not run), so it is dropped with that method."""
    return [item for item in items if "." not in item.partition("=")[0] or item.partition(".")[0] in methods]


def router_deltas(run, methods: list[str], margin: float | None = None) -> list[dict]:
    """The router minus each other method, per length and over all lengths: paired delta (points), interval, verdicts."""
    from stem_cli.report import stats
    from stem_cli.runs.runner import averages

    out = []
    for other in [m for m in methods if m != ROUTER]:
        for (method, seq_len), avg in averages(run.rows, run.records, baseline=other, margin=margin).items():
            if method != ROUTER or "verdict" not in avg:
                continue
            n = avg["delta_n"]
            delta = stats.NONE if not n else stats.Interval(100 * avg["delta"], 100 * avg["delta_ci_low"], 100 * avg["delta_ci_high"], n, "")
            kind, text = stats.head_to_head(delta)
            out.append({"router_vs": other, "seq_len": seq_len, "n": n, "delta": None if not n else delta.mean,
                        "delta_ci": None if not n else [delta.low, delta.high], "head_to_head": kind, "head_to_head_text": text,
                        "verdict": avg["verdict_kind"], "verdict_text": avg["verdict"], "margin": avg["margin"]})
    return out


def _move(paths: dict, base: Path) -> dict[str, str]:
    """compare's timestamped JSON/MD/CSV/PNG renamed to `base`.*: one name per stage, whatever second it finished in."""
    moved = {}
    for kind, path in paths.items():
        if kind == "results" or not Path(path).is_file():
            continue
        target = base.with_name(base.name + Path(path).suffix)
        Path(path).replace(target)
        moved[kind] = str(target)
    return moved


def _table(result) -> list[dict]:
    """compare's flat rows (one per method and length: task scores, average and interval, delta to dense, BUD, Omega)."""
    return [dict(r) for r in result.rows]


def run_compare(*, model: str, name: str, config, head_map: Path, router: Path, lengths: list[int], tasks, samples: int,
                seed: int, output: Path, device: str, dtype: str, max_new_tokens: int | None = None, batch_size: int = 1,
                console=None) -> dict:
    """Stage (a) then (b) (module docstring); returns the record written to OUTPUT/compare/router-compare-NAME.json."""
    import stem_cli
    from stem_cli.runs.budget import BudgetOutOfReach
    from stem_cli.runs.elastic import HELD_OUT_SEED
    from stem_cli.units import format_length

    folder = output / "compare"
    work = folder / f"runs-{name}"
    held_out = seed + HELD_OUT_SEED
    common = dict(tasks=[f"ruler/{t}" for t in tasks], limit=samples, profile=False, output=work, seed=held_out,
                  max_new_tokens=max_new_tokens, overrides=overrides(config, head_map, router), device=device, dtype=dtype,
                  batch_size=batch_size, console=console)
    record = {"methods": list(METHODS), "tasks": list(tasks), "samples_per_task": samples, "lengths": lengths, "seed": held_out,
              "held_out": f"RULER samples of seed {held_out} (the router trained on seed {seed})", "head_map": str(head_map),
              "router": str(router)}

    matched = stem_cli.compare(model, list(METHODS), lengths=lengths, budget=None, **common)
    omega_files = _move(matched.paths, folder / f"compare-{name}-matched-omega")
    averages = matched.run.averages
    router_bud = {n: averages[(ROUTER, n)]["bud"] for n in lengths if (ROUTER, n) in averages}
    record["matched_omega"] = {
        "what": "published knobs; elastic's map calibrated at the router's final Omega", "files": omega_files,
        "omega": {m: averages.get((m, None), {}).get("omega") for m in ("elastic", ROUTER)},
        "rows": _table(matched), "router_deltas": router_deltas(matched.run, list(METHODS)),
    }
    record["matched_bud"] = []
    for n in lengths:
        bud = router_bud.get(n)
        if bud is None or not 0 < bud <= 1 or math.isnan(bud):
            record["matched_bud"].append({"seq_len": n, "skipped": f"the router's run at {n} recorded no BUD"})
            continue
        target = round(bud, 3)
        methods, dropped = list(METHODS), {}
        while True:
            try:
                solved = stem_cli.compare(model, methods, lengths=[n], budget=target,
                                          **{**common, "overrides": for_methods(common["overrides"], methods)})
                break
            except BudgetOutOfReach as e:  # the map's dense heads (or Stem's forced blocks) floor its BUD above the target
                if e.method not in methods or e.method == "dense":
                    raise
                dropped[e.method] = str(e)
                methods.remove(e.method)
                if console is not None:
                    console.print(f"[yellow]notice:[/] matched BUD at {format_length(n)}: {e}; {e.method} left out")
        files = _move(solved.paths, folder / f"compare-{name}-matched-bud-{format_length(n)}")
        record["matched_bud"].append({
            "seq_len": n, "budget": target, "router_bud_at_published_knobs": bud, "methods": methods, "dropped": dropped,
            "files": files, "rows": _table(solved),
            "router_deltas": router_deltas(solved.run, methods) if ROUTER in methods else [],
        })
    path = folder / f"router-compare-{name}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    record["json"] = str(path)
    return record


def print_record(record: dict) -> None:
    """Each stage's accuracy per method and length, then the router's paired deltas over all lengths."""
    from stem_cli.units import format_length

    stages = [("matched Omega", record["matched_omega"])] + [(f"matched BUD {s.get('budget', '-')}", s) for s in record["matched_bud"]]
    for label, stage in stages:
        if "skipped" in stage:
            print(f"{label}: skipped ({stage['skipped']})", flush=True)
            continue
        for row in stage["rows"]:
            if row.get("average") is not None:
                ci = "" if row.get("ci_low") is None else f" [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
                print(f"{label:<18} {format_length(row['seq_len']):>5} {row['method']:<15} accuracy {100 * row['average']:5.1f}{ci} "
                      f"BUD {_pct(row.get('bud'))} Omega {_pct(row.get('omega'))}", flush=True)
        for d in stage["router_deltas"]:
            if d["seq_len"] is None:  # over all lengths (one length: the same as that length's)
                ci = "-" if d["delta_ci"] is None else f"[{d['delta_ci'][0]:+.1f}, {d['delta_ci'][1]:+.1f}]"
                print(f"{label:<18} router - {d['router_vs']:<8} {'-' if d['delta'] is None else format(d['delta'], '+.1f'):>6} "
                      f"points {ci} (n {d['n']}): {d['head_to_head_text']}; at margin {d['margin']:g}: {d['verdict_text']}", flush=True)
        for method, why in stage.get("dropped", {}).items():
            print(f"{label:<18} {method} left out: {why}", flush=True)


def _pct(x) -> str:
    return "  -  " if x is None else f"{x:5.1%}"


def seed_results(output: Path, name: str, model: str, results: Path) -> Path:
    """Add an earlier comparison's stored results (another machine's, an interrupted call's) to the store this
    bench's comparison `name` of `model` will use, so that they are reused: results are keyed by content (weights,
    config, files, prompt), not by path, and a record already in the store is not added twice. Returns the store."""
    from stem_cli.environment import slug

    store = Path(output) / "compare" / f"runs-{name}" / f"results-{slug(model)}.jsonl"
    store.parent.mkdir(parents=True, exist_ok=True)
    have = {json.loads(line)["key"] for line in store.read_text().splitlines() if line.strip()} if store.exists() else set()
    new = [line for line in Path(results).read_text().splitlines() if line.strip() and json.loads(line)["key"] not in have]
    with store.open("a") as f:
        f.writelines(line + "\n" for line in new)
    return store


def summarize_stored(results: Path) -> dict:
    """An interrupted comparison's stored results (compare's JSONL store) read back with the same statistics as a
    finished one: per method and length (None: over all lengths) the accuracy with its n and 95% interval, BUD, Omega,
    and the router's paired deltas against each other method. Strata (a task at a length) count only where they hold
    results; deltas pair the samples both methods have."""
    from types import SimpleNamespace

    from stem_cli.runs.runner import averages, summarize

    records = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    rows = summarize(records)
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    table = []
    for (method, seq_len), avg in averages(rows, records).items():
        table.append({"method": method, "seq_len": seq_len, **{k: avg.get(k) for k in (
            "score", "n", "ci_low", "ci_high", "bud", "omega", "delta", "delta_n", "delta_ci_low", "delta_ci_high", "verdict")}})
    strata = sorted({(r["task"], r["seq_len"]) for r in records}, key=lambda s: (s[1], s[0]))
    return {"results": str(results), "records": len(records), "methods": methods,
            "strata": {f"{t}@{n}": sum(1 for r in records if (r["task"], r["seq_len"]) == (t, n)) for t, n in strata},
            "rows": table, "router_deltas": router_deltas(SimpleNamespace(rows=rows, records=records), methods)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.bench.router_compare",
                                     description="Summarize a comparison's stored results (an interrupted run's too).")
    parser.add_argument("results", help="the results JSONL in OUTPUT/compare/runs-NAME/")
    parser.add_argument("--output", help="write the summary JSON here")
    args = parser.parse_args()
    summary = summarize_stored(Path(args.results))
    for row in summary["rows"]:
        ci = "" if row["ci_low"] is None else f" [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
        length = "all" if row["seq_len"] is None else row["seq_len"]
        print(f"{length!s:>6} {row['method']:<15} accuracy {100 * row['score']:5.1f}{ci} n {row['n']} BUD "
              f"{'-' if row['bud'] is None else format(row['bud'], '.1%')} Omega {'-' if row['omega'] is None else format(row['omega'], '.1%')}")
    for d in summary["router_deltas"]:
        ci = "-" if d["delta_ci"] is None else f"[{d['delta_ci'][0]:+.1f}, {d['delta_ci'][1]:+.1f}]"
        length = "all" if d["seq_len"] is None else d["seq_len"]
        print(f"{length!s:>6} router - {d['router_vs']:<8} {'-' if d['delta'] is None else format(d['delta'], '+.1f')} points {ci} "
              f"(n {d['n']}): {d['head_to_head_text']}")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.output}")
