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


def _writer(result: dict, path: Path, key: str = "rows"):
    """save(row=None): append the row (if any) to result[key] and rewrite the JSON."""

    def save(row=None):
        if row is not None:
            result[key].append(row)
        path.write_text(json.dumps(result, indent=2, default=str))

    return save


def _load_for_timing(model: str, *, dtype: str, device, random_weights: bool, console):
    """The model; a registry alias whose weights are not available is built with random weights, with a notice."""
    from stem_cli.models import REGISTRY, ModelError, load_model

    try:
        return load_model(model, dtype=dtype, device=str(device), random_weights=random_weights, console=console)
    except ModelError as e:
        if random_weights or model not in REGISTRY:
            raise
        console.print(f"[yellow]notice:[/] weights not available ({escape(str(e).splitlines()[0])}); using random weights from the shipped config")
        return load_model(model, dtype=dtype, device=str(device), random_weights=True, console=console)


def _check_generation_options(prefill_method, new_tokens, names: list[str]) -> None:
    """--prefill-method: a registered pre-fill method; --new-tokens: 2 or more; each decode method once."""
    from stem_cli.registry import METHODS, split_spec

    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise UsageError(f"--new-tokens {new_tokens!r} is not allowed: use a whole number of tokens, 2 or more "
                         "(the first new token comes from the pre-fill, the others from decode steps)")
    if not isinstance(prefill_method, str) or prefill_method not in METHODS or split_spec(prefill_method)[1] is not None:
        what = "a decode spec" if isinstance(prefill_method, str) and split_spec(prefill_method)[1] is not None else "not a pre-fill method"
        raise UsageError(f"--prefill-method {prefill_method!r} is {what}; use one of: {', '.join(METHODS)}")
    seen: dict[str, str] = {}
    for name in names:
        decode = split_spec(name)[1] or "dense"
        if decode in seen:
            raise UsageError(f"--methods {seen[decode]!r} and {name!r} are both decode method {decode!r}: the generation section "
                             "runs each decode method once, after --prefill-method (--no-generation times them apart)")
        seen[decode] = name


def profile(model: str | None = None, methods: str | Iterable[str] = "dense,stem", lengths=None, *, batch: int = 1, warmup: int = 2,
            repeat: int = 5, random_weights: bool = False, config: str | Path | None = None, overrides: Iterable[str] = (),
            device: str = "auto", dtype: str = "auto", output: str | Path = "profiles", console=None,
            command: str | None = None) -> dict:
    """Pre-fill time end to end against attention (estimation + sparse attention) per method and length, NVML on a GPU.

    Writes OUTPUT/profile-TIME-DEVICE-MODEL.json (row by row) and .png; returns the JSON's content, with the
    written files under "paths". Defaults: llama3-8b at 8k,32k,128k on a GPU, smollm2-135m at 1k,4k on the CPU.
    A registry model whose weights are not available runs with random weights, with a notice."""
    from stem_cli.models import resolve_device
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
    loaded = _load_for_timing(model, dtype=dtype, device=dev, random_weights=random_weights, console=console)
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
                   warmup: int = 4, repeat: int = 32, generation: bool = True, prefill_method: str = "stem",
                   new_tokens: int = 128, random_weights: bool = False, config: str | Path | None = None,
                   overrides: Iterable[str] = (), device: str = "auto", dtype: str = "auto", output: str | Path = "profiles",
                   console=None, command: str | None = None) -> dict:
    """Per-token decode attention latency of dense and decode methods on a synthetic KV cache shaped as `model`
    (a registry alias; see decode_profile.py for what is timed), then, unless generation=False, generation end
    to end on the model itself: a prompt of each length pre-filled with `prefill_method`, then `new_tokens`
    greedy tokens with each decode method (generation_profile.py).

    Writes OUTPUT/profile-decode-TIME-DEVICE-MODEL.json row by row ("rows": attention only; "generation": end to
    end); returns its content, the file under "paths". Defaults: llama3-8b at 32k,128k on a GPU (smollm2-135m at
    2k,8k on the CPU), dense,topk-decode,prhs,quest; a registry model whose weights are not available generates
    with random weights from its shipped config, with a notice."""
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
    names, _ = plan.methods_and_configs(methods or DECODE_METHODS_DEFAULT)  # the names, checked
    bad = [n for n in names if n != "dense" and split_spec(n)[1] is None]
    if bad:
        raise UsageError(f"--decode profiles decode methods: {bad[0]!r} is a pre-fill method; use dense, prhs, topk-decode, quest (or PREFILL+DECODE)")
    if generation:
        _check_generation_options(prefill_method, new_tokens, names)
    # The pre-fill method's config is built with the decode methods' (its TOML table, bare and qualified --set).
    extra = [prefill_method] if generation and prefill_method not in names else []
    _, configs = plan.methods_and_configs([*names, *extra], config, overrides)
    decode_configs = {n: configs[n].decode for n in names if n != "dense"}
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
    if generation:
        _profile_generation(result, json_path, model, names, configs, lengths, prefill_method=prefill_method,
                            new_tokens=new_tokens, batch=batch, random_weights=random_weights, dtype=dtype, device=dev,
                            console=console)
    return {**result, "paths": {"json": json_path}}


def _profile_generation(result: dict, json_path: Path, model: str, names: list[str], configs: dict, lengths: list[int], *,
                        prefill_method: str, new_tokens: int, batch: int, random_weights: bool, dtype: str, device, console) -> None:
    """The end-to-end section of profile_decode: loads the model (after the synthetic caches are freed) and
    fills result["generation"] row by row."""
    from stem_cli.registry import combine_configs, split_spec
    from stem_cli.runs import plan
    from stem_cli.runs.generation_profile import WARMUP_TOKENS, time_generation, total_memory_bytes

    loaded = _load_for_timing(model, dtype=dtype, device=device, random_weights=random_weights, console=console)
    plan.check_context(loaded.model, lengths)
    limit = plan.context_limit(loaded.model)
    if limit and max(lengths) + new_tokens > limit:
        console.print(f"[yellow]notice:[/] {max(lengths)} + {new_tokens} new tokens runs past {model}'s context of {limit} positions; "
                      "the last positions are extrapolated (the time per token is not affected)")
    decode_methods, run_configs = [], {}
    for name in names:
        decode = split_spec(name)[1] or "dense"
        decode_methods.append(decode)
        run_configs[decode] = (configs[prefill_method] if decode == "dense"
                               else combine_configs(prefill_method, configs[prefill_method], decode, configs[name].decode))
    on_gpu = device.type == "cuda"
    # the decode loops run with the fastest SDPA backend the attention section measured at each length (decode_profile.py)
    backends = {r["seq_len"]: r.get("sdpa_backend") for r in result["rows"] if r["method"] == "dense" and r.get("status") == "ok"}
    result["generation_parameters"] = {
        "model_source": loaded.source,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "prefill_method": prefill_method,
        "prefill_config": dataclasses.asdict(configs[prefill_method]),
        "decode_methods": decode_methods,
        "new_tokens": new_tokens,
        "decode_steps": new_tokens - 1,
        "batch": batch,
        "prompt": "random token ids, torch.Generator seeded with seed + length (seed 0)",
        "cache": "transformers DynamicCache",
        "decode_sdpa_backends": {str(n): b for n, b in backends.items()},
        "warmup": f"per length, one untimed generation: one pre-fill, then {WARMUP_TOKENS} decode steps with each decode method",
        "timing": ("CUDA events: one pair around the pre-fill, one around the decode loop (no host sync inside it)" if on_gpu
                   else "host clock (CPU timings)"),
        "device_memory_gib": total_memory_bytes(device) / 2**30,
    }
    result["generation"] = []
    save = _writer(result, json_path, "generation")
    save()
    console.print(f"[dim]generation: {escape(loaded.source)}, pre-fill {prefill_method}, {new_tokens} new tokens per decode method "
                  f"(greedy, no stop at EOS), after one untimed generation per length[/]")
    with console.status("profiling generation") as status:
        time_generation(loaded.model, prefill_method, decode_methods, run_configs, lengths, new_tokens=new_tokens, batch=batch,
                        sdpa_backends=backends, on_row=save, progress=lambda what: status.update(f"profiling generation: {what}"))
    save()
    del loaded
