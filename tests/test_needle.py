import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from stem_cli.tasks.needle import (
    ANSWER_PREFIX,
    INTRO,
    NEEDLE,
    QUESTION,
    build_needle_prompt,
    haystack_sentences,
    score_needle,
)

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(chat_template=None):
    """One token per byte, plus a BOS that the tokenizer adds itself."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def haystack_of(prompt):
    """The text between the intro and the question."""
    start = prompt.text.index(INTRO) + len(INTRO) + 2
    return prompt.text[start : prompt.text.index("\n\n" + QUESTION.format(key=prompt.key))]


@pytest.mark.parametrize("n_tokens", [300, 1000, 4096])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_length_is_close_and_never_over(tokenizer, n_tokens, seed):
    prompt = build_needle_prompt(tokenizer, n_tokens, seed=seed)
    assert prompt.input_ids.dtype == torch.long
    assert prompt.input_ids.shape == (1, prompt.n_tokens)
    assert prompt.n_tokens <= n_tokens
    assert prompt.n_tokens >= n_tokens - (64 if n_tokens >= 512 else 300)
    assert prompt.input_ids[0, 0].item() == tokenizer.bos_token_id  # counted in n_tokens


@pytest.mark.parametrize("n_tokens", [300, 1000, 4096])
@pytest.mark.parametrize("seed", [0, 3])
def test_answer_and_key_appear_once_in_the_haystack(tokenizer, n_tokens, seed):
    prompt = build_needle_prompt(tokenizer, n_tokens, seed=seed)
    haystack = haystack_of(prompt)
    assert prompt.text.count(prompt.answer) == 1
    assert haystack.count(prompt.key) == 1
    assert haystack.count(NEEDLE.format(key=prompt.key, value=prompt.answer)) == 1
    assert len(prompt.answer) == 7 and prompt.answer.isdigit()
    assert prompt.text.endswith(QUESTION.format(key=prompt.key) + " " + ANSWER_PREFIX.format(key=prompt.key))


@pytest.mark.parametrize("n_tokens", [4096, 12000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, n_tokens, depth):
    prompt = build_needle_prompt(tokenizer, n_tokens, seed=5, depth=depth)
    haystack = haystack_of(prompt)
    needle = NEEDLE.format(key=prompt.key, value=prompt.answer)
    assert prompt.depth == depth
    assert abs(haystack.index(needle) / (len(haystack) - len(needle)) - depth) <= 0.05


def test_depth_is_drawn_from_the_seed_and_does_not_change_the_rest(tokenizer):
    drawn = build_needle_prompt(tokenizer, 2000, seed=11)
    given = build_needle_prompt(tokenizer, 2000, seed=11, depth=0.5)
    assert 0.0 <= drawn.depth <= 1.0
    assert (given.key, given.answer) == (drawn.key, drawn.answer)
    assert sorted(haystack_of(given).split(". ")) == sorted(haystack_of(drawn).split(". "))
    assert len({build_needle_prompt(tokenizer, 600, seed=s).depth for s in range(6)}) > 1


def test_deterministic_by_seed(tokenizer):
    first = build_needle_prompt(tokenizer, 1000, seed=42)
    again = build_needle_prompt(tokenizer, 1000, seed=42)
    assert torch.equal(first.input_ids, again.input_ids) and first.text == again.text
    answers = {build_needle_prompt(tokenizer, 1000, seed=s).answer for s in range(5)}
    assert len(answers) == 5


@pytest.mark.parametrize("n_tokens", [300, 4096])
def test_decoding_gives_back_the_text(tokenizer, n_tokens):
    prompt = build_needle_prompt(tokenizer, n_tokens, seed=2)
    assert tokenizer.decode(prompt.input_ids[0], skip_special_tokens=True) == prompt.text


def test_chat_template_path():
    tokenizer = byte_tokenizer(TINY_CHAT_TEMPLATE)
    prompt = build_needle_prompt(tokenizer, 2048, seed=4)  # None: the template is set, so it is used
    prefix = ANSWER_PREFIX.format(key=prompt.key)
    assert prompt.text.startswith("<|user|>\n" + INTRO)
    assert prompt.text.endswith(QUESTION.format(key=prompt.key) + "\n<|assistant|>\n" + prefix)
    assert 2048 - 64 <= prompt.n_tokens <= 2048
    # the template writes any BOS itself, so the tokenizer adds none
    assert tokenizer.bos_token_id not in prompt.input_ids[0].tolist()
    assert tokenizer.decode(prompt.input_ids[0]) == prompt.text
    plain = build_needle_prompt(tokenizer, 2048, seed=4, use_chat_template=False)
    assert not plain.text.startswith("<|user|>") and plain.answer == prompt.answer


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="too small"):
        build_needle_prompt(tokenizer, 100)
    with pytest.raises(ValueError, match="depth"):
        build_needle_prompt(tokenizer, 1000, depth=1.5)


def test_haystack_is_prose():
    sentences = haystack_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert sentence[0].isupper() and sentence.endswith(".") and "\n" not in sentence and "  " not in sentence


def test_score_needle():
    assert score_needle(" 1234567.", "1234567") == 1.0
    assert score_needle("The number is 1234567, I think", "1234567") == 1.0
    assert score_needle("1234568", "1234567") == 0.0
    assert score_needle("", "1234567") == 0.0


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):  # the tokenizer of the GGUF pulled into the stem cache (tests/conftest.py)
    tokenizer = smollm2.tokenizer
    assert tokenizer.chat_template
    for n_tokens in (1000, 4096, 32768):
        started = time.perf_counter()
        prompt = build_needle_prompt(tokenizer, n_tokens, seed=n_tokens, depth=0.4)
        assert time.perf_counter() - started < 10
        assert n_tokens - 64 <= prompt.n_tokens <= n_tokens
        assert prompt.input_ids[0].tolist() == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert prompt.text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX.format(key=prompt.key))
        assert haystack_of(prompt).count(prompt.answer) == 1
