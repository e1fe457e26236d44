"""Compare renderers on a fixed result set, against golden files (regenerate: STEM_UPDATE_GOLDEN=1)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from stem_cli.runs.runner import averages, summarize
from stem_cli.report.tables import compare_rows, compare_table, eval_table, render

GOLDEN = Path(__file__).parent / "golden"


def _records():
    """A fixed set: 2 tasks x 2 lengths x 3 methods x 2 samples, scores and budgets by hand."""
    out = []
    scores = {"dense": (1, 1, 1, 0), "stem": (1, 0, 1, 0), "uniform": (0, 0, 1, 0)}
    buds = {"dense": 1.0, "stem": 0.31, "uniform": 0.29}
    for n in (4096, 8192):
        for t, task in enumerate(("ruler/niah_single_1", "ruler/vt")):
            for m in ("dense", "stem", "uniform"):
                for i in range(2):
                    out.append({"task": task, "seq_len": n, "method": m, "sample": f"{task}/{n}/0/{i}", "score": float(scores[m][2 * t + i]),
                                "bud": buds[m] + (0.01 if n == 8192 and m != "dense" else 0.0), "prompt_tokens": n, "prefill_s": n / 1000 * (buds[m] + 0.5)})
    return out


PROFILE = [
    {"method": "dense", "seq_len": 4096, "status": "ok", "estimation_ms": 0.0, "attention_ms": 10.0, "e2e_ms": 40.0, "speedup": 1.0},
    {"method": "stem", "seq_len": 4096, "status": "ok", "estimation_ms": 1.5, "attention_ms": 4.0, "e2e_ms": 32.0, "speedup": 1.25},
    {"method": "uniform", "seq_len": 4096, "status": "OOM"},
]


def _flat():
    rows = summarize(_records())
    return compare_rows(rows, averages(rows), PROFILE)


def test_summary_by_hand():
    rows = summarize(_records())
    by = {(r["task"], r["seq_len"], r["method"]): r for r in rows}
    assert by[("ruler/vt", 4096, "dense")]["score"] == 0.5
    assert by[("ruler/niah_single_1", 4096, "uniform")]["score"] == 0.0
    avg = averages(rows)
    assert avg[("stem", 4096)]["score"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2
    assert avg[("dense", None)]["score"] == pytest.approx(0.75)
    assert avg[("uniform", 8192)]["bud"] == pytest.approx(0.30)
    flat = _flat()
    stem4 = next(r for r in flat if r["method"] == "stem" and r["seq_len"] == 4096)
    assert stem4["delta_vs_dense"] == pytest.approx(-0.25)
    assert stem4["speedup"] == 1.25 and stem4["e2e_ms"] == 32.0
    uni4 = next(r for r in flat if r["method"] == "uniform" and r["seq_len"] == 4096)
    assert uni4["e2e_ms"] is None  # OOM rows carry no timing


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json"])
def test_render_golden(fmt):
    text = render(_flat(), fmt)
    path = GOLDEN / f"compare.{ {'markdown': 'md', 'csv': 'csv', 'json': 'json'}[fmt] }"
    if os.environ.get("STEM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_formats_agree():
    flat = _flat()
    parsed = list(csv.DictReader(io.StringIO(render(flat, "csv"))))
    as_json = json.loads(render(flat, "json"))
    assert len(parsed) == len(as_json) == len(flat) == 6
    for row, j in zip(parsed, as_json):
        assert row["method"] == j["method"]
        assert float(row["average"]) == pytest.approx(j["average"])


def test_tables_render():
    console = Console(width=200, record=True)
    rows = summarize(_records())
    console.print(eval_table(rows, averages(rows), "eval"))
    console.print(compare_table(_flat(), "compare"))
    text = console.export_text()
    assert "niah_single_1" in text and "average" in text and "1.25x" in text and "-25.0" in text


def test_unknown_format():
    with pytest.raises(ValueError, match="table, markdown, csv or json"):
        render(_flat(), "xml")
