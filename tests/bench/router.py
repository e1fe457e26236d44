"""Elastic Attention's router on the GPU, in one run: train it, measure its Omega per task, time its overhead.

    python -m tests.bench.router --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf      # on a CUDA GPU, < 10 minutes
    python -m tests.bench.router --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --quick   # < 5 minutes: 60 s of training
    python -m tests.bench.router --model tiny-llama --device cpu --smoke           # seconds, no GPU (tests)

A benchmark, not part of the package (it imports stem_cli, never the other way round).

1. Training (stem_cli/elastic/train.py, backbone frozen, bf16): SmolLM2-135M on the default
   RULER mix at --lengths (4K and 8K), block size 32, target Omega --target. The steps are
   --steps, or fewer when a timed first step says they would not fit in --train-seconds
   (said so in the JSON: "steps_planned", "steps"), then the final threshold puts the mean Omega of the
   first 20 training prompts on the target (train.py; "threshold" in the JSON: the Omega before and after).
   Router file, its JSON and the curve PNG go to OUTPUT/elastic/router-<model>-<lengths>-<gpu>.{pt,json,png}.
2. Adaptivity: Omega the router chooses on held-out RULER prompts (seed + 1000) per task and
   family (retrieval niah_*, multi-hop vt, aggregation cwe/fwe), beside a head map calibrated
   at the router's own final Omega (matched Omega; stem_cli.runs.elastic.elastic_omega).
3. Comparison (tests/bench/router_compare.py, --compare-samples N per task, 0 skips it): dense, stem, the
   calibrated map and the router through `stem compare` on held-out RULER prompts at the training lengths
   (--quick: the first length, 4 tasks), (a) at matched Omega, (b) at matched BUD (stem, map and router solved
   to the BUD the router's run (a) reached), with paired deltas of the router against each, intervals and
   verdicts: OUTPUT/compare/compare-<name>-matched-{omega,bud-LENGTH}.{json,md,csv,png} and router-compare-<name>.json.
   Every result is stored as it is made; --compare-results FILE reuses an earlier run's (content-keyed). A
   SIGINT (`timeout -s INT`) during this stage stops it: the stored results are summarized into the bench
   JSON ("compare": {"interrupted", "partial"}) and the overhead stage still runs.
4. Overhead per pre-fill at --time-lengths: CUDA events around (a) the router alone: per
   routed layer, pooling the layer's real pre-RoPE keys (first / last 100 tokens) + the two
   MLPs + argmax, the modes left on the device (as a run leaves them), and one copy of all
   layers' modes to the host at the end (as reading Omega after a pre-fill does), through the module's
   ops (router_module_ms) and with the MLPs in one Triton launch per layer on a GPU (kernels/router_mlp.py,
   router_fused_ms), checked to give the same modes; router_ms is the default path's
   (elastic/router.py FUSED_MODES: off, the module measured faster on an H200); (b) the
   whole pre-fill (one forward, logits of the last token) with dense attention and with
   elastic + this router. Median of --repeat after --warmup. The published router costs
   about 0.2 ms, constant in length: (a) should not grow with N. (c) Per pre-fill, counted
   in one extra forward each (a TorchDispatchMode): aten ops launched (Triton kernels not
   included) and device reads (ops whose value the host waits for: .item(), nonzero,
   unique, ... on a CUDA tensor), dense vs elastic + router: where the time goes.

Correctness first: the router's modes from this script's pooling equal the modes the
method records in a real pre-fill (exit code 1 when they differ).

JSON (GPU, versions, command, every number): OUTPUT/elastic/router-bench-<date>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch

import stem_cli
from stem_cli.elastic.config import ElasticConfig
from stem_cli.elastic.modes import pooled_keys
from stem_cli.elastic.train import TrainSettings, train_router
from stem_cli.environment import environment, slug, software
from stem_cli.hook import attention_modules
from stem_cli.models import load_model
from stem_cli.report.plots import plot_router_curve
from stem_cli.runs.elastic import elastic_omega, router_record
from stem_cli.runs.keys import weights_identity
from stem_cli.units import format_length


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench.router", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias or .gguf / folder path (default smollm2-135m)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lengths", default="4k,8k", help="training prompt lengths")
    p.add_argument("--time-lengths", default="4k,8k,16k,32k", help="pre-fill lengths timed")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-seconds", type=float, default=210.0, help="training wall-time budget (steps cut to fit)")
    p.add_argument("--target", type=float, default=0.7, help="target Omega")
    p.add_argument("--samples", type=int, default=8, help="training prompts per length and task")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--omega-limit", type=int, default=2, help="held-out prompts per task for the Omega table")
    p.add_argument("--compare-samples", type=int, default=None,
                   help="held-out prompts per task in the comparison stage (default 10; --quick 3; --smoke 1; 0: no comparison)")
    p.add_argument("--compare-tasks", default=None, help="RULER tasks compared (default niah_single_2,niah_multikey_1,vt,cwe,fwe; "
                   "--quick the first four)")
    p.add_argument("--compare-results", default=None, help="an earlier comparison's stored results (its runs-NAME/results-*.jsonl) "
                   "to reuse: results are keyed by content, so the ones with this run's settings are not computed again")
    p.add_argument("--batch-size", type=int, default=None, help="decoding batch of the comparison (default 8 on a GPU, 1 on the CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--output", default="profiles")
    p.add_argument("--router", default=None, help="a trained router file: skip training and measure it (its elastic knobs "
                   "and training lengths come from the file; --lengths, --block-size, --target, --steps are ignored)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (the tests run this)")
    p.add_argument("--quick", action="store_true", help="60 s of training, comparison at the first length (4 tasks, 3 prompts "
                   "each), pre-fills at 4k-16k, 3 repeats: < 5 minutes on an H200")
    return p


def _lengths(text: str) -> list[int]:
    from stem_cli.runs.plan import parse_lengths

    return parse_lengths(text)


class Events:
    """Elapsed milliseconds of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        tic = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - tic)


def median_ms(timer: Events, fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(repeat))


def time_overhead(model, router, path: Path, config: ElasticConfig, n: int, timer: Events, warmup: int, repeat: int,
                  tokenizer=None) -> dict:
    """Router alone vs whole pre-fills (dense; elastic with the router, its modes kept on the device and read on the
    host) at n tokens, on one random-token prompt; with a tokenizer, the pre-fills again on a held-out RULER cwe
    prompt (an aggregation input, which the routers measured route mostly sparse)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, n), generator=gen).to(device)
    # The real pre-RoPE keys (k_proj, then k_norm where the model has one) of every routed layer, from one dense forward.
    from stem_cli.elastic.modes import pre_rope_keys

    captured, hooks = {}, []
    for m in attention_modules(model):
        if router.routes(m.layer_idx) and getattr(m, "sliding_window", None) is None:  # as elastic's prepare: full-attention layers
            hooks.append(m.k_proj.register_forward_hook(
                lambda _m, _i, out, m=m: captured.__setitem__(m.layer_idx, pre_rope_keys(m, out.detach()))))
    stem_cli.apply(model, "dense")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    for h in hooks:
        h.remove()
    hkv, d = router.num_kv_heads, router.head_dim
    post = {l: k.reshape(1, n, hkv, d).transpose(1, 2) for l, k in captured.items()}  # stands in for the post-RoPE k (shape only)

    def route_all():
        with torch.no_grad():
            modes = {layer: router.modes(layer, pooled_keys(pre, post[layer], None)) for layer, pre in captured.items()}
        host = torch.stack(list(modes.values())).cpu()  # one copy for every layer, as reading Omega after a pre-fill
        return dict(zip(modes, host))

    def prefill(prompt_ids=ids):
        with torch.no_grad():
            model(input_ids=prompt_ids, use_cache=False, logits_to_keep=1)

    from stem_cli.elastic import router as router_module

    with patch.object(router_module, "FUSED_MODES", True):  # one Triton launch per layer on a GPU (the module on a CPU)
        fused_ms = median_ms(timer, route_all, warmup, repeat)
        fused_modes = route_all()
    with patch.object(router_module, "FUSED_MODES", False):  # the module's own ops
        module_ms = median_ms(timer, route_all, warmup, repeat)
        module_modes = route_all()
    router_ms = fused_ms if router_module.FUSED_MODES else module_ms  # the path a run takes by default
    stem_cli.apply(model, "dense")
    dense_ms = median_ms(timer, prefill, warmup, repeat)
    elastic = {}
    prompts = {"random": ids}
    if tokenizer is not None:
        from stem_cli.runs.elastic import HELD_OUT_SEED
        from stem_cli.tasks import ruler

        prompts["ruler_cwe"] = torch.tensor([ruler.build_sample("cwe", tokenizer, n, seed=HELD_OUT_SEED, index=0).input_ids], device=device)
    for where in ("device", "host"):  # router_modes: the same index, built without or after reading the modes
        run = stem_cli.apply(model, "elastic", config=ElasticConfig(**{**_fields(config), "router": str(path), "router_modes": where}))
        for prompt, prompt_ids in prompts.items():
            fill = partial(prefill, prompt_ids)
            ms = median_ms(timer, fill, warmup, repeat)
            run.recorder.reset()
            fill()
            elastic[f"{prompt}_{where}"] = {"ms": ms, "omega": run.recorder.elastic.omega, "bud": run.recorder.bud,
                                            "tokens": int(prompt_ids.shape[1])}
    elastic_ms = elastic[f"random_{ElasticConfig().router_modes}"]["ms"]  # the default path's, on the random prompt
    runtime = stem_cli.apply(model, "elastic", config=ElasticConfig(**{**_fields(config), "router": str(path)}))
    runtime.recorder.reset()
    prefill()
    recorded = runtime.recorder.elastic.last_modes
    mine = {l: [[["dense", "stem", "streaming"][m] for m in row] for row in v.tolist()] for l, v in route_all().items()}
    agree = all(recorded.get(l) == mine[l] for l in mine)
    omega = runtime.recorder.elastic.omega
    bud = runtime.recorder.bud
    elastic_ops = count_ops(prefill)
    stem_cli.apply(model, "dense")
    dense_ops = count_ops(prefill)
    return {"aten_ops_dense": dense_ops["ops"], "aten_ops_elastic_router": elastic_ops["ops"],
            "device_reads_dense": dense_ops["device_reads"], "device_reads_elastic_router": elastic_ops["device_reads"],
            "device_reads_where": elastic_ops["where"],"seq_len": n, "router_ms": router_ms, "router_ms_per_layer": router_ms / max(1, len(captured)),
            "router_module_ms": module_ms, "router_fused_ms": fused_ms, "router_default_fused": router_module.FUSED_MODES,
            "fused_modes_equal_module": all(torch.equal(fused_modes[l], module_modes[l]) for l in fused_modes), "routed_layers": len(captured),
            "prefill_dense_ms": dense_ms, "prefill_elastic_router_ms": elastic_ms, "router_fraction_of_elastic_prefill": router_ms / elastic_ms,
            "omega": omega, "bud": bud, "modes_match_the_run": agree, "prefill_elastic_router_by_modes": elastic}


_READS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive", "equal", "masked_select",
          "bincount", "is_nonzero"}


def count_ops(fn) -> dict:
    """aten ops and device reads (ops on a non-CPU tensor whose value the host waits for) of one call of fn,
    with the innermost stem_cli frame of each read."""
    import traceback
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {"ops": 0, "device_reads": 0}
    where: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen["ops"] += 1
            name = func.__name__.split(".")[0]
            on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
            if name in _READS and on_device or name == "_to_copy" and on_device and str((kwargs or {}).get("device")) == "cpu":
                seen["device_reads"] += 1
                frames = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack() if "stem_cli" in f.filename]
                where[f"{name} at {frames[-1] if frames else '?'}"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return {**seen, "where": dict(where)}


def _fields(config: ElasticConfig) -> dict:
    from stem_cli.elastic.train import config_fields

    return config_fields(config)


def _trained(file: str, record: dict):
    """(path, training info, elastic config, lengths) of a router trained earlier (--router): nothing is trained."""
    from stem_cli.elastic.router import load_router

    path = Path(file).expanduser()
    info = load_router(path).training_info
    config = ElasticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["elastic_config"].items()})
    lengths = list(info["lengths"])
    record["training"] = {"router": str(path), "reused": True, "lengths": lengths, "steps": info.get("steps"),
                          "final_omega": info["final_omega"], "target": info.get("target_sparsity"),
                          "omega_within_0.05": abs(info["final_omega"] - info["target_sparsity"]) <= 0.05}
    print(f"router {path}: trained earlier ({info.get('steps')} steps at {', '.join(map(format_length, lengths))}), "
          f"Omega {info['final_omega']:.3f} against {info['target_sparsity']}", flush=True)
    return path, info, config, lengths


def _train(args, model, tokenizer, config, lengths, settings, tasks, steps, train_seconds, device, record, where, out_dir):
    """Train the router (steps planned to fit --train-seconds): (path, training info, config, lengths, file name)."""
    from stem_cli.elastic.train import training_prompts

    dropped = []
    while True:
        prompts = training_prompts(tokenizer, lengths, settings["samples"], 0, tasks or TrainSettings().tasks)
        probe = [max(prompts, key=lambda p: p.input_ids.shape[1])]
        try:
            probing = {**settings, "calibrate_prompts": 0}  # a step's time, without the final threshold
            train_router(model, tokenizer, model_name=args.model, config=config, settings=TrainSettings(**{**probing, "steps": 1}), prompts=probe)
            tic = time.perf_counter()
            train_router(model, tokenizer, model_name=args.model, config=config, settings=TrainSettings(**{**probing, "steps": 2}), prompts=probe)
            per_step = (time.perf_counter() - tic) / 2
            break
        except torch.cuda.OutOfMemoryError:
            # Training runs every mode as masked SDPA (all causal pairs, with gradients): the longest length may not fit.
            torch.cuda.empty_cache()
            if len(lengths) == 1:
                raise
            dropped.append(lengths.pop())
            settings["lengths"] = lengths
            print(f"notice: router training at {format_length(dropped[-1])} ran out of GPU memory; training at "
                  f"{', '.join(map(format_length, lengths))} only", flush=True)
    planned = steps
    steps = max(2, min(steps, int(train_seconds / max(per_step, 1e-6)))) if not args.smoke else steps
    record["training"] = {"lengths": lengths, "lengths_dropped_for_memory": dropped, "steps_planned": planned, "steps": steps, "longest_step_s": per_step, "train_seconds_budget": train_seconds}
    print(f"router training: {steps} steps (asked {planned}; longest step {per_step:.2f} s)", flush=True)

    name = f"router-{slug(Path(args.model).stem if args.model.endswith('.gguf') else args.model)}-{'-'.join(format_length(n) for n in lengths)}-{where}"
    path = out_dir / f"{name}.pt"
    router, curve = train_router(model, tokenizer, model_name=args.model, config=config, settings=TrainSettings(**{**settings, "steps": steps}),
                                 weights=record["weights"]["weights"], prompts=prompts, checkpoint=out_dir / f"{name}.ckpt",
                                 checkpoint_every=max(1, steps // 4))
    router.save(path)
    (out_dir / f"{name}.ckpt").unlink(missing_ok=True)  # the run finished: the router file holds everything
    info = router.training_info
    path.with_suffix(".json").write_text(json.dumps(router_record(router), indent=1, default=str))
    plot_router_curve(curve, path.with_suffix(".png"), f"router of {args.model} at {', '.join(map(format_length, lengths))}: {steps} steps, "
                      f"target {args.target:.0%}, final Omega {info['final_omega']:.1%} ({where}, {info['seconds']:.0f} s)", args.target,
                      info["threshold"])
    record["training"].update({"router": str(path), "seconds": info["seconds"], "final_omega": info["final_omega"],
                               "training_final_omega": info["training_final_omega"], "threshold": info["threshold"],
                               "final_lm": info["final_lm"], "omega_within_0.05": abs(info["final_omega"] - args.target) <= 0.05})
    threshold = info["threshold"] or {}
    print(f"trained in {info['seconds']:.0f} s: Omega {info['training_final_omega']:.3f} over the last steps; final threshold "
          f"{threshold.get('omega_before', float('nan')):.3f} -> {info['final_omega']:.3f} on {threshold.get('prompts', 0)} training "
          f"prompts (target {args.target})", flush=True)

    return path, info, config, lengths, name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --smoke", file=sys.stderr)
        return 2
    lengths, time_lengths = _lengths(args.lengths), _lengths(args.time_lengths)
    steps, omega_limit = args.steps, args.omega_limit
    config = ElasticConfig(block_size=args.block_size)
    train_seconds, repeat = args.train_seconds, args.repeat
    from tests.bench import router_compare

    compare_samples = args.compare_samples if args.compare_samples is not None else 3 if args.quick else 10
    compare_tasks = tuple(t.strip().removeprefix("ruler/") for t in args.compare_tasks.split(",") if t.strip()) if args.compare_tasks \
        else router_compare.QUICK_TASKS if args.quick else router_compare.TASKS
    compare_lengths, max_new_tokens = None, None  # None: the training lengths (after any dropped for memory)
    if args.quick:
        time_lengths, train_seconds, repeat = [n for n in time_lengths if n <= 16384] or time_lengths[:1], min(train_seconds, 60.0), min(repeat, 3)
    if args.smoke:
        lengths, time_lengths, steps, omega_limit = [512], [512, 1024], min(steps, 4), 1
        # The byte tokenizer's RULER prompts need a little more than 512 tokens; two answer tokens are enough to score.
        compare_lengths, compare_tasks, max_new_tokens = [640], ("niah_single_1",), 2
        compare_samples = min(compare_samples, 1) if args.compare_samples is None else compare_samples
        config = ElasticConfig(block_size=16, k_start=3, sink_blocks=1, window_blocks=1, streaming_sink_tokens=16,
                               streaming_window_tokens=32, default_dense_layers=(0,))
    out_dir = Path(args.output) / "elastic"
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, dtype=args.dtype, device=str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    env = environment(device, None)
    where = slug(env.get("gpu", {}).get("name", "cpu") if isinstance(env.get("gpu"), dict) else str(env.get("gpu", "cpu")))
    record = {"bench": "router", "command": list(sys.argv), "argv": list(argv) if argv is not None else list(sys.argv[1:]),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": env, "versions": software(),
              "model": args.model, "weights": weights_identity(loaded), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "elastic_config": _fields(config)}
    tasks = ("needle",) if args.smoke else None
    settings = dict(target_sparsity=args.target, lengths=lengths, samples=1 if args.smoke else args.samples, seed=0,
                    **({"tasks": tasks} if tasks else {}))
    if args.router:
        path, info, config, lengths = _trained(args.router, record)
        name = path.stem if path.stem.endswith(where) else f"{path.stem}-on-{where}"  # where this run measured it
        record["elastic_config"] = _fields(config)
        map_dir = out_dir
    else:
        path, info, config, lengths, name = _train(args, model, tokenizer, config, lengths, settings, tasks, steps, train_seconds,
                                                   device, record, where, out_dir)
    stages = {"load_and_training": round(time.perf_counter() - t_start, 1)}  # seconds per stage: where a run's time went
    tic = time.perf_counter()
    # Adaptivity: Omega per task family on held-out prompts, beside a map calibrated at the router's Omega.
    from stem_cli.elastic.calibrate import calibrate
    from stem_cli.elastic.headmap import save_head_map
    from stem_cli.elastic.router import load_router

    router = load_router(path)
    timer = Events(device)
    cal_len = lengths[0]
    head_map = calibrate(model, tokenizer, model_name=args.model, config=config, target_sparsity=round(info["final_omega"], 3),
                         seq_len=cal_len, samples=1 if args.smoke else 4, source="needle" if args.smoke else None)
    map_path = save_head_map(head_map, out_dir / f"head-map-{name.removeprefix('router-')}.json")
    omega_tasks = ["ruler/niah_single_1"] if args.smoke else ["ruler"]
    if args.smoke:
        record["adaptivity"] = {"skipped": "smoke run: the byte tokenizer cannot fit RULER prompts this short"}
    else:
        table = elastic_omega(args.model, router=path, head_map=map_path, tasks=omega_tasks, seq_len=",".join(map(str, lengths)),
                              limit=omega_limit, device=str(device), dtype=args.dtype, output=out_dir / f"omega-{name.removeprefix('router-')}.json")
        record["adaptivity"] = {"head_map": str(map_path), "rows": table.rows, "families": table.families, "json": str(table.path)}
        print(f"{'task':<18} {'family':<12} {'length':>6} {'n':>3} {'Omega':>6} {'min':>6} {'max':>6} {'map':>6}", flush=True)
        for r in table.rows:
            print(f"{r['task']:<18} {r['family']:<12} {format_length(r['seq_len']):>6} {r['n']:>3} {r['omega']:6.3f} {r['omega_min']:6.3f} "
                  f"{r['omega_max']:6.3f} {r['map_omega']:6.3f}", flush=True)
        for f in table.families:
            print(f"Omega {f['family']:<12} {f['omega']:.3f} (map {f['map_omega']:.3f}) over {f['n']} prompts", flush=True)
        spread = max(f["omega"] for f in table.families) - min(f["omega"] for f in table.families)
        record["adaptivity"]["family_spread"] = spread
        print(f"router Omega spread over families: {spread:.3f} (0: input-independent)", flush=True)

    stages["map_and_adaptivity"], tic = round(time.perf_counter() - tic, 1), time.perf_counter()
    # The comparison: dense, stem, the map and the router at matched Omega and at matched BUD.
    if compare_samples > 0:
        from stem_cli.runs.evaluation import Interrupted

        compare_name = name.removeprefix("router-")
        if args.compare_results:
            store = router_compare.seed_results(Path(args.output), compare_name, args.model, Path(args.compare_results))
            print(f"comparison store {store} seeded from {args.compare_results}", flush=True)
        try:
            record["compare"] = router_compare.run_compare(
                model=args.model, name=compare_name, config=config, head_map=map_path, router=path,
                lengths=compare_lengths or (lengths[:1] if args.quick else lengths), tasks=compare_tasks,
                samples=compare_samples, seed=0, output=Path(args.output), device=str(device), dtype=args.dtype,
                max_new_tokens=max_new_tokens, batch_size=args.batch_size or (8 if device.type == "cuda" else 1))
            router_compare.print_record(record["compare"])
        except Interrupted as stop:  # a time limit's SIGINT: what is stored is summarized, and the overhead stage still runs
            record["compare"] = {"interrupted": str(stop), "results": str(stop.path),
                                 "partial": router_compare.summarize_stored(stop.path)}
            print(f"comparison interrupted ({stop}); the stored results summarized in the bench JSON, "
                  f"`python -m tests.bench.router_compare {stop.path}` prints them", flush=True)
    else:
        record["compare"] = {"skipped": "--compare-samples 0"}

    stages["compare"], tic = round(time.perf_counter() - tic, 1), time.perf_counter()
    # Overhead per pre-fill.
    rows, ok = [], True
    for n in time_lengths:
        try:
            row = time_overhead(model, router, path, config, n, timer, args.warmup, repeat, tokenizer=None if args.smoke else tokenizer)
        except torch.cuda.OutOfMemoryError as e:
            row = {"seq_len": n, "status": f"OOM: {str(e).splitlines()[0][:200]}"}
            torch.cuda.empty_cache()
        rows.append(row)
        ok &= row.get("modes_match_the_run", True) and row.get("fused_modes_equal_module", True)
        if "router_ms" in row:
            print(f"{format_length(n):>5}: router {row['router_ms']:.3f} ms (module ops {row['router_module_ms']:.3f}, fused {row['router_fused_ms']:.3f}; {row['routed_layers']} layers), pre-fill dense "
                  f"{row['prefill_dense_ms']:.1f} ms, elastic+router {row['prefill_elastic_router_ms']:.1f} ms "
                  f"(router {row['router_fraction_of_elastic_prefill']:.2%}), Omega {row['omega']:.2f}, BUD {row['bud']:.2f}; aten ops "
                  f"{row['aten_ops_dense']} dense / {row['aten_ops_elastic_router']} elastic, device reads {row['device_reads_dense']} / "
                  f"{row['device_reads_elastic_router']}", flush=True)
            for what, t in row["prefill_elastic_router_by_modes"].items():
                print(f"       elastic+router {what}: {t['ms']:.1f} ms (Omega {t['omega']:.2f}, BUD {t['bud']:.2f}, {t['tokens']} tokens)", flush=True)
    record["overhead"] = rows
    record["checks"] = {"router_modes_match_the_run": ok}
    stages["overhead"] = round(time.perf_counter() - tic, 1)
    record["stage_seconds"] = stages
    record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    bench = out_dir / f"router-bench-{stamp}-{where}.json"
    bench.write_text(json.dumps(record, indent=1, default=str))
    made = f"{path} (reused)" if args.router else f"{path} (+ .json, .png)"
    print(f"wrote {bench}, {made}, {map_path}; {record['elapsed_s']:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
