"""Several processes on one run (stem_cli/runs/distributed.py): the split, shards and their fold, two gloo ranks
end to end against one process, a rank that dies, a resume with another process count, and per-head methods on head
shards (tensor parallelism) and on tensors whose default device is not theirs (layers placed by --device-map)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stem_cli
from stem_cli.errors import UsageError
from stem_cli.registry import METHODS, build_configs
from stem_cli.runs import distributed
from stem_cli.runs.store import ResultStore

SMALL = ["block_size=16", "dense_layers=[0]", "k_start=4"]
TASKS = ["ruler/niah_single_1", "ruler/niah_single_2"]
EVAL = ["eval", "--model", "tiny-llama", "--task", ",".join(TASKS), "--seq-len", "600", "--limit", "3", "--method", "dense,stem",
        *[x for s in SMALL for x in ("--set", s)], "--max-new-tokens", "3", "--device", "cpu"]
RESULTS = "results-tiny-llama.jsonl"
# every method sparse on a 512-token prompt (BUD 15-91%), so a wrong head shard changes what is kept
SPARSE = ["block_size=16", "dense_layers=[0]", "k_start=4", "sink_blocks=1", "window_blocks=2", "xattention.threshold=0.5",
          "flexprefill.gamma=0.5", "flexprefill.min_budget=16", "minference.vertical_size=20", "minference.slash_size=40",
          "minference.sink_columns=4", "minference.local_diagonals=16"]


# ------------------------------------------------------------------ split, shards, fold


def test_split_is_balanced_deterministic_and_by_weight_alone():
    rng = random.Random(7)
    weights = [rng.randint(100, 5000) for _ in range(41)]
    for size in (1, 2, 3, 5):
        owner = distributed.split(weights, size)
        assert owner == distributed.split(list(weights), size)  # nothing but the list and the size decides
        loads = [sum(w for w, r in zip(weights, owner) if r == k) for k in range(size)]
        assert sum(loads) == sum(weights) and set(owner) <= set(range(size))
        # greedy longest-first: the heaviest rank is at most one unit above the mean (brute-force bound)
        assert max(loads) <= sum(weights) / size + max(weights)
    assert distributed.split([5, 5, 5, 5], 2) == [0, 1, 0, 1]  # ties: by position, to the lowest rank
    assert distributed.split([1, 9, 1, 1], 2) == [1, 0, 1, 1]  # the heaviest alone on one rank


def test_fold_adds_each_missing_record_once_and_drops_a_torn_line(tmp_path):
    store = ResultStore(tmp_path / RESULTS)
    store.add({"key": "a", "score": 1})
    world = [distributed.World(r, 2) for r in range(2)]
    for w, keys in zip(world, (["a", "b"], ["c"])):
        shard = ResultStore(tmp_path / RESULTS, append_to=distributed.shard_path(store.path, w))
        for k in keys:
            shard.add({"key": k, "score": 0})
    old = distributed.shard_path(store.path, distributed.World(2, 3))  # an earlier run's, with another process count
    old.write_text(json.dumps({"key": "d", "score": 0}) + "\n" + '{"key": "e", "sc')  # killed mid-write
    assert [p.name for p in distributed.shard_paths(store.path)] == [
        "results-tiny-llama.rank0-of-2.jsonl", "results-tiny-llama.rank1-of-2.jsonl", "results-tiny-llama.rank2-of-3.jsonl"]
    assert distributed.fold_shards(store) == 3  # b, c, d; a was there; the torn e is dropped
    assert distributed.shard_paths(store.path) == []
    assert [json.loads(line)["key"] for line in store.path.read_text().splitlines()] == ["a", "b", "c", "d"]
    assert distributed.fold_shards(ResultStore(store.path)) == 0  # idempotent


def test_world_from_env_checks_what_the_launcher_set():
    assert distributed.world_from_env({}) == distributed.World(0, 1, 0)
    assert distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.World(3, 4, 1)
    with pytest.raises(UsageError, match="RANK=4 and WORLD_SIZE=4"):
        distributed.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UsageError, match="--tp 2 needs exactly 2 processes"):
        distributed.world_from_env({"RANK": "0", "WORLD_SIZE": "4"}, tp=2)


def test_num_processes_shortcut_starts_torchrun_without_itself():
    command = distributed.launch_command(3, ["eval", "--num-processes", "3", "--limit", "2", "--num-processes=3"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "stem_cli", "eval", "--limit", "2"]


# ------------------------------------------------------------------ per-head methods on head shards and on a foreign default device


def _tiny_model():
    from stem_cli.models import shipped_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(shipped_config("tiny-llama"), attn_implementation="sdpa").eval()


def _runtimes():
    from stem_cli.integration import build_runtime

    model = _tiny_model()
    configs = build_configs(list(METHODS), None, SPARSE)
    return {name: build_runtime(model, name, configs[name]) for name in METHODS}


def _qkv(hq=4, hkv=2, n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv)]


def _bud_parts(index, hq, n):
    from stem_cli.index import block_pair_counts, causal_pairs, computed_pairs

    pairs = block_pair_counts(None, 1, n, index.block_size, device="cpu")
    return float(computed_pairs(index, pairs, hq)), float(causal_pairs(pairs, hq))


@pytest.mark.parametrize("tp", [2])
def test_every_method_on_head_shards_gives_the_full_heads_selection_output_and_bud(tp):
    """Tensor parallelism hands each rank's attention a contiguous shard of query heads with their KV heads: per-head
    selection must be the full run's rows for those heads, the output its slice, and BUD summed over shards the full BUD."""
    from stem_cli.executor import attend

    q, k, v = _qkv()
    hq, hkv, n = q.shape[1], k.shape[1], q.shape[2]
    scale = q.shape[-1] ** -0.5
    for name, runtime in _runtimes().items():
        full = runtime.select(q, k, v, layer=2, scale=scale, key_valid=None)
        full_mask, full_out = full.to_mask(), attend(q, k, v, full, scale=scale)
        done = causal = 0.0
        for r in range(tp):
            qs, ks, vs = q[:, r * hq // tp:(r + 1) * hq // tp], k[:, r * hkv // tp:(r + 1) * hkv // tp], v[:, r * hkv // tp:(r + 1) * hkv // tp]
            shard = runtime.select(qs, ks, vs, layer=2, scale=scale, key_valid=None)
            h = full.num_heads // tp  # the index is per query head or per KV head; either way a contiguous slice
            assert torch.equal(shard.to_mask(), full_mask[:, r * h:(r + 1) * h]), name
            torch.testing.assert_close(attend(qs, ks, vs, shard, scale=scale), full_out[:, r * hq // tp:(r + 1) * hq // tp],
                                       rtol=1e-5, atol=1e-5, msg=name)
            d, c = _bud_parts(shard, hq // tp, n)
            done, causal = done + d, causal + c
        full_done, full_causal = _bud_parts(full, hq, n)
        assert (done, causal) == pytest.approx((full_done, full_causal), rel=1e-12), name
        if name != "dense":
            assert done < causal, f"{name} kept every block: the test would not see a wrong shard"


def test_every_method_keeps_its_tensors_on_the_inputs_device():
    """Under --device-map a layer's q/k/v sit on its GPU while the default device is another (cuda:0, or the host):
    every tensor a method combines with them must follow q.device. Here the default device is 'meta', so any tensor
    made on the default device fails (a meta tensor cannot meet a CPU one, nor be read on the host)."""
    from stem_cli.executor import attend

    q, k, v = _qkv(seed=1)
    scale = q.shape[-1] ** -0.5
    for name, runtime in _runtimes().items():
        expected = attend(q, k, v, runtime.select(q, k, v, layer=2, scale=scale, key_valid=None), scale=scale)
        with torch.device("meta"):
            index = runtime.select(q, k, v, layer=2, scale=scale, key_valid=None)
            out = attend(q, k, v, index, scale=scale)
        assert out.device == q.device and index.counts.device == q.device, name
        torch.testing.assert_close(out, expected, msg=name)


# ------------------------------------------------------------------ two gloo ranks end to end (torchrun)


def _torchrun(args: list[str], processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "stem_cli", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


def _records(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in (json.loads(line) for line in path.read_text().splitlines())}


def _same_results(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert set(a) == set(b)
    for key in a:  # sample by sample: what was predicted, its score and BUD (timings differ)
        assert (a[key]["prediction"], a[key]["score"], a[key]["bud"]) == (b[key]["prediction"], b[key]["score"], b[key]["bud"]), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same run in one process (in this one)."""
    out = tmp_path_factory.mktemp("one")
    run = stem_cli.evaluate("tiny-llama", TASKS, "dense,stem", "600", limit=3, overrides=SMALL, max_new_tokens=3, device="cpu",
                            output=out)
    return run, _records(out / RESULTS)


def test_two_ranks_merge_into_the_results_of_one_process_and_resume_with_one_recomputes_nothing(tmp_path, one_process):
    run, reference = one_process
    done = _torchrun([*EVAL, "--output", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    _same_results(_records(tmp_path / RESULTS), reference)
    assert distributed.shard_paths(tmp_path / RESULTS) == []  # folded
    assert "rank 1 of 2:" in done.stderr and "all ranks" in done.stderr  # rank 1's lines, rank 0's total
    assert done.stdout.count("stem eval: tiny-llama") == 1 and "12 computed, 0 reused" in done.stdout  # one table, from rank 0
    (summary,) = tmp_path.glob("eval-tiny-llama-*.json")
    summary = json.loads(summary.read_text())
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "prefill_tokens_per_s"} for r in rows]
    assert summary["processes"] == 2 and untimed(summary["rows"]) == untimed(run.summary["rows"])  # the tables of one process

    again = stem_cli.evaluate("tiny-llama", TASKS, "dense,stem", "600", limit=3, overrides=SMALL, max_new_tokens=3, device="cpu",
                              output=tmp_path, resume=True)  # another process count
    assert (again.summary["computed"], again.summary["reused"]) == (0, 12)


def test_a_rank_that_dies_is_named_its_results_kept_and_a_resume_loses_nothing(tmp_path, one_process):
    _, reference = one_process
    failed = _torchrun([*EVAL, "--output", str(tmp_path)], env={distributed.FAIL_HOOK: "1:2"})
    assert failed.returncode != 0
    assert "rank 1 of 2 failed after 2 new result(s)" in " ".join(failed.stderr.split())
    kept = {}
    for shard in distributed.shard_paths(tmp_path / RESULTS):
        kept.update(_records(shard))
    assert len(kept) >= 2  # rank 1's two at least (rank 0's as far as it got before the launcher stopped it)

    resumed = stem_cli.evaluate("tiny-llama", TASKS, "dense,stem", "600", limit=3, overrides=SMALL, max_new_tokens=3, device="cpu",
                                output=tmp_path, resume=True)  # one process: the shards of two are folded in first
    merged = _records(tmp_path / RESULTS)
    _same_results(merged, reference)
    assert {k: merged[k]["prediction"] for k in kept} == {k: r["prediction"] for k, r in kept.items()}
    # what the dead run kept is not computed again
    assert (resumed.summary["computed"], resumed.summary["reused"]) == (12 - len(kept), len(kept))


def test_tensor_parallel_on_two_gloo_ranks_gives_one_process_selections_outputs_and_bud(tmp_path):
    """transformers' tp_plan="auto" on the CPU: each rank's attention sees half the heads; the logits, every layer's
    kept blocks (both shards together) and BUD (summed over shards) are those of one process."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "tests.tp_worker", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    from tests.tp_worker import METHODS as TP_METHODS, run_methods

    reference = run_methods(_tiny_model_loaded(), torch.device("cpu"))
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in TP_METHODS:
        full = reference[name]
        assert all(s[name]["heads"] == 2 for s in shards), "each rank's attention should see 2 of the 4 query heads"
        torch.testing.assert_close(shards[0][name]["logits"], full["logits"], rtol=1e-4, atol=1e-4, msg=name)
        for layer, mask in full["masks"].items():
            h = mask.shape[1] // 2
            for r, s in enumerate(shards):
                assert torch.equal(s[name]["masks"][layer], mask[:, r * h:(r + 1) * h]), (name, layer, r)
        assert shards[0][name]["bud"] == shards[1][name]["bud"] == pytest.approx(full["bud"], rel=1e-12), name
        assert name == "dense" or full["bud"] < 1


def _tiny_model_loaded():
    from stem_cli.models import load_model

    return load_model("tiny-llama", device="cpu").model
