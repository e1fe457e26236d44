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
    return compare_rows(rows, averages(rows, _records()), PROFILE)


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
    console.print(eval_table(rows, averages(rows, _records()), "eval"))
    console.print(compare_table(_flat(), "compare"))
    text = console.export_text()
    assert "niah_single_1" in text and "average" in text and "1.25x" in text and "-25.0" in text


def test_unknown_format():
    with pytest.raises(ValueError, match="table, markdown, csv or json"):
        render(_flat(), "xml")


def test_rows_carry_n_intervals_and_paired_verdicts():
    """Cells: Wilson at n = 2 (both answered: [34.2, 100]); averages: n, interval; Δ: paired interval and verdict."""
    rows = summarize(_records())
    by = {(r["task"], r["seq_len"], r["method"]): r for r in rows}
    cell = by[("ruler/niah_single_1", 4096, "dense")]
    assert cell["n"] == 2 and cell["ci_method"] == "wilson"
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((0.34238, 1.0), abs=1e-5)
    avg = averages(rows, _records())
    assert avg[("dense", 4096)]["n"] == 4 and "verdict" not in avg[("dense", 4096)]  # the baseline has no delta
    stem = avg[("stem", 4096)]
    assert stem["delta"] == pytest.approx(-0.25) and stem["delta_ci_low"] < -0.25 < stem["delta_ci_high"]
    assert stem["verdict"] == "inconclusive (n too small)"  # two samples per task cannot tell
    for row in _flat():
        assert {"n", "ci_low", "ci_high", "delta_ci_low", "delta_ci_high", "verdict"} <= set(row)
        assert set(row["cells"]) == {"niah_single_1", "vt"} and row["cells"]["vt"]["n"] == 2


def test_many_samples_give_a_verdict():
    """400 samples per task, the method losing 1 of them: keeps accuracy within 2 points; losing 25%: loses."""
    def records(lost_every):
        out = []
        for m in ("dense", "stem"):
            for i in range(400):
                lost = m == "stem" and lost_every and i % lost_every == 0
                out.append({"task": "ruler/vt", "seq_len": 4096, "method": m, "sample": str(i), "score": 0.0 if lost else 1.0})
        return out
    few = records(400)
    assert averages(summarize(few), few)[("stem", 4096)]["verdict"].startswith("keeps accuracy (within 2 points")
    many = records(4)
    assert averages(summarize(many), many)[("stem", 4096)]["verdict"] == "loses accuracy"
    assert averages(summarize(many), many, margin=30)[("stem", 4096)]["verdict"].startswith("keeps accuracy (within 30 points")
