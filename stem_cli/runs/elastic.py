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
                 noise_fraction: float = 0.6, logit_penalty: float = 1e-2, lr_width: int = 128, calibrate_prompts: int = 20, tasks: str | Iterable[str] = "auto", output: str | Path | None = None,
                 checkpoint: str | Path | None = None, checkpoint_every: int = 25, resume: bool = False,
                 config: str | Path | None = None, overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto",
                 random_weights: bool = False, console=None) -> TrainedRouter:
    """The Elastic Attention router trained with the backbone frozen (stem_cli/elastic/train.py), saved to `output`
    (default routers/MODEL.pt) with its settings, model identity and curve, its dense logits shifted at the end so the
    mean Omega of the first `calibrate_prompts` training prompts is the target (0: as trained); beside it OUTPUT.json (the same record and
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
                                 lr=lr, sparsity_weight=sparsity_weight, tau_start=tau, tau_end=tau_end, noise_fraction=noise_fraction,
                                 logit_penalty=logit_penalty, lr_width=lr_width, calibrate_prompts=calibrate_prompts)
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
    except KeyboardInterrupt:
        if checkpoint.is_file():
            import torch

            done = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
            console.print(f"[yellow]interrupted:[/] {checkpoint} holds {done} of {steps} steps; the same command with --resume continues")
        raise
    path = router.save(output)
    record = router_record(router)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    info = router.training_info
    plot_router_curve(history, output.with_suffix(".png"), f"router of {model} at {', '.join(map(str, lengths))} tokens: "
                      f"{steps} steps, target Omega {target_sparsity:.0%}, final {info['final_omega']:.1%} "
                      f"({info['device']}, {info['seconds']:.0f} s)", target_sparsity,
                      info.get("threshold"))
    return TrainedRouter(router, history, path)


def router_record(router) -> dict:
    """The router file's record without its weights (JSON-able): model, settings, code version, curve."""
    from stem_cli.elastic.router import FORMAT, VERSION
    from stem_cli.environment import provenance

    return {"format": FORMAT, "version": VERSION, "model": router.model_info, "code": provenance(),
            "num_layers": router.num_layers, "num_kv_heads": router.num_kv_heads, "head_dim": router.head_dim,
            "dense_layers": list(router.dense_layers), "target_sparsity": router.target_sparsity, "training": router.training_info}


# ------------------------------------------------------------------ adaptivity: Omega per task family

FAMILIES = {"vt": "multi-hop", "cwe": "aggregation", "fwe": "aggregation"}  # niah_*: retrieval
HELD_OUT_SEED = 1000  # added to the router's training seed: held-out prompts are never training prompts


def family(task: str) -> str:
    return "retrieval" if task.startswith("niah") else FAMILIES.get(task, task)


@dataclasses.dataclass
class OmegaByTask:
    rows: list  # per task: task, family, n, omega (mean), omega_min, omega_max, modes (mean fractions), map_omega
    families: list  # per family: family, tasks, n, omega, map_omega
    record: dict  # all of it, JSON-able (written to `path` when given)
    path: Path | None


def elastic_omega(model: str = "smollm2-135m", *, router: str | Path, head_map: str | Path | None = None,
                  tasks: str | Iterable[str] = "ruler", seq_len="2k", limit: int = 2, seed: int | None = None,
                  output: str | Path | None = None, device: str = "auto", dtype: str = "auto", random_weights: bool = False,
                  console=None) -> OmegaByTask:
    """Omega (fraction of heads not dense) the router chooses on held-out RULER prompts, per task and family, next to
    the calibrated head map's fixed Omega. Held-out: sample seed = the router's training seed + HELD_OUT_SEED
    (default). One pre-fill forward per prompt (no generation); the modes depend on the router and the input only."""
    import json

    import torch

    import stem_cli
    from stem_cli.elastic.router import load_router
    from stem_cli.models import check_model_name, load_model
    from stem_cli.runs import plan
    from stem_cli.runs.keys import weights_identity
    from stem_cli.runs.task_names import resolve_tasks
    from stem_cli.tasks import ruler

    console = console or default_console()
    lengths = plan.parse_lengths(seq_len)
    refs = [r for r in resolve_tasks([tasks] if isinstance(tasks, str) else list(tasks)) if r.name.removeprefix("ruler/") in ruler.TASKS]
    if not refs:
        raise UsageError(f"--task {tasks!r}: the router's Omega is measured on built-in RULER tasks (ruler, niah, ruler/vt, ...)")
    names = [r.name.removeprefix("ruler/") for r in refs]
    check_model_name(model, random_weights)
    trained = load_router(router)
    seed = int((trained.training_info or {}).get("seed", 0)) + HELD_OUT_SEED if seed is None else seed
    loaded = load_model(model, dtype=dtype, device=device, random_weights=random_weights, console=console)
    plan.check_context(loaded.model, lengths)
    trained.check_weights(weights_identity(loaded)["weights"], where=f"router {str(router)!r}")
    elastic = dict((trained.training_info or {}).get("elastic_config") or {})
    elastic = {k: tuple(v) if isinstance(v, list) else v for k, v in elastic.items()}
    device_of = next(loaded.model.parameters()).device

    def omega_of(runtime, ids) -> tuple[float, dict]:
        runtime.recorder.reset()
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids], device=device_of), use_cache=False, logits_to_keep=1)
        stats = runtime.recorder.elastic
        return stats.omega, stats.mode_fractions()

    samples = {(t, n): ruler.build_samples(t, loaded.tokenizer, n, seed=seed, limit=limit) for n in lengths for t in names}
    map_omega = None
    if head_map is not None:
        runtime = stem_cli.apply(loaded.model, "elastic", head_map=str(head_map), **elastic)
        map_omega = omega_of(runtime, samples[(names[0], lengths[0])][0].input_ids)[0]  # fixed: the same on every input
    runtime = stem_cli.apply(loaded.model, "elastic", router=str(router), **elastic)
    rows = []
    with console.status("routing held-out prompts") as status:
        for (task, n), built in samples.items():
            seen = []
            for i, sample in enumerate(built):
                status.update(f"routing {task} @ {n}: prompt {i + 1}/{len(built)}")
                seen.append(omega_of(runtime, sample.input_ids))
            omegas = [o for o, _ in seen]
            modes = {m: sum(f[m] for _, f in seen) / len(seen) for m in seen[0][1]}
            rows.append({"task": task, "family": family(task), "seq_len": n, "n": len(omegas), "omega": sum(omegas) / len(omegas),
                         "omega_min": min(omegas), "omega_max": max(omegas), "modes": modes, "map_omega": map_omega})
    stem_cli.apply(loaded.model, "dense")  # the router's key hooks off the model again
    families = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == fam]
        n = sum(r["n"] for r in mine)
        families.append({"family": fam, "tasks": sorted({r["task"] for r in mine}), "n": n,
                         "omega": sum(r["omega"] * r["n"] for r in mine) / n, "map_omega": map_omega})
    from stem_cli.environment import environment, provenance

    record = {"model": model, "router": str(router), "router_target": trained.target_sparsity, "head_map": str(head_map) if head_map else None,
              "seed": seed, "held_out": f"RULER samples of seed {seed} (training used seed {(trained.training_info or {}).get('seed')})",
              "lengths": lengths, "limit": limit, "rows": rows, "families": families, "code": provenance(),
              "environment": environment(device_of, None), "note": "qa: no built-in QA task (LongBench's needs its data files)"}
    path = None
    if output is not None:
        path = Path(output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str))
    return OmegaByTask(rows, families, record, path)
