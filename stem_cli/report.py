"""Rendering results: rich tables for the terminal, Markdown / CSV / JSON for papers and dashboards.

Two shapes:
- eval: one row per (task, length), one column per method (scores in percent), then
  per-length average accuracy, BUD and pre-fill tokens/s;
- compare: one row per (method, length) with every task, the average, its delta to
  dense, BUD and (where profiled) estimation / attention / end-to-end time and speed-up.
The flat rows of `compare_rows` are what every export format writes, so the formats agree.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich.table import Table

from stem_cli.units import format_length


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


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
    return _pct(row.get("score"))


def eval_table(rows: list[dict], averages: dict, title: str) -> Table:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = list(dict.fromkeys(r["seq_len"] for r in rows))
    by = {(r["task"], r["seq_len"], r["method"]): r for r in rows}
    table = Table(title=title, show_lines=False)
    table.add_column("task")
    table.add_column("length", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    for task in dict.fromkeys(r["task"] for r in rows):
        for n in lengths:
            if any((task, n, m) in by for m in methods):
                table.add_row(short_task(task), format_length(n), *[_cell(by.get((task, n, m))) for m in methods])
    table.add_section()
    for n in [*lengths, None] if len(lengths) > 1 else lengths:
        where = "all" if n is None else format_length(n)
        if not any((m, n) in averages for m in methods):
            continue
        table.add_row("[b]average[/b]", where, *[f"[b]{_pct(averages.get((m, n), {}).get('score'))}[/b]" for m in methods])
        table.add_row("BUD %", where, *[_pct(averages.get((m, n), {}).get("bud")) for m in methods])
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
            for t in tasks:
                r = by.get((t, n, m))
                if r is None:
                    flat[short_task(t)] = None
                elif t == "ppl":
                    flat["ppl"] = r.get("ppl")
                else:
                    flat[short_task(t)] = r.get("score")
            flat["average"] = avg.get("score")
            flat["delta_vs_dense"] = None if base is None or avg.get("score") is None or m == baseline else avg["score"] - base
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
            out.append(flat)
    return out


_PERCENT = {"average", "delta_vs_dense", "bud"}
_FIXED = ("method", "seq_len")
_TAIL = ("average", "delta_vs_dense", "bud", "omega", "delta", "reanchor", "knob", "estimation_ms", "attention_ms", "e2e_ms", "speedup")


def _columns(flat: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in flat for k in row))
    tasks = [k for k in keys if k not in _FIXED and k not in _TAIL]
    tail = [k for k in _TAIL if any(row.get(k) is not None for row in flat)]
    return [*_FIXED, *tasks, *tail]


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


_HEADERS = {"seq_len": "length", "average": "avg", "delta_vs_dense": "Δ dense", "bud": "BUD %", "omega": "Ω %",
            "delta": "decode δ", "reanchor": "re-anchor %", "estimation_ms": "est ms",
            "attention_ms": "attn ms", "e2e_ms": "e2e ms", "speedup": "speed-up"}


def compare_table(flat: list[dict], title: str) -> Table:
    cols = _columns(flat)
    table = Table(title=title)
    for c in cols:
        table.add_column(_HEADERS.get(c, c), justify="left" if c == "method" else "right", overflow="fold")
    previous = None
    for row in flat:
        if previous is not None and row["seq_len"] != previous:
            table.add_section()
        previous = row["seq_len"]
        table.add_row(*[_text(c, row.get(c)) for c in cols])
    return table


def render(flat: list[dict], fmt: str) -> str:
    """markdown | csv | json of the flat compare rows (percent columns in percent, as the table shows)."""
    cols = _columns(flat)
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(cols)
        for row in flat:
            writer.writerow(["" if row.get(c) is None else row[c] for c in cols])
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |",
                 "|" + "|".join("---" if c == "method" else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(_text(c, row.get(c)) for c in cols) + " |" for row in flat]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}: use table, markdown, csv or json")
