"""The Python API for runs (stem_cli.runs) against the CLI that renders it; a CLI that starts without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import stem_cli
from stem_cli.cli import app
from stem_cli.errors import UsageError

ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
SMALL = ["block_size=16", "dense_layers=[0]", "k_start=4"]


def test_importing_the_cli_loads_no_torch():
    """`stem --help` is fast because nothing heavy loads with the command module (machine-speed independent)."""
    code = "import sys, stem_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"stem {stem_cli.__version__}\n"


def test_compare_from_python_gives_the_rows_the_cli_prints_and_writes(tmp_path):
    result = stem_cli.compare("tiny-llama", ["stem", "streaming"], tasks=["ruler/niah_single_1"], lengths="600", limit=1,
                              max_new_tokens=3, overrides=SMALL, output=tmp_path / "api", device="cpu")
    assert result.methods == ["dense", "stem", "streaming"]  # dense added as the baseline
    assert [(r["method"], r["seq_len"]) for r in result.rows] == [("dense", 600), ("stem", 600), ("streaming", 600)]
    assert result.rows[0]["bud"] == pytest.approx(1.0) and 0 < result.rows[1]["bud"] < 1
    assert sorted(p.suffix for p in result.paths.values()) == [".csv", ".json", ".jsonl", ".md", ".png"]
    assert all(p.is_file() for p in result.paths.values())

    args = ["compare", "stem", "streaming", "--model", "tiny-llama", "--task", "ruler/niah_single_1", "--seq-len", "600", "--limit", "1",
            "--max-new-tokens", "3", *[x for s in SMALL for x in ("--set", s)], "--device", "cpu", "--format", "json",
            "--output", str(tmp_path / "cli")]
    cli = CliRunner().invoke(app, args, env=ENV)
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    (written,) = (tmp_path / "cli").glob("compare-tiny-llama-*.json")
    assert printed == result.rows == json.loads(written.read_text())["table"]
    summary = json.loads(result.paths["json"].read_text())
    assert summary["table"] == result.rows
    assert summary["schema_version"] == 2 and summary["stem_version"] == stem_cli.__version__ and "git_commit" in summary
    for row in result.rows:  # every accuracy cell with n and its interval; deltas paired, with a verdict
        assert row["n"] == 1 and row["ci_low"] <= row["average"] <= row["ci_high"]
        assert set(row["cells"]["niah_single_1"]) == {"n", "ci_low", "ci_high", "ci_method"}
    assert result.rows[1]["verdict"].startswith("inconclusive") and result.rows[0]["verdict"] is None
    assert "3 computed, 0 reused" in " ".join(cli.output.split())  # the CLI's own results, not the API's cache


def test_usage_errors_from_python():
    with pytest.raises(UsageError, match="unknown method 'nosuch'"):
        stem_cli.compare("tiny-llama", ["nosuch"], tasks=["niah"], lengths="600")
    with pytest.raises(UsageError, match="--budget 1.5"):
        stem_cli.evaluate("tiny-llama", ["ruler/vt"], "dense", "600", budget=1.5)
