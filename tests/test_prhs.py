"""Decode methods (prhs, topk-decode, quest): selections, schedules, dropped mass, configs, integration."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stem_cli.kernels import decode_reference as ref

import stem_cli
from stem_cli.config import ConfigError
from stem_cli.decode import prhs, quest, topk
from stem_cli.decode.runtime import DecodeRuntime
from stem_cli.registry import DECODE_METHODS, combined_method, get_decode_method, split_spec
from stem_cli.decode.common import context_from, freeze_prefix, progressive_drop
from stem_cli.decode.config import PrhsConfig, QuestConfig, TopkDecodeConfig


def case(batch=1, hq=4, hkv=2, t=200, d=16, seed=0, dtype=torch.float64, peaky=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, d, generator=g, dtype=dtype) * peaky
    k, v = (torch.randn(batch, hkv, t, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def ctx_of(q, k, v, config, *, layer=5, num_layers=8, key_valid=None, scale=0.25):
    return context_from(layer, num_layers, q, k, v, key_valid, scale, sinks=config.sink_tokens, window=config.window_tokens)


def as_sets(idx):
    return [[{x for x in row.tolist() if x >= 0} for row in b] for b in idx]


def no_duplicates(idx):
    for b in idx:
        for row in b:
            used = [x for x in row.tolist() if x >= 0]
            assert len(used) == len(set(used))


# ------------------------------------------------------------------ topk-decode and quest


def test_topk_decode_equals_brute_force():
    cfg = TopkDecodeConfig(budget=40, sink_tokens=3, window_tokens=8)
    q, k, v = case(batch=2, hq=6, hkv=2, t=150, seed=1)
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[1, :20] = False  # left padding
    ctx = ctx_of(q, k, v, cfg, key_valid=valid)
    sel = topk.select(ctx, cfg, {})
    no_duplicates(sel.indices)
    got = as_sets(sel.indices)
    s = ref.full_logits(q, k, valid, scale=0.25)  # (B, Hkv, g, T)
    probs = torch.softmax(s, -1).mean(2)
    for b in range(2):
        start = 0 if b == 0 else 20
        forced = set(range(start, start + 3)) | set(range(150 - 8, 150))
        for h in range(2):
            order = [j for j in torch.argsort(probs[b, h], descending=True).tolist() if j >= start and j not in forced]
            want = forced | set(order[: 40 - len(forced)])
            assert got[b][h] == want
    # every position scored: the exact delta comes with the selection
    assert sel.known.all()
    torch.testing.assert_close(sel.delta.reshape(2, -1).double(), ref.dropped_mass(q, k, sel.indices, None, valid, scale=0.25))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), page=st.sampled_from([1, 4, 16]), n_pages=st.integers(1, 6), pad=st.integers(0, 15))
def test_quest_page_bound_is_an_upper_bound(seed, page, n_pages, pad):
    g = torch.Generator().manual_seed(seed)
    t = page * n_pages
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 3, t, 8, generator=g, dtype=torch.float64) * 3
    valid = torch.arange(t)[None, :] >= torch.tensor([0, min(pad, t - 1)])[:, None]
    mins, maxs = quest.page_min_max(k, valid, page)
    bound = quest.page_upper_bound(q, mins, maxs)  # (B, H, g, P)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, k).float()
    per_key_bound = bound.repeat_interleave(page, dim=-1)
    ok = scores <= per_key_bound + 1e-5
    assert ok[valid[:, None, None, :].expand_as(ok)].all()
    # pages with no valid key are never chosen
    empty = ~valid.reshape(2, n_pages, page).any(-1)
    assert torch.isinf(bound[empty[:, None, None, :].expand_as(bound)]).all()


def test_quest_keeps_whole_pages_within_budget_and_caches_full_pages():
    cfg = QuestConfig(budget=64, page_size=8, sink_tokens=2, window_tokens=8)
    q, k, v = case(t=203, seed=2)
    state: dict = {}
    sel = quest.select(ctx_of(q, k, v, cfg), cfg, state)
    no_duplicates(sel.indices)
    kept = as_sets(sel.indices)[0]
    for row in kept:
        assert len(row) <= 64
        salient = row - set(range(2)) - set(range(203 - 8, 203))
        pages = {j // 8 for j in salient}
        assert all(set(range(p * 8, min(p * 8 + 8, 203))) - set(range(2)) - set(range(195, 203)) <= row for p in pages)
    assert state["pages"][0].shape[2] == 203 // 8  # full pages cached for the next step
    q2, k2, v2 = case(t=204, seed=2)
    k2[:, :, :203], v2[:, :, :203] = k, v
    cached = quest.select(ctx_of(q2, k2, v2, cfg), cfg, state)
    assert state["pages"][0].shape[2] == 204 // 8
    assert as_sets(cached.indices) == as_sets(quest.select(ctx_of(q2, k2, v2, cfg), cfg, {}).indices)  # same as from scratch


# ------------------------------------------------------------------ PrHS


def test_schedules_against_hand_computed_values():
    # l_s = floor(0.5 * 32) = 16: layer 24 drops floor((1 - 0.5^(8/16)) * 1000) = floor(292.89) = 292
    assert progressive_drop(24, 32, 1000, phi=0.5, alpha=1.0, start=0.5) == 292
    assert progressive_drop(31, 32, 1000, phi=0.5, alpha=1.0, start=0.5) == 477  # 1 - 0.5^(15/16) = 0.4779
    assert progressive_drop(16, 32, 1000, phi=0.5, alpha=1.0, start=0.5) == 0
    assert progressive_drop(3, 32, 1000, phi=0.5, alpha=1.0, start=0.5) == 0
    assert progressive_drop(24, 32, 1000, phi=0.5, alpha=2.0, start=0.5) == 500  # 1 - 0.5^1
    # l_f = floor(0.25 * 32) = 8: layer 20 freezes floor((1 - 0.25^(2 * 12/24)) * 100) = 75
    assert freeze_prefix(20, 32, 100, psi=0.25, gamma=2.0, start=0.25) == 75
    assert freeze_prefix(8, 32, 100, psi=0.25, gamma=2.0, start=0.25) == 0
    assert freeze_prefix(20, 32, 100, psi=1.0, gamma=2.0, start=0.25) == 0  # psi = 1: nothing frozen
    d = PrhsConfig()  # defaults: the last of 32 layers drops floor((1 - 0.75^(15/16)) t)
    assert progressive_drop(31, 32, 10_000, phi=d.phi, alpha=d.alpha, start=d.depth_start) == math.floor((1 - 0.75 ** (15 / 16)) * 10_000)


def test_progressive_window_drops_the_oldest_tokens_but_not_sinks_or_window():
    cfg = PrhsConfig(budget=60, sink_tokens=4, window_tokens=8, selectors="depth", phi=0.5, alpha=1.0, depth_start=0.5)
    q, k, v = case(t=300, seed=3, peaky=0.1)  # near-uniform attention: top-k would take old tokens too
    ctx = ctx_of(q, k, v, cfg, layer=7, num_layers=8)
    drop = progressive_drop(7, 8, 300, phi=0.5, alpha=1.0, start=0.5)  # floor((1 - 0.5^(3/4)) 300) = 121
    assert drop == 121
    sel = prhs.select(ctx, cfg, {})
    for row in as_sets(sel.indices)[0]:
        assert set(range(4)) <= row and set(range(292, 300)) <= row
        assert not row & set(range(4, 4 + drop))
        assert len(row) == 60


def test_shared_set_is_a_superset_of_the_dilated_anchor_set():
    cfg = PrhsConfig(budget=50, sink_tokens=2, window_tokens=6, selectors="time", tau=0.8, r=1)
    q, k, v = case(batch=2, t=160, seed=4)
    state: dict = {}
    first = prhs.select(ctx_of(q, k, v, cfg), cfg, state)
    assert first.anchors == 4 and first.known.all()
    # the anchor step is exact top-k
    assert as_sets(first.indices) == as_sets(topk.select(ctx_of(q, k, v, cfg), TopkDecodeConfig(budget=50, sink_tokens=2, window_tokens=6), {}).indices)
    # what the anchor shares: its best k_a salient positions and +-1 around the best third of them
    probs = torch.softmax(ref.full_logits(q, k, None, scale=0.25), -1).mean(2)
    avail = 50 - 2 - 6
    k_a = int(prhs.share_count(torch.tensor([avail]), 1))
    assert k_a + 2 * math.ceil(k_a / 3) <= avail
    q2 = q + 0.01 * torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=q.dtype)  # cosine ~ 1
    k2, v2 = (torch.cat([x, torch.randn(2, 2, 1, 16, dtype=x.dtype)], 2) for x in (k, v))
    second = prhs.select(ctx_of(q2, k2, v2, cfg), cfg, state)
    assert second.anchors == 0 and second.decisions == 4
    no_duplicates(second.indices)
    for b in range(2):
        for h in range(2):
            forced = set(range(2)) | set(range(154, 160))
            order = [j for j in torch.argsort(probs[b, h], descending=True).tolist() if j not in forced]
            top = order[:k_a]
            dilated = set(top) | {j + o for j in top[: math.ceil(k_a / 3)] for o in (-1, 1)}
            dilated = {j for j in dilated if 2 <= j < 160}
            kept = as_sets(second.indices)[b][h]
            assert dilated <= kept  # superset of the anchor's dilated set
            assert set(range(2)) | set(range(161 - 6, 161)) <= kept  # sinks and the current window
            assert len(kept) <= 50


def test_dissimilar_query_reanchors_and_selectors_off_is_topk():
    cfg = PrhsConfig(budget=50, sink_tokens=2, window_tokens=6)
    q, k, v = case(t=160, seed=6)
    state: dict = {}
    prhs.select(ctx_of(q, k, v, cfg, layer=1), cfg, state)
    sel = prhs.select(ctx_of(-q, k, v, cfg, layer=1), cfg, state)  # cosine -1
    assert sel.anchors == 2 and sel.cosine_reanchors == 2
    off = PrhsConfig(budget=50, sink_tokens=2, window_tokens=6, selectors="none")
    want = topk.select(ctx_of(q, k, v, cfg), TopkDecodeConfig(budget=50, sink_tokens=2, window_tokens=6), {})
    assert as_sets(prhs.select(ctx_of(q, k, v, off), off, {}).indices) == as_sets(want.indices)


def test_freezing_inherits_the_previous_layers_early_tokens():
    cfg = PrhsConfig(budget=80, sink_tokens=2, window_tokens=6, selectors="layer", psi=0.5, gamma=1.0, freeze_start=0.0)
    q, k, v = case(t=200, seed=7)
    frozen = freeze_prefix(7, 8, 200, psi=0.5, gamma=1.0, start=0.0)  # floor((1 - 0.5^(7/8)) 200) = floor(90.94) = 90
    assert frozen == 90
    prev = torch.full((2, 30), -1, dtype=torch.long)
    prev[0, :5] = torch.tensor([3, 10, 50, 91, 150])  # 3, 10, 50, 91 lie in the frozen prefix [2, 92)
    prev[1, :2] = torch.tensor([0, 199])
    ctx = ctx_of(q, k, v, cfg, layer=7, num_layers=8)
    ctx.prev_indices = prev
    sel = prhs.select(ctx, cfg, {})
    rows = as_sets(sel.indices)[0]
    assert {3, 10, 50, 91} <= rows[0]
    assert not (rows[0] & set(range(2, 92))) - {3, 10, 50, 91}  # nothing else from the frozen prefix
    assert not rows[1] & set(range(2, 92))
    assert all(len(r) <= 80 for r in rows)
    assert not sel.known.any()  # the frozen prefix was never scored: delta unknown without audit


@pytest.mark.parametrize(
    "method,params",
    [
        ("prhs", {}),
        ("prhs", {"max_delta": 0.05, "delta_check": "bound"}),
        ("prhs", {"audit": True, "max_delta": 0.05}),
        ("topk-decode", {}),
        ("quest", {"page_size": 4}),
    ],
)
def test_full_window_reduces_to_dense(method, params):
    """With the window covering the cache every selector keeps everything: the float64 dense output."""
    q, k, v = case(batch=2, hq=6, hkv=2, t=40, seed=8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :9] = False
    m = get_decode_method(method)
    cfg = type(m.defaults)(**{"budget": 64, "window_tokens": 60, "dense_decode_layers": (), **params})
    runtime = DecodeRuntime(m, cfg, num_layers=8)
    runtime.dense_fast_path = False  # run the selector, not the shortcut
    want = ref.dense_decode_attention(q, k, v, valid, scale=0.25)
    for step in range(3):
        for layer in range(8):
            out = runtime.forward(SimpleNamespace(layer_idx=layer), q, k, v, valid, 0.25)
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    stats = runtime.stats()
    assert stats["kept_fraction"] == pytest.approx(1.0)
    if stats["delta_samples"]:
        assert stats["delta_max"] < 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), noise=st.floats(0.0, 0.6), temperature=st.floats(0.5, 4.0))
def test_bound_estimate_bounds_the_exact_delta_of_the_shared_set(seed, noise, temperature):
    cfg = PrhsConfig(budget=30, sink_tokens=2, window_tokens=4, selectors="time", tau=-1.0, max_delta=0.999, delta_check="bound")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 1, 8, generator=g, dtype=torch.float64) * temperature
    k, v = (torch.randn(1, 2, 81, 8, generator=g, dtype=torch.float64) for _ in range(2))
    state: dict = {}
    prhs.select(ctx_of(q[..., :], k[:, :, :80], v[:, :, :80], cfg), cfg, state)
    q2 = q + noise * torch.randn(q.shape, generator=g, dtype=q.dtype) * temperature
    ctx = ctx_of(q2, k, v, cfg)
    # recompute the estimate exactly as select does, then compare with the truth for the shared set
    static = state["static"]
    keep = (static >= 0) & (static < ctx.window_start())
    shared = torch.cat([ctx.forced_indices().expand(2, -1), torch.where(keep, static, torch.full_like(static, -1))], -1)
    fpos = state["forced_pos"]
    kept_f = (fpos >= 0) & ((torch.arange(fpos.shape[-1]) < 2) | (fpos >= ctx.window_start()))
    m = ((state["p_forced"] * kept_f[:, None]).sum(-1) + (state["p_static"] * keep[:, None]).sum(-1)).clamp(0, 1)
    eps = 0.25 * (q2[:, :, 0].reshape(2, 2, 8) - q[:, :, 0].reshape(2, 2, 8)).norm(dim=-1) * state["kmax"][:, None]
    bound = (1 - m) / ((1 - m) + torch.exp(-2 * eps) * m)
    exact = ref.dropped_mass(q2, k, shared.reshape(1, 2, -1), None, None, scale=0.25).reshape(2, 2)
    assert (exact <= bound + 1e-9).all()


def test_max_delta_falls_back_and_counts():
    q, k, v = case(t=120, seed=9, peaky=0.5)
    for check in ("exact", "bound", "anchor"):
        cfg = PrhsConfig(budget=30, sink_tokens=2, window_tokens=4, selectors="time", tau=-1.0, max_delta=1e-4,
                         delta_check=check, audit=check == "exact")
        runtime = DecodeRuntime(get_decode_method("prhs"), cfg, num_layers=4)
        for _ in range(3):
            runtime.forward(SimpleNamespace(layer_idx=3), q, k, v, None, 0.25)
        stats = runtime.stats()
        assert stats["reanchor_fraction"] == 1.0 and stats["fallbacks"] == 4  # 2 rows x 2 shared-would-be steps
        assert stats["over_max_delta"] > 0  # even exact top-k of 30 of 120 near-uniform keys drops more than 1e-4
    loose = PrhsConfig(budget=30, sink_tokens=2, window_tokens=4, selectors="time", tau=-1.0, max_delta=0.99, delta_check="exact", audit=True)
    runtime = DecodeRuntime(get_decode_method("prhs"), loose, num_layers=4)
    for _ in range(3):
        runtime.forward(SimpleNamespace(layer_idx=3), q, k, v, None, 0.25)
    stats = runtime.stats()
    assert stats["fallbacks"] == 0 and stats["reanchor_fraction"] == pytest.approx(1 / 3)
    assert stats["delta_samples"] == 3 * 4 and stats["delta_max"] <= 0.99
    runtime.reset()
    assert runtime.stats()["decisions"] == 0 and runtime.states == {}


def test_max_delta_guards_the_depth_selector():
    """An old token holding most of the mass: the progressive window drops it, max_delta brings it back."""
    q, k, v = case(t=300, seed=11, peaky=0.1)
    q[0, 1], q[0, 3] = q[0, 0], q[0, 2]  # each GQA group's two heads ask the same
    lead = q[0, [0, 2], 0]
    k[:, :, 10] = lead / lead.norm(dim=-1, keepdim=True) * 200  # position 10, among the oldest tokens, holds most of the mass
    base = {"budget": 60, "sink_tokens": 4, "window_tokens": 8, "selectors": "depth", "phi": 0.5, "depth_start": 0.5}
    free = prhs.select(ctx_of(q, k, v, PrhsConfig(**base), layer=7, num_layers=8), PrhsConfig(**base), {})
    assert all(10 not in row for row in as_sets(free.indices)[0]) and free.delta.amax() > 0.5
    guarded_cfg = PrhsConfig(**base, max_delta=0.2)
    guarded = prhs.select(ctx_of(q, k, v, guarded_cfg, layer=7, num_layers=8), guarded_cfg, {})
    assert all(10 in row for row in as_sets(guarded.indices)[0])
    assert guarded.fallbacks == 2 and guarded.known.all() and guarded.delta.amax() <= 0.2


def test_left_padding_never_selected_and_rows_independent():
    q, k, v = case(batch=2, hq=4, hkv=2, t=100, seed=10)
    k[1, :, 30:], v[1, :, 30:], q[1] = k[0, :, :70], v[0, :, :70], q[0]  # sequence 1 = sequence 0 shifted right by 30
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, :30] = False
    for name in DECODE_METHODS:
        m = get_decode_method(name)
        cfg = type(m.defaults)(budget=24, sink_tokens=2, window_tokens=4, dense_decode_layers=())
        sel = m.select(ctx_of(q, k[..., :], v, cfg, key_valid=valid), cfg, {})
        assert not (set().union(*as_sets(sel.indices)[1]) & set(range(30)))
        if name == "quest":  # pages are cut from position 0, so padding shifts the page grid
            continue
        alone = m.select(ctx_of(q[1:], k[1:, :, 30:], v[1:, :, 30:], cfg), cfg, {})
        assert [{j + 30 for j in s} for s in as_sets(alone.indices)[0]] == as_sets(sel.indices)[1], name


# ------------------------------------------------------------------ configs, specs, integration


def test_bad_selectors_and_parameters_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown selector 'tme'"):
        PrhsConfig(selectors="tme,depth")
    for bad, match in [
        ({"tau": 1.5}, "tau=1.5"), ({"r": -1}, "r=-1"), ({"phi": 0.0}, "phi=0.0"), ({"psi": 2.0}, "psi=2.0"),
        ({"depth_start": 1.0}, "depth_start=1.0"), ({"max_delta": 1.0}, "max_delta=1.0"), ({"delta_check": "guess"}, "delta_check='guess'"),
        ({"budget": 10}, "budget=10"), ({"window_tokens": 0}, "window_tokens=0"), ({"dense_decode_layers": [-1]}, "dense_decode_layers"),
    ]:
        with pytest.raises(ConfigError, match=match):
            PrhsConfig(**bad)
    with pytest.raises(ConfigError, match="page_size=0"):
        QuestConfig(page_size=0)
    assert PrhsConfig(selectors=["layer", "time"]).selectors == "time,layer"
    assert PrhsConfig(selectors="none").selectors == "none"


def test_specs_and_combined_configs():
    assert split_spec("stem+prhs") == ("stem", "prhs") and split_spec("quest") == ("dense", "quest")
    with pytest.raises(ConfigError, match="unknown decode method 'nosuch'"):
        combined_method("stem+nosuch")
    with pytest.raises(ConfigError, match="unknown pre-fill method 'nosuch'"):
        combined_method("nosuch+prhs")
    from stem_cli.registry import build_configs, parse_method_list

    names = parse_method_list(["dense,stem+prhs", "topk-decode"])
    assert names == ["dense", "stem+prhs", "topk-decode"]
    configs = build_configs(names, None, ["budget=256", "block_size=32", "stem+prhs.tau=0.9"])
    both = configs["stem+prhs"]
    assert both.decode.budget == 256 and both.decode.tau == 0.9 and both.prefill.block_size == 32
    assert configs["topk-decode"].decode.budget == 256
    with pytest.raises(ConfigError, match="tau=2"):
        build_configs(["stem+prhs"], None, ["tau=2"])
    with pytest.raises(ConfigError, match="selectors"):
        build_configs(["prhs"], None, ["selectors=time,nope"])


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_tiny_model_full_window_generates_dense_tokens_and_sparse_runs():
    model = tiny_llama()
    ids = torch.randint(3, 300, (2, 160), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :40], mask[1, :40] = 0, 0  # left padding
    gen = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "attention_mask": mask}
    with torch.no_grad():
        dense = model.generate(ids, **gen)
        runtime = stem_cli.apply(model, "stem", decode="prhs", block_size=16, dense_layers=[], k_start=10_000, mu=1.0,
                                 budget=512, window_tokens=500, dense_decode_layers=[])
        runtime.decode.dense_fast_path = False
        full = model.generate(ids, **gen)
        assert torch.equal(full, dense)
        stats = runtime.decode.stats()
        assert stats["decode_steps"] == 4 and stats["kept_fraction"] == pytest.approx(1.0)
        runtime = stem_cli.apply(model, "dense+prhs", budget=40, window_tokens=8, dense_decode_layers=[0], audit=True)
        sparse = model.generate(ids, **gen)
    stats = runtime.decode.stats()
    assert sparse.shape == dense.shape
    assert 0 < stats["kept_fraction_sparse_layers"] < 0.5 and stats["delta_coverage"] == 1.0
    assert 0 < stats["delta_mean"] <= stats["delta_p95"] <= stats["delta_max"] <= 1


def test_cli_bad_decode_spec_exits_2():
    from typer.testing import CliRunner

    from stem_cli.cli import app

    runner = CliRunner()
    for spec, message in [("stem+nosuch", "unknown decode method 'nosuch'"), ("nosuch+prhs", "unknown pre-fill method")]:
        result = runner.invoke(app, ["generate", "--model", "tiny-llama", "--method", spec], env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        assert result.exit_code == 2, result.output
        assert message in result.output.replace("\n", " ")
    result = runner.invoke(app, ["generate", "--model", "tiny-llama", "--method", "prhs", "--set", "selectors=time,nope"],
                           env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert result.exit_code == 2 and "nope" in result.output


def test_cli_profile_decode_writes_rows(tmp_path):
    import json

    from typer.testing import CliRunner

    from stem_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["profile", "--decode", "--device", "cpu", "--model", "tiny-llama", "--seq-len", "200", "--warmup", "1", "--repeat", "2",
         "--set", "budget=80", "--set", "window_tokens=8", "--no-generation", "--output", str(tmp_path)],
        env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("profile-decode-*.json")).read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "topk-decode", "prhs", "quest"} and data["shape"]["kv_heads"] == 2
    assert all(r["status"] == "ok" and r["per_token_ms"] > 0 for r in rows.values())
    assert rows["topk-decode"]["decode_stats"]["kept_fraction_sparse_layers"] < 0.5  # 80 of ~200 tokens
    assert rows["dense"]["speedup"] == 1.0 and rows["prhs"]["reanchor_fraction"] is not None
    # dense is also timed under each SDPA backend forced (on the CPU: math and flash run, cuDNN and efficient are refused)
    backends = rows["dense"]["sdpa_backends"]
    assert backends["math"]["per_token_ms"] > 0 and backends["flash"]["per_token_ms"] > 0, backends
    assert all("per_token_ms" in b or b["status"].startswith("unsupported: ") for b in backends.values()), backends
    assert backends["cudnn"]["status"].startswith("unsupported: ")
    assert rows["dense"]["sdpa_default_matches"] in (None, *backends)
    assert "dense SDPA forced per backend at 200" in result.output
    # the baseline is the fastest backend probed, and every method's row ran with it first
    fastest = min((b["per_token_ms"], name) for name, b in backends.items() if "per_token_ms" in b)[1]
    assert all(r["sdpa_backend"] == fastest for r in rows.values()), {m: r["sdpa_backend"] for m, r in rows.items()}
    assert rows["dense"]["per_token_unforced_ms"] > 0


def test_sdpa_first_puts_the_backend_first_and_falls_back():
    """sdpa_first(name): SDPA tries that backend first (torch's priority order while inside) and still answers a
    call the backend refuses (cuDNN on the CPU) through the others, with the reference output; None changes nothing."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from stem_cli.runs.decode_profile import sdpa_first

    order = getattr(torch._C, "_get_sdp_priority_order", None)  # private: only where this torch has it
    before = order() if order else None
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64) for n in (1, 37, 37))
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    for name, backend in [("math", SDPBackend.MATH), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        with sdpa_first(name):
            if order:
                assert order()[0] == int(backend)
            out = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, reference)
    if order:
        assert order() == before
    with sdpa_first(None):
        if order:
            assert order() == before


# ------------------------------------------------------------------ host synchronisations and incremental state


class SyncCounter:
    """Counts the calls that would synchronise with a GPU (a value read on the host, a data-dependent
    shape) while active: item/tolist/bool/int/float/index conversions, nonzero, masked_select and
    boolean-mask indexing. On the CPU nothing waits, but the same calls would."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        self.where: list[str] = []
        self.active = False
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero, "torch.nonzero"))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "torch.cuda.synchronize"))
        to = torch.Tensor.to
        monkeypatch.setattr(torch.Tensor, "to", self._wrap_to(to))
        get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._wrap_index(get, "x[mask]"))
        monkeypatch.setattr(torch.Tensor, "__setitem__", self._wrap_index(put, "x[mask] ="))

    def _hit(self, name):
        if self.active:
            self.count += 1
            import traceback

            frame = traceback.extract_stack(limit=4)[0]
            self.where.append(f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")

    def _wrap(self, fn, name):
        def wrapper(*args, **kwargs):
            self._hit(name)
            return fn(*args, **kwargs)

        return wrapper

    def _wrap_to(self, fn):
        def wrapper(x, *args, **kwargs):  # a copy to the host from another device
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" and x.device.type != "cpu":
                self._hit("to(cpu)")
            return fn(x, *args, **kwargs)

        return wrapper

    def _wrap_index(self, fn, name):
        def wrapper(x, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._hit(name)
            return fn(x, index, *rest)

        return wrapper


def run_steps(method, params, *, steps=8, layers=4, t0=300, seed=0, valid=None, counter=None, drift=0.02):
    """Decode `steps` tokens through `layers` layers on a growing synthetic cache; counts syncs from the
    third step on (steady state) when a counter is given. Returns (runtime, outputs of the last step)."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = 2, 8, 2, 16
    total = t0 + steps
    k, v = (torch.randn(b, hkv, total, d, generator=g) for _ in range(2))
    q = torch.randn(b, hq, 1, d, generator=g) * 2
    m = get_decode_method(method)
    cfg = type(m.defaults)(**{"budget": 64, "sink_tokens": 4, "window_tokens": 16, "dense_decode_layers": (0,), **params})
    runtime = DecodeRuntime(m, cfg, num_layers=layers)
    outs = []
    for step in range(steps):
        t = t0 + step + 1
        q = q + drift * torch.randn(q.shape, generator=g)
        kv_valid = None if valid is None else valid[:, :t]
        if counter is not None:
            counter.active = step >= 2
        outs = [runtime.forward(SimpleNamespace(layer_idx=layer), q, k[:, :, :t], v[:, :, :t], kv_valid, 0.25) for layer in range(layers)]
    if counter is not None:
        counter.active = False
    return runtime, outs


@pytest.mark.parametrize(
    "method,params,allowed",
    [
        ("topk-decode", {}, 0),
        ("quest", {"page_size": 8}, 0),
        ("prhs", {}, 0),
        ("prhs", {"max_delta": 0.5, "delta_check": "bound"}, 0),
        ("prhs", {"max_delta": 0.5, "delta_check": "anchor", "phi": 0.5, "psi": 0.5, "depth_start": 0.0, "freeze_start": 0.0}, 0),
        ("prhs", {"audit": True, "max_delta": 0.5}, 0),
        ("prhs", {"selectors": "depth,layer", "max_delta": 0.5, "depth_start": 0.0, "freeze_start": 0.0}, 0),  # no sharing
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_steady_state_decode_steps_do_not_sync(monkeypatch, method, params, allowed, padded):
    """At most `allowed` host syncs per sparse layer-step: none for every method (PrHS's anchor decision
    lives on the device since issue 18; the host-synchronising version needed one per layer-step)."""
    valid = None
    if padded:
        valid = torch.ones(2, 400, dtype=torch.bool)
        valid[1, :37] = False
    counter = SyncCounter(monkeypatch)
    runtime, _ = run_steps(method, params, valid=valid, counter=counter)
    sparse_layer_steps = 6 * 3  # steps 2..7, layers 1..3 (layer 0 is dense)
    assert counter.count <= allowed * sparse_layer_steps, counter.where[:5]
    if allowed:
        assert counter.count == sparse_layer_steps  # exactly one per layer-step, and only the allowed one
    stats = runtime.stats()  # the statistics are still all there (read here, not in the steps)
    assert stats["decisions"] == 8 * 3 * 4 and 0 < stats["kept_fraction_sparse_layers"] < 1


def test_dense_layers_and_fitting_contexts_do_not_sync(monkeypatch):
    counter = SyncCounter(monkeypatch)
    runtime, _ = run_steps("prhs", {"budget": 1024}, counter=counter)  # the budget covers the context: dense
    assert counter.count == 0, counter.where[:5]
    assert runtime.stats()["kept_fraction"] == pytest.approx(1.0)


def test_mixed_anchor_and_shared_rows_match_separate_computations():
    """One KV head shares, the other re-anchors in the same step: the anchor row is exact top-k as from a
    fresh state (only it is scored), the shared row keeps the anchor's set."""
    cfg = PrhsConfig(budget=50, sink_tokens=2, window_tokens=6, selectors="time", tau=0.8)
    q, k, v = case(batch=1, hq=4, hkv=2, t=160, seed=12)
    state: dict = {}
    prhs.select(ctx_of(q, k, v, cfg), cfg, state)
    static = state["static"].clone()
    q2 = q.clone()
    q2[:, 2:] = -q[:, 2:]  # KV head 1's group turns around: cosine -1
    k2, v2 = (torch.cat([x, torch.randn(1, 2, 1, 16, dtype=x.dtype)], 2) for x in (k, v))
    mixed = prhs.select(ctx_of(q2, k2, v2, cfg), cfg, state)
    assert mixed.anchors == 1 and int(mixed.cosine_reanchors) == 1
    fresh = prhs.select(ctx_of(q2, k2, v2, cfg), cfg, {})
    assert as_sets(mixed.indices)[0][1] == as_sets(fresh.indices)[0][1]
    torch.testing.assert_close(mixed.delta[0, 1].double(), fresh.delta[0, 1], rtol=1e-6, atol=1e-7)  # float32 state
    assert mixed.known.tolist() == [[False, True]]
    forced = set(range(2)) | set(range(161 - 6, 161))
    assert as_sets(mixed.indices)[0][0] == forced | {j for j in static[0].tolist() if 0 <= j < 161 - 6}
    assert torch.equal(state["static"][0], static[0])  # the sharing row's anchor state is untouched


def test_running_key_norm_equals_a_full_pass():
    g = torch.Generator().manual_seed(13)
    k = torch.randn(2, 3, 90, 8, generator=g)
    valid = torch.ones(2, 90, dtype=torch.bool)
    valid[1, :11] = False
    k[1, :, 5] = 100.0  # padding: never counted
    state: dict = {}
    cfg = PrhsConfig(budget=40, sink_tokens=2, window_tokens=4)
    for t in (60, 61, 62, 75, 90):
        ctx = ctx_of(torch.randn(2, 6, 1, 8, generator=g), k[:, :, :t], k[:, :, :t], cfg, key_valid=valid[:, :t])
        got = prhs.running_key_norm(ctx, state)
        want = k[:, :, :t].norm(dim=-1).masked_fill(~valid[:, None, :t], 0).amax(-1).flatten()
        torch.testing.assert_close(got, want)
    assert state["kmax_len"] == 90


def test_quest_incremental_pages_match_from_scratch_over_steps():
    cfg = QuestConfig(budget=48, page_size=8, sink_tokens=2, window_tokens=8)
    g = torch.Generator().manual_seed(14)
    k = torch.randn(1, 2, 140, 16, generator=g, dtype=torch.float64)
    valid = torch.ones(1, 140, dtype=torch.bool)
    valid[0, :13] = False
    state: dict = {}
    for t in range(100, 140):
        q = torch.randn(1, 4, 1, 16, generator=g, dtype=torch.float64)
        ctx = ctx_of(q, k[:, :, :t], k[:, :, :t], cfg, key_valid=valid[:, :t])
        got = quest.select(ctx, cfg, state)
        want = quest.select(ctx_of(q, k[:, :, :t], k[:, :, :t], cfg, key_valid=valid[:, :t]), cfg, {})
        assert torch.equal(got.indices, want.indices)


@pytest.mark.parametrize("flip", [[1], [0, 2, 3]])  # one of four rows anchors (its keys only), three do (every row scored)
def test_mixed_rows_both_scoring_paths(flip):
    cfg = PrhsConfig(budget=50, sink_tokens=2, window_tokens=6, selectors="time", tau=0.8)
    q, k, v = case(batch=2, hq=4, hkv=2, t=160, seed=15)
    state: dict = {}
    prhs.select(ctx_of(q, k, v, cfg), cfg, state)
    q2 = q.clone()
    for r in flip:
        b, h = divmod(r, 2)
        q2[b, 2 * h:2 * h + 2] = -q[b, 2 * h:2 * h + 2]
    k2, v2 = (torch.cat([x, torch.randn(2, 2, 1, 16, dtype=x.dtype)], 2) for x in (k, v))
    mixed = prhs.select(ctx_of(q2, k2, v2, cfg), cfg, state)
    fresh = prhs.select(ctx_of(q2, k2, v2, cfg), cfg, {})
    assert mixed.anchors == len(flip)
    for r in flip:
        b, h = divmod(r, 2)
        assert as_sets(mixed.indices)[b][h] == as_sets(fresh.indices)[b][h]
        assert mixed.known[b, h]
    assert int(mixed.known.sum()) == len(flip)


# ------------------------------------------------------------------ device-side PrHS against the host-synchronising oracle


def stream_both(params, *, padded, steps=12, layers=6, t0=260, seed=0, drift=0.9, dtype=torch.float64):
    """The same decode stream through the device-side PrHS and the host-synchronising reference
    (prhs_reference.select, today's implementation before issue 18), each in its own DecodeRuntime
    (so cross-layer freezing reads each one's own previous layer). Returns (pairs of selections per
    layer-step, pairs of outputs, the two runtimes)."""
    from stem_cli.decode import prhs_reference

    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = 2, 8, 2, 16
    total = t0 + steps
    k, v = (torch.randn(b, hkv, total, d, generator=g, dtype=dtype) for _ in range(2))
    valid = None
    if padded:
        valid = torch.ones(b, total, dtype=torch.bool)
        valid[1, :41] = False
    q = torch.randn(b, hq, 1, d, generator=g, dtype=dtype) * 2
    m = get_decode_method("prhs")
    cfg = PrhsConfig(**{"budget": 64, "sink_tokens": 4, "window_tokens": 16, "dense_decode_layers": (0,), **params})
    recorded = {"device": [], "reference": []}

    def recording(fn, key):
        def select(ctx, config, state):
            sel = fn(ctx, config, state)
            recorded[key].append(sel)
            return sel

        return select

    runtimes = [DecodeRuntime(SimpleNamespace(name=key, select=recording(fn, key)), cfg, num_layers=layers)
                for key, fn in (("device", m.select), ("reference", prhs_reference.select))]
    outs = []
    for step in range(steps):
        t = t0 + step + 1
        q = q + drift * torch.randn(q.shape, generator=g, dtype=dtype)
        kv_valid = None if valid is None else valid[:, :t]
        for layer in range(layers):
            outs.append([rt.forward(SimpleNamespace(layer_idx=layer), q, k[:, :, :t], v[:, :, :t], kv_valid, 0.25) for rt in runtimes])
    return list(zip(recorded["device"], recorded["reference"])), outs, runtimes


def steps_agree(pairs, *, rtol: float, atol: float) -> int:
    """Assert each (device, reference) step pair agrees: index sets, counters, known deltas (within rtol/atol).
    Returns the number of steps where some rows shared and others re-anchored."""
    mixed = 0
    for i, (dev, want) in enumerate(pairs):
        assert as_sets(dev.indices) == as_sets(want.indices), i
        no_duplicates(dev.indices)
        for name in ("decisions", "anchors", "cosine_reanchors", "fallbacks"):
            assert int(getattr(dev, name)) == int(getattr(want, name)), (i, name)
        assert torch.equal(dev.known, want.known), i
        torch.testing.assert_close(dev.delta[dev.known].double(), want.delta[want.known].double(), rtol=rtol, atol=atol)
        mixed += 0 < int(dev.anchors) < dev.decisions
    return mixed


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"depth_start": 0.0, "freeze_start": 0.0, "phi": 0.5, "psi": 0.5},
        {"max_delta": 0.3, "delta_check": "bound", "tau": 0.5},
        {"max_delta": 0.05, "delta_check": "anchor", "phi": 0.5, "psi": 0.5, "depth_start": 0.0, "freeze_start": 0.0},
        {"audit": True, "max_delta": 0.2},
        {"selectors": "time", "r": 2},
        {"selectors": "depth,layer", "max_delta": 0.5, "depth_start": 0.0, "freeze_start": 0.0},
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_device_side_prhs_equals_the_host_synchronising_reference(params, padded):
    """Step by step on a random stream whose rows re-anchor at different steps: the same anchors, the same
    cosine re-anchors and fallbacks, the same index sets, the same known deltas, the same outputs and state."""
    pairs, outs, runtimes = stream_both(params, padded=padded)
    mixed = steps_agree(pairs, rtol=1e-6, atol=1e-7)
    cfg = PrhsConfig(**params)
    if cfg.uses("time") and cfg.max_delta == 0:  # (with max_delta, 64 of ~260 random keys fall back nearly always)
        assert mixed > 0  # the stream exercised steps where some rows share and others re-anchor
    for got, want in outs:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    dev_rt, ref_rt = runtimes
    assert dev_rt.stats() == {**ref_rt.stats(), "method": dev_rt.name}
    for layer, state in ref_rt.states.items():
        mine = dev_rt.states[layer]
        for key in ("static", "has", "T", "forced_pos"):
            if key in state:
                assert torch.equal(mine[key], state[key]), (layer, key)
        for key in ("q", "q_norm", "p_static", "p_forced", "kmax"):
            if key in state:
                torch.testing.assert_close(mine[key].double(), state[key].double(), rtol=1e-6, atol=1e-7)


def test_gated_scoring_kernel_reads_only_active_rows():
    """kernels/sparse_decode.gated_logits (the GPU scoring of PrHS's re-anchoring rows, run here in the Triton
    interpreter): full_logits on the active rows, -inf elsewhere, with a strided cache view and lo > 0."""
    pytest.importorskip("triton")
    from stem_cli.kernels.sparse_decode import gated_logits

    g = torch.Generator().manual_seed(31)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU runs the compiled kernel: device tensors
    q = torch.randn(2, 3, 4, 32, generator=g).to(device)
    buf = torch.randn(2, 3, 150, 32, generator=g).to(device)
    k = buf[:, :, :130]
    active = torch.tensor([True, False, True, True, False, False], device=device)
    got = gated_logits(q, k, active, lo=7, scale=0.2)
    want = (torch.einsum("bhgd,bhtd->bhgt", q.double(), k[:, :, 7:].double()) * 0.2).flatten(0, 1).to(got.dtype)
    assert got.shape == (6, 4, 123)
    tol = 1e-4 if device == "cpu" else 2e-2  # the compiled float32 dot runs in tf32
    torch.testing.assert_close(got[active], want[active], rtol=tol, atol=tol)
    assert torch.isneginf(got[~active]).all()


@pytest.mark.parametrize(
    "params,padded",
    [({}, False), ({"depth_start": 0.0, "freeze_start": 0.0, "phi": 0.5, "psi": 0.5}, True), ({"selectors": "time", "r": 2}, True),
     ({"selectors": "depth,layer", "depth_start": 0.0, "freeze_start": 0.0}, False), ({"budget_fraction": 0.25, "tau": 0.5}, True)],
)
def test_triton_selection_equals_the_host_synchronising_reference(monkeypatch, params, padded):
    """PrHS with its selection in kernels/prhs_select.py (the GPU path, run here in the Triton interpreter,
    float32) against prhs_reference step by step: the same anchors, sets, known deltas, outputs and state.
    Without a host sync (SyncCounter) once the stream is past its first steps."""
    pytest.importorskip("triton")
    from stem_cli.decode import prhs as prhs_module

    monkeypatch.setattr(prhs_module, "TRITON_SELECT", True)
    calls = []
    from stem_cli.kernels import prhs_select

    real = prhs_select.anchor_topk
    monkeypatch.setattr(prhs_select, "anchor_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pairs, outs, runtimes = stream_both(params, padded=padded, steps=6, layers=4, dtype=torch.float32)
    assert len(calls) == len(pairs)  # every sparse layer-step took the Triton path
    # 1 - kept mass against the directly summed dropped mass: float32 rounding of the kept sum
    mixed = steps_agree(pairs, rtol=1e-5, atol=2e-6)
    if PrhsConfig(**params).uses("time"):
        assert mixed > 0
    for got, want in outs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dev_rt, ref_rt = runtimes
    for layer, state in ref_rt.states.items():
        for key in ("static", "has", "T"):
            if key in state:
                assert torch.equal(dev_rt.states[layer][key], state[key]), (layer, key)
    got, want = dev_rt.stats(), ref_rt.stats()  # the counts the fused step adds as one device vector
    for key in ("kept_fraction", "kept_fraction_sparse_layers", "reanchors", "cosine_reanchors", "decisions", "fallbacks"):
        assert got[key] == want[key], key


def test_triton_selection_steps_do_not_sync(monkeypatch):
    pytest.importorskip("triton")
    from stem_cli.decode import prhs as prhs_module

    monkeypatch.setattr(prhs_module, "TRITON_SELECT", True)
    counter = SyncCounter(monkeypatch)
    run_steps("prhs", {"depth_start": 0.0, "freeze_start": 0.0}, steps=5, counter=counter)
    assert counter.count == 0, counter.where[:5]


def test_triton_selection_path_choice(monkeypatch):
    """The Triton path serves max_delta = 0 without audit; other configs take the PyTorch path."""
    from stem_cli.decode import prhs as prhs_module
    from stem_cli.decode.common import context_from

    q, k, v = case(batch=1, hq=4, hkv=2, t=200, seed=3)
    ctx = context_from(1, 4, q, k, v, None, 0.25, sinks=4, window=16)
    monkeypatch.setattr(prhs_module, "TRITON_SELECT", True)
    assert prhs_module.triton_path(ctx, PrhsConfig(), None, 80)
    assert not prhs_module.triton_path(ctx, PrhsConfig(audit=True), None, 80)
    assert not prhs_module.triton_path(ctx, PrhsConfig(max_delta=0.1), "bound", 80)
    assert not prhs_module.triton_path(ctx, PrhsConfig(), None, 10**5)
    monkeypatch.setattr(prhs_module, "TRITON_SELECT", None)
    assert not prhs_module.triton_path(ctx, PrhsConfig(), None, 80)  # a CPU float32 step: PyTorch
    monkeypatch.setattr(prhs_module, "TRITON_SELECT", False)
    assert not prhs_module.triton_path(ctx, PrhsConfig(), None, 80)


# ------------------------------------------------------------------ the fixed cost of a decode step: launches per layer


class LaunchCounter:
    """While entered: the torch ops that run a kernel (views, empty tensors and metadata are free; counted by
    a TorchDispatchMode) and the Triton kernels launched (the interpreter's entry point, so on the CPU), by name.
    A decode step's fixed cost, whatever the cache length, is its launches: a few microseconds each on a GPU,
    in a CUDA graph too."""

    FREE = {"aten.view", "aten.select", "aten.slice", "aten.empty", "aten.expand", "aten.unsqueeze", "aten.squeeze",
            "aten.as_strided", "aten._unsafe_view", "aten.alias", "aten.t", "aten.transpose", "aten.permute",
            "aten.detach", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh", "aten.reshape"}

    PDL_OPTIONS = ("USE_GDC", "launch_pdl")  # recorded per launch, and taken off: the interpreter has no griddepcontrol

    def __init__(self, monkeypatch):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime.interpreter import InterpretedFunction

        self.ops, self.kernels, self.inside = Counter(), Counter(), 0
        self.pdl: list[tuple[str, tuple]] = []  # (kernel, (USE_GDC, launch_pdl)) per launch
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if not counter.inside and name not in LaunchCounter.FREE:
                    counter.ops[name] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        run = InterpretedFunction.run

        def counted(fn_self, *args, **kwargs):
            counter.kernels[fn_self.fn.__name__] += 1
            counter.pdl.append((fn_self.fn.__name__, tuple(kwargs.pop(k, False) for k in LaunchCounter.PDL_OPTIONS)))
            counter.inside += 1  # the interpreter's own tensor copies are not the step's launches
            try:
                return run(fn_self, *args, **kwargs)
            finally:
                counter.inside -= 1

        monkeypatch.setattr(InterpretedFunction, "run", counted)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.kernels.values())


@pytest.mark.parametrize("layer,padded", [(2, False), (6, True)])  # layer 6 of 8 freezes (lo > 0) and inherits
def test_fused_prhs_step_launches_few_kernels_per_layer(monkeypatch, layer, padded):
    """A PrHS layer-step on the Triton path (every row shares, or every row re-anchors) is 3 Triton launches
    (prhs_share, _anchor_logits, _topk_tree with the re-anchoring rows' epilogue and the step's counts) and,
    padded, the mask as int8; before issue 18's launch cut it was 4 kernels + the counters' sum (+ the merge
    levels' launches on long caches); the same step on the PyTorch path is ~200."""
    pytest.importorskip("triton")
    monkeypatch.setattr(prhs, "TRITON_SELECT", True)
    g = torch.Generator().manual_seed(layer)
    b, hkv, grp, d, t = 2, 2, 4, 16, 400
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    q = torch.randn(b, hkv * grp, 1, d, generator=g)
    valid = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[1, :23] = False
    cfg = PrhsConfig(budget=64, sink_tokens=4, window_tokens=16)
    counter = LaunchCounter(monkeypatch)
    state: dict = {}
    prev = torch.randint(-1, t, (b * hkv, 84), generator=g)  # the previous layer's set (freezing inherits from it)

    def context(query, n):  # the runtime's part (start and valid counts from the mask), not counted
        ctx = context_from(layer, 8, query, k, v, valid, 0.25, sinks=4, window=16, step=n)
        ctx.prev_indices = prev
        return ctx

    def step(query, n):
        return prhs.select(context(query, n), cfg, state)

    step(q, 0)  # the first anchors (the per-layer state is made here, once)
    for name, query, anchors in (("shared", q, 0), ("anchor", -q, b * hkv)):
        counter.ops.clear(), counter.kernels.clear()
        ctx = context(query, 1)
        with counter:
            sel = prhs.select(ctx, cfg, state)
        assert int(sel.anchors) == anchors, name
        assert dict(counter.kernels) == {"_prhs_share": 1, "_anchor_logits": 1, "_topk_tree": 1}, dict(counter.kernels)
        assert dict(counter.ops) == ({"aten._to_copy": 1} if padded else {}), (name, dict(counter.ops))
    shared = step(q, 2)  # the stored sets again (the anchor step above re-anchored to -q; q is now far from it)
    assert int(shared.anchors) == b * hkv


@pytest.mark.parametrize("fused", [False, True])  # the sparse decode's pass 2 in its own launch (default) or in pass 1's
@pytest.mark.parametrize("t", [400, 2300])  # 2300: the top-k tree has a merge level (its tickets, reset every launch)
def test_whole_sparse_layer_step_launches(monkeypatch, t, fused):
    """A sparse layer of DecodeRuntime.forward on the fused path, counted whole (selection, the Triton sparse decode
    run in the interpreter, the runtime's counters): 5 launches (4 with FUSED_COMBINE) and no torch op, whatever the
    cache length (before: 8, plus one per top-k merge level: 11 at 128K), and the counts the kernel adds equal the host's."""
    pytest.importorskip("triton")
    from stem_cli.decode import runtime as runtime_module
    from stem_cli.kernels import sparse_decode as kernel

    monkeypatch.setattr(prhs, "TRITON_SELECT", True)
    monkeypatch.setattr(kernel, "FUSED_COMBINE", fused)
    monkeypatch.setattr(runtime_module, "sparse_decode", lambda q, k, v, idx, scale: kernel.sparse_decode_attention(q, k, v, idx, scale=scale))
    g = torch.Generator().manual_seed(t)
    b, hkv, grp, d = 1, 2, 4, 16
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    q = torch.randn(b, hkv * grp, 1, d, generator=g)
    cfg = PrhsConfig(budget=64, sink_tokens=4, window_tokens=16, dense_decode_layers=(0,))
    rt = DecodeRuntime(get_decode_method("prhs"), cfg, num_layers=4)
    layers = [SimpleNamespace(layer_idx=i) for i in range(4)]
    for _ in range(2):  # state, tickets and counters made
        for m in layers:
            rt.forward(m, q, k, v, None, 0.25)
    counter = LaunchCounter(monkeypatch)
    kept = []
    for name, query in (("shared", q), ("anchor", -q)):
        counter.ops.clear(), counter.kernels.clear()
        before = rt.counter("kept")
        with counter:
            rt.forward(layers[2], query, k, v, None, 0.25)
        assert dict(counter.ops) == {}, (name, dict(counter.ops))
        combine = {} if fused else {"_sparse_decode_combine": 1}
        assert dict(counter.kernels) == {"_prhs_share": 1, "_anchor_logits": 1, "_topk_tree": 1, "_sparse_decode_partial": 1,
                                         **combine}, (name, dict(counter.kernels))
        kept.append(rt.counter("kept") - before)
    assert kept[1] == int((rt._prev[2] >= 0).sum())  # the kernel's count of the last step's kept positions
    assert rt.anchors == 3 * hkv + hkv  # the first step (layers 1-3 re-anchor every row), then the anchor step above


@pytest.mark.parametrize("forced,sms,on", [(None, 64, True), (None, 4, False), (True, 4, True), (False, 64, False)])
def test_every_kernel_of_a_decode_step_waits_for_the_one_before_it(monkeypatch, forced, sms, on):
    """With programmatic dependent launch a kernel may start before the previous one ends, so the stream order
    holds only if every kernel launched that way waits first (kernels/launch.py): each launch of a PrHS layer-step
    passes USE_GDC (the in-kernel wait) exactly when it passes launch_pdl. By default on a device that has PDL
    (made to say so here) for a step of at most SMALL_ROWS_PER_SM rows per SM (2 rows: on with 64 SMs, off with
    4); forced on or off whatever the rows; on a device without it (the CPU here, unpatched), never."""
    pytest.importorskip("triton")
    from stem_cli.decode import runtime as runtime_module
    from stem_cli.kernels import launch
    from stem_cli.kernels import sparse_decode as kernel

    monkeypatch.setattr(prhs, "TRITON_SELECT", True)
    monkeypatch.setattr(runtime_module, "sparse_decode", lambda q, k, v, idx, scale: kernel.sparse_decode_attention(q, k, v, idx, scale=scale))
    g = torch.Generator().manual_seed(11)
    b, hkv, grp, d, t = 1, 2, 4, 16, 300
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    q = torch.randn(b, hkv * grp, 1, d, generator=g)
    layers = [SimpleNamespace(layer_idx=i) for i in range(2)]
    counter = LaunchCounter(monkeypatch)

    def stream():  # two steps of a 2-layer decode; the second re-anchors (-q)
        rt = DecodeRuntime(get_decode_method("prhs"), PrhsConfig(budget=64, sink_tokens=4, window_tokens=16, dense_decode_layers=(0,)), num_layers=2)
        for query in (q, -q):
            counter.pdl.clear()
            out = [rt.forward(m, query, k, v, None, 0.25) for m in layers]
        return out[1]

    want = stream()  # unpatched: the CPU has no PDL
    assert counter.pdl and all(opts == (False, False) for _, opts in counter.pdl), counter.pdl
    monkeypatch.setattr(launch, "pdl_supported", lambda device: True)
    monkeypatch.setattr(launch, "sm_count", lambda device: sms)
    monkeypatch.setattr(launch, "PDL", forced)
    got = stream()
    names = [name for name, _ in counter.pdl]
    assert sorted(names) == sorted(["_prhs_share", "_anchor_logits", "_topk_tree", "_sparse_decode_partial", "_sparse_decode_combine"]), names
    expected = (on, on)
    assert all(opts == expected for _, opts in counter.pdl), counter.pdl
    torch.testing.assert_close(got, want)  # the launch options change no value


def test_a_growing_decode_compiles_each_kernel_once_per_shape(monkeypatch, kernel_variants):
    """Triton compiles a kernel once per pattern of its specialised int arguments ("equals 1", "divisible by
    16") and constexpr values. A generation's cache length grows by one every step and PrHS's frozen span
    differs between layers: any such int left specialised multiplies the compiles (about a minute each for
    _topk_tree on an H200's host). Over a growing stream, the decode kernels' variants are their constexpr
    combinations only; had they specialised every int, the same stream would need more."""
    pytest.importorskip("triton")
    from tests.conftest import compiled_once_per_shape

    from stem_cli.decode import runtime as runtime_module
    from stem_cli.kernels import sparse_decode as kernel

    monkeypatch.setattr(prhs, "TRITON_SELECT", True)
    monkeypatch.setattr(runtime_module, "sparse_decode", lambda q, k, v, idx, scale: kernel.sparse_decode_attention(q, k, v, idx, scale=scale))
    run_steps("prhs", {"depth_start": 0.0, "freeze_start": 0.0}, steps=18, layers=4, t0=300, drift=0.3)
    names = ("_prhs_share", "_anchor_logits", "_topk_tree", "_sparse_decode_partial")
    assert set(names) <= set(kernel_variants)
    assert compiled_once_per_shape(kernel_variants, kernel_variants)  # the stream meets several length patterns
