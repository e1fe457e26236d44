"""What every evaluation task hands the runner: samples with references, and metrics.

A generation task yields `Sample`s: a prompt already tokenized with the model's own
tokenizer (chat template when the model has one, a completion prefix otherwise), the
reference answers and the name of the metric that scores a prediction against them.
The runner (stem_cli.runs.runner) generates greedily under each method, scores, and
writes one JSONL line per sample. Metrics map (prediction, references) to [0, 1].
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass, field
from typing import Any, Callable

# (prediction, references) -> [0, 1]; a metric that needs more (e.g. LongBench's class
# list) takes a keyword `meta` and gets the sample's meta dict.
Metric = Callable[..., float]
METRICS: dict[str, Metric] = {}


def register_metric(name: str):
    def add(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return add


def score(metric: str, prediction: str, references: list[str], meta: dict | None = None) -> float:
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; registered metrics: {', '.join(sorted(METRICS))}")
    fn = METRICS[metric]
    if "meta" in inspect.signature(fn).parameters:
        return float(fn(prediction, references, meta=meta or {}))
    return float(fn(prediction, references))


@dataclass
class Sample:
    id: str  # stable across runs and machines: "<task>/<length>/<seed>/<index>"
    task: str
    seq_len: int  # the requested length in tokens (the prompt is within a few percent below it)
    input_ids: list[int]  # the whole prompt, special tokens and template included
    references: list[str]
    metric: str  # a key of METRICS
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific facts (depth, keys, ...), JSON-able

    @classmethod
    def measured(cls, task: str, seq_len: int, seed: int, index: int, input_ids: list[int], meta: dict[str, Any]) -> "Sample":
        """A sample of a measure task (fidelity, ppl): a prompt to run, nothing to generate or score against."""
        return cls(f"{task}/{seq_len}/{seed}/{index}", task, seq_len, input_ids, references=[], metric="", max_new_tokens=0, meta=meta)


def render_prompt(tokenizer, user: str, answer_prefix: str = "", use_chat_template: bool | None = None) -> list[int]:
    """Token ids of `user` as one user turn, then `answer_prefix` as the start of the reply.

    With a chat template (None: when the tokenizer has one) the template writes its own
    BOS; without one (base models) the text is a plain completion: user text, a space,
    the answer prefix.
    """
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        text += answer_prefix
    else:
        text = f"{user} {answer_prefix}".rstrip()
    return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]


@register_metric("string_match_all")
def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's 'all': the fraction of references found in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


@register_metric("string_match_part")
def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's 'part': 1 when any reference is found in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))
