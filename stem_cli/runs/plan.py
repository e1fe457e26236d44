"""What a run will do, checked before any work: methods and their configs, lengths, the model, jobs.

Every check here raises `UsageError` (the CLI's exit code 2) with a message that names the
option as the user wrote it. The context check is the only one in the package: a length is
allowed when it fits the model's text context (`max_position_embeddings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from stem_cli.errors import UsageError


def methods_and_configs(methods: str | Iterable[str], config: str | Path | None = None, overrides: Iterable[str] = ()) -> tuple[list[str], dict]:
    """('dense,stem' or ['dense', 'stem+prhs']) -> (checked names, each name's config: defaults, TOML table, overrides)."""
    from stem_cli.registry import build_configs, parse_method_list

    names = parse_method_list([methods] if isinstance(methods, str) else list(methods))
    return names, build_configs(names, str(config) if config else None, list(overrides))


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
