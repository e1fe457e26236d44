"""The decode benchmark (tests/bench/decode.py) on the CPU: the smoke run end to end, and the host-side logic
of what the GPU run relies on (static cache bookkeeping, the graph wrapper's CPU path, the dense step)."""

from __future__ import annotations

import json

import pytest
import torch

from stem_cli.decode.graphs import GraphStep, StaticCache, dense_decode, dense_decode_step
from stem_cli.kernels import decode_reference as ref
from tests.bench import decode as bench


def test_smoke_run_writes_the_profile(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--smoke", "--output", str(tmp_path)]) == 0
    files = list(tmp_path.glob("decode-*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    assert report["complete"] is True and report["failures"] == []
    for key in ("gpu", "versions", "command", "argv", "timestamp", "parameters", "checks", "copy_bandwidth_bytes_per_s", "rows", "targets"):
        assert key in report
    checks = report["checks"]
    assert checks["prhs_vs_reference"]["ok"] is True and checks["prhs_vs_reference"]["rows_same_set"] == 1.0
    assert checks["dense"]["dense_graph"]["ok"] is True
    rows = report["rows"]
    assert sorted((r["batch"], r["n"]) for r in rows) == [(1, 256), (1, 512), (2, 256), (2, 512)]
    for row in rows:
        assert row["dense_baseline"] == "dense-eager"  # no graphs on the CPU
        assert row["memory_limit_ms"] > 0 and row["kv_bytes"] == 2 * 4 * row["batch"] * 2 * row["n"] * 32 * 4
        for variant in ("dense-eager", "prhs-eager", "topk-decode-eager", "quest-eager"):
            assert row[variant]["status"] == "ok" and row[variant]["per_token_ms"] > 0, variant
            assert row[variant]["tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row[variant]["per_token_ms"])
        for variant in ("dense-graph", "splitk-graph", "prhs-graph", "prhs-old-graph"):
            assert row[variant]["status"] == bench.NO_GPU
        sel = row["selection"]
        assert sel["topk_ms"] > 0 and sel["prhs_shared_ms"] > 0 and sel["prhs_shared_anchor_fraction"] == 0.0
        assert sel["prhs_anchor_anchor_fraction"] == 1.0  # tau = 1: every row re-anchors
        assert sel["prhs_old_shared_anchor_fraction"] == 0.0 and sel["prhs_old_anchor_anchor_fraction"] == 1.0
        assert sel["prhs_old_shared_over_topk"] == pytest.approx(sel["prhs_old_shared_ms"] / sel["topk_ms"])
    claims = report["seed_comparison"]
    assert claims["seed"]["attention_latency_speedup_b16_2k"] == 9.9 and claims["seed"]["throughput_speedup_b16_4k"] == 2.8
    assert set(claims["ours"]["attention_latency_speedup_b16_2k"]) == {"prhs-graph", "prhs-old-graph", "prhs-eager"}
    assert checks["select_kernels"]["status"].startswith(bench.NO_GPU)
    out = capsys.readouterr().out
    assert "selection per token" in out and "memory limit" in out and str(files[0]) in out


def test_options_are_checked():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu"])  # the CPU runs only --smoke
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--smoke", "--skip", "nosuch"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--smoke", "--set", "budget"])
    opts = bench.parse_options(["--device", "cpu", "--smoke", "--set", "budget=80"])
    assert opts.overrides["budget"] == 80 and bench.decode_config("prhs", opts).budget == 80
    assert bench.decode_config("quest", opts, budget=96).budget == 96 and bench.decode_config("prhs", opts).dense_decode_layers == (0,)


def test_static_cache_bookkeeping():
    cache = StaticCache(5, 2, 3, 8, 10, device="cpu", dtype=torch.float32, distinct=2)
    assert cache.distinct == 2 and len(cache.buffers) == 2
    assert cache.buffer(4) is cache.buffer(0) and cache.buffer(3) is cache.buffer(1)  # layers share buffers cyclically
    cache.fill(6)
    k, v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    cache.append(1, k, v)
    assert cache.view(1)[0].shape[2] == 6  # not valid before advance()
    cache.advance()
    ck, cv = cache.view(1)
    assert ck.shape == (2, 3, 7, 8) and torch.equal(ck[:, :, 6:], k) and torch.equal(cv[:, :, 6:], v)
    assert ck.data_ptr() == cache.buffers[1][0].data_ptr()  # a view: the address a graph captured
    assert cache.kv_bytes() == 2 * 5 * 2 * 3 * 7 * 8 * 4 and cache.kv_bytes(10) == 2 * 5 * 2 * 3 * 10 * 8 * 4
    cache.fill(10)
    with pytest.raises(ValueError, match="cache full"):
        cache.append(0, k, v)
    with pytest.raises(ValueError, match="capacity"):
        cache.fill(11)
    rand = StaticCache(2, 1, 1, 4, 6, device="cpu", dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    assert rand.distinct == 2 and rand.buffers[0][0].abs().sum() > 0


def test_graph_step_cpu_path_calls_the_function():
    calls = []
    buf = torch.zeros(3)

    def fn():
        calls.append(1)
        buf.add_(1)
        return buf * 2

    step = GraphStep(fn, "cpu", warmup=2)
    assert not step.captured and step.graph is None and len(calls) == 2
    out = step.replay()
    assert len(calls) == 3 and torch.equal(out, torch.full((3,), 6.0)) and step.output is out
    assert GraphStep(fn, "cpu", warmup=0).output is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_step_replays_on_the_gpu():
    x = torch.zeros(4, device="cuda")
    step = GraphStep(lambda: x * 3 + 1, "cuda", warmup=1)
    assert step.captured
    x.fill_(2.0)
    assert torch.equal(step.replay(), torch.full((4,), 7.0, device="cuda"))


def test_dense_step_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    cache = StaticCache(3, 2, 2, 16, 40, device="cpu", dtype=torch.float64, generator=g)
    cache.fill(33)
    q = torch.randn(3, 2, 6, 1, 16, generator=g, dtype=torch.float64)
    out = dense_decode_step(cache, q, 0.25)
    for i in range(3):
        torch.testing.assert_close(out[i], ref.dense_decode_attention(q[i], *cache.view(i), scale=0.25))
    with pytest.raises(ValueError, match="unknown dense decode kernel"):
        dense_decode(q[0], *cache.view(0), 0.25, kernel="nosuch")


def test_finish_row_picks_the_faster_graph_and_the_limit():
    row = {"batch": 1, "n": 131072, "layers": 32, "kv_bytes": 10**9, "memory_limit_ms": 0.25}
    for v in bench.VARIANTS:
        row[v] = {"status": "n/a (skipped by --skip)"}
    row["dense-eager"] = {"status": "ok", "per_token_ms": 4.0, "tokens_per_s": 250.0}
    row["dense-graph"] = {"status": "ok", "per_token_ms": 0.5, "tokens_per_s": 2000.0}
    row["splitk-graph"] = {"status": "ok", "per_token_ms": 0.3, "tokens_per_s": 3333.0}
    row["prhs-graph"] = {"status": "ok", "per_token_ms": 0.05, "tokens_per_s": 20000.0}
    row["selection"] = {"topk_ms": 1.0, "prhs_shared_ms": 0.05, "prhs_shared_over_topk": 0.05, "selection_mode": "CUDA graph"}
    bench.finish_row(row)
    assert row["dense_baseline"] == "splitk-graph" and row["dense_baseline_ms"] == 0.3
    assert row["dense_over_limit"] == pytest.approx(1.2)
    assert row["prhs-graph"]["speedup_vs_dense"] == pytest.approx(6.0)
    notes = bench.target_notes([row])
    assert len(notes) == 3 and all("met" in n and "MISSED" not in n for n in notes)
