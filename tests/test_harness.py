"""The lm-eval bridge on the tiny random model with local task YAMLs (tests/data/lmeval_tasks)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import stem_cli
from stem_cli.tasks import harness
from stem_cli.tasks.harness import TaskError, run_lm_eval

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lmeval_tasks"
QA, CHOICE = "stem_tiny_qa", "stem_tiny_choice"  # 5 generate_until docs, 4 multiple-choice docs (12 loglikelihoods)


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(TaskError, match=r"lm-eval is not installed: pip install 'stem-cli\[lmeval\]'"):
        run_lm_eval(None, None, [QA], limit=None, seed=0, max_length=None, cache_path=None, log_samples_to=None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Run from the repository root (the task YAMLs' data_files are relative) with datasets' cache in a temp dir."""
    try:
        harness.require_lm_eval()
    except TaskError as e:
        pytest.skip(str(e))
    import datasets

    old_cwd, old_cache = os.getcwd(), datasets.config.HF_DATASETS_CACHE
    os.chdir(ROOT)
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    yield
    os.chdir(old_cwd)
    datasets.config.HF_DATASETS_CACHE = old_cache


@pytest.fixture(scope="module")
def loaded(env):
    from stem_cli.models import load_model

    return load_model("tiny-llama", random_weights=True, device="cpu", dtype="fp32")


class Counter:
    """Counts (and can fail) the model's forward calls."""

    def __init__(self, model, fail_at: int | None = None):
        self.model, self.calls, self.fail_at = model, 0, fail_at
        self.original = model.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError("simulated crash in the model")
            return self.original(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward  # back to the class's forward
        return False


def run(loaded, tasks, cache=None, records=None, **kw):
    return run_lm_eval(loaded.model, loaded.tokenizer, tasks, limit=kw.pop("limit", None), seed=0, max_length=256,
                       cache_path=cache, log_samples_to=None if records is None else records.append,
                       include_path=TASKS, include_defaults=False, **kw)


@pytest.mark.parametrize("method", ["stem", "dense"])
def test_patched_model_runs_local_tasks_with_sample_records(loaded, method):
    params = {"block_size": 16} if method == "stem" else {}
    runtime = stem_cli.apply(loaded.model, method, **params)
    runtime.recorder.reset()
    records = []
    out = run(loaded, [QA, CHOICE], records=records)
    assert set(out) == {QA, CHOICE}
    assert 0.0 <= out[QA]["exact_match"] <= 1.0 and 0.0 <= out[CHOICE]["acc"] <= 1.0
    assert not any("," in k for k in out[QA])  # ",none" dropped
    assert runtime.recorder.calls > 0  # lm-eval's forwards went through the method
    assert loaded.model.config._attn_implementation == runtime.method.attn_implementation  # patch untouched
    qa = [r for r in records if r["task"] == QA]
    choice = [r for r in records if r["task"] == CHOICE]
    assert sorted(r["doc_id"] for r in qa) == list(range(5)) and sorted(r["doc_id"] for r in choice) == list(range(4))
    first = min(qa, key=lambda r: r["doc_id"])
    assert first["prompt"] == "Q: What colour is the sky on a clear day?\nA:" and first["target"] == "blue"
    assert isinstance(first["prediction"], str) and set(first["metrics"]) == {"exact_match"}
    assert first["arguments"][0][0]["max_gen_toks"] == 8
    mc = min(choice, key=lambda r: r["doc_id"])
    assert mc["prompt"] == "The cat sat on the" and mc["arguments"] == [[" mat"], [" moon"], [" idea"]]
    assert len(mc["prediction"]) == 3 and mc["target"] == 0 and mc["metrics"]["acc"] in (0.0, 1.0)


def test_second_run_answers_from_the_cache(loaded, tmp_path, capfd):
    stem_cli.apply(loaded.model, "stem", block_size=16)
    cache = tmp_path / "stem.sqlite"
    first, second = [], []
    with Counter(loaded.model) as c1:
        out1 = run(loaded, [QA, CHOICE], cache=cache, records=first, limit=3)
    capfd.readouterr()
    with Counter(loaded.model) as c2:
        out2 = run(loaded, [QA, CHOICE], cache=cache, records=second, limit=3)
    err = capfd.readouterr().err
    assert c1.calls > 0 and c2.calls == 0
    assert out1 == out2 and first == second
    assert harness.cache_file(cache).is_file()
    # the console stays clean: no lm-eval INFO lines, no progress bars
    assert "Checking cached requests" not in err and "INFO" not in err and "pretrained" not in err


def test_interrupted_run_resumes_where_it_stopped(loaded, tmp_path):
    stem_cli.apply(loaded.model, "stem", block_size=16)
    cache = tmp_path / "stem.sqlite"
    # 5 loglikelihood requests answered, the 6th crashes: the model's error, not a TaskError
    with Counter(loaded.model, fail_at=6), pytest.raises(RuntimeError, match="simulated crash"):
        run(loaded, [CHOICE], cache=cache)
    with Counter(loaded.model) as again:
        out = run(loaded, [CHOICE], cache=cache)
    assert again.calls == 12 - 5  # only the unanswered requests reach the model
    assert 0.0 <= out[CHOICE]["acc"] <= 1.0


def test_cache_of_another_method_is_refused(loaded, tmp_path):
    cache = tmp_path / "one.sqlite"
    stem_cli.apply(loaded.model, "dense")
    run(loaded, [CHOICE], cache=cache, limit=1)
    stem_cli.apply(loaded.model, "stem", block_size=16)
    with pytest.raises(TaskError, match=r"holds answers for another run.*method: 'dense' there, 'stem' now"):
        run(loaded, [CHOICE], cache=cache, limit=1)
    stem_cli.apply(loaded.model, "stem", block_size=32)  # same method, other config: refused too
    run(loaded, [CHOICE], cache=tmp_path / "two.sqlite", limit=1)
    stem_cli.apply(loaded.model, "stem", block_size=16)
    with pytest.raises(TaskError, match="config"):
        run(loaded, [CHOICE], cache=tmp_path / "two.sqlite", limit=1)


def test_unknown_task_is_a_task_error_with_lm_evals_message(loaded):
    with pytest.raises(TaskError) as err:
        run(loaded, ["no_such_task_for_stem"])
    message = str(err.value)
    assert "KeyError" in message and "no_such_task_for_stem" in message  # lm-eval's own exception
    assert "no lm-eval task, group or tag is named 'no_such_task_for_stem'" in message
    assert "include_path" in message  # and our advice


def test_missing_include_path_is_a_task_error(loaded, tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        run_lm_eval(loaded.model, loaded.tokenizer, [QA], limit=1, seed=0, max_length=256, cache_path=None,
                    log_samples_to=None, include_path=tmp_path / "nowhere", include_defaults=False)
