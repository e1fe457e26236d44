"""Single needle in a haystack, in the manner of RULER's niah_single tasks, built offline.

The haystack is English prose from the help texts that ship with Python itself
(pydoc_data), so nothing is downloaded and the same seed gives the same prompt on any
machine with the same Python version.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
from dataclasses import dataclass

import torch
from pydoc_data.topics import topics

INTRO = "A special magic number is hidden in the text below. Memorize it."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
# Bump when a change alters the prompts, references or scoring this module makes: stored results
# are keyed by it, so older ones are recomputed (and the run says so) instead of reused.
GENERATOR_VERSION = 1

# Short words keep the fixed part of the prompt small; none of the pairs occurs in the
# Python docs, so the key is unique in the haystack.
ADJECTIVES = (
    "amber", "bold", "brave", "calm", "crisp", "dusty", "eager", "faint", "happy", "icy",
    "jolly", "lucky", "misty", "noble", "quiet", "rapid", "rusty", "silky", "sunny", "witty",
)
NOUNS = (
    "badger", "cedar", "comet", "falcon", "harbor", "heron", "island", "maple", "meadow", "otter",
    "pebble", "quartz", "raven", "spruce", "thistle", "tulip", "walrus", "willow", "wren", "zephyr",
)


@dataclass(frozen=True)
class NeedlePrompt:
    input_ids: torch.LongTensor  # (1, n_tokens), special tokens included
    text: str  # the prompt as given to the tokenizer (chat template applied, answer prefix at the end)
    answer: str  # the 7-digit magic number
    key: str
    depth: float  # requested position of the needle in the haystack, 0 = start, 1 = end
    n_tokens: int


def score_needle(prediction: str, answer: str) -> float:
    """RULER's string match: 1.0 when the answer occurs anywhere in the prediction."""
    return float(answer in prediction)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_TO_ASCII = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "…": "..."})


@functools.cache
def haystack_sentences() -> tuple[str, ...]:
    """Distinct prose sentences of the standard library's help texts, in a fixed order."""
    found: dict[str, None] = {}
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            # Wrapped prose keeps one indent throughout; code, grammar rules, tables and
            # headings change indent or carry these markers.
            indents = {len(line) - len(line.lstrip()) for line in block.splitlines()}
            if len(indents) > 1 or re.search(r"::=|>>>|\*\*\*|===|---", block):
                continue
            text = " ".join(block.split()).translate(_TO_ASCII).replace("*", "")
            text = re.sub(r"(?<=\w)- (?=[a-z])", "-", text)  # words hyphenated at a line break
            for sentence in _SENTENCE_END.split(text):
                if _is_prose(sentence):
                    found.setdefault(sentence)
    return tuple(found)


def _is_prose(sentence: str) -> bool:
    letters = sum(c.isalpha() for c in sentence)
    return (
        40 <= len(sentence) <= 240
        and sentence[0].isupper()
        and sentence.endswith(".")
        and sentence.isascii()
        # long numbers could be mistaken for the answer, "magic" for the needle
        and not re.search(r"[0-9]{5}|[{}\[\]<>=|\\]|magic", sentence)
        and letters >= 0.75 * len(sentence.replace(" ", ""))
    )


def build_needle_prompt(
    tokenizer,
    n_tokens: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    use_chat_template: bool | None = None,
) -> NeedlePrompt:
    """A needle prompt of at most n_tokens tokens (and at most 64 fewer, from 512 up).

    The seed picks key, answer, depth (unless given) and the order of the haystack sentences.
    use_chat_template=None uses the tokenizer's chat template when it has one.
    """
    rng = random.Random(seed)
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    answer = str(rng.randint(1_000_000, 9_999_999))
    drawn_depth = round(rng.random(), 2)  # drawn even when given, so the haystack stays the same
    depth = drawn_depth if depth is None else float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    needle = NEEDLE.format(key=key, value=answer)

    # Shuffled passes over the pool, taken in batched slices until there is ample text.
    # Sentences tokenized apart don't add up exactly, so their counts only guide the search.
    pool = haystack_sentences()
    sentences: list[str] = []
    counts: list[int] = []
    while sum(counts) < 2 * n_tokens + 1024:
        start = len(sentences) % len(pool)
        if start == 0:
            shuffled = list(pool)
            rng.shuffle(shuffled)
        batch = shuffled[start : start + 256]
        counts += [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
        sentences += batch

    def prompt(k: int, w: int) -> str:
        """The prompt with k whole haystack sentences and the first w words of the next."""
        body = sentences[:k]
        tail = " ".join(sentences[k].split(" ")[:w])
        # The needle goes to the sentence boundary nearest the depth, counted in characters.
        boundaries = [0, *itertools.accumulate(len(s) + 1 for s in body)]
        target = depth * (boundaries[-1] + len(tail))
        at = min(range(k + 1), key=lambda i: abs(boundaries[i] - target))
        haystack = " ".join([*body[:at], needle, *body[at:], *([tail] if tail else [])])
        user = f"{INTRO}\n\n{haystack}\n\n{QUESTION.format(key=key)}"
        prefix = ANSWER_PREFIX.format(key=key)
        if use_chat_template:
            messages = [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        return f"{user} {prefix}"

    def tokenize(text: str) -> list[int]:
        # A chat template writes its own BOS, as in apply_chat_template(tokenize=True).
        return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]

    @functools.cache
    def length(k: int, w: int) -> int:
        return len(tokenize(prompt(k, w)))

    if length(0, 0) > n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is too small: the prompt without haystack takes {length(0, 0)} tokens")
    estimate = list(itertools.accumulate(counts, initial=length(0, 0)))
    guess = bisect.bisect_right(estimate, n_tokens) - 1
    guess = bisect.bisect_right(estimate, n_tokens - length(guess, 0) + estimate[guess]) - 1  # shift by the real error
    k = _largest_fitting(lambda k: length(k, 0) <= n_tokens, guess, len(sentences) - 1)
    words = sentences[k].split(" ")
    w_guess = len(words) * (n_tokens - length(k, 0)) // max(counts[k], 1)
    w = _largest_fitting(lambda w: length(k, w) <= n_tokens, w_guess, len(words) - 1)

    text = prompt(k, w)
    ids = tokenize(text)
    assert len(ids) <= n_tokens and (n_tokens < 512 or len(ids) >= n_tokens - 64), (len(ids), n_tokens)
    return NeedlePrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        text=text,
        answer=answer,
        key=key,
        depth=depth,
        n_tokens=len(ids),
    )


def _largest_fitting(fits, guess: int, limit: int) -> int:
    """Largest m in [0, limit] with fits(m), for a monotone fits that holds at 0.

    Gallops outward from the guess and then bisects, so a good guess costs few probes.
    """
    m = min(max(guess, 0), limit)
    if fits(m):
        lo, step = m, 1
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, limit + 1)
    else:
        hi, step = m, 1
        while hi - step >= 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:  # fits(lo) holds, fits(hi) fails (or hi is past the limit)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
