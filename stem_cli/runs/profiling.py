"""Timing runs (`stem profile`, `stem_cli.profile`, `stem_cli.runs.profile_decode`): the result JSON (and plot) per run.

The measurements themselves are in prefill_profile.py (a model's pre-fill, end to end
against attention) and decode_profile.py (decode-step attention on a synthetic cache);
this module picks defaults, checks the plan, records what the numbers were measured on,
and writes each row as it is made, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Iterable

from rich.markup import escape

from stem_cli.errors import UsageError
from stem_cli.runs.defaults import PROFILE_CPU_DEFAULTS, PROFILE_GPU_DEFAULTS
from stem_cli.runs.evaluation import command_line, default_console

SCHEMA_VERSION = 1  # of the profile JSONs (pre-fill and decode); eval and compare JSONs have their own


def _writer(result: dict, path: Path):
    """save(row=None): append the row (if any) to result["rows"] and rewrite the JSON."""

    def save(row=None):
        if row is not None:
            result["rows"].append(row)
        path.write_text(json.dumps(result, indent=2, default=str))

    return save


def profile(model: str | None = None, methods: str | Iterable[str] = "dense,stem", lengths=None, *, batch: int = 1, warmup: int = 2,
            repeat: int = 5, random_weights: bool = False, config: str | Path | None = None, overrides: Iterable[str] = (),
            device: str = "auto", dtype: str = "auto", output: str | Path = "profiles", console=None,
            command: str | None = None) -> dict:
    """Pre-fill time end to end against attention (estimation + sparse attention) per method and length, NVML on a GPU.

    Writes OUTPUT/profile-TIME-DEVICE-MODEL.json (row by row) and .png; returns the JSON's content, with the
    written files under "paths". Defaults: llama3-8b at 8k,32k,128k on a GPU, smollm2-135m at 1k,4k on the CPU.
    A registry model whose weights are not available runs with random weights, with a notice."""
    from stem_cli.models import REGISTRY, ModelError, load_model, resolve_device
    from stem_cli.nvml import NvmlSampler
    from stem_cli.report.plots import plot_profile
    from stem_cli.runs import plan
    from stem_cli.environment import environment, provenance, slug
    from stem_cli.runs.prefill_profile import profile_prefill

    console = console or default_console()
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    defaults = PROFILE_GPU_DEFAULTS if on_gpu else PROFILE_CPU_DEFAULTS
    model = model or defaults[0]
    lengths = plan.parse_lengths(lengths or defaults[1])
    names, configs = plan.methods_and_configs(methods, config, overrides)
    if not on_gpu:
        console.print("[yellow]notice:[/] no GPU: these are CPU timings of a small model (PyTorch reference for sparse attention), not GPU kernel speed; NVML skipped")
    try:
        loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=random_weights, console=console)
    except ModelError as e:
        if random_weights or model not in REGISTRY:
            raise
        console.print(f"[yellow]notice:[/] weights not available ({escape(str(e).splitlines()[0])}); using random weights from the shipped config")
        loaded = load_model(model, dtype=dtype, device=str(dev), random_weights=True, console=console)
    plan.check_context(loaded.model, lengths)
    sampler_info = None
    if on_gpu:
        probe = NvmlSampler(dev.index or 0)
        sampler_info = probe.static_info()
        if not probe.available:
            console.print(f"[yellow]notice:[/] {escape(str(probe.reason))}; continuing without GPU telemetry")

    env = environment(dev, sampler_info)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    name = f"profile-{stamp:%Y%m%d-%H%M%S}-{slug(env.get('gpu', 'cpu'))}-{slug(model)}"
    output = plan.output_folder(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output / f"{name}.json", output / f"{name}.png"
    result = {
        "schema_version": SCHEMA_VERSION,
        **provenance(),
        "command": command or command_line(),
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
    save = _writer(result, json_path)
    with console.status("profiling") as status:
        profile_prefill(loaded.model, names, configs, lengths, batch=batch, warmup=warmup, repeat=repeat,
                        on_row=save, progress=lambda what: status.update(f"profiling {what}"))
    save()
    plot_profile(result["rows"], png_path, f"{model} pre-fill on {env.get('gpu', 'CPU')} ({result['dtype']})")
    return {**result, "paths": {"json": json_path, "png": png_path}}


def profile_decode(model: str | None = None, methods: str | Iterable[str] | None = None, lengths=None, *, batch: int = 1,
                   warmup: int = 4, repeat: int = 32, config: str | Path | None = None, overrides: Iterable[str] = (),
                   device: str = "auto", dtype: str = "auto", output: str | Path = "profiles", console=None,
                   command: str | None = None) -> dict:
    """Per-token decode attention latency of dense and decode methods on a synthetic KV cache shaped as `model`
    (a registry alias; see decode_profile.py for what is timed).

    Writes OUTPUT/profile-decode-TIME-DEVICE-MODEL.json row by row; returns its content, the file under "paths".
    Defaults: llama3-8b's shape at 32k,128k on a GPU (smollm2-135m's at 2k,8k on the CPU), dense,topk-decode,prhs,quest."""
    from stem_cli.models import REGISTRY, resolve_device, resolve_dtype, shipped_config
    from stem_cli.registry import split_spec
    from stem_cli.runs import plan
    from stem_cli.runs.decode_profile import CPU_DEFAULTS, DECODE_METHODS_DEFAULT, DRIFT_SIGMA, GPU_DEFAULTS, Shape, time_decode
    from stem_cli.environment import environment, provenance, slug

    console = console or default_console()
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    model = model or defaults[0]
    if model not in REGISTRY:
        raise UsageError(f"--model {model!r}: --decode takes the attention shapes of a registry alias ({', '.join(REGISTRY)})")
    shape = Shape.of(shipped_config(model))
    lengths = plan.parse_lengths(lengths or defaults[1])
    names, configs = plan.methods_and_configs(methods or DECODE_METHODS_DEFAULT, config, overrides)
    bad = [n for n in names if n != "dense" and split_spec(n)[1] is None]
    if bad:
        raise UsageError(f"--decode profiles decode methods: {bad[0]!r} is a pre-fill method; use dense, prhs, topk-decode, quest (or PREFILL+DECODE)")
    decode_configs = {n: c.decode for n, c in configs.items() if n != "dense"}
    torch_dtype = resolve_dtype(dtype, dev)
    if not on_gpu:
        console.print("[yellow]notice:[/] no GPU: CPU timings with the PyTorch reference, not GPU kernel speed")
    console.print(f"[dim]synthetic KV cache shaped as {model}: {shape.layers} layers, {shape.q_heads} query / {shape.kv_heads} KV heads, "
                  f"head dim {shape.head_dim}, {str(torch_dtype).removeprefix('torch.')}; attention only, no model weights[/]")

    env = environment(dev, None)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    name = f"profile-decode-{stamp:%Y%m%d-%H%M%S}-{slug(env.get('gpu', 'cpu'))}-{slug(model)}"
    output = plan.output_folder(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / f"{name}.json"
    result = {
        "schema_version": SCHEMA_VERSION,
        **provenance(),
        "command": command or command_line(),
        "timestamp": stamp.isoformat(),
        "kind": "decode",
        "model_shape": model,
        "shape": dataclasses.asdict(shape),
        "data": "synthetic KV cache and drifting queries (random values), attention only; see stem_cli/runs/decode_profile.py",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "environment": env,
        "parameters": {"lengths": lengths, "methods": names, "batch": batch, "warmup_steps": warmup, "timed_steps": repeat,
                       "query_drift_sigma": DRIFT_SIGMA,
                       "configs": {n: dataclasses.asdict(c) for n, c in decode_configs.items()}},
        "timing": "CUDA events" if on_gpu else "host clock (CPU timings)",
        "rows": [],
    }
    save = _writer(result, json_path)
    with console.status("profiling decode") as status:
        time_decode(names, decode_configs, lengths, shape, device=dev, dtype=torch_dtype, batch=batch, warmup=warmup,
                    repeat=repeat, on_row=save, progress=lambda what: status.update(f"profiling decode: {what}"))
    save()
    return {**result, "paths": {"json": json_path}}
