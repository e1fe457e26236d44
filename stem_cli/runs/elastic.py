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


def train_router(model: str = "smollm2-135m", *, steps: int = 200, target_sparsity: float = 0.7, seq_len="2k", samples: int = 16,
                 seed: int = 0, lr: float = 1e-3, sparsity_weight: float = 10.0, tau: float = 1.0, prompts: str = "auto",
                 output: str | Path | None = None, config: str | Path | None = None, overrides: Iterable[str] = (),
                 device: str = "auto", dtype: str = "auto", random_weights: bool = False, console=None) -> TrainedRouter:
    """The Elastic Attention router trained with the backbone frozen; saved to `output` (default routers/MODEL.pt)."""
    from stem_cli.elastic.train import train_router as train
    from stem_cli.environment import slug

    console = console or default_console()
    source = prompt_source(prompts)
    elastic, loaded, length = _setup(model, seq_len, config, overrides, device, dtype, random_weights, console)
    try:
        router, history = train(
            loaded.model, loaded.tokenizer, model_name=model, config=elastic, steps=steps, target_sparsity=target_sparsity,
            seq_len=length, samples=samples, seed=seed, lr=lr, sparsity_weight=sparsity_weight, tau=tau, source=source, console=console,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return TrainedRouter(router, history, router.save(output or Path("routers") / f"{slug(model)}.pt"))
