"""The kernel benchmark (tests/bench/kernels.py) on the CPU: the smoke run end to end, and the pieces the GPU run relies on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stem_cli.config import StemConfig
from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref
from tests.bench import kernels as bench

SMOKE_SHAPES = ["4/2/32", "2/1/64"]
SMOKE_LENGTHS = [512, 1024]
MEASURED = ("score_ms", "select_ms", "attn_ms", "stem_total_ms", "density", "bud", "computed_pairs", "causal_pairs",
            "attn_tflops", "score_select_share")
NEEDS_GPU = ("cudnn_ms", "fa2_ms", "flex_ms", "flex_compile_s", "check_attn_ok", "check_score_ok", "check_index_ok")


def random_index(heads, n, block, density, seed=0) -> BlockIndex:
    g = torch.Generator().manual_seed(seed)
    p = -(-n // block)
    mask = torch.rand(1, heads, p, p, generator=g) < density
    mask |= torch.eye(p, dtype=torch.bool)
    mask &= torch.ones(p, p, dtype=torch.bool).tril()
    return BlockIndex.from_mask(mask, block, n)


def cpu_options(**overrides) -> bench.Options:
    values = dict(
        lengths=[256], shapes=[bench.Shape(4, 2, 32)], config=StemConfig(block_size=16), device="cpu",
        dtype=torch.float32, smoke=True, warmup_ms=0.0, rep_ms=1.0, min_reps=1, check_max_n=16384,
        flex_mask="split", skip=frozenset(), seed=0, output=None,
    )
    values.update(overrides)
    return bench.Options(**values)


def test_smoke_run_writes_the_profile(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--smoke", "--output", str(tmp_path)]) == 0
    files = list(tmp_path.glob("kernels-*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    assert report["complete"] is True
    for key in ("gpu", "versions", "command", "argv", "timestamp", "parameters", "implementations", "rows", "targets", "failures"):
        assert key in report
    for key in ("name", "sm_count", "capability", "total_memory_bytes", "driver"):
        assert key in report["gpu"]
    for key in ("torch", "triton", "transformers"):
        assert key in report["versions"]
    assert report["parameters"]["stem_config"]["block_size"] == bench.SMOKE_BLOCK_SIZE
    assert report["failures"] == []

    rows = report["rows"]
    assert sorted((r["shape"], r["n"]) for r in rows) == sorted((s, n) for s in SMOKE_SHAPES for n in SMOKE_LENGTHS)
    for row in rows:
        for key in MEASURED:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row[key])
        assert 0 < row["density"] <= 1 and 0 < row["bud"] <= 1 and 0 < row["score_select_share"] < 1
        assert row["stem_total_ms"] == pytest.approx(row["score_ms"] + row["select_ms"] + row["attn_ms"])
        for key in NEEDS_GPU:
            assert row[key] == bench.NO_GPU, (key, row[key])
        for key in ("cudnn_tflops", "speedup_cudnn_over_stem", "speedup_flex_over_attn"):
            assert row[key].startswith("n/a ("), (key, row[key])
    # The larger length is really sparse at block 16 (P = 64 > 56 keeps fewer than all blocks).
    assert min(r["density"] for r in rows if r["n"] == 1024) < 1

    out = capsys.readouterr().out
    assert "score ms" in out and str(files[0]) in out
    assert len(report["targets"]) == 5 and all("target" in t for t in report["targets"])


def test_options_are_checked():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu"])  # the CPU runs only --smoke
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--smoke", "--shapes", "6/4/64"])  # 6 query heads over 4 KV heads
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--smoke", "--stride", "3"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--smoke", "--skip", "sdpa"])
    assert bench.parse_shapes("32/8/128, 9/3/64") == [bench.Shape(32, 8, 128), bench.Shape(9, 3, 64)]


def test_flex_kv_blocks_pads_and_keeps_counts():
    index = random_index(heads=3, n=200, block=16, density=0.3)  # P = 13, K = widest row < P
    p = index.num_blocks
    assert index.indices.shape[-1] < p and (index.indices == -1).any()
    counts, indices = bench.flex_kv_blocks(index)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, index.counts)
    assert indices.shape == (1, 3, p, p)
    assert (indices >= 0).all() and (indices < p).all()
    k = index.indices.shape[-1]
    slot = torch.arange(k)
    listed = slot < index.counts[..., None]
    assert torch.equal(indices[..., :k][listed], index.indices[listed])  # the real entries, untouched
    assert (indices[..., :k][~listed] == 0).all() and (indices[..., k:] == 0).all()


def test_split_full_blocks_keeps_the_index():
    index = random_index(heads=2, n=256, block=16, density=0.5, seed=3)
    counts, indices = bench.flex_kv_blocks(index)
    pc, pi, fc, fi = bench.split_full_blocks(counts, indices)
    p = index.num_blocks

    def dense(c, i):
        listed = torch.arange(p) < c[..., None]
        mask = torch.zeros(*i.shape[:-1], p + 1, dtype=torch.bool)  # column p collects unlisted slots
        return mask.scatter(-1, torch.where(listed, i.long(), p), True)[..., :p]

    partial, full = dense(pc, pi), dense(fc, fi)
    assert torch.equal(partial | full, index.to_mask())
    assert not (partial & full).any()
    assert torch.equal(partial, index.to_mask() & torch.eye(p, dtype=torch.bool))  # only the diagonal needs mask_mod
    assert not (full & ~torch.ones(p, p, dtype=torch.bool).tril(-1)).any()


@pytest.mark.parametrize("mode", ["split", "partial"])
def test_flex_block_mask_holds_the_index(mode):
    index = random_index(heads=4, n=128, block=16, density=0.4, seed=1)
    mask = bench.flex_block_mask(index, mode)
    assert torch.equal(mask.to_dense().bool(), index.to_mask())


def test_compiled_flex_matches_reference():
    """run_flex as the GPU run calls it (torch.compile'd FlexAttention, GQA, split block mask),
    compiled for the CPU here; eager FlexAttention would ignore the block index."""
    torch.manual_seed(0)
    index = random_index(heads=4, n=128, block=16, density=0.4, seed=2)
    q, k, v = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    out = ref.block_sparse_attention(q, k, v, index, scale=0.25)
    row = bench.new_row(bench.Shape(4, 2, 16), 128)
    timer = bench.Timer("cpu", 0, 1, 1)
    ms = bench.run_flex(row, q, k, v, out, index, 0.25, cpu_options(), timer)
    assert ms > 0 and row["flex_ms"] == ms and row["flex_compile_s"] > 0
    assert row["check_attn_ok"] is True and row["check_attn_rel_err"] < 1e-4
    assert row["check_attn_against"] == "flex"


def test_compare_logits():
    logits = ref.block_logits(*(torch.randn(1, h, 256, 32) for h in (4, 2, 2)), block_size=32, stride=8, beta=0.2)
    assert bench.compare_logits(logits, logits) == {"rel_err": 0.0, "inf_equal": True, "ok": True}
    noisy = logits + 1e-4 * torch.randn_like(logits)
    result = bench.compare_logits(noisy, logits)
    assert result["ok"] and 0 < result["rel_err"] < 1e-2
    shifted = logits.clone()
    shifted[0, 0, 3, 5] = 0.0  # above the diagonal: must stay -inf
    assert not bench.compare_logits(shifted, logits)["inf_equal"]
    assert not bench.compare_logits(2 * logits, logits)["ok"]


def test_compare_indices_tells_ties_from_errors():
    config = StemConfig(block_size=16)
    n = 1024  # P = 64: the budget keeps fewer blocks than the causal ones
    logits = ref.block_logits(*(torch.randn(1, h, n, 32) for h in (2, 1, 1)), block_size=16, stride=8, beta=0.2)
    chosen = bench.select_index(logits, n, config)
    assert bench.compare_indices(logits, logits, chosen, chosen) == {"rows_identical": 1.0, "rows_explained": 1.0, "ok": True}

    # Make a near-tie in one row: the last kept non-forced block and the best dropped one
    # within 1e-6; nudging both by 1e-6 swaps them, and that is explained.
    row = 60  # past k_start = 42 blocks: this row keeps ~31 of its 61 blocks
    mask = chosen.to_mask()[0, 0, row]
    assert 0 < int(mask.sum()) < int(torch.isfinite(logits[0, 0, row]).sum())
    forced = ref.forced_blocks(64, torch.zeros(1, dtype=torch.long), config.sink_blocks, config.window_blocks)[0, row]
    free = mask & ~forced
    kept = torch.where(free, logits[0, 0, row], math.inf).argmin()
    dropped = torch.where(~mask & torch.isfinite(logits[0, 0, row]), logits[0, 0, row], -math.inf).argmax()
    tied = logits.clone()
    tied[0, 0, row, dropped] = tied[0, 0, row, kept] - 1e-6
    test = tied.clone()
    test[0, 0, row, dropped] += 2e-6
    test[0, 0, row, kept] -= 1e-6
    ref_index, test_index = bench.select_index(tied, n, config), bench.select_index(test, n, config)
    result = bench.compare_indices(test, tied, test_index, ref_index)
    assert result["rows_identical"] < 1 and result["ok"]

    # A swap with the row's lowest block, which exact logits do not explain (a selection bug), is no tie.
    lowest = torch.where(~mask & torch.isfinite(logits[0, 0, row]), logits[0, 0, row], math.inf).argmin()
    wrong = tied.clone()
    wrong[0, 0, row, lowest] += 100.0
    wrong_index = bench.select_index(wrong, n, config)
    result = bench.compare_indices(tied, tied, wrong_index, ref_index)
    assert result["rows_explained"] < 1 and not result["ok"]


def test_run_case_checks_a_kernel_that_is_not_the_reference():
    """With stand-in kernels (the reference plus rounding noise) the CPU run takes the
    GPU's check path: logits, index and attention compared with the reference."""

    def score(q, k, v, **kw):
        logits = ref.block_logits(q, k, v, **kw)
        return logits + 1e-5 * torch.randn_like(logits)

    def attn(q, k, v, index, *, scale):
        out = ref.block_sparse_attention(q, k, v, index, scale=scale)
        return out + 1e-4 * torch.randn_like(out)

    kernels = bench.Kernels(score, "stand-in", attn, "stand-in")
    opts = cpu_options()
    row = bench.run_case(bench.Shape(4, 2, 32), 512, opts, kernels, bench.Timer("cpu", 0, 1, 1))
    assert row["check_score_ok"] is True and row["check_score_inf_equal"] is True
    assert row["check_index_ok"] is True and row["check_index_rows_tie_explained"] == 1.0
    assert row["check_attn_ok"] is True and row["check_attn_against"] == "reference"
    assert row["flex_ms"] == bench.NO_GPU and bench.failures([row]) == []

    # A scoring kernel with a real bug fails the check, and the run's exit code with it.
    kernels = bench.Kernels(lambda q, k, v, **kw: 1.5 * ref.block_logits(q, k, v, **kw), "buggy", attn, "stand-in")
    row = bench.run_case(bench.Shape(4, 2, 32), 512, opts, kernels, bench.Timer("cpu", 0, 1, 1))
    assert row["check_score_ok"] is False and bench.failures([row])


def test_stage_failures_are_recorded():
    row = {}

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def refused():
        raise RuntimeError("No available kernel. Aborting execution.")

    assert bench.guarded(row, "cudnn_ms", oom, ours=False) is None and row["cudnn_ms"] == "OOM"
    assert bench.guarded(row, "fa2_ms", refused, ours=False) is None and row["fa2_ms"].startswith("n/a (RuntimeError")
    assert bench.guarded(row, "attn_ms", refused, ours=True) is None and row["attn_ms"].startswith("error: ")
    assert bench.guarded(row, "score_ms", lambda: 1.5, ours=True) == 1.5


def test_dense_sdpa_gqa_and_refusal():
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    ms, note = bench.dense_sdpa(q, k, v, 0.25, "math", bench.Timer("cpu", 0, 1, 1))
    assert ms > 0 and note == "native GQA"
    with pytest.raises(RuntimeError):
        bench.dense_sdpa(q, k, v, 0.25, "cudnn", bench.Timer("cpu", 0, 1, 1))  # no cuDNN attention on the CPU
