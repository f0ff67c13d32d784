"""notebooks/01_quickstart.ipynb runs end to end on the CPU and shows the demo pair's known answers."""

from pathlib import Path

import nbformat

from deltakit.demo import DEMO_LORA_RANK

from conftest import run_notebook

REPO = Path(__file__).resolve().parents[1]


def text_of(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook(tmp_path):
    notebook = run_notebook(REPO / "notebooks" / "01_quickstart.ipynb", tmp_path,
                            {"DELTAKIT_NB_OUT": str(tmp_path / "out")})
    text = text_of(notebook)
    q_lines = [line for line in text.splitlines() if "self_attn.q_proj.weight" in line and "rank=" in line]
    assert q_lines and all(f"rank={DEMO_LORA_RANK:3d}" in line for line in q_lines[:1]), q_lines
    assert "k_proj.weight     rank=  0" in text
    assert "unmerge vs the original base: max |Δ|" in text
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
