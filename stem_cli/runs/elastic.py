"""Elastic Attention's two ways to choose each head's mode (`stem calibrate`, `stem train-router`), saved to a file.

Both take the elastic config (defaults, TOML [elastic] table, overrides), load the model,
check the prompt length against its context, and run on synthetic retrieval prompts
(stem_cli/elastic/calibrate.py, train.py say how).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from stem_cli.errors import UsageError
from stem_cli.runs.evaluation import default_console


@dataclasses.dataclass
class Calibrated:
    head_map: Any  # elastic.headmap.HeadMap
    path: Path


@dataclasses.dataclass
class TrainedRouter:
    router: Any  # elastic.router.ElasticRouter
    history: list
    path: Path


def prompt_source(prompts: str) -> str | None:
    """'auto' -> None (the calibrator picks), 'needle' or 'ruler:niah_TASK' as they are."""
    if prompts == "auto":
        return None
    if prompts == "needle" or prompts.startswith("ruler:niah"):
        return prompts
    raise UsageError(f"--prompts {prompts!r}: use auto, needle or ruler:niah_TASK (e.g. ruler:niah_single_2)")


def _setup(model: str, seq_len, config, overrides, device: str, dtype: str, random_weights: bool, console):
    """(elastic config, loaded model, length)."""
    from stem_cli.models import load_model
    from stem_cli.runs import plan

    length = plan.parse_length(seq_len)
    elastic = plan.methods_and_configs(["elastic"], config, overrides)[1]["elastic"]
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=console)
    plan.check_context(loaded.model, [length])
    return elastic, loaded, length


def calibrate(model: str = "smollm2-135m", *, target_sparsity: float = 0.7, seq_len="4k", samples: int = 4, seed: int = 0,
              streaming_threshold: float = 0.05, prompts: str = "auto", output: str | Path | None = None,
              config: str | Path | None = None, overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto",
              random_weights: bool = False, console=None) -> Calibrated:
    """A head map without training: the best retrieval heads dense, the rest Stem or streaming; saved to `output`
    (default head-maps/MODEL.json)."""
    from stem_cli.elastic.calibrate import calibrate as calibrate_heads
    from stem_cli.elastic.headmap import save_head_map
    from stem_cli.environment import slug

    console = console or default_console()
    source = prompt_source(prompts)
    elastic, loaded, length = _setup(model, seq_len, config, overrides, device, dtype, random_weights, console)
    try:
        head_map = calibrate_heads(
            loaded.model, loaded.tokenizer, model_name=model, config=elastic, target_sparsity=target_sparsity, seq_len=length,
            samples=samples, seed=seed, streaming_threshold=streaming_threshold, source=source, console=console,
        )
    except ValueError as e:  # prompts that cannot be built at this length, a model with no governed layer
        raise UsageError(str(e)) from None
    return Calibrated(head_map, save_head_map(head_map, output or Path("head-maps") / f"{slug(model)}.json"))


def router_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """'auto' -> the default training mix; else RULER task names (comma-separated) or 'needle'."""
    from stem_cli.elastic.train import TRAINING_TASKS
    from stem_cli.tasks import ruler

    names = [t.strip() for part in ([tasks] if isinstance(tasks, str) else tasks) for t in str(part).split(",") if t.strip()]
    if names in ([], ["auto"]):
        return TRAINING_TASKS
    bad = [t for t in names if t != "needle" and t.removeprefix("ruler/") not in ruler.TASKS]
    if bad or ("needle" in names and len(names) > 1):
        raise UsageError(f"--tasks {','.join(names)!r}: use auto, needle, or RULER task names ({', '.join(ruler.TASKS)})")
    return tuple(t.removeprefix("ruler/") for t in names)


def train_router(model: str = "smollm2-135m", *, steps: int = 300, target_sparsity: float = 0.7, seq_len="2k", samples: int = 8,
                 seed: int = 0, lr: float = 1e-2, sparsity_weight: float = 10.0, tau: float = 1.0, tau_end: float = 0.3,
                 noise_fraction: float = 0.6, tasks: str | Iterable[str] = "auto", output: str | Path | None = None,
                 checkpoint: str | Path | None = None, checkpoint_every: int = 25, resume: bool = False,
                 config: str | Path | None = None, overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto",
                 random_weights: bool = False, console=None) -> TrainedRouter:
    """The Elastic Attention router trained with the backbone frozen (stem_cli/elastic/train.py), saved to `output`
    (default routers/MODEL.pt) with its settings, model identity and curve; beside it OUTPUT.json (the same record and
    the curve, readable without torch) and OUTPUT.png (loss and Omega per step). `checkpoint` (default OUTPUT.ckpt)
    is written every `checkpoint_every` steps; `resume` continues from it."""
    import json

    from stem_cli.elastic.train import TrainSettings
    from stem_cli.elastic.train import train_router as train
    from stem_cli.environment import slug
    from stem_cli.models import load_model
    from stem_cli.report.plots import plot_router_curve
    from stem_cli.runs import plan
    from stem_cli.runs.keys import weights_identity

    console = console or default_console()
    names = router_tasks(tasks)
    lengths = plan.parse_lengths(seq_len)
    if checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every {checkpoint_every}: use a step count >= 1")
    elastic = plan.methods_and_configs(["elastic"], config, overrides)[1]["elastic"]
    try:
        settings = TrainSettings(steps=steps, target_sparsity=target_sparsity, lengths=lengths, samples=samples, tasks=names, seed=seed,
                                 lr=lr, sparsity_weight=sparsity_weight, tau_start=tau, tau_end=tau_end, noise_fraction=noise_fraction)
    except ValueError as e:
        raise UsageError(str(e)) from None
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=console)
    plan.check_context(loaded.model, lengths)
    output = Path(output or Path("routers") / f"{slug(model)}.pt").expanduser()
    checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else output.with_name(output.name + ".ckpt")
    try:
        router, history = train(loaded.model, loaded.tokenizer, model_name=model, config=elastic, settings=settings,
                                weights=weights_identity(loaded)["weights"], checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                resume=resume, console=console)
    except ValueError as e:
        raise UsageError(str(e)) from None
    path = router.save(output)
    record = router_record(router)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    info = router.training_info
    plot_router_curve(history, output.with_suffix(".png"), f"router of {model} at {', '.join(map(str, lengths))} tokens: "
                      f"{steps} steps, target Omega {target_sparsity:.0%}, final {info['final_omega']:.1%} "
                      f"({info['device']}, {info['seconds']:.0f} s)", target_sparsity)
    return TrainedRouter(router, history, path)


def router_record(router) -> dict:
    """The router file's record without its weights (JSON-able): model, settings, code version, curve."""
    from stem_cli.elastic.router import FORMAT, VERSION
    from stem_cli.environment import provenance

    return {"format": FORMAT, "version": VERSION, "model": router.model_info, "code": provenance(),
            "num_layers": router.num_layers, "num_kv_heads": router.num_kv_heads, "head_dim": router.head_dim,
            "dense_layers": list(router.dense_layers), "target_sparsity": router.target_sparsity, "training": router.training_info}
