"""kernels/prhs_select.py (run in the Triton interpreter on the CPU) against the PyTorch definitions in
stem_cli/decode: the anchor scoring + chunked top-k equals softmax / mean / masked_fill / topk_rows on the
active rows (with lo > 0, freezing, padding, several merge levels), and sort_rows equals compact / dedupe."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from stem_cli.decode.common import NEG_INF, dedupe, softmax_rows, topk_rows  # noqa: E402
from stem_cli.decode.prhs import compact  # noqa: E402
from stem_cli.kernels import prhs_select  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_anchor_topk(q, k, active, *, lo, scale, key_valid, start, freeze_end, sink_end, excl_end, window_start, sinks, k_rows, width):
    """The definition (prhs.select's anchor branch), float64."""
    b, h, g, d = q.shape
    t = k.shape[2]
    logits = torch.einsum("bhgd,bhtd->bhgt", q.double(), k[:, :, lo:].double()).flatten(0, 1) * scale
    pos = torch.arange(lo, t)
    flat_b = torch.arange(b * h) // h
    valid = torch.ones(b, t, dtype=torch.bool) if key_valid is None else key_valid
    logits = logits.masked_fill(~valid[flat_b, None, lo:], NEG_INF)
    if freeze_end is not None:
        logits = logits.masked_fill((pos < freeze_end[:, None])[:, None, :], NEG_INF)
    p = softmax_rows(logits)
    rank = pos[None, :] - start[flat_b, None]
    forced = ((rank >= 0) & (rank < sinks)) | (pos >= window_start)[None, :]
    excluded = (pos >= sink_end[:, None]) & (pos < excl_end[:, None])
    cand = valid[flat_b, lo:] & ~forced & ~excluded
    ranked = topk_rows(p.mean(1).masked_fill(~cand, NEG_INF), k_rows, width)
    return torch.where(ranked >= 0, ranked + lo, ranked), logits, p


def as_sorted_sets(x):
    return [sorted(v for v in row.tolist() if v >= 0) for row in x]


@pytest.mark.parametrize(
    "t,lo,width,padded,freeze",
    [(300, 0, 40, False, False), (3000, 0, 100, True, False), (2600, 37, 20, True, True), (9000, 5, 8, False, True),
     (17000, 3, 1000, False, False)],  # 17000: 5 chunks -> 2 nodes (one of a single chunk) -> 1: two merge levels
)
def test_anchor_topk_equals_the_torch_definition(t, lo, width, padded, freeze, monkeypatch):
    if t == 3000:  # lse from 3 scoring parts two at a time: the online combination over several tiles
        monkeypatch.setattr(prhs_select, "LSE_TILE", 2)
    g = torch.Generator().manual_seed(t + lo)
    b, h, grp, d = 2, 3, 4, 32
    q = torch.randn(b, h, grp, d, generator=g) * 2
    k = torch.randn(b, h, t + 9, d, generator=g)[:, :, :t]  # a strided view of a longer buffer
    rows = b * h
    active = torch.tensor([True, False, True, True, True, False])
    key_valid = None
    start = torch.zeros(b, dtype=torch.long)
    if padded:
        key_valid = torch.ones(b, t, dtype=torch.bool)
        key_valid[1, :53] = False
        start[1] = 53
    sinks, window = 4, 16
    ws = t - window
    sink_end = (start + sinks).repeat_interleave(h)
    excl_end = sink_end + torch.randint(0, t // 5, (rows,), generator=g)
    freeze_end = excl_end.clone() if freeze else None
    k_rows = torch.randint(width // 2, width + 1, (rows,), generator=g)
    args = dict(lo=lo, scale=0.3, key_valid=key_valid, start=start, freeze_end=freeze_end, sink_end=sink_end,
                excl_end=excl_end, window_start=ws, sinks=sinks, k_rows=k_rows, width=width)
    want, want_logits, p = torch_anchor_topk(q, k, active, **args)
    dev = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    got, logits, lse = prhs_select.anchor_topk(dev(q), dev(k), dev(active), **{key: dev(v) for key, v in args.items()})
    got, logits, lse = got.cpu(), logits.cpu(), lse.cpu()
    keep, chunk, levels = prhs_select.topk_plan(t - lo, width)
    assert got.shape == want.shape
    assert (got[~active] == -1).all()
    # ranked best first, position for position (float32 in the kernel vs float64 here: no near-ties at these sizes)
    assert torch.equal(got[active], want[active]), (levels, got[active][:, :8], want[active][:, :8])
    torch.testing.assert_close(logits[active], want_logits[active].float(), rtol=1e-4, atol=1e-4)
    want_lse = torch.logsumexp(want_logits, -1)
    torch.testing.assert_close(lse[active].double(), want_lse[active], rtol=1e-5, atol=1e-5)
    if t >= 9000:
        assert len(levels) >= 2  # the merge level ran
    if t >= 17000:
        assert levels == [5, 2, 1]


def test_chunked_topk_plan_is_exact_and_bounded():
    keep, chunk, levels = prhs_select.topk_plan(131072, 956)
    assert keep == 1024 and chunk == 4096 and levels[0] == 32 and levels[-1] == 1
    assert all(nxt == -(-cur * keep // chunk) for cur, nxt in zip(levels, levels[1:]))
    assert prhs_select.topk_plan(10**6, prhs_select.MAX_KEEP + 1) is None


@pytest.mark.parametrize("n,width", [(7, 5), (300, 300), (1000, 64), (40, 100)])
def test_sort_rows_equals_compact_and_dedupe(n, width):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-1, n // 2 + 2, (5, n), generator=g)
    x[0] = -1
    got = prhs_select.sort_rows(x.to(DEVICE), width).cpu()
    assert torch.equal(got, compact(x, width))
    got = prhs_select.sort_rows(x.to(DEVICE), width, dedupe=True).cpu()
    assert torch.equal(got, compact(dedupe(x), width))
    assert prhs_select.sort_rows(x.to(DEVICE), width, dedupe=True).shape == (5, width)
