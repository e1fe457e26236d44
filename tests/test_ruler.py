"""RULER's synthetic tasks: lengths, determinism, and answers recovered from the prompt text.

The checks parse the decoded prompt with brute-force parsers written here (regular
expressions, Counter, a chain resolver), so they test what a model would read, not what
the generator meant to write. The byte tokenizer of test_needle keeps them fast; the real
SmolLM2 tokenizer runs in a slow test where its converted copy is cached.
"""

import json
import re
import time
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stem_cli.tasks import ruler
from stem_cli.tasks.base import METRICS, score, string_match_all, string_match_part
from stem_cli.tasks.needle import haystack_sentences
from test_needle import TINY_CHAT_TEMPLATE, byte_tokenizer

NIAH_TASKS = ruler.GROUPS["niah"]
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.(?=\s|$)")
VT_RE = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return byte_tokenizer(TINY_CHAT_TEMPLATE)


def text_of(tokenizer, sample):
    return tokenizer.decode(sample.input_ids)


def between(text, start, end):
    """The text after the last `start` and before the next `end`."""
    i = text.rindex(start) + len(start)
    return text[i : text.index(end, i)]


def join_keys(keys):
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def question_and_prefix(sample):
    """What the prompt must end with: the question (end of the user turn) and the answer prefix."""
    task, meta = sample.task, sample.meta
    if task in NIAH_TASKS:
        kind, query = ruler.NIAH[task].value_kind, join_keys(meta["queries"])
        return ruler.NIAH_QUESTION.format(kind=kind, query=query), ruler.NIAH_PREFIX.format(kind=kind, query=query)
    if task == "vt":
        return ruler.VT_QUESTION.format(value=meta["value"]), ruler.VT_PREFIX.format(count=5, value=meta["value"])
    if task == "cwe":
        return ruler.CWE_QUESTION.format(count=10), ruler.CWE_PREFIX.format(count=10)
    return ruler.FWE_QUESTION, ruler.FWE_PREFIX


# ---------------------------------------------------------------------------- brute-force checkers


def check_niah(text, sample):
    spec = ruler.NIAH[sample.task]
    kind = spec.value_kind
    question, _ = question_and_prefix(sample)
    context = between(text, ruler.NIAH_INSTRUCTION.format(kind=kind) + "\n\n", "\n\n" + question)
    needles = NEEDLE_RE.findall(context)
    assert {k for k, _, _ in needles} == {kind}
    queries = sample.meta["queries"]
    assert len(queries) == spec.n_queries == len(set(queries))

    # every key and value is well formed and every value is distinct
    for _, key, value in needles:
        if spec.key_kind == "words":
            adjective, noun = key.split("-")
            assert adjective in ruler.ADJECTIVES and noun in ruler.NOUNS
        else:
            assert UUID_RE.fullmatch(key)
        assert re.fullmatch(r"[1-9]\d{6}", value) if kind == "numbers" else UUID_RE.fullmatch(value)
    values = [v for _, _, v in needles]
    assert len(set(values)) == len(values)

    # the references are exactly the values written right after the queried keys
    found = [v for q in queries for _, k, v in needles if k == q]
    assert sorted(found) == sorted(sample.references)
    assert len(sample.references) == spec.n_queries * spec.n_values
    for q in queries:
        assert context.count(q) == spec.n_values  # the key occurs only in its own needles
        assert text.count(q) == spec.n_values + 2  # ... and in the question and the answer prefix
    for _, k, v in needles:
        if k in queries:
            assert text.count(ruler.NIAH_NEEDLE.format(kind=kind, key=k, value=v)) == 1
    for ref in sample.references:
        assert text.count(ref) == 1

    # the haystack is of the kind the task says
    keys = [k for _, k, _ in needles]
    if spec.haystack == "needle":
        lines = context.split("\n")
        assert all(NEEDLE_RE.fullmatch(line) for line in lines)
        assert len(lines) == sample.meta["haystack_units"] + 1 and len(set(keys)) == len(keys)
    else:
        assert len(needles) == spec.n_keys * spec.n_values and len(set(keys)) == spec.n_keys
        rest = NEEDLE_RE.sub("", context)
        rest = re.sub(" +", " ", rest).strip()
        if spec.haystack == "noise":
            assert set(re.findall(r"[^.]+\.", rest)) <= {" " + s for s in ruler.NOISE} | set(ruler.NOISE)
            assert not re.search(r"\d", rest)
        else:  # a contiguous run of prose sentences, wrapping around the pool
            pool = haystack_sentences()
            i = 0 if not rest else next(i for i, s in enumerate(pool) if rest.startswith(s + " ") or rest == s)
            count = 0
            while rest:
                assert rest.startswith(pool[i]), rest[:80]
                rest = rest[len(pool[i]) :].lstrip(" ")
                i, count = (i + 1) % len(pool), count + 1
            assert count == sample.meta["haystack_units"]

    # a single needle sits at its depth
    if len(needles) == 1 and sample.meta["haystack_units"] >= 20:
        needle = ruler.NIAH_NEEDLE.format(kind=kind, key=needles[0][1], value=needles[0][2])
        where = context.index(needle) / max(len(context) - len(needle), 1)
        assert abs(where - sample.meta["depths"][0]) <= 0.06


def resolve_chain(context):
    """{variable: value} from the VAR statements, each resolved from those before it."""
    value = {}
    for name, source, number in VT_RE.findall(context):
        assert name not in value  # assigned once
        value[name] = number or value[source]  # a KeyError here: used before it was assigned
    return value


def check_vt(text, sample):
    question, _ = question_and_prefix(sample)
    context = between(text, ruler.VT_INSTRUCTION + "\n\n", "\n\n" + question)
    query = re.search(r"assigned the value (\d{5}) in the text above\.$", question).group(1)
    value = resolve_chain(context)
    holders = [name for name, v in value.items() if v == query]
    assert sorted(holders) == sorted(sample.references) and len(holders) == 5
    assert len(value) == 5  # one chain of four hops
    assert context.count(query) == 1
    rest = re.sub(" +", " ", VT_RE.sub("", context)).strip()
    assert {s.strip() for s in re.findall(r"[^.]+\.", rest)} <= set(ruler.NOISE)
    # the worked example comes first, with a chain of its own, and resolves to its answer
    example = text[: text.rindex(ruler.VT_INSTRUCTION)]
    ex_value = resolve_chain(between(example, ruler.VT_INSTRUCTION + "\n\n", "\n\nQuestion:"))
    ex_answer = example.rstrip().rsplit("they are:", 1)[1].split()
    assert sorted(ex_answer) == sorted(ex_value) and len(set(ex_value.values())) == 1
    assert not set(ex_value) & set(value) and query not in example


def check_cwe(text, sample):
    question, _ = question_and_prefix(sample)
    listing = between(text, ruler.CWE_INSTRUCTION + "\n\n", "\n\n" + question)
    entries = re.findall(r"(\d+)\. ([a-z]+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    assert listing == " ".join(f"{i}. {w}" for i, w in entries)
    counts = Counter(w for _, w in entries).most_common()
    assert {w for w, _ in counts[:10]} == set(sample.references) and len(sample.references) == 10
    assert counts[9][1] > counts[10][1]
    assert {c for _, c in counts[:10]} == {sample.meta["freq_common"]}
    assert {c for _, c in counts[10:]} == {sample.meta["freq_rare"]}
    assert len(counts) - 10 == sample.meta["rare_words"] >= 10
    words = [w for w, _ in counts]
    assert not any(a in b for a in words for b in words[:10] if a != b)  # no answer is part of another word
    example = text[: text.rindex(ruler.CWE_INSTRUCTION)]
    assert not set(re.findall(r"\b[a-z]{6}\b", example)) & set(words)


def check_fwe(text, sample):
    coded = between(text, ruler.FWE_INSTRUCTION + "\n\n", "\n\n" + ruler.FWE_QUESTION).split(" ")
    assert all(w == ruler.FWE_DOTS or re.fullmatch(r"[a-z]{6}", w) for w in coded)
    assert len(coded) == sample.meta["words"]
    counts = Counter(w for w in coded if w != ruler.FWE_DOTS).most_common()
    assert [w for w, _ in counts[:3]] == sample.references
    assert counts[2][1] > counts[3][1]
    assert Counter(coded).most_common(1)[0][0] == ruler.FWE_DOTS


def check(tokenizer, sample):
    text = text_of(tokenizer, sample)
    {"vt": check_vt, "cwe": check_cwe, "fwe": check_fwe}.get(sample.task, check_niah)(text, sample)
    question, prefix = question_and_prefix(sample)
    assert question in text and text.endswith(prefix)
    return text


# ---------------------------------------------------------------------------- the tests


def test_names_and_groups():
    assert ruler.TASKS == (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
    )
    assert ruler.GROUPS == {"ruler": ruler.TASKS, "niah": ruler.TASKS[:8]}
    assert set(ruler.NIAH) == set(NIAH_TASKS)


@pytest.mark.parametrize("task", ruler.TASKS)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.sampled_from([4096, 8192]))
@settings(max_examples=4, deadline=None)
def test_answers_are_recoverable_from_the_prompt(tok, task, seed, seq_len):
    sample = ruler.build_sample(task, tok, seq_len, seed=seed, index=seed % 5)
    check(tok, sample)
    assert 0.95 * seq_len <= len(sample.input_ids) <= seq_len
    assert sample.input_ids[0] == tok.bos_token_id  # no chat template: the tokenizer adds its BOS
    assert sample.meta["n_tokens"] == len(sample.input_ids)
    json.dumps(sample.meta)


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("seq_len", [2048, 16384])
def test_lengths(tok, task, seq_len):
    for sample in ruler.build_samples(task, tok, seq_len, seed=seq_len, limit=2 if seq_len < 4096 else 1):
        assert len(sample.input_ids) <= seq_len
        # a byte per token: one haystack unit (a prose sentence, a uuid needle) can take 5% of 2K
        assert len(sample.input_ids) >= (0.95 * seq_len if seq_len > 4096 else seq_len - 250)
        check(tok, sample)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_deterministic_by_seed_and_independent_of_limit(tok, task):
    first = ruler.build_samples(task, tok, 3000, seed=7, limit=3)
    again = ruler.build_samples(task, tok, 3000, seed=7, limit=3)
    assert [s.id for s in first] == [f"{task}/3000/7/{i}" for i in range(3)]
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.references for s in first] == [s.references for s in again]
    assert ruler.build_sample(task, tok, 3000, seed=7, index=2).input_ids == first[2].input_ids
    assert ruler.build_samples(task, tok, 3000, seed=7, limit=1)[0].input_ids == first[0].input_ids
    other = ruler.build_samples(task, tok, 3000, seed=8, limit=3)
    assert all(a.input_ids != b.input_ids and a.references != b.references for a, b in zip(first, other))
    assert len({tuple(s.references) for s in first}) == 3  # samples differ from each other
    assert all(s.metric == "string_match_all" and s.metric in METRICS for s in first)
    assert {s.max_new_tokens for s in first} == {{"vt": 30, "cwe": 120, "fwe": 50}.get(task, 128)}
    assert all(s.task == task and s.seq_len == 3000 for s in first)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_chat_template_and_completion(chat_tok, task):
    chat = ruler.build_sample(task, chat_tok, 4096, seed=3, index=0)  # None: the template is used
    plain = ruler.build_sample(task, chat_tok, 4096, seed=3, index=0, use_chat_template=False)
    question, prefix = question_and_prefix(chat)
    chat_text, plain_text = check(chat_tok, chat), check(chat_tok, plain)
    assert chat_text.startswith("<|user|>\n") and chat_text.endswith(f"{question}\n<|assistant|>\n{prefix}")
    assert chat_tok.bos_token_id not in chat.input_ids  # the template writes any BOS itself
    assert plain_text.endswith(f"{question} {prefix}") and "<|user|>" not in plain_text
    assert plain.input_ids[0] == chat_tok.bos_token_id
    if task != "fwe":  # only the amount of haystack may differ (and with it, fwe's counts)
        assert chat.references == plain.references
    for sample in (chat, plain):
        assert 0.95 * 4096 <= len(sample.input_ids) <= 4096


@pytest.mark.parametrize("task", ruler.TASKS)
def test_too_short_names_the_minimum(tok, task):
    with pytest.raises(ValueError, match=r"too small for .* minimum seq_len is (\d+)") as err:
        ruler.build_sample(task, tok, 200, seed=0, index=0)
    minimum = int(re.search(r"minimum seq_len is (\d+)", str(err.value)).group(1))
    assert minimum > 200
    for seed in range(4):  # other samples, with other keys and words, fit too
        sample = ruler.build_sample(task, tok, minimum, seed=seed, index=seed)
        assert len(sample.input_ids) <= minimum
        check(tok, sample)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown RULER task 'niah'.*niah_single_1, .*vt, cwe, fwe"):
        ruler.build_samples("niah", tok, 4096)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.build_sample("qa_1", tok, 4096, seed=0, index=0)
    with pytest.raises(ValueError, match="seq_len"):
        ruler.build_sample("vt", tok, 0, seed=0, index=0)
    assert ruler.build_samples("vt", tok, 4096, limit=0) == []


def test_running_out_of_distractor_keys_is_an_error(tok, monkeypatch):
    monkeypatch.setattr(ruler, "ADJECTIVES", ruler.ADJECTIVES[:2])
    monkeypatch.setattr(ruler, "N_KEYS", 2 * len(ruler.NOUNS))
    check(tok, ruler.build_sample("niah_multikey_2", tok, 8192, seed=0, index=0))
    with pytest.raises(ValueError, match="too large for niah_multikey_2.*distinct keys"):
        ruler.build_sample("niah_multikey_2", tok, 32768, seed=0, index=0)


def test_cwe_uses_rulers_frequencies(tok):
    long = ruler.build_sample("cwe", tok, 8192, seed=0, index=0)
    short = ruler.build_sample("cwe", tok, 2048, seed=0, index=0)
    assert (long.meta["freq_common"], long.meta["freq_rare"]) == (30, 3)
    assert (short.meta["freq_common"], short.meta["freq_rare"]) == (6, 1)


def test_needle_depths_spread_over_the_haystack(tok):
    depths = [ruler.build_sample("niah_single_2", tok, 4096, seed=0, index=i).meta["depths"][0] for i in range(12)]
    assert len(set(depths)) >= 6 and min(depths) < 0.4 and max(depths) > 0.6
    assert all(round(d * 100) in ruler.DEPTHS for d in depths)  # RULER's 40 depths
    multi = ruler.build_sample("niah_multivalue", tok, 4096, seed=0, index=0).meta["depths"]
    assert len(set(multi)) == 4 and multi == sorted(multi)


def test_word_lists():
    prose = {w.lower() for s in haystack_sentences() for w in re.findall(r"[A-Za-z]+", s)}
    words = [*ruler.ADJECTIVES, *ruler.NOUNS]
    assert len(set(words)) == len(words) and all(w.isalpha() and w.islower() for w in words)
    assert not set(words) & prose
    assert not [(a, b) for a in words for b in words if a != b and a in b]  # no key is part of another
    assert ruler.N_KEYS >= 10_000


def test_scorers():
    refs = ["1234567", "7654321"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert string_match_all("1234567 only", refs) == 0.5
    assert string_match_all("", refs) == 0.0
    assert string_match_part("1234567 only", refs) == 1.0
    assert string_match_part("nothing here", refs) == 0.0
    u = str(uuid.UUID(int=12345, version=4))
    assert score("string_match_all", u.upper(), [u]) == 1.0  # case-insensitive
    assert score("string_match_all", "ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="string_match_all"):
        score("nope", "x", ["x"])


def test_a_sample_scores_one_with_its_references_and_less_without(tok):
    for task in ruler.TASKS:
        sample = ruler.build_sample(task, tok, 4096, seed=1, index=0)
        assert score(sample.metric, " " + ", ".join(sample.references) + ".", sample.references) == 1.0
        assert score(sample.metric, " ".join(sample.references[1:]), sample.references) < 1.0


# ---------------------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):  # pulled and converted on a fresh cache by tests/conftest.py's fixture
    tokenizer = smollm2.tokenizer
    assert tokenizer.chat_template and tokenizer.is_fast
    for seq_len, limit_s in ((1024, 2.0), (4096, 2.0), (16384, 6.0)):  # wall clock, on a busy CPU too
        for task in ruler.TASKS:
            started = time.perf_counter()
            sample = ruler.build_sample(task, tokenizer, seq_len, seed=seq_len, index=0)
            assert time.perf_counter() - started < limit_s, (task, seq_len)
            n = len(sample.input_ids)
            # a uuid needle takes ~65 tokens, more than 5% of 1024
            assert n <= seq_len and n >= (seq_len - 80 if task == "niah_multikey_3" else 0.95 * seq_len), (task, n)
            text = check(tokenizer, sample)
            assert text.startswith("<|im_start|>system") and text.endswith(question_and_prefix(sample)[1])
            assert tokenizer(tokenizer.decode(sample.input_ids), add_special_tokens=False)["input_ids"] == sample.input_ids
