"""LongBench (v1) from its own JSONL files: our prompts, LongBench's truncation, lengths and metrics.

Each subset is one file `{data_dir}/{subset}.jsonl` of LongBench's records (input,
context, answers, length, dataset, language, all_classes, _id), as in LongBench's
`data.zip`. A prompt carries what LongBench's does, in the same order (instruction,
context, question or input, answer cue), in our own words. A prompt longer than
`seq_len` tokens loses its middle, as LongBench does: the first and the last half of
the tokens of the prompt text are kept. Generation lengths are LongBench's, and so are
the metrics (score = the best over the reference answers), registered in tasks.base:

  longbench_qa_f1          token F1 after SQuAD-style normalisation (lower case, no punctuation or articles)
  longbench_rouge_l        ROUGE-L F1 over lower-case alphanumeric tokens (as rouge-score's rougeL, no stemming)
  longbench_classification 1/k when the true class is among the k classes named in the prediction
  longbench_retrieval      share of the numbers in the prediction that are the reference's paragraph number
  longbench_count          share of the numbers in the prediction that equal the reference count
  longbench_code_sim       edit similarity (normalised Indel) of the first code line of the prediction
  longbench_qa_f1_zh, longbench_rouge_l_zh, longbench_retrieval_zh: the Chinese subsets (need jieba)

Few-shot subsets (trec, triviaqa, samsum, lsht) are scored on the first line of the
prediction; they and the code subsets are plain completions, without the chat template,
as in LongBench (unless `use_chat_template` says otherwise).

Without local files, lm-eval's longbench tasks may serve (see `resolve`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import string
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stem_cli.tasks.base import Sample, register_metric, render_prompt
from stem_cli.tasks.harness import TaskError

DOWNLOAD = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
# Bump when a change alters the prompts, references or scoring this module makes: stored results
# are keyed by it, so older ones are recomputed (and the run says so) instead of reused.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Subset:
    template: str  # the user turn; {context} and {input} are the record's fields
    cue: str  # the start of the answer (render_prompt's answer_prefix)
    max_new_tokens: int
    metric: str
    completion: bool = False  # few-shot / code: a plain completion, no chat template
    first_line: bool = False  # score the first line of the prediction only
    language: str = "en"


_QA_TAIL = "\n\nQuestion: {input}"
_MULTI_DOC = (
    "Answer the question using the passages below. Reply with the answer alone, nothing else.\n\n"
    "Passages:\n{context}\n\n"
    "Using the passages above, answer the question. Reply with the answer alone, nothing else." + _QA_TAIL
)
_CODE_CUE = "Continue with the next line of code:"

SUBSETS: dict[str, Subset] = {
    # single-document QA
    "narrativeqa": Subset(
        "Below is a story (from a novel or a film script), followed by a question about it. "
        "Answer with a phrase that is as short as possible; do not explain.\n\n"
        "Story:\n{context}\n\n"
        "Answer the question about the story above with as short a phrase as possible; do not explain." + _QA_TAIL,
        "Answer:", 128, "longbench_qa_f1"),
    "qasper": Subset(
        "Below is a scientific article, followed by a question about it. Answer in one short phrase or sentence. "
        'If the article does not give the answer, reply "unanswerable"; '
        'to a yes/no question reply "yes", "no" or "unanswerable". Do not explain.\n\n'
        "Article:\n{context}\n\n"
        'Answer the question about the article above in one short phrase or sentence; reply "unanswerable" if the '
        'article does not say, and "yes", "no" or "unanswerable" to a yes/no question. Do not explain.' + _QA_TAIL,
        "Answer:", 128, "longbench_qa_f1"),
    "multifieldqa_en": Subset(
        "Read the text below and answer the question that follows it. Be brief.\n\n"
        "{context}\n\n"
        "Now answer the question about the text above. Be brief: reply with the answer only." + _QA_TAIL,
        "Answer:", 64, "longbench_qa_f1"),
    # multi-document QA
    "hotpotqa": Subset(_MULTI_DOC, "Answer:", 32, "longbench_qa_f1"),
    "2wikimqa": Subset(_MULTI_DOC, "Answer:", 32, "longbench_qa_f1"),
    "musique": Subset(_MULTI_DOC, "Answer:", 32, "longbench_qa_f1"),
    # summarisation
    "gov_report": Subset(
        "Below is a report by a government agency. Summarise it in one paragraph.\n\n"
        "Report:\n{context}\n\n"
        "Write a one-paragraph summary of the report above.",
        "Summary:", 512, "longbench_rouge_l"),
    "qmsum": Subset(
        "Below is the transcript of a meeting, followed by a query (a question or an instruction). "
        "Respond to the query in one or more sentences.\n\n"
        "Transcript:\n{context}\n\n"
        "Respond to the query about the meeting above in one or more sentences.\n\nQuery: {input}",
        "Answer:", 512, "longbench_rouge_l"),
    "multi_news": Subset(
        "Below are several news articles. Summarise them together in one paragraph.\n\n"
        "Articles:\n{context}\n\n"
        "Write a one-paragraph summary of all the articles above.",
        "Summary:", 512, "longbench_rouge_l"),
    # few-shot learning: the examples are the context, the input ends with its own cue
    "trec": Subset(
        "Classify the type of the last question below. Example questions with their types come first.\n\n{context}\n{input}",
        "", 64, "longbench_classification", completion=True, first_line=True),
    "triviaqa": Subset(
        "Answer the last question from the passage given with it, with the answer alone. "
        "Worked examples come first.\n\n{context}\n{input}",
        "", 32, "longbench_qa_f1", completion=True, first_line=True),
    "samsum": Subset(
        "Summarise the last dialogue below in a few short sentences. Example dialogues with their summaries "
        "come first.\n\n{context}\n{input}",
        "", 128, "longbench_rouge_l", completion=True, first_line=True),
    # synthetic
    "passage_count": Subset(
        "Below are paragraphs taken from Wikipedia; some of them may appear more than once. Read them all and count "
        "how many different paragraphs there are once the duplicates are removed.\n\n"
        "{context}\n\n"
        "How many distinct paragraphs are there once duplicates are removed? Reply with the number alone.",
        "Number of distinct paragraphs:", 32, "longbench_count"),
    "passage_retrieval_en": Subset(
        "Below are 30 paragraphs from Wikipedia, then a summary of one of them. Find the paragraph the summary "
        "was written from.\n\n"
        "{context}\n\n"
        "The summary:\n\n{input}\n\n"
        'Which paragraph is the summary from? Reply in the form "Paragraph 1", "Paragraph 2" and so on.',
        "Answer:", 32, "longbench_retrieval"),
    # code completion
    "lcc": Subset(
        "Complete the code below.\n{context}", _CODE_CUE, 64, "longbench_code_sim", completion=True),
    "repobench-p": Subset(
        "Complete the code below. Files of the repository it belongs to come first.\n{context}{input}",
        _CODE_CUE, 64, "longbench_code_sim", completion=True),
}

# Chinese subsets: available when jieba (their metrics' word segmenter) is installed.
CHINESE_SUBSETS: dict[str, Subset] = {
    "multifieldqa_zh": Subset(
        "阅读下面的文章，然后用中文回答文章后面的问题。\n\n文章：\n{context}\n\n"
        "请根据上面的文章，用中文简要回答下面的问题。\n\n问题：{input}",
        "回答：", 64, "longbench_qa_f1_zh", language="zh"),
    "dureader": Subset(
        "下面是几篇文档，请根据它们回答问题。\n\n文档：\n{context}\n\n请根据上面的文档回答问题。\n\n问题：{input}",
        "回答：", 128, "longbench_rouge_l_zh", language="zh"),
    "vcsum": Subset(
        "下面是一段会议记录，请用一段话概括会议的内容。\n\n会议记录：\n{context}\n\n请用一段话概括上面的会议记录。",
        "总结：", 512, "longbench_rouge_l_zh", language="zh"),
    "lsht": Subset(
        "请判断最后一则新闻属于哪一类。前面是一些标有类别的新闻示例。\n\n{context}\n{input}",
        "", 64, "longbench_classification", completion=True, first_line=True, language="zh"),
    "passage_retrieval_zh": Subset(
        "下面有30个段落和一段摘要，请判断摘要出自哪个段落。\n\n{context}\n\n摘要：\n\n{input}\n\n"
        "摘要出自哪个段落？请按“段落1”、“段落2”这样的格式回答。",
        "答案：", 32, "longbench_retrieval_zh", language="zh"),
}

ALL_SUBSETS: dict[str, Subset] = {**SUBSETS, **CHINESE_SUBSETS}

_FIELDS = ("input", "context", "answers", "_id")


# ------------------------------------------------------------------ samples


def subset_spec(subset: str) -> Subset:
    if subset in SUBSETS:
        return SUBSETS[subset]
    if subset in CHINESE_SUBSETS:
        if importlib.util.find_spec("jieba") is None:
            raise TaskError(f"LongBench subset {subset!r} is Chinese: its metric segments words with jieba, "
                            f"which is not installed (pip install jieba)")
        return CHINESE_SUBSETS[subset]
    raise TaskError(f"unknown LongBench subset {subset!r}; subsets: {', '.join(SUBSETS)} "
                    f"(Chinese, with jieba: {', '.join(CHINESE_SUBSETS)})")


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` (None: all) records of a LongBench JSONL file, checked."""
    if not path.is_file():
        raise TaskError(f"LongBench file {path} not found; download LongBench's data ({DOWNLOAD}), "
                        f"unzip it and pass --data-dir with the folder of its *.jsonl files")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{number} is not a JSON line ({e.msg})") from None
            missing = [k for k in _FIELDS if k not in record]
            if missing:
                raise TaskError(f"{path}:{number} lacks {', '.join(missing)}: not a LongBench record")
            if isinstance(record["answers"], str):
                record["answers"] = [record["answers"]]
            records.append(record)
    return records


def build_samples(subset: str, tokenizer, seq_len: int, *, data_dir, limit: int | None = None,
                  use_chat_template: bool | None = None) -> list[Sample]:
    """Samples of one subset from `{data_dir}/{subset}.jsonl`, each prompt at most `seq_len` tokens.

    `limit`: the first that many records (None or 0: all). `use_chat_template`: None uses
    the tokenizer's chat template for the instruction subsets and plain completions for
    the few-shot and code ones, as LongBench does; True or False forces it for all.
    """
    spec = subset_spec(subset)
    if data_dir is None:
        raise TaskError(f"LongBench subset {subset!r} needs --data-dir: {_both_ways()}")
    records = read_records(Path(data_dir).expanduser() / f"{subset}.jsonl", limit or None)
    chat = use_chat_template
    if chat is None:
        chat = False if spec.completion else bool(getattr(tokenizer, "chat_template", None))
    samples = []
    for record in records:
        user = spec.template.format(context=record["context"] or "", input=record["input"] or "")
        ids, full = fit_prompt(tokenizer, user, spec.cue, seq_len, chat)
        classes = record.get("all_classes")
        samples.append(Sample(
            id=f"longbench/{subset}/{record['_id']}",
            task=f"longbench/{subset}",
            seq_len=seq_len,
            input_ids=ids,
            references=[str(a) for a in record["answers"]],
            metric=spec.metric,
            max_new_tokens=spec.max_new_tokens,
            meta={
                "subset": subset,
                "all_classes": list(classes) if classes else None,
                "first_line": spec.first_line,
                "length": record.get("length"),  # LongBench's own measure: words (characters for Chinese)
                "language": record.get("language", spec.language),
                "chat_template": chat,
                "prompt_tokens_untruncated": full,
                "truncated": full > len(ids),
            },
        ))
    return samples


def middle_truncate(ids: list[int], keep: int) -> list[int]:
    """The first keep // 2 and the last keep - keep // 2 of `ids` (all of them when they fit)."""
    if len(ids) <= keep:
        return list(ids)
    head = keep // 2
    return list(ids[:head]) + list(ids[len(ids) - (keep - head):])


def fit_prompt(tokenizer, user: str, cue: str, seq_len: int, chat: bool) -> tuple[list[int], int]:
    """(prompt ids of at most `seq_len` tokens, untruncated length): the user text loses its middle.

    The template, special tokens and the answer cue stay whole; the user text is cut
    LongBench's way, by tokens (its two halves decoded and joined), and the cut is
    tightened until the re-tokenized prompt fits (merges across the seam may differ).
    """
    ids = render_prompt(tokenizer, user, cue, use_chat_template=chat)
    full = len(ids)
    if full <= seq_len:
        return ids, full
    user_ids = tokenizer(user, add_special_tokens=False)["input_ids"]
    keep = len(user_ids) - (full - seq_len)
    while True:
        if keep < 2:
            raise TaskError(f"--seq-len {seq_len} leaves no room for the LongBench context: the prompt's fixed part "
                            f"alone takes about {full - len(user_ids)} tokens; use a longer length")
        kept = middle_truncate(user_ids, keep)
        head = keep // 2
        text = (tokenizer.decode(kept[:head], skip_special_tokens=True)
                + tokenizer.decode(kept[head:], skip_special_tokens=True))
        ids = render_prompt(tokenizer, text, cue, use_chat_template=chat)
        if len(ids) <= seq_len:
            return ids, full
        keep -= len(ids) - seq_len


# ------------------------------------------------------------------ where the data is


def resolve(data_dir) -> str:
    """How LongBench can run here: "local" (JSONL files in data_dir) or "lm-eval" (its tasks can load the data).

    A data_dir that is given must hold the files. Without one, lm-eval counts when it is
    installed with its longbench extras and its dataset is in the local HF cache or the
    hub answers (a single quick probe, no retries). Otherwise a TaskError names both ways.
    """
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if d.is_dir() and any((d / f"{s}.jsonl").is_file() for s in ALL_SUBSETS):
            return "local"
        problem = (f"{d} holds no LongBench files (expected {{subset}}.jsonl, e.g. {d / 'hotpotqa.jsonl'})"
                   if d.is_dir() else f"--data-dir {d} is not a folder")
        raise TaskError(f"LongBench data not found: {problem}.\n{_both_ways()}")
    reason = lm_eval_unavailable()
    if reason is None:
        return "lm-eval"
    raise TaskError(f"LongBench data not found: no --data-dir given, and lm-eval cannot load it ({reason}).\n{_both_ways()}")


def _both_ways() -> str:
    return ("Either download LongBench's data (" + DOWNLOAD + "), unzip it and pass --data-dir DIR "
            "(the folder of its *.jsonl files), or install lm-eval with its LongBench extras "
            "(pip install 'stem-cli[lmeval]' 'lm_eval[longbench]') on a machine that reaches the Hugging Face hub "
            "or has the dataset in its local HF cache (then set HF_DATASETS_OFFLINE=1).")


def lm_eval_dataset() -> str:
    """The hub dataset lm-eval's longbench tasks read (from its task YAML; a known default otherwise)."""
    spec = importlib.util.find_spec("lm_eval")
    locations = getattr(spec, "submodule_search_locations", None)
    if locations:
        yaml = Path(next(iter(locations))) / "tasks" / "longbench" / "hotpotqa.yaml"
        try:
            m = re.search(r"^dataset_path:\s*['\"]?([^'\"\s]+)", yaml.read_text(), re.MULTILINE)
            if m:
                return m.group(1)
        except OSError:
            pass
    return "Xnhyacinth/LongBench"


def lm_eval_unavailable(probe_timeout: float = 3.0) -> str | None:
    """None when lm-eval's longbench tasks can load their data here, else why not."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-eval is not installed"
    missing = [m for m in ("jieba", "fuzzywuzzy", "rouge") if importlib.util.find_spec(m) is None]
    if missing:
        return f"lm-eval's longbench tasks need {', '.join(missing)}: pip install 'lm_eval[longbench]'"
    repo = lm_eval_dataset()
    if _in_hf_cache(repo):
        return None
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        return f"offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and no copy of {repo} in the local HF cache"
    return _hub_problem(repo, probe_timeout)


def _hub_problem(repo: str, timeout: float) -> str | None:
    """None when the hub answers for dataset `repo` within `timeout` seconds (one request, no retries), else why not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets/{repo}", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return f"{repo} is not on the hub ({endpoint})"
        if e.code >= 500:
            return f"the hub ({endpoint}) answered {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the Hugging Face hub ({endpoint}) is unreachable ({reason}) and no copy of {repo} is in the local HF cache"
    return None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"


def _in_hf_cache(repo: str) -> bool:
    """A copy of hub dataset `repo` in the hub cache or in datasets' cache."""
    org, _, name = repo.partition("/")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub").expanduser()
    if (hub / f"datasets--{org}--{name}" / "snapshots").is_dir():
        return True
    cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    squash = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())
    try:
        return any(p.is_dir() and squash(p.name.partition("___")[2]) == squash(name) for p in cache.glob(f"{org}___*"))
    except OSError:
        return False


# ------------------------------------------------------------------ metrics


def _first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]


def _best(fn, prediction: str, references: list[str], meta: dict | None) -> float:
    meta = meta or {}
    if meta.get("first_line"):
        prediction = _first_line(prediction)
    return max((fn(prediction, str(ref), meta) for ref in references), default=0.0)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, ASCII punctuation dropped, articles a/an/the dropped, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokens: lower case, runs of [a-z0-9]."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_f1(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return 0.0
    common = lcs_length(prediction, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    return lcs_f1(rouge_tokens(prediction), rouge_tokens(reference))


def classification(prediction: str, reference: str, all_classes) -> float:
    """1/k when the reference is among the k classes named in the prediction; a named class that is only part
    of the reference's name (e.g. "location" in "other location") does not count against it."""
    named = [c for c in (all_classes or []) if c in prediction]
    named = [c for c in named if not (c != reference and c in reference)]
    return 1.0 / len(named) if reference in named else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, pattern: str = r"Paragraph (\d+)") -> float:
    m = re.search(pattern, reference) or re.search(r"(\d+)", reference)
    return _share_equal(prediction, m.group(1)) if m else 0.0


def count(prediction: str, reference: str) -> float:
    return _share_equal(prediction, str(reference).strip())


def first_code_line(prediction: str) -> str:
    """The first line of the prediction that is not a comment or a code fence ("" if none)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def indel_ratio(a: str, b: str) -> float:
    """1 - Indel distance / (len a + len b) = 2 LCS / (len a + len b): fuzzywuzzy's / rapidfuzz's ratio / 100."""
    try:
        from rapidfuzz.fuzz import ratio
    except ImportError:  # same number, computed slowly
        return 2 * lcs_length(a, b) / (len(a) + len(b)) if a or b else 1.0
    return ratio(a, b) / 100.0


def code_sim(prediction: str, reference: str) -> float:
    return indel_ratio(first_code_line(prediction), reference)


# Chinese: words from jieba, punctuation (ASCII and CJK) and spaces removed.
_ZH_PUNCT = set(string.punctuation) | set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏．")


def _zh_words(text: str) -> list[str]:
    import jieba

    words = ("".join(c for c in w.lower() if c not in _ZH_PUNCT and not c.isspace()) for w in jieba.cut(text, cut_all=False))
    return [w for w in words if w]


def qa_f1_zh(prediction: str, reference: str) -> float:
    return token_f1(_zh_words(prediction), _zh_words(reference))


def rouge_l_zh(prediction: str, reference: str) -> float:
    return lcs_f1(_zh_words(prediction), _zh_words(reference))


@register_metric("longbench_qa_f1")
def _m_qa_f1(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: qa_f1(p, r), prediction, references, meta)


@register_metric("longbench_rouge_l")
def _m_rouge_l(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: rouge_l(p, r), prediction, references, meta)


@register_metric("longbench_classification")
def _m_classification(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: classification(p, r, m.get("all_classes")), prediction, references, meta)


@register_metric("longbench_retrieval")
def _m_retrieval(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: retrieval(p, r), prediction, references, meta)


@register_metric("longbench_retrieval_zh")
def _m_retrieval_zh(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: retrieval(p, r, r"段落(\d+)"), prediction, references, meta)


@register_metric("longbench_count")
def _m_count(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: count(p, r), prediction, references, meta)


@register_metric("longbench_code_sim")
def _m_code_sim(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: code_sim(p, r), prediction, references, meta)


@register_metric("longbench_qa_f1_zh")
def _m_qa_f1_zh(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: qa_f1_zh(p, r), prediction, references, meta)


@register_metric("longbench_rouge_l_zh")
def _m_rouge_l_zh(prediction: str, references: list[str], meta: dict | None = None) -> float:
    return _best(lambda p, r, m: rouge_l_zh(p, r), prediction, references, meta)
