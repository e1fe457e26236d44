"""Issue 16's errors and habits: one error style, names checked before anything loads, tables that fit 80 columns.

Each test failed before the fix it names. Tiny random models (`tiny-llama`), no downloads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings

import pytest
from rich.console import Console
from typer.testing import CliRunner

from stem_cli.cli import app

SMALL = ["--set", "block_size=16", "--set", "dense_layers=[0]", "--set", "k_start=4"]


def run(*args, env=None):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "80", **(env or {})})


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def one_error_line(result) -> str:
    """The error of a refused command: one line, 'error: ...', the last thing printed (notices may come first)."""
    lines = [line for line in plain(result.output).splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, result.output
    assert not any(line.startswith(("│", "╭", "Usage:")) for line in lines), result.output
    return lines[-1]


# ------------------------------------------------------------------ errors


def test_messages_print_brackets_as_written(monkeypatch):
    """`pip install 'stem-cli[lmeval]'` used to print as `pip install 'stem-cli'` (rich markup)."""
    from stem_cli.tasks import harness

    def missing(include_path=None, include_defaults=True):
        raise harness.TaskError(f"lm-eval is not installed: {harness.INSTALL_HINT}")

    monkeypatch.setattr(harness, "task_manager", missing)
    result = run("eval", "--model", "tiny-llama", "--task", "gsm8k", "--seq-len", "1k")
    assert "pip install 'stem-cli[lmeval]'" in " ".join(plain(result.output).split())


@pytest.mark.parametrize("args,line", [
    (["eval", "--limit", "0"], "error: --limit 0 is not allowed: use an integer >= 1"),
    (["eval", "--limit=-3"], "error: --limit -3 is not allowed: use an integer >= 1"),
    (["eval", "--budget", "abc"], "error: --budget abc is not allowed: use a number"),
    (["calibrate", "--target-sparsity", "1.5"], "error: --target-sparsity 1.5 is not allowed: use a number from 0.0 to 1.0"),
    (["eval", "--limt", "3"], "error: stem eval has no option --limt; did you mean --limit?"),
    (["compare"], "error: stem compare: missing argument 'methods'"),
    (["nosuchcommand"], "error: stem: no such command 'nosuchcommand'"),
])
def test_parser_errors_are_one_line_exit_2(args, line):
    assert one_error_line(run(*args)).startswith(line)


def test_help_and_version_still_exit_0():
    assert run("--help").exit_code == 0 and run("eval", "--help").exit_code == 0
    assert run("--version").exit_code == 0


def _no_model_load(monkeypatch):
    import stem_cli.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the names were checked")

    monkeypatch.setattr(stem_cli.models, "load_model", refuse)
    monkeypatch.setattr(stem_cli.models, "_load_pretrained", refuse)


class FakeManager:
    all_tasks = ["gsm8k", "hellaswag", "niah_single_1", "ruler"]


def test_mistyped_task_is_refused_before_the_model_loads_with_close_names(monkeypatch):
    from stem_cli.tasks import harness

    _no_model_load(monkeypatch)
    monkeypatch.setattr(harness, "task_manager", lambda include_path=None, include_defaults=True: FakeManager())
    line = one_error_line(run("eval", "--model", "tiny-llama", "--task", "nia", "--seq-len", "1k"))
    assert "unknown task 'nia'" in line and "did you mean niah" in line
    line = one_error_line(run("compare", "stem", "--model", "tiny-llama", "--task", "gsm8kk", "--seq-len", "1k"))
    assert "gsm8k" in line
    line = one_error_line(run("eval", "--model", "tiny-llama", "--task", "ruler/vtt"))
    assert "did you mean ruler/vt" in line


def test_lm_eval_index_is_asked_only_for_names_that_are_not_built_in(monkeypatch):
    from stem_cli.runs.task_names import check_lm_eval_tasks, resolve_tasks
    from stem_cli.tasks import harness

    asked = []
    monkeypatch.setattr(harness, "task_manager", lambda include_path=None, include_defaults=True: asked.append(1) or FakeManager())
    check_lm_eval_tasks(resolve_tasks(["ruler,niah,fidelity,ppl,ruler/vt"]))
    assert asked == []
    check_lm_eval_tasks(resolve_tasks(["gsm8k"]))
    assert asked == [1]


def test_tasks_command_lists_built_in_tasks_and_lm_eval():
    result = run("tasks", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    for name in ("ruler/niah_single_1", "ruler/vt", "longbench/hotpotqa", "fidelity", "ppl", "string_match_all", "lm-eval"):
        assert name in text
    data = json.loads(run("tasks", "--json").output)
    rows = {r["task"]: r for r in data["tasks"]}
    assert rows["ruler/vt"]["answer_tokens"] == 30 and rows["ruler/vt"]["metric"] == "string_match_all"
    assert rows["longbench/hotpotqa"]["answer_tokens"] == 32
    assert set(data["lm_eval"]) >= {"installed", "version"}


@pytest.mark.parametrize("name", ["./nosuchdir", "/no/such/dir", "~/no-such-model.gguf", "a/b/c"])
def test_local_looking_model_that_does_not_exist_is_a_local_error(monkeypatch, name):
    _no_model_load(monkeypatch)
    line = one_error_line(run("eval", "--model", name, "--task", "niah"))
    assert "no such file or directory" in line and "licence" not in line
    assert "no such file or directory" in " ".join(plain(run("generate", "--model", name).output).split())


def test_hub_model_offline_is_refused_at_once(monkeypatch):
    _no_model_load(monkeypatch)
    start = time.perf_counter()
    line = one_error_line(run("eval", "--model", "nosuchmodel", "--task", "niah"))
    assert "HF_HUB_OFFLINE" in line and "not in the local Hugging Face cache" in line
    line = one_error_line(run("eval", "--model", "smolm2-135m", "--task", "niah"))
    assert "did you mean smollm2-135m" in line
    assert time.perf_counter() - start < 10  # no hub retries (they took 35 s)


def test_unreachable_hub_is_found_by_a_quick_probe(monkeypatch):
    from stem_cli.models import ModelError, check_model_name, hub_unreachable

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read from the environment once, at import: maybe by another test
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert "127.0.0.1 is not reachable" in hub_unreachable()
    with pytest.raises(ModelError, match="cannot be reached"):
        check_model_name("org/model-nobody-has")
    check_model_name("tiny-llama")  # built in: never asks the hub
    check_model_name("llama3-8b", random_weights=True)  # a shipped config


@pytest.mark.parametrize("args", [["--prompt", ""], ["--prompt", "   \n"], ["--prompt-file", "EMPTY"]])
def test_empty_prompt_is_refused(tmp_path, monkeypatch, args):
    _no_model_load(monkeypatch)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    line = one_error_line(run("generate", "--model", "tiny-llama", *args))
    assert "empty" in line


# ------------------------------------------------------------------ habits


def test_no_past_key_values_warning_and_bud_100_is_marked(tmp_path):
    """Stem at a length its start budget covers keeps every block: marked in the table and said in a notice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("generate", "--model", "tiny-llama", "--needle", "600", "--method", "dense,stem", "--max-new-tokens", "3",
                     "--set", "block_size=64", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    text = plain(result.output)
    assert "past_key_values" not in text
    stem_row = next(line for line in text.splitlines() if line.startswith("│ stem"))
    assert "100.0% (all blocks)" in stem_row
    assert "notice: stem keeps every block" in " ".join(text.split())
    dense_row = next(line for line in text.splitlines() if line.startswith("│ dense"))
    assert "all blocks" not in dense_row


def test_greedy_passes_the_cache_by_its_current_name():
    import inspect

    from stem_cli.generation import with_cache
    from stem_cli.models import load_model

    model = load_model("tiny-llama", device="cpu").model
    (name,) = with_cache(model, object())
    assert name in inspect.signature(model.forward).parameters


def _flat(methods=("dense", "stem", "uniform", "xattention")):
    return [{"method": m, "seq_len": 4096, "niah_single_1": 0.8, "niah_multikey_2": 0.6, "vt": 0.6, "cwe": 0.123, "average": 0.5,
             "delta_vs_dense": None if m == "dense" else -0.05, "bud": 1.0 if m in ("dense", "stem") else 0.3, "omega": None,
             "delta": None, "reanchor": None, "knob": None if m == "dense" else f"threshold_tau=0.9512{len(m)}",
             "estimation_ms": 12.3, "attention_ms": 1234.5, "e2e_ms": 12345.6, "speedup": 1.23} for m in methods]


def test_compare_table_at_80_columns_never_breaks_a_number():
    from stem_cli.report.tables import compare_table

    console = Console(width=80, record=True, force_terminal=False)
    console.print(compare_table(_flat(), "stem compare: smollm2-135m, equal budget 30% (scores in %)"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for cell in ("threshold_tau=0.95127", "12345.6", "1234.5", "1.23x", "-5.0", "niah_single_1", "100.0 (all blocks)", "xattention"):
        assert cell in text, cell
    assert "…" not in text
    wide = Console(width=300, record=True, force_terminal=False)
    wide.print(compare_table(_flat(), "t"))
    assert len([line for line in wide.export_text().splitlines() if line.startswith("┏")]) == 1  # one table when it fits


def test_eval_writes_markdown_and_csv_like_compare(tmp_path):
    result = run("eval", "--model", "tiny-llama", "--task", "ruler/niah_single_1", "--seq-len", "600", "--method", "dense,stem",
                 "--limit", "1", "--max-new-tokens", "2", *SMALL, "--device", "cpu", "--output", str(tmp_path), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (md,) = tmp_path.glob("eval-tiny-llama-*.md")
    (csv_file,) = tmp_path.glob("eval-tiny-llama-*.csv")
    assert md.read_text().startswith("`stem") and "| method |" in md.read_text()
    lines = csv_file.read_text().splitlines()
    assert lines[0].startswith("method,seq_len,n,niah_single_1") and [x.split(",")[0] for x in lines[1:]] == ["dense", "stem"]
    text = " ".join(plain(result.output).split())
    assert "plan: up to 2 generation(s) (1 task(s) x 1 sample(s) x 2 method(s) at 600)" in text
    assert re.search(r"estimate: [\d.]+ s per generation measured on the first 2", text)


def test_models_list_says_what_the_weights_are():
    text = " ".join(plain(run("models", "list", env={"COLUMNS": "200"}).output).split())
    assert "Q4_1 GGUF, dequantized to fp32" in text and "Q4_K_M GGUF" in text
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "Q4_1" in readme and "dequantized to fp32" in readme


def test_help_is_fast():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stem_cli.cli", "--help"], capture_output=True, check=True, env={"COLUMNS": "80", "PATH": ""})
    assert time.perf_counter() - start < 2.0
