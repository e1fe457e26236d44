"""`stem profile` on the CPU: timing paths, JSON schema, plot, OOM handling, bad lengths."""

from __future__ import annotations

import json
import re
import time

import pytest

import stem_cli
import torch
from typer.testing import CliRunner

import stem_cli.runs.prefill_profile as profile_module
from stem_cli.cli import app
from stem_cli.models import load_model
from stem_cli.registry import build_configs
from stem_cli.timing import Interval, StageTimer

runner = CliRunner()
SPARSE = ["--set", "block_size=16", "--set", "k_start=4", "--set", "dense_layers=[0]"]


def run(*args):
    return runner.invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def test_profile_cli_writes_json_and_plot(tmp_path):
    # --device cpu: this test checks the CPU path (notices, host-clock timings) on any machine.
    result = run("profile", "--model", "tiny-llama", "--device", "cpu", "--seq-len", "256,512", "--methods", "dense,stem",
                 "--warmup", "1", "--repeat", "3", "--output", str(tmp_path), *SPARSE)
    assert result.exit_code == 0, result.output
    assert "CPU timings" in result.output and "NVML skipped" in result.output
    (json_path,) = tmp_path.glob("profile-*-cpu-tiny-llama.json")
    (png_path,) = tmp_path.glob("profile-*-cpu-tiny-llama.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000
    data = json.loads(json_path.read_text())
    assert {"command", "timestamp", "model", "environment", "parameters", "timing", "rows"} <= set(data)
    assert data["schema_version"] == 1 and data["stem_version"] == stem_cli.__version__ and "git_commit" in data
    assert data["environment"]["device"] == "cpu" and "torch" in data["environment"]
    assert [(r["method"], r["seq_len"]) for r in data["rows"]] == [("dense", 256), ("stem", 256), ("dense", 512), ("stem", 512)]
    for row in data["rows"]:
        assert row["status"] == "ok" and row["repeats"] == 3
        assert row["e2e_min_ms"] <= row["e2e_ms"] <= row["e2e_max_ms"]
        parts = row["attention_ms"] + row["estimation_ms"] + row["other_ms"]
        assert parts == pytest.approx(row["e2e_ms"], rel=1e-6)
        assert row["attention_ms"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
    dense, stem = data["rows"][2], data["rows"][3]
    assert dense["speedup"] == pytest.approx(1.0) and dense["bud"] == pytest.approx(1.0)
    assert stem["speedup"] == pytest.approx(dense["e2e_ms"] / stem["e2e_ms"]) and 0 < stem["bud"] < 1
    assert stem["estimation_ms"] > dense["estimation_ms"]  # stem scores and selects; dense does not


@pytest.mark.parametrize("lengths,message", [("4kb", "4kb"), ("0", "0"), ("1m", "context")])
def test_profile_bad_lengths_exit_2(lengths, message, tmp_path):
    result = run("profile", "--model", "tiny-llama", "--seq-len", lengths, "--output", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in re.sub(r"\x1b\[[0-9;]*m", "", result.output)


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch):
    loaded = load_model("tiny-llama", device="cpu")
    real = profile_module._prefill_and_decode

    def flaky(model, ids):
        if model.config._attn_implementation == "stem":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79 GiB")
        return real(model, ids)

    monkeypatch.setattr(profile_module, "_prefill_and_decode", flaky)
    configs = build_configs(["dense", "stem", "streaming"], None, ["block_size=16"])
    rows = profile_module.profile_prefill(loaded.model, ["dense", "stem", "streaming"], configs, [200], warmup=0, repeat=1)
    assert [r["status"] for r in rows] == ["ok", "OOM", "ok"]
    assert rows[1]["failed_allocation_gib"] == pytest.approx(2.5) and rows[1]["speedup"] is None
    assert rows[2]["speedup"] > 0


def test_other_errors_are_not_swallowed(monkeypatch):
    loaded = load_model("tiny-llama", device="cpu")

    def broken(model, ids):
        raise ValueError("a real bug")

    monkeypatch.setattr(profile_module, "_prefill_and_decode", broken)
    with pytest.raises(ValueError, match="a real bug"):
        profile_module.profile_prefill(loaded.model, ["dense"], build_configs(["dense"]), [64], warmup=0, repeat=1)


def test_timers_on_cpu():
    device = torch.device("cpu")
    with Interval(device) as interval:
        time.sleep(0.02)
    assert 20 <= interval.ms() < 200
    timer = StageTimer(device)
    for _ in range(3):
        with timer.stage("a"):
            time.sleep(0.005)
    with timer.stage("b"):
        pass
    totals = timer.collect()
    assert totals["a"] >= 15 and totals["b"] < totals["a"]
    assert timer.collect() == {}  # collected intervals are not counted twice


def test_batch_of_two():
    loaded = load_model("tiny-llama", device="cpu")
    configs = build_configs(["dense", "stem"], None, ["block_size=16", "stem.k_start=4"])
    rows = profile_module.profile_prefill(loaded.model, ["dense", "stem"], configs, [160], batch=2, warmup=0, repeat=2)
    assert [r["batch"] for r in rows] == [2, 2]
    assert rows[0]["tokens_per_s"] == pytest.approx(2 * 160 / (rows[0]["e2e_ms"] / 1e3))
    assert 0 < rows[1]["bud"] < 1
