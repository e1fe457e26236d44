"""One prompt answered under each method (`stem generate`, `stem_cli.runs.generate`): the answer, BUD and time per method."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from rich.markup import escape

from stem_cli.errors import UsageError
from stem_cli.runs.evaluation import default_console


@dataclasses.dataclass
class Answers:
    """`rows`: per method {method, bud, prefill_s, decode_s, tokens, correct (None without an expected answer), text}."""

    model: str
    source: str  # where the weights came from
    prompt_tokens: int
    prompt: str  # what the prompt is: "built-in needle, 4096 tokens, depth 40%", "file x.txt, 900 tokens", ...
    expected: str | None  # the needle's answer, when the prompt is the built-in needle
    rows: list[dict]


def check_prompt(prompt: str | None, prompt_file: str | Path | None, needle: str | int | None) -> None:
    """At most one prompt source, and a prompt with text in it: the chat template alone is no prompt
    (the answer would mean nothing). Checked before the model loads."""
    if sum(x is not None for x in (prompt, prompt_file, needle)) > 1:
        raise UsageError("give one of --prompt, --prompt-file, --needle")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {str(path)!r} does not exist")
        if not path.read_text().strip():
            raise UsageError(f"--prompt-file {str(path)!r} is empty: give a file with the prompt text")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty: give the prompt text, or --prompt-file FILE, or --needle LENGTH")


def prompt_ids(loaded, prompt: str | None, prompt_file: str | Path | None, needle: str | int | None, seed: int):
    """(input_ids, answer or None, description) for the one prompt chosen; the built-in 4k needle when none is."""
    from stem_cli.runs import plan

    check_prompt(prompt, prompt_file, needle)
    chosen = [x is not None for x in (prompt, prompt_file, needle)]
    tok = loaded.tokenizer
    if needle is not None or not any(chosen):
        from stem_cli.tasks.needle import build_needle_prompt

        length = plan.parse_length(needle or "4k")
        plan.check_context(loaded.model, [length], "--needle")
        built = build_needle_prompt(tok, length, seed=seed)
        return built.input_ids, built.answer, f"built-in needle, {built.n_tokens} tokens, depth {built.depth:.0%}"
    if prompt_file is not None:
        prompt_file = Path(prompt_file)
        prompt = prompt_file.read_text()
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    return ids, None, f"{'file ' + str(prompt_file) if prompt_file else 'prompt'}, {ids.shape[1]} tokens"


def generate(model: str = "smollm2-135m", methods: str | Iterable[str] = ("dense", "stem"), *, prompt: str | None = None,
             prompt_file: str | Path | None = None, needle: str | int | None = None, max_new_tokens: int = 32,
             config: str | Path | None = None, overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto",
             random_weights: bool = False, seed: int = 0, console=None, on_answer: Callable[[dict], None] | None = None) -> Answers:
    """Greedy answers to one prompt (text, a file, or the built-in needle of `needle` tokens) under each method.

    `on_answer(row)` is called as each method's answer is made."""
    import stem_cli
    from stem_cli.generation import greedy, stop_ids_of
    from stem_cli.models import check_model_name, load_model
    from stem_cli.runs import plan

    console = console or default_console()
    names, configs = plan.methods_and_configs(methods, config, overrides)
    check_prompt(prompt, prompt_file, needle)
    check_model_name(model, random_weights)
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=console)
    ids, answer, what = prompt_ids(loaded, prompt, prompt_file, needle, seed)
    dev = next(loaded.model.parameters()).device
    ids = ids.to(dev)
    console.print(f"[dim]{escape(f'{loaded.source} on {dev}, {what}')}[/]")
    stop = stop_ids_of(loaded.model, loaded.tokenizer)
    rows = []
    for name in names:
        runtime = stem_cli.apply(loaded.model, name, configs[name])
        runtime.recorder.reset()
        with console.status(f"{name}: pre-fill and decode"):
            result = greedy(loaded.model, ids, max_new_tokens=max_new_tokens, stop_ids=stop)
        text = loaded.tokenizer.decode(result.new_tokens, skip_special_tokens=True).strip()
        correct = None
        if answer:
            from stem_cli.tasks.needle import score_needle

            correct = bool(score_needle(text, answer))
        row = {"method": name, "bud": runtime.recorder.bud, "prefill_s": result.prefill_seconds, "decode_s": result.decode_seconds,
               "tokens": len(result.new_tokens), "correct": correct, "text": text}
        rows.append(row)
        if on_answer:
            on_answer(row)
    plan.full_budget_notice(rows, console, seq_len=ids.shape[1])
    return Answers(model, loaded.source, ids.shape[1], what, answer, rows)
