"""The `stem` command end to end (tiny random model, no downloads)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from stem_cli.cli import app

runner = CliRunner()


def run(*args, env=None):
    result = runner.invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    return result


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("command", [[], ["methods"], ["models"], ["models", "list"], ["models", "pull"], ["generate"], ["profile"],
                                     ["eval"], ["compare"], ["calibrate"], ["train-router"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    if not command:
        for sub in ("methods", "models", "generate", "profile", "eval", "compare", "calibrate", "train-router"):
            assert sub in text
    elif command != ["models"]:
        assert "Example:" in text


def test_methods_table_and_json():
    result = run("methods")
    assert result.exit_code == 0
    text = plain(result.output)
    for name in ("dense", "stem", "uniform", "sam", "streaming", "mu = 0.7", "beta = 0.2", "paper+code", "code"):
        assert name in text
    data = json.loads(run("methods", "--json").output)
    assert data["stem"]["parameters"]["schedule"]["default"] == "code"
    assert data["uniform"]["parameters"]["tpd"]["default"] is False
    assert data["sam"]["parameters"]["beta"]["default"] == 0.0
    assert data["stem"]["attn_implementation"] == "stem"


def test_models_list(tmp_path):
    result = run("models", "list", env={"STEM_CACHE_DIR": str(tmp_path)})
    assert result.exit_code == 0
    text = plain(result.output)
    for alias in ("llama3-8b", "qwen3-8b", "smollm2-135m", "gemma3-270m"):
        assert alias in text


def test_generate_end_to_end_tiny_model():
    result = run(
        "generate", "--model", "tiny-llama", "--needle", "1k", "--method", "dense,stem", "--method", "streaming",
        "--set", "block_size=16", "--set", "stem.k_start=4", "--set", "dense_layers=[0]", "--max-new-tokens", "4",
    )
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert {"dense", "stem", "streaming"} <= set(rows)
    assert "100.0%" in rows["dense"]
    bud = float(re.search(r"(\d+\.\d)%", rows["stem"]).group(1))
    assert 0 < bud < 100


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--set", "mu=1.5"], "mu=1.5"),
        (["--set", "beta=-1"], "beta=-1"),
        (["--set", "block_size=100"], "block_size=100"),
        (["--set", "stem.alpha=1"], "no parameter 'alpha'"),
        (["--needle", "4kb"], "4kb"),
        (["--model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
        (["--needle", "1m"], "context"),
        (["--dtype", "fp8"], "fp8"),
    ],
)
def test_bad_input_exits_2_with_message(args, message):
    result = run("generate", "--model", "tiny-llama", *args) if "--model" not in args else run("generate", *args)
    assert result.exit_code == 2, result.output
    assert message in plain(result.output).replace("\n", " ")


def test_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[stem]\nmu = 0\n")
    result = run("generate", "--model", "tiny-llama", "--config", str(bad))
    assert result.exit_code == 2 and "mu=0" in plain(result.output)
    good = tmp_path / "good.toml"
    good.write_text("[stem]\nblock_size = 16\nk_start = 3\ndense_layers = []\n")
    result = run("generate", "--model", "tiny-llama", "--config", str(good), "--needle", "600", "--method", "stem", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output


def test_pull_rejects_non_pullable_alias():
    result = run("models", "pull", "llama3-8b")
    assert result.exit_code == 2
    assert "smollm2-135m" in plain(result.output)
