"""The pre-fill benchmark (tests/bench/prefill.py) on the CPU: the smoke run end to end (kernels interpreted)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")
from tests.bench import prefill  # noqa: E402


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU smoke run needs the Triton interpreter")
def test_smoke_run_checks_times_and_writes_json_and_png(tmp_path):
    code = prefill.main(["--device", "cpu", "--smoke", "--lengths", "256", "--output", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("prefill-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and not report["failures"]
    assert report["checks"]["selection_kernel"]["ok"] and report["checks"]["scoring_kernel"]["ok"]
    (row,) = report["rows"]
    for key in ("score_torch_ms", "score_triton_ms", "select_torch_ms", "select_triton_ms", "attn_ms",
                "stem_total_torch_ms", "stem_total_triton_ms"):
        assert isinstance(row[key], float) and row[key] > 0, key
    assert row["check_select_rows_identical"] == 1.0
    for peer in prefill.PEERS:
        assert isinstance(row[f"{peer}_estimate_fused_ms"], float) and isinstance(row[f"{peer}_estimate_torch_ms"], float)
        assert row[f"check_{peer}_rows_identical"] == 1.0
    assert row["cudnn_ms"].startswith("n/a")
    # The FP8 kernel runs in the interpreter; its output against the (reference) attention on the same index.
    assert isinstance(row["attn_fp8_ms"], float) and isinstance(row["attn_fp8_qk_ms"], float)
    assert 0 < row["check_fp8_rel_err"] < 0.1 and row["check_fp8_rel_err"] <= row["check_fp8_worst_row_rel_err"]
    assert 0 < row["check_fp8_qk_rel_err"] < row["check_fp8_rel_err"]
    assert (tmp_path / path.with_suffix(".png").name).stat().st_size > 1000
    check_attention_variants(row)


def check_attention_variants(row):
    """The per-KV-head index through the current path and the GQA-packed kernel (interpreted), checked and timed."""
    for key in ("attn_kv_ms", "attn_packed_ms", "attn_packed_lf_ms"):
        assert isinstance(row[key], float) and row[key] > 0, key
        assert row[key.replace("_ms", "_tflops")] > 0 and row[key.replace("_ms", "_tflops_over_cudnn")].startswith("n/a")
    assert 0 < row["kv_bud"] <= 1 and row["kv_computed_pairs"] > 0
    for name in ("packed", "packed_lf"):  # against the reference on the CPU, float32 operands
        assert row[f"check_{name}_ok"] and row[f"check_{name}_rel_err"] < 1e-5
    assert row["flex_triton_kv_ms"].startswith("n/a")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU smoke run needs the Triton interpreter")
def test_attention_only_run_times_the_variants(tmp_path, capsys):
    code = prefill.main(["--device", "cpu", "--smoke", "--only", "attn", "--lengths", "200", "--output", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("prefill-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and not report["failures"] and report["checks"] == {}
    (row,) = report["rows"]
    check_attention_variants(row)
    assert row["score_torch_ms"].startswith("n/a") and row["attn_fp8_ms"].startswith("n/a")
    assert "xattention_estimate_fused_ms" in row and row["xattention_estimate_fused_ms"].startswith("n/a")
    assert "attn_packed_tflops_over_cudnn" in capsys.readouterr().out


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU smoke run needs the Triton interpreter")
def test_peers_only_run_checks_and_times_the_fused_estimates(tmp_path):
    code = prefill.main(["--device", "cpu", "--smoke", "--only", "peers", "--lengths", "200", "--output", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("prefill-peers-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and not report["failures"] and report["checks"]["peer_estimates"]["ok"]
    assert set(report["checks"]) == {"peer_estimates"}  # Stem's kernel checks are left to the full run
    (row,) = report["rows"]
    for peer in prefill.PEERS:
        assert row[f"{peer}_estimate_fused_ms"] > 0 and row[f"check_{peer}_rows_identical"] == 1.0
        assert row[f"{peer}_estimate_only_fused_ms"] > 0
        assert row[f"{peer}_over_stem_estimate"] > 0
    assert "attn_ms" not in row and "cudnn_ms" not in row  # attention and baselines not run
