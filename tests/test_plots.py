"""plot_profile writes a readable PNG of the expected size, and refuses an empty profile."""

from __future__ import annotations

import matplotlib.image
import pytest

from stem_cli.report.plots import plot_profile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows_2x3() -> list[dict]:
    rows = []
    for n in (8192, 32768, 131072):
        dense = n * n / 2e7
        rows.append(dict(method="dense", seq_len=n, attention_ms=dense, estimation_ms=0.0,
                         other_ms=5.0, e2e_ms=dense + 5.0, speedup=None))
        if n == 131072:
            rows.append(dict(method="stem", seq_len=n, status="OOM"))
        else:
            attention, estimation = dense / 6, n / 800
            e2e = attention + estimation + 5.0
            rows.append(dict(method="stem", seq_len=n, attention_ms=attention, estimation_ms=estimation,
                             other_ms=5.0, e2e_ms=e2e, speedup=(dense + 5.0) / e2e))
    return rows


def test_png_written_with_expected_size(tmp_path):
    path = plot_profile(rows_2x3(), tmp_path / "sub" / "profile.png", "SmolLM2 pre-fill")
    assert path == tmp_path / "sub" / "profile.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (12 * 120, 5 * 120)


@pytest.mark.parametrize(
    "rows",
    [
        [dict(method="dense", seq_len=4096, attention_ms=3.0, estimation_ms=0.0, other_ms=1.0, e2e_ms=4.0, speedup=None)],
        [dict(method="dense", seq_len=65536, status="OOM"), dict(method="stem", seq_len=65536, status="error: CUDA")],
        [dict(method="stem", seq_len=1000, attention_ms=None, estimation_ms=1.0, other_ms=0.0, speedup=2.0, status="ok")],
    ],
    ids=["one-dense-row", "all-failed", "odd-length-missing-part"],
)
def test_edge_cases_still_render(tmp_path, rows):
    path = plot_profile(rows, str(tmp_path / "p.png"), "edge")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_empty_rows_rejected(tmp_path):
    with pytest.raises(ValueError, match="no result rows"):
        plot_profile([], tmp_path / "p.png", "empty")
    assert not (tmp_path / "p.png").exists()


def test_an_eval_with_fidelity_draws_error_by_query_position(tmp_path):
    import stem_cli

    run = stem_cli.evaluate("tiny-llama", ["fidelity"], "dense,stem,streaming", "600", limit=1, output=tmp_path, device="cpu",
                            random_weights=True, overrides=["block_size=16", "dense_layers=[0]", "k_start=4"])
    rows = [r for r in run.rows if r["task"] == "fidelity"]
    assert all(len(r["position_rel_error"]) == 17 for r in rows)
    stem = next(r for r in rows if r["method"] == "stem")
    assert stem["tail_rel_error"] > 1e-3 and next(r for r in rows if r["method"] == "dense")["tail_rel_error"] < 1e-6
    png = run.paths["fidelity_png"]
    assert png.name.endswith("-fidelity.png") and png.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (1440, 600)


def test_fidelity_plot_needs_position_curves(tmp_path):
    from stem_cli.report.plots import plot_fidelity_positions

    with pytest.raises(ValueError, match="no fidelity rows"):
        plot_fidelity_positions([{"method": "stem", "seq_len": 600}], tmp_path / "x.png", "t")
