"""Beyond one GPU, on a machine with two or more: layers over two GPUs, heads over two ranks, samples over two ranks.

    python -m tests.bench.multigpu            # from the repository root, >= 2 CUDA GPUs, about 3-5 minutes

A benchmark script, outside the package. Checks (a failed one makes the exit code 1):
  device-map   SmolLM2-135M's shape (random weights, fp32) loaded with --device-map auto over the GPUs (asserted:
               layers on two devices) against the same model on cuda:0: per method, the last-token logits, every
               layer's kept blocks and BUD (tests/tp_worker.py run_methods: 512 tokens, blocks of 16, every method sparse)
  tp           tiny-llama tensor parallel over 2 ranks on nccl (torchrun -m tests.tp_worker OUT cuda): each rank's
               shard of the kept blocks, the logits and BUD against one GPU
  data-parallel  `stem eval` in 1 process against `--num-processes 2` on the same samples: wall time of each, and the
               merged results equal sample by sample (prediction, score, BUD)
The JSON (GPU, versions, command, every number) goes to profiles/multigpu-<date>-<gpu>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

EVAL = ["eval", "--model", "smollm2-135m", "--random-weights", "--task", "ruler/niah_single_1,ruler/niah_single_2", "--seq-len", "4k",
        "--limit", "8", "--method", "dense,stem", "--set", "block_size=64", "--max-new-tokens", "8", "--device", "cuda"]


def same_runs(a: dict, b: dict, *, logits_tol: float) -> list[str]:
    """What differs between two run_methods results (empty: the same selections, outputs and BUD)."""
    bad = []
    for name in a:
        if not torch.allclose(a[name]["logits"], b[name]["logits"], rtol=logits_tol, atol=logits_tol):
            bad.append(f"{name}: logits differ by {(a[name]['logits'] - b[name]['logits']).abs().max():.3g}")
        for layer, mask in a[name]["masks"].items():
            if not torch.equal(mask, b[name]["masks"].get(layer, torch.empty(0))):
                bad.append(f"{name}: layer {layer} keeps other blocks")
        if abs(a[name]["bud"] - b[name]["bud"]) > 1e-9:
            bad.append(f"{name}: BUD {a[name]['bud']} vs {b[name]['bud']}")
    return bad


def device_map_check() -> dict:
    from stem_cli.models import load_model
    from tests.tp_worker import run_methods

    one = load_model("smollm2-135m", random_weights=True, device="cuda:0", dtype="fp32").model
    reference = run_methods(one, torch.device("cuda:0"))
    del one
    mapped = load_model("smollm2-135m", random_weights=True, device="cuda", dtype="fp32", device_map="auto").model
    devices = sorted({str(d) for d in mapped.hf_device_map.values()})
    layer_devices = sorted({str(next(layer.parameters()).device) for layer in mapped.model.layers})
    got = run_methods(mapped, torch.device(mapped.hf_device_map.get("model.embed_tokens", next(mapped.parameters()).device)))
    bad = same_runs(reference, got, logits_tol=1e-4)
    if len(layer_devices) < 2:
        bad.append(f"--device-map auto left every layer on {layer_devices}: the check needs layers on two devices")
    return {"devices": devices, "layer_devices": layer_devices, "bud": {m: got[m]["bud"] for m in got}, "problems": bad}


def tp_check() -> dict:
    from stem_cli.models import load_model
    from tests.tp_worker import run_methods

    reference = run_methods(load_model("tiny-llama", device="cuda:0", dtype="fp32").model, torch.device("cuda:0"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                               "tests.tp_worker", folder, "cuda"], capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        if done.returncode:
            return {"problems": [f"tensor-parallel workers failed: {done.stderr[-2000:]}"]}
        shards = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]
    bad = []
    for name, full in reference.items():
        for r, shard in enumerate(shards):
            mine = {**shard[name], "masks": {}}
            sliced = {**full, "masks": {l: m[:, r * m.shape[1] // 2:(r + 1) * m.shape[1] // 2] for l, m in full["masks"].items()}}
            bad += [f"rank {r}: {p}" for p in same_runs({name: sliced}, {name: {**mine, "masks": shard[name]["masks"]}}, logits_tol=1e-4)]
            if shard[name]["heads"] != 2:
                bad.append(f"rank {r}: {name} saw {shard[name]['heads']} query heads, not 2 of 4")
    return {"seconds": seconds, "bud": {m: shards[0][m]["bud"] for m in shards[0]}, "problems": bad}


def data_parallel_timing() -> dict:
    out = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as root:
        for processes in (1, 2):
            folder = Path(root) / f"p{processes}"
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "stem_cli", *EVAL, "--output", str(folder), "--num-processes", str(processes)],
                                  capture_output=True, text=True, env=env, timeout=400)
            out[f"wall_s_{processes}"] = time.perf_counter() - start
            if done.returncode:
                return {**out, "problems": [f"{processes} process(es) failed: {done.stderr[-2000:]}"]}
            out[processes] = {r["key"]: (r["prediction"], r["score"], r["bud"]) for r in
                              (json.loads(line) for line in (folder / "results-smollm2-135m.jsonl").read_text().splitlines())}
    same = out.pop(1) == out.pop(2)
    return {**out, "speedup": out["wall_s_1"] / out["wall_s_2"], "command": "stem " + " ".join(EVAL),
            "problems": [] if same else ["2 processes gave other results than 1"]}


def main() -> int:
    from stem_cli.environment import environment, slug

    if torch.cuda.device_count() < 2:
        print(f"needs at least 2 CUDA GPUs; this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    report = {"command": "python -m tests.bench.multigpu", "date": datetime.now().isoformat(),
              "environment": environment(torch.device("cuda:0"), None), "gpus": torch.cuda.device_count()}
    for name, check in (("device_map", device_map_check), ("tp", tp_check), ("data_parallel", data_parallel_timing)):
        try:
            report[name] = check()
        except Exception as e:  # one check failing must not hide the others' numbers
            report[name] = {"problems": [f"{type(e).__name__}: {e}"]}
        print(name, json.dumps(report[name], default=str), flush=True)
    problems = [f"{name}: {p}" for name in ("device_map", "tp", "data_parallel") for p in report[name]["problems"]]
    gpu = torch.cuda.get_device_name(0)
    path = Path("profiles") / f"multigpu-{datetime.now():%Y%m%d-%H%M%S}-{slug(gpu)}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}; " + ("all checks passed" if not problems else "FAILED:\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
