"""RULER's synthetic tasks (Hsieh et al., 2024), generated offline and deterministically.

Thirteen tasks make up RULER; the eleven synthetic ones are built here (the two QA tasks
need downloaded data sets):

- eight needle-in-a-haystack variants, `niah_*`: "One of the special magic numbers for
  {key} is: {value}." sentences hidden in a haystack of repeated noise sentences
  (`noise`), English prose (`essay`: the help texts that ship with Python, see
  tasks/needle.py, in place of RULER's Paul Graham essays) or other needles (`needle`);
- variable tracking, `vt`: one chain "VAR A = 12345", "VAR B = VAR A", ... of four hops in
  noise; the answer is every variable that holds the value;
- common words extraction, `cwe`: a numbered list in which ten words appear far more often
  than the rest;
- frequent words extraction, `fwe`: coded words drawn from a zeta distribution; the answer
  is the three most frequent ones.

Every sample is drawn from `random.Random` seeded by (seed, task, length, index), so a
sample does not depend on how many others are built or in what order. The haystack
(sentences, noise repeats, distractor needles, list length, words) is sized by bisection
so that the whole rendered prompt, template and special tokens included, takes at most
`seq_len` tokens of the model's own tokenizer and only a little less.
"""

from __future__ import annotations

import bisect
import itertools
import numbers
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .base import Sample, render_prompt
from .needle import _largest_fitting, haystack_sentences

TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
GROUPS = {"ruler": TASKS, "niah": TASKS[:8]}

# Bump when a change alters the prompts, references or scoring this module makes: stored results
# are keyed by it, so older ones are recomputed (and the run says so) instead of reused.
GENERATOR_VERSION = 1

METRIC = "string_match_all"  # RULER scores every synthetic task by the fraction of references found
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

# RULER's noise haystack: this paragraph repeated; needles go between repeats.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

# Keys are "adjective-noun". No word occurs in the prose haystack and none is part of another,
# so a key never occurs by accident and no key is part of another key (tests check both).
ADJECTIVES = (
    "amber", "azure", "bashful", "bouncy", "breezy", "brisk", "bubbly", "chilly", "chirpy", "cloudy", "cozy",
    "creamy", "crimson", "dainty", "dapper", "dizzy", "drowsy", "dusky", "fancy", "feisty", "fluffy", "foggy",
    "frosty", "fuzzy", "giddy", "glossy", "golden", "grumpy", "hasty", "hazy", "humble", "husky", "jazzy",
    "jolly", "jumpy", "lanky", "leafy", "lofty", "lumpy", "lush", "mellow", "merry", "misty", "moody",
    "muddy", "murky", "nimble", "nutty", "perky", "plucky", "plump", "portly", "prickly", "quirky", "rosy",
    "rowdy", "rugged", "salty", "sandy", "scrappy", "shaggy", "shiny", "silky", "sleepy", "slinky", "smoky",
    "snowy", "soggy", "spicy", "spiky", "spotty", "sprightly", "squeaky", "starry", "steamy", "stormy",
    "sturdy", "sunny", "swampy", "tangy", "tawny", "teeny", "thorny", "tidy", "timid", "tipsy", "toasty",
    "velvet", "wavy", "weary", "wheezy", "whimsy", "windy", "wintry", "wispy", "witty", "wobbly", "woolly",
    "zany", "zesty", "snappy", "frisky", "chubby", "glassy", "grassy", "rainy", "mossy", "marble", "scarlet",
    "violet", "dusty", "crusty", "gentle", "brave", "noble", "tender", "fiery",
)
NOUNS = (
    "badger", "beaver", "bison", "buffalo", "camel", "canary", "cheetah", "chipmunk", "cobra", "condor",
    "cougar", "coyote", "cricket", "dolphin", "donkey", "eagle", "falcon", "ferret", "flamingo", "gazelle",
    "gecko", "gerbil", "giraffe", "goose", "gopher", "gorilla", "hamster", "hedgehog", "heron", "hippo",
    "hornet", "hyena", "iguana", "jackal", "jaguar", "kangaroo", "koala", "lemur", "leopard", "llama",
    "lobster", "lynx", "magpie", "mallard", "marmot", "meerkat", "mink", "mole", "moose", "narwhal", "ocelot",
    "octopus", "oriole", "osprey", "ostrich", "otter", "owl", "panda", "panther", "parrot", "pelican",
    "penguin", "pigeon", "platypus", "porcupine", "possum", "puffin", "quail", "rabbit", "raccoon", "raven",
    "rhino", "robin", "salmon", "seal", "shark", "skunk", "sloth", "snail", "sparrow", "squid", "squirrel",
    "stork", "swan", "tapir", "termite", "tiger", "toad", "toucan", "trout", "turkey", "turtle", "vulture",
    "walrus", "weasel", "whale", "wolf", "wombat", "yak", "zebra", "acorn", "almond", "apricot", "basil",
    "blossom", "bramble", "cactus", "cedar", "chestnut", "clover", "daisy", "fern", "ginger", "hazel",
    "juniper", "lilac", "lotus", "maple", "mango", "meadow", "mulberry", "nutmeg", "orchid", "pebble",
    "poppy", "pumpkin", "quartz", "saffron", "sequoia", "spruce", "thistle", "tulip", "walnut", "willow",
)
N_KEYS = len(ADJECTIVES) * len(NOUNS)

# RULER draws a needle's depth (in percent of the essay) from 40 evenly spaced values.
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))

# ------------------------------------------------------------------------------ prompt texts

NIAH_INSTRUCTION = (
    "Some special magic {kind} are hidden in the text below. Memorize them: "
    "you will be asked about the {kind} afterwards."
)
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"

VT_INSTRUCTION = "Memorize and track the chain of variable assignments hidden in the text below."
VT_STATEMENT = "VAR {name} = {value}."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (
    "Answer: According to the chain of variable assignments in the text above, "
    "{count} variables are assigned the value {value}, they are:"
)

CWE_INSTRUCTION = (
    "Below is a numbered list of words. Some of the words appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the {count} most common words in the list above?"
CWE_PREFIX = "Answer: The top {count} words that appear most often in the list are:"

FWE_DOTS = "...."
FWE_INSTRUCTION = (
    "Read the coded text below and keep track of how often each coded word appears. "
    "Find the three coded words that appear most often."
)
FWE_QUESTION = (
    f"Question: Give no explanation and ignore the dots '{FWE_DOTS}'. "
    "What are the three most frequently appearing coded words in the text above?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appearing words are:"


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # "noise" | "essay" | "needle"
    key_kind: str  # "words" | "uuids"
    value_kind: str  # "numbers" | "uuids"
    n_keys: int = 1  # keys with needles (distractors included, in the essay and noise haystacks)
    n_values: int = 1  # needles (values) per key
    n_queries: int = 1  # keys asked for


NIAH = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", n_values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", n_keys=4, n_queries=4),
}

VT_HOPS = 4  # a chain of 4 hops: 5 variables
CWE_COMMON = 10
FWE_ALPHA = 2.0
FWE_VOCAB = 1000  # ranks beyond it are left out (they would carry 0.06% of the mass)
FWE_MIN_WORDS = 64


# ------------------------------------------------------------------------------ public API


def build_samples(
    task: str,
    tokenizer,
    seq_len: int,
    *,
    seed: int = 0,
    limit: int = 10,
    use_chat_template: bool | None = None,
) -> list[Sample]:
    """`limit` samples of `task` whose prompts take at most `seq_len` tokens (a few percent fewer at most).

    Samples are independent of each other: sample i is the same whatever `limit` is.
    use_chat_template=None uses the tokenizer's chat template when it has one.
    """
    _check_task(task)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [build_sample(task, tokenizer, seq_len, seed=seed, index=i, use_chat_template=use_chat_template) for i in range(limit)]


def build_sample(task: str, tokenizer, seq_len: int, *, seed: int, index: int, use_chat_template: bool | None = None) -> Sample:
    """Sample `index` of `task` at `seq_len` tokens for `seed` (see build_samples)."""
    _check_task(task)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    seq_len = int(seq_len)
    rng = random.Random(f"stem-ruler/{seed}/{task}/{seq_len}/{index}")
    fitter = _Fitter(tokenizer, seq_len, use_chat_template, task)
    if task in NIAH:
        references, meta, family = *_niah(task, NIAH[task], rng, fitter), "niah"
    else:
        references, meta = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](rng, fitter)
        family = task
    meta["n_tokens"] = len(fitter.ids)
    return Sample(
        id=f"{task}/{seq_len}/{seed}/{index}",
        task=task,
        seq_len=seq_len,
        input_ids=fitter.ids,
        references=references,
        metric=METRIC,
        max_new_tokens=MAX_NEW_TOKENS[family],
        meta=meta,
    )


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; the tasks are: {', '.join(TASKS)}")


# ------------------------------------------------------------------------------ length fitting


class _Fitter:
    """Finds the largest amount of haystack whose rendered prompt fits in seq_len tokens."""

    def __init__(self, tokenizer, seq_len: int, use_chat_template: bool | None, task: str):
        self.tokenizer, self.seq_len, self.task = tokenizer, seq_len, task
        self.use_chat_template = use_chat_template
        self.ids: list[int] = []

    def fit(self, make: Callable[[int], tuple[str, str]], *, lowest: int = 0, highest: int | None = None) -> int:
        """Largest n in [lowest, highest] with len(prompt(make(n))) <= seq_len; the ids land in self.ids.

        make(n) gives (user text, answer prefix) for n units of haystack; its length must
        grow with n (roughly is enough: the answer is always checked). A good first guess
        comes from a small probe and secant steps, then _largest_fitting gallops and bisects,
        so a 16K prompt costs a handful of tokenizer calls.
        """
        seq_len = self.seq_len
        highest = seq_len + lowest if highest is None else highest  # every unit takes a token or more
        cache: dict[int, list[int]] = {}

        def ids(n: int) -> list[int]:
            if n not in cache:
                cache[n] = render_prompt(self.tokenizer, *make(n), use_chat_template=self.use_chat_template)
            return cache[n]

        base = len(ids(lowest))
        if base > seq_len:
            # Other samples (other keys and words, drawn per length) differ a little: leave room.
            minimum = -(-int(1.1 * base + 16) // 64) * 64
            raise ValueError(
                f"seq_len={seq_len} is too small for {self.task}: the fixed part of its prompt takes {base} "
                f"tokens with this tokenizer; the minimum seq_len is {minimum}"
            )
        n = min(highest, lowest + 16)
        for _ in range(3):
            grown = len(ids(n)) - base
            if n == lowest or grown <= 0:
                break
            guess = min(highest, lowest + int((n - lowest) * (seq_len - base) / grown))
            if guess == n:
                break
            n = guess
        found = lowest + _largest_fitting(lambda m: len(ids(lowest + m)) <= seq_len, n - lowest, highest - lowest)
        self.ids = ids(found)
        return found


def _place(units: list[str], inserts: list[str], depths: list[float], *, every: int = 1) -> list[str]:
    """`units` with each insert at the boundary nearest its depth (0 = start, 1 = end), in characters.

    Boundaries are taken every `every` units (and at the end); inserts keep their order,
    so depths must be sorted.
    """
    ends = [0, *itertools.accumulate(len(u) + 1 for u in units)]
    slots = sorted({*range(0, len(units) + 1, every), len(units)})
    at = [ends[s] for s in slots]
    out: list[str] = []
    done = 0
    for text, depth in zip(inserts, depths):
        i = bisect.bisect_left(at, depth * ends[-1])
        if i == len(at) or (i > 0 and depth * ends[-1] - at[i - 1] <= at[i] - depth * ends[-1]):
            i -= 1
        slot = max(slots[i], done)
        out += units[done:slot]
        out.append(text)
        done = slot
    return out + units[done:]


def _noise(n: int) -> list[str]:
    """The first n sentences of the noise paragraph repeated."""
    return [NOISE[i % len(NOISE)] for i in range(n)]


def _join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


# ------------------------------------------------------------------------------ needle in a haystack


def _key_words(index: int) -> str:
    return f"{ADJECTIVES[index // len(NOUNS)]}-{NOUNS[index % len(NOUNS)]}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class _Draw:
    """Keys and values never drawn twice within a sample."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.seen: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        while (x := make()) in self.seen:
            pass
        self.seen.add(x)
        return x

    def value(self, kind: str) -> str:
        if kind == "numbers":
            return self._fresh(lambda: str(self.rng.randint(1_000_000, 9_999_999)))
        return self._fresh(lambda: _uuid(self.rng))

    def key(self, kind: str) -> str:
        if kind == "words":
            return self._fresh(lambda: _key_words(self.rng.randrange(N_KEYS)))
        return self._fresh(lambda: _uuid(self.rng))


def _niah(task: str, spec: NiahSpec, rng: random.Random, fitter: _Fitter) -> tuple[list[str], dict]:
    kind = spec.value_kind
    draw = _Draw(rng)
    keys = [draw.key(spec.key_kind) for _ in range(spec.n_keys)]
    values = [[draw.value(kind) for _ in range(spec.n_values)] for _ in keys]
    queries = rng.sample(range(spec.n_keys), spec.n_queries)
    needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        depths = [d / 100 for d in sorted(rng.sample(DEPTHS, len(needles)))]
    else:
        depths = sorted(round(rng.random(), 4) for _ in needles)
    query = _join_list([keys[q] for q in queries])
    question = NIAH_QUESTION.format(kind=kind, query=query)
    prefix = NIAH_PREFIX.format(kind=kind, query=query)
    instruction = NIAH_INSTRUCTION.format(kind=kind)
    meta: dict = {"haystack": spec.haystack, "keys": keys, "queries": [keys[q] for q in queries], "depths": depths}

    highest = None
    if spec.haystack == "essay":
        pool = haystack_sentences()
        start = rng.randrange(len(pool))  # a contiguous run of prose, wrapping around
        units = lambda n: [pool[(start + i) % len(pool)] for i in range(n)]
        sep, every = " ", 1
    elif spec.haystack == "noise":
        units, sep, every = _noise, " ", len(NOISE)
    else:  # the haystack is made of distractor needles, with keys and values of their own
        distractors: list[str] = []
        if spec.key_kind == "words":
            order = list(range(N_KEYS))
            rng.shuffle(order)
            distractor_keys = (k for k in map(_key_words, order) if k not in draw.seen)
            highest = N_KEYS - len(keys)
        else:
            distractor_keys = (draw.key("uuids") for _ in itertools.count())

        def units(n: int) -> list[str]:
            while len(distractors) < n:
                key = next(distractor_keys)
                distractors.append(NIAH_NEEDLE.format(kind=kind, key=key, value=draw.value(kind)))
            return distractors[:n]

        sep, every = "\n", 1

    def make(n: int) -> tuple[str, str]:
        haystack = sep.join(_place(units(n), needles, depths, every=every))
        return f"{instruction}\n\n{haystack}\n\n{question}", prefix

    n = fitter.fit(make, highest=highest)
    if highest is not None and n == highest and len(fitter.ids) < 0.9 * fitter.seq_len:
        raise ValueError(f"seq_len={fitter.seq_len} is too large for {task}: it runs out of its {N_KEYS} distinct keys")
    meta["haystack_units"] = n
    return [v for q in queries for v in values[q]], meta


# ------------------------------------------------------------------------------ variable tracking


def _vt_chain(rng: random.Random, seen: set[str]) -> tuple[list[str], str, list[str]]:
    """(variable names, value, the statements of the chain in order)."""
    while (value := str(rng.randint(10_000, 99_999))) in seen:
        pass
    seen.add(value)
    names = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in seen and "VAR" not in name:
            seen.add(name)
            names.append(name)
    statements = [VT_STATEMENT.format(name=names[0], value=value)]
    statements += [VT_STATEMENT.format(name=b, value=f"VAR {a}") for a, b in itertools.pairwise(names)]
    return names, value, statements


def _vt_block(noise_sentences: int, statements: list[str], depths: list[float]) -> str:
    return " ".join(_place(_noise(noise_sentences), statements, depths, every=len(NOISE)))


def _vt(rng: random.Random, fitter: _Fitter) -> tuple[list[str], dict]:
    seen: set[str] = set()
    # One worked example first, as RULER does: a short chain in a little noise, with its answer.
    ex_names, ex_value, ex_statements = _vt_chain(rng, seen)
    ex_depths = sorted(round(rng.random(), 4) for _ in ex_statements)
    example = (
        f"{VT_INSTRUCTION}\n\n{_vt_block(2 * len(NOISE), ex_statements, ex_depths)}\n\n"
        f"{VT_QUESTION.format(value=ex_value)} {VT_PREFIX.format(count=len(ex_names), value=ex_value)} {' '.join(ex_names)}"
    )
    names, value, statements = _vt_chain(rng, seen)
    depths = sorted(round(rng.random(), 4) for _ in statements)
    question = VT_QUESTION.format(value=value)
    prefix = VT_PREFIX.format(count=len(names), value=value)

    def make(n: int) -> tuple[str, str]:
        return f"{example}\n\n{VT_INSTRUCTION}\n\n{_vt_block(n, statements, depths)}\n\n{question}", prefix

    n = fitter.fit(make)
    meta = {"haystack": "noise", "value": value, "names": names, "depths": depths, "haystack_units": n,
            "example": {"value": ex_value, "names": ex_names}}
    return names, meta


# ------------------------------------------------------------------------------ common words extraction

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class _Words:
    """Distinct pronounceable six-letter words (consonant-vowel x 3), drawn lazily.

    All of one length, so none is part of another; an endless supply, so the task has no
    ceiling on length and the common words look like any others.
    """

    def __init__(self, rng: random.Random):
        self.rng, self.words, self.seen = rng, [], set()

    def __getitem__(self, index: slice) -> list[str]:
        while len(self.words) < index.stop:
            word = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(3))
            if word not in self.seen:
                self.seen.add(word)
                self.words.append(word)
        return self.words[index]


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))


def _cwe_list(rng: random.Random, common: list[str], rare: list[str], freq_common: int, freq_rare: int) -> list[str]:
    entries = common * freq_common + rare * freq_rare
    rng.shuffle(entries)
    return entries


# (times each common word appears, times each other word appears; the same two for the
# worked example, and how many other words it has). The list frequencies are RULER's: 30 and
# 3, and 6 and 1 below 4K tokens (used as well where a tokenizer cannot fit 30 and 3 in the
# length). The example is kept small, so most of the length goes to the list itself.
CWE_LONG = (30, 3, 3, 1, 20)
CWE_SHORT = (6, 1, 2, 1, 10)


def _cwe(rng: random.Random, fitter: _Fitter) -> tuple[list[str], dict]:
    words = _Words(rng)
    common = words[0:CWE_COMMON]
    list_seed = rng.getrandbits(64)
    configs = [CWE_LONG, CWE_SHORT] if fitter.seq_len >= 4096 else [CWE_SHORT]
    for config in configs:
        entries, make = _cwe_prompt(words, list_seed, config)
        try:
            n = fitter.fit(make, lowest=CWE_COMMON)  # at least as many rare words as common ones
            break
        except ValueError:
            if config is configs[-1]:
                raise
    meta = {"haystack": "list", "common": common, "rare_words": n, "freq_common": config[0], "freq_rare": config[1],
            "list_length": len(entries(n)), "example_common": words[CWE_COMMON : 2 * CWE_COMMON]}
    return common, meta


def _cwe_prompt(words: _Words, list_seed: int, config: tuple[int, ...]):
    """(the list with n rare words, the prompt with it) for one setting of frequencies."""
    freq_common, freq_rare, ex_freq_common, ex_freq_rare, ex_rare_words = config
    question = CWE_QUESTION.format(count=CWE_COMMON)
    prefix = CWE_PREFIX.format(count=CWE_COMMON)
    # The example's words come after the ten common ones and before the rare ones, so they
    # are the same whatever the length of the list; the rare words are drawn on demand.
    common = words[0:CWE_COMMON]
    ex_common = words[CWE_COMMON : 2 * CWE_COMMON]
    ex_rare = words[2 * CWE_COMMON : 2 * CWE_COMMON + ex_rare_words]
    first_rare = 2 * CWE_COMMON + ex_rare_words
    example_list = _cwe_list(random.Random(f"{list_seed}/example"), ex_common, ex_rare, ex_freq_common, ex_freq_rare)
    example = f"{CWE_INSTRUCTION}\n\n{_numbered(example_list)}\n\n{question} {prefix} {_numbered(ex_common)}"

    def entries(n: int) -> list[str]:
        rare = words[first_rare : first_rare + n]
        return _cwe_list(random.Random(f"{list_seed}/{n}"), common, rare, freq_common, freq_rare)

    def make(n: int) -> tuple[str, str]:
        return f"{example}\n\n{CWE_INSTRUCTION}\n\n{_numbered(entries(n))}\n\n{question}", prefix

    return entries, make


# ------------------------------------------------------------------------------ frequent words extraction


def _fwe(rng: random.Random, fitter: _Fitter) -> tuple[list[str], dict]:
    # Rank 1 of the zeta distribution is the dots, which the prompt says to ignore;
    # ranks 2, 3, 4 are (almost always) the three most frequent coded words.
    vocab = [FWE_DOTS]
    seen = set(vocab)
    while len(vocab) < FWE_VOCAB:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    cum_weights = list(itertools.accumulate(r**-FWE_ALPHA for r in range(1, FWE_VOCAB + 1)))
    drawn: list[str] = []

    def text(n: int) -> list[str]:
        while len(drawn) < n:
            drawn.extend(rng.choices(vocab, cum_weights=cum_weights, k=max(1024, n - len(drawn))))
        return drawn[:n]

    def make(n: int) -> tuple[str, str]:
        return f"{FWE_INSTRUCTION}\n\n{' '.join(text(n))}\n\n{FWE_QUESTION}", FWE_PREFIX

    n = fitter.fit(make, lowest=FWE_MIN_WORDS)
    # The three most frequent coded words must stand clear of the fourth: drop words from
    # the end until they do (a few at most; fewer words only make the prompt shorter).
    counts = Counter(w for w in text(n) if w != FWE_DOTS)
    m = n
    while not _clear_top3(counts):
        if m == FWE_MIN_WORDS // 4:
            raise ValueError(f"seq_len={fitter.seq_len} is too small for fwe: its words have no clear three most frequent")
        m -= 1
        if drawn[m] != FWE_DOTS:
            counts[drawn[m]] -= 1
    if m != n:
        fitter.ids = render_prompt(fitter.tokenizer, *make(m), use_chat_template=fitter.use_chat_template)
    answer = [w for w, _ in counts.most_common(3)]
    meta = {"haystack": "coded", "words": m, "counts": [counts[w] for w in answer], "alpha": FWE_ALPHA}
    return answer, meta


def _clear_top3(counts: Counter) -> bool:
    top = [c for _, c in counts.most_common(4)]
    return len(top) >= 3 and top[2] > 0 and (len(top) == 3 or top[2] > top[3])
