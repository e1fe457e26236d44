"""Rendering results: rich tables for the terminal, Markdown / CSV / JSON for papers and dashboards.

Two shapes:
- eval: one row per (task, length), one column per method (scores in percent), then
  per-length average accuracy, BUD and pre-fill tokens/s;
- compare: one row per (method, length) with every task, the average, its delta to
  dense, BUD and (where profiled) estimation / attention / end-to-end time and speed-up.
The flat rows of `compare_rows` are what every export format writes, so the formats agree.
The other commands' terminal tables (methods, generate, profile, calibrate) are here too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any

from rich.measure import Measurement
from rich.table import Table

from stem_cli.units import format_length


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


FULL_BUD = 0.9995  # a BUD that shows as 100.0: every block of the prompt was computed


def keeps_everything(method: str, bud: float | None) -> bool:
    """A method with sparse pre-fill whose BUD is 100%: its budget covers every block at this length (it ran as dense)."""
    if bud is None or bud < FULL_BUD:
        return False
    from stem_cli.registry import split_spec

    try:
        return split_spec(method)[0] != "dense"
    except Exception:  # noqa: BLE001 - a name from an old results file: judge by the name alone
        return method != "dense"


def _bud_cell(method: str, bud: float | None, text: str) -> str:
    return f"{text} (all blocks)" if keeps_everything(method, bud) else text


def short_task(task: str) -> str:
    """'ruler/niah_single_1' -> 'niah_single_1'; other names as they are."""
    return task.split("/", 1)[1] if task.startswith(("ruler/", "longbench/")) else task


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["task"] == "ppl":
        return _num(row.get("ppl"), ".2f")
    if row["task"] == "fidelity":
        return f"err {_num(row.get('score'), '.3f')}"
    return _pct(row.get("score")) + _interval_text(row.get("ci_low"), row.get("ci_high"))


def eval_table(rows: list[dict], averages: dict, title: str) -> Table:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = list(dict.fromkeys(r["seq_len"] for r in rows))
    by = {(r["task"], r["seq_len"], r["method"]): r for r in rows}
    counts = sorted({r["n"] for r in rows if r.get("ci_low") is not None})
    caption = None
    if counts:
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        caption = f"n = {n} samples per task; [95% CI] in points; Δ paired on the same samples"
    table = Table(title=title, show_lines=False, caption=caption)
    table.add_column("task")
    table.add_column("length", justify="right", no_wrap=True)
    for m in methods:
        table.add_column(m, justify="right", no_wrap=True)
    for task in dict.fromkeys(r["task"] for r in rows):
        for n in lengths:
            if any((task, n, m) in by for m in methods):
                table.add_row(short_task(task), format_length(n), *[_cell(by.get((task, n, m))) for m in methods])
    table.add_section()
    for n in [*lengths, None] if len(lengths) > 1 else lengths:
        where = "all" if n is None else format_length(n)
        if not any((m, n) in averages for m in methods):
            continue
        shown = [averages.get((m, n), {}) for m in methods]
        table.add_row("[b]average[/b]", where, *[f"[b]{_pct(a.get('score'))}[/b]{_interval_text(a.get('ci_low'), a.get('ci_high'))}"
                                                  for a in shown])
        if any(a.get("verdict") for a in shown):
            table.add_row("Δ dense (paired)", where, *["-" if a.get("delta") is None else
                                                       f"{100 * a['delta']:+.1f}{_interval_text(a['delta_ci_low'], a['delta_ci_high'], True)}"
                                                       for a in shown])
            table.add_row("verdict", where, *[a.get("verdict") or "-" for a in shown])
        table.add_row("BUD %", where, *[_bud_cell(m, a.get("bud"), _pct(a.get("bud"))) for m, a in zip(methods, shown)])
        table.add_row("pre-fill tok/s", where, *[_num(averages.get((m, n), {}).get("prefill_tokens_per_s"), ".0f") for m in methods])
        for key, label, show in (("omega", "Ω % (heads not dense)", _pct), ("decode_delta_mean", "decode δ (dropped mass)", lambda x: _num(x, ".3f")),
                                 ("decode_reanchor_fraction", "re-anchored steps %", _pct)):
            if any(averages.get((m, n), {}).get(key) is not None for m in methods):
                table.add_row(label, where, *[show(averages.get((m, n), {}).get(key)) for m in methods])
    return table


# ------------------------------------------------------------------ compare


def compare_rows(rows: list[dict], averages: dict, profile: list[dict] | None = None, baseline: str = "dense") -> list[dict]:
    """Flat rows, one per (method, length): task scores, average, delta to the baseline, BUD, timings."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = list(dict.fromkeys(r["seq_len"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["seq_len"], r["method"]): r for r in rows}
    timing = {(p["method"], p["seq_len"]): p for p in profile or [] if p.get("status", "ok") == "ok"}
    out = []
    for n in lengths:
        base = averages.get((baseline, n), {}).get("score")
        for m in methods:
            avg = averages.get((m, n), {})
            flat: dict[str, Any] = {"method": m, "seq_len": n}
            cells = {}
            for t in tasks:
                r = by.get((t, n, m))
                if r is None:
                    flat[short_task(t)] = None
                elif t == "ppl":
                    flat["ppl"] = r.get("ppl")
                else:
                    flat[short_task(t)] = r.get("score")
                    if r.get("ci_low") is not None:
                        cells[short_task(t)] = {"n": r["n"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "ci_method": r["ci_method"]}
            counts = sorted({c["n"] for c in cells.values()})
            flat["n"] = None if not counts else counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            flat["average"] = avg.get("score")
            flat["ci_low"], flat["ci_high"] = avg.get("ci_low"), avg.get("ci_high")
            if avg.get("delta") is not None:  # paired on the samples both ran: the delta its interval belongs to
                flat["delta_vs_dense"] = avg["delta"]
            else:
                flat["delta_vs_dense"] = None if base is None or avg.get("score") is None or m == baseline else avg["score"] - base
            flat["delta_ci_low"], flat["delta_ci_high"] = avg.get("delta_ci_low"), avg.get("delta_ci_high")
            flat["verdict"] = avg.get("verdict")
            budgets = [by[(t, n, m)].get("bud") for t in tasks if (t, n, m) in by and by[(t, n, m)].get("bud") is not None]
            flat["bud"] = sum(budgets) / len(budgets) if budgets else None
            for key, source in (("omega", "omega"), ("delta", "decode_delta_mean"), ("reanchor", "decode_reanchor_fraction")):
                values = [by[(t, n, m)][source] for t in tasks if by.get((t, n, m), {}).get(source) is not None]
                flat[key] = sum(values) / len(values) if values else None
            knob = next((by[(t, n, m)]["knob"] for t in tasks if (t, n, m) in by and by[(t, n, m)].get("knob")), None)
            flat["knob"] = f"{knob['name']}={knob['value']:.4g}" if knob else None
            p = timing.get((m, n))
            flat["estimation_ms"] = p.get("estimation_ms") if p else None
            flat["attention_ms"] = p.get("attention_ms") if p else None
            flat["e2e_ms"] = p.get("e2e_ms") if p else None
            flat["speedup"] = p.get("speedup") if p else None
            if cells:
                flat["cells"] = cells  # per task: n and the 95% interval (JSON; the table shows them in the cell)
            out.append(flat)
    return out


_FIXED = ("method", "seq_len", "n")
_TAIL = ("average", "ci_low", "ci_high", "delta_vs_dense", "delta_ci_low", "delta_ci_high", "verdict", "bud", "omega", "delta",
         "reanchor", "knob", "estimation_ms", "attention_ms", "e2e_ms", "speedup")
_INTERVALS = {"average": ("ci_low", "ci_high"), "delta_vs_dense": ("delta_ci_low", "delta_ci_high")}
_SHOWN_INSIDE = {"ci_low", "ci_high", "delta_ci_low", "delta_ci_high"}  # the table and Markdown put them in their value's cell


def _columns(flat: list[dict]) -> list[str]:
    """Every column of the flat rows (CSV), tasks between the fixed and the tail columns."""
    keys = list(dict.fromkeys(k for row in flat for k in row if k != "cells"))
    tasks = [k for k in keys if k not in _FIXED and k not in _TAIL]
    fixed = [k for k in _FIXED if k != "n" or any(row.get("n") is not None for row in flat)]
    tail = [k for k in _TAIL if any(row.get(k) is not None for row in flat)]
    return [*fixed, *tasks, *tail]


def _shown_columns(flat: list[dict]) -> list[str]:
    return [c for c in _columns(flat) if c not in _SHOWN_INSIDE]


def _interval_text(low, high, signed: bool = False) -> str:
    if low is None or high is None:
        return ""
    spec = "+.0f" if signed else ".0f"
    return f" [{100 * low:{spec}}, {100 * high:{spec}}]"


def _cell_text(row: dict, key: str) -> str:
    """A value as the table and Markdown show it: accuracy cells with their 95% interval in points."""
    text = _text(key, row.get(key))
    if key in _INTERVALS and row.get(key) is not None:
        return text + _interval_text(row.get(_INTERVALS[key][0]), row.get(_INTERVALS[key][1]), signed=key == "delta_vs_dense")
    cell = (row.get("cells") or {}).get(key)
    if cell is not None and row.get(key) is not None:
        return text + _interval_text(cell["ci_low"], cell["ci_high"])
    return text


def _text(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "seq_len":
        return format_length(value)
    if key == "speedup":
        return f"{value:.2f}x"
    if key.endswith("_ms"):
        return f"{value:.1f}"
    if key == "delta_vs_dense":
        return f"{100 * value:+.1f}"
    if key in ("ppl",):
        return f"{value:.2f}"
    if key == "delta":
        return f"{value:.3f}"
    if isinstance(value, float):
        return _pct(value)
    return str(value)


_HEADERS = {"seq_len": "length", "average": "avg [95% CI]", "delta_vs_dense": "Δ dense [95% CI]", "bud": "BUD %", "omega": "Ω %",
            "delta": "decode δ", "reanchor": "re-anchor %", "estimation_ms": "est ms",
            "attention_ms": "attn ms", "e2e_ms": "e2e ms", "speedup": "speed-up"}


def compare_table(flat: list[dict], title: str) -> "Fitted":
    cols = _shown_columns(flat)
    table = Table(title=title, caption="[95% CI] in points; n = samples per task; Δ paired on the same samples"
                  if any(row.get("ci_low") is not None for row in flat) else None)
    for c in cols:
        table.add_column(_HEADERS.get(c, c), justify="left" if c in ("method", "verdict") else "right", no_wrap=True)
    previous = None
    for row in flat:
        if previous is not None and row["seq_len"] != previous:
            table.add_section()
        previous = row["seq_len"]
        table.add_row(*[_bud_cell(row["method"], row.get(c), _text(c, row.get(c))) if c == "bud" else _cell_text(row, c) for c in cols])
    return Fitted(table, keep=2)


class Fitted:
    """A table that never breaks a cell: where the terminal (or a log's 80 columns) is too narrow for all
    of its columns, the columns that do not fit go to a second table (a third, ...), each repeating the
    first `keep` columns (method, length) so every row still reads on its own."""

    def __init__(self, table: Table, keep: int = 1):
        self.table, self.keep = table, keep

    def parts(self, console, options) -> list[Table]:
        columns = self.table.columns
        keep, rest = list(range(min(self.keep, len(columns)))), list(range(self.keep, len(columns)))
        parts: list[list[int]] = [list(keep)]
        unbounded = options.update_width(1 << 16)  # the width the columns want, not the width they are squeezed to
        for i in rest:
            trial = self._build(parts[-1] + [i], first=len(parts) == 1)
            if len(parts[-1]) > len(keep) and Measurement.get(console, unbounded, trial).maximum > options.max_width:
                parts.append([*keep, i])
            else:
                parts[-1].append(i)
        return [self._build(part, first=n == 0, last=n == len(parts) - 1) for n, part in enumerate(parts)]

    def _build(self, indices: list[int], first: bool, last: bool = True) -> Table:
        src = self.table
        out = Table(title=src.title if first else None, caption=src.caption if last else None, box=src.box,
                    show_lines=src.show_lines)
        for i in indices:
            c = src.columns[i]
            out.add_column(c.header, justify=c.justify, no_wrap=True, style=c.style, header_style=c.header_style)
        cells = [list(src.columns[i].cells) for i in indices]
        for r, row in enumerate(src.rows):
            out.add_row(*[col[r] for col in cells], end_section=row.end_section)
        return out

    def __rich_console__(self, console, options):
        yield from self.parts(console, options)


def render(flat: list[dict], fmt: str) -> str:
    """markdown | csv | json of the flat compare rows (percent columns in percent, as the table shows)."""
    cols = _columns(flat)
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        cells = list(dict.fromkeys(t for row in flat for t in row.get("cells") or {}))
        extra = [f"{t}_{k}" for t in cells for k in ("n", "ci_low", "ci_high")]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(cols + extra)
        for row in flat:
            per = [(row.get("cells") or {}).get(t, {}).get(k) for t in cells for k in ("n", "ci_low", "ci_high")]
            writer.writerow(["" if v is None else v for v in [row.get(c) for c in cols] + per])
        return buf.getvalue()
    if fmt == "markdown":
        cols = _shown_columns(flat)
        lines = ["| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |",
                 "|" + "|".join("---" if c in ("method", "verdict") else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(_cell_text(row, c) for c in cols) + " |" for row in flat]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}: use table, markdown, csv or json")


# ------------------------------------------------------------------ the method registry (stem methods)


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def _parameters(defaults) -> dict:
    return {f.name: {"default": getattr(defaults, f.name), "source": f.metadata["source"], "help": f.metadata["help"]}
            for f in dataclasses.fields(defaults)}


def methods_data(methods: dict, decode_methods: dict) -> dict:
    """The registry as JSON data: each method's description, attention name and parameters (default, source, help)."""
    data: dict[str, Any] = {
        name: {"description": m.description, "attn_implementation": m.attn_implementation, "parameters": _parameters(m.defaults)}
        for name, m in methods.items()
    }
    data["decode"] = {name: {"description": m.description, "parameters": _parameters(m.defaults)} for name, m in decode_methods.items()}
    return data


def methods_tables(methods: dict, decode_methods: dict) -> tuple[Table, Table]:
    """(pre-fill methods, decode methods); a variant shows only the parameters where it differs from the method it varies."""
    table = Table(title="stem methods", show_lines=True)
    table.add_column("method", style="bold cyan")
    table.add_column("what it does")
    table.add_column("parameter = default", style="green")
    table.add_column("source")
    table.add_column("meaning", style="dim")
    shown: dict[type, str] = {}  # config class -> the first method listed with all its parameters
    for name, m in methods.items():
        fields = dataclasses.fields(m.defaults)
        base = shown.setdefault(type(m.defaults), name)
        if base != name:  # a variant: only what differs from the method it varies
            reference = methods[base].defaults
            fields = [f for f in fields if getattr(m.defaults, f.name) != getattr(reference, f.name)]
        described = [m.description, f"attn_implementation='{m.attn_implementation}'"]
        if base != name:
            described.append(f"other parameters as {base}")
        rows = [(f"{f.name} = {_shown(getattr(m.defaults, f.name))}", f.metadata["source"], f.metadata["help"]) for f in fields]
        rows += [("", "", "")] * (len(described) - len(rows))
        for i, row in enumerate(rows):
            table.add_row(name if i == 0 else "", described[i] if i < len(described) else "", *row)
    decode = Table(title="decode methods (--method PREFILL+DECODE, e.g. stem+prhs; alone: dense pre-fill)", show_lines=True)
    for col, style in (("method", "bold cyan"), ("what it does", None), ("parameter = default", "green"), ("source", None), ("meaning", "dim")):
        decode.add_column(col, style=style)
    for name, m in decode_methods.items():
        for i, f in enumerate(dataclasses.fields(m.defaults)):
            decode.add_row(name if i == 0 else "", m.description if i == 0 else "",
                           f"{f.name} = {_shown(getattr(m.defaults, f.name))}", f.metadata["source"], f.metadata["help"])
    return table, decode


# ------------------------------------------------------------------ generate, profile, calibrate


def generate_table(answers) -> Table:
    """runs.answer.Answers: one row per method."""
    table = Table(title=f"stem generate: {answers.model}, {answers.prompt_tokens} prompt tokens")
    scored = answers.expected is not None
    for col in ("method", "BUD", "pre-fill s", "decode s", "tokens", *(("correct",) if scored else ()), "answer"):
        table.add_column(col, justify="right" if col not in ("method", "answer") else "left")
    for r in answers.rows:
        row = [r["method"], _bud_cell(r["method"], r["bud"], f"{r['bud']:.1%}") if r["bud"] is not None else "-", f"{r['prefill_s']:.2f}", f"{r['decode_s']:.2f}", str(r["tokens"])]
        if scored:
            row.append("[green]yes[/]" if r["correct"] else "[red]no[/]")
        table.add_row(*row, r["text"].replace("\n", " ")[:80])
    return table


def profile_table(result: dict) -> Table:
    """A pre-fill profile's rows (runs.profiling.profile): times, speed-up, BUD, memory, power; OOMs marked."""
    env = result["environment"]
    table = Table(title=f"stem profile: {result['model']} on {env.get('gpu', 'CPU')} ({result['timing']})")
    for col in ("method", "length", "e2e ms", "attention ms", "estimation ms", "other ms", "speed-up", "BUD", "tok/s", "decode ms", "peak GiB", "power W"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in result["rows"]:
        if row.get("status") != "ok":
            need = row.get("failed_allocation_gib")
            table.add_row(row["method"], format_length(row["seq_len"]), f"[red]{row['status']}[/]" + (f" (+{need:.1f} GiB)" if need else ""), *[""] * 9)
            continue
        power = ((row.get("nvml") or {}).get("power_w") or {}).get("mean")
        table.add_row(
            row["method"], format_length(row["seq_len"]),
            f"{row['e2e_ms']:.1f} ({row['e2e_min_ms']:.0f}-{row['e2e_max_ms']:.0f})", f"{row['attention_ms']:.1f}",
            f"{row['estimation_ms']:.1f}", f"{row['other_ms']:.1f}", _num(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""),
            _num(row.get("bud"), ".1%"), f"{row['tokens_per_s']:.0f}", f"{row['decode_ms']:.1f}", _num(row.get("peak_gib"), ".1f"), _num(power, ".0f"),
        )
    return table


def decode_profile_table(result: dict) -> Table:
    """A decode profile's rows (runs.profiling.profile_decode): ms per token and its stages, speed-up, kept and re-anchored."""
    env = result["environment"]
    table = Table(title=f"stem profile --decode: {result['model_shape']}-shaped synthetic cache on {env.get('gpu', 'CPU')} ({result['timing']})")
    for col in ("method", "context", "ms/token", "selection ms", "attention ms", "speed-up", "tok/s", "kept", "re-anchor"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in result["rows"]:
        if row.get("status") != "ok":
            table.add_row(row["method"], format_length(row["seq_len"]), f"[red]{row['status']}[/]", *[""] * 6)
            continue
        table.add_row(
            row["method"], format_length(row["seq_len"]),
            f"{row['per_token_ms']:.2f} ({row['per_token_min_ms']:.2f}-{row['per_token_max_ms']:.2f})",
            f"{row['selection_ms']:.2f}", f"{row['attention_ms']:.2f}",
            _num(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""), f"{row['tokens_per_s']:.0f}",
            _num(row.get("kept_fraction"), ".1%"), _num(row.get("reanchor_fraction"), ".1%"),
        )
    return table


def generation_profile_table(result: dict) -> Table:
    """A decode profile's generation rows (runs.generation_profile): pre-fill, decode and end-to-end rates per decode method."""
    env, gen = result["environment"], result["generation_parameters"]
    table = Table(title=f"stem profile --decode, generation: {result['model_shape']} ({gen['model_source']}, {gen['dtype']}) on "
                        f"{env.get('gpu', 'CPU')}, pre-fill {gen['prefill_method']}, {gen['new_tokens']} new tokens ({result['timing']})")
    for col in ("decode method", "context", "pre-fill ms", "decode ms", "ms/token", "decode tok/s", "e2e tok/s", "speed-up",
                "kept", "same as dense"):
        table.add_column(col, justify="left" if col == "decode method" else "right")
    for row in result["generation"]:
        if row.get("status") != "ok":
            why = row.get("reason") or row.get("error") or ""
            table.add_row(row["decode_method"], format_length(row["seq_len"]), f"[red]{row['status']}[/]", why, *[""] * 6)
            continue
        same = row.get("matches_dense")
        table.add_row(
            row["decode_method"], format_length(row["seq_len"]), f"{row['prefill_ms']:.1f}", f"{row['decode_ms']:.1f}",
            f"{row['ms_per_token']:.2f}", f"{row['decode_tokens_per_s']:.1f}", f"{row['e2e_tokens_per_s']:.2f}",
            _num(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""), _num(row.get("kept_fraction"), ".1%"),
            "-" if same is None else f"{same}/{row['new_tokens']}",
        )
    return table


def calibration_table(head_map, model: str, samples: int) -> Table:
    """A calibrated head map (elastic.headmap.HeadMap): each governed layer's modes and per-head scores."""
    cal = head_map.calibration
    table = Table(title=f"stem calibrate: {model}, {samples} x {cal['prompt_tokens'][0]} tokens ({cal['source']})")
    for col in ("layer", "modes (per KV head)", "retrieval", "stem error", "streaming error"):
        table.add_column(col, justify="left" if col.startswith("modes") else "right")
    short = {"dense": "[bold]D[/]", "stem": "[cyan]S[/]", "streaming": "[yellow]W[/]"}
    scores = head_map.scores
    for layer, modes in enumerate(head_map.modes):
        if layer not in cal["governed_layers"]:
            continue
        cells = [" ".join("-" if x is None else f"{x:.2f}" for x in scores[name][layer]) for name in ("retrieval", "stem_error", "streaming_error")]
        table.add_row(str(layer), " ".join(short[m] for m in modes), *cells)
    return table


# ------------------------------------------------------------------ tasks (stem tasks)


def tasks_table(data: dict) -> Table:
    """runs.task_names.task_list(): one row per built-in task, a section per source (groups are in the notes)."""
    table = Table(title="stem tasks (built in)")
    table.add_column("task", no_wrap=True)
    table.add_column("answer tok", justify="right", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    previous = None
    for row in data["tasks"]:
        if previous is not None and row["source"] != previous:
            table.add_section()
        previous = row["source"]
        table.add_row(row["task"], _num(row["answer_tokens"], "d"), row["metric"])
    return table
