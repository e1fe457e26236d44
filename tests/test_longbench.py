"""LongBench from local JSONL: prompts, middle truncation, metrics against hand-computed cases, resolve()."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from stem_cli.models import byte_tokenizer
from stem_cli.tasks import longbench as lb
from stem_cli.tasks.base import METRICS, score
from stem_cli.tasks.harness import TaskError

DATA = Path(__file__).parent / "data" / "longbench"
FIXTURES = ("hotpotqa", "gov_report", "trec", "passage_retrieval_en", "passage_count", "lcc", "triviaqa")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = byte_tokenizer()
    t.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    return t


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def long_record(n_words: int = 400) -> dict:
    context = " ".join(f"w{i:04d}" for i in range(n_words))
    return {"input": "Which word comes last?", "context": f"START {context} END", "answers": ["END"], "length": n_words,
            "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "long-1"}


# ------------------------------------------------------------------ subsets and samples


def test_subsets_are_longbench_v1_english_code_synthetic():
    assert set(lb.SUBSETS) == {
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
        "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    }
    assert set(lb.CHINESE_SUBSETS) == {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
    for name, spec in lb.ALL_SUBSETS.items():
        assert spec.metric in METRICS, name
        assert "{context}" in spec.template, name
    lengths = {name: spec.max_new_tokens for name, spec in lb.ALL_SUBSETS.items()}
    assert lengths["hotpotqa"] == 32 and lengths["narrativeqa"] == 128 and lengths["gov_report"] == 512
    assert lengths["trec"] == 64 and lengths["lcc"] == 64 and lengths["passage_count"] == 32 and lengths["samsum"] == 128


@pytest.mark.parametrize("subset", FIXTURES)
def test_build_samples_from_fixture(subset, tok):
    records = [json.loads(line) for line in (DATA / f"{subset}.jsonl").read_text().splitlines()]
    samples = lb.build_samples(subset, tok, 4096, data_dir=DATA, limit=None)
    assert len(samples) == len(records)
    spec = lb.SUBSETS[subset]
    for sample, record in zip(samples, records):
        assert sample.id == f"longbench/{subset}/{record['_id']}"
        assert sample.task == f"longbench/{subset}"
        assert sample.references == record["answers"]
        assert sample.metric == spec.metric and sample.max_new_tokens == spec.max_new_tokens
        assert sample.meta["truncated"] is False and sample.meta["all_classes"] == record["all_classes"]
        text = tok.decode(sample.input_ids)
        # LongBench's order: instruction, context, input, answer cue
        ctx, inp = text.find(record["context"].strip()), text.rfind(record["input"]) if record["input"] else len(text)
        assert 0 < ctx < inp <= len(text)
        assert text.rstrip().endswith(spec.cue.strip() or record["input"].strip())
    assert len(lb.build_samples(subset, tok, 4096, data_dir=DATA, limit=1)) == 1


def test_completion_subsets_skip_the_chat_template_by_default(chat_tok):
    qa = lb.build_samples("hotpotqa", chat_tok, 4096, data_dir=DATA)[0]
    few = lb.build_samples("trec", chat_tok, 4096, data_dir=DATA)[0]
    forced = lb.build_samples("trec", chat_tok, 4096, data_dir=DATA, use_chat_template=True)[0]
    assert chat_tok.decode(qa.input_ids).startswith("<|user|>") and qa.meta["chat_template"] is True
    assert chat_tok.decode(qa.input_ids).endswith("<|assistant|>Answer:")
    assert "<|user|>" not in chat_tok.decode(few.input_ids) and few.meta["chat_template"] is False
    assert chat_tok.decode(forced.input_ids).startswith("<|user|>")


# ------------------------------------------------------------------ middle truncation


def test_middle_truncate_keeps_first_and_last_halves():
    ids = list(range(100))
    assert lb.middle_truncate(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert lb.middle_truncate(ids, 11) == [0, 1, 2, 3, 4, 94, 95, 96, 97, 98, 99]
    assert lb.middle_truncate(ids, 100) == ids and lb.middle_truncate(ids, 500) == ids


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("seq_len", [300, 301, 1000])
def test_truncation_respects_seq_len_and_keeps_both_ends(tmp_path, tok, chat_tok, chat, seq_len):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [long_record()])
    t = chat_tok if chat else tok
    full = lb.build_samples("hotpotqa", t, 100_000, data_dir=tmp_path, use_chat_template=chat)[0]
    cut = lb.build_samples("hotpotqa", t, seq_len, data_dir=tmp_path, use_chat_template=chat)[0]
    assert full.meta["truncated"] is False and len(full.input_ids) > 1000
    assert len(cut.input_ids) == seq_len  # byte tokens: the cut is exact
    assert cut.meta["truncated"] is True and cut.meta["prompt_tokens_untruncated"] == len(full.input_ids)
    text = t.decode(cut.input_ids)
    user_full = lb.SUBSETS["hotpotqa"].template.format(context=long_record()["context"], input=long_record()["input"])
    user_ids = t(user_full, add_special_tokens=False)["input_ids"]
    fixed = len(full.input_ids) - len(user_ids)  # template, cue
    keep = seq_len - fixed
    head, tail = user_full.encode()[: keep // 2].decode(), user_full.encode()[len(user_ids) - (keep - keep // 2):].decode()
    assert head + tail in text  # exactly the first and last halves of the user text, middle gone
    assert "w0200" not in text and text.endswith("Answer:")
    assert text.startswith("<|user|>Answer the question") if chat else text.startswith("Answer the question")


def test_truncation_too_short_is_a_task_error(tmp_path, tok):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [long_record()])
    with pytest.raises(TaskError, match="seq-len 5"):
        lb.build_samples("hotpotqa", tok, 5, data_dir=tmp_path)


# ------------------------------------------------------------------ bad input


def test_missing_file_and_bad_records(tmp_path, tok):
    with pytest.raises(TaskError, match=r"qasper\.jsonl not found.*--data-dir"):
        lb.build_samples("qasper", tok, 4096, data_dir=tmp_path)
    (tmp_path / "qasper.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"], "_id": "1"}\nnot json\n')
    with pytest.raises(TaskError, match=r"qasper\.jsonl:2 is not a JSON line"):
        lb.build_samples("qasper", tok, 4096, data_dir=tmp_path)
    (tmp_path / "qasper.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(TaskError, match="lacks answers, _id"):
        lb.build_samples("qasper", tok, 4096, data_dir=tmp_path)
    with pytest.raises(TaskError, match="unknown LongBench subset 'nope'"):
        lb.build_samples("nope", tok, 4096, data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("jieba") is not None, reason="jieba is installed")
def test_chinese_subset_without_jieba_names_the_subset(tok):
    with pytest.raises(TaskError, match=r"'dureader'.*jieba"):
        lb.build_samples("dureader", tok, 4096, data_dir=DATA)


# ------------------------------------------------------------------ metrics


def test_normalize_answer():
    assert lb.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert lb.normalize_answer("An apple a day") == "apple day"
    assert lb.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_hand_computed():
    # pred tokens: river tamsin flows (3); ref: river tamsin (2); overlap 2 -> P 2/3, R 1 -> F1 0.8
    assert lb.qa_f1("The River Tamsin flows.", "the River Tamsin") == pytest.approx(0.8)
    # repeated tokens count once per occurrence on both sides: overlap min(2,1)=1 -> P 1/2, R 1/1 -> 2/3
    assert lb.qa_f1("pike pike", "Pike") == pytest.approx(2 / 3)
    assert lb.qa_f1("nothing shared", "Jonas Pike") == 0.0
    assert lb.qa_f1("", "Jonas Pike") == 0.0
    # max over references
    assert score("longbench_qa_f1", "Tamsin", ["the River Tamsin", "Tamsin"]) == 1.0
    assert score("longbench_qa_f1", "river", ["the River Tamsin", "Tamsin"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_first_line_rule_for_few_shot_subsets():
    meta = {"first_line": True}
    assert score("longbench_qa_f1", "\n\nthe Caucasus\nQuestion: next one", ["Caucasus"], meta) == 1.0
    assert score("longbench_qa_f1", "\n\nthe Caucasus\nQuestion: next one", ["Caucasus"], {}) < 1.0


def _lcs_brute(a: list, b: list) -> int:
    for k in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, k))
        if any(c in subs for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_against_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(60):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert lb.lcs_length(a, b) == _lcs_brute(a, b)


def test_rouge_l_hand_computed():
    # tokens: pred "the cat sat on the mat" (6), ref "the cat lay on a mat" (6); LCS the cat on mat = 4
    assert lb.rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(4 / 6)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert lb.rouge_l("grants training", "grants for staff training") == pytest.approx(2 / 3)
    assert lb.rouge_l("", "anything") == 0.0 and lb.rouge_l("!!!", "anything") == 0.0
    assert lb.rouge_tokens("Staff-training, 2024!") == ["staff", "training", "2024"]


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("The agency found grants went mostly to buildings.", "The agency found rural library grants went mostly to buildings."),
        ("Staff training gets a reserved share, the review says.", "The review recommends reserving a share for staff training."),
        ("a b c d e f", "f e d c b a"), ("no overlap here", "completely different words"),
    ]
    for pred, ref in pairs:
        assert lb.rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_classification_with_all_classes():
    classes = ["Location", "Other location", "Human being", "City"]
    meta = {"all_classes": classes}
    assert score("longbench_classification", "Location", ["Location"], meta) == 1.0
    # two classes named, the true one among them -> 1/2
    assert score("longbench_classification", "Human being or City", ["City"], meta) == 0.5
    # "Location" is inside "Other location"? no (case differs); "Other location" named, true class named too
    assert score("longbench_classification", "Other location", ["Other location"], meta) == 1.0
    # a class contained in the true class's name does not dilute it: "City" inside "Inner City"
    assert lb.classification("Inner City", "Inner City", ["City", "Inner City"]) == 1.0
    assert score("longbench_classification", "Human being", ["Location"], meta) == 0.0
    assert score("longbench_classification", "no idea", ["Location"], meta) == 0.0


def test_retrieval_and_count_number_extraction():
    assert score("longbench_retrieval", "Paragraph 2", ["Paragraph 2"]) == 1.0
    assert score("longbench_retrieval", "It is paragraph 2, not 12 or 3", ["Paragraph 2"]) == pytest.approx(1 / 3)
    assert score("longbench_retrieval", "Paragraph 21", ["Paragraph 2"]) == 0.0
    assert score("longbench_retrieval", "no number", ["Paragraph 2"]) == 0.0
    assert score("longbench_retrieval_zh", "答案是段落7", ["段落7"]) == 1.0
    assert score("longbench_count", "3", ["3"]) == 1.0
    assert score("longbench_count", "There are 3 unique paragraphs out of 4.", ["3"]) == 0.5
    assert score("longbench_count", "three", ["3"]) == 0.0


def test_code_sim_first_code_line_and_ratio():
    assert lb.first_code_line("\n```python\n# the area\n    return width * height\n```") == "    return width * height"
    assert lb.first_code_line("// only comments\n# here") == ""
    assert score("longbench_code_sim", "```\n    return width * height\n```", ["    return width * height"]) == 1.0
    # Indel ratio: 2 * LCS / total length; "abcd" vs "abxd": LCS 3 -> 6/8
    assert lb.indel_ratio("abcd", "abxd") == pytest.approx(0.75)
    for a, b in [("return x + y", "return x*y"), ("", "abc"), ("kitten", "sitting")]:
        assert lb.indel_ratio(a, b) == pytest.approx(2 * lb.lcs_length(a, b) / (len(a) + len(b)))


def test_metrics_score_fixture_answers_perfectly(tok):
    for subset in FIXTURES:
        for sample in lb.build_samples(subset, tok, 4096, data_dir=DATA):
            assert score(sample.metric, sample.references[0], sample.references, sample.meta) == 1.0, subset


# ------------------------------------------------------------------ resolve


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_resolve_local(tmp_path):
    assert lb.resolve(DATA) == "local"


def test_resolve_neither_names_both_ways(no_hub, tmp_path):
    for data_dir in (None, tmp_path / "empty", tmp_path / "missing"):
        if data_dir is not None and data_dir.name == "empty":
            data_dir.mkdir()
        with pytest.raises(TaskError) as err:
            lb.resolve(data_dir)
        message = str(err.value)
        assert "--data-dir" in message and "data.zip" in message  # the local way
        assert "lm-eval" in message and "hub" in message and "HF cache" in message  # the lm-eval way


def test_resolve_lm_eval_when_it_can_load(monkeypatch):
    monkeypatch.setattr(lb, "lm_eval_unavailable", lambda probe_timeout=3.0: None)
    assert lb.resolve(None) == "lm-eval"


def test_hf_cache_detection(no_hub):
    assert not lb._in_hf_cache("Xnhyacinth/LongBench")
    (no_hub / "hub" / "datasets--Xnhyacinth--LongBench" / "snapshots").mkdir(parents=True)
    assert lb._in_hf_cache("Xnhyacinth/LongBench")
    assert not lb._in_hf_cache("someone/Other")
    (no_hub / "datasets" / "someone___other_set").mkdir(parents=True)
    assert lb._in_hf_cache("someone/OtherSet")


def test_offline_without_cache_is_detected_without_network(no_hub, monkeypatch):
    import time

    monkeypatch.setattr(lb, "_hub_problem", lambda repo, timeout: pytest.fail("probed the hub while offline"))
    real = importlib.util.find_spec
    monkeypatch.setattr(lb.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("lm_eval", "jieba", "fuzzywuzzy", "rouge") else real(name, *a))
    start = time.perf_counter()
    reason = lb.lm_eval_unavailable()
    assert "offline" in reason and time.perf_counter() - start < 1.0
