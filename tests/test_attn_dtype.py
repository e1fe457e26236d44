"""attn_dtype (StemConfig): the value's checks, the device checks, and the path from --set to the executor."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

import stem_cli
from stem_cli import executor, integration
from stem_cli.cli import app
from stem_cli.config import ConfigError, StemConfig, parse_overrides, replace
from stem_cli.index import BlockIndex
from tests.test_integration import SPARSE, random_ids, tiny
from tests.test_runs import ENV, SMALL

pytest.importorskip("triton")
from stem_cli.kernels import block_sparse_attn_fp8 as fp8  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def no_interpreter(monkeypatch):
    """The CPU as it is outside TRITON_INTERPRET=1, whatever this test run set."""
    monkeypatch.setattr(fp8, "INTERPRET", False)


def test_attn_dtype_values():
    assert StemConfig().attn_dtype == "bf16"
    ((_, name, value),) = parse_overrides(["attn_dtype=fp8"])
    assert replace(StemConfig(), {name: value}, "stem").attn_dtype == "fp8"
    with pytest.raises(ConfigError, match=r"attn_dtype='fp16' is not allowed: use 'bf16', 'fp8'"):
        StemConfig(attn_dtype="fp16")
    with pytest.raises(ConfigError, match=r"attn_dtype='int8' is not allowed: use 'bf16', 'fp8'"):
        executor.check_attn_dtype("int8", "cpu")


@pytest.mark.parametrize("capability,ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_needs_compute_capability_8_9(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if ok:
        executor.check_attn_dtype("fp8", torch.device("cuda"))
        return
    with pytest.raises(ConfigError, match=rf"compute capability >= 8.9.*this GPU has {capability[0]}\.{capability[1]}.*use attn_dtype=bf16"):
        executor.check_attn_dtype("fp8", torch.device("cuda"))


def test_fp8_on_the_cpu_outside_the_interpreter_is_an_error_not_a_bf16_run(no_interpreter):
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    index = BlockIndex.from_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool).tril(), 16, 64)
    with pytest.raises(ConfigError, match="attn_dtype='fp8' cannot run here: .*not on cpu"):
        executor.attend(q, k, v, index, scale=0.25, attn_dtype="fp8")
    executor.attend(q, k, v, index, scale=0.25)  # bf16 (the default) runs


def test_the_config_value_reaches_the_executor(monkeypatch):
    """Runtime.attend hands the method's attn_dtype to the executor on every sparse layer."""
    seen = []

    def spy(*args, attn_dtype="bf16", **kwargs):
        seen.append(attn_dtype)
        return executor.attend(*args, **kwargs)  # bf16 on the CPU: only the routing is under test here

    monkeypatch.setattr(integration, "attend", spy)
    model = tiny("llama")
    stem_cli.apply(model, "stem", **SPARSE, attn_dtype="fp8")
    with torch.no_grad():
        model(random_ids(1, 64))
    assert seen == ["fp8"] * 4


@pytest.mark.skipif(not INTERPRETED, reason="the FP8 kernel runs on the CPU only under TRITON_INTERPRET=1")
def test_fp8_runs_the_fp8_kernel_in_a_model_and_stays_close_to_bf16(monkeypatch):
    calls = []
    kernel = fp8.block_sparse_attention
    monkeypatch.setattr(fp8, "block_sparse_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    model = tiny("llama")
    ids = random_ids(1, 80)
    with torch.no_grad():
        stem_cli.apply(model, "stem", **SPARSE)
        want = model(ids).logits
        runtime = stem_cli.apply(model, "stem", **SPARSE, attn_dtype="fp8")
        got = model(ids).logits
    assert len(calls) == 4 and runtime.recorder.bud < 1  # every (sparse) layer ran the FP8 kernel
    assert not torch.equal(got, want)  # really rounded
    assert (got - want).norm() / want.norm() < 0.05


def test_compare_refuses_fp8_on_the_cpu_before_any_work(no_interpreter, tmp_path):
    with pytest.raises(ConfigError, match=r"stem: attn_dtype='fp8' cannot run here: .*not on cpu"):
        stem_cli.compare("tiny-llama", ["stem"], tasks=["ruler/niah_single_1"], lengths="600", limit=1, max_new_tokens=3,
                         overrides=[*SMALL, "attn_dtype=fp8"], output=tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*.jsonl")) or all(p.stat().st_size == 0 for p in tmp_path.rglob("*.jsonl"))
    args = ["compare", "stem", "--model", "tiny-llama", "--task", "ruler/niah_single_1", "--seq-len", "600", "--limit", "1",
            "--max-new-tokens", "3", *[x for s in [*SMALL, "attn_dtype=fp8"] for x in ("--set", s)], "--device", "cpu",
            "--output", str(tmp_path / "cli")]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 2, result.output
    assert "attn_dtype='fp8' cannot run here" in " ".join(result.output.split())
