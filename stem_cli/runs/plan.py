"""What a run will do, checked before any work: methods and their configs, lengths, the model, jobs.

Every check here raises `UsageError` (the CLI's exit code 2) with a message that names the
option as the user wrote it. The context check is the only one in the package: a length is
allowed when it fits the model's text context (`max_position_embeddings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from stem_cli.config import ConfigError
from stem_cli.errors import UsageError


def methods_and_configs(methods: str | Iterable[str], config: str | Path | None = None, overrides: Iterable[str] = ()) -> tuple[list[str], dict]:
    """('dense,stem' or ['dense', 'stem+prhs']) -> (checked names, each name's config: defaults, TOML table, overrides)."""
    from stem_cli.registry import build_configs, parse_method_list

    names = parse_method_list([methods] if isinstance(methods, str) else list(methods))
    configs = build_configs(names, str(config) if config else None, list(overrides))
    if "elastic-router" in configs and not configs["elastic-router"].router:
        raise UsageError("elastic-router needs its router: --set elastic-router.router=FILE (from `stem train-router`)")
    return names, configs


def parse_lengths(lengths: str | int | Iterable[int | str]) -> list[int]:
    """'4k,8k' or 4096 or [4096, '8k'] -> token counts."""
    from stem_cli.units import parse_length, parse_lengths as parse_text

    try:
        if isinstance(lengths, str):
            return parse_text(lengths)
        if isinstance(lengths, int):
            return [parse_length(str(lengths))]
        return [parse_length(str(n)) for n in lengths]
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_length(length: str | int) -> int:
    """'4k' or 4096 -> token count."""
    from stem_cli.units import parse_length as parse_text

    try:
        return parse_text(str(length))
    except ValueError as e:
        raise UsageError(str(e)) from None


def context_limit(model) -> int | None:
    """The model's text context in tokens (a multimodal config's text part), None when it states none."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", getattr(config, "max_position_embeddings", None))


def check_context(model, lengths: list[int], option: str = "--seq-len") -> None:
    limit = context_limit(model)
    if limit and max(lengths) > limit:
        raise UsageError(f"{option} {max(lengths)} exceeds the model's context of {limit} tokens; use lengths up to {limit}")


def check_budget(budget: float | None) -> None:
    if budget is not None and not 0 < budget <= 1:
        raise UsageError(f"--budget {budget!r} is not allowed: use a fraction in (0, 1], e.g. 0.3")


def check_batch_size(batch_size: int, names: list[str], refs: list, console) -> None:
    """--batch-size: a positive count; say which runs cannot be decoded in batches (no silent slower path)."""
    from stem_cli.registry import split_spec

    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size!r} is not allowed: use a whole number of samples, 1 or more")
    if batch_size == 1:
        return
    single = [n for n in names if split_spec(n)[1] is not None]
    if single:
        console.print(f"[yellow]notice:[/] {', '.join(single)} decode(s) with a decode method that keeps per-sample state: "
                      "one sample at a time (--batch-size applies to the other methods)")
    if not any(r.kind == "generate" for r in refs):
        console.print("[yellow]notice:[/] --batch-size applies to generation tasks only; none of these tasks generates")


def output_folder(output: str | Path) -> Path:
    """The folder results go to; a file of that name is an error (the folder itself is made when written)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file; give a folder")
    return output


def jobs(model, runner, names: list[str], configs: dict, lengths: list[int], refs: list, budget: float | None, console,
         knobs=None) -> list:
    """One Job per (method, length); with a budget each method's knob is solved on the length's probe prompts, or taken
    from `knobs` (a knobs.Knobs: solved knobs stored as they are found) when solved before with the same settings."""
    from stem_cli.runs.knobs import Knobs, solving_display
    from stem_cli.runs.runner import Job
    from stem_cli.units import format_length

    knobs = knobs if knobs is not None else Knobs(None, runner.identity["weights"], runner.settings.dtype)
    check_routers(configs, runner.identity["weights"])
    check_attention_dtypes(configs, model)
    out = []
    with solving_display(console) as progress_for:
        for n in lengths:
            probe = None
            for name in names:
                if budget is None or name == "dense":
                    out.append(Job(name, configs[name], n))
                    continue
                if probe is None:
                    probe = probe_prompts(runner, refs, n, model)
                label = f"{name} @ {format_length(n)} for BUD {budget:.0%}"
                config, info, stored = knobs.solve(model, name, configs[name], n, budget, probe, progress_for(label))
                console.print(f"[dim]{name} @ {n}: {info['name']}={info['value']:.4g} gives BUD {info['probe_bud']:.1%} "
                              f"on {len(probe)} probe prompt(s){' (solved before, reused)' if stored else ''}[/]")
                out.append(Job(name, config, n, knob=info))
    return out


def check_routers(configs: dict, weights: str) -> None:
    """A router trained on other weights (same architecture: apply-time checks pass) is refused before any work."""
    for name, config in configs.items():
        if getattr(config, "router", ""):
            from stem_cli.elastic.router import load_router

            load_router(config.router).check_weights(weights, where=f"{name}: router {config.router!r}")


def check_attention_dtypes(configs: dict, model) -> None:
    """attn_dtype=fp8 where the model's device cannot run the FP8 kernel is refused before any work."""
    from stem_cli.executor import check_attn_dtype

    device = next(model.parameters()).device
    for name, config in configs.items():
        attn_dtype = getattr(config, "attn_dtype", "bf16")
        if attn_dtype != "bf16":
            try:
                check_attn_dtype(attn_dtype, device)
            except ConfigError as error:
                raise ConfigError(f"{name}: {error}") from None


def probe_prompts(runner, refs: list, n: int, model, most: int = 3) -> list:
    """The first prompt of up to `most` tasks spread over the run's built-in tasks: what budgets are fitted on.

    Data-dependent methods keep different amounts on different inputs (a noise haystack
    and a word list are not alike), so one prompt would not stand for the run."""
    built = [r for r in refs if r.kind != "lm-eval"]
    if not built:
        raise UsageError("--budget needs at least one built-in task to fit the budget on")
    k = min(most, len(built))
    picked = [built[round(i * (len(built) - 1) / max(k - 1, 1))] for i in range(k)]
    return [token_ids(runner.samples(r, n)[0].input_ids, model) for r in dict.fromkeys(picked)]


def token_ids(ids: list[int], model):
    """A batch of one prompt, on the model's device."""
    import torch

    return torch.tensor([ids], device=next(model.parameters()).device)


def full_budget_notice(rows: list[dict], console, seq_len: int | None = None) -> None:
    """Say so when a sparse method computed every block (BUD 100%) at a length: it ran as dense attention there,
    so its accuracy and time say nothing about sparsity (e.g. Stem's start budget covers a whole 4K prompt)."""
    from rich.markup import escape

    from stem_cli.report.tables import keeps_everything
    from stem_cli.units import format_length

    groups: dict[tuple[str, int | None], list] = {}
    for r in rows:
        if r.get("bud") is not None:
            groups.setdefault((r["method"], r.get("seq_len", seq_len)), []).append(r["bud"])
    for (method, n), buds in groups.items():
        if all(keeps_everything(method, b) for b in buds):
            at = f" at {format_length(n)}" if n else ""
            console.print(f"[yellow]notice:[/] {escape(method)} keeps every block{at} (BUD 100%): it ran as dense attention there; "
                          "a longer --seq-len or a smaller block_size (--set block_size=32) makes it sparse", highlight=False)


def planned_generations(jobs: list, refs: list, limit: int) -> int:
    """Upper bound on the per-sample results a run computes: jobs x built-in tasks x samples (fewer when stored)."""
    return len(jobs) * sum(r.kind != "lm-eval" for r in refs) * limit


def plan_line(jobs: list, refs: list, limit: int) -> str:
    """'plan: up to 110 generations (11 task(s) x 5 sample(s) x 2 method(s) at 4K); ...' printed before any work."""
    from stem_cli.units import format_length

    built = [r for r in refs if r.kind != "lm-eval"]
    lengths = list(dict.fromkeys(j.seq_len for j in jobs))
    methods = list(dict.fromkeys(j.method for j in jobs))
    parts = [f"up to {planned_generations(jobs, refs, limit)} generation(s) ({len(built)} task(s) x {limit} sample(s) x "
             f"{len(methods)} method(s) at {', '.join(format_length(n) for n in lengths)})"]
    lm_eval = len(refs) - len(built)
    if lm_eval:
        parts.append(f"{lm_eval * len(jobs)} lm-eval run(s)")
    return "plan: " + " and ".join(parts) + "; stored results are reused; a time estimate follows the first sample"


class Estimate:
    """Wraps a progress callback: once the first sample has run under every method, prints the time left at the
    pace measured so far (a measurement on this machine, not a model of it), so a run of hours says so early."""

    def __init__(self, progress, runner, planned: int, per_sample: int, console):
        import time

        self.progress, self.runner, self.planned, self.per_sample, self.console = progress, runner, planned, per_sample, console
        self.clock = time.perf_counter
        self.start, self.said = None, planned == 0

    def __call__(self, what: str, done: int, total: int) -> None:
        self.progress(what, done, total)
        computed = self.runner.computed
        if self.said:
            return
        if computed == 0:
            self.start = self.clock()  # reused results and sample building before the first computed one do not count
            return
        if computed >= min(self.per_sample, self.planned):
            self.said = True
            each = (self.clock() - self.start) / computed
            left = max(self.planned - computed - self.runner.reused, 0)
            self.console.print(f"[dim]estimate: {each:.1f} s per generation measured on the first {computed}; "
                               f"up to {left} more: about {_duration(each * left)} at this pace[/]")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
