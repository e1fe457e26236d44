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
from stem_cli.methods import blocks, xattention
from stem_cli.methods.estimate_path import estimate_path
from stem_cli.methods.xattention import XAttentionConfig

pytest.importorskip("triton")
from stem_cli.kernels import coverage_select, xattn_mass  # noqa: E402

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


def test_estimate_impl_is_checked_and_said(monkeypatch):
    with pytest.raises(ConfigError, match="estimate_impl='fast' is not allowed"):
        XAttentionConfig(estimate_impl="fast")
    assert estimate_path(XAttentionConfig(), torch.device("cpu")) == "torch"  # auto on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="estimate_impl='triton' needs a CUDA device"):
        estimate_path(XAttentionConfig(estimate_impl="triton"), torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="cannot run xattention at block_size / stride = 256"):
        xattention.mass_path(XAttentionConfig(block_size=256, stride=1, estimate_impl="triton"), torch.device("cpu"))
