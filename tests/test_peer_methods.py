"""Peer methods (xattention, flexprefill, minference, stem-tpd) and the budget knobs.

Each selector is checked against a brute force of its definition written here in the
most obvious way (loops over batch, heads and rows, float64), then for the properties
every index must have, dense equality at a knob value that covers everything, BUD
monotone in the knob, config errors, and one run inside a tiny model.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import stem_cli
from stem_cli.config import ConfigError, StemConfig
from stem_cli.executor import attend, dense_attention
from stem_cli.index import block_pair_counts, causal_pairs, computed_pairs
from stem_cli.methods import blocks, flexprefill, minference, score, xattention
from stem_cli.registry import METHODS, build_configs
from stem_cli.methods.flexprefill import FlexPrefillConfig
from stem_cli.methods.knob import Knob
from stem_cli.methods.minference import MInferenceConfig
from stem_cli.methods.xattention import XAttentionConfig

NEW = ["xattention", "flexprefill", "minference", "stem-tpd"]


def rand_qkv(batch, hq, hkv, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Larger q than k so attention is peaked and the selections are not trivially everything.
    q = 2.0 * torch.randn(batch, hq, n, d, generator=g, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(batch, hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def structured_qkv(batch, hq, hkv, n, d, seed):
    """Random q/k/v plus vertical lines: every query leans on a shared direction that 5% of the
    keys carry strongly, so coverage selections are partial (flat random attention needs all)."""
    q, k, v = rand_qkv(batch, hq, hkv, n, d, seed)
    g = torch.Generator().manual_seed(seed + 100)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()
    heavy = torch.rand(n, generator=g) < 0.05
    k = k.clone()
    k[:, :, heavy] += 3 * u
    return q + 3 * u, k, v


def padding(batch, n, pad):
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[-1, :pad] = False  # the last sequence is left padded
    return valid


def first_block_of(valid_row, bs):
    return int(valid_row.to(torch.int8).argmax()) // bs


def block_ok(valid_row, bs, p):
    padded = torch.zeros(p * bs, dtype=torch.bool)
    padded[: valid_row.shape[0]] = valid_row
    return padded.view(p, bs).any(-1).tolist()


def allowed_blocks(valid_row, bs, p):
    ok = block_ok(valid_row, bs, p)
    return [[j <= i and ok[i] and ok[j] for j in range(p)] for i in range(p)]


def forced_set(i, fb, sinks, ok_row):
    if not ok_row:
        return set()
    return {j for j in range(fb, min(fb + sinks, i + 1))} | {i}


def check_index(index, valid, sinks=1):
    """Causal, sorted, unique, padded blocks never chosen, sinks + diagonal kept for valid rows."""
    bs, p = index.block_size, index.num_blocks
    batch = index.counts.shape[0]
    for b in range(batch):
        ok = block_ok(valid[b], bs, p)
        fb = first_block_of(valid[b], bs)
        for h in range(index.counts.shape[1]):
            for i in range(p):
                c = int(index.counts[b, h, i])
                ids = index.indices[b, h, i, :c].tolist()
                assert (index.indices[b, h, i, c:] == -1).all()
                assert ids == sorted(set(ids))
                assert all(0 <= j <= i and ok[j] for j in ids)
                if ok[i]:
                    assert forced_set(i, fb, sinks, True) <= set(ids), (b, h, i, ids)
                else:
                    assert c == 0


def greedy(values: dict, threshold: float, forced=()):
    """Forced keys first, then by decreasing value while the mass kept before is below threshold * total."""
    total = sum(values.values())
    kept = set(forced)
    mass = sum(values[j] for j in kept)
    for j in sorted((j for j in values if j not in kept), key=lambda j: -values[j]):
        if mass < threshold * total:
            kept.add(j)
            mass += values[j]
    return kept


def fewest(values: dict, gamma: float) -> int:
    """The number of largest values whose sum first reaches gamma of the total."""
    total, mass, count = sum(values.values()), 0.0, 0
    for x in sorted(values.values(), reverse=True):
        if mass < gamma * total:
            count += 1
            mass += x
    return count


def top(values: dict, count: int, first=()) -> set:
    order = list(first) + sorted((j for j in values if j not in first), key=lambda j: -values[j])
    return set(order[:count])


def last_rows_softmax(qh, kh, valid_row, rows, scale):
    """(rows, N) exact attention of the last `rows` queries; a row with no valid key is zeros."""
    n = kh.shape[0]
    a = torch.zeros(rows, n, dtype=torch.float64)
    for t in range(rows):
        r = n - rows + t
        keys = [c for c in range(r + 1) if valid_row[c]]
        if keys:
            a[t, keys] = torch.softmax((kh[keys] @ qh[r]) * scale, dim=0)
    return a


def token_blocks(cols: set, diags: set, n: int, bs: int) -> torch.Tensor:
    """Token mask (c kept or r - c kept, c <= r) -> block any, the obvious way."""
    p = math.ceil(n / bs)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    col = torch.zeros(n, dtype=torch.bool)
    col[list(cols)] = True
    dia = torch.zeros(n, dtype=torch.bool)
    dia[list(diags)] = True
    tm = (col[c] | dia[(r - c).clamp(0, n - 1)]) & (c <= r)
    padded = torch.zeros(p * bs, p * bs, dtype=torch.bool)
    padded[:n, :n] = tm
    return padded.view(p, bs, p, bs).any(3).any(1)


def index_sets(index):
    return {
        (b, h, i): set(index.indices[b, h, i, : int(index.counts[b, h, i])].tolist())
        for b in range(index.counts.shape[0])
        for h in range(index.counts.shape[1])
        for i in range(index.counts.shape[2])
    }


def bud(index, valid, hq):
    pairs = block_pair_counts(valid, valid.shape[0], index.seq_len, index.block_size)
    return float(computed_pairs(index, pairs, hq) / causal_pairs(pairs, hq))


# ------------------------------------------------------------------ xattention


def brute_xattention(q, k, valid, bs, stride, threshold, sinks, scale):
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    p = math.ceil(n / bs)
    nt = p * bs // stride
    out = {}
    for b in range(batch):
        tile_ok = [bool(valid[b, a * stride : min(n, (a + 1) * stride)].any()) if a * stride < n else False for a in range(nt)]
        fb = first_block_of(valid[b], bs)
        allowed = allowed_blocks(valid[b], bs, p)
        for h in range(hq):
            kh = k[b, h // group]
            mass = torch.zeros(p, p, dtype=torch.float64)
            for a in range(nt):
                if not tile_ok[a]:
                    continue
                cs = [c for c in range(a + 1) if tile_ok[c]]
                s = []
                for c in cs:
                    total = 0.0
                    for t in range(stride):
                        qi, ki = a * stride + stride - 1 - t, c * stride + t
                        if qi < n and ki < n:
                            total += float(q[b, h, qi] @ kh[ki])
                    s.append(total * scale / stride)
                probs = torch.softmax(torch.tensor(s, dtype=torch.float64), dim=0)
                for c, pr in zip(cs, probs):
                    mass[a * stride // bs, c * stride // bs] += pr
            for i in range(p):
                cands = {j: float(mass[i, j]) for j in range(p) if allowed[i][j]}
                if not cands:
                    out[b, h, i] = set()
                    continue
                forced = forced_set(i, fb, sinks, True) & set(cands)
                out[b, h, i] = set(cands) if threshold >= 1 else greedy(cands, threshold, forced)
    return out


@pytest.mark.parametrize(
    "seed,n,bs,stride,threshold,padded",
    [(0, 192, 16, 4, 0.9, False), (1, 203, 16, 8, 0.7, True), (2, 260, 32, 8, 0.85, True), (3, 97, 16, 16, 0.5, False)],
)
def test_xattention_tiles_match_brute_force(seed, n, bs, stride, threshold, padded):
    q, k, v = rand_qkv(2, 4, 2, n, 8, seed)
    valid = padding(2, n, 40 if padded else 0)
    cfg = XAttentionConfig(block_size=bs, stride=stride, threshold=threshold, dense_layers=())
    index = xattention.select(q, k, v, layer=3, config=cfg, scale=0.3, key_valid=valid if padded else None)
    check_index(index, valid)
    want = brute_xattention(q, k, valid, bs, stride, threshold, 1, 0.3)
    got = index_sets(index)
    assert got == want
    assert 0 < bud(index, valid, 4) < 1


def test_xattention_pooled_selection_on_pooled_logits():
    q, k, v = rand_qkv(2, 4, 2, 180, 8, 5)
    valid = padding(2, 180, 33)
    cfg = XAttentionConfig(block_size=16, stride=4, threshold=0.8, estimate="pooled", sink_blocks=2, dense_layers=())
    index = xattention.select(q, k, v, layer=3, config=cfg, scale=0.3, key_valid=valid)
    check_index(index, valid, sinks=2)
    logits = score.block_logits(q, k, v, block_size=16, stride=4, beta=0.0, scale=0.3, key_valid=valid).double()
    p = logits.shape[-1]
    for (b, h, i), got in index_sets(index).items():
        fb = first_block_of(valid[b], 16)
        allowed = allowed_blocks(valid[b], 16, p)[i]
        cands = [j for j in range(p) if allowed[j]]
        if not cands:
            assert got == set()
            continue
        probs = torch.softmax(logits[b, h, i, cands], dim=0)
        values = dict(zip(cands, probs.tolist()))
        assert got == greedy(values, 0.8, forced_set(i, fb, 2, True) & set(cands)), (b, h, i)


# ------------------------------------------------------------------ flexprefill


def brute_flexprefill(q, k, valid, cfg: FlexPrefillConfig, scale):
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    bs = cfg.block_size
    p = math.ceil(n / bs)
    rows = min(bs, n)
    out, divergence = {}, {}
    for b in range(batch):
        vb = valid[b]
        fb = first_block_of(vb, bs)
        ok = block_ok(vb, bs, p)
        allowed = allowed_blocks(vb, bs, p)
        row_valid = [bool(vb[n - rows + t]) for t in range(rows)]
        nrows = max(1, sum(row_valid))
        for h in range(hq):
            qh, kh = q[b, h], k[b, h // group]
            a = last_rows_softmax(qh, kh, vb, rows, scale)
            col = a.sum(0) / nrows
            diag = torch.zeros(n, dtype=torch.float64)
            for t in range(rows):
                r = n - rows + t
                for o in range(r + 1):
                    diag[o] += a[t, r - o] / nrows
            a_bar = torch.tensor([float(col[j * bs : (j + 1) * bs].sum()) for j in range(p)], dtype=torch.float64)
            q_last = sum(qh[n - rows + t] for t in range(rows) if row_valid[t]) / nrows
            k_bar = {j: kh[[c for c in range(j * bs, min(n, (j + 1) * bs)) if vb[c]]].mean(0) for j in range(p) if ok[j]}
            logits = torch.full((p,), float("-inf"), dtype=torch.float64)
            for j, kb in k_bar.items():
                logits[j] = float(q_last @ kb) * scale
            a_hat = torch.softmax(logits, dim=0)
            m = (a_hat + a_bar) / 2
            js = sum(0.5 * float(x * math.log(x / y)) for x, y in zip(a_hat, m) if x > 0)
            js += sum(0.5 * float(x * math.log(x / y)) for x, y in zip(a_bar, m) if x > 0)
            divergence[b, h] = math.sqrt(max(js, 0.0))

            valid_cols = {c: float(col[c]) for c in range(n) if vb[c]}
            ft = int(vb.to(torch.int8).argmax())
            diags = {o: float(diag[o]) for o in range(n - ft)}  # diagonals with a valid cell

            def vertical_slash(n_col, n_diag):
                if cfg.granularity == "block":
                    colb = {j: float(col[j * bs : (j + 1) * bs].sum()) for j in range(p) if ok[j]}
                    diagb = {m_: float(diag[m_ * bs : (m_ + 1) * bs].sum()) for m_ in range(p) if m_ * bs < n - ft}
                    cs, ds = top(colb, n_col, first=[fb]), top(diagb, n_diag, first=[0])
                    return torch.tensor([[j <= i and (j in cs or i - j in ds) for j in range(p)] for i in range(p)])
                return token_blocks(top(valid_cols, n_col), top(diags, n_diag), n, bs)

            if cfg.granularity == "block":
                floor = min(math.ceil(cfg.min_budget / bs), p)
                n_col = min(max(fewest(valid_cols, cfg.gamma) // bs + 1, floor), p)
                n_diag = min(max(fewest(diags, cfg.gamma) // bs + 1, floor), p)
            else:
                floor = min(cfg.min_budget, n)
                n_col = max(fewest(valid_cols, cfg.gamma), floor)
                n_diag = max(fewest(diags, cfg.gamma), floor)
            if divergence[b, h] < cfg.tau:  # query-aware
                keep = vertical_slash(floor, floor)
                q_bar = {i: qh[[c for c in range(i * bs, min(n, (i + 1) * bs)) if vb[c]]].mean(0) for i in range(p) if ok[i]}
                flat = {}
                for i in q_bar:
                    js_ = [j for j in range(p) if allowed[i][j]]
                    pr = torch.softmax(torch.tensor([float(q_bar[i] @ k_bar[j]) * scale for j in js_], dtype=torch.float64), dim=0)
                    flat.update({(i, j): float(x) for j, x in zip(js_, pr)})
                for i, j in top(flat, fewest(flat, cfg.gamma)):
                    keep[i, j] = True
            else:
                keep = vertical_slash(n_col, n_diag)
            for i in range(p):
                out[b, h, i] = ({j for j in range(p) if keep[i, j]} | forced_set(i, fb, 1, ok[i])) & {
                    j for j in range(p) if allowed[i][j]
                }
    return out, divergence


@pytest.mark.parametrize(
    "seed,n,bs,granularity,gamma,min_budget,padded",
    # gamma times the number of rows is never whole: a query-aware head pools its rows'
    # distributions (each sums to 1), so whole rows could tie with the target exactly.
    [
        (0, 192, 16, "block", 0.905, 32, False),
        (1, 233, 16, "token", 0.31, 4, True),
        (2, 300, 32, "block", 0.715, 64, True),
        (3, 170, 16, "token", 0.215, 4, False),
    ],
)
def test_flexprefill_matches_brute_force(seed, n, bs, granularity, gamma, min_budget, padded):
    q, k, v = structured_qkv(2, 4, 2, n, 8, seed)
    # Make half the heads smooth (small q): their pooled estimate is close -> query-aware.
    q[:, 1::2] *= 0.2
    valid = padding(2, n, 50 if padded else 0)
    key_valid = valid if padded else None
    base = FlexPrefillConfig(block_size=bs, gamma=gamma, min_budget=min_budget, granularity=granularity, dense_layers=())
    div = flexprefill.head_divergence(q, k, block_size=bs, scale=0.3, key_valid=key_valid)[0]
    # tau between the divergences, away from any of them, so both patterns occur
    values = sorted(div.flatten().tolist())
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]
    _, at = max(gaps[len(gaps) // 4 : 3 * len(gaps) // 4 + 1])
    cfg = dataclasses.replace(base, tau=(values[at] + values[at + 1]) / 2)
    index = flexprefill.select(q, k, v, layer=3, config=cfg, scale=0.3, key_valid=key_valid)
    check_index(index, valid)
    want, brute_div = brute_flexprefill(q, k, valid, cfg, 0.3)
    for (b, h), d in brute_div.items():
        assert div[b, h].item() == pytest.approx(d, abs=1e-9)
    classes = {d < cfg.tau for d in brute_div.values()}
    assert classes == {True, False}  # both head kinds exercised
    assert index_sets(index) == want
    assert 0 < bud(index, valid, 4) < 1


# ------------------------------------------------------------------ minference


def brute_minference(q, k, valid, cfg: MInferenceConfig, scale):
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    bs = cfg.block_size
    p = math.ceil(n / bs)
    rows = min(cfg.last_q, n)
    out = {}
    for b in range(batch):
        vb = valid[b]
        fb = first_block_of(vb, bs)
        ft = int(vb.to(torch.int8).argmax())
        ok = block_ok(vb, bs, p)
        allowed = allowed_blocks(vb, bs, p)
        for h in range(hq):
            a = last_rows_softmax(q[b, h], k[b, h // group], vb, rows, scale)
            vertical = {c: float(a[:, c].sum()) for c in range(n) if vb[c]}
            # diagonals with a valid cell (o <= n-1 - first valid token)
            slash = {o: sum(float(a[t, n - rows + t - o]) for t in range(rows) if n - rows + t - o >= 0) for o in range(n - ft)}
            n_col = min(n, max(round(cfg.vertical_size * cfg.budget_scale), cfg.sink_columns))
            n_diag = min(n, max(round(cfg.slash_size * cfg.budget_scale), cfg.local_diagonals))
            sink_cols = [c for c in range(ft, min(n, ft + cfg.sink_columns))]
            cols = top(vertical, n_col, first=sink_cols)
            diags = top(slash, n_diag, first=list(range(min(n - ft, cfg.local_diagonals))))
            keep = token_blocks(cols, diags, n, bs)
            for i in range(p):
                out[b, h, i] = ({j for j in range(p) if keep[i, j]} | forced_set(i, fb, 1, ok[i])) & {
                    j for j in range(p) if allowed[i][j]
                }
    return out


@pytest.mark.parametrize(
    "seed,n,bs,scale_,padded", [(0, 256, 16, 1.0, False), (1, 211, 16, 0.5, True), (2, 300, 32, 1.5, True), (3, 129, 16, 0.0, False)]
)
def test_minference_matches_brute_force(seed, n, bs, scale_, padded):
    q, k, v = structured_qkv(2, 4, 2, n, 8, seed)
    valid = padding(2, n, 60 if padded else 0)
    cfg = MInferenceConfig(
        block_size=bs, last_q=24, vertical_size=12, slash_size=20, sink_columns=5, local_diagonals=7,
        budget_scale=scale_, dense_layers=(),
    )
    index = minference.select(q, k, v, layer=3, config=cfg, scale=0.3, key_valid=valid if padded else None)
    check_index(index, valid)
    assert index_sets(index) == brute_minference(q, k, valid, cfg, 0.3)
    assert 0 < bud(index, valid, 4) < 1


@pytest.mark.parametrize("seed", range(6))
def test_vertical_slash_conversion_exact(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(20, 140, (1,), generator=g))
    bs = [4, 8, 16][seed % 3]
    cols = torch.rand(2, 3, n, generator=g) < 0.03
    diags = torch.rand(2, 3, n, generator=g) < 0.04
    got = blocks.vertical_slash_blocks(cols, diags, bs)
    for b in range(2):
        for h in range(3):
            want = token_blocks(set(cols[b, h].nonzero().flatten().tolist()), set(diags[b, h].nonzero().flatten().tolist()), n, bs)
            assert torch.equal(got[b, h], want)


def test_diagonal_sums_match_loops():
    g = torch.Generator().manual_seed(0)
    for rows, n in [(1, 7), (5, 5), (6, 23)]:
        a = torch.rand(2, rows, n, generator=g, dtype=torch.float64)
        got = blocks.diagonal_sums(a)
        for b in range(2):
            for o in range(n):
                want = sum(float(a[b, t, n - rows + t - o]) for t in range(rows) if n - rows + t - o >= 0)
                assert got[b, o].item() == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------ all methods: dense at full knob, BUD monotone


def small_config(name, **extra):
    """The method's defaults at block 16 on 100-500 tokens (sizes scaled down with the grid)."""
    method = METHODS[name]
    values = {"block_size": 16, "dense_layers": ()}
    if name == "flexprefill":
        values["min_budget"] = 32
    if name == "minference":
        values.update(last_q=32, vertical_size=20, slash_size=60, sink_columns=8, local_diagonals=16)
    return dataclasses.replace(method.defaults, **{**values, **extra})


# The block-selection methods whose knobs are declared alongside the peer methods.
KNOBBED = ["stem", "uniform", "sam", "stem-tpd", "streaming", "xattention", "flexprefill", "minference"]


def test_every_method_but_dense_has_a_knob_on_its_config():
    assert METHODS["dense"].knob is None
    for name in KNOBBED:
        knob = METHODS[name].knob
        assert isinstance(knob, Knob) and knob.low < knob.high and knob.increasing
        field = {f.name: f for f in dataclasses.fields(METHODS[name].defaults)}[knob.name]
        assert isinstance(field.default, int if knob.integer else float)
        for value in (knob.low, knob.high):  # both ends are valid settings
            dataclasses.replace(METHODS[name].defaults, **{knob.name: int(value) if knob.integer else value})


@pytest.mark.parametrize("name", KNOBBED)
def test_full_knob_equals_dense_and_bud_monotone(name):
    knob = METHODS[name].knob
    n, hq = 260, 4
    q, k, v = rand_qkv(2, hq, 2, n, 16, seed=11, dtype=torch.float32)
    valid = padding(2, n, 45)
    buds = []
    for t in torch.linspace(0, 1, 12).tolist():  # denser near low, where small P saturates early
        x = knob.low + (knob.high - knob.low) * t**3
        value = int(round(x)) if knob.integer else x
        index = METHODS[name].select(q, k, v, layer=3, config=small_config(name, **{knob.name: value}), scale=0.25, key_valid=valid)
        buds.append(bud(index, valid, hq))
    assert all(b1 <= b2 + 1e-12 for b1, b2 in zip(buds, buds[1:])), buds
    assert buds[0] < buds[-1] and len({round(b, 9) for b in buds}) >= 3, buds  # the knob really moves BUD
    assert buds[-1] >= (0.9 if name == "uniform" else 1.0 - 1e-12)  # uniform: k_start (1 + mu)/2 < P
    full = dataclasses.replace(small_config(name, **{knob.name: int(knob.high) if knob.integer else knob.high}), mu=1.0) if name in (
        "stem", "uniform", "sam", "stem-tpd") else small_config(name, **{knob.name: int(knob.high) if knob.integer else knob.high})
    index = METHODS[name].select(q, k, v, layer=3, config=full, scale=0.25, key_valid=valid)
    assert not index.full and bud(index, valid, hq) == pytest.approx(1.0)
    got = attend(q, k, v, index, scale=0.25, key_valid=valid)
    want = dense_attention(q, k, v, scale=0.25, key_valid=valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["xattention", "flexprefill", "minference"])
def test_estimate_once_choose_per_knob_equals_select(name):
    """The budget solver's split: one estimate, then choose at each knob value == select at it."""
    m = METHODS[name]
    q, k, v = rand_qkv(2, 4, 2, 230, 16, seed=4, dtype=torch.float32)
    valid = padding(2, 230, 37)
    estimated = m.estimate(q, k, v, layer=3, config=small_config(name), scale=0.25, key_valid=valid)
    for x in (m.knob.low, 0.5, 0.8, m.knob.high):
        cfg = small_config(name, **{m.knob.name: x})
        got = m.choose(estimated, seq_len=230, config=cfg, key_valid=valid)
        want = m.select(q, k, v, layer=3, config=cfg, scale=0.25, key_valid=valid)
        assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


# ------------------------------------------------------------------ configs and registry


@pytest.mark.parametrize(
    "cls,values,message",
    [
        (XAttentionConfig, {"threshold": 1.5}, "threshold=1.5"),
        (XAttentionConfig, {"threshold": -0.1}, "threshold=-0.1"),
        (XAttentionConfig, {"stride": 12}, "stride=12"),
        (XAttentionConfig, {"block_size": 16, "stride": 32}, "stride=32"),
        (XAttentionConfig, {"estimate": "exact"}, "estimate='exact'"),
        (XAttentionConfig, {"sink_blocks": -1}, "sink_blocks=-1"),
        (FlexPrefillConfig, {"gamma": 1.2}, "gamma=1.2"),
        (FlexPrefillConfig, {"tau": -1.0}, "tau=-1.0"),
        (FlexPrefillConfig, {"min_budget": -5}, "min_budget=-5"),
        (FlexPrefillConfig, {"granularity": "row"}, "granularity='row'"),
        (MInferenceConfig, {"budget_scale": -1.0}, "budget_scale=-1.0"),
        (MInferenceConfig, {"vertical_size": 2.5}, "vertical_size=2.5"),
        (MInferenceConfig, {"last_q": 0}, "last_q=0"),
        (MInferenceConfig, {"block_size": 100}, "block_size=100"),
    ],
)
def test_config_errors_name_the_value(cls, values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cls(**values)


def test_overrides_reach_the_new_methods():
    with pytest.raises(ConfigError, match="threshold=1.5"):
        build_configs(["xattention"], overrides=["xattention.threshold=1.5"])
    configs = build_configs(["xattention", "flexprefill", "minference"], overrides=["block_size=64", "gamma=0.8"])
    assert {c.block_size for c in configs.values()} == {64}
    assert configs["flexprefill"].gamma == 0.8
    assert configs["xattention"].threshold == 0.9 and configs["xattention"].stride == 8
    assert configs["minference"].vertical_size == 1000 and configs["minference"].slash_size == 6096


def test_stem_tpd_is_sam_under_the_ablation_name():
    tpd, sam = METHODS["stem-tpd"], METHODS["sam"]
    assert tpd.defaults == sam.defaults == StemConfig(beta=0.0)
    assert tpd.select is sam.select and tpd.knob == sam.knob
    assert tpd.attn_implementation == "stem_stem-tpd"
    assert "sam" in tpd.description


# ------------------------------------------------------------------ inside a tiny model


def tiny_llama(attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


FULL = {"xattention": {"threshold": 1.0}, "flexprefill": {"gamma": 1.0}, "minference": {"budget_scale": 1000.0}, "stem-tpd": {"k_start": 10_000, "mu": 1.0}}
SPARSE = {
    "xattention": {"stride": 4},
    "flexprefill": {"min_budget": 32, "gamma": 0.3},  # a random model attends flatly: 0.9 covers all
    "minference": {"last_q": 32, "vertical_size": 20, "slash_size": 40, "sink_columns": 8, "local_diagonals": 16},
    "stem-tpd": {"k_start": 3, "sink_blocks": 1, "window_blocks": 1},
}


@pytest.mark.parametrize("name", NEW)
def test_apply_in_tiny_model(name):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (2, 280), generator=g)
    mask = torch.ones(2, 280, dtype=torch.long)
    mask[1, :50] = 0
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        runtime = stem_cli.apply(model, name, block_size=16, dense_layers=[], **FULL[name])
        full = model(ids, attention_mask=mask).logits
        assert runtime.recorder.bud == pytest.approx(1.0) and runtime.recorder.calls == 3
        runtime = stem_cli.apply(model, name, block_size=16, dense_layers=[0], **SPARSE[name])
        sparse = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(full[mask.bool()], dense[mask.bool()], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(sparse).all()
    per_layer = runtime.recorder.per_layer()
    assert per_layer[0] == 1.0 and all(0 < per_layer[layer] < 1 for layer in (1, 2)), per_layer


def test_stem_tpd_loads_by_attn_implementation_name():
    stem_cli.integration.register()
    model = tiny_llama("stem_stem-tpd")
    assert model.config._attn_implementation == "stem_stem-tpd"
    with torch.no_grad():
        out = model(torch.randint(3, 300, (1, 200))).logits
    assert torch.isfinite(out).all()
