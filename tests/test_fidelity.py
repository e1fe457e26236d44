"""tasks/fidelity.py: per-layer fidelity of a method's attention against dense attention."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from stem_cli.kernels import reference as ref
from stem_cli.tasks import fidelity
from stem_cli.tasks.base import Sample
from transformers import AutoModelForCausalLM, LlamaConfig

from stem_cli.config import replace
from stem_cli.index import BlockIndex
from stem_cli.hook import HANDLER_ATTR
from stem_cli.registry import get_method
from stem_cli.models import byte_tokenizer

COMMON = {
    "vocab_size": 300, "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 6,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
SPARSE = {"block_size": 16, "dense_layers": [], "k_start": 3, "sink_blocks": 1, "window_blocks": 1}
FULL = {"block_size": 16, "dense_layers": [], "k_start": 10_000, "mu": 1.0}


def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**COMMON), attn_implementation="sdpa").eval()


def ids(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, n), generator=g)


def cfg(method, **params):
    return replace(get_method(method).defaults, params, method)


def sample(input_ids):
    return Sample("fidelity/x/0/0", "fidelity", input_ids.shape[1], input_ids[0].tolist(), [], "", 0)


@pytest.mark.parametrize("method,params", [("stem", FULL), ("sam", FULL), ("uniform", FULL), ("dense", {})])
def test_full_budget_is_exact(method, params):
    model = tiny()
    rec = fidelity.measure(model, method, cfg(method, **params), sample(ids()))
    assert rec["bud"] == pytest.approx(1.0)
    assert rec["layers"] == [0, 1, 2, 3]
    assert max(max(h) for h in rec["rel_error_per_head"]) < 1e-5
    assert max(max(h) for h in rec["delta_per_head"]) < 1e-6
    assert max(max(h) for h in rec["delta_oracle_per_head"]) < 1e-5
    assert rec["recall"] == 1.0 and rec["recall_sparse"] is None and rec["sparse_rows"] == 0
    # the model is left as it was found
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, HANDLER_ATTR) for m in model.modules())


def _brute(q, k, v, index, scale, bs):
    """Float64 loops: per head, rel error, mean dropped mass, recall of dense top blocks."""
    q, k, v = q.double()[0], k.double()[0], v.double()[0]
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    per_index_head = hq // index.num_heads
    kept_blocks = index.to_mask()[0]  # (H_index, P, P)
    p = index.num_blocks
    rel, delta, recall = [], [], []
    for h in range(hq):
        kh, vh = k[h // group], v[h // group]
        sel = kept_blocks[h // per_index_head]
        err = norm = drop = 0.0
        mass = torch.zeros(p, p, dtype=torch.float64)
        for t in range(n):
            s = (kh[: t + 1] @ q[h, t]) * scale
            pd = torch.softmax(s, 0)
            key_block = torch.arange(t + 1) // bs
            keep = sel[t // bs][key_block]
            pm = torch.softmax(s.masked_fill(~keep, -math.inf), 0)
            od, om = pd @ vh[: t + 1], pm @ vh[: t + 1]
            err += float(((om - od) ** 2).sum())
            norm += float((od**2).sum())
            drop += 1.0 - float(pd[keep].sum())
            mass[t // bs].index_add_(0, key_block, pd)
        rel.append(math.sqrt(err / norm))
        delta.append(drop / n)
        rows = []
        for i in range(p):
            chosen = set(torch.nonzero(sel[i]).flatten().tolist())
            top = set(sorted(range(p), key=lambda j: -float(mass[i, j]))[: len(chosen)])
            rows.append(len(chosen & top) / len(chosen))
        recall.append(sum(rows) / len(rows))
    return rel, delta, recall


@pytest.mark.parametrize("gqa", ["query", "kv"])
def test_layer_equals_float64_bruteforce(gqa):
    model = tiny()
    x = ids(200)
    config = cfg("stem", **SPARSE, gqa=gqa)
    probe = fidelity.run_fidelity(model, "stem", config, x, capture_layers=(2,))
    rec = fidelity.summarize(probe)
    cap = probe.captured[2]
    index = cap["index"]
    assert not index.full and index.num_heads == (6 if gqa == "query" else 2)
    rel, delta, recall = _brute(cap["q"], cap["k"], cap["v"], index, cap["scale"], 16)
    torch.testing.assert_close(torch.tensor(rec["rel_error_per_head"][2], dtype=torch.float64), torch.tensor(rel, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(rec["delta_per_head"][2], dtype=torch.float64), torch.tensor(delta, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(rec["recall_per_head"][2], dtype=torch.float64), torch.tensor(recall, dtype=torch.float64))
    assert 0 < rec["bud"] < 1 and rec["recall"] < 1 and rec["delta"] > rec["delta_oracle"] - 1e-9

    # The method's output is the reference executor's (float64): the same relative error.
    q, k, v = (cap[n].double() for n in "qkv")
    o_m = ref.block_sparse_attention(q, k, v, index, scale=cap["scale"])
    o_d = ref.block_sparse_attention(q, k, v, BlockIndex.full_causal(1, 2, 200, 16), scale=cap["scale"])
    by_ref = ((o_m - o_d).norm(dim=(-1, -2)) / o_d.norm(dim=(-1, -2)))[0]
    torch.testing.assert_close(torch.tensor(rec["rel_error_per_head"][2], dtype=torch.float64), by_ref, rtol=1e-4, atol=1e-7)


def test_every_layer_sees_the_dense_stream():
    """The fidelity forward hands dense outputs on: a sparse method's layer-3 inputs equal the dense run's."""
    model = tiny()
    x = ids(160)
    sparse = fidelity.run_fidelity(model, "stem", cfg("stem", **SPARSE), x, capture_layers=(3,))
    dense = fidelity.run_fidelity(model, "dense", None, x, capture_layers=(3,))
    torch.testing.assert_close(sparse.captured[3]["q"], dense.captured[3]["q"])
    torch.testing.assert_close(sparse.captured[3]["v"], dense.captured[3]["v"])
    assert fidelity.summarize(sparse)["rel_error"] > 1e-3


def test_delta_is_one_minus_kept_mass_with_padding():
    """Random float64 q/k/v, a random causal block index, left padding, a tail block; chunked."""
    torch.manual_seed(3)
    b, hq, hkv, n, d, bs = 2, 4, 2, 70, 8, 8
    q, k, v = torch.randn(b, hq, n, d, dtype=torch.float64), torch.randn(b, hkv, n, d, dtype=torch.float64), torch.randn(b, hkv, n, d, dtype=torch.float64)
    p = -(-n // bs)
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    mask = (torch.rand(b, hq, p, p) < 0.4) & causal
    mask |= torch.eye(p, dtype=torch.bool)
    index = BlockIndex.from_mask(mask, bs, n)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :13] = False  # left padding of sequence 1
    res = fidelity.layer_fidelity(q, k, v, index, scale=0.3, key_valid=valid, chunk_bytes=hq * b * p * bs * 8 * 2)
    for bi in range(b):
        rows = [t for t in range(n) if valid[bi, t]]
        for h in range(hq):
            drops = []
            for t in rows:
                keys = [j for j in range(t + 1) if valid[bi, j]]
                s = torch.stack([q[bi, h, t] @ k[bi, h // 2, j] * 0.3 for j in keys])
                pr = torch.softmax(s, 0)
                kept = sum(float(pr[a]) for a, j in enumerate(keys) if mask[bi, h, t // bs, j // bs])
                drops.append(1.0 - kept)
            assert float(res.delta_sum[bi, h]) / float(res.rows[bi]) == pytest.approx(sum(drops) / len(drops), abs=1e-12)
    assert res.rows.tolist() == [70, 57]
    # output of the dense path equals the reference over valid rows
    o_d = ref.block_sparse_attention(q, k, v, BlockIndex.full_causal(b, hkv, n, bs), scale=0.3, key_valid=valid)
    torch.testing.assert_close(res.dense_out[1, :, 13:], o_d[1, :, 13:])
    torch.testing.assert_close(res.dense_out[0], o_d[0])


def test_recall_on_a_hand_made_attention_map():
    mass = torch.tensor(
        [
            [0.50, 0.30, 0.20, 0.00],  # keep {0, 2}: top-2 = {0, 1} -> 1/2
            [0.40, 0.30, 0.30, 0.00],  # keep {0, 2}: 0.3 ties with block 1 -> 1 (ties in the method's favour)
            [0.10, 0.20, 0.30, 0.40],  # keep {0}: top-1 = {3} -> 0
            [0.25, 0.25, 0.25, 0.25],  # keep all -> 1
            [0.70, 0.10, 0.10, 0.10],  # keep {1, 2, 3}: top-3 = {0, and two of the ties} -> 2/3
        ],
        dtype=torch.float64,
    )
    selected = torch.tensor(
        [[1, 0, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool
    )
    recall, top = fidelity.top_block_recall(mass, selected)
    torch.testing.assert_close(recall, torch.tensor([0.5, 1.0, 0.0, 1.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(top, torch.tensor([0.8, 0.7, 0.4, 1.0, 0.9], dtype=torch.float64))


@pytest.mark.parametrize("source", ["needle", "ruler"])
def test_build_samples_contract_and_determinism(source, monkeypatch):
    if source == "ruler" and importlib.util.find_spec("stem_cli.tasks.ruler") is None:
        pytest.skip("tasks/ruler.py not present")
    monkeypatch.setattr(fidelity, "PROMPT_SOURCE", source)
    tok = byte_tokenizer()
    a = fidelity.build_samples(tok, 700, seed=1, limit=2)
    b = fidelity.build_samples(tok, 700, seed=1, limit=2)
    assert [s.id for s in a] == ["fidelity/700/1/0", "fidelity/700/1/1"]
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert a[0].input_ids != a[1].input_ids
    for s in a:
        assert s.task == "fidelity" and s.references == [] and s.metric == "" and s.max_new_tokens == 0
        assert 600 <= len(s.input_ids) <= 700 and s.meta["source"] == source


def test_aggregate_and_table_rows():
    def rec(rel, delta, recall, rows, computed, causal):
        return {
            "rel_error": rel, "delta": delta, "delta_oracle": delta / 2, "recall": recall, "recall_sparse": None,
            "rows": rows, "block_rows": rows / 10, "sparse_rows": 0, "pairs_computed": computed, "pairs_causal": causal,
            "layers": [0], "rel_error_per_head": [[rel]], "delta_per_head": [[delta]], "delta_oracle_per_head": [[delta / 2]],
            "recall_per_head": [[recall]], "bud_per_layer": [computed / causal], "seconds": 1.0,
        }

    records = [rec(0.1, 0.2, 0.5, 100, 10, 100), rec(0.3, 0.4, 1.0, 300, 90, 100)]
    agg = fidelity.aggregate(records)
    assert agg["score"] == agg["rel_error"] == pytest.approx(0.2)
    assert agg["delta"] == pytest.approx((0.2 * 100 + 0.4 * 300) / 400)
    assert agg["recall"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert agg["bud"] == pytest.approx(0.5)
    assert agg["rel_error_per_head"] == [[pytest.approx(0.2)]]
    rows = fidelity.table_rows({"stem": records, "sam": records[:1]})
    assert [r["method"] for r in rows] == ["stem", "sam"]
    assert rows[1]["rel_error"] == pytest.approx(0.1) and rows[1]["bud"] == pytest.approx(0.1)
    assert fidelity.HIGHER_IS_BETTER is False and fidelity.DESCRIPTION


def test_kept_mass_below_float32_range_is_exact():
    """A dropped sink 120 logits above every kept key: exp(s - rowmax) underflows to 0 in
    float32 for the kept keys, and the exact fallback must still give the sparse output."""
    torch.manual_seed(5)
    n, d, bs = 32, 4, 8
    q = torch.randn(1, 1, n, d) * 0.1
    k = torch.randn(1, 1, n, d) * 0.1
    v = torch.randn(1, 1, n, d)
    q[..., 0] = 1.0
    k[0, 0, 0, 0] = 120.0  # key 0 dominates every row
    mask = torch.eye(4, dtype=torch.bool)[None, None].clone()
    mask[..., :3, 0] = True  # rows of blocks 0-2 keep block 0; block 3 keeps only itself
    index = BlockIndex.from_mask(mask, bs, n)
    res = fidelity.layer_fidelity(q, k, v, index, scale=1.0)
    o_m = ref.block_sparse_attention(q.double(), k.double(), v.double(), index, scale=1.0)
    o_d = ref.block_sparse_attention(q.double(), k.double(), v.double(), BlockIndex.full_causal(1, 1, n, bs), scale=1.0)
    expected = float((o_m - o_d).norm() / o_d.norm())
    assert float(res.per_head()["rel_error"][0]) == pytest.approx(expected, rel=1e-5)
    assert float(res.delta_sum[0, 0]) == pytest.approx(8.0, abs=1e-6)  # block 3's 8 rows drop all their mass


def test_error_and_dropped_mass_by_query_position_equal_a_row_by_row_float64_count():
    """Random float64 q/k/v (GQA 2), a random causal block index, 200 rows in small chunks: each position bin's
    relative error and mean dropped mass, and the last TAIL_ROWS rows', equal a direct float64 count."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    n, bs, d = 203, 16, 8
    q, k, v = (torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    p = -(-n // bs)
    mask = (torch.rand(1, 4, p, p, generator=g) < 0.4) | torch.eye(p, dtype=torch.bool)
    index = BlockIndex.from_mask(mask & torch.ones(p, p, dtype=torch.bool).tril(), bs, n)
    res = fidelity.layer_fidelity(q, k, v, index, scale=0.3, chunk_bytes=1)  # one block of rows per chunk
    heads = res.per_head()

    o_m = ref.block_sparse_attention(q, k, v, index, scale=0.3)
    o_d = ref.block_sparse_attention(q, k, v, BlockIndex.full_causal(1, 4, n, bs), scale=0.3)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    keep = mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n, :n]
    dropped = (s * ~keep).sum(-1)[0]  # (Hq, N)
    err, base = ((o_m - o_d) ** 2).sum(-1)[0], (o_d**2).sum(-1)[0]
    t = torch.arange(n)
    groups = [t * fidelity.POSITION_BINS // n == b for b in range(fidelity.POSITION_BINS)] + [t >= n - fidelity.TAIL_ROWS]
    want_rel = [[math.sqrt(err[h, m].sum() / base[h, m].sum()) for m in groups] for h in range(4)]
    want_delta = [[float(dropped[h, m].mean()) for m in groups] for h in range(4)]
    assert heads["position_rel_error"] == [[pytest.approx(x, rel=1e-9) for x in row] for row in want_rel]
    assert heads["position_delta"] == [[pytest.approx(x, rel=1e-9, abs=1e-12) for x in row] for row in want_delta]
    assert max(max(r) for r in want_delta) > 0.05  # the index drops real mass: the check is not of zeros


def test_a_run_reports_the_tail_and_the_curve_over_positions():
    model = tiny()
    rec = fidelity.measure(model, "stem", cfg("stem", **SPARSE), sample(ids(300)))
    assert rec["position_bins"] == fidelity.POSITION_BINS and len(rec["position_rel_error"]) == fidelity.POSITION_BINS + 1
    assert rec["position_rel_error"][0] == pytest.approx(0.0, abs=1e-6)  # the first rows keep every causal block
    assert rec["position_rel_error"][-1] > 1e-3 and rec["position_delta"][-1] > 0
    agg = fidelity.aggregate([rec, rec])
    assert agg["tail_rel_error"] == pytest.approx(rec["position_rel_error"][-1])
    assert fidelity.table_rows({"stem": [rec]})[0]["tail_delta"] == pytest.approx(rec["position_delta"][-1])
