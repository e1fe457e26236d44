"""The peers' fused estimates (estimate_impl='triton') against their torch definitions (kernels interpreted on the CPU).

Same inputs on both paths (random, GQA 1 and 4, odd lengths, batch 2 with left padding): the intermediate
scores agree within float32 tolerance and the selectors return the same BlockIndex (counts and ids). Exact
ties: the kernels keep the lower block id (a stable sort); tests of the index use continuous random inputs
(no ties), and the tie rule has its own test against a stable-sort loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stem_cli.config import ConfigError
from stem_cli.methods import blocks, flexprefill, minference, xattention
from stem_cli.methods.estimate_path import estimate_path
from stem_cli.methods.flexprefill import FlexPrefillConfig
from stem_cli.methods.minference import MInferenceConfig
from stem_cli.methods.xattention import XAttentionConfig

pytest.importorskip("triton")
from stem_cli.kernels import coverage_select, last_rows, xattn_mass  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreted = pytest.mark.skipif(DEVICE == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                                 reason="the kernels run on the CPU only under TRITON_INTERPRET=1")

# batch, hq, hkv, n, d, block, stride, left padding of sequence 1
CASES = [
    (2, 4, 1, 333, 16, 16, 8, 70),  # GQA 4, odd length, padding
    (2, 2, 2, 201, 32, 32, 8, 0),  # GQA 1
    (2, 4, 4, 163, 16, 16, 4, 45),  # GQA 1, stride 4, padding
]


def inputs(case, gen):
    batch, hq, hkv, n, d, _, _, pad = case
    q, k, v = (torch.randn(batch, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    q = q * 2.0  # peakier softmax: masses spread over a few blocks, as in real heads
    valid = None
    if pad:
        valid = torch.ones(batch, n, dtype=torch.bool)
        valid[1, :pad] = False
    return q, k, v, valid


def seeded():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def on(x):
    return None if x is None else x.to(DEVICE)


def same_index(got, want):
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert torch.equal(got.indices.cpu(), want.indices.cpu())


# ------------------------------------------------------------------ xattention


@interpreted
@pytest.mark.parametrize("case", CASES)
def test_xattention_tile_mass_kernel_equals_the_torch_definition(case):
    q, k, _, valid = inputs(case, seeded())
    _, _, _, n, _, bs, stride, _ = case
    want = xattention.tile_block_mass(q.double(), k.double(), block_size=bs, stride=stride, scale=0.3, key_valid=valid)
    tiles = xattention.tile_valid(valid, q.shape[0], n, bs, stride, "cpu")
    got = xattn_mass.tile_block_mass(on(q), on(k), on(tiles), block_size=bs, stride=stride, scale=0.3).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # Each valid tile row holds mass 1: the sum is the number of valid tile rows (nothing lost or double counted).
    assert abs(float(got.sum()) - q.shape[1] * float(tiles.sum())) < 1e-3


@interpreted
@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.9])
@pytest.mark.parametrize("case", CASES)
def test_xattention_selector_triton_equals_torch(case, threshold):
    q, k, v, valid = inputs(case, seeded())
    _, _, _, _, _, bs, stride, _ = case
    base = XAttentionConfig(block_size=bs, stride=stride, threshold=threshold, sink_blocks=2, dense_layers=())
    want = xattention.select(q, k, v, layer=3, config=dataclasses.replace(base, estimate_impl="torch"), scale=0.3,
                             key_valid=valid)
    got = xattention.select(on(q), on(k), on(v), layer=3, config=dataclasses.replace(base, estimate_impl="triton"),
                            scale=0.3, key_valid=on(valid))
    same_index(got, want)


def stable_coverage(mass, threshold, allowed, forced):
    """The coverage rule with a stable descending order (ties: lower id first), one row at a time in float64."""
    keep = torch.zeros_like(allowed)
    for row in range(mass.shape[0]):
        m = mass[row].double()
        ok, f = allowed[row], forced[row] & allowed[row]
        total = float(m[ok].sum())
        kept = float(m[f].sum())
        keep[row] = f
        others = [j for j in range(m.shape[0]) if ok[j] and not f[j]]
        for j in sorted(others, key=lambda j: (-float(m[j]), j)):
            if kept >= threshold * total:
                break
            keep[row, j] = True
            kept += float(m[j])
    return keep


@interpreted
@pytest.mark.parametrize("ties", [False, True])
def test_coverage_kernel_equals_the_stable_sort_rule(ties):
    gen = seeded()
    batch, heads, p = 2, 3, 37
    mass = torch.rand(batch, heads, p, p, generator=gen) ** 3
    if ties:
        mass = (mass * 4).round() / 4  # a handful of values (zeros among them): ties at the threshold
    valid_blocks = torch.ones(batch, p, dtype=torch.bool)
    valid_blocks[1, :6] = False
    first = torch.tensor([0, 6])
    allowed = blocks.choosable(torch.repeat_interleave(valid_blocks, 16, dim=1), 16)  # (B, 1, P, P)
    forced = blocks.forced_blocks(p, first, 2, 1)[:, None]
    for threshold in (0.0, 0.5, 0.9, 0.99):
        got = coverage_select.select(on(mass), on(valid_blocks), on(first), threshold=threshold, sink_blocks=2,
                                     block_size=16, seq_len=16 * p)
        want = torch.stack([torch.stack([stable_coverage(mass[b, h], threshold, allowed[b, 0], forced[b, 0])
                                         for h in range(heads)]) for b in range(batch)])
        assert torch.equal(got.to_mask().cpu(), want), threshold
        if not ties:  # distinct masses: the torch selector (sort + cumsum) agrees too
            torch_keep = blocks.coverage(mass, threshold, allowed, forced) & allowed
            assert torch.equal(got.to_mask().cpu(), torch_keep)


# ------------------------------------------------------------------ minference and flexprefill: the last rows


# batch, hq, hkv, n, d, rows, left padding of sequence 1
ROW_CASES = [
    (2, 4, 1, 157, 16, 64, 40),  # GQA 4, odd length, padding
    (2, 2, 2, 99, 32, 32, 0),  # GQA 1
    (1, 4, 4, 21, 16, 64, 0),  # fewer tokens than rows
]


def row_inputs(case, gen):
    batch, hq, hkv, n, d, rows, pad = case
    return inputs((batch, hq, hkv, n, d, 16, 8, pad), gen)


@interpreted
@pytest.mark.parametrize("case", ROW_CASES)
def test_last_rows_kernel_equals_the_torch_definition(case):
    q, k, _, valid = row_inputs(case, seeded())
    rows = min(case[5], case[3])
    want_c, want_d = blocks.last_rows_sums(q.double(), k.double(), rows, 0.3, valid)
    got_c, got_d = last_rows.last_rows_sums(on(q), on(k), rows, 0.3, on(valid))
    torch.testing.assert_close(got_c.cpu().double(), want_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_d.cpu().double(), want_d, rtol=1e-5, atol=1e-6)
    # Every row with a valid key holds mass 1, in the columns and in the diagonals alike.
    assert torch.allclose(got_c.sum(-1).cpu(), got_d.sum(-1).cpu(), atol=1e-4)


@interpreted
@pytest.mark.parametrize("budget_scale", [0.05, 0.2])
@pytest.mark.parametrize("case", ROW_CASES[:2])
def test_minference_selector_triton_equals_torch(case, budget_scale):
    q, k, v, valid = row_inputs(case, seeded())
    base = MInferenceConfig(block_size=16, last_q=case[5], vertical_size=100, slash_size=200, sink_columns=4,
                            local_diagonals=8, budget_scale=budget_scale, dense_layers=())
    want = minference.select(q, k, v, layer=3, config=dataclasses.replace(base, estimate_impl="torch"), scale=0.3,
                             key_valid=valid)
    got = minference.select(on(q), on(k), on(v), layer=3, config=dataclasses.replace(base, estimate_impl="triton"),
                            scale=0.3, key_valid=on(valid))
    same_index(got, want)


@interpreted
@pytest.mark.parametrize("granularity", ["block", "token"])
@pytest.mark.parametrize("case", ROW_CASES[:2])
def test_flexprefill_selector_triton_equals_torch(case, granularity):
    q, k, v, valid = row_inputs(case, seeded())
    # tau 0.3 splits the cases: the GQA-4 heads come out query-aware (divergence ~0.1), the GQA-1 ones vertical-slash (~0.3).
    # gamma 0.83: gamma x (valid rows) is no whole number, so no head's target falls exactly on the mass of whole
    # rows (the first rows' few large masses rank first; at 0.8 x 5 rows the sorted cumulative mass hits 4.0 exactly
    # and float32 rounding decides the last pick).
    base = FlexPrefillConfig(block_size=32, gamma=0.83, tau=0.3, min_budget=32, granularity=granularity, dense_layers=())
    torch_cfg, kernel_cfg = (dataclasses.replace(base, estimate_impl=impl) for impl in ("torch", "triton"))
    want_est = flexprefill.estimate(q, k, v, layer=3, config=torch_cfg, scale=0.3, key_valid=valid)
    got_est = flexprefill.estimate(on(q), on(k), on(v), layer=3, config=kernel_cfg, scale=0.3, key_valid=on(valid))
    for name in ("divergence", "columns", "diagonals", "blocks"):
        torch.testing.assert_close(got_est[name].cpu(), want_est[name], rtol=1e-5, atol=1e-6, msg=name)
    want = flexprefill.choose(want_est, seq_len=q.shape[2], config=torch_cfg, key_valid=valid)
    got = flexprefill.choose(got_est, seq_len=q.shape[2], config=kernel_cfg, key_valid=on(valid))
    same_index(got, want)


def test_estimate_impl_is_checked_and_said(monkeypatch):
    with pytest.raises(ConfigError, match="estimate_impl='fast' is not allowed"):
        XAttentionConfig(estimate_impl="fast")
    assert estimate_path(XAttentionConfig(), torch.device("cpu")) == "torch"  # auto on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="estimate_impl='triton' needs a CUDA device"):
        estimate_path(XAttentionConfig(estimate_impl="triton"), torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="cannot run xattention at block_size / stride = 256 tiles per block"):
        xattention.mass_path(XAttentionConfig(block_size=256, stride=1, estimate_impl="triton"), torch.device("cpu"))
    for config in (MInferenceConfig(last_q=256, estimate_impl="triton"), FlexPrefillConfig(block_size=256, estimate_impl="triton")):
        with pytest.raises(ConfigError, match="256 last rows"):
            est = minference.estimate if isinstance(config, MInferenceConfig) else flexprefill.estimate
            q = torch.randn(1, 1, 300, 16)
            est(q, q, q, layer=3, config=config, scale=0.3, key_valid=None)
    with pytest.raises(ConfigError, match="estimate_impl='fast' is not allowed"):
        FlexPrefillConfig(estimate_impl="fast")
    with pytest.raises(ConfigError, match="estimate_impl='fast' is not allowed"):
        MInferenceConfig(estimate_impl="fast")


# ------------------------------------------------------------------ flexprefill: the fused choice's pieces


@interpreted
@pytest.mark.parametrize("case", CASES[:2])
def test_pooled_block_softmax_kernel_equals_the_torch_definition(case):
    from stem_cli.kernels import pooled_block_softmax

    q, k, _, valid = inputs(case, seeded())
    batch, hq, hkv, n, d, bs, _, _ = case
    p = -(-n // bs)
    ok = blocks.valid_keys(valid, batch, n, "cpu")
    q_bar, k_bar = flexprefill._block_mean(q.double(), ok, bs), flexprefill._block_mean(k.double(), ok, bs)
    logits = torch.einsum("bhid,bhjd->bhij", q_bar, k_bar.repeat_interleave(hq // hkv, 1)) * 0.3
    want = torch.softmax(logits.masked_fill(~blocks.choosable(ok, bs), float("-inf")), -1).nan_to_num(0.0)
    got = pooled_block_softmax.block_softmax(on(q_bar.float()), on(k_bar.float()), on(blocks.block_valid(ok, bs)), 0.3)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    assert got.shape == (batch, hq, p, p)


@interpreted
@pytest.mark.parametrize("m", [1, 77, 200])
def test_coverage_threshold_count_equals_the_sort_rule(m):
    from stem_cli.kernels import coverage_threshold

    gen = seeded()
    x = torch.rand(4, m, generator=gen) ** 4  # distinct masses, a few large ones
    allowed = torch.rand(2, m, generator=gen) > 0.2
    active = torch.tensor([True, False, True, True])
    for threshold in (0.0, 0.37, 0.95):
        got = coverage_threshold.threshold_rows(on(x), on(allowed), threshold, active=on(active))
        want = blocks.coverage(x, threshold, allowed.repeat_interleave(2, 0)).sum(-1)
        assert torch.equal(got["count"].cpu()[active], want[active]), threshold


@interpreted
def test_coverage_threshold_ties_follow_the_stable_order():
    from stem_cli.kernels import coverage_threshold

    gen = seeded()
    rows, seg, n_seg = 4, 9, 7
    x = ((torch.rand(rows, seg * n_seg, generator=gen) * 4).round() / 4) ** 2  # a handful of values: ties everywhere
    allowed = torch.ones(1, seg * n_seg, dtype=torch.bool)
    allowed[0, ::5] = False
    for threshold in (0.2, 0.5, 0.8):
        got = coverage_threshold.threshold_rows(on(x), on(allowed), threshold, segment=seg)
        keep = stable_coverage(x, threshold, allowed.expand(rows, -1), torch.zeros_like(allowed).expand(rows, -1))
        assert torch.equal(got["count"].cpu(), keep.sum(-1)), threshold
        # The entries equal to t in earlier segments: the rank offset the index kernel adds.
        t = got["key"].cpu()
        keys = torch.where(allowed & (x > 0), x, 0.0).view(torch.int32).long().masked_fill(~allowed, -1)
        ties = (keys == t[:, None]).view(rows, n_seg, seg).sum(-1)
        assert torch.equal(got["ties_before"].cpu(), ties.cumsum(-1) - ties), threshold


@interpreted
def test_flexprefill_fused_choice_with_mixed_heads_equals_torch():
    """Query-aware and vertical-slash heads in one call (tau at the median divergence), padding, GQA 2, odd N."""
    q, k, v, valid = inputs((2, 4, 2, 149, 16, 16, 8, 37), seeded())
    base = FlexPrefillConfig(block_size=16, gamma=0.87, tau=0.0, min_budget=16, dense_layers=())
    torch_cfg = dataclasses.replace(base, estimate_impl="torch")
    est = flexprefill.estimate(q, k, v, layer=3, config=torch_cfg, scale=0.3, key_valid=valid)
    tau = float(est["divergence"].median())
    torch_cfg = dataclasses.replace(torch_cfg, tau=tau)
    kernel_cfg = dataclasses.replace(torch_cfg, estimate_impl="triton")
    aware = est["divergence"] < tau
    assert aware.any() and not aware.all()
    want = flexprefill.choose(est, seq_len=q.shape[2], config=torch_cfg, key_valid=valid)
    got = flexprefill.choose({name: on(x) for name, x in est.items()}, seq_len=q.shape[2], config=kernel_cfg,
                             key_valid=on(valid))
    same_index(got, want)


@pytest.mark.parametrize("d, stride, dtype", [(128, 8, torch.bfloat16), (64, 8, torch.bfloat16), (128, 16, torch.bfloat16),
                                              (128, 8, torch.float32), (64, 16, torch.float32)])
def test_xattention_configs_kept_fit_shared_memory(d, stride, dtype):
    # Sizes compiled for sm_90 by Triton 3.6 (bf16, d 128, s 8 and 16): the model stays within 8 KB above them.
    measured = {(64, 64, 1, 8): 136, (64, 128, 1, 8): 144, (32, 64, 2, 8): 72, (32, 128, 1, 8): 80, (64, 64, 1, 16): 264}
    for (ba, bc, st, s), kb in measured.items():
        assert 0 <= xattn_mass.shared_bytes(ba, bc, st, s, 128, 64, 2) / 1024 - kb <= 8
    tiles = 128 // stride
    kept = xattn_mass._prune(xattn_mass._configs(), {"Q": torch.empty(1, dtype=dtype)}, TILES=tiles, STRIDE=stride,
                             HEAD_DIM=d, BLOCK_D=min(d, 64))
    assert kept
    for c in kept:
        assert c.kwargs["BLOCK_A"] % tiles == 0
        assert xattn_mass.shared_bytes(c.kwargs["BLOCK_A"], c.kwargs["BLOCK_C"], c.num_stages, stride, d, min(d, 64),
                                       torch.empty(1, dtype=dtype).element_size()) <= xattn_mass.SHARED_BYTES
