"""Batched generation (--batch-size): each prompt pre-filled alone, decoding stacked; results equal one at a time."""

from __future__ import annotations

import json

import pytest
import torch

import stem_cli
from stem_cli.generation import greedy, greedy_batch, prefill
from stem_cli.models import load_model

SMALL = ["block_size=16", "dense_layers=[0]", "k_start=4"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_batched_decoding_gives_each_prompt_its_unbatched_tokens(name):
    """Lengths differ (left padding of the stacked cache) and two prompts are shorter than Gemma's sliding
    window (32 tokens here), so its local layers are padded too; each row keeps its own positions."""
    model = load_model(name, device="cpu", dtype="float32", random_weights=True).model
    with torch.no_grad():  # larger weights: a random tiny model otherwise repeats one token, which could hide a shift
        for p in model.parameters():
            p.mul_(3.0)
    stem_cli.apply(model, "stem", None, block_size=16, k_start=4)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = [300, 17, 260, 29, 401]
    prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in lengths]
    caps = [12, 5, 12, 9, 12]  # per-row budgets: rows stop at different steps
    want = [greedy(model, p, max_new_tokens=c, stop_ids=set()).new_tokens for p, c in zip(prompts, caps)]
    got, seconds = greedy_batch(model, [prefill(model, p) for p in prompts], max_new_tokens=caps, stop_ids=set())
    assert got == want
    assert [len(t) for t in got] == caps and seconds > 0
    assert len({t for row in want for t in row}) > len(lengths)  # the test sees varied tokens, not one repeated


def test_stop_tokens_end_a_row_and_are_not_kept():
    model = load_model("tiny-llama", device="cpu", dtype="float32", random_weights=True).model
    prompts = [torch.randint(0, model.config.vocab_size, (1, n)) for n in (90, 130)]
    free = [greedy(model, p, max_new_tokens=6, stop_ids=set()).new_tokens for p in prompts]
    stop = {free[0][2]}  # the first row's third token stops it
    want = [greedy(model, p, max_new_tokens=6, stop_ids=stop).new_tokens for p in prompts]
    got, _ = greedy_batch(model, [prefill(model, p) for p in prompts], max_new_tokens=[6, 6], stop_ids=stop)
    assert got == want and len(got[0]) <= 2


def test_a_batched_eval_records_what_an_unbatched_one_does(tmp_path):
    args = dict(tasks=["ruler/niah_single_1", "ruler/niah_single_2"], lengths="600", limit=3, max_new_tokens=4, overrides=SMALL,
                device="cpu", random_weights=True)
    one = stem_cli.evaluate("tiny-llama", methods="dense,stem,streaming", output=tmp_path / "one", **args)
    many = stem_cli.evaluate("tiny-llama", methods="dense,stem,streaming", output=tmp_path / "many", batch_size=2, **args)
    fields = ("key", "method", "task", "sample", "prediction", "score", "bud", "new_tokens", "prompt_tokens")
    rows = lambda run: [{f: r[f] for f in fields} for r in map(json.loads, run.store.path.read_text().splitlines())]
    a, b = rows(one), rows(many)
    assert sorted(a, key=lambda r: r["key"]) == sorted(b, key=lambda r: r["key"]) and len(a) == 2 * 3 * 3
    assert [r["bud"] for r in b if r["method"] == "stem"] and all(r["bud"] < 1 for r in b if r["method"] == "stem")
    untimed = lambda rows: [{k: v for k, v in r.items() if "tok_s" not in k and not k.endswith("_s")} for r in rows]
    assert untimed(one.rows) == untimed(many.rows)
    again = stem_cli.evaluate("tiny-llama", methods="dense,stem,streaming", output=tmp_path / "many", batch_size=2, resume=True, **args)
    assert again.summary["computed"] == 0 and again.summary["reused"] == 18


def test_batch_size_is_checked_and_decode_methods_are_named(tmp_path, capsys):
    from stem_cli.errors import UsageError

    with pytest.raises(UsageError, match="--batch-size 0"):
        stem_cli.evaluate("tiny-llama", ["ruler/vt"], "dense", "600", batch_size=0, output=tmp_path, random_weights=True)
    from rich.console import Console

    console = Console(record=True, width=200)
    run = stem_cli.evaluate("tiny-llama", ["ruler/niah_single_1"], "dense,stem+prhs", "600", limit=2, max_new_tokens=3, batch_size=2,
                            output=tmp_path / "mixed", random_weights=True, device="cpu", console=console, overrides=SMALL)
    assert "stem+prhs decode(s) with a decode method" in console.export_text()
    assert len(run.store.path.read_text().splitlines()) == 4
