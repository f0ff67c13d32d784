"""bench/compare_bench.py runs on the CPU with the tiny preset and writes its JSON (no timing is asserted)."""

from __future__ import annotations

import json

from bench import compare_bench


def test_tiny_preset_writes_results(tmp_path):
    out = tmp_path / "results"
    assert compare_bench.main(["--preset", "tiny", "--device", "cpu", "--workdir", str(tmp_path / "w"),
                               "--out", str(out), "--repeats", "1", "--top", "8"]) == 0
    result = json.loads((out / "compare_bench.json").read_text())
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["top"] == [8]
    assert len(result["rank_seconds"]) == len(result["compare_seconds"]) == 1
    assert result["ratio"] == result["compare_median_s"] / result["rank_median_s"]
    # 2 layers × 7 matrices + embeddings + lm_head, every one in both fine-tunes
    assert result["matrices_compared"] == 16
    # two independent synthetic ΔW: their top-8 subspaces overlap about as random ones do
    assert 0.0 <= result["mean_overlap_at"]["8"] < 0.5
